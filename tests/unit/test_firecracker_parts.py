"""Pieces of the Firecracker backend: metrics file, handle, launchers, kernel args."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from metald.backends.firecracker.handle import FcHandle, is_vmm_of, mismatch
from metald.backends.firecracker.launch import DirectLauncher
from metald.backends.firecracker.logcap import allocated_bytes, punch_hole
from metald.backends.firecracker.metrics import MetricsFile
from metald.backends.firecracker.own_jailer import OwnJailerLauncher, cgroup_args
from metald.backends.firecracker.validation import boot_args
from metald.backends.procfs import read_stat
from metald.config import Settings
from metald.core.models import BootSpec, NetworkAllocation
from metald.jailer.cgroup import CgroupFs
from metald.jailer.jailer import Jailer
from metald.jailer.resource_limits import limits_for


def line(rx: int, read: int) -> str:
    return json.dumps({"net": {"rx_bytes_count": rx}, "block": {"read_bytes": read}}) + "\n"


def test_metrics_file_sums_increments_and_waits_for_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "m"
    reader = MetricsFile(path)
    assert reader.read_new() == 0  # missing file
    path.write_text(line(10, 100) + line(5, 50) + '{"net": {"rx_bytes_count": 7')
    assert reader.read_new() == 2
    assert (reader.totals.net_rx_bytes, reader.totals.block_read_bytes) == (15, 150)
    with open(path, "a") as fh:
        fh.write("}}\n" + "garbage\n")
    assert reader.read_new() == 1
    assert reader.totals.net_rx_bytes == 22 and reader.totals.bad_lines == 1
    path.write_text(line(1, 1))  # a new VMM recreated the file
    reader.read_new()
    assert reader.totals.net_rx_bytes == 1


def spec(tmp_path: Path, network: bool = False) -> BootSpec:
    net = NetworkAllocation(
        short_id="ab12cd34",
        namespace="fc-vm-1",
        host_veth="vh_ab12cd34",
        ns_veth="vn_ab12cd34",
        tap="tap_ab12cd34",
        ip="10.100.0.2",
        prefix_len=16,
        gateway="10.100.0.1",
        mac="AA:FC:00:00:00:02",
    )
    return BootSpec(
        vm_id="vm-1",
        vcpu_count=1,
        memory_bytes=128 << 20,
        kernel_path=tmp_path / "vmlinux",
        initrd_path=None,
        kernel_args="root=/dev/vda panic=5",
        drives=(),
        network=net if network else None,
        run_dir=tmp_path / "run" / "vm-1",
        console_log=tmp_path / "run" / "vm-1" / "console.log",
    )


def test_direct_launcher_enters_the_namespace(tmp_path: Path) -> None:
    launcher = DirectLauncher("/usr/local/bin/firecracker")
    plain = launcher.prepare(spec(tmp_path))
    sock = str(tmp_path / "run" / "vm-1" / "firecracker.sock")
    assert plain.argv == ["/usr/local/bin/firecracker", "--api-sock", sock, "--id", "vm-1"]
    netted = launcher.prepare(spec(tmp_path, network=True))
    assert netted.argv[:3] == ["nsenter", "--net=/run/netns/fc-vm-1", "--"]
    assert netted.argv[3:] == plain.argv
    assert plain.vmm_path(Path("/a/b")) == "/a/b"


def test_own_jailer_launcher(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "firecracker-v1.16.1-x86_64").write_bytes(b"")
    (bin_dir / "firecracker").symlink_to("firecracker-v1.16.1-x86_64")
    settings = Settings(jailer_chroot_dir=tmp_path, jailer_uid=1000, jailer_gid=1001, jailer_fd_limit=2048)
    fs = CgroupFs(2, tuple((c, Path("/sys/fs/cgroup")) for c in ("memory", "cpu", "pids")), parent="metald")
    launcher = OwnJailerLauncher("/usr/local/bin/jailer", str(bin_dir / "firecracker"), Jailer(settings, cgroup_fs=fs))
    launch = launcher.prepare(spec(tmp_path, network=True))
    # The jailer names the jail after the canonicalized binary, not the symlink.
    root = tmp_path / "firecracker-v1.16.1-x86_64" / "vm-1" / "root"
    limits = limits_for(settings, spec(tmp_path))
    assert launch.argv == [
        "/usr/local/bin/jailer",
        "--id", "vm-1",
        "--exec-file", str(bin_dir / "firecracker"),
        "--uid", "1000",
        "--gid", "1001",
        "--chroot-base-dir", str(tmp_path),
        "--netns", "/run/netns/fc-vm-1",
        "--cgroup-version", "2",
        "--parent-cgroup", "metald",
        "--cgroup", f"memory.max={limits.memory_max}",
        "--cgroup", f"cpu.max={limits.cpu_quota_us} 100000",
        "--cgroup", f"pids.max={limits.pids_max}",
        "--resource-limit", "no-file=2048",
        "--",
        "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip
    assert launch.socket_path == root / "run" / "firecracker.socket"
    assert launch.vmm_path(root / "firecracker.metrics") == "/firecracker.metrics"
    assert launch.expose(tmp_path / "vmlinux", "vmlinux") == "/vmlinux"  # placed by setup
    assert not root.exists()  # prepare is pure
    assert cgroup_args(1, limits)[:2] == ["--cgroup", f"memory.limit_in_bytes={limits.memory_max}"]


def test_boot_args_keep_the_callers_keys(tmp_path: Path) -> None:
    args = boot_args(spec(tmp_path)).split()
    assert args[:2] == ["root=/dev/vda", "panic=5"]
    assert "panic=1" not in args and {"console=ttyS0", "reboot=k", "pci=off"} <= set(args)
    assert "console=ttyS0" not in boot_args(replace(spec(tmp_path), console_enabled=False))


def test_handle_round_trip_and_identity_check() -> None:
    stat = read_stat(os.getpid())
    assert stat is not None
    me = FcHandle("vm-1", os.getpid(), stat.start_time, "/s.sock", "/s.sock", "/d", "/d/m")
    assert FcHandle.from_dict(me.to_dict()) == me
    assert FcHandle.from_dict({"backend": "qemu"}) is None
    assert FcHandle.from_dict({**me.to_dict(), "version": 99}) is None
    # this test process is not a Firecracker of vm-1
    assert "is not Firecracker instance vm-1" in (mismatch(me) or "")
    assert "reused" in (mismatch(replace(me, start_time=stat.start_time + 1)) or "")
    assert "gone" in (mismatch(replace(me, pid=2**22 + 1)) or "")
    argv = ["/fc", "--api-sock", "/s.sock", "--id", "vm-1"]
    assert is_vmm_of(argv, "vm-1", "/s.sock")
    assert not is_vmm_of(argv, "vm-2", "/s.sock")
    assert not is_vmm_of(["/fc", "--id", "/s.sock", "--api-sock", "vm-1"], "vm-1", "/s.sock")


def test_metrics_reader_skips_a_punched_hole(tmp_path: Path) -> None:
    path = tmp_path / "m"
    with open(path, "wb") as fh:  # written at its own offset, as Firecracker does
        for _ in range(200):
            fh.write(line(1, 10).encode())
    reader = MetricsFile(path)
    assert reader.read_new() == 200
    punch_hole(path, reader.consumed)
    assert allocated_bytes(path) < path.stat().st_size  # the read part is freed, the size kept
    with open(path, "ab") as fh:
        fh.write(line(5, 50).encode())
    assert reader.read_new() == 1 and reader.totals.net_rx_bytes == 205
    fresh = MetricsFile(path)  # a restarted metald: skips the hole and the cut line after it
    fresh.read_new()
    assert fresh.totals.bad_lines == 0 and 0 < fresh.totals.net_rx_bytes < 205
