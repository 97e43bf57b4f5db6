"""Plain data the core works with: VM records, boot specs, metrics.

These are independent of the wire format; ``metald.api.convert`` maps them to
and from protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class VmState(enum.IntEnum):
    UNSPECIFIED = 0
    CREATED = 1
    RUNNING = 2
    PAUSED = 3
    SHUTDOWN = 4


@dataclass(frozen=True)
class RateLimit:
    bandwidth: int  # bytes per second
    refill_time_ms: int
    burst: int  # bytes


@dataclass(frozen=True)
class PortForward:
    guest_port: int
    host_port: int
    protocol: str  # "tcp" or "udp"


@dataclass(frozen=True)
class NetworkAllocation:
    """Everything that identifies one VM's network, derivable from its id."""

    short_id: str  # the 8-char id used in device names
    namespace: str  # fc-<vm-id>
    host_veth: str  # vh_<short>
    ns_veth: str  # vn_<short>
    tap: str  # tap_<short>
    ip: str
    prefix_len: int
    gateway: str
    mac: str
    dns_servers: tuple[str, ...] = ()
    port_forwards: tuple[PortForward, ...] = ()
    rx_rate_limit: RateLimit | None = None
    tx_rate_limit: RateLimit | None = None
    bridge: str = ""  # the bridge vh_ is a port of; "" (allocations older than extra bridges): the main one


@dataclass(frozen=True)
class Drive:
    drive_id: str
    path: Path
    read_only: bool
    is_root: bool


@dataclass(frozen=True)
class BootSpec:
    """What a backend needs to start one VM's VMM."""

    vm_id: str
    vcpu_count: int
    memory_bytes: int
    kernel_path: Path
    initrd_path: Path | None
    kernel_args: str
    drives: tuple[Drive, ...]
    network: NetworkAllocation | None
    run_dir: Path  # per-VM directory for sockets, logs, console
    console_log: Path
    console_enabled: bool = True
    extra_files: tuple[Path, ...] = ()  # read-only files the VMM opens by name (a qcow2 backing file)


@dataclass
class VmMetrics:
    """Measured values. ``measured`` is False when the backend could not read them."""

    measured: bool = False
    cpu_usage_percent: float = 0.0
    cpu_seconds: float = 0.0  # VMM process CPU time (user + system), cumulative
    memory_usage_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    net_rx_packets: int = 0
    net_tx_packets: int = 0
    block_read_bytes: int = 0
    block_write_bytes: int = 0
    block_read_ops: int = 0
    block_write_ops: int = 0
    uptime_seconds: int = 0
    notes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NicRequest:
    """The caller's wishes for a VM's one NIC, validated by the API layer.

    ``options`` is NetworkInterface.options verbatim; the network module
    parses the keys it documents (``port_forwards``) and rejects unknown ones.
    """

    mac: str | None = None
    tap: str | None = None
    ipv4: str | None = None
    rx_rate_limit: RateLimit | None = None
    tx_rate_limit: RateLimit | None = None
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class VmDraft:
    """A validated CreateVm request in core terms (paths resolved, defaults applied)."""

    vcpu_count: int
    memory_bytes: int
    kernel_path: Path
    initrd_path: Path | None
    kernel_args: str  # the caller's (or the image's default) args, before metald adds its own
    drives: tuple[Drive, ...]
    nic: NicRequest | None  # None: no NIC requested (network still set up if enabled)
    console_enabled: bool = True
    metadata: tuple[tuple[str, str], ...] = ()
    image: str = ""  # a container image reference: the root disk is made from it (docs/images.md)
    extra_files: tuple[Path, ...] = ()
