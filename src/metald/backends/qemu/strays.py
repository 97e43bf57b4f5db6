"""Finding and killing QEMU processes of this metald that it does not track.

A VMM of this metald carries a marker on its command line: its QMP socket
``unix:<run_dir>/<vm_id>/qmp.sock`` (in QEMU's argv, or its launcher's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from pathlib import Path

from metald.backends import procfs
from metald.backends.qemu.command import pid_file_path, qmp_socket_path, vmm_log_path
from metald.jailer.layout import VM_ID_RE

log = logging.getLogger(__name__)

KILL_WAIT_S = 5.0


def vmm_processes(run_root: Path) -> list[tuple[int, str]]:
    """(pid, vm_id) of every process whose command line has ``unix:<run_root>/<vm_id>/qmp.sock``."""
    marker = re.compile(r"unix:" + re.escape(str(run_root)) + r"/([^/]+)/qmp\.sock")
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        cmdline = procfs.read_cmdline(int(entry.name))
        if not cmdline:
            continue
        for arg in cmdline:
            match = marker.search(arg)
            if match and VM_ID_RE.match(match.group(1)):
                found.append((int(entry.name), match.group(1)))
                break
    return found


def kill(targets: list[tuple[int, str]], timeout: float = KILL_WAIT_S) -> list[int]:
    """SIGKILL each (pid, vm_id) (its process group too if it leads one); wait until gone."""
    killed = []
    for pid, vm_id in targets:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        log.warning("killed stray VMM process %d of %s", pid, vm_id)
        killed.append(pid)
    deadline = time.monotonic() + timeout
    for pid in killed:
        while time.monotonic() < deadline:
            stat = procfs.read_stat(pid)
            if stat is None or stat.state in ("Z", "X"):
                break
            time.sleep(0.01)
    return killed


def kill_by_pid_file(run_dir: Path) -> None:
    """Kill the QEMU named by the VM's pid file, only if it carries the VM's
    marker, and remove the VM's runtime files and logs (cleanup of a VM whose
    VMM metald does not track)."""
    pid_file = pid_file_path(run_dir)
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
        cmdline = procfs.read_cmdline(pid) or []
        if any(str(qmp_socket_path(run_dir)) in arg for arg in cmdline):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    remove_files(run_dir, [qmp_socket_path(run_dir), pid_file, vmm_log_path(run_dir), run_dir / "console.log"])


def remove_files(run_dir: Path, files: list[Path]) -> None:
    """Remove ``files`` and then ``run_dir`` if that left it empty (never its parent)."""
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()
