"""The event stream of a real `metald serve` process (no guest is booted):
`metald events --follow` across a SIGKILL and restart, SIGTERM with open streams,
and 100 followers (plus one that stops reading) while 100 VMs come and go."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import METALD, DaemonProcess
from tests.support.streams import Follower, StreamEnded, connect_stream

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    image = tmp_path / "image"
    image.mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        (image / name).write_bytes(b"placeholder")
    d = DaemonProcess(
        tmp_path, image, UNKEY_METALD_NETWORK_ENABLED="false", UNKEY_METALD_JAILER_ENABLED="false",
        UNKEY_METALD_STREAM_HEARTBEAT_SECONDS="1",
        # a stream that held up the stop would hold it this long: stop() below waits 30 s at most
        UNKEY_METALD_SHUTDOWN_GRACE_SECONDS="600",
    )
    d.start()
    yield d
    d.kill()


def wait_for(check: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


class CliFollower(threading.Thread):
    """`metald events --follow`, its output lines collected."""

    def __init__(self, d: DaemonProcess, *args: str) -> None:
        super().__init__(daemon=True)
        self.proc = subprocess.Popen(
            [*METALD, "events", "--follow", *args], env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    def sequences(self) -> list[int]:
        return [int(line.split()[0]) for line in list(self.lines)]

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(10)
        return err.decode()


def test_cli_follow_resumes_across_sigkill(daemon: DaemonProcess) -> None:
    cli = CliFollower(daemon, "--since", "0")
    for i in range(3):
        daemon.rpc("CreateVm", {"vmId": f"k-{i}", "config": CONFIG})
    wait_for(lambda: len(cli.lines) == 9)
    daemon.kill()  # SIGKILL
    daemon.start()
    for i in range(3):
        daemon.rpc("DeleteVm", {"vmId": f"k-{i}"})
    head = daemon.rpc("ListVms", {})  # the API answers; the follower caught up below
    assert head.get("totalCount", 0) == 0
    wait_for(lambda: len(cli.lines) >= 18)
    time.sleep(1.5)  # nothing more may come (duplicates would)
    err = cli.stop()
    seqs = cli.sequences()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), cli.lines  # no gap, no duplicate
    assert len(seqs) == 18, cli.lines
    assert "reconnecting" in err
    assert [line.split()[2] for line in cli.lines[:3]] == ["k-0"] * 3  # each line names the VM
    assert cli.lines[1].split()[3:6] == ["state_changed", "create", "CREATED"]
    assert "vm_removed" in cli.lines[-2]


def test_sigterm_ends_open_streams(daemon: DaemonProcess) -> None:
    daemon.rpc("CreateVm", {"vmId": "term-1", "config": CONFIG})
    console = daemon.run_dir / "term-1" / "console.log"
    console.write_bytes(b"hello\n")
    follower = Follower(daemon.url, {"follow": True})
    follower.start()
    ended: list[BaseException] = []

    def follow_console() -> None:
        try:
            for _ in connect_stream(daemon.url, "StreamConsole", {"vmId": "term-1", "follow": True}):
                pass
        except BaseException as exc:  # noqa: BLE001
            ended.append(exc)

    t = threading.Thread(target=follow_console, daemon=True)
    t.start()
    assert follower.live.wait(20)
    time.sleep(0.5)
    assert daemon.stop(signal.SIGTERM) == 0  # the open streams ended: the server did not wait its grace
    follower.join(10)
    t.join(10)
    assert isinstance(follower.error, StreamEnded) and follower.error.code == "unavailable"
    assert ended and isinstance(ended[0], StreamEnded) and ended[0].code == "unavailable"
    assert "offset=6" in ended[0].message


def test_100_followers_while_100_vms_come_and_go(daemon: DaemonProcess) -> None:
    import httpx

    followers = [Follower(daemon.url, {"follow": True}) for _ in range(100)]
    for f in followers:
        f.start()
    for f in followers:
        assert f.live.wait(60)
    # one more that stops reading (a tiny receive buffer: it pushes back at once)
    import json
    import socket
    import struct

    transport = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    stuck_http = httpx.Client(transport=transport, timeout=60)
    body = json.dumps({"follow": True}).encode()
    with stuck_http.stream(
        "POST", daemon.url + "/metal.vmprovisioner.v1.EventService/WatchEvents",
        content=struct.pack(">BI", 0, len(body)) + body, headers={"content-type": "application/connect+json"},
    ) as stuck:
        assert stuck.status_code == 200

        def churn(n: int) -> None:
            for i in range(n, 100, 4):
                daemon.rpc("CreateVm", {"vmId": f"m-{i}", "config": CONFIG})
                daemon.rpc("DeleteVm", {"vmId": f"m-{i}"})

        workers = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(600)
        expected = [e["event"]["sequence"] for e in connect_stream(daemon.url, "WatchEvents", {"afterSequence": "0"})
                    if "event" in e]
        assert len(expected) == 600  # 100 x (started, created, ok) + 100 x (started, removed, ok)
        wait_for(lambda: all(len(f.events) >= 600 for f in followers), timeout=300)
        for f in followers:
            assert f.error is None
            assert [e["sequence"] for e in f.events] == expected  # every event, once, in order
        per_vm = [(e["vmId"], e["kind"]) for e in followers[0].events if e["vmId"] == "m-7"]
        assert [k for _, k in per_vm] == [
            "EVENT_KIND_OPERATION_STARTED", "EVENT_KIND_STATE_CHANGED", "EVENT_KIND_OPERATION_SUCCEEDED",
            "EVENT_KIND_OPERATION_STARTED", "EVENT_KIND_VM_REMOVED", "EVENT_KIND_OPERATION_SUCCEEDED"]
    for f in followers:
        f.stop = True
