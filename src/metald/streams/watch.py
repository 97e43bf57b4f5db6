"""One event stream: stored events after a sequence number, then live ones.

Exactly once and in order: the subscription is taken first, at the hub's
position ``H`` (everything up to ``H`` fanned out, everything after it will
reach the subscription's queue). The stored events after the client's
sequence up to ``H`` are replayed from SQLite, then the queue is drained. Both
run on the event loop, so nothing is fanned out between the subscription and
the moment its position is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from metald.core.errors import MetaldError, ResourceExhausted, Unavailable
from metald.store.event_log import EventRecord, Filter
from metald.streams.hub import EventHub

REPLAY_BATCH = 500


class OutOfRange(MetaldError):
    """A resume point the log no longer (or never) held."""

    code = "out_of_range"


@dataclass(frozen=True, slots=True)
class Beat:
    """A heartbeat: every matching event up to ``sequence`` has been sent."""

    sequence: int
    live: bool
    timestamp: float


@dataclass(frozen=True)
class WatchRequest:
    filter: Filter
    after: int | None = None  # resume point; None: start with the last ``tail`` events
    tail: int = 0
    follow: bool = True


async def watch(hub: EventHub, request: WatchRequest, heartbeat_s: float) -> AsyncIterator[EventRecord | Beat]:
    """The events for ``request``; raises OutOfRange, ResourceExhausted (fell behind)
    or Unavailable (metald is stopping), each naming the sequence to resume from."""
    store = hub.store
    flt = request.filter
    sub = hub.subscribe(flt)
    try:
        until = sub.start
        floor, head = store.event_bounds()
        if request.after is None:
            sent = store.events_tail_start(until, flt, request.tail)
        elif request.after < floor:
            raise OutOfRange(
                f"after_sequence {request.after} was pruned: this host keeps events after {floor};"
                " resync with ListVms and watch from the latest events"
            )
        elif request.after > head:
            raise OutOfRange(
                f"after_sequence {request.after} is ahead of this host's event log (last {head});"
                " resync with ListVms and watch from the latest events"
            )
        else:
            sent = request.after
        # replay what is stored, up to where the subscription starts
        while sent < until:
            if store.event_bounds()[0] > sent:  # pruned while this client was reading
                raise OutOfRange(f"events after {sent} were pruned while replaying; resync with ListVms")
            batch = store.events_after(sent, until, flt, REPLAY_BATCH)
            if not batch:
                sent = until
                break
            for event in batch:
                yield event
                sent = event.sequence
        sent = max(sent, until)
        yield Beat(sent, True, time.time())
        if not request.follow:
            return
        while True:
            while sub.queue:
                event = sub.queue.popleft()
                if event.sequence > sent:
                    yield event
                    sent = event.sequence
            if sub.overflowed:
                raise ResourceExhausted(
                    f"this stream fell more than {sub.limit} events behind and was cut off;"
                    f" reconnect with after_sequence={sent}"
                )
            if sub.closed:
                raise Unavailable(f"metald is stopping; reconnect with after_sequence={sent}")
            sub.changed.clear()
            if sub.queue or sub.overflowed or sub.closed:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.changed.wait(), heartbeat_s)
                continue
            sent = max(sent, sub.position)  # idle: every matching event up to here was sent
            yield Beat(sent, True, time.time())
    finally:
        hub.unsubscribe(sub)
