"""Workload exits a guest reports on its console.

A guest whose workload (its main program) ends may print one line on its
console::

    METALD_WORKLOAD_EXIT code=<exit status>

metald reads the new console output of every running VM about once a second
and records each such line as a WORKLOAD_EXITED event (message ``code=N``).
Output written while metald was not running is not looked at: after a start,
each console is read from its end.
"""

from __future__ import annotations

import asyncio
import logging
import re

from metald.config import Settings
from metald.core import consolelog
from metald.store.sqlite import Store

log = logging.getLogger(__name__)

MARKER = re.compile(rb"^METALD_WORKLOAD_EXIT code=(-?\d{1,10})\r?$", re.M)
INTERVAL_S = 1.0
READ_BYTES = 1 << 20
ACTIVE_STATES = (2, 3)  # RUNNING, PAUSED


class WorkloadWatcher:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._offsets: dict[str, int] = {}  # vm_id -> console offset read up to
        self._partial: dict[str, bytes] = {}  # an unfinished last line
        self._task: asyncio.Task[None] | None = None

    def scan(self) -> int:
        """Read every running VM's new console output once; returns the exits recorded."""
        rows, _ = self.store.list_vms(ACTIVE_STATES, 0, 1 << 30)
        found = 0
        seen = set()
        for row in rows:
            vm_id = row.vm_id
            seen.add(vm_id)
            path = self.settings.run_dir / vm_id / "console.log"
            offset = self._offsets.get(vm_id)
            if offset is None:  # first look: start at the end
                self._offsets[vm_id] = consolelog.read(path, None, 0).end
                continue
            piece = consolelog.read(path, offset, READ_BYTES)
            if piece.offset != offset:
                self._partial.pop(vm_id, None)  # dropped or started over: lines may be cut
            self._offsets[vm_id] = piece.offset + len(piece.data)
            text = self._partial.pop(vm_id, b"") + piece.data
            cut = text.rfind(b"\n") + 1
            if cut < len(text):
                self._partial[vm_id] = text[cut:][-256:]
            for match in MARKER.finditer(text[:cut]):
                self.store.add_event(vm_id, "workload", "exited", f"code={int(match.group(1))}")
                found += 1
        for vm_id in set(self._offsets) - seen:
            self._offsets.pop(vm_id, None)
            self._partial.pop(vm_id, None)
        return found

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.scan)
            except Exception:
                log.exception("reading consoles for workload exits failed")
            await asyncio.sleep(INTERVAL_S)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="workload-exits")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
