"""Settings from ``UNKEY_METALD_*`` variables and an optional env file.

Validated once at start (``load_settings``); an invalid value stops metald with
a message naming the variable. Everything else receives the validated object.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "UNKEY_METALD_"
DEFAULT_ENV_FILE = "/etc/metald/metald.env"


class ConfigError(Exception):
    """A setting is invalid; the message names the variable."""


MAX_BRIDGE_PORTS = 1023  # BR_MAX_PORTS (1024) minus port number 0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", case_sensitive=False
    )

    # --- API -----------------------------------------------------------------
    backend: Literal["auto", "qemu", "firecracker"] = Field(
        "auto", description="VMM backend; auto picks firecracker when usable, else qemu"
    )
    port: int = Field(8080, ge=1, le=65535, description="RPC API port")
    address: str = Field("127.0.0.1", description="RPC API bind address")
    allow_insecure_bind: bool = Field(
        False,
        description="Allow a non-loopback API address while TLS is disabled",
    )
    max_request_bytes: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="Largest accepted request body"
    )
    data_dir: Path = Field(Path("/opt/metald/data"), description="SQLite state directory")
    run_dir: Path = Field(
        Path("/run/metald"), description="Per-VM sockets, console logs and runtime files"
    )
    image_dir: Path = Field(
        Path("/opt/metald/images"),
        description="Bundled guest image (vmlinuz, initramfs.cpio.gz, rootfs.ext4)",
    )
    asset_dirs: str = Field(
        "",
        description="Colon-separated directories VM kernels, initrds and drives may "
        "come from (the image dir is always allowed)",
    )
    # --- container images (docs/images.md) -----------------------------------
    image_cache_dir: Path = Field(
        Path("/opt/metald/data/images"),
        description="Container images converted to root filesystems, by manifest digest",
    )
    image_cache_bytes: int = Field(
        20 << 30,
        ge=0,
        description="Size bound of the image cache; least recently used images no VM uses are evicted",
    )
    image_max_bytes: int = Field(
        4 << 30,
        ge=1 << 20,
        description="Largest container image accepted (compressed layers and unpacked content, each)",
    )
    image_pull_timeout_seconds: float = Field(
        600.0, gt=0, le=86400, description="Pull and conversion of one image must finish within this"
    )
    image_concurrent_pulls: int = Field(2, ge=1, le=64, description="Images pulled and converted at once")
    registry_auth_file: Path | None = Field(
        None, description="Docker-style auth file (config.json / auth.json) with registry credentials"
    )
    insecure_registries: str = Field(
        "", description="Comma-separated host:port registries reached over plain HTTP (no TLS)"
    )
    registry_ca_file: Path | None = Field(
        None, description="Extra CA certificate (PEM) trusted for registries, besides the system CAs"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, le=600, description="How long SIGTERM waits for in-flight requests"
    )
    host_max_memory_fraction: float = Field(
        0.9, gt=0, le=1.0, description="Share of host memory VMs may be given in total"
    )

    # --- QEMU backend --------------------------------------------------------
    qemu_binary: str = Field("qemu-system-x86_64", description="QEMU executable")
    qemu_accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto", description="auto uses KVM only after a test boot succeeds"
    )
    qemu_tcg_tb_size_mib: int = Field(
        16, ge=0, le=4096,
        description="TCG translation buffer per VM in MiB (-accel tcg,tb-size=N); 0: QEMU's default (1 GiB)",
    )
    console_log_max_bytes: int = Field(
        1 << 20, ge=4096, description="Cap of each VM's console log, VMM stderr and Firecracker metrics file"
    )

    # --- Firecracker backend -------------------------------------------------
    firecracker_binary: str = Field(
        "/usr/local/bin/firecracker", description="Firecracker executable"
    )
    firecracker_jailer_binary: str = Field(
        "/usr/local/bin/jailer", description="Firecracker's own jailer executable"
    )
    firecracker_use_own_jailer: bool = Field(False, description="Start Firecracker via its own jailer")

    # --- Network -------------------------------------------------------------
    network_enabled: bool = Field(True, description="Give each VM a namespace, IP and NAT")
    network_bridge: str = Field("br-vms", max_length=15, description="Host bridge name")
    network_bridge_ipv4: str = Field("10.100.0.1/16", description="Bridge address/prefix")
    network_vm_subnet_ipv4: str = Field("10.100.0.0/16", description="Pool VM IPs come from")
    network_vms_per_bridge: int = Field(
        256,
        ge=2,
        le=1022,
        description="VM addresses per bridge: the subnet is cut into blocks of this many addresses; "
        "block 0's VMs are ports of the bridge, block n's of <bridge>-<n>, joined to it by a veth pair "
        "(a Linux bridge holds at most 1023 ports; see docs/scaling.md)",
    )
    network_dns_servers: str = Field(
        "", description="Comma-separated DNS servers handed to guests"
    )
    network_ipv6_enabled: bool = Field(False, description="IPv6 for VMs (not yet supported)")
    network_port_range: str = Field(
        "32768-40959", description="Host ports VM port forwards are allocated from"
    )
    network_allow_vm_to_vm: bool = Field(False, description="Let VMs reach each other")
    network_allow_vm_to_host: bool = Field(
        False, description="Let VMs reach metald's own ports on the host"
    )

    # --- Event and console streams (EventService) ------------------------------
    events_retention_count: int = Field(
        100_000, ge=100, le=100_000_000, description="Events kept in the log; older ones are pruned"
    )
    events_retention_seconds: int = Field(
        7 * 86400, ge=60, description="Events older than this are pruned (whichever limit is hit first)"
    )
    events_subscriber_buffer: int = Field(
        1024,
        ge=16,
        le=1 << 20,
        description="Events queued per stream subscriber; one that falls further behind is cut off "
        "(resource_exhausted) and resumes from its last sequence",
    )
    stream_heartbeat_seconds: float = Field(
        15.0, gt=0, le=3600, description="An idle event or console stream gets a heartbeat this often"
    )
    stream_send_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A stream whose client has not taken a message for this long is closed",
    )

    # --- Jailer --------------------------------------------------------------
    jailer_enabled: bool = Field(True, description="Run each VMM inside metald's jailer")
    jailer_uid: int = Field(1000, ge=0, le=2**31, description="uid the VMM drops to")
    jailer_gid: int = Field(1000, ge=0, le=2**31, description="gid the VMM drops to")
    jailer_chroot_dir: Path = Field(Path("/srv/jailer"), description="Jail root directory")
    jailer_memory_limit: int = Field(
        134217728, ge=0, description="Extra memory (bytes) a VMM may use beyond the guest's"
    )
    jailer_cpu_quota: int = Field(
        100, ge=0, description="Extra CPU percent a VMM may use beyond its vCPUs"
    )
    jailer_cgroup_parent: str = Field(
        "metald",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="cgroup directory (under each controller) holding the VMs' cgroups; leftovers are swept "
        "only there",
    )
    jailer_fd_limit: int = Field(1024, ge=64, le=1 << 20, description="RLIMIT_NOFILE of VMMs")

    # --- Observability -------------------------------------------------------
    otel_enabled: bool = Field(False, description="OpenTelemetry traces and metrics")
    otel_service_name: str = Field("metald", description="Service name in traces")
    otel_endpoint: str = Field("localhost:4318", description="OTLP/HTTP collector")
    otel_sampling_rate: float = Field(1.0, ge=0, le=1, description="Trace sampling ratio")
    otel_prometheus_port: int = Field(9464, ge=1, le=65535, description="/metrics port")
    otel_prometheus_address: str = Field("127.0.0.1", description="/metrics bind address")
    metrics_per_vm_labels: bool = Field(
        False, description="Per-VM labels on metrics (high cardinality)"
    )

    # --- Security ------------------------------------------------------------
    tls_mode: Literal["disabled", "file", "spiffe"] = Field(
        "disabled",
        description="Transport security of the API: disabled (plaintext, loopback), file (mTLS from PEM files) "
        "or spiffe (mTLS with SVIDs from the SPIRE agent). With TLS every connection, /_/health "
        "included, needs a client certificate",
    )
    tls_cert_file: Path | None = Field(
        None, description="file mode: the server certificate chain (PEM); reloaded when it changes"
    )
    tls_key_file: Path | None = Field(
        None, description="file mode: the server private key (PEM); reloaded when it changes"
    )
    tls_ca_file: Path | None = Field(
        None, description="file mode: CA certificates (PEM) client certificates must chain to; reloaded when it changes"
    )
    tls_reload_seconds: float = Field(
        5.0,
        ge=0.05,
        le=3600,
        description="How often file mode checks the certificate files for changes, and spiffe mode that the "
        "Workload API stream (which pushes rotations) is still open",
    )
    spiffe_socket: str = Field(
        "/var/lib/spire/agent/agent.sock",
        description="spiffe mode: the SPIRE agent's Workload API socket (a path or unix:///path)",
    )
    spiffe_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="spiffe mode: how long startup waits for the first SVID before giving up"
    )
    spiffe_trust_domain: str = Field(
        "",
        description="Trust domain client SPIFFE IDs must belong to (file mode: empty accepts any; "
        "spiffe mode: the SVID's, and this must match it if set)",
    )
    spiffe_allowed_ids: str = Field(
        "",
        description="Comma-separated SPIFFE IDs allowed to call the API (an entry ending in /* allows that "
        "path prefix); empty allows every ID of the trust domain",
    )

    # --- Tenancy -------------------------------------------------------------
    operator_ids: str = Field(
        "", description="Comma-separated caller identities (SPIFFE IDs) with the operator role: all VMs"
    )
    customer_map: str = Field(
        "",
        description="Comma-separated IDENTITY=CUSTOMER pairs; otherwise a SPIFFE ID ending in "
        "/customer/<id> belongs to customer <id>",
    )
    dev_caller_header: bool = Field(
        True,
        description="With TLS disabled, take the caller identity from the X-Metald-Caller header "
        "(Authorization: Bearer dev_user_<id> is honoured either way); requests without either act as the "
        "local operator",
    )

    @field_validator("network_bridge_ipv4")
    @classmethod
    def _check_iface(cls, value: str) -> str:
        ipaddress.ip_interface(value)
        return value

    @field_validator("network_vm_subnet_ipv4")
    @classmethod
    def _check_net(cls, value: str) -> str:
        ipaddress.ip_network(value, strict=True)
        return value

    @field_validator("network_port_range")
    @classmethod
    def _check_range(cls, value: str) -> str:
        low, _, high = value.partition("-")
        lo, hi = int(low), int(high)
        if not 1 <= lo <= hi <= 65535:
            raise ValueError("must be LOW-HIGH within 1-65535")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> Settings:
        bridge = ipaddress.ip_interface(self.network_bridge_ipv4)
        subnet = ipaddress.ip_network(self.network_vm_subnet_ipv4)
        if bridge.ip not in subnet:
            raise ValueError(
                "UNKEY_METALD_NETWORK_BRIDGE_IPV4 must lie inside "
                "UNKEY_METALD_NETWORK_VM_SUBNET_IPV4"
            )
        per_bridge = self.network_vms_per_bridge
        blocks = -(-subnet.num_addresses // per_bridge)
        if blocks - 1 + per_bridge > MAX_BRIDGE_PORTS:
            raise ValueError(
                f"UNKEY_METALD_NETWORK_VMS_PER_BRIDGE={per_bridge} cuts UNKEY_METALD_NETWORK_VM_SUBNET_IPV4 into "
                f"{blocks} blocks: the bridge would need {blocks - 1} links to the others plus {per_bridge} VM ports, "
                f"more than a Linux bridge's {MAX_BRIDGE_PORTS}; use a larger value or a smaller subnet"
            )
        last = f"{self.network_bridge}-{blocks - 1}"
        if blocks > 1 and len(last) > 15:
            raise ValueError(
                f"UNKEY_METALD_NETWORK_BRIDGE: {self.network_bridge!r} is too long for the names of the extra "
                f"bridges (up to {last!r}; at most 15 characters)"
            )
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if self.tls_mode == "file":
            missing = [n for n in ("tls_cert_file", "tls_key_file", "tls_ca_file") if getattr(self, n) is None]
            if missing:
                names = ", ".join(ENV_PREFIX + n.upper() for n in missing)
                raise ValueError(f"UNKEY_METALD_TLS_MODE=file needs {names}")
        socket = self.spiffe_socket.removeprefix("unix://")
        if not socket.startswith("/"):
            raise ValueError("UNKEY_METALD_SPIFFE_SOCKET must be an absolute path or unix:///path")
        if self.spiffe_trust_domain and not re.fullmatch(r"[a-z0-9._-]+", self.spiffe_trust_domain):
            raise ValueError("UNKEY_METALD_SPIFFE_TRUST_DOMAIN must be a trust domain name like example.org")
        for entry in self.allowed_spiffe_ids:
            if not entry.startswith("spiffe://"):
                raise ValueError(f"UNKEY_METALD_SPIFFE_ALLOWED_IDS: {entry!r} is not a spiffe:// ID")
        return self

    @property
    def allowed_spiffe_ids(self) -> list[str]:
        return [i.strip() for i in self.spiffe_allowed_ids.split(",") if i.strip()]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "metald.db"

    @property
    def port_range(self) -> tuple[int, int]:
        low, _, high = self.network_port_range.partition("-")
        return int(low), int(high)

    @property
    def insecure_registry_list(self) -> list[str]:
        return [r.strip() for r in self.insecure_registries.split(",") if r.strip()]

    @property
    def allowed_asset_dirs(self) -> list[Path]:
        dirs = [self.image_dir]
        dirs += [Path(p) for p in self.asset_dirs.split(":") if p]
        return dirs


def load_settings(env_file: str | None = None, **overrides: object) -> Settings:
    """Build the settings from the env file then the environment (which wins).

    Raises ConfigError naming the offending ``UNKEY_METALD_*`` variable.
    """
    path = env_file or os.environ.get("METALD_ENV_FILE", DEFAULT_ENV_FILE)
    try:
        return Settings(_env_file=path if Path(path).is_file() else None, **overrides)  # type: ignore[arg-type,call-arg]  # pydantic-settings takes _env_file at run time only
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            var = ENV_PREFIX + name.upper() if name else "configuration"
            problems.append(f"{var}: {err['msg']}")
        raise ConfigError("; ".join(problems)) from None
