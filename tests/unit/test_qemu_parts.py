"""Smaller QEMU backend parts: procfs parsing, console cap, exit reasons, validation."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from metald.backends import procfs
from metald.backends.process import ProcessWatch, describe_status
from metald.backends.qemu import console
from metald.backends.qemu.accel import AccelChooser, probe_kernel_args
from metald.backends.qemu.backend import exit_reason
from metald.backends.qemu.metrics import apply_blockstats
from metald.backends.qemu.validate import validate_spec
from metald.core import consolelog
from metald.core.errors import InvalidArgument
from metald.core.models import BootSpec, Drive, VmMetrics


def test_parse_stat_with_odd_comm() -> None:
    fields = ["R"] + ["0"] * 10 + ["15", "25"] + ["0"] * 6 + ["123456"] + ["0"] * 20
    stat = procfs.parse_stat("77 (qemu (x) y) " + " ".join(fields))
    assert stat.state == "R"
    assert stat.cpu_ticks == 40
    assert stat.start_time == 123456


def test_parse_stat_of_this_process() -> None:
    import os

    stat = procfs.read_stat(os.getpid())
    assert stat is not None and stat.start_time > 0


NET_DEV = (
    "Inter-|   Receive |  Transmit\n"
    " face |bytes packets errs drop fifo frame compressed multicast|bytes packets ...\n"
    "    lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0\n"
    "tap_abcd1234: 5000 40 0 0 0 0 0 0 7000 60 0 0 0 0 0 0\n"
)


def test_parse_net_dev() -> None:
    c = procfs.parse_net_dev(NET_DEV, "tap_abcd1234")
    assert c == procfs.IfaceCounters(rx_bytes=5000, rx_packets=40, tx_bytes=7000, tx_packets=60)
    assert procfs.parse_net_dev(NET_DEV, "tap_other") is None


def test_cap_log_keeps_newest_half(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    lines = [f"line {i:05d}\n".encode() for i in range(2000)]
    log.write_bytes(b"".join(lines))
    assert console.cap_log(log, 8192)
    data = log.read_bytes()
    assert len(data) <= 4096
    assert data.endswith(b"line 01999\n")
    header_len, base = consolelog.parse_header(data)
    body = data[header_len:]
    assert body.startswith(b"line ")  # whole lines only
    # the header names the offset of the first byte kept: 11 bytes per line
    assert base % 11 == 0 and body.startswith(b"line %05d" % (base // 11))
    assert base + len(body) == 2000 * 11
    assert not console.cap_log(log, 8192)


def test_cap_log_missing_file(tmp_path: Path) -> None:
    assert not console.cap_log(tmp_path / "nope", 4096)


def test_cap_log_with_append_writer(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    with open(log, "ab") as writer:
        writer.write(b"x" * 10000 + b"\n")
        writer.flush()
        console.cap_log(log, 4096)
        writer.write(b"after\n")
        writer.flush()
    data = log.read_bytes()
    assert data.endswith(b"after\n")
    assert len(data) < 4096


def test_exit_reasons() -> None:
    assert exit_reason(None, "guest-shutdown", 0) == "guest poweroff"
    assert exit_reason(None, None, -signal.SIGKILL) == "killed by signal SIGKILL"
    assert exit_reason(None, "host-qmp-quit", 0) == "quit via QMP"
    assert exit_reason(None, None, 1) == "exit code 1"
    assert "exit status unknown" in exit_reason(None, None, None)
    assert exit_reason(None, "guest-shutdown", None) == "guest poweroff"
    assert exit_reason("KVM broke", "guest-shutdown", -9) == "KVM broke (killed by signal SIGKILL)"
    assert describe_status(-signal.SIGTERM) == "killed by signal SIGTERM"


def test_probe_kernel_args() -> None:
    args = probe_kernel_args("console=ttyS0 metald.vm_id=vm7 ip=10.0.0.2::10.0.0.1:255.0.0.0 quiet")
    assert args == "console=ttyS0 metald.vm_id=accel-probe"  # not quiet: a live guest prints at once


def test_blockstats_sum() -> None:
    m = VmMetrics()
    apply_blockstats(
        m,
        [
            {"device": "", "stats": {"rd_bytes": 10, "wr_bytes": 20, "rd_operations": 1, "wr_operations": 2}},
            {"device": "", "stats": {"rd_bytes": 5, "wr_bytes": 0, "rd_operations": 1, "wr_operations": 0}},
        ],
    )
    assert (m.block_read_bytes, m.block_write_bytes) == (15, 20)
    assert (m.block_read_ops, m.block_write_ops) == (2, 2)


def _spec(tmp: Path, **kw: object) -> BootSpec:
    kernel = tmp / "vmlinuz"
    kernel.write_bytes(b"k")
    initrd = tmp / "initrd"
    initrd.write_bytes(b"i")
    disk = tmp / "disk.img"
    disk.write_bytes(b"d")
    values: dict[str, object] = dict(
        vm_id="vm1",
        vcpu_count=1,
        memory_bytes=128 << 20,
        kernel_path=kernel,
        initrd_path=initrd,
        kernel_args="console=ttyS0",
        drives=(Drive("root", disk, read_only=False, is_root=True),),
        network=None,
        run_dir=tmp / "run",
        console_log=tmp / "run" / "console.log",
    )
    values.update(kw)
    return BootSpec(**values)  # type: ignore[arg-type]


def _field(spec: BootSpec) -> str:
    with pytest.raises(InvalidArgument) as err:
        validate_spec(spec, vcpu_limit=4)
    return err.value.field


def test_validate_ok(tmp_path: Path) -> None:
    validate_spec(_spec(tmp_path), vcpu_limit=4)


def test_validate_fields(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    assert _field(_spec(tmp_path, kernel_path=tmp_path / "missing")) == "config.boot.kernel_path"
    assert _field(_spec(tmp_path, kernel_path=tmp_path)) == "config.boot.kernel_path"
    assert _field(_spec(tmp_path, initrd_path=Path("/dev/null"))) == "config.boot.initrd_path"
    bad = (spec.drives[0], Drive("d2", tmp_path / "nope", read_only=True, is_root=False))
    assert _field(_spec(tmp_path, drives=bad)) == "config.storage[1].path"
    assert _field(_spec(tmp_path, vcpu_count=0)) == "config.cpu.vcpu_count"
    assert _field(_spec(tmp_path, vcpu_count=5)) == "config.cpu.vcpu_count"


async def test_process_watch_reports_signal() -> None:
    popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    seen: list[int | None] = []
    watch = ProcessWatch(popen.pid, popen, seen.append)
    watch.start()
    assert watch.alive
    watch.kill()
    assert await watch.wait(5)
    assert seen == [-signal.SIGKILL]
    assert popen.returncode == -signal.SIGKILL  # reaped, no zombie


async def test_process_watch_exit_code() -> None:
    popen = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    seen: list[int | None] = []
    watch = ProcessWatch(popen.pid, popen, seen.append)
    watch.start()
    assert await watch.wait(5)
    assert seen == [3]


async def test_accel_auto_probes_once_and_caches(tmp_path: Path) -> None:
    calls: list[str] = []

    async def prober(spec: BootSpec) -> tuple[bool, str]:
        calls.append(spec.vm_id)
        return False, "KVM failed: KVM internal error"

    async def version() -> str:
        return "7.2.0"

    spec = _spec(tmp_path)
    cache = tmp_path / "accel.json"
    chooser = AccelChooser("auto", cache, version, prober)
    results = await asyncio.gather(chooser.choose(spec), chooser.choose(spec))
    assert results == ["tcg", "tcg"]
    await chooser.wait_probes()
    assert calls == ["vm1"]
    assert cache.exists()
    # A new chooser (metald restart) reuses the file.
    again = AccelChooser("auto", cache, version, prober)
    assert await again.choose(spec) == "tcg"
    await again.wait_probes()
    assert calls == ["vm1"]
    # A different kernel is probed again.
    (tmp_path / "vmlinuz").write_bytes(b"other kernel")
    assert await again.choose(spec) == "tcg"
    await again.wait_probes()
    assert len(calls) == 2


async def test_accel_probe_never_holds_up_a_boot(tmp_path: Path) -> None:
    """While the KVM probe runs (here: until the test lets it answer) boots get TCG at once;
    the verdict is cached and used afterwards, also by a restarted metald."""
    answer = asyncio.Event()
    calls: list[str] = []

    async def prober(spec: BootSpec) -> tuple[bool, str]:
        calls.append(spec.vm_id)
        await answer.wait()
        return True, "KVM boot reached READY in 0.4s"

    async def version() -> str:
        return "7.2.0"

    spec = _spec(tmp_path)
    cache = tmp_path / "accel.json"
    chooser = AccelChooser("auto", cache, version, prober)
    await chooser.warm_up(spec)  # at start, in the background
    assert await asyncio.wait_for(chooser.choose(spec), 30) == "tcg"
    assert "TCG until it answers" in chooser.last_detail
    assert calls == ["vm1"]  # one probe, started by warm_up; choose did not start another
    answer.set()
    await chooser.wait_probes()
    assert await chooser.choose(spec) == "kvm"
    assert await AccelChooser("auto", cache, version, prober).choose(spec) == "kvm"
    assert calls == ["vm1"]


async def test_kvm_that_hangs_is_recognised_by_its_silence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KVM that hangs instead of failing: the probe VMM runs but its guest never prints."""
    from metald.backends.qemu import accel

    fake = tmp_path / "qemu-hangs"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    monkeypatch.setattr(accel.os, "access", lambda path, mode: True)  # as if /dev/kvm were usable
    ok, detail = await accel.probe_kvm(_spec(tmp_path), str(fake), tmp_path / "probe", timeout=600, silence_s=0.5)
    assert not ok and "printed nothing" in detail and "KVM hangs" in detail


async def test_accel_explicit_modes_never_probe(tmp_path: Path) -> None:
    async def prober(spec: BootSpec) -> tuple[bool, str]:
        raise AssertionError("no probe expected")

    async def version() -> str:
        return "7.2.0"

    spec = _spec(tmp_path)
    assert await AccelChooser("tcg", tmp_path / "a", version, prober).choose(spec) == "tcg"
    assert await AccelChooser("kvm", tmp_path / "a", version, prober).choose(spec) == "kvm"
