"""Helpers for tests that run the Firecracker test double."""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.firecracker_double import firecracker_double as fcd

DOUBLE = Path(fcd.__file__).resolve()
SPEC_PATH = fcd.default_spec_path()
STUB_SOURCE = DOUBLE.parent / "jail_stub.c"


def make_shim(directory: Path, record: Path, **env: str) -> Path:
    """An executable started like Firecracker that runs the double.

    It uses this interpreter (which has PyYAML and jsonschema) and sets the
    double's knobs: FC_DOUBLE_SPEC, FC_DOUBLE_RECORD=record, plus ``env``.
    """
    knobs = {"FC_DOUBLE_SPEC": str(SPEC_PATH), "FC_DOUBLE_RECORD": str(record), **env}
    lines = ["#!/bin/sh"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in knobs.items()]
    lines.append(f'exec {shlex.quote(sys.executable)} {shlex.quote(str(DOUBLE))} "$@"')
    shim = directory / "firecracker"
    shim.write_text("\n".join(lines) + "\n")
    shim.chmod(0o755)
    return shim


def read_record(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


@functools.cache
def validator() -> fcd.SpecValidator:
    return fcd.SpecValidator.from_file(SPEC_PATH)


def write_knobs(path: Path, record: Path, **env: str) -> Path:
    """The double's knobs as a file for ``--double-knobs`` (a jailed double has no environment)."""
    knobs = {"FC_DOUBLE_SPEC": str(SPEC_PATH.resolve()), "FC_DOUBLE_RECORD": str(record), **env}
    path.write_text("".join(f"{name}={value}\n" for name, value in knobs.items()))
    path.chmod(0o644)
    return path


def build_jail_stub(directory: Path, knobs: Path) -> Path:
    """A static executable named ``firecracker`` that execs this interpreter on the double.

    metald's jailer runs it in Firecracker's place (see jail_stub.c); the
    interpreter must be visible in the jail (jail_runtime.py).
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("a C compiler (gcc) is needed to build the jailed double's stub")
    out = directory / "firecracker"
    defines = {"PYTHON": sys.executable, "DOUBLE": str(DOUBLE), "KNOBS": str(knobs)}
    argv = [cc, "-static", "-O2", "-Wall", "-o", str(out), *[f'-D{k}="{v}"' for k, v in defines.items()]]
    subprocess.run([*argv, str(STUB_SOURCE)], check=True, capture_output=True, timeout=120)
    return out


JAILER_DOUBLE = DOUBLE.parent / "jailer_double.py"


def make_jailer_shim(directory: Path, workspace: Path) -> Path:
    """An executable started like Firecracker's jailer that runs the jailer double.

    ``workspace`` (the Firecracker double's knobs and record) and this
    interpreter are bind-mounted into each jail it builds (``--double-runtime``).
    """
    root = DOUBLE.parents[2]
    lines = [
        "#!/bin/sh",
        f"export PYTHONPATH={shlex.quote(str(root))}",
        f'exec {shlex.quote(sys.executable)} {shlex.quote(str(JAILER_DOUBLE))} '
        f'--double-runtime {shlex.quote(str(workspace))} "$@"',
    ]
    shim = directory / "jailer"
    shim.write_text("\n".join(lines) + "\n")
    shim.chmod(0o755)
    return shim
