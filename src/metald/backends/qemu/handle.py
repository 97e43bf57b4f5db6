"""The persisted handle of a running QEMU, and the check that a pid is still it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from metald.backends import procfs
from metald.backends.qemu.command import argv_hash

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
