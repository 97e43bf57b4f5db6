"""What the guest is told about its network."""

from __future__ import annotations

import ipaddress

from metald.core.models import NetworkAllocation

HOSTNAME_MAX = 63
GUEST_IFACE = "eth0"


def netmask(prefix_len: int) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix_len}").netmask)


def kernel_ip_arg(alloc: NetworkAllocation, hostname: str) -> str:
    """Linux ``ip=`` argument (Documentation/admin-guide/nfs/nfsroot.rst):
    ``ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>``.

    The guest uses the VM IP with the bridge address as gateway; the subnet's
    netmask makes every other VM address "on link", which the namespace answers
    by proxy ARP. At most two DNS servers fit the syntax.
    """
    parts = [
        alloc.ip,
        "",
        alloc.gateway,
        netmask(alloc.prefix_len),
        hostname[:HOSTNAME_MAX],
        GUEST_IFACE,
        "off",
        *alloc.dns_servers[:2],
    ]
    return "ip=" + ":".join(parts)
