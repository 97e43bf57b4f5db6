"""Console offsets across the log's size cap, and EventService.StreamConsole over
HTTP with a fake VMM writing the console file."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from metald.core import consolelog
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from tests.support.clients import ConnectJsonClient, small_config
from tests.support.fakes import FakeBackend
from tests.support.server import make_settings, serve_in_thread
from tests.support.streams import StreamEnded, connect_stream


def lines(start: int, count: int) -> bytes:
    return b"".join(b"line %05d\n" % i for i in range(start, start + count))  # 11 bytes each


def test_offsets_survive_cuts(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(lines(0, 1000))
    assert consolelog.read(log, 5500, 11).data == b"line 00500\n"
    assert consolelog.cap(log, 8192)
    with open(log, "ab") as f:  # the VMM keeps appending
        f.write(lines(1000, 1000))
    assert consolelog.cap(log, 8192)  # cut again: the header is replaced, offsets still add up
    s = consolelog.read(log, None, 1 << 20, tail=22)
    assert (s.offset, s.data, s.end) == (21978, b"line 01998\nline 01999\n", 22000)
    assert consolelog.read(log, 11 * 1990, 11).data == b"line 01990\n"
    gone = consolelog.read(log, 5500, 11)  # dropped: starts at the oldest byte kept
    assert gone.offset == gone.start > 5500 and gone.data == b"line %05d\n" % (gone.start // 11)
    log.unlink()
    log.write_bytes(b"new boot\n")  # the file started over
    again = consolelog.read(log, 22000, 100)
    assert (again.offset, again.data) == (0, b"new boot\n")


def chunks(messages: Any) -> list[tuple[int, bytes]]:
    return [(int(m["chunk"].get("offset", 0)), base64.b64decode(m["chunk"]["data"]))
            for m in messages if "chunk" in m]


def test_stream_console(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, stream_heartbeat_seconds=0.5, dev_caller_header=True, customer_map="alice=c-a,bob=c-b"
    )
    with serve_in_thread(settings, FakeBackend()) as srv:
        client = ConnectJsonClient(srv.url)
        client.http.headers["x-metald-caller"] = "alice"
        client.call("CreateVm", pb.CreateVmRequest(vm_id="con-1", config=small_config()))
        log = settings.run_dir / "con-1" / "console.log"
        log.write_bytes(lines(0, 100))

        got = chunks(connect_stream(srv.url, "StreamConsole", {"vmId": "con-1", "tailBytes": 22}, "alice"))
        assert got == [(1078, b"line 00098\nline 00099\n")]
        got = chunks(connect_stream(srv.url, "StreamConsole", {"vmId": "con-1", "offset": "1089"}, "alice"))
        assert got == [(1089, b"line 00099\n")]
        with pytest.raises(StreamEnded) as info:
            list(connect_stream(srv.url, "StreamConsole", {"vmId": "con-1"}, "bob"))
        assert info.value.code == "not_found"

        received: list[tuple[int, bytes]] = []
        ended: list[BaseException] = []

        def follow() -> None:
            try:
                for m in connect_stream(srv.url, "StreamConsole",
                                        {"vmId": "con-1", "offset": "1100", "follow": True}, "alice"):
                    received.extend(chunks([m]))
            except StreamEnded as exc:
                ended.append(exc)

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        with open(log, "ab") as f:  # while (or before) the stream opens: it starts at 1100 either way
            f.write(lines(100, 1000))
        time.sleep(0.5)
        with open(log, "ab") as f:
            f.write(lines(1100, 1000))
        deadline = time.monotonic() + 120
        while sum(len(d) for _, d in received) < 22000 and time.monotonic() < deadline:
            time.sleep(0.05)
        data = b"".join(d for _, d in received)
        assert received[0][0] == 1100 and data == lines(100, 2000)
        client.call("DeleteVm", pb.DeleteVmRequest(vm_id="con-1"))
        t.join(20)
        assert ended and ended[0].code == "not_found"  # type: ignore[attr-defined]
