"""Adoption on identity with QMP attached later: the real QEMU backend and engine,
with stand-in VMMs (small Python processes answering QMP on the VM's socket and
carrying its ``-qmp`` marker). Real QEMU: tests/e2e/test_qemu_backend.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metald.backends import procfs
from metald.backends.qemu import backend as qemu_backend
from metald.backends.qemu.backend import QemuBackend
from metald.backends.qemu.command import argv_hash, qmp_socket_path
from metald.backends.qemu.handle import VmmHandle
from metald.core.engine import VmEngine
from metald.core.errors import BackendError
from metald.core.models import BootSpec, VmState
from metald.core.specs import draft_to_dict
from metald.store.sqlite import Store
from tests.support.engine import small_draft
from tests.support.server import make_settings

STAND_IN = r"""
import json, os, socket, sys, time
args = sys.argv[1:]
path = next(a[5:].split(",")[0] for a in args if a.startswith("unix:"))
paused = "--paused" in args
if "--mute" in args:  # never answers: no socket at all
    time.sleep(3600)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
if os.path.exists(path):
    os.unlink(path)
srv.bind(path)
srv.listen(8)
greeting = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}
decoder = json.JSONDecoder()
while True:
    conn, _ = srv.accept()
    with open(path + ".connections", "a") as f:
        f.write("1\n")
    conn.sendall(json.dumps(greeting).encode() + b"\r\n")
    buf = ""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        buf += data.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            cmd, ret = msg.get("execute"), {}
            if cmd == "query-status":
                ret = {"status": "paused" if paused else "running", "running": not paused, "singlestep": False}
            elif cmd == "stop":
                paused = True
            elif cmd == "cont":
                paused = False
            reply = {"return": ret}
            if "id" in msg:
                reply["id"] = msg["id"]
            conn.sendall(json.dumps(reply).encode() + b"\r\n")
            if cmd == "quit":
                sys.exit(0)
    conn.close()
"""


class StandIns:
    def __init__(self, tmp: Path, run_dir: Path) -> None:
        self.script = tmp / "standin.py"
        self.script.write_text(STAND_IN)
        self.run_dir = run_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, vm_id: str, *flags: str) -> dict[str, Any]:
        """Start a stand-in VMM for ``vm_id``; return the handle metald would have stored."""
        run_dir = self.run_dir / vm_id
        run_dir.mkdir(parents=True, exist_ok=True)
        sock = qmp_socket_path(run_dir)
        argv = [sys.executable, str(self.script), "-name", f"guest={vm_id}", "-qmp", f"unix:{sock},server=on", *flags]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while "--mute" not in flags and not sock.exists():
            assert time.monotonic() < deadline, "stand-in did not start"
            time.sleep(0.01)
        cmdline = procfs.read_cmdline(proc.pid) or []
        while argv_hash(cmdline) != argv_hash(argv):  # until exec is done
            time.sleep(0.01)
            cmdline = procfs.read_cmdline(proc.pid) or []
        stat = procfs.read_stat(proc.pid)
        assert stat is not None
        return VmmHandle(proc.pid, stat.start_time, str(sock), "tcg", argv_hash(cmdline)).to_dict()

    def connections(self, vm_id: str) -> int:
        path = Path(str(qmp_socket_path(self.run_dir / vm_id)) + ".connections")
        return len(path.read_text().splitlines()) if path.exists() else 0

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_settings(tmp_path)


@pytest.fixture
def stand_ins(tmp_path: Path, settings) -> Iterator[StandIns]:  # type: ignore[no-untyped-def]
    fleet = StandIns(tmp_path, settings.run_dir)
    yield fleet
    fleet.close()


def spec_of(settings, vm_id: str) -> BootSpec:  # type: ignore[no-untyped-def]
    run_dir = settings.run_dir / vm_id
    return BootSpec(vm_id, 1, 128 << 20, settings.image_dir / "vmlinuz", None, "", (), None, run_dir,
                    run_dir / "console.log")


def alive(pid: int) -> bool:
    stat = procfs.read_stat(pid)
    return stat is not None and stat.state not in ("Z", "X")


async def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_adopt_many_checks_identity_and_connects_on_first_use(settings, stand_ins: StandIns) -> None:  # type: ignore[no-untyped-def]
    a, b = stand_ins.start("a"), stand_ins.start("b")
    c, d = stand_ins.start("c"), stand_ins.start("d")
    dead = stand_ins.start("e")
    stand_ins.procs[-1].kill()
    stand_ins.procs[-1].wait(10)
    backend = QemuBackend(settings)
    items = [
        (spec_of(settings, "a"), a),
        (spec_of(settings, "b"), b),
        (spec_of(settings, "c"), {**c, "start_time": c["start_time"] + 1}),  # a reused pid
        (spec_of(settings, "d"), {**d, "argv_hash": "0" * 64}),  # another command line
        (spec_of(settings, "e"), dead),
        (spec_of(settings, "f"), {"pid": a["pid"]}),  # not a usable handle
    ]
    assert await backend.adopt_many(items) == {"a", "b"}
    assert "reused" in (backend.adopt_error("c") or "")
    assert "different command line" in (backend.adopt_error("d") or "")
    assert "gone" in (backend.adopt_error("e") or "") or "exited" in (backend.adopt_error("e") or "")
    assert backend.adopt_error("f") == "no usable VMM handle"
    assert not backend.is_running("c") and not backend.is_running("d")
    assert backend.is_running("a") and backend.is_running("b")
    assert stand_ins.connections("a") == stand_ins.connections("b") == 0  # identity only

    # the first operation connects QMP; every later one uses that connection
    await backend.pause("a")
    assert (await backend.info("a"))["status"] == "paused"
    await backend.resume("a")
    assert await backend.vmm_status("a") == "running"
    assert stand_ins.connections("a") == 1
    # concurrent first users share one attempt
    assert await asyncio.gather(backend.attach("b"), backend.attach("b"), backend.vmm_status("b")) == [
        True, True, "running"
    ]
    assert stand_ins.connections("b") == 1
    await backend.close()  # detaches: the VMMs keep running
    assert alive(a["pid"]) and alive(b["pid"])


async def test_vmm_whose_qmp_does_not_answer(settings, stand_ins: StandIns, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(qemu_backend, "QMP_CONNECT_TIMEOUT_S", 0.3)
    mute = stand_ins.start("mute", "--mute")
    backend = QemuBackend(settings)
    spec = spec_of(settings, "mute")
    # one by one (adopt): refused, left for the leftover sweep as before
    assert not await backend.adopt(spec, mute)
    assert "did not answer" in (backend.adopt_error("mute") or "")
    assert not backend.is_running("mute") and alive(mute["pid"])
    # on identity: adopted, but attaching fails and operations say why
    assert await backend.adopt_many([(spec, mute)]) == {"mute"}
    assert not await backend.attach("mute")
    assert "did not answer" in (backend.adopt_error("mute") or "")
    with pytest.raises(BackendError, match="did not answer"):
        await backend.pause("mute")
    assert await backend.discard("mute", kill_strays=False) == []
    assert await gone(mute["pid"])
    await backend.close()


async def test_shutdown_right_after_adoption_connects_first(settings, stand_ins: StandIns) -> None:  # type: ignore[no-untyped-def]
    handle = stand_ins.start("s")
    backend = QemuBackend(settings)
    exits: list[str] = []
    backend.set_exit_callback(lambda vm_id, reason: exits.append(reason))
    assert await backend.adopt_many([(spec_of(settings, "s"), handle)]) == {"s"}
    await backend.shutdown("s", force=True, timeout_s=0)  # QMP quit: the stand-in exits by itself
    assert stand_ins.connections("s") == 1
    assert await gone(handle["pid"]) and not backend.is_running("s") and exits == []
    await backend.close()


async def test_restart_adopts_on_identity_and_settles_after(  # type: ignore[no-untyped-def]
    settings, stand_ins: StandIns, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_backend, "QMP_CONNECT_TIMEOUT_S", 0.3)
    store = Store(settings.db_path)
    handles = {
        "run": stand_ins.start("run"),
        "halt": stand_ins.start("halt", "--paused"),  # paused, but recorded RUNNING
        "mute": stand_ins.start("mute", "--mute"),
        "foreign": stand_ins.start("foreign"),
    }
    handles["foreign"] = {**handles["foreign"], "argv_hash": "0" * 64}
    for vm_id, handle in handles.items():
        store.insert_vm(vm_id, "", int(VmState.RUNNING), b"", draft_to_dict(small_draft(settings.image_dir)), "qemu",
                        1, 128 << 20, {})
        store.update_vm(vm_id, handle=handle, status={"booted_at": time.time()})
    engine = VmEngine(settings, store, QemuBackend(settings), None)
    try:
        report = await engine.start()
        assert report.adopted == ["halt", "mute", "run"] and report.marked_shutdown == ["foreign"]
        assert await gone(handles["foreign"]["pid"])  # not ours: killed by the leftover sweep
        # an operation right after the restart connects to its VMM itself
        assert await engine.pause("run") == VmState.PAUSED
        await engine.wait_settled()
        assert store.get_vm("run").state == VmState.PAUSED
        assert store.get_vm("halt").state == VmState.PAUSED  # the VMM's own state
        row = store.get_vm("mute")  # alive, its identity proven, but silent: kept, not recorded as exited
        assert row.state == VmState.RUNNING and "last_exit" not in row.status and alive(handles["mute"]["pid"])
        assert (await engine.get("mute")).backend_info["status"] == "unresponsive"
        assert await engine.resume("halt") == VmState.RUNNING
        assert await engine.shutdown("halt", force=True, timeout_s=0) == VmState.SHUTDOWN
        assert await gone(handles["halt"]["pid"])
        assert all(stand_ins.connections(v) == 1 for v in ("run", "halt"))
    finally:
        await engine.close()
        store.close()
    assert alive(handles["run"]["pid"])  # a restart of metald leaves VMMs running
    assert os.path.exists(handles["run"]["qmp_socket"])
