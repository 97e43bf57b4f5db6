"""The persisted handle of a running Firecracker, and the check that a pid is still it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from metald.backends import procfs

HANDLE_VERSION = 1


@dataclass(frozen=True)
class FcHandle:
    vm_id: str
    pid: int
    start_time: int  # field 22 of /proc/<pid>/stat (clock ticks after host boot)
    api_sock_arg: str  # --api-sock as Firecracker sees it (chroot-relative when jailed)
    socket_path: str  # the socket as metald sees it
    files_dir: str  # log and metrics files
    metrics_path: str
    chroot: str | None = None
    # The VMM's host pid when ``pid`` is the jailer's launcher (PID namespace);
    # None when ``pid`` is Firecracker itself.
    vmm_pid: int | None = None
    backend: str = "firecracker"
    version: int = HANDLE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FcHandle | None:
        """Parse a stored handle; None if it is not a (current) Firecracker handle."""
        try:
            if data.get("backend") != "firecracker":
                return None
            if int(data.get("version", 0)) != HANDLE_VERSION:
                return None
            chroot = data.get("chroot")
            vmm_pid = data.get("vmm_pid")
            return cls(
                vm_id=str(data["vm_id"]),
                pid=int(data["pid"]),
                start_time=int(data["start_time"]),
                api_sock_arg=str(data["api_sock_arg"]),
                socket_path=str(data["socket_path"]),
                files_dir=str(data["files_dir"]),
                metrics_path=str(data["metrics_path"]),
                chroot=str(chroot) if chroot else None,
                vmm_pid=int(vmm_pid) if vmm_pid else None,
            )
        except (KeyError, TypeError, ValueError):
            return None


def _has_pair(argv: list[str], flag: str, value: str) -> bool:
    return any(a == flag and b == value for a, b in zip(argv, argv[1:], strict=False))


def mismatch(handle: FcHandle, proc: Path = procfs.PROC) -> str | None:
    """Why the process at ``handle.pid`` is not the VMM the handle describes.

    None means it is: same pid, same start time (not a reused pid), and a
    command line with the handle's ``--api-sock`` and ``--id``.
    """
    why, argv = procfs.identify(handle.pid, handle.start_time, proc)
    if why is not None:
        return why
    if not is_vmm_of(argv, handle.vm_id, handle.api_sock_arg):
        return f"process {handle.pid} is not Firecracker instance {handle.vm_id} on {handle.api_sock_arg}"
    return None


def is_vmm_of(argv: list[str], vm_id: str, api_sock_arg: str) -> bool:
    """Does this command line start (or run) the Firecracker of ``vm_id`` on that socket?

    True for Firecracker itself and for a launcher (metald's or Firecracker's
    jailer) whose command line carries Firecracker's arguments.
    """
    return _has_pair(argv, "--api-sock", api_sock_arg) and _has_pair(argv, "--id", vm_id)
