"""What Firecracker accepts, checked before anything starts, and its kernel arguments."""

from __future__ import annotations

import re

from metald.core.errors import InvalidArgument
from metald.core.files import check_regular_file
from metald.core.models import BootSpec, RateLimit

MIB = 1 << 20
MAX_VCPUS = 32
CMDLINE_MAX = 2048  # bytes, including the terminating NUL, on x86_64
IFNAMSIZ = 16
MMIO_DEVICES_START = 0xC000_1000  # MEM_32BIT_DEVICES_START on x86_64
MMIO_LEN = 0x1000
GSI_START = 5  # GSI_LEGACY_START
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # Firecracker's --id rule
MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")

# Added unless the caller set the same key: a guest reboot then ends the
# Firecracker process (Firecracker cannot reboot in place), a panic reboots,
# and the kernel does not probe for PCI (there is none).
FIRECRACKER_ARGS = (("reboot", "k"), ("panic", "1"), ("pci", "off"))


def resource_id_ok(value: str) -> bool:
    """Firecracker's rule for drive and interface ids: letters, digits, underscores."""
    return bool(value) and all(c == "_" or c.isalnum() for c in value)


def _check_rate(limit: RateLimit | None, field: str) -> None:
    if limit is None:
        return
    if limit.bandwidth <= 0:
        raise InvalidArgument(f"{field}.bandwidth", "must be > 0 bytes/s")
    if limit.refill_time_ms <= 0:
        raise InvalidArgument(f"{field}.refill_time", "must be > 0 ms")
    if limit.burst < 0:
        raise InvalidArgument(f"{field}.burst", "must be >= 0 bytes")


def check_spec(spec: BootSpec) -> None:
    """Raise InvalidArgument naming the field Firecracker would refuse."""
    if not INSTANCE_ID_RE.match(spec.vm_id):
        raise InvalidArgument("vm_id", "Firecracker needs 1-64 letters, digits or hyphens")
    if not 1 <= spec.vcpu_count <= MAX_VCPUS:
        raise InvalidArgument("config.cpu.vcpu_count", f"Firecracker runs 1-{MAX_VCPUS} vCPUs")
    if spec.memory_bytes < MIB or spec.memory_bytes % MIB:
        raise InvalidArgument("config.memory.size_bytes", "Firecracker needs a whole number of MiB")
    check_regular_file("config.boot.kernel_path", spec.kernel_path)
    if spec.initrd_path is not None:
        check_regular_file("config.boot.initrd_path", spec.initrd_path)
    final = kernel_cmdline(spec)
    if len(final.encode()) >= CMDLINE_MAX:
        extra = len(final.encode()) - len(spec.kernel_args.encode())
        raise InvalidArgument(
            "config.boot.kernel_args",
            f"too long: with the {extra} bytes metald and Firecracker add (console, reboot, root device, "
            f"one virtio_mmio.device= per drive and interface, pci=off) the command line would be "
            f"{len(final.encode())} bytes; Firecracker's limit is {CMDLINE_MAX - 1}",
        )
    roots = 0
    for i, drive in enumerate(spec.drives):
        if not resource_id_ok(drive.drive_id):
            raise InvalidArgument(f"config.storage[{i}].id", "Firecracker drive ids are letters, digits or '_'")
        roots += drive.is_root
    if roots > 1:
        raise InvalidArgument("config.storage", "Firecracker boots from at most one root device")
    net = spec.network
    if net is not None:
        if not net.tap or len(net.tap.encode()) >= IFNAMSIZ:
            raise InvalidArgument("config.network[0].tap_device", "must be 1-15 bytes")
        if net.mac and not MAC_RE.match(net.mac):
            raise InvalidArgument("config.network[0].mac_address", "must be XX:XX:XX:XX:XX:XX")
        _check_rate(net.rx_rate_limit, "config.network[0].rx_rate_limit")
        _check_rate(net.tx_rate_limit, "config.network[0].tx_rate_limit")


def kernel_cmdline(spec: BootSpec) -> str:
    """The command line Firecracker hands the guest: ``boot_args(spec)`` plus what it appends.

    Firecracker v1.16.1 (``vmm/src/builder.rs``) inserts ``pci=off`` (PCI is
    off), then per block device in order ``root=/dev/vda`` and ``rw``/``ro``
    for the root device and ``virtio_mmio.device=4K@0x<addr>:<gsi>``, then the
    same for each network device, each after a space, and refuses the boot
    (at InstanceStart) when the result does not fit CMDLINE_MAX with its NUL.
    MMIO slots start at 0xc0001000, 4 KiB apart; GSIs start at 5.
    """
    words = [boot_args(spec), "pci=off"]
    slot = 0
    for drive in spec.drives:
        if drive.is_root:
            words += ["root=/dev/vda", "ro" if drive.read_only else "rw"]
        words.append(_mmio_device(slot))
        slot += 1
    if spec.network is not None:
        words.append(_mmio_device(slot))
    return " ".join(w for w in words if w)


def _mmio_device(slot: int) -> str:
    return f"virtio_mmio.device=4K@0x{MMIO_DEVICES_START + slot * MMIO_LEN:x}:{GSI_START + slot}"


def boot_args(spec: BootSpec) -> str:
    """The caller's kernel arguments plus what Firecracker guests need.

    ``console=ttyS0`` when the console is enabled (Firecracker's serial port),
    and FIRECRACKER_ARGS; a key the caller already set is left alone.
    """
    words = spec.kernel_args.split()
    keys = {w.split("=", 1)[0] for w in words}
    extra = [f"{k}={v}" for k, v in FIRECRACKER_ARGS if k not in keys]
    if spec.console_enabled and "console" not in keys:
        extra.insert(0, "console=ttyS0")
    return " ".join(words + extra)
