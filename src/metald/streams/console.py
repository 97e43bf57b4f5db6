"""One console stream: the last bytes of a VM's console log, then new output.

The log file is polled (a stat, then a read when it grew): it outlives guest
reboots (the VMM appends), VMM restarts and metald restarts, and its size cap
keeps offsets meaningful (core/consolelog.py), so a client resumes at the
offset it reached.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from metald.core import consolelog
from metald.core.errors import NotFound, Unavailable
from metald.streams.watch import Beat

CHUNK_BYTES = 64 << 10
POLL_S = 0.25
DEFAULT_TAIL = 4096


async def follow_console(
    path: Path,
    offset: int | None,
    tail: int,
    follow: bool,
    heartbeat_s: float,
    stop: Callable[[], str | None],
) -> AsyncIterator[consolelog.Slice | Beat]:
    """Slices of the log from ``offset`` (None: its last ``tail`` bytes); with
    ``follow``, keeps polling for new output and beats when idle. ``stop()``
    returns "stopping" (metald is stopping: Unavailable) or "deleted" (the VM
    is gone: NotFound) to end the stream."""
    first = consolelog.read(path, offset, CHUNK_BYTES, tail)
    at = first.offset
    pending: consolelog.Slice | None = first
    idle_since = time.monotonic()
    last_stat: tuple[int, int, int] | None = None
    while True:
        piece = pending if pending is not None else consolelog.read(path, at, CHUNK_BYTES)
        pending = None
        if piece.data:
            yield piece
            at = piece.offset + len(piece.data)
            idle_since = time.monotonic()
            continue
        at = piece.offset
        if not follow:
            yield Beat(at, True, time.time())
            return
        # wait for the file to change (size, inode or mtime), beating when idle
        while True:
            why = stop()
            if why == "deleted":
                raise NotFound("the vm was deleted")
            if why is not None:
                raise Unavailable(f"metald is stopping; reconnect with offset={at}")
            await asyncio.sleep(POLL_S)
            try:
                st = os.stat(path)
                stat = (st.st_ino, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                stat = (0, 0, 0)
            if stat != last_stat:
                last_stat = stat
                break
            if time.monotonic() - idle_since >= heartbeat_s:
                idle_since = time.monotonic()
                yield Beat(at, True, time.time())
