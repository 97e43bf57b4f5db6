"""Clients of the EventService streams: Connect JSON over HTTP/1.1, read frame by
frame from the raw response (what curl sees), and gRPC (grpcio)."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import httpx

from metald.gen.metal.vmprovisioner.v1 import events_pb2_grpc

EVENTS = "/metal.vmprovisioner.v1.EventService/"
_GRPC_CODES = {c: c.name.lower() for c in grpc.StatusCode}


class StreamEnded(Exception):
    """The stream ended with an error status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def frames(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """(flags, payload) of each Connect streaming envelope: 1 flag byte, a 4-byte big-endian length."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while len(buf) >= 5:
            flags, length = struct.unpack(">BI", buf[:5])
            if len(buf) < 5 + length:
                break
            yield flags, buf[5 : 5 + length]
            buf = buf[5 + length :]


def connect_stream(
    url: str, method: str, request: dict[str, Any], caller: str | None = None, timeout: float = 120
) -> Iterator[dict[str, Any]]:
    """Messages (JSON objects) of a server stream over Connect/HTTP/1.1; raises
    StreamEnded with the end-of-stream error, if any."""
    body = json.dumps(request).encode()
    headers = {"content-type": "application/connect+json"}
    if caller:
        headers["x-metald-caller"] = caller
    with httpx.Client(timeout=timeout) as http, http.stream(
        "POST", url + EVENTS + method, content=struct.pack(">BI", 0, len(body)) + body, headers=headers
    ) as r:
        if r.status_code != 200:
            data = json.loads(r.read() or b"{}")
            raise StreamEnded(data.get("code", str(r.status_code)), data.get("message", ""))
        for flags, payload in frames(r.iter_raw()):
            data = json.loads(payload)
            if flags & 0x02:  # end of stream
                if "error" in data:
                    raise StreamEnded(data["error"].get("code", "unknown"), data["error"].get("message", ""))
                return
            yield data


class Follower(threading.Thread):
    """Reads a WatchEvents stream in a thread, keeping every event's (sequence, vm_id, kind, state)."""

    def __init__(self, url: str, request: dict[str, Any], caller: str | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.request, self.caller = url, request, caller
        self.events: list[dict[str, Any]] = []
        self.beats: list[dict[str, Any]] = []
        self.live = threading.Event()
        self.error: BaseException | None = None
        self.stop = False

    def run(self) -> None:
        try:
            for message in connect_stream(self.url, "WatchEvents", self.request, self.caller):
                if "event" in message:
                    self.events.append(message["event"])
                else:
                    self.beats.append(message["heartbeat"])
                    self.live.set()
                if self.stop:
                    return
        except BaseException as exc:  # noqa: BLE001 - kept for the test to look at
            self.error = exc
            self.live.set()

    def sequences(self) -> list[int]:
        return [int(e["sequence"]) for e in self.events]


def grpc_watch(url: str, request: Any, timeout: float = 60) -> Iterator[Any]:
    """WatchEvents through grpcio; raises StreamEnded on an error status."""
    channel = grpc.insecure_channel(url.removeprefix("http://"))
    try:
        stub = events_pb2_grpc.EventServiceStub(channel)
        try:
            yield from stub.WatchEvents(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise StreamEnded(_GRPC_CODES.get(exc.code(), str(exc.code())), exc.details() or "") from None
    finally:
        channel.close()
