"""Handle persistence and the checks before adopting a running QEMU."""

from __future__ import annotations

from pathlib import Path

from metald.backends.qemu.command import argv_hash
from metald.backends.qemu.handle import VmmHandle, mismatch

SOCK = "/run/metald/vm1/qmp.sock"
ARGV = ["qemu-system-x86_64", "-M", "microvm", "-qmp", f"unix:{SOCK},server=on,wait=off"]


def fake_proc(root: Path, pid: int, start: int, argv: list[str], state: str = "S") -> Path:
    d = root / str(pid)
    d.mkdir(parents=True)
    fields = [state] + ["0"] * 10 + ["5", "7"] + ["0"] * 6 + [str(start)] + ["0"] * 20
    (d / "stat").write_text(f"{pid} (qemu-system-x86) " + " ".join(fields) + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return root


def make_handle(pid: int = 4242, start: int = 1000, argv: list[str] = ARGV) -> VmmHandle:
    return VmmHandle(pid=pid, start_time=start, qmp_socket=SOCK, accel="tcg", argv_hash=argv_hash(argv))


def test_roundtrip() -> None:
    h = make_handle()
    d = h.to_dict()
    assert d["pid"] == 4242 and d["start_time"] == 1000 and d["qmp_socket"] == SOCK
    assert d["accel"] == "tcg" and d["backend"] == "qemu"
    assert VmmHandle.from_dict(d) == h


def test_from_dict_rejects_garbage() -> None:
    assert VmmHandle.from_dict({}) is None
    assert VmmHandle.from_dict({"pid": "x", "start_time": 1}) is None
    assert VmmHandle.from_dict({**make_handle().to_dict(), "backend": "firecracker"}) is None
    assert VmmHandle.from_dict({**make_handle().to_dict(), "version": 99}) is None


def test_matches_same_process(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, 1000, ARGV)
    assert mismatch(make_handle(), proc) is None


def test_gone_process(tmp_path: Path) -> None:
    assert "gone" in (mismatch(make_handle(), tmp_path) or "")


def test_reused_pid_has_other_start_time(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, 2000, ARGV)
    assert "reused" in (mismatch(make_handle(), proc) or "")


def test_pid_alone_is_not_enough(tmp_path: Path) -> None:
    # Same pid and start time but another program: refused.
    proc = fake_proc(tmp_path, 4242, 1000, ["/usr/bin/sleep", "100"])
    assert "QMP socket" in (mismatch(make_handle(), proc) or "")


def test_other_command_line_with_same_socket(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, 1000, [*ARGV, "-S"])
    assert "different command line" in (mismatch(make_handle(), proc) or "")


def test_zombie_is_not_adopted(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, 1000, ARGV, state="Z")
    assert "exited" in (mismatch(make_handle(), proc) or "")


def test_invalid_pid() -> None:
    assert mismatch(make_handle(pid=1)) is not None
