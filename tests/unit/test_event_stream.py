"""EventService.WatchEvents over real HTTP (Connect JSON on HTTP/1.1 read frame by
frame, and gRPC) with a fake VMM: the store, engine, hub and server are real."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from metald.gen.metal.vmprovisioner.v1 import events_pb2 as epb
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from tests.support.clients import ConnectJsonClient, RpcFailed, small_config
from tests.support.fakes import FakeBackend
from tests.support.server import RunningServer, make_settings, serve_in_thread
from tests.support.streams import Follower, StreamEnded, connect_stream, grpc_watch


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with serve_in_thread(make_settings(tmp_path, stream_heartbeat_seconds=0.5), FakeBackend()) as srv:
        yield srv


def wait_for(check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(kind, operation, state) without the prefixes."""
    return [
        (
            e["kind"].removeprefix("EVENT_KIND_"),
            e.get("operation", ""),
            e.get("state", "VM_STATE_UNSPECIFIED").removeprefix("VM_STATE_"),
        )
        for e in events
    ]


def lifecycle(client: ConnectJsonClient, vm_id: str, customer: str = "") -> None:
    client.call("CreateVm", pb.CreateVmRequest(vm_id=vm_id, config=small_config(), customer_id=customer))
    client.call("BootVm", pb.BootVmRequest(vm_id=vm_id))
    client.call("PauseVm", pb.PauseVmRequest(vm_id=vm_id))
    client.call("ResumeVm", pb.ResumeVmRequest(vm_id=vm_id))
    client.call("ShutdownVm", pb.ShutdownVmRequest(vm_id=vm_id))
    client.call("DeleteVm", pb.DeleteVmRequest(vm_id=vm_id))


def test_follower_sees_a_lifecycle_in_order(server: RunningServer) -> None:
    follower = Follower(server.url, {"follow": True})
    follower.start()
    assert follower.live.wait(10)
    client = ConnectJsonClient(server.url)
    lifecycle(client, "ev-1")
    with pytest.raises(RpcFailed):
        client.call("PauseVm", pb.PauseVmRequest(vm_id="ev-1"))  # gone: refused before the engine
    wait_for(lambda: any(e["kind"] == "EVENT_KIND_OPERATION_SUCCEEDED" and e["operation"] == "delete"
                         for e in follower.events))
    got = summary(follower.events)
    assert got == [
        ("OPERATION_STARTED", "create", "UNSPECIFIED"),
        ("STATE_CHANGED", "create", "CREATED"),
        ("OPERATION_SUCCEEDED", "create", "CREATED"),
        ("OPERATION_STARTED", "boot", "CREATED"),
        ("STATE_CHANGED", "state", "RUNNING"),
        ("OPERATION_SUCCEEDED", "boot", "RUNNING"),
        ("OPERATION_STARTED", "pause", "RUNNING"),
        ("STATE_CHANGED", "state", "PAUSED"),
        ("OPERATION_SUCCEEDED", "pause", "PAUSED"),
        ("OPERATION_STARTED", "resume", "PAUSED"),
        ("STATE_CHANGED", "state", "RUNNING"),
        ("OPERATION_SUCCEEDED", "resume", "RUNNING"),
        ("OPERATION_STARTED", "shutdown", "RUNNING"),
        ("STATE_CHANGED", "state", "SHUTDOWN"),
        ("OPERATION_SUCCEEDED", "shutdown", "SHUTDOWN"),
        ("OPERATION_STARTED", "delete", "SHUTDOWN"),
        ("VM_REMOVED", "remove", "UNSPECIFIED"),
        ("OPERATION_SUCCEEDED", "delete", "UNSPECIFIED"),
    ], got
    seqs = follower.sequences()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no duplicate
    assert all(e["vmId"] == "ev-1" for e in follower.events)
    changed = [e for e in follower.events if e["kind"] == "EVENT_KIND_STATE_CHANGED"]
    assert changed[1].get("previousState") == "VM_STATE_CREATED"
    follower.stop = True


def test_failure_carries_code_and_message(server: RunningServer) -> None:
    client = ConnectJsonClient(server.url)
    client.call("CreateVm", pb.CreateVmRequest(vm_id="ev-f", config=small_config()))
    with pytest.raises(RpcFailed):
        client.call("PauseVm", pb.PauseVmRequest(vm_id="ev-f"))
    server.backend.fail.add("boot")
    with pytest.raises(RpcFailed):
        client.call("BootVm", pb.BootVmRequest(vm_id="ev-f"))
    events = [m["event"] for m in connect_stream(server.url, "WatchEvents", {"afterSequence": "0", "vmId": "ev-f"})
              if "event" in m]
    failed = [e for e in events if e["kind"] == "EVENT_KIND_OPERATION_FAILED"]
    assert [(e["operation"], e["errorCode"]) for e in failed] == [
        ("pause", "failed_precondition"), ("boot", "unavailable")]
    assert "CREATED" in failed[0]["message"] and "fake boot failure" in failed[1]["message"]


def test_resume_without_gap_or_duplicate_then_live(server: RunningServer) -> None:
    client = ConnectJsonClient(server.url)
    for i in range(5):
        client.call("CreateVm", pb.CreateVmRequest(vm_id=f"r-{i}", config=small_config()))
    everything = [m["event"] for m in connect_stream(server.url, "WatchEvents", {"afterSequence": "0"})
                  if "event" in m]
    seqs = [int(e["sequence"]) for e in everything]
    assert seqs == list(range(1, len(seqs) + 1))
    middle = seqs[len(seqs) // 2]
    follower = Follower(server.url, {"afterSequence": str(middle), "follow": True})
    follower.start()
    assert follower.live.wait(10)
    client.call("CreateVm", pb.CreateVmRequest(vm_id="r-live", config=small_config()))
    wait_for(lambda: any(e.get("vmId") == "r-live" and e["kind"] == "EVENT_KIND_OPERATION_SUCCEEDED"
                         for e in follower.events))
    got = follower.sequences()
    assert got == list(range(middle + 1, got[-1] + 1))
    follower.stop = True


def test_tail_and_filters(server: RunningServer) -> None:
    client = ConnectJsonClient(server.url)
    for vm in ("f-1", "f-2"):
        client.call("CreateVm", pb.CreateVmRequest(vm_id=vm, config=small_config()))
        client.call("BootVm", pb.BootVmRequest(vm_id=vm))
    def events(request: dict[str, Any]) -> list[dict[str, Any]]:
        return [m["event"] for m in connect_stream(server.url, "WatchEvents", request) if "event" in m]
    assert {e["vmId"] for e in events({"afterSequence": "0", "vmId": "f-2"})} == {"f-2"}
    running = events({"afterSequence": "0", "states": ["VM_STATE_RUNNING"]})
    assert running and all(e["state"] == "VM_STATE_RUNNING" for e in running)
    changes = events({"afterSequence": "0", "kinds": ["EVENT_KIND_STATE_CHANGED"]})
    assert [(e["vmId"], e["state"]) for e in changes] == [
        ("f-1", "VM_STATE_CREATED"), ("f-1", "VM_STATE_RUNNING"),
        ("f-2", "VM_STATE_CREATED"), ("f-2", "VM_STATE_RUNNING")]
    last_two = events({"tail": 2})
    assert [e["operation"] for e in last_two] == ["state", "boot"]
    assert events({}) == []  # no tail, no resume point: only what comes next
    with pytest.raises(StreamEnded) as info:
        events({"kinds": [99]})
    assert info.value.code == "invalid_argument" and "kinds[0]" in info.value.message


def test_pruned_sequence_is_out_of_range(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, events_retention_count=100)
    with serve_in_thread(settings, FakeBackend()) as srv:
        client = ConnectJsonClient(srv.url)
        for i in range(40):
            client.call("CreateVm", pb.CreateVmRequest(vm_id=f"p-{i}", config=small_config()))
        assert srv.hub is not None
        removed = srv.call(srv.hub.prune())
        floor, head = srv.store.event_bounds()
        assert removed == head - 100 == floor
        with pytest.raises(StreamEnded) as info:
            list(connect_stream(srv.url, "WatchEvents", {"afterSequence": str(floor - 1)}))
        assert info.value.code == "out_of_range" and "ListVms" in info.value.message
        kept = [m for m in connect_stream(srv.url, "WatchEvents", {"afterSequence": str(floor)}) if "event" in m]
        assert len(kept) == 100
        with pytest.raises(StreamEnded) as info:
            list(connect_stream(srv.url, "WatchEvents", {"afterSequence": str(head + 5)}))
        assert info.value.code == "out_of_range"


def test_tenancy(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, dev_caller_header=True, customer_map="alice=c-a,bob=c-b")
    with serve_in_thread(settings, FakeBackend()) as srv:
        for caller in ("alice", "bob"):
            http = httpx.Client(base_url=srv.url, headers={"x-metald-caller": caller})
            config = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
            r = http.post("/metal.vmprovisioner.v1.VmService/CreateVm", json={"vmId": f"t-{caller}", "config": config})
            assert r.status_code == 200, r.text
        mine = [m["event"] for m in connect_stream(srv.url, "WatchEvents", {"afterSequence": "0"}, caller="alice")
                if "event" in m]
        assert mine and {(e["vmId"], e["customerId"]) for e in mine} == {("t-alice", "c-a")}
        # filtering on another customer's VM shows nothing of it
        theirs = [m for m in connect_stream(srv.url, "WatchEvents", {"afterSequence": "0", "vmId": "t-bob"},
                                            caller="alice") if "event" in m]
        assert theirs == []
        everything = [m["event"] for m in connect_stream(srv.url, "WatchEvents", {"afterSequence": "0"})
                      if "event" in m]
        assert {e["vmId"] for e in everything} == {"t-alice", "t-bob"}


def test_grpc_client(server: RunningServer) -> None:
    client = ConnectJsonClient(server.url)
    client.call("CreateVm", pb.CreateVmRequest(vm_id="g-1", config=small_config()))
    messages = list(grpc_watch(server.url, epb.WatchEventsRequest(after_sequence=0)))
    events = [m.event for m in messages if m.HasField("event")]
    assert [e.kind for e in events] == [
        epb.EVENT_KIND_OPERATION_STARTED, epb.EVENT_KIND_STATE_CHANGED, epb.EVENT_KIND_OPERATION_SUCCEEDED]
    assert messages[-1].HasField("heartbeat") and messages[-1].heartbeat.sequence == events[-1].sequence
    with pytest.raises(StreamEnded) as info:
        list(grpc_watch(server.url, epb.WatchEventsRequest(after_sequence=10_000)))
    assert info.value.code == "out_of_range"


def test_idle_stream_gets_heartbeats(server: RunningServer) -> None:
    follower = Follower(server.url, {"follow": True})
    follower.start()
    wait_for(lambda: len(follower.beats) >= 3, timeout=120)  # one when live, then every 0.5 s idle
    assert all(b["live"] for b in follower.beats)
    follower.stop = True
