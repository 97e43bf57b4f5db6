"""metald's nftables rules, as ``nft -f`` text.

Two tables belong to metald and nothing else touches them:

``inet metald``
    NAT and filtering at layer 3 on the host: masquerade for the VM subnet
    leaving through any interface but the bridge; DNAT of forwarded host ports
    (maps ``fwd_tcp``/``fwd_udp``: host port -> VM IP . guest port) for traffic
    arriving on the host and for the host's own connections (``output``, also
    via 127.0.0.1, hence ``route_localnet`` on the bridge and the masquerade of
    127/8 towards it); forwarding: replies and published ports in, VM traffic
    out, VM->VM dropped unless allowed; input: VMs may not reach metald's own
    ports unless allowed.

``bridge metald``
    Anti-spoofing on the bridge ports: a frame entering from ``vh_<short>``
    must carry that VM's namespace-veth MAC and (IPv4 or ARP) the VM's IP. The
    allowed pairs are set elements (``vm_src``, ``vm_mac``), so adding or
    removing a VM adds or removes two elements and no rule changes.
    Isolation at layer 2: no frame is bridged from one VM port to another
    (instead of kernel port isolation, which would also block the one case
    that needs it, see the forward chain).

Per-VM state lives only in set/map elements; the rules are fixed for given
settings. Host setup re-applies the rules in one transaction that keeps the
elements (``add`` of an existing set is a no-op, chains are flushed and
refilled), so running it again changes nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from metald.config import Settings
from metald.core.models import NetworkAllocation
from metald.network import names

INET_TABLE = "metald"
BRIDGE_TABLE = "metald"
# Packet mark bit (ORed in) of packets from the bridge to a host address; lets
# the bridge forward chain recognise DNATed frames (see there).
TO_HOST_MARK = 0x00100000
FWD_MAPS = {"tcp": "fwd_tcp", "udp": "fwd_udp"}

_SETS = """\
add table inet metald
add map inet metald fwd_tcp { type inet_service : ipv4_addr . inet_service; }
add map inet metald fwd_udp { type inet_service : ipv4_addr . inet_service; }
add chain inet metald pre_filter { type filter hook prerouting priority raw; policy accept; }
add chain inet metald pre_nat { type nat hook prerouting priority dstnat; policy accept; }
add chain inet metald out_nat { type nat hook output priority -100; policy accept; }
add chain inet metald post_nat { type nat hook postrouting priority srcnat; policy accept; }
add chain inet metald input { type filter hook input priority filter; policy accept; }
add chain inet metald forward { type filter hook forward priority filter; policy accept; }
add table bridge metald
add set bridge metald vm_src { type ifname . ether_addr . ipv4_addr; }
add set bridge metald vm_mac { type ifname . ether_addr; }
add chain bridge metald prerouting { type filter hook prerouting priority filter; policy accept; }
add chain bridge metald forward { type filter hook forward priority filter; policy accept; }
add chain bridge metald from_vm
"""

_CHAINS = (
    ("inet", "pre_filter"),
    ("inet", "pre_nat"),
    ("inet", "out_nat"),
    ("inet", "post_nat"),
    ("inet", "input"),
    ("inet", "forward"),
    ("bridge", "prerouting"),
    ("bridge", "forward"),
    ("bridge", "from_vm"),
)


def _q(name: str) -> str:
    return '"' + name.replace('"', "") + '"'


def host_ruleset(settings: Settings) -> str:
    """The whole host transaction (tables, sets, chains, rules); idempotent."""
    br = _q(settings.network_bridge)
    subnet = str(ipaddress.ip_network(settings.network_vm_subnet_ipv4))
    ports = sorted({settings.port, settings.otel_prometheus_port})
    port_set = "{ " + ", ".join(str(p) for p in ports) + " }"
    lines = [_SETS]
    lines += [f"flush chain {fam} metald {chain}" for fam, chain in _CHAINS]

    def rule(family: str, chain: str, text: str) -> None:
        lines.append(f"add rule {family} metald {chain} {text}")

    # A VM must not use the host's loopback (route_localnet is on for the bridge).
    rule("inet", "pre_filter", f"iifname {br} ip daddr 127.0.0.0/8 counter drop")
    rule("inet", "pre_filter", f"iifname {br} fib daddr type local "
         f"meta mark set meta mark | {TO_HOST_MARK:#010x}")
    for proto, mapname in FWD_MAPS.items():
        rule("inet", "pre_nat", f"fib daddr type local dnat ip to {proto} dport map @{mapname}")
        rule("inet", "out_nat", f"fib daddr type local dnat ip to {proto} dport map @{mapname}")
    # Host-originated (127/8) and VM-originated (hairpin) connections to a
    # forwarded port leave through the bridge with the bridge's address.
    rule(
        "inet",
        "post_nat",
        f"oifname {br} ct status dnat ip saddr {{ 127.0.0.0/8, {subnet} }} masquerade",
    )
    # (with br_netfilter, frames bridged on an extra bridge pass here too, out of that bridge)
    extra = _q(settings.network_bridge + "-*")
    rule("inet", "post_nat", f"oifname != {br} oifname != {extra} ip saddr {subnet} masquerade")
    rule("inet", "input", f"iifname {br} ct state established,related accept")
    if not settings.network_allow_vm_to_host:
        rule("inet", "input", f"iifname {br} meta l4proto {{ tcp, udp }} th dport {port_set} "
             "counter drop")
    rule("inet", "forward", f"iifname {br} ct state established,related accept")
    rule("inet", "forward", f"oifname {br} ct state established,related accept")
    rule("inet", "forward", f"oifname {br} ct status dnat accept")
    if not settings.network_allow_vm_to_vm:
        rule("inet", "forward", f"iifname {br} oifname {br} counter drop")
    rule("inet", "forward", f"iifname {br} ip saddr {subnet} accept")
    rule("inet", "forward", f"iifname {br} counter drop")
    rule("inet", "forward", f"oifname {br} counter drop")

    vh = f'"{names.HOST_VETH_PREFIX}*"'
    vbp = f'"{names.TRUNK_MAIN_PREFIX}*"'
    rule("bridge", "prerouting", f"iifname {vh} jump from_vm")
    # No frame goes from one VM port to another, nor, on the main bridge, to or
    # from the links to the extra bridges (bridges.py): the namespaces always
    # talk to the gateway MAC, so VM->VM traffic is routed and filtered above...
    # except when br_netfilter is active: a frame addressed to a host address
    # and DNATed to a VM (a forwarded port, used from a VM) is then bridged
    # rather than routed. Those frames carry TO_HOST_MARK.
    for src in (vh, vbp):
        for dst in (vh, vbp):
            rule("bridge", "forward", f"iifname {src} oifname {dst} meta mark & {TO_HOST_MARK:#010x} "
                 f"== {TO_HOST_MARK:#010x} accept")
            rule("bridge", "forward", f"iifname {src} oifname {dst} counter drop")
    rule("bridge", "from_vm", "ether type ip iifname . ether saddr . ip saddr @vm_src accept")
    rule(
        "bridge",
        "from_vm",
        "ether type arp iifname . ether saddr . arp saddr ip @vm_src "
        "iifname . arp saddr ether . arp saddr ip @vm_src accept",
    )
    # ARP probes (sender 0.0.0.0) from the namespace, which has no address.
    rule(
        "bridge",
        "from_vm",
        "ether type arp arp saddr ip 0.0.0.0 iifname . ether saddr @vm_mac "
        "iifname . arp saddr ether @vm_mac accept",
    )
    rule("bridge", "from_vm", "counter drop")
    return "\n".join(lines) + "\n"


def delete_tables_script() -> str:
    """Remove both tables; ``add`` first so that it succeeds when absent."""
    return (
        "add table inet metald\ndelete table inet metald\n"
        "add table bridge metald\ndelete table bridge metald\n"
    )


@dataclass(frozen=True)
class Element:
    """One set/map element: ``key`` alone identifies it, ``value`` for maps."""

    family: str
    table: str
    set: str
    key: str
    value: str | None = None

    def text(self) -> str:
        return self.key if self.value is None else f"{self.key} : {self.value}"

    def add(self) -> str:
        return f"add element {self.family} {self.table} {self.set} {{ {self.text()} }}\n"

    def create(self) -> str:
        return f"create element {self.family} {self.table} {self.set} {{ {self.text()} }}\n"

    def delete(self) -> str:
        return f"delete element {self.family} {self.table} {self.set} {{ {self.text()} }}\n"


def firewall_elements(alloc: NetworkAllocation) -> list[Element]:
    """Anti-spoofing elements of one VM."""
    mac = names.ns_veth_mac(alloc.short_id)
    port = _q(alloc.host_veth)
    return [
        Element("bridge", BRIDGE_TABLE, "vm_src", f"{port} . {mac} . {alloc.ip}"),
        Element("bridge", BRIDGE_TABLE, "vm_mac", f"{port} . {mac}"),
    ]


def forward_elements(alloc: NetworkAllocation) -> list[Element]:
    """DNAT map elements of one VM's port forwards."""
    return [
        Element(
            "inet",
            INET_TABLE,
            FWD_MAPS[pf.protocol],
            str(pf.host_port),
            f"{alloc.ip} . {pf.guest_port}",
        )
        for pf in alloc.port_forwards
    ]


def create_script(elements: Iterable[Element]) -> str:
    """Add elements, failing if any exists already (to learn who added them)."""
    return "".join(e.create() for e in elements)


def add_script(elements: Iterable[Element]) -> str:
    return "".join(e.add() for e in elements)


def remove_script(elements: Iterable[Element]) -> str:
    """Delete elements whether or not they exist: add (a no-op if present) then delete."""
    return "".join(e.add() + e.delete() for e in elements)
