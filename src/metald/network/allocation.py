"""Turning a VM id and its NIC request into a NetworkAllocation.

Everything a VM's network needs that must be unique on the host is claimed in
the store here (short id, IPv4 address, host ports); everything else (device
names, MACs, gateway) is derived. Claims made by a failed call are released.
Calling again for a VM that already holds claims returns the same allocation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from metald.config import Settings
from metald.core.errors import InvalidArgument, ResourceExhausted
from metald.core.models import NetworkAllocation, NicRequest, PortForward, RateLimit
from metald.network import names
from metald.network.ipam import Ipv4Pool, normalize_mac
from metald.network.portfwd import PortPool, matches, parse_options
from metald.store.sqlite import AddressTaken, Store

NIC = "config.network[0]"
MIN_BURST = 16 * 1024


def parse_dns(value: str) -> tuple[str, ...]:
    servers = []
    for item in value.split(","):
        item = item.strip()
        if item:
            try:
                servers.append(str(ipaddress.IPv4Address(item)))
            except ValueError:
                raise ValueError(
                    f"UNKEY_METALD_NETWORK_DNS_SERVERS: {item!r} is not an IPv4 address"
                ) from None
    return tuple(servers)


def check_rate_limit(limit: RateLimit | None, field: str) -> RateLimit | None:
    """Validate a rate limit; a zero bandwidth means "no limit" (returns None)."""
    if limit is None:
        return None
    for name in ("bandwidth", "refill_time_ms", "burst"):
        if getattr(limit, name) < 0:
            label = "refill_time" if name == "refill_time_ms" else name
            raise InvalidArgument(f"{field}.{label}", "must not be negative")
    if limit.bandwidth == 0:
        if limit.burst:
            raise InvalidArgument(f"{field}.bandwidth", "must be set when burst is")
        return None
    return limit


class Allocator:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.subnet = ipaddress.IPv4Network(settings.network_vm_subnet_ipv4)
        bridge = ipaddress.IPv4Interface(settings.network_bridge_ipv4)
        self.gateway = str(bridge.ip)
        self.ips = Ipv4Pool(self.subnet, {bridge.ip})
        self.ports = PortPool(*settings.port_range)
        self.dns = parse_dns(settings.network_dns_servers)
        self.main_bridge = settings.network_bridge
        self.vms_per_bridge = settings.network_vms_per_bridge

    def _claim_short_id(self, vm_id: str) -> str:
        held = self.store.short_id_of(vm_id)
        if held is not None:
            return held
        for candidate in names.short_id_candidates(vm_id):
            try:
                self.store.claim_short_id(vm_id, candidate)
            except AddressTaken:
                held = self.store.short_id_of(vm_id)  # a concurrent call for the same VM
                if held is not None:
                    return held
                continue
            return candidate
        raise ResourceExhausted(f"no free device-name id for VM {vm_id}")

    def allocate(self, vm_id: str, nic: NicRequest | None) -> NetworkAllocation:
        """Claim (or find) the VM's short id, IP and host ports; validate the rest."""
        if not names.valid_vm_id(vm_id):
            raise InvalidArgument(
                "vm_id", "must be 1-64 letters, digits or hyphens, not starting with '-'"
            )
        nic = nic or NicRequest()
        forwards = parse_options(nic.options)
        mac = normalize_mac(nic.mac) if nic.mac else names.guest_mac(vm_id)
        rx = check_rate_limit(nic.rx_rate_limit, f"{NIC}.rx_rate_limit")
        tx = check_rate_limit(nic.tx_rate_limit, f"{NIC}.tx_rate_limit")
        if nic.ipv4:
            self.ips.validate(nic.ipv4)

        had_short = self.store.short_id_of(vm_id) is not None
        had_ip = self.store.ip_of(vm_id) is not None
        held_ports = [PortForward(g, h, p) for h, p, g in self.store.ports_of(vm_id)]
        try:
            short = self._claim_short_id(vm_id)
            if nic.tap and nic.tap != names.tap_name(short):
                raise InvalidArgument(
                    f"{NIC}.tap_device",
                    f"TAP names are assigned by metald; leave empty (this VM's is "
                    f"{names.tap_name(short)})",
                )
            ip = self.ips.allocate(self.store, vm_id, nic.ipv4)
            if matches(held_ports, forwards):
                port_forwards = held_ports
            else:
                if held_ports:
                    self.ports.release(self.store, vm_id)
                port_forwards = [self.ports.claim(self.store, vm_id, f) for f in forwards]
        except BaseException:
            if not held_ports:
                self.ports.release(self.store, vm_id)
            if not had_ip:
                self.ips.release(self.store, vm_id)
            if not had_short:
                self.store.release_short_id(vm_id)
            raise
        port_forwards.sort(key=lambda pf: (pf.protocol, pf.host_port))
        return NetworkAllocation(
            short_id=short,
            namespace=names.namespace_name(vm_id),
            host_veth=names.host_veth_name(short),
            ns_veth=names.ns_veth_name(short),
            tap=names.tap_name(short),
            ip=ip,
            prefix_len=self.subnet.prefixlen,
            gateway=self.gateway,
            mac=mac,
            dns_servers=self.dns,
            port_forwards=tuple(port_forwards),
            rx_rate_limit=rx,
            tx_rate_limit=tx,
            bridge=self.bridge_of(ip),
        )

    def bridge_of(self, ip: str) -> str:
        """The bridge a VM with address ``ip`` is a port of (see names.bridge_block)."""
        block = names.bridge_block(ip, int(self.subnet.network_address), self.vms_per_bridge)
        return names.extra_bridge(self.main_bridge, block)

    def release(self, vm_id: str) -> None:
        """Free the VM's IP, host ports and short id in the store."""
        self.ports.release(self.store, vm_id)
        self.ips.release(self.store, vm_id)
        self.store.release_short_id(vm_id)

    def claims(self, vm_id: str) -> Claims:
        return Claims(self.store.short_id_of(vm_id), self.store.ip_of(vm_id), self.store.ports_of(vm_id))

    def reclaim(self, vm_id: str, claims: Claims) -> None:
        """Claim exactly ``claims`` for the VM again (the undo of a release)."""
        if claims.short_id:
            self.store.claim_short_id(vm_id, claims.short_id)
        if claims.ip:
            self.store.claim_ip(vm_id, claims.ip)
        for host_port, protocol, guest_port in claims.ports:
            self.store.claim_port(vm_id, host_port, protocol, guest_port)


@dataclass(frozen=True)
class Claims:
    """What one VM holds in the store."""

    short_id: str | None
    ip: str | None
    ports: list[tuple[int, str, int]]


class ReleaseStep:
    """Release a VM's claims; the undo claims exactly them again."""

    name = "release"

    def __init__(self, allocator: Allocator, vm_id: str) -> None:
        self._allocator = allocator
        self._vm_id = vm_id
        self._held: Claims | None = None

    async def is_done(self) -> bool:
        return False

    async def do(self) -> None:
        self._held = self._allocator.claims(self._vm_id)
        self._allocator.release(self._vm_id)

    async def undo(self) -> None:
        if self._held is not None:
            self._allocator.reclaim(self._vm_id, self._held)


def allocation_to_dict(alloc: NetworkAllocation) -> dict[str, Any]:
    """JSON-able form for the store's ``vms.network`` column."""

    def limit(rl: RateLimit | None) -> dict[str, int] | None:
        if rl is None:
            return None
        return {"bandwidth": rl.bandwidth, "refill_time_ms": rl.refill_time_ms, "burst": rl.burst}

    return {
        "version": 1,
        "short_id": alloc.short_id,
        "namespace": alloc.namespace,
        "host_veth": alloc.host_veth,
        "ns_veth": alloc.ns_veth,
        "tap": alloc.tap,
        "ip": alloc.ip,
        "prefix_len": alloc.prefix_len,
        "gateway": alloc.gateway,
        "mac": alloc.mac,
        "dns_servers": list(alloc.dns_servers),
        "bridge": alloc.bridge,
        "port_forwards": [
            {"guest_port": p.guest_port, "host_port": p.host_port, "protocol": p.protocol}
            for p in alloc.port_forwards
        ],
        "rx_rate_limit": limit(alloc.rx_rate_limit),
        "tx_rate_limit": limit(alloc.tx_rate_limit),
    }


def allocation_from_dict(d: dict[str, Any]) -> NetworkAllocation:
    """Inverse of :func:`allocation_to_dict`; KeyError/ValueError if malformed."""

    def limit(v: dict[str, int] | None) -> RateLimit | None:
        if not v:
            return None
        return RateLimit(int(v["bandwidth"]), int(v.get("refill_time_ms", 0)), int(v["burst"]))

    return NetworkAllocation(
        short_id=d["short_id"],
        namespace=d["namespace"],
        host_veth=d["host_veth"],
        ns_veth=d["ns_veth"],
        tap=d["tap"],
        ip=d["ip"],
        prefix_len=int(d["prefix_len"]),
        gateway=d["gateway"],
        mac=d["mac"],
        dns_servers=tuple(d.get("dns_servers", ())),
        port_forwards=tuple(
            PortForward(int(p["guest_port"]), int(p["host_port"]), p["protocol"])
            for p in d.get("port_forwards", ())
        ),
        rx_rate_limit=limit(d.get("rx_rate_limit")),
        tx_rate_limit=limit(d.get("tx_rate_limit")),
        bridge=d.get("bridge", ""),
    )
