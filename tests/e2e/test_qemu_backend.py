"""The QEMU backend against real guests (TCG here): no daemon, no network.

Boots are expensive under TCG (~5 s each), so one test walks one VM through
many operations. Needs root, qemu-system-x86_64 and the bundled guest image
(UNKEY_METALD_IMAGE_DIR or <repo>/build/image; build it with `make image`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from metald.backends.qemu import QemuBackend
from metald.config import Settings
from metald.core.models import BootSpec, Drive, NetworkAllocation

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = Path(os.environ.get("UNKEY_METALD_IMAGE_DIR", REPO / "build" / "image"))
BOOT_TIMEOUT_S = 90.0


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed"
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        if not (IMAGE_DIR / name).is_file():
            return f"guest image missing: {IMAGE_DIR / name} (run `make image`)"
    return None


@pytest.fixture
def image() -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return IMAGE_DIR


@pytest.fixture(autouse=True)
def reap_vmms(tmp_path: Path) -> Iterator[None]:
    """VMMs outlive their backend by design: kill any a failed test left behind."""
    yield
    marker = str(tmp_path).encode() + b"/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"qemu-system") and marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
            gone(int(entry.name))


def make_spec(image: Path, run_root: Path, vm_id: str) -> BootSpec:
    cmdline_file = image / "cmdline"
    base = cmdline_file.read_text().strip() if cmdline_file.is_file() else "console=ttyS0"
    drives: tuple[Drive, ...] = ()
    if (image / "rootfs.ext4").is_file():
        drives = (Drive("rootfs", image / "rootfs.ext4", read_only=True, is_root=True),)
    run_dir = run_root / vm_id
    return BootSpec(
        vm_id=vm_id,
        vcpu_count=1,
        memory_bytes=192 << 20,
        kernel_path=image / "vmlinuz",
        initrd_path=image / "initramfs.cpio.gz",
        kernel_args=f"{base} metald.vm_id={vm_id}",
        drives=drives,
        network=None,
        run_dir=run_dir,
        console_log=run_dir / "console.log",
    )


def count(path: Path, marker: str) -> int:
    try:
        return path.read_bytes().count(marker.encode())
    except FileNotFoundError:
        return 0


async def until(pred: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            tail = log.read_bytes()[-1500:].decode(errors="replace") if log else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{tail}")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


def gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # a VMM the test process still parents
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


async def test_qemu_vm_lifecycle(image: Path, tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    settings = Settings(run_dir=run_root, data_dir=tmp_path / "data", image_dir=image)
    backend = QemuBackend(settings)
    exits: list[tuple[str, str, float]] = []
    backend.set_exit_callback(lambda vm_id, reason: exits.append((vm_id, reason, time.monotonic())))
    ok, detail = await backend.ping()
    assert ok, detail

    spec = make_spec(image, run_root, "qemu-e2e-1")
    await backend.validate(spec)
    log = spec.console_log

    # --- boot (the accel probe runs first in auto mode) ----------------------
    t0 = time.monotonic()
    handle = await backend.boot(spec)
    started = time.monotonic() - t0
    ready = await until(lambda: count(log, "METALD_GUEST_READY vm_id=qemu-e2e-1") == 1, BOOT_TIMEOUT_S, "READY", log)
    print(f"\nqemu start {started:.1f}s (incl. accel choice), READY after {ready:.1f}s more")
    assert handle["accel"] in ("kvm", "tcg")
    assert backend.is_running(spec.vm_id)
    info = await backend.info(spec.vm_id)
    assert info["backend"] == "qemu" and info["status"] == "running"
    assert info["pid"] == str(handle["pid"]) and info["accel"] == handle["accel"]
    print(f"info: {info}")

    # --- pause: ticks stop; resume: they go on -----------------------------------
    await backend.pause(spec.vm_id)
    assert (await backend.info(spec.vm_id))["status"] == "paused"
    await asyncio.sleep(0.3)
    paused_at = count(log, "METALD_TICK")
    await asyncio.sleep(2.0)
    assert count(log, "METALD_TICK") == paused_at
    await backend.resume(spec.vm_id)
    await until(lambda: count(log, "METALD_TICK") > paused_at + 1, 10, "ticks after resume", log)

    # --- metrics -------------------------------------------------------------
    m = await backend.metrics(spec.vm_id)
    assert m.measured, m.notes
    assert m.cpu_usage_percent > 0 and m.memory_usage_bytes > 0 and m.uptime_seconds > 0
    if spec.drives:
        assert m.block_read_ops > 0 and m.block_read_bytes > 0
    assert "network" in m.notes
    await asyncio.sleep(1.0)
    m2 = await backend.metrics(spec.vm_id)
    assert m2.measured and m2.cpu_usage_percent > 0
    print(
        f"metrics: cpu {m.cpu_usage_percent}% then {m2.cpu_usage_percent}%, "
        f"rss {m.memory_usage_bytes >> 20} MiB, read {m.block_read_bytes} B"
    )

    # --- forced reboot: same process, a second READY -------------------------------
    again = await backend.reboot(spec, force=True)
    assert again["pid"] == handle["pid"]
    reboot_s = await until(lambda: count(log, "METALD_GUEST_READY") == 2, BOOT_TIMEOUT_S, "READY after reset", log)
    print(f"reset to READY {reboot_s:.1f}s")

    # --- console log cap: cut to half the cap, QEMU keeps appending ---------------
    with open(log, "ab") as f:
        f.write(b"filler line\n" * (settings.console_log_max_bytes // 12 + 100))
    await until(lambda: log.stat().st_size <= settings.console_log_max_bytes, 5, "log cap")
    ticks = count(log, "METALD_TICK")
    await until(lambda: count(log, "METALD_TICK") > ticks, 5, "ticks after the cut", log)

    # --- a VMM killed from outside: callback with the signal -----------------------
    os.kill(handle["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    await until(lambda: bool(exits), 5, "exit callback")
    vm_id, reason, seen_at = exits[0]
    assert vm_id == spec.vm_id and "SIGKILL" in reason, reason
    assert seen_at - killed_at < 2.0
    assert not backend.is_running(spec.vm_id)
    assert (await backend.info(spec.vm_id))["last_exit_reason"] == reason
    assert gone(handle["pid"])

    # --- graceful shutdown, asked for during boot: the button is pressed until the
    # guest's acpid hears it -> guest poweroff, no exit callback --------------------
    handle = await backend.boot(spec)
    t0 = time.monotonic()
    reason = await backend.shutdown(spec.vm_id, force=False, timeout_s=BOOT_TIMEOUT_S)
    print(f"graceful shutdown requested at boot: {time.monotonic() - t0:.1f}s: {reason}")
    assert reason == "guest poweroff"
    assert count(log, "METALD_GUEST_POWEROFF") == 1
    assert not backend.is_running(spec.vm_id)
    assert gone(handle["pid"])
    assert (await backend.info(spec.vm_id))["last_exit_reason"] == "guest poweroff"
    assert len(exits) == 1  # metald asked for this one: no callback

    # --- cleanup: no process, no files ----------------------------------------
    await backend.cleanup(spec.vm_id)
    assert gone(handle["pid"])
    assert not spec.run_dir.exists() or list(spec.run_dir.iterdir()) == []
    await backend.close()


async def test_qemu_adopt_after_restart(image: Path, tmp_path: Path) -> None:
    """A new backend (metald restart) re-attaches only to the exact same process."""
    run_root = tmp_path / "run"
    settings = Settings(run_dir=run_root, data_dir=tmp_path / "data", image_dir=image, qemu_accel="tcg")
    first = QemuBackend(settings)
    spec = make_spec(image, run_root, "qemu-e2e-2")
    handle = await first.boot(spec)
    await first.close()  # detach: the VM keeps running
    assert not gone(handle["pid"])

    second = QemuBackend(settings)
    exits: list[str] = []
    second.set_exit_callback(lambda vm_id, reason: exits.append(reason))
    assert not await second.adopt(spec, {**handle, "start_time": handle["start_time"] + 1})
    assert not await second.adopt(spec, {**handle, "qmp_socket": "/elsewhere/qmp.sock"})
    assert await second.adopt(spec, handle)
    assert second.is_running(spec.vm_id)
    await second.pause(spec.vm_id)
    assert (await second.info(spec.vm_id))["status"] == "paused"
    await second.resume(spec.vm_id)
    m = await second.metrics(spec.vm_id)
    assert m.measured and m.memory_usage_bytes > 0

    await second.cleanup(spec.vm_id)
    assert gone(handle["pid"])
    assert exits == []
    assert not spec.run_dir.exists() or list(spec.run_dir.iterdir()) == []
    await second.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


async def test_qemu_vm_in_network_namespace(image: Path, tmp_path: Path) -> None:
    """The VMM runs in the VM's namespace on its TAP; TAP counters become metrics."""
    if os.environ.get("METALD_ISOLATED") != "1":
        pytest.skip("needs tests/isolated.sh (private network and mount namespace)")
    ns, tap = "fc-qemu-e2e-3", "tap_qemue2e3"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "tuntap", "add", tap, "mode", "tap")
        _ip("-n", ns, "addr", "add", "10.231.0.1/24", "dev", tap)
        _ip("-n", ns, "link", "set", tap, "up")
        net = NetworkAllocation(
            short_id="qemue2e3",
            namespace=ns,
            host_veth="vh_qemue2e3",
            ns_veth="vn_qemue2e3",
            tap=tap,
            ip="10.231.0.2",
            prefix_len=24,
            gateway="10.231.0.1",
            mac="02:00:0a:e7:00:02",
        )
        run_root = tmp_path / "run"
        spec = make_spec(image, run_root, "qemu-e2e-3")
        data = tmp_path / "data.img"
        data.write_bytes(b"\0" * (1 << 20))
        # The data drive comes first in the spec; the root drive must still be /dev/vda.
        spec = replace(
            spec,
            drives=(Drive("data", data, read_only=False, is_root=False), *spec.drives),
            network=net,
            kernel_args=spec.kernel_args + " ip=10.231.0.2::10.231.0.1:255.255.255.0::eth0:off",
        )
        backend = QemuBackend(Settings(run_dir=run_root, data_dir=tmp_path / "d", qemu_accel="tcg"))
        handle = await backend.boot(spec)
        try:
            await until(
                lambda: count(spec.console_log, "METALD_GUEST_READY") >= 1, BOOT_TIMEOUT_S, "READY", spec.console_log
            )
            fetch = (
                "import urllib.request as u; "
                "print(u.urlopen('http://10.231.0.2:8080/info', timeout=10).read().decode())"
            )
            got = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", fetch], capture_output=True, text=True
            )
            assert got.returncode == 0, got.stderr
            assert "vm_id=qemu-e2e-3" in got.stdout
            assert "rootfs=" in got.stdout, got.stdout  # the guest mounted /dev/vda = rootfs.ext4
            m = await backend.metrics(spec.vm_id)
            assert m.measured and "network" not in m.notes, m.notes
            assert m.net_rx_packets > 0 and m.net_tx_packets > 0
            assert m.net_rx_bytes > 0 and m.net_tx_bytes > 0
            own_ns = os.readlink(f"/proc/{handle['pid']}/ns/net")
            assert own_ns != os.readlink("/proc/self/ns/net")
        finally:
            await backend.cleanup(spec.vm_id)
            await backend.close()
    finally:
        _ip("netns", "del", ns)
