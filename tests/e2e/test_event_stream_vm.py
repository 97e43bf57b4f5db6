"""The event and console streams of a real guest: every event of a lifecycle in
order, including a VMM killed from outside and an adoption after metald is
SIGKILLed, resumed without gap or duplicate; the console followed across a
reboot, a VMM restart and a metald restart by its byte offset."""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.streams import Follower, connect_stream

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(256 << 20)}}
READY = b"METALD_GUEST_READY"


@pytest.fixture
def daemon(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, require_image, UNKEY_METALD_JAILER_UID="61000", UNKEY_METALD_JAILER_GID="61000")
    d.start()
    yield d
    d.kill_with_vmms()


def wait_for(check: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


class ConsoleFollower(threading.Thread):
    def __init__(self, url: str, request: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.request = url, request
        self.chunks: list[tuple[int, bytes]] = []
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            for m in connect_stream(self.url, "StreamConsole", self.request, timeout=600):
                if "chunk" in m:
                    self.chunks.append((int(m["chunk"].get("offset", 0)), base64.b64decode(m["chunk"]["data"])))
        except BaseException as exc:  # noqa: BLE001 - looked at by the test
            self.error = exc

    def data(self) -> bytes:
        return b"".join(d for _, d in list(self.chunks))

    def end(self) -> int:
        off, data = self.chunks[-1]
        return off + len(data)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        kind = e["kind"].removeprefix("EVENT_KIND_")
        if kind == "STATE_CHANGED":
            kind += ":" + e["state"].removeprefix("VM_STATE_")
        elif kind.startswith("OPERATION_"):
            kind += ":" + e["operation"]
        out.append(kind)
    return out


def test_events_and_console_of_a_real_guest(daemon: DaemonProcess) -> None:
    vm = "ev-vm-1"
    events = Follower(daemon.url, {"follow": True, "vmId": vm})
    events.start()
    assert events.live.wait(20)
    daemon.rpc("CreateVm", {"vmId": vm, "config": CONFIG})
    console = ConsoleFollower(daemon.url, {"vmId": vm, "follow": True})
    daemon.rpc("BootVm", {"vmId": vm})
    wait_for(lambda: console.data().count(READY) >= 1)
    daemon.rpc("RebootVm", {"vmId": vm})
    wait_for(lambda: console.data().count(READY) >= 2)  # the same stream, across the guest's reboot

    pid = int(daemon.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]["pid"])
    os.kill(pid, signal.SIGKILL)  # the VMM dies from outside
    wait_for(lambda: any(e["kind"] == "EVENT_KIND_VMM_EXITED" for e in events.events), timeout=60)
    exited = next(e for e in events.events if e["kind"] == "EVENT_KIND_VMM_EXITED")
    assert "SIGKILL" in exited["message"] and exited["state"] == "VM_STATE_SHUTDOWN"
    daemon.rpc("BootVm", {"vmId": vm})  # a new VMM appends to the same console log
    wait_for(lambda: console.data().count(READY) >= 3)

    daemon.kill()  # SIGKILL metald: the streams break, the VM keeps running
    events.join(30)
    console.join(30)
    assert events.error is not None and console.error is not None
    seen = events.sequences()
    reached = console.end()
    daemon.start()
    resumed = Follower(daemon.url, {"follow": True, "vmId": vm, "afterSequence": str(seen[-1])})
    resumed.start()
    console2 = ConsoleFollower(daemon.url, {"vmId": vm, "follow": True, "offset": str(reached)})
    wait_for(lambda: any(e["kind"] == "EVENT_KIND_VMM_ADOPTED" for e in resumed.events), timeout=60)
    wait_for(lambda: len(console2.chunks) > 0, timeout=60)  # the guest ticks on its console
    streamed = console.data() + console2.data()
    on_disk = (daemon.run_dir / vm / "console.log").read_bytes()
    assert on_disk.startswith(streamed)  # the two streams together: the file, byte for byte
    daemon.rpc("DeleteVm", {"vmId": vm, "force": True})
    wait_for(lambda: any(e["kind"] == "EVENT_KIND_VM_REMOVED" for e in resumed.events), timeout=60)
    wait_for(lambda: resumed.events[-1]["kind"] == "EVENT_KIND_OPERATION_SUCCEEDED", timeout=30)

    everything = events.events + resumed.events
    seqs = [int(e["sequence"]) for e in everything]
    assert seqs == sorted(set(seqs)), seqs  # in order, no duplicate
    # no gap: the unfiltered log holds nothing else for this VM in between
    stored = [int(m["event"]["sequence"]) for m in
              connect_stream(daemon.url, "WatchEvents", {"afterSequence": "0", "vmId": vm}) if "event" in m]
    assert seqs == stored
    assert kinds(everything) == [
        "OPERATION_STARTED:create", "STATE_CHANGED:CREATED", "OPERATION_SUCCEEDED:create",
        "OPERATION_STARTED:boot", "STATE_CHANGED:RUNNING", "OPERATION_SUCCEEDED:boot",
        "OPERATION_STARTED:reboot", "OPERATION_SUCCEEDED:reboot",
        "STATE_CHANGED:SHUTDOWN", "VMM_EXITED",
        "OPERATION_STARTED:boot", "STATE_CHANGED:RUNNING", "OPERATION_SUCCEEDED:boot",
        "VMM_ADOPTED",
        "OPERATION_STARTED:delete", "STATE_CHANGED:SHUTDOWN", "VM_REMOVED", "OPERATION_SUCCEEDED:delete",
    ], kinds(everything)

    # the console: offsets continue from one stream to the next, and the bytes are the file's
    assert console2.chunks[0][0] == reached
    assert console.chunks[0][0] == 0 and console.data().count(READY) == 3
