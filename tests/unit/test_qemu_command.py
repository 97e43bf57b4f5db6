"""QEMU command line building (no QEMU needed)."""

from __future__ import annotations

from pathlib import Path

from metald.backends.qemu.command import (
    CommandOptions,
    argv_hash,
    build_argv,
    launch_argv,
    memory_mib,
    opt_escape,
)
from metald.core.models import BootSpec, Drive, NetworkAllocation


def make_spec(tmp: Path, network: bool = False, **kw: object) -> BootSpec:
    net = None
    if network:
        net = NetworkAllocation(
            short_id="abcd1234",
            namespace="fc-vm1",
            host_veth="vh_abcd1234",
            ns_veth="vn_abcd1234",
            tap="tap_abcd1234",
            ip="10.100.0.2",
            prefix_len=16,
            gateway="10.100.0.1",
            mac="02:00:0a:64:00:02",
        )
    values: dict[str, object] = dict(
        vm_id="vm1",
        vcpu_count=2,
        memory_bytes=256 << 20,
        kernel_path=tmp / "vmlinuz",
        initrd_path=tmp / "initramfs.cpio.gz",
        kernel_args="console=ttyS0 metald.vm_id=vm1 ip=10.100.0.2::10.100.0.1:255.255.0.0",
        drives=(
            Drive("data", tmp / "data,1.img", read_only=False, is_root=False),
            Drive("rootfs", tmp / "rootfs.ext4", read_only=True, is_root=True),
        ),
        network=net,
        run_dir=tmp / "run" / "vm1",
        console_log=tmp / "run" / "vm1" / "console.log",
    )
    values.update(kw)
    return BootSpec(**values)  # type: ignore[arg-type]


def arg_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_basic_machine_and_sizes(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path), CommandOptions(accel="tcg"))
    assert argv[0] == "qemu-system-x86_64"
    assert arg_after(argv, "-M")[0].startswith("microvm")
    for flag in ("-nodefaults", "-no-user-config", "-nographic"):
        assert flag in argv
    assert arg_after(argv, "-accel") == ["tcg"]
    assert arg_after(argv, "-smp") == ["2"]
    assert arg_after(argv, "-m") == ["256"]
    assert arg_after(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert arg_after(argv, "-initrd") == [str(tmp_path / "initramfs.cpio.gz")]
    assert arg_after(argv, "-pidfile") == [str(tmp_path / "run/vm1/qemu.pid")]


def test_kernel_args_verbatim(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = build_argv(spec, CommandOptions())
    assert arg_after(argv, "-append") == [spec.kernel_args]


def test_kvm_uses_host_cpu(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path), CommandOptions(accel="kvm"))
    assert arg_after(argv, "-accel") == ["kvm"]
    assert arg_after(argv, "-cpu") == ["host"]


def test_memory_rounds_up_to_mib() -> None:
    assert memory_mib(128 << 20) == 128
    assert memory_mib((128 << 20) + 1) == 129


def test_no_initrd(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path, initrd_path=None), CommandOptions())
    assert "-initrd" not in argv


def test_root_drive_first_readonly_and_commas_escaped(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path), CommandOptions())
    drives = arg_after(argv, "-drive")
    assert len(drives) == 2
    assert f"file={tmp_path}/rootfs.ext4" in drives[0]
    assert "readonly=on" in drives[0]
    assert "file=" + opt_escape(tmp_path / "data,1.img") in drives[1]
    assert "data,,1.img" in drives[1]
    assert "readonly=on" not in drives[1]
    assert "snapshot=on" not in drives[0]
    devices = arg_after(argv, "-device")
    assert devices[0].startswith("virtio-blk-device,drive=drv0")
    assert devices[1].startswith("virtio-blk-device,drive=drv1")


def test_snapshot_drives_for_probes(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path), CommandOptions(snapshot_drives=True, qmp=False))
    assert all("snapshot=on" in d for d in arg_after(argv, "-drive"))
    assert "-qmp" not in argv


def test_console_in_append_mode_and_qmp_socket(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path), CommandOptions())
    chardev = arg_after(argv, "-chardev")[0]
    assert chardev.startswith("file,id=console0,")
    assert f"path={tmp_path}/run/vm1/console.log" in chardev
    assert "append=on" in chardev
    assert arg_after(argv, "-serial") == ["chardev:console0"]
    assert arg_after(argv, "-qmp") == [f"unix:{tmp_path}/run/vm1/qmp.sock,server=on,wait=off"]


def test_console_disabled(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path, console_enabled=False), CommandOptions())
    assert "-chardev" not in argv
    assert arg_after(argv, "-serial") == ["null"]


def test_network_device(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path, network=True), CommandOptions())
    netdev = arg_after(argv, "-netdev")
    assert netdev == ["tap,id=net0,ifname=tap_abcd1234,script=no,downscript=no,vhost=off"]
    assert "virtio-net-device,netdev=net0,mac=02:00:0a:64:00:02" in arg_after(argv, "-device")


def test_no_network_no_nic(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path), CommandOptions())
    assert "-netdev" not in argv
    assert not any("virtio-net" in a for a in argv)


def test_launch_in_namespace(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, network=True)
    argv = build_argv(spec, CommandOptions())
    full = launch_argv(spec, argv)
    assert full[:3] == ["nsenter", "--net=/run/netns/fc-vm1", "--"]
    assert full[3:] == argv


def test_launch_without_network_is_plain(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = build_argv(spec, CommandOptions())
    assert launch_argv(spec, argv) == argv


def test_argv_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    argv = build_argv(make_spec(tmp_path), CommandOptions())
    assert argv_hash(argv) == argv_hash(list(argv))
    assert argv_hash(argv) != argv_hash([*argv, "-S"])
    assert argv_hash(["a b"]) != argv_hash(["a", "b"])


def test_extra_kernel_args_are_appended(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = build_argv(spec, CommandOptions(extra_kernel_args=("tsc_early_khz=2596142",)))
    assert arg_after(argv, "-append") == [spec.kernel_args + " tsc_early_khz=2596142"]


def test_tcg_tsc_arg(tmp_path: Path) -> None:
    from metald.backends.qemu.clock import host_tsc_khz, tcg_extra_args

    assert tcg_extra_args("console=ttyS0", 2596142) == ["tsc_early_khz=2596142"]
    assert tcg_extra_args("console=ttyS0 tsc_early_khz=1000", 2596142) == []
    assert tcg_extra_args("console=ttyS0", None) == []
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("cpu MHz\t\t: 2596.142\nflags\t\t: fpu tsc constant_tsc tsc_known_freq\n")
    none = tmp_path / "none"
    assert host_tsc_khz(none, cpuinfo, none) == 2596142
    cpuinfo.write_text("cpu MHz\t\t: 1800.000\nflags\t\t: fpu tsc constant_tsc aperfmperf\n")
    assert host_tsc_khz(none, cpuinfo, none) is None
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(
        "6,10,0,-;tsc: Detected 2900.000 MHz processor\n"
        "6,11,0,-;tsc: Refined TSC clocksource calibration: 2899.998 MHz\n"
    )
    assert host_tsc_khz(none, cpuinfo, kmsg) == 2899998
    khz = tmp_path / "tsc_freq_khz"
    khz.write_text("3000000\n")
    assert host_tsc_khz(khz, cpuinfo, kmsg) == 3000000


def test_tcg_translation_buffer_is_capped(tmp_path: Path) -> None:
    """QEMU's default TCG buffer (1 GiB) held ~48 MiB resident per booted guest; metald caps it."""
    from metald.config import Settings

    size = Settings().qemu_tcg_tb_size_mib
    assert 0 < size <= 32
    argv = build_argv(make_spec(tmp_path), CommandOptions(accel="tcg", tcg_tb_size_mib=size))
    assert arg_after(argv, "-accel") == [f"tcg,tb-size={size}"]
    kvm = build_argv(make_spec(tmp_path), CommandOptions(accel="kvm", tcg_tb_size_mib=size))
    assert arg_after(kvm, "-accel") == ["kvm"]
