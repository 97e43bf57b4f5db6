"""Slow and stuck event stream clients: bounded per-subscriber queues, a clear
cut-off that can be resumed from, and nothing else slowed down."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from tests.support.clients import ConnectJsonClient, small_config
from tests.support.fakes import FakeBackend
from tests.support.server import make_settings, serve_in_thread
from tests.support.streams import EVENTS, Follower, StreamEnded, connect_stream, frames

VMS = 20
# Loopback sockets buffer a few MB in the kernel before a client that does not
# read pushes back on the server: the floods are larger than that.
FLOOD = 2000


def wait_for(check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def stuck_client() -> httpx.Client:
    """A client with a tiny receive buffer, so that not reading pushes back on the server."""
    transport = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    return httpx.Client(transport=transport, timeout=120)


def open_watch(http: httpx.Client, url: str, request: dict[str, Any]) -> Any:
    body = json.dumps(request).encode()
    return http.stream(
        "POST", url + EVENTS + "WatchEvents", content=struct.pack(">BI", 0, len(body)) + body,
        headers={"content-type": "application/connect+json"},
    )


def make_vms(url: str, store: Any, pace: Follower | None = None) -> None:
    """VMs through the API, and a flood of 4 KB events straight into the log, 100
    at a time; with ``pace``, each hundred once that follower has all before it
    (so that it never falls behind, however slow this machine is)."""
    client = ConnectJsonClient(url)
    for i in range(VMS):
        client.call("CreateVm", pb.CreateVmRequest(vm_id=f"bp-{i}", config=small_config()))
        for _ in range(FLOOD // VMS // 100):
            if pace is not None:
                head = store.event_bounds()[1]
                wait_for(lambda: pace.events and int(pace.events[-1]["sequence"]) == head)  # noqa: B023
            for _ in range(100):
                store.add_event(f"bp-{i}", "workload", "exited", "x" * 4000)
    client.close()


def test_stuck_follower_is_cut_off_and_resumes(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, events_subscriber_buffer=512, stream_send_timeout_seconds=600)
    with serve_in_thread(settings, FakeBackend()) as srv:
        assert srv.hub is not None
        good = Follower(srv.url, {"follow": True})
        good.start()
        assert good.live.wait(10)
        http = stuck_client()
        with open_watch(http, srv.url, {"follow": True}) as stuck:
            assert stuck.status_code == 200
            make_vms(srv.url, srv.store, pace=good)  # the API is not held up by the stuck stream
            wait_for(lambda: srv.hub.dropped == 1)
            head = srv.store.event_bounds()[1]
            wait_for(lambda: good.events and int(good.events[-1]["sequence"]) == head)
            assert good.sequences() == list(range(1, head + 1))  # the other follower missed nothing
            assert srv.hub.subscribers == 1
            # now read what the stuck stream holds: events, then the cut-off naming where to resume
            sock = stuck.extensions["network_stream"].get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # read it at full speed
            got: list[int] = []
            ended: dict[str, Any] = {}
            for flags, payload in frames(stuck.iter_raw()):
                data = json.loads(payload)
                if flags & 0x02:
                    ended = data
                    break
                if "event" in data:
                    got.append(int(data["event"]["sequence"]))
        assert ended["error"]["code"] == "resource_exhausted", ended
        assert got == list(range(1, len(got) + 1)) and len(got) < head
        assert f"after_sequence={got[-1]}" in ended["error"]["message"]
        rest = [int(m["event"]["sequence"]) for m in
                connect_stream(srv.url, "WatchEvents", {"afterSequence": str(got[-1])}) if "event" in m]
        assert got + rest == list(range(1, head + 1))
        good.stop = True


def test_client_that_takes_nothing_is_closed_after_the_send_timeout(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, events_subscriber_buffer=100_000, stream_send_timeout_seconds=1)
    with serve_in_thread(settings, FakeBackend()) as srv:
        assert srv.hub is not None
        http = stuck_client()
        with open_watch(http, srv.url, {"follow": True}) as stuck:
            assert stuck.status_code == 200
            make_vms(srv.url, srv.store)
            wait_for(lambda: srv.hub.subscribers == 0)  # its handler gave up on the send
            assert srv.hub.dropped == 0  # not by the queue bound
            sock = stuck.extensions["network_stream"].get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            with pytest.raises(httpx.HTTPError):  # the server closed the connection mid-stream
                for _ in frames(stuck.iter_raw()):
                    pass
        # the server is fine
        assert [m for m in connect_stream(srv.url, "WatchEvents", {"tail": 1}) if "event" in m]


def test_streams_end_when_the_server_stops(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with serve_in_thread(settings, FakeBackend()) as srv:
        follower = Follower(srv.url, {"follow": True})
        follower.start()
        assert follower.live.wait(10)
        ConnectJsonClient(srv.url).call("CreateVm", pb.CreateVmRequest(vm_id="s-1", config=small_config()))
        wait_for(lambda: len(follower.events) == 3)
    follower.join(10)
    assert not follower.is_alive()
    assert isinstance(follower.error, StreamEnded) and follower.error.code == "unavailable"
    assert "after_sequence=3" in follower.error.message
