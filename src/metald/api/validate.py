"""Validation of requests: protobuf in, core values out.

Every field of every request is checked here; a problem raises
:class:`InvalidArgument` naming the field (in protobuf's snake_case path form,
e.g. ``config.storage[1].path``). Nothing is silently ignored: a field metald
cannot honour is rejected with a reason.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

from metald.config import Settings
from metald.core.errors import InvalidArgument
from metald.core.files import check_regular_file
from metald.core.lifecycle import host_memory_bytes
from metald.core.models import Drive, NicRequest, RateLimit, VmDraft, VmState
from metald.core.ports import BackendLimits
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb

VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
CUSTOMER_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
TAP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

MIN_MEMORY = 32 << 20
MAX_DRIVES = 8
MAX_DNS = 3
MAX_KERNEL_ARGS = 4096
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024
MAX_PATH = 4096
MAX_RATE = 1 << 40  # 1 TiB/s: anything above is a mistake
LIST_DEFAULT_PAGE_SIZE = 50
LIST_MAX_PAGE_SIZE = 1000
MAX_SHUTDOWN_TIMEOUT = 3600
DEFAULT_SHUTDOWN_TIMEOUT = 30

_STATES = {s.value for s in VmState if s is not VmState.UNSPECIFIED}


def _has_control_chars(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def vm_id(value: str, field: str = "vm_id") -> str:
    """A VM id given by a caller for an existing VM."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not VM_ID_RE.match(value):
        raise InvalidArgument(
            field, "must be 1-64 letters, digits or hyphens, starting with a letter or digit"
        )
    return value


def new_vm_id(value: str) -> str:
    """The caller's id for a new VM, or a generated one."""
    if not value:
        return "vm-" + uuid.uuid4().hex[:20]
    return vm_id(value)


def customer_id(value: str) -> str:
    if not value:
        return ""
    if not CUSTOMER_ID_RE.match(value) or value in (".", ".."):
        raise InvalidArgument(
            "customer_id", "must be 1-128 characters of letters, digits and ._:@/+=-"
        )
    return value


def _no_map(field: str, values: object, why: str) -> None:
    if values:
        raise InvalidArgument(field, why)


def asset_path(value: str, field: str, settings: Settings) -> Path:
    """A kernel, initrd or drive path: must resolve inside an asset directory
    and be a regular, readable file."""
    if len(value) > MAX_PATH or _has_control_chars(value) or not value.startswith("/"):
        raise InvalidArgument(field, "must be an absolute path without control characters")
    resolved = Path(os.path.realpath(value))
    allowed = [Path(os.path.realpath(d)) for d in settings.allowed_asset_dirs]
    if not any(resolved == d or d in resolved.parents for d in allowed):
        dirs = ", ".join(str(d) for d in allowed)
        raise InvalidArgument(field, f"{value} is outside the allowed asset directories ({dirs})")
    check_regular_file(field, resolved, shown=value)
    return resolved


def _rate(limit: pb.RateLimit, field: str) -> RateLimit | None:
    for name in ("bandwidth", "refill_time", "burst"):
        number = getattr(limit, name)
        if number < 0:
            raise InvalidArgument(f"{field}.{name}", "must not be negative")
        if number > MAX_RATE:
            raise InvalidArgument(f"{field}.{name}", "is too large")
    if limit.bandwidth == 0:
        if limit.burst or limit.refill_time:
            raise InvalidArgument(f"{field}.bandwidth", "is required when burst or refill_time is set")
        return None
    refill = limit.refill_time or 1000
    return RateLimit(bandwidth=limit.bandwidth, refill_time_ms=refill, burst=limit.burst)


def _nic(nic: pb.NetworkInterface, settings: Settings) -> NicRequest:
    f = "config.network[0]"
    if nic.id and not DEVICE_ID_RE.match(nic.id):
        raise InvalidArgument(f"{f}.id", "must be 1-32 letters, digits, _ or -")
    mac = nic.mac_address or None
    if mac is not None:
        if not MAC_RE.match(mac):
            raise InvalidArgument(f"{f}.mac_address", "must look like 02:00:00:00:00:01")
        if int(mac[:2], 16) & 1:
            raise InvalidArgument(f"{f}.mac_address", "must be a unicast address")
        if mac.replace(":", "") == "000000000000":
            raise InvalidArgument(f"{f}.mac_address", "must not be all zeros")
        mac = mac.lower()
    tap = nic.tap_device or None
    if tap is not None and (len(tap.encode()) > 15 or not TAP_RE.match(tap)):
        raise InvalidArgument(f"{f}.tap_device", "must be 1-15 bytes of letters, digits, _.-")
    if nic.interface_type not in ("", "virtio-net", "virtio_net", "virtio"):
        raise InvalidArgument(f"{f}.interface_type", "only virtio-net is supported")
    if nic.mode not in (pb.NETWORK_MODE_UNSPECIFIED, pb.NETWORK_MODE_IPV4_ONLY):
        if nic.mode in (pb.NETWORK_MODE_DUAL_STACK, pb.NETWORK_MODE_IPV6_ONLY):
            raise InvalidArgument(f"{f}.mode", "IPv6 is not supported yet; use IPV4_ONLY")
        raise InvalidArgument(f"{f}.mode", f"unknown network mode {nic.mode}")
    if nic.HasField("ipv6_config") and nic.ipv6_config.ByteSize():
        raise InvalidArgument(f"{f}.ipv6_config", "IPv6 is not supported yet")
    ipv4 = None
    if nic.HasField("ipv4_config"):
        cfg = nic.ipv4_config
        subnet = ipaddress.ip_network(settings.network_vm_subnet_ipv4)
        bridge = ipaddress.ip_interface(settings.network_bridge_ipv4)
        if cfg.dhcp:
            raise InvalidArgument(f"{f}.ipv4_config.dhcp", "DHCP is not offered; addresses are static")
        if cfg.address:
            try:
                ipv4 = str(ipaddress.IPv4Address(cfg.address))
            except ValueError:
                raise InvalidArgument(f"{f}.ipv4_config.address", "is not an IPv4 address") from None
        if cfg.netmask:
            try:
                mask = ipaddress.IPv4Network(f"0.0.0.0/{cfg.netmask}").prefixlen
            except ValueError:
                raise InvalidArgument(f"{f}.ipv4_config.netmask", "is not a netmask") from None
            if mask != subnet.prefixlen:
                raise InvalidArgument(
                    f"{f}.ipv4_config.netmask", f"must be the VM subnet's ({subnet.netmask})"
                )
        if cfg.gateway and cfg.gateway != str(bridge.ip):
            raise InvalidArgument(
                f"{f}.ipv4_config.gateway", f"must be the bridge address {bridge.ip}"
            )
        if len(cfg.dns_servers) > MAX_DNS:
            raise InvalidArgument(f"{f}.ipv4_config.dns_servers", f"at most {MAX_DNS}")
        for i, server in enumerate(cfg.dns_servers):
            try:
                ipaddress.IPv4Address(server)
            except ValueError:
                raise InvalidArgument(
                    f"{f}.ipv4_config.dns_servers[{i}]", "is not an IPv4 address"
                ) from None
    options = []
    for key in sorted(nic.options):
        value = nic.options[key]
        if len(key) > 64 or len(value) > 1024 or _has_control_chars(key + value):
            raise InvalidArgument(f"{f}.options.{key[:64]}", "is too long or has control characters")
        options.append((key, value))
    dns = tuple(nic.ipv4_config.dns_servers) if nic.HasField("ipv4_config") else ()
    if dns:
        options.append(("__dns_servers", ",".join(dns)))
    return NicRequest(
        mac=mac,
        tap=tap,
        ipv4=ipv4,
        rx_rate_limit=_rate(nic.rx_rate_limit, f"{f}.rx_rate_limit")
        if nic.HasField("rx_rate_limit")
        else None,
        tx_rate_limit=_rate(nic.tx_rate_limit, f"{f}.tx_rate_limit")
        if nic.HasField("tx_rate_limit")
        else None,
        options=tuple(options),
    )


def metadata(values: Mapping[str, str], field: str) -> tuple[tuple[str, str], ...]:
    items = dict(values)
    if len(items) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(field, f"at most {MAX_METADATA_ENTRIES} entries")
    for key, value in items.items():
        if not key or len(key) > MAX_METADATA_KEY or _has_control_chars(key):
            raise InvalidArgument(f"{field}.{key[:32]}", "key must be 1-128 printable characters")
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidArgument(f"{field}.{key}", f"value longer than {MAX_METADATA_VALUE}")
        if "\x00" in value:  # SQLite, logs and the guest's command line would cut the value there
            raise InvalidArgument(f"{field}.{key}", "value must not contain NUL characters")
    return tuple(sorted(items.items()))


def vm_config(config: pb.VmConfig, settings: Settings, has_config: bool, limits: BackendLimits) -> VmDraft:
    """Validate a VmConfig and apply defaults (the bundled image); ``limits``: the backend's."""
    if not has_config:
        raise InvalidArgument("config", "is required")
    # --- cpu
    cpu = config.cpu
    if not config.HasField("cpu") or cpu.vcpu_count == 0:
        raise InvalidArgument("config.cpu.vcpu_count", "is required and must be at least 1")
    if not 1 <= cpu.vcpu_count <= limits.max_vcpus:
        raise InvalidArgument("config.cpu.vcpu_count", f"must be between 1 and {limits.max_vcpus} on this host")
    if cpu.max_vcpu_count not in (0, cpu.vcpu_count):
        raise InvalidArgument(
            "config.cpu.max_vcpu_count", "vCPU hotplug is not supported: leave 0 or equal to vcpu_count"
        )
    if cpu.HasField("topology") and cpu.topology.ByteSize():
        t = cpu.topology
        if min(t.sockets, t.cores_per_socket, t.threads_per_core) < 1 or (
            t.sockets * t.cores_per_socket * t.threads_per_core != cpu.vcpu_count
        ):
            raise InvalidArgument(
                "config.cpu.topology",
                "sockets x cores_per_socket x threads_per_core must equal vcpu_count",
            )
        if t.sockets != 1 or t.threads_per_core != 1:
            raise InvalidArgument(
                "config.cpu.topology", "only 1 socket with 1 thread per core is supported"
            )
    _no_map("config.cpu.features", cpu.features, "CPU feature selection is not supported")
    # --- memory
    mem = config.memory
    if not config.HasField("memory") or mem.size_bytes == 0:
        raise InvalidArgument("config.memory.size_bytes", "is required")
    if mem.size_bytes < MIN_MEMORY:
        raise InvalidArgument("config.memory.size_bytes", f"must be at least {MIN_MEMORY >> 20} MiB")
    if mem.size_bytes % (1 << 20):
        raise InvalidArgument("config.memory.size_bytes", "must be a whole number of MiB")
    host_mem = host_memory_bytes()
    if mem.size_bytes > host_mem * settings.host_max_memory_fraction:
        raise InvalidArgument(
            "config.memory.size_bytes", f"exceeds what this host can give ({host_mem >> 20} MiB)"
        )
    if mem.hotplug_enabled:
        raise InvalidArgument("config.memory.hotplug_enabled", "memory hotplug is not supported")
    if mem.max_size_bytes not in (0, mem.size_bytes):
        raise InvalidArgument(
            "config.memory.max_size_bytes", "memory hotplug is not supported: leave 0"
        )
    _no_map("config.memory.backing", mem.backing, "memory backing options are not supported")
    # --- boot
    boot = config.boot
    image = settings.image_dir
    kernel = asset_path(boot.kernel_path or str(image / "vmlinuz"), "config.boot.kernel_path", settings)
    initrd: Path | None
    if boot.initrd_path:
        initrd = asset_path(boot.initrd_path, "config.boot.initrd_path", settings)
    elif not boot.kernel_path:
        initrd = asset_path(str(image / "initramfs.cpio.gz"), "config.boot.initrd_path", settings)
    else:
        initrd = None
    args = boot.kernel_args
    if len(args) > MAX_KERNEL_ARGS:
        raise InvalidArgument("config.boot.kernel_args", f"longer than {MAX_KERNEL_ARGS}")
    if _has_control_chars(args):
        raise InvalidArgument("config.boot.kernel_args", "must not contain control characters")
    if not args:
        default = image / "cmdline"
        args = default.read_text().strip() if default.is_file() else "console=ttyS0"
    _no_map("config.boot.boot_options", boot.boot_options, "boot options are not supported")
    # --- storage
    if len(config.storage) > MAX_DRIVES:
        raise InvalidArgument("config.storage", f"at most {MAX_DRIVES} devices")
    drives: list[Drive] = []
    seen: set[str] = set()
    docker_image = _image_ref(config)
    for i, dev in enumerate(config.storage):
        if "docker_image" in dev.options:
            continue  # the root disk made from a container image (_image_ref checked it)
        f = f"config.storage[{i}]"
        drive_id = dev.id or f"drive{i}"
        if not DEVICE_ID_RE.match(drive_id):
            raise InvalidArgument(f"{f}.id", "must be 1-32 letters, digits, _ or -")
        if drive_id in seen:
            raise InvalidArgument(f"{f}.id", f"duplicate id {drive_id!r}")
        seen.add(drive_id)
        if not dev.path:
            raise InvalidArgument(f"{f}.path", "is required")
        path = asset_path(dev.path, f"{f}.path", settings)
        if dev.interface_type not in ("", "virtio-blk", "virtio_blk", "virtio"):
            raise InvalidArgument(f"{f}.interface_type", "only virtio-blk is supported")
        _no_map(f"{f}.options", dev.options, "drive options are not supported")
        if dev.is_root_device and any(d.is_root for d in drives):
            raise InvalidArgument(f"{f}.is_root_device", "only one root device is allowed")
        drives.append(Drive(drive_id, path, dev.read_only, dev.is_root_device))
    if not config.storage and not boot.kernel_path and not docker_image:
        rootfs = image / "rootfs.ext4"
        if rootfs.is_file():
            # The bundled root filesystem is shared by every VM, hence read-only.
            drives.append(Drive("rootfs", asset_path(str(rootfs), "config.storage", settings), True, True))
    drives.sort(key=lambda d: not d.is_root)  # the root device becomes /dev/vda
    # --- network
    if len(config.network) > 1:
        raise InvalidArgument("config.network", "at most one network interface is supported")
    if config.network and not settings.network_enabled:
        raise InvalidArgument(
            "config.network", "VM networking is disabled on this host (UNKEY_METALD_NETWORK_ENABLED)"
        )
    nic = _nic(config.network[0], settings) if config.network else None
    # --- console
    console = config.console
    enabled = True
    if config.HasField("console"):
        enabled = console.enabled
        if console.output or console.input:
            raise InvalidArgument(
                "config.console.output",
                "console files are chosen by metald (<run_dir>/<vm_id>/console.log)",
            )
        if console.console_type not in ("", "serial"):
            raise InvalidArgument("config.console.console_type", "only serial is supported")
    return VmDraft(
        vcpu_count=cpu.vcpu_count,
        memory_bytes=mem.size_bytes,
        kernel_path=kernel,
        initrd_path=initrd,
        kernel_args=args,
        drives=tuple(drives),
        nic=nic,
        console_enabled=enabled,
        metadata=metadata(config.metadata, "config.metadata"),
        image=docker_image,
    )


def _image_ref(config: pb.VmConfig) -> str:
    """The container image the root disk comes from (docs/images.md), or ""."""
    from metald.images.reference import parse

    found: list[tuple[str, str]] = []
    for i, dev in enumerate(config.storage):
        f = f"config.storage[{i}]"
        if "docker_image" not in dev.options:
            continue
        extra = sorted(set(dev.options) - {"docker_image"})
        if extra:
            raise InvalidArgument(f"{f}.options.{extra[0]}", "unknown drive option (only docker_image is supported)")
        if dev.path:
            raise InvalidArgument(f"{f}.path", "must be empty when options.docker_image is given")
        if dev.read_only:
            raise InvalidArgument(f"{f}.read_only", "an image's root disk is the VM's own writable copy")
        if any(d.is_root_device for j, d in enumerate(config.storage) if j != i):
            raise InvalidArgument(
                f"{f}.options.docker_image", "the image's disk is the root device; another is marked root"
            )
        found.append((f"{f}.options.docker_image", dev.options["docker_image"]))
    if "docker_image" in config.metadata:
        found.append(("config.metadata.docker_image", config.metadata["docker_image"]))
    if not found:
        return ""
    refs = {str(parse(value, field)) for field, value in found}
    if len(refs) > 1:
        raise InvalidArgument(found[-1][0], "names a different image than " + found[0][0])
    return refs.pop()


def shutdown_timeout(value: int) -> int:
    if value < 0 or value > MAX_SHUTDOWN_TIMEOUT:
        raise InvalidArgument("timeout_seconds", f"must be between 0 and {MAX_SHUTDOWN_TIMEOUT}")
    return value or DEFAULT_SHUTDOWN_TIMEOUT


def state_filter(values: list[int]) -> list[int]:
    out = []
    for i, value in enumerate(values):
        if value not in _STATES:
            raise InvalidArgument(f"state_filter[{i}]", f"unknown or unspecified state {value}")
        out.append(value)
    return sorted(set(out))


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size", "must not be negative")
    if value > LIST_MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"must be at most {LIST_MAX_PAGE_SIZE}")
    return value or LIST_DEFAULT_PAGE_SIZE
