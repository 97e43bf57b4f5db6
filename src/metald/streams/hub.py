"""Fan-out of the event log to live subscribers, and its retention.

The store calls :meth:`EventHub.notify` after every commit that appended
events. One task then reads the new rows in sequence order (so subscribers
see the log's order whatever thread committed them) and hands each event to
every subscriber whose filter matches, through that subscriber's bounded
queue. A subscriber whose queue is full is dropped at once, its queue freed:
a slow or stuck client costs at most ``events_subscriber_buffer`` references
and never delays the others or the API (see :class:`Subscription`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque

from metald.config import Settings
from metald.store.event_log import EventRecord, Filter
from metald.store.sqlite import Store

log = logging.getLogger(__name__)

READ_BATCH = 256  # events fanned out before the loop lets the streams send them
PRUNE_INTERVAL_S = 60.0
PRUNE_BATCH = 5000


class Subscription:
    """One live reader: events after ``start`` matching ``filter`` arrive in ``queue``.

    ``position``: every matching event up to it has been queued. ``overflowed``:
    the queue filled up and the subscription was dropped. ``closed``: the hub
    stopped (metald is shutting down).
    """

    def __init__(self, flt: Filter, start: int, limit: int) -> None:
        self.filter = flt
        self.start = start
        self.position = start
        self.limit = limit
        self.queue: deque[EventRecord] = deque()
        self.changed = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def _offer(self, event: EventRecord) -> bool:
        """Queue the event if it matches; False if the queue is full (dropped)."""
        if self.filter.matches(event):
            if len(self.queue) >= self.limit:
                self.overflowed = True
                self.queue.clear()
                self.changed.set()
                return False
            self.queue.append(event)
        return True


class EventHub:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._subs: set[Subscription] = set()
        self.last = store.event_bounds()[1]  # everything up to here has been fanned out
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.dropped = 0  # subscribers cut off for falling behind
        store.event_hooks.append(self.notify)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.last = self.store.event_bounds()[1]
        self._tasks = [
            self._loop.create_task(self._fan_out(), name="events-fan-out"),
            self._loop.create_task(self._prune_loop(), name="events-prune"),
        ]

    def notify(self) -> None:
        """New events were committed (called by the store, from any thread)."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                self._loop.call_soon_threadsafe(self._wake.set)

    def subscribe(self, flt: Filter) -> Subscription:
        """A subscription receiving every matching event after :attr:`last`."""
        sub = Subscription(flt, self.last, self.settings.events_subscriber_buffer)
        sub.closed = self.closed
        if not self.closed:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def pump(self) -> bool:
        """Fan out the next batch of committed events; False when there were none."""
        batch = self.store.events_after(self.last, 1 << 62, Filter(), READ_BATCH)
        if not batch:
            return False
        for event in batch:
            for sub in list(self._subs):
                if not sub._offer(event):
                    self._subs.discard(sub)
                    self.dropped += 1
                    log.warning("event stream subscriber fell %d events behind: cut off", sub.limit)
        self.last = batch[-1].sequence
        for sub in self._subs:
            sub.position = self.last
            sub.changed.set()
        return True

    async def _fan_out(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while self.pump():
                    await asyncio.sleep(0)  # the streams send their share before the next batch
            except Exception:
                log.exception("event fan-out failed")
                await asyncio.sleep(1)
                self._wake.set()

    async def prune(self) -> int:
        """Apply the retention once (count and age), a batch at a time; returns how
        many events were removed."""
        cutoff = time.time() - self.settings.events_retention_seconds
        removed = 0
        while True:
            n = self.store.prune_events(self.settings.events_retention_count, cutoff, PRUNE_BATCH)
            removed += n
            if n < PRUNE_BATCH:
                return removed
            await asyncio.sleep(0)  # let requests in between batches

    async def _prune_loop(self) -> None:
        while True:
            try:
                removed = await self.prune()
                if removed:
                    log.info("pruned old events", extra={"removed": removed})
            except Exception:
                log.exception("pruning events failed")
            await asyncio.sleep(PRUNE_INTERVAL_S)

    async def close(self) -> None:
        """End every subscription (their streams finish with ``unavailable``)."""
        self.closed = True
        for sub in self._subs:
            sub.closed = True
            sub.changed.set()
        self._subs.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
