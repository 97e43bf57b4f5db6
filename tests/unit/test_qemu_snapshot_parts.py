"""The pure parts of QEMU snapshots: the identity line, the restore argv and the checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from metald.backends.qemu.command import CommandOptions, build_argv
from metald.backends.qemu.snapshot import (
    GuestIdentity,
    QemuSnapshots,
    SnapshotDisk,
    SnapshotManifest,
    check_compatible,
    verify_files,
)
from metald.core.errors import FailedPrecondition, InvalidArgument
from metald.core.models import BootSpec, Drive, NetworkAllocation

ALLOC = NetworkAllocation(
    short_id="ab12cd34", namespace="fc-c1", host_veth="vh_ab12cd34", ns_veth="vn_ab12cd34", tap="tap_ab12cd34",
    ip="10.100.0.7", prefix_len=16, gateway="10.100.0.1", mac="02:fc:00:00:00:07", dns_servers=("10.0.0.53",),
)


def spec(tmp: Path, memory: int = 128 << 20, drives: tuple[Drive, ...] | None = None) -> BootSpec:
    if drives is None:
        drives = (Drive("rootfs", tmp / "rootfs.qcow2", read_only=True, is_root=True),)
    return BootSpec("c1", 1, memory, tmp / "vmlinuz", None, "console=ttyS0", drives, ALLOC, tmp / "run",
                    tmp / "run" / "console.log")


def manifest(**over: object) -> SnapshotManifest:
    values: dict[str, object] = dict(
        source_vm_id="t", vcpu_count=1, memory_bytes=128 << 20, accel="tcg", qemu_version="7.2", guest_state="running",
        state_bytes=10, memory_disk_bytes=0, disks=(SnapshotDisk("rootfs", "disk0.img", True, True, 4),),
        created_at=0.0, stop_seconds=0.0,
    )
    values.update(over)
    return SnapshotManifest(**values)  # type: ignore[arg-type]


def test_identity_line_carries_the_clone_and_a_fresh_seed() -> None:
    a, b = GuestIdentity.for_clone("c1", ALLOC), GuestIdentity.for_clone("c1", ALLOC)
    line = a.line(ack="f00", now=1700000000).decode()
    assert line.endswith("\n") and line.startswith("METALD_IDENTITY ")
    words = dict(w.split("=", 1) for w in line.split()[1:])
    assert words["ip"] == "10.100.0.7/16" and words["gw"] == "10.100.0.1" and words["mac"] == ALLOC.mac
    assert words["vm_id"] == words["host"] == "c1" and words["dns"] == "10.0.0.53" and words["ack"] == "f00"
    assert len(words["seed"]) == 64 and a.seed != b.seed  # never two clones with one seed
    assert "seed" not in repr(a)  # not in logs


def test_identity_refuses_words_that_would_split_the_line() -> None:
    with pytest.raises(InvalidArgument, match="identity.host"):
        GuestIdentity(hostname="a b\nMETALD_IDENTITY ip=1.2.3.4/8").line()


def test_restore_argv_maps_memory_swaps_console_and_overlays(tmp_path: Path) -> None:
    s = spec(tmp_path)
    argv = build_argv(s, CommandOptions(accel="tcg"))
    overlays = frozenset({tmp_path / "rootfs.qcow2"})
    hook = QemuSnapshots.restore_argv_hook(s, tmp_path / "snap", manifest(), overlays)
    out = hook(argv)
    joined = " ".join(out)
    assert out[-3:] == ["-S", "-incoming", "defer"]
    assert "memory-backend=microvm.ram" in out[out.index("-M") + 1]
    assert f"mem-path={tmp_path / 'snap' / 'memory'},share=off" in joined
    assert "format=qcow2" in joined and "format=raw" not in joined
    chardev = out[out.index("-chardev") + 1]
    assert chardev.startswith("socket,id=console0,") and f"logfile={s.console_log}" in chardev


def test_restore_argv_refuses_another_accelerator(tmp_path: Path) -> None:
    s = spec(tmp_path)
    hook = QemuSnapshots.restore_argv_hook(s, tmp_path, manifest(accel="kvm"), frozenset())
    with pytest.raises(FailedPrecondition, match="kvm"):
        hook(build_argv(s, CommandOptions(accel="tcg")))


def test_the_template_config_wins(tmp_path: Path) -> None:
    check_compatible(manifest(), spec(tmp_path))
    with pytest.raises(InvalidArgument, match="memory"):
        check_compatible(manifest(), spec(tmp_path, memory=256 << 20))
    with pytest.raises(InvalidArgument, match="storage"):
        check_compatible(manifest(), spec(tmp_path, drives=()))


def test_missing_or_truncated_files_are_refused(tmp_path: Path) -> None:
    m = manifest()
    with pytest.raises(FailedPrecondition, match="missing"):
        verify_files(tmp_path, m)
    (tmp_path / "vmstate").write_bytes(b"x" * 10)
    (tmp_path / "memory").write_bytes(b"")
    (tmp_path / "disk0.img").write_bytes(b"1234")
    with pytest.raises(FailedPrecondition, match="corrupted"):
        verify_files(tmp_path, m)
    with open(tmp_path / "memory", "wb") as f:
        f.truncate(128 << 20)
    verify_files(tmp_path, m)
