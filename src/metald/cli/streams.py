"""``metald events`` and ``metald vm logs``: clients of the EventService streams.

With ``--follow`` both reconnect by themselves (metald restarting, a dropped
connection, a stream cut off for falling behind) and resume where they were:
after the last event sequence printed (or the last heartbeat's, which moves on
past events a filter skipped), or at the console offset reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

RETRY_S = 1.0
STATE_NAMES = {0: "-", 1: "CREATED", 2: "RUNNING", 3: "PAUSED", 4: "SHUTDOWN"}
FATAL = {"out_of_range", "invalid_argument", "not_found", "permission_denied", "unauthenticated", "unimplemented"}


def _client(server: str) -> Any:
    from metald.gen.metal.vmprovisioner.v1.events_connect import EventServiceClientSync

    return EventServiceClientSync(server, timeout_ms=None)


def _code(exc: BaseException) -> str | None:
    from connectrpc.errors import ConnectError

    return exc.code.value if isinstance(exc, ConnectError) else None


def _resilient(open_stream: Callable[[], Iterator[Any]], follow: bool, what: str) -> Iterator[Any]:
    """Messages of the stream ``open_stream()`` opens (it reads the resume point each time);
    with ``follow``, reopened after every end that is not the caller's fault."""
    while True:
        try:
            yield from open_stream()
            if not follow:
                return
            reason = "stream ended"
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            code = _code(exc)
            if not follow or code in FATAL:
                raise
            reason = f"{code}: {getattr(exc, 'message', exc)}" if code else str(exc) or type(exc).__name__
        print(f"metald: {what}: {reason}; reconnecting", file=sys.stderr)
        time.sleep(RETRY_S)


def event_line(e: Any) -> str:
    from metald.gen.metal.vmprovisioner.v1 import events_pb2

    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(e.timestamp_ms / 1000)) + f".{e.timestamp_ms % 1000:03d}Z"
    kind = events_pb2.EventKind.Name(e.kind).removeprefix("EVENT_KIND_").lower()
    parts = [str(e.sequence), when, e.vm_id or "-", kind, e.operation or "-", STATE_NAMES.get(e.state, str(e.state))]
    if e.error_code:
        parts.append(e.error_code)
    if e.message:
        parts.append(e.message.replace("\n", " "))
    return " ".join(parts)


def cmd_events(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from metald.gen.metal.vmprovisioner.v1 import events_pb2, vm_pb2

    kinds = [events_pb2.EventKind.Value("EVENT_KIND_" + k.upper().replace("-", "_")) for k in args.kind or []]
    states = [vm_pb2.VmState.Value("VM_STATE_" + s.upper()) for s in args.state or []]
    resume: dict[str, int | None] = {"after": args.since}
    client = _client(args.server)

    def open_stream() -> Iterator[Any]:
        request = events_pb2.WatchEventsRequest(
            vm_id=args.vm or "",
            kinds=[cast(events_pb2.EventKind, k) for k in kinds],
            states=[cast(vm_pb2.VmState, s) for s in states],
            follow=args.follow,
        )
        if resume["after"] is not None:
            request.after_sequence = resume["after"]
        else:
            request.tail = args.tail
        for message in client.watch_events(request):
            if message.HasField("heartbeat"):  # every matching event up to it was sent
                resume["after"] = max(resume["after"] or 0, message.heartbeat.sequence)
                continue
            resume["after"] = message.event.sequence
            yield message.event

    with client:
        for event in _resilient(open_stream, args.follow, "event stream"):
            if args.json:
                print(json.dumps(json_format.MessageToDict(event)), flush=True)
            else:
                print(event_line(event), flush=True)
    return 0


def cmd_vm_logs(args: argparse.Namespace) -> int:
    from metald.gen.metal.vmprovisioner.v1 import events_pb2

    resume: dict[str, int | None] = {"offset": args.offset}
    client = _client(args.server)
    out = sys.stdout.buffer

    def open_stream() -> Iterator[bytes]:
        request = events_pb2.StreamConsoleRequest(vm_id=args.vm_id, follow=args.follow)
        if resume["offset"] is not None:
            request.offset = resume["offset"]
        else:
            request.tail_bytes = args.tail
        for message in client.stream_console(request):
            if message.HasField("chunk"):
                resume["offset"] = message.chunk.offset + len(message.chunk.data)
                yield message.chunk.data
            else:
                resume["offset"] = message.heartbeat.sequence

    with client:
        for data in _resilient(open_stream, args.follow, "console stream"):
            out.write(data)
            out.flush()
    return 0


def add_parsers(sub: Any, vsub: Any, server_default: str) -> None:
    """``metald events`` (top level) and ``metald vm logs``."""
    p = sub.add_parser("events", help="print the host's events (one line each); --follow for live ones")
    p.add_argument("--server", default=server_default, help="metald API URL (env METALD_SERVER)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events; reconnects by itself")
    p.add_argument("--since", type=int, help="print the events after this sequence number")
    p.add_argument("--tail", type=int, default=20, help="without --since: how many recent events first")
    p.add_argument("--vm", help="only this VM's events")
    p.add_argument("--kind", action="append", help="only these kinds (state-changed, operation-failed, ...)")
    p.add_argument("--state", action="append", choices=["created", "running", "paused", "shutdown"])
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)
    p = vsub.add_parser("logs", help="print a VM's console; --follow for new output")
    p.add_argument("vm_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new output; reconnects by itself")
    p.add_argument("--tail", type=int, default=4096, help="how many of the last bytes first")
    p.add_argument("--offset", type=int, help="start at this console offset instead")
    p.set_defaults(func=cmd_vm_logs)
