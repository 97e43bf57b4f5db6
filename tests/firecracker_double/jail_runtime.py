"""TEST ONLY: let the Firecracker test double run inside metald's Firecracker jails.

The real Firecracker is a static binary: its jail holds only the kernel,
initrd, drives, ``dev/kvm``, ``dev/net/tun`` and ``run/``. The double is a
Python script, so for tests the jail additionally gets read-only bind mounts
of what the interpreter needs (``/usr``, the Python prefix and venv, the
double's directory and the API description) and one writable workspace (the
double's knobs and request record). Everything else is metald's production
path: the jail tree, assets, device nodes, cgroup, and the launcher's
namespaces, chroot, uid/gid drop, rlimit and empty environment. The binds are
made by one more undoable step after metald's own (``double-runtime``), and
removed with the jail (``Jailer.cleanup`` unmounts everything below it).

Used as ``python -m tests.firecracker_double.jail_runtime WORKSPACE serve``:
metald's CLI with this step added.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from metald.core.models import BootSpec
from metald.core.plan import FuncStep, Step
from metald.jailer import chroot, syscalls
from metald.jailer.jailer import Jailer
from metald.jailer.layout import Jail
from tests.firecracker_double.harness import DOUBLE, SPEC_PATH

STEP = "double-runtime"
MERGED_USR_LINKS = ("bin", "lib", "lib64", "sbin")


def runtime_dirs(workspace: Path) -> list[tuple[Path, bool]]:
    """(host directory, writable) pairs the double needs, outermost first."""
    read_only = {Path("/usr"), Path(sys.base_prefix), Path(sys.prefix), DOUBLE.parent, SPEC_PATH.resolve().parent}
    dirs = [(d.resolve(), False) for d in read_only] + [(workspace.resolve(), True)]
    return sorted(set(dirs), key=lambda item: len(item[0].parts))


def bind_runtime(root: Path, workspace: Path) -> None:
    for name in MERGED_USR_LINKS:  # Debian's merged /usr: /lib -> usr/lib, ...
        host = Path("/") / name
        if host.is_symlink() and not (root / name).is_symlink():
            (root / name).symlink_to(os.readlink(host))
    for source, writable in runtime_dirs(workspace):
        target = root / source.relative_to("/")
        for parent in reversed(target.relative_to(root).parents):
            if str(parent) != ".":
                (root / parent).mkdir(mode=0o755, exist_ok=True)
        target.mkdir(mode=0o755, exist_ok=True)
        syscalls.mount(source, target, None, syscalls.MS_BIND)
        flags = syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_NOSUID | syscalls.MS_NODEV
        syscalls.mount(None, target, None, flags | (0 if writable else syscalls.MS_RDONLY))


def unbind_runtime(root: Path, workspace: Path) -> None:
    for source, _ in reversed(runtime_dirs(workspace)):
        target = root / source.relative_to("/")
        if target.exists():
            chroot.unmount_under(target)


def install(workspace: Path) -> None:
    """Add the ``double-runtime`` step to every Firecracker jail this process builds."""
    original = Jailer.prepare_steps

    def prepare_steps(self: Jailer, jail: Jail, spec: BootSpec) -> list[Step]:
        steps = original(self, jail, spec)
        if jail.vmm_name == "firecracker":

            async def do() -> None:
                bind_runtime(jail.root, workspace)

            async def undo() -> None:
                unbind_runtime(jail.root, workspace)

            steps.append(FuncStep(STEP, do, undo))
        return steps

    Jailer.prepare_steps = prepare_steps  # type: ignore[method-assign]


def main() -> int:
    install(Path(sys.argv[1]))
    from metald.cli.main import main as metald_main

    return metald_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
