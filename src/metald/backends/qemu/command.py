"""The QEMU command line for one VM, and how it is launched.

``build_argv`` turns a BootSpec into ``qemu-system-x86_64 -M microvm ...``;
``launch_argv`` wraps it for the host (network namespace today, the jailer
later). Nothing here touches the host.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from metald.core.layout import NETNS_DIR
from metald.core.models import BootSpec, Drive

Accel = Literal["kvm", "tcg"]

QMP_SOCKET = "qmp.sock"
PID_FILE = "qemu.pid"
VMM_LOG = "vmm.log"

# microvm; isa-serial is the guest console (ttyS0). The PIT, PIC and RTC stay:
# the Debian cloud kernel calibrates its TSC against the PIT and without them
# TCG boots stall or slow down.
MACHINE = "microvm,x-option-roms=off,isa-serial=on"
CPU_MODEL: dict[Accel, str] = {"kvm": "host", "tcg": "max"}
# Seccomp filter: no spawning, no privilege changes, no obsolete syscalls.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class CommandOptions:
    """Knobs that are not part of the spec."""

    binary: str = "qemu-system-x86_64"
    accel: Accel = "tcg"
    qmp: bool = True
    # Probe boots: writes to drives go to a temporary overlay, never the file.
    snapshot_drives: bool = False
    sandbox: bool = True
    # Appended after the spec's kernel args (accelerator-specific fixes only).
    extra_kernel_args: tuple[str, ...] = ()
    # TCG's translation buffer in MiB (0: QEMU's default, 1 GiB, of which a booted guest
    # touches ~50 MiB); the buffer is flushed and refilled when full.
    tcg_tb_size_mib: int = 0


def qmp_socket_path(run_dir: Path) -> Path:
    return run_dir / QMP_SOCKET


def pid_file_path(run_dir: Path) -> Path:
    return run_dir / PID_FILE


def vmm_log_path(run_dir: Path) -> Path:
    return run_dir / VMM_LOG


def opt_escape(value: str | Path) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (commas are doubled)."""
    return str(value).replace(",", ",,")


def memory_mib(memory_bytes: int) -> int:
    """Bytes to whole MiB, rounded up so the guest never gets less than asked."""
    return max(1, -(-memory_bytes // (1 << 20)))


def ordered_drives(drives: Sequence[Drive]) -> list[Drive]:
    """Root drive first (it becomes /dev/vda), the rest in the given order."""
    return sorted(drives, key=lambda d: not d.is_root)


def _drive_args(index: int, drive: Drive, snapshot: bool) -> list[str]:
    node = f"drv{index}"
    opts = [
        f"id={node}",
        f"file={opt_escape(drive.path)}",
        "format=qcow2" if drive.path.suffix == ".qcow2" else "format=raw",
        "if=none",
    ]
    if drive.read_only:
        opts.append("readonly=on")
    if snapshot:
        opts.append("snapshot=on")
    # virtio-blk serial is at most 20 bytes; the guest sees it in /sys/block/vdX/serial.
    serial = opt_escape(drive.drive_id[:20])
    return ["-drive", ",".join(opts), "-device", f"virtio-blk-device,drive={node},serial={serial}"]


def _accel_arg(options: CommandOptions) -> str:
    if options.accel == "tcg" and options.tcg_tb_size_mib:
        return f"tcg,tb-size={options.tcg_tb_size_mib}"
    return options.accel


def build_argv(spec: BootSpec, options: CommandOptions) -> list[str]:
    """The QEMU argv (without any launcher prefix) for ``spec``."""
    argv = [
        options.binary,
        "-M",
        MACHINE,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-name",
        f"guest={opt_escape(spec.vm_id)},debug-threads=on",
        "-accel",
        _accel_arg(options),
        "-cpu",
        CPU_MODEL[options.accel],
        "-smp",
        str(spec.vcpu_count),
        "-m",
        str(memory_mib(spec.memory_bytes)),
        "-kernel",
        str(spec.kernel_path),
    ]
    if spec.initrd_path is not None:
        argv += ["-initrd", str(spec.initrd_path)]
    argv += ["-append", " ".join([spec.kernel_args, *options.extra_kernel_args]).strip()]
    for index, drive in enumerate(ordered_drives(spec.drives)):
        argv += _drive_args(index, drive, options.snapshot_drives)
    if spec.network is not None:
        net = spec.network
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={opt_escape(net.tap)},script=no,downscript=no,vhost=off",
            "-device",
            f"virtio-net-device,netdev=net0,mac={opt_escape(net.mac)}",
        ]
    if spec.console_enabled:
        argv += [
            "-chardev",
            f"file,id=console0,path={opt_escape(spec.console_log)},append=on",
            "-serial",
            "chardev:console0",
        ]
    else:
        argv += ["-serial", "null"]
    if options.qmp:
        sock = opt_escape(qmp_socket_path(spec.run_dir))
        argv += ["-qmp", f"unix:{sock},server=on,wait=off"]
    argv += ["-pidfile", str(pid_file_path(spec.run_dir))]
    if options.sandbox:
        argv += ["-sandbox", SANDBOX]
    return argv


def launch_argv(spec: BootSpec, argv: list[str]) -> list[str]:
    """How the host starts ``argv``: inside the VM's network namespace if it has one.

    ``nsenter`` execs QEMU in place, so the pid we start is QEMU's pid.
    The jailer will replace this function.
    """
    if spec.network is None:
        return list(argv)
    netns = NETNS_DIR / spec.network.namespace
    return ["nsenter", f"--net={netns}", "--", *argv]


def argv_hash(argv: Sequence[str]) -> str:
    """Stable digest of a command line, as it appears in /proc/<pid>/cmdline."""
    return hashlib.sha256("\0".join(argv).encode()).hexdigest()
