"""Helpers for tests that run the Firecracker test double."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from tests.firecracker_double import firecracker_double as fcd

DOUBLE = Path(fcd.__file__).resolve()
SPEC_PATH = fcd.default_spec_path()


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
