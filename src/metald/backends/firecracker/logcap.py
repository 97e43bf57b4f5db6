"""Keeping a Firecracker VM's files under ``UNKEY_METALD_CONSOLE_LOG_MAX_BYTES``.

A guest that prints without end must not fill the host's disk (Firecracker's
``docs/prod-host-setup.md`` leaves bounding the serial output to the
integrator). Once a second, per running VM:

* ``console.log`` (the guest's serial port: Firecracker's stdout) and
  ``firecracker.stderr`` (Firecracker's own stderr, and its stdout too when the
  console is off) are opened by metald with O_APPEND, so they are cut in place
  to their newest half (``metald.backends.qemu.console.cap_log``, as for QEMU);
  every later write lands at the new end.
* the metrics file is written by Firecracker at its own file offset (no
  O_APPEND: a truncated file would grow back to that offset). metald reads the
  new lines into the VM's running totals first, then punches a hole over what
  it has read (``fallocate(PUNCH_HOLE)``): the blocks are freed, the apparent
  size stays Firecracker's offset, and readers skip the hole (SEEK_DATA). A
  metald restart starts its totals from what is left in the file.

Between two checks a guest can write what its serial port carries in a
second; the cap bounds the file from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metald.backends.firecracker.metrics import MetricsFile
from metald.backends.qemu.console import cap_log

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(path: Path, length: int) -> None:
    """Free the blocks of ``path``'s first ``length`` bytes (rounded down to a block); keep its size."""
    length -= length % BLOCK
    if length <= 0:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def allocated_bytes(path: Path) -> int:
    """Bytes ``path`` occupies on disk (not its apparent size); 0 if missing."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


@dataclass
class VmFiles:
    """One running VM's files to keep under the cap."""

    vm_id: str
    appended: list[Path]  # written with O_APPEND: cut in place
    metrics: MetricsFile | None  # written at Firecracker's offset: read, then hole-punched


def cap_metrics(metrics: MetricsFile, max_bytes: int) -> bool:
    """Read new lines into the totals, then free what has been read if over the cap. True if punched."""
    if allocated_bytes(metrics.path) <= max_bytes:
        return False
    metrics.read_new()
    punch_hole(metrics.path, metrics.consumed)
    return True


class LogCapper:
    """A task that caps every running VM's files once per ``interval_s``."""

    def __init__(self, max_bytes: int, files: Callable[[], list[VmFiles]], interval_s: float = CHECK_INTERVAL_S):
        self.max_bytes = max_bytes
        self.files = files
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.cap_once()
            except Exception:
                log.exception("capping Firecracker logs failed")

    async def cap_once(self) -> None:
        """One round over every VM (also called directly by tests)."""
        for vm in self.files():
            appended = [p for p in vm.appended]
            await asyncio.to_thread(_cap_appended, vm.vm_id, appended, self.max_bytes)
            if vm.metrics is not None:
                try:
                    cap_metrics(vm.metrics, self.max_bytes)  # on the loop: MetricsFile is not shared
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        log.warning("firecracker %s: capping %s failed: %s", vm.vm_id, vm.metrics.path, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _cap_appended(vm_id: str, paths: list[Path], max_bytes: int) -> None:
    for path in paths:
        try:
            if cap_log(path, max_bytes):
                log.debug("firecracker %s: %s cut to %d bytes", vm_id, path.name, max_bytes // 2)
        except OSError as exc:
            log.warning("firecracker %s: capping %s failed: %s", vm_id, path, exc)
