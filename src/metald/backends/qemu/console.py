"""Keeping a VM's console log under its size cap (the format: core/consolelog.py).

QEMU writes the log through a file chardev opened with O_APPEND, so every
write lands at the current end of file even after the file was shortened
underneath it. Bytes QEMU writes between our read and our truncate are lost;
that window is a few microseconds once a second at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from metald.core import consolelog

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0

TRUNCATED_MARK = consolelog.HEADER_PREFIX  # how a cut log starts (then " before offset N]")


def cap_log(path: Path, max_bytes: int) -> bool:
    """If ``path`` is over ``max_bytes``, keep only its newest half. True if cut."""
    return consolelog.cap(path, max_bytes)


def contains(path: Path, marker: bytes) -> bool:
    try:
        return marker in path.read_bytes()
    except FileNotFoundError:
        return False


def count(path: Path, marker: bytes) -> int:
    try:
        return path.read_bytes().count(marker)
    except FileNotFoundError:
        return 0


def tail_text(path: Path, max_bytes: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


class LogCap:
    """Once a second, cap every log ``logs()`` names (a stat each, off the event loop)."""

    def __init__(self, max_bytes: int, logs: Callable[[], list[tuple[str, Path]]]) -> None:
        self.max_bytes = max_bytes
        self.logs = logs
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            await asyncio.to_thread(_cap_all, self.logs(), self.max_bytes)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _cap_all(logs: list[tuple[str, Path]], limit: int) -> None:
    for vm_id, path in logs:
        try:
            if cap_log(path, limit):
                log.debug("qemu %s: %s cut to %d bytes", vm_id, path.name, limit // 2)
        except OSError as exc:
            log.warning("qemu %s: capping %s failed: %s", vm_id, path, exc)
