"""FirecrackerBackend driven against the strict Firecracker test double.

No root needed: VMs without network run directly; the network case replaces
the nsenter prefix with nothing (the double does not open the TAP).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from metald.backends import procfs
from metald.backends.firecracker.backend import FirecrackerBackend, kvm_unusable
from metald.backends.firecracker.client import FirecrackerApiError, FirecrackerClient
from metald.backends.firecracker.handle import is_vmm_of
from metald.backends.firecracker.launch import DirectLauncher, JailerLauncher
from metald.backends.firecracker.logcap import allocated_bytes
from metald.backends.firecracker.validation import boot_args, kernel_cmdline
from metald.backends.qemu.console import TRUNCATED_MARK
from metald.config import Settings
from metald.core.errors import BackendError, InvalidArgument
from metald.core.models import BootSpec, Drive, NetworkAllocation, RateLimit
from metald.jailer.jailer import Jailer
from tests.firecracker_double import harness

MIB = 1 << 20
CONFIG_SEQUENCE = [
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/rootfs"),
    ("PUT", "/drives/data"),
    ("PUT", "/actions"),
]


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.record = tmp / "requests.jsonl"
        self.run_root = tmp / "run"
        self.assets = tmp / "assets"
        self.assets.mkdir()
        for name in ("vmlinux", "initrd", "rootfs.ext4", "data.img"):
            (self.assets / name).write_bytes(b"\0" * 4096)
        self.kvm = tmp / "kvm"
        self.kvm.write_bytes(b"")
        self.exits: list[tuple[str, str]] = []
        self.exit_event = asyncio.Event()
        self.backends: list[FirecrackerBackend] = []
        self.cleanups: list[Callable[[], object]] = []

    def backend(self, log_cap: int = 1 << 20, **knobs: str) -> FirecrackerBackend:
        shim_dir = self.tmp / f"shim{len(self.backends)}"
        shim_dir.mkdir()
        shim = harness.make_shim(shim_dir, self.record, **knobs)
        data_dir = self.tmp / "data"
        settings = Settings(
            run_dir=self.run_root, data_dir=data_dir, firecracker_binary=str(shim), console_log_max_bytes=log_cap
        )
        launcher = DirectLauncher(str(shim), netns_prefix=lambda ns: [])
        backend = FirecrackerBackend(settings, launcher=launcher, kvm_path=self.kvm, reboot_grace_s=5.0)
        backend.set_exit_callback(self._on_exit)
        self.backends.append(backend)
        return backend

    def _on_exit(self, vm_id: str, reason: str) -> None:
        self.exits.append((vm_id, reason))
        self.exit_event.set()

    def spec(self, vm_id: str = "vm-fc-1", network: NetworkAllocation | None = None) -> BootSpec:
        run_dir = self.run_root / vm_id
        return BootSpec(
            vm_id=vm_id,
            vcpu_count=2,
            memory_bytes=256 * MIB,
            kernel_path=self.assets / "vmlinux",
            initrd_path=self.assets / "initrd",
            kernel_args="quiet metald.vm_id=" + vm_id,
            drives=(
                Drive("rootfs", self.assets / "rootfs.ext4", read_only=False, is_root=True),
                Drive("data", self.assets / "data.img", read_only=True, is_root=False),
            ),
            network=network,
            run_dir=run_dir,
            console_log=run_dir / "console.log",
        )

    def requests(self) -> list[dict]:
        return harness.read_record(self.record)

    def config_requests(self) -> list[dict]:
        """Everything but the GETs the backend uses to wait for / inspect the API."""
        return [r for r in self.requests() if r["method"] != "GET"]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    yield e
    for backend in e.backends:
        for vm_id in list(backend._vms):
            with contextlib.suppress(Exception):
                await backend.cleanup(vm_id)
        await backend.close()
    for cleanup in e.cleanups:
        cleanup()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


async def test_boot_sends_valid_config_in_order(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    handle = await backend.boot(spec)

    assert backend.is_running(spec.vm_id)
    assert _alive(handle["pid"])
    reqs = env.config_requests()
    assert [(r["method"], r["path"]) for r in reqs] == CONFIG_SEQUENCE
    assert all(r["status"] in (200, 204) for r in env.requests()), env.requests()
    validator = harness.validator()
    for r in reqs:  # each body valid against the official spec (raises Fault otherwise)
        validator.check(r["method"], r["path"], json.dumps(r["body"]).encode())

    bodies = {r["path"]: r["body"] for r in reqs}
    run_dir = spec.run_dir
    assert bodies["/logger"]["log_path"] == str(run_dir / "firecracker.log")
    assert bodies["/metrics"] == {"metrics_path": str(run_dir / "firecracker.metrics")}
    assert bodies["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 256, "smt": False}
    boot = bodies["/boot-source"]
    assert boot["kernel_image_path"] == str(spec.kernel_path)
    assert boot["initrd_path"] == str(spec.initrd_path)
    assert boot["boot_args"].startswith("quiet metald.vm_id=vm-fc-1 ")
    assert {"console=ttyS0", "reboot=k", "panic=1", "pci=off"} <= set(boot["boot_args"].split())
    assert bodies["/drives/rootfs"] == {
        "drive_id": "rootfs",
        "path_on_host": str(spec.drives[0].path),
        "is_root_device": True,
        "is_read_only": False,
    }
    assert bodies["/drives/data"]["is_read_only"] is True
    assert bodies["/drives/data"]["is_root_device"] is False
    assert bodies["/actions"] == {"action_type": "InstanceStart"}

    info = await backend.info(spec.vm_id)
    assert info["backend"] == "firecracker"
    assert info["pid"] == str(handle["pid"])
    assert info["socket"] == str(run_dir / "firecracker.sock")
    assert info["state"] == "Running"
    assert info["firecracker_version"] == "1.16.1"
    assert env.exits == []


async def test_pause_and_resume(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    await backend.boot(spec)

    await backend.pause(spec.vm_id)
    assert (await backend.info(spec.vm_id))["state"] == "Paused"
    await backend.resume(spec.vm_id)
    assert (await backend.info(spec.vm_id))["state"] == "Running"
    patches = [r["body"] for r in env.config_requests() if r["path"] == "/vm"]
    assert patches == [{"state": "Paused"}, {"state": "Resumed"}]


async def test_metrics_sum_firecracker_increments(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    await backend.boot(spec)

    first = await backend.metrics(spec.vm_id)
    second = await backend.metrics(spec.vm_id)

    flushes = [r for r in env.config_requests() if r["body"] == {"action_type": "FlushMetrics"}]
    assert len(flushes) == 2
    assert first.measured and second.measured
    # Two drives read, only the writable one writes; each line holds one interval.
    read = 2 * fcd_block("read_bytes")
    written = fcd_block("write_bytes")
    assert (first.block_read_bytes, first.block_write_bytes) == (read, written)
    assert (second.block_read_bytes, second.block_write_bytes) == (2 * read, 2 * written)
    assert second.block_read_ops == 2 * 2 * fcd_block("read_count")
    assert second.net_rx_bytes == 0  # no network interface
    assert second.memory_usage_bytes > 0
    assert second.uptime_seconds >= 0
    assert second.cpu_usage_percent >= 0


def fcd_block(key: str) -> int:
    from tests.firecracker_double import firecracker_double as fcd

    return fcd.BLOCK_PER_FLUSH[key]


async def test_graceful_shutdown_via_ctrl_alt_del(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    pid = (await backend.boot(spec))["pid"]

    how = await backend.shutdown(spec.vm_id, force=False, timeout_s=10)

    assert how == "guest poweroff"
    assert not backend.is_running(spec.vm_id)
    assert not _alive(pid)
    assert env.config_requests()[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    assert env.exits == []  # asked for: no exit callback
    info = await backend.info(spec.vm_id)
    assert info["state"] == "exited" and info["exit_reason"] == "exit code 0"


async def test_graceful_shutdown_of_paused_vm_resumes_it_first(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    await backend.boot(spec)
    await backend.pause(spec.vm_id)

    assert await backend.shutdown(spec.vm_id, force=False, timeout_s=10) == "guest poweroff"
    tail = [r["body"] for r in env.config_requests()[-2:]]
    assert tail == [{"state": "Resumed"}, {"action_type": "SendCtrlAltDel"}]


async def test_graceful_shutdown_times_out_then_kills(env: Env) -> None:
    backend = env.backend(FC_DOUBLE_IGNORE_CTRLALTDEL="1")
    spec = env.spec()
    pid = (await backend.boot(spec))["pid"]

    how = await backend.shutdown(spec.vm_id, force=False, timeout_s=0.5)

    assert how.startswith("killed after 0.5s")
    assert not _alive(pid)
    assert (await backend.info(spec.vm_id))["exit_reason"] == "killed by signal SIGKILL"


async def test_forced_shutdown(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    pid = (await backend.boot(spec))["pid"]

    assert await backend.shutdown(spec.vm_id, force=True, timeout_s=30) == "killed"
    assert not _alive(pid)
    assert not backend.is_running(spec.vm_id)
    assert await backend.shutdown(spec.vm_id, force=True, timeout_s=0) == "not running"
    assert env.exits == []


async def test_reboot_starts_a_new_process_with_the_config_resent(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    old = await backend.boot(spec)

    new = await backend.reboot(spec, force=False)

    assert new["pid"] != old["pid"]
    assert not _alive(old["pid"])
    assert backend.is_running(spec.vm_id)
    calls = [(r["method"], r["path"]) for r in env.config_requests()]
    # boot, Ctrl+Alt+Del to the old process, then the whole config again
    assert calls == CONFIG_SEQUENCE + [("PUT", "/actions")] + CONFIG_SEQUENCE
    assert (await backend.info(spec.vm_id))["pid"] == str(new["pid"])
    assert env.exits == []


async def test_forced_reboot(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    old = await backend.boot(spec)
    new = await backend.reboot(spec, force=True)
    assert new["pid"] != old["pid"] and backend.is_running(spec.vm_id)
    calls = [(r["method"], r["path"]) for r in env.config_requests()]
    assert calls == CONFIG_SEQUENCE + CONFIG_SEQUENCE


async def test_network_interface_and_rate_limiters(env: Env, require_isolated: None) -> None:
    backend = env.backend()
    # The double attaches to the TAP as Firecracker does (on by default): a real one, in the
    # test's private network namespace (the launcher here enters none).
    subprocess.run(["ip", "tuntap", "add", "tap_ab12cd34", "mode", "tap"], check=True)
    request_cleanup = env.cleanups.append
    request_cleanup(lambda: subprocess.run(["ip", "link", "del", "tap_ab12cd34"], check=False))
    net = NetworkAllocation(
        short_id="ab12cd34",
        namespace="fc-vm-fc-net",
        host_veth="vh_ab12cd34",
        ns_veth="vn_ab12cd34",
        tap="tap_ab12cd34",
        ip="10.100.0.5",
        prefix_len=16,
        gateway="10.100.0.1",
        mac="AA:FC:00:00:00:05",
        rx_rate_limit=RateLimit(bandwidth=1_000_000, refill_time_ms=100, burst=50_000),
        tx_rate_limit=RateLimit(bandwidth=250_000, refill_time_ms=1000, burst=0),
    )
    spec = env.spec("vm-fc-net", network=net)
    await backend.boot(spec)

    reqs = env.config_requests()
    assert [r["path"] for r in reqs][-2:] == ["/network-interfaces/eth0", "/actions"]
    assert reqs[-2]["body"] == {
        "iface_id": "eth0",
        "host_dev_name": "tap_ab12cd34",
        "guest_mac": "AA:FC:00:00:00:05",
        # 1 MB/s refilled every 100 ms = 100 kB per refill
        "rx_rate_limiter": {"bandwidth": {"size": 100_000, "refill_time": 100, "one_time_burst": 50_000}},
        "tx_rate_limiter": {"bandwidth": {"size": 250_000, "refill_time": 1000}},
    }
    metrics = await backend.metrics(spec.vm_id)
    assert metrics.net_rx_bytes > 0 and metrics.net_tx_packets > 0


async def test_firecracker_fault_message_surfaces_as_backend_error(env: Env) -> None:
    message = "Machine config error: injected by the test"
    backend = env.backend(FC_DOUBLE_FAIL="PUT /machine-config", FC_DOUBLE_FAIL_MESSAGE=message)
    spec = env.spec()

    with pytest.raises(BackendError, match=message) as caught:
        await backend.boot(spec)

    assert "PUT /machine-config" in str(caught.value)
    assert not backend.is_running(spec.vm_id)
    assert (await backend.info(spec.vm_id))["state"] == "not tracked"
    sock = str(spec.run_dir / "firecracker.sock")
    vmms = [pid for pid in procfs.pids() if is_vmm_of(procfs.read_cmdline(pid) or [], spec.vm_id, sock)]
    assert not [pid for pid in vmms if _alive(pid)]  # the half-configured VMM was killed
    assert env.exits == []  # a failed boot raises; it is not an unexpected exit


async def test_double_refuses_what_firecracker_refuses(env: Env) -> None:
    """The boot fails when a drive's backing file is missing (Firecracker opens it on PUT)."""
    backend = env.backend()
    spec = env.spec()
    spec = replace(spec, drives=(Drive("rootfs", env.assets / "missing.ext4", False, True),))
    with pytest.raises(BackendError, match="No such file or directory"):
        await backend.boot(spec)


async def test_vmm_that_dies_at_start_is_reported_with_its_stderr(env: Env) -> None:
    backend = env.backend()
    broken = env.tmp / "broken-firecracker"
    broken.write_text("#!/bin/sh\necho 'cannot open /dev/kvm' >&2\nexit 3\n")
    broken.chmod(0o755)
    backend.launcher = DirectLauncher(str(broken))
    with pytest.raises(BackendError, match=r"exited while starting \(exit code 3\): cannot open /dev/kvm"):
        await backend.boot(env.spec())
    assert env.exits == []


async def test_exit_callback_when_the_vmm_is_killed(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    pid = (await backend.boot(spec))["pid"]

    os.kill(pid, signal.SIGKILL)
    await asyncio.wait_for(env.exit_event.wait(), 10)

    assert env.exits == [(spec.vm_id, "killed by signal SIGKILL")]
    assert not backend.is_running(spec.vm_id)


async def test_firecrackers_own_exit_codes_are_named_not_read_as_signals(env: Env) -> None:
    backend = env.backend(FC_DOUBLE_EXIT_AFTER_START="148")  # Firecracker's seccomp violation
    spec = env.spec()
    await backend.boot(spec)
    await asyncio.wait_for(env.exit_event.wait(), 10)
    [(vm_id, reason)] = env.exits
    assert vm_id == spec.vm_id and "signal" not in reason
    assert reason.startswith("exit code 148 (seccomp violation")


async def test_boot_args_too_long_once_firecracker_appends_its_own(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    base = len(boot_args(spec).encode())
    # Fits 2047 bytes alone, not with pci=off, root=/dev/vda rw and two virtio_mmio.device= entries.
    near = replace(spec, kernel_args=spec.kernel_args + " " + "x" * (2047 - base - 1))
    assert len(boot_args(near).encode()) == 2047
    with pytest.raises(InvalidArgument) as caught:
        await backend.validate(near)
    assert caught.value.field == "config.boot.kernel_args" and "2047" in str(caught.value)
    fits = replace(spec, kernel_args=spec.kernel_args + " " + "x" * (2047 - len(kernel_cmdline(spec).encode()) - 1))
    await backend.validate(fits)
    await backend.boot(fits)  # the double applies Firecracker's check at InstanceStart
    assert env.config_requests()[-1]["status"] == 204


async def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("console", [True, False])
async def test_a_guest_printing_without_end_stays_under_the_log_cap(env: Env, console: bool) -> None:
    cap = 64 * 1024
    flood = 8 << 20  # the guest prints 128 times the cap
    backend = env.backend(log_cap=cap, FC_DOUBLE_CONSOLE_FLOOD=str(flood))
    spec = replace(env.spec(), console_enabled=console)
    await backend.boot(spec)
    stderr = spec.run_dir / "firecracker.stderr"
    out = spec.console_log if console else stderr  # with the console off, serial output goes to stderr

    def flood_done() -> bool:
        return b"console flood done" in stderr.read_bytes()

    await _until(flood_done, "the flood to end")
    await _until(lambda: out.stat().st_size <= cap and stderr.stat().st_size <= cap, "the cap")
    data = out.read_bytes()
    assert data.startswith(TRUNCATED_MARK)
    last = re.search(rb"last line (\d+)", stderr.read_bytes())
    assert last is not None and f"guest line {int(last.group(1)):09d}".encode() in data  # the newest output is kept
    assert backend.is_running(spec.vm_id)


async def test_the_metrics_file_stays_under_the_cap_and_no_line_is_lost(env: Env) -> None:
    cap = 8192
    backend = env.backend(log_cap=cap)
    spec = env.spec()
    await backend.boot(spec)
    metrics_path = Path(backend._vms[spec.vm_id].handle.metrics_path)
    flushes = 40
    for _ in range(flushes):  # each call flushes one line of a few KiB
        await backend.metrics(spec.vm_id)
    assert metrics_path.stat().st_size > 4 * cap  # Firecracker's write offset keeps growing ...
    await _until(lambda: allocated_bytes(metrics_path) <= cap + 4096, "the metrics cap")  # ... its blocks do not
    totals = await backend.metrics(spec.vm_id)
    per_flush = 2 * 65536  # the double's read_bytes per flush, two drives
    assert totals.block_read_bytes == (flushes + 1) * per_flush


async def test_exit_callback_when_the_guest_powers_off_by_itself(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    await backend.boot(spec)
    # Someone else (not metald's shutdown) presses Ctrl+Alt+Del.
    await backend._vms[spec.vm_id].client.send_ctrl_alt_del()
    await asyncio.wait_for(env.exit_event.wait(), 10)
    assert env.exits == [(spec.vm_id, "exit code 0")]


async def test_adopt_checks_pid_start_time_and_cmdline(env: Env) -> None:
    first = env.backend()
    spec = env.spec()
    handle = await first.boot(spec)
    await first.close()  # metald "restarts": the VMM keeps running

    second = env.backend()
    assert not await second.adopt(spec, {**handle, "start_time": handle["start_time"] + 1})
    assert not await second.adopt(spec, {**handle, "api_sock_arg": "/elsewhere.sock"})
    assert not await second.adopt(env.spec("vm-other"), handle)
    assert not await second.adopt(spec, {"backend": "qemu", "pid": handle["pid"]})
    assert await second.adopt(spec, handle)
    assert second.is_running(spec.vm_id)
    assert (await second.info(spec.vm_id))["state"] == "Running"
    assert (await second.metrics(spec.vm_id)).block_read_bytes > 0

    assert await second.shutdown(spec.vm_id, force=False, timeout_s=10) == "exited after Ctrl+Alt+Del"
    _reap(handle["pid"])


async def test_adopted_vmm_exit_is_reported(env: Env) -> None:
    first = env.backend()
    spec = env.spec()
    handle = await first.boot(spec)
    await first.close()
    second = env.backend()
    assert await second.adopt(spec, handle)

    os.kill(handle["pid"], signal.SIGKILL)
    await asyncio.wait_for(env.exit_event.wait(), 10)
    _reap(handle["pid"])
    assert env.exits == [(spec.vm_id, "exited (exit status unknown: not a child of this metald)")]


async def test_cleanup_kills_an_untracked_vmm_and_removes_files(env: Env) -> None:
    first = env.backend()
    spec = env.spec()
    handle = await first.boot(spec)
    await first.close()

    fresh = env.backend()
    await fresh.cleanup(spec.vm_id)  # never adopted: found by its command line

    for _ in range(100):
        _reap(handle["pid"])
        if not _alive(handle["pid"]):
            break
        await asyncio.sleep(0.05)
    assert not _alive(handle["pid"])
    for name in ("firecracker.sock", "firecracker.metrics", "firecracker.log", "firecracker.stderr"):
        assert not (spec.run_dir / name).exists(), name


async def test_ping(env: Env) -> None:
    if kvm_unusable(Path("/dev/kvm")) is not None:
        pytest.skip(f"no usable /dev/kvm here: {kvm_unusable(Path('/dev/kvm'))}")
    backend = env.backend()
    backend.kvm_path = Path("/dev/kvm")
    ok, detail = await backend.ping()
    assert ok, detail
    assert "firecracker 1.16.1" in detail

    backend.kvm_path = env.tmp / "no-kvm"
    ok, detail = await backend.ping()
    assert not ok and "no-kvm" in detail and "modprobe" in detail

    backend.kvm_path = env.kvm  # a regular file opens read-write but is no KVM device
    ok, detail = await backend.ping()
    assert not ok and "is no KVM device" in detail

    missing = FirecrackerBackend(
        Settings(run_dir=env.run_root, firecracker_binary=str(env.tmp / "nope")), kvm_path=env.kvm
    )
    ok, detail = await missing.ping()
    assert not ok and "nope" in detail and "UNKEY_METALD_FIRECRACKER_BINARY" in detail


async def test_validate_names_the_field(env: Env) -> None:
    backend = env.backend()
    spec = env.spec()
    cases = {
        "vm_id": replace(spec, vm_id="bad_id"),
        "config.memory.size_bytes": replace(spec, memory_bytes=256 * MIB + 1),
        "config.cpu.vcpu_count": replace(spec, vcpu_count=33),
        "config.storage[0].id": replace(spec, drives=(Drive("root-fs", env.assets / "rootfs.ext4", False, True),)),
    }
    for field, bad in cases.items():
        with pytest.raises(InvalidArgument) as caught:
            await backend.validate(bad)
        assert caught.value.field == field
    assert env.requests() == []


def test_jailer_launcher_runs_firecracker_chrooted_in_a_pid_namespace(env: Env) -> None:
    settings = Settings(run_dir=env.run_root, jailer_chroot_dir=env.tmp / "jail", jailer_uid=61000, jailer_gid=61001)
    backend = FirecrackerBackend(settings, jailer=Jailer(settings), kvm_path=env.kvm)
    assert isinstance(backend.launcher, JailerLauncher)
    assert backend.tap_owner == (61000, 61001)
    net = NetworkAllocation("ab12cd34", "fc-vm-fc-1", "vh_ab12cd34", "vn_ab12cd34", "tap_ab12cd34", "10.100.0.5", 16,
                            "10.100.0.1", "AA:FC:00:00:00:05")  # fmt: skip
    spec = env.spec(network=net)
    launch = backend.launcher.prepare(spec)
    root = env.tmp / "jail" / "firecracker" / "vm-fc-1" / "root"
    argv = launch.argv
    assert argv[1:4] == ["-I", "-m", "metald.jailer.exec"]
    assert argv[argv.index("--netns") + 1] == "fc-vm-fc-1"
    assert argv[argv.index("--chroot") + 1] == str(root)
    assert (argv[argv.index("--uid") + 1], argv[argv.index("--gid") + 1]) == ("61000", "61001")
    assert "--new-pid-ns" in argv and argv[argv.index("--pid-file") + 1] == str(root.parent / "vmm.pid")
    assert argv[argv.index("--") + 1 :] == [settings.firecracker_binary, "--api-sock", "/run/firecracker.socket",
                                             "--id", "vm-fc-1"]  # fmt: skip
    assert launch.socket_path == root / "run" / "firecracker.socket"
    assert launch.vmm_path(root / "run" / "firecracker.log") == "/run/firecracker.log"
    assert launch.expose(env.assets / "vmlinux", "vmlinux") == "/vmlinux"  # placed by the jail, not here
    assert not root.exists()  # prepare is pure; setup builds the jail
    unjailed = FirecrackerBackend(Settings(run_dir=env.run_root, jailer_enabled=False), kvm_path=env.kvm)
    assert isinstance(unjailed.launcher, DirectLauncher) and unjailed.tap_owner is None


async def test_client_reaches_a_socket_whose_path_is_too_long_for_sun_path(env: Env) -> None:
    deep = env.tmp / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    sock = deep / "firecracker.socket"
    assert len(str(sock)) > 107
    dir_fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
    shim = harness.make_shim(env.tmp, env.record)
    proc = await asyncio.create_subprocess_exec(
        str(shim), "--api-sock", f"/proc/self/fd/{dir_fd}/firecracker.socket", "--id", "long", pass_fds=[dir_fd]
    )
    os.close(dir_fd)
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        async with FirecrackerClient(sock) as client:
            assert (await client.describe_instance())["id"] == "long"
    finally:
        proc.kill()
        await proc.wait()


async def test_double_exits_after_a_failed_snapshot_load(env: Env) -> None:
    """Firecracker replies to a failed load, then exits (the process is too dirty to go on)."""
    shim = harness.make_shim(env.tmp, env.record)
    sock = env.tmp / "fc.sock"
    junk = env.tmp / "junk"
    junk.write_text("not a snapshot")
    proc = await asyncio.create_subprocess_exec(str(shim), "--api-sock", str(sock), "--id", "snap")
    try:
        for _ in range(500):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        async with FirecrackerClient(sock) as client:
            with pytest.raises(FirecrackerApiError) as caught:
                await client._call("PUT", "/snapshot/load", {"snapshot_path": str(junk), "mem_file_path": str(junk)})
        assert caught.value.status == 400 and "Failed to restore from snapshot" in caught.value.fault_message
        assert await asyncio.wait_for(proc.wait(), 30) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
