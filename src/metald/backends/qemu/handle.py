"""The persisted handle of a running QEMU, and the check that a pid is still it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from metald.backends import procfs
from metald.backends.qemu.command import argv_hash
from metald.jailer import cgroup as cgroups

HANDLE_VERSION = 1


@dataclass(frozen=True)
class VmmHandle:
    pid: int
    start_time: int  # field 22 of /proc/<pid>/stat (clock ticks after host boot)
    qmp_socket: str
    accel: str
    argv_hash: str
    backend: str = "qemu"
    version: int = HANDLE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmmHandle | None:
        """Parse a stored handle; None if it is not a (current) QEMU handle."""
        try:
            if data.get("backend", "qemu") != "qemu":
                return None
            if int(data.get("version", HANDLE_VERSION)) != HANDLE_VERSION:
                return None
            return cls(
                pid=int(data["pid"]),
                start_time=int(data["start_time"]),
                qmp_socket=str(data["qmp_socket"]),
                accel=str(data["accel"]),
                argv_hash=str(data["argv_hash"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


def mismatch(handle: VmmHandle, proc: Path = procfs.PROC) -> str | None:
    """Why the process at ``handle.pid`` is not the VMM the handle describes.

    None means it is: same pid, same start time (so not a reused pid), a
    command line that holds the handle's QMP socket path and hashes the same.
    """
    why, cmdline = procfs.identify(handle.pid, handle.start_time, proc)
    if why is not None:
        return why
    if not any(handle.qmp_socket in arg for arg in cmdline):
        return f"process {handle.pid} does not use QMP socket {handle.qmp_socket}"
    if argv_hash(cmdline) != handle.argv_hash:
        return f"process {handle.pid} runs a different command line"
    return None


def identify(
    checks: list[tuple[Any, VmmHandle]], cgroup_dirs: Callable[[str], tuple[Path, ...]]
) -> list[tuple[str | None, int | None, bool]]:
    """(why not, pidfd, outside its cgroup) per (spec, handle) (run in a worker
    thread). The pidfd is opened before the identity check, so a pid reused
    after the check is never watched."""
    out: list[tuple[str | None, int | None, bool]] = []
    for spec, vmm in checks:
        pidfd = None
        try:
            with contextlib.suppress(ProcessLookupError):  # gone: mismatch() says so
                pidfd = os.pidfd_open(vmm.pid) if vmm.pid > 1 else None
            why = mismatch(vmm)
            dirs = cgroup_dirs(spec.vm_id) if why is None else ()
            misplaced = not all(vmm.pid in cgroups.procs(d) for d in dirs)
        except Exception as exc:  # noqa: BLE001 - one bad item must not stop the others
            why, misplaced = f"cannot check pid {vmm.pid}: {exc}", False
        if why is None and pidfd is None:
            why = f"process {vmm.pid} is gone"
        if why is not None and pidfd is not None:
            os.close(pidfd)
            pidfd = None
        out.append((why, pidfd, misplaced))
    return out
