"""The EventService RPC handlers (server streaming): protocol <-> streams.

A separate service from VmService so that clients of its nine RPCs are
unaffected. Tenancy as for VmService: a customer's stream holds only its own
VMs' events, and another customer's VM console is not found.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, cast

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_codecs
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf import json_format

from metald.api import auth, validate
from metald.api.errors import to_connect
from metald.config import Settings
from metald.core import consolelog
from metald.core.errors import InvalidArgument, MetaldError, ResourceExhausted, Unavailable
from metald.gen.metal.vmprovisioner.v1 import events_pb2 as epb
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.gen.metal.vmprovisioner.v1.events_connect import EventServiceASGIApplication
from metald.store.event_log import EventRecord, Filter
from metald.streams.console import DEFAULT_TAIL, follow_console
from metald.streams.hub import EventHub
from metald.streams.watch import Beat, OutOfRange, WatchRequest, watch

log = logging.getLogger(__name__)

SHARED_MESSAGES = 4096  # recent events whose message (and its encodings) all streams share
MAX_TAIL_EVENTS = 100_000
MAX_TAIL_BYTES = 16 << 20
_STATES = frozenset(v.number for v in pb.VmState.DESCRIPTOR.values)
_KINDS = frozenset(v.number for v in epb.EventKind.DESCRIPTOR.values if v.number)


def _rpc_error(exc: BaseException) -> ConnectError:
    if isinstance(exc, OutOfRange):
        return ConnectError(Code.OUT_OF_RANGE, str(exc))
    if isinstance(exc, ResourceExhausted | Unavailable):
        log.info("stream ended: %s", exc)  # expected: one line, no traceback
    return to_connect(exc)


def event_message(e: EventRecord) -> epb.Event:
    return epb.Event(
        sequence=e.sequence,
        timestamp_ms=int(e.ts * 1000),
        vm_id=e.vm_id,
        customer_id=e.customer_id,
        kind=cast(epb.EventKind, e.kind),
        state=cast(pb.VmState, e.state),
        previous_state=cast(pb.VmState, e.previous_state),
        operation=e.operation,
        error_code=e.code,
        message=e.message,
    )


def heartbeat(beat: Beat) -> epb.Heartbeat:
    return epb.Heartbeat(sequence=beat.sequence, timestamp_ms=int(beat.timestamp * 1000), live=beat.live)


def watch_request(request: epb.WatchEventsRequest) -> WatchRequest:
    """Validated filters plus the caller's tenancy."""
    vm_id = validate.vm_id(request.vm_id) if request.vm_id else ""
    for i, state in enumerate(request.states):
        if state not in _STATES:
            raise InvalidArgument(f"states[{i}]", f"unknown state {state}")
    for i, kind in enumerate(request.kinds):
        if kind not in _KINDS:
            raise InvalidArgument(f"kinds[{i}]", f"unknown or unspecified event kind {kind}")
    if request.tail > MAX_TAIL_EVENTS:
        raise InvalidArgument("tail", f"must be at most {MAX_TAIL_EVENTS}")
    if request.HasField("after_sequence") and request.tail:
        raise InvalidArgument("tail", "give either after_sequence or tail")
    flt = Filter(
        vm_id=vm_id,
        states=frozenset(int(s) for s in request.states),
        kinds=frozenset(int(k) for k in request.kinds),
        customer_id=auth.list_scope(),
    )
    after = request.after_sequence if request.HasField("after_sequence") else None
    return WatchRequest(flt, after, request.tail, request.follow)


class _Recent(OrderedDict[Any, Any]):
    """A small LRU map."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)


class SharedEncoding:
    """A codec that encodes a message object once, however many streams send it:
    every follower of an event is handed the same message (EventServiceImpl),
    so with 100 followers an event is encoded once per codec, not 100 times."""

    def __init__(self, inner: Codec[Any, Any]) -> None:
        self.inner = inner
        self._encoded = _Recent(SHARED_MESSAGES)  # id(message) -> (message, bytes): the message kept alive

    def name(self) -> str:
        return self.inner.name()

    def encode(self, message: Any) -> bytes:
        found = self._encoded.get(id(message))
        if found is not None and found[0] is message:
            return found[1]
        data = self.inner.encode(message)
        self._encoded.put(id(message), (message, data))
        return data

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        return self.inner.decode(data, message_class)


class CompactJson:
    """Connect JSON without the indentation google.protobuf's codec adds: one
    line per message, a third of the bytes."""

    def __init__(self, inner: Codec[Any, Any]) -> None:
        self.inner = inner

    def name(self) -> str:
        return self.inner.name()

    def encode(self, message: Any) -> bytes:
        return json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        return self.inner.decode(data, message_class)


class EventServiceImpl:
    def __init__(self, hub: EventHub, settings: Settings) -> None:
        self.hub = hub
        self.settings = settings
        self._messages = _Recent(SHARED_MESSAGES)  # sequence -> WatchEventsResponse

    def _message(self, event: EventRecord) -> epb.WatchEventsResponse:
        message = self._messages.get(event.sequence)
        if message is None:
            message = epb.WatchEventsResponse(event=event_message(event))
            self._messages.put(event.sequence, message)
        return message

    async def watch_events(
        self, request: epb.WatchEventsRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[epb.WatchEventsResponse]:
        try:
            params = watch_request(request)
            async for item in watch(self.hub, params, self.settings.stream_heartbeat_seconds):
                if isinstance(item, Beat):
                    yield epb.WatchEventsResponse(heartbeat=heartbeat(item))
                else:
                    yield self._message(item)
        except MetaldError as exc:
            raise _rpc_error(exc) from None

    async def stream_console(
        self, request: epb.StreamConsoleRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[epb.StreamConsoleResponse]:
        try:
            vm_id = validate.vm_id(request.vm_id)
            row = self.hub.store.get_vm(vm_id)
            auth.check_visible(vm_id, row.customer_id if row else None)
            tail = request.tail_bytes if request.HasField("tail_bytes") else DEFAULT_TAIL
            if tail > MAX_TAIL_BYTES:
                raise InvalidArgument("tail_bytes", f"must be at most {MAX_TAIL_BYTES}")
            offset = request.offset if request.HasField("offset") else None
            path = self.settings.run_dir / vm_id / "console.log"
            pieces = follow_console(
                path,
                offset,
                tail,
                request.follow,
                self.settings.stream_heartbeat_seconds,
                lambda: self._console_stop(vm_id),
            )
            async for piece in pieces:
                if isinstance(piece, Beat):
                    yield epb.StreamConsoleResponse(heartbeat=heartbeat(piece))
                else:
                    yield epb.StreamConsoleResponse(chunk=_chunk(piece))
        except MetaldError as exc:
            raise _rpc_error(exc) from None

    def _console_stop(self, vm_id: str) -> str | None:
        if self.hub.closed:
            return "stopping"
        return "deleted" if self.hub.store.get_vm(vm_id) is None else None


class SendTimeout(Exception):
    pass


class StreamingApp:
    """The EventService ASGI application, with a bound on how long one message
    may wait for a client that stopped reading (the server's send blocks when
    the connection's buffer or HTTP/2 window is full). Past it the stream is
    abandoned and its connection closed by the server: a stuck client holds no
    more than that buffer, and nothing else waits for it."""

    def __init__(self, impl: EventServiceImpl, max_request_bytes: int) -> None:
        codecs = [SharedEncoding(CompactJson(c) if c.name() == "json" else c) for c in google_protobuf_codecs()]
        self.app = EventServiceASGIApplication(impl, read_max_bytes=max_request_bytes, codecs=codecs)
        self.timeout = impl.settings.stream_send_timeout_seconds

    @property
    def path(self) -> str:
        """``/metal.vmprovisioner.v1.EventService``, as MetaldApp.mount expects."""
        return str(self.app.path)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stuck = False

        async def bounded_send(message: Any) -> None:
            nonlocal stuck
            if stuck:
                raise SendTimeout("client stopped reading")
            try:
                await asyncio.wait_for(send(message), self.timeout)
            except TimeoutError:
                stuck = True
                log.warning("stream client took no data for %.0f s: closing the stream", self.timeout)
                raise SendTimeout("client stopped reading") from None

        try:
            await self.app(scope, receive, bounded_send)
        except SendTimeout:
            return


def _chunk(piece: consolelog.Slice) -> epb.ConsoleChunk:
    return epb.ConsoleChunk(offset=piece.offset, data=piece.data)
