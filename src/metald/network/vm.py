"""One VM's network devices: namespace, veth pair, TAP, proxy ARP, routes and
neighbours, each as a check, a do and an undo function (``steps.py`` makes
them plan steps, with the rate limits and the nft elements).

Topology (docs/scaling.md has the extra bridges)::

    host: br-vms 10.100.0.1/16 ── vh_<s> (bridge port)
                                     │ veth
    fc-<vm-id>:                     vn_<s> (no IPv4 address) ─ routing ─ tap_<s>
                                                                           │
    guest: eth0 <VM IP>/16, gateway 10.100.0.1 ────────────────────────────┘

The namespace is a tiny router with no address of its own: forwarding on,
proxy ARP on ``vn_`` and ``tap_``, ``<VM IP>/32 dev tap_``, ``<gw>/32 dev vn_``
(link scope) and ``default via <gw> dev vn_``. (Putting the VM IP on ``vn_``
would make the namespace swallow the VM's traffic.) Permanent neighbour
entries avoid ARP across the bridge, and with it the flooding of every VM
port: the host maps the VM IP to ``vn_``'s MAC (plus a static FDB entry), the
namespace maps the gateway to the bridge's fixed MAC and the VM IP to the
guest's MAC, so the guest must use the allocated MAC. Proxy ARP answers the
guest's own ARP (for its gateway or any address of its subnet) on ``tap_``.

Each step checks the real state in ``is_done`` and is safe to repeat. When the
``netns`` step created the namespace in this run, later steps know that
nothing of theirs can exist inside it yet and skip the check. The nft steps
``create`` their elements and learn from "exists" that a previous run added
them.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from metald.core.errors import BackendError, ResourceExhausted
from metald.core.models import NetworkAllocation
from metald.network import bridges, names, netns, rtnl
from metald.network.rtnl import NTF_MASTER, NUD_NOARP, NUD_PERMANENT, Rtnl

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_UP = 0x1
AF_INET = 2
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
IFALIAS_PREFIX = "metald:"
BRIDGE_MAX_PORTS = 1023  # BR_MAX_PORTS (1024) minus port number 0; adding one more fails with EXFULL


@dataclass
class RunState:
    """What the steps of one plan run learn from each other."""

    fresh_ns: bool = False  # the netns step created the namespace in this run
    # Readiness of every netlink step, checked together in one pool task when a
    # plan starts on an existing namespace; dropped as soon as a step does work.
    ready: dict[str, bool] | None = None


@dataclass(frozen=True)
class VmNet:
    """Everything the per-VM functions need, derived from the allocation."""

    vm_id: str
    alloc: NetworkAllocation
    bridge: str
    owner_uid: int | None = None
    owner_gid: int | None = None
    run: RunState = field(default_factory=RunState, compare=False)

    @property
    def ns(self) -> str:
        return self.alloc.namespace

    @property
    def vn_mac(self) -> str:
        return names.ns_veth_mac(self.alloc.short_id)

    @property
    def bridge_mac(self) -> str:
        """The gateway's MAC: the main bridge's."""
        return names.bridge_mac(self.bridge)

    @property
    def port_bridge(self) -> str:
        """The bridge ``vh_`` is a port of (the main one or an extra one: bridges.py)."""
        return self.alloc.bridge or self.bridge


def vm_id_of(alloc: NetworkAllocation) -> str:
    vm_id = names.vm_id_of_namespace(alloc.namespace)
    if vm_id is None:
        raise ValueError(f"allocation namespace {alloc.namespace!r} is not fc-<vm-id>")
    return vm_id


# --- small netlink helpers (run on the namespace pool) -------------------------


def _ignore(codes: tuple[int, ...], fn: Callable[[], object]) -> None:
    try:
        fn()
    except NetlinkError as exc:
        if exc.code not in codes:
            raise


def get_link(ipr: Rtnl, ifname: str) -> Any | None:
    """The link message for ``ifname`` (one RTM_GETLINK), or None."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def _is_up(link: Any | None) -> bool:
    return link is not None and bool(link["flags"] & IFF_UP)


def _delete_link(ipr: Rtnl, ifname: str) -> bool:
    """Delete ``ifname``; ``ipr`` must belong to the thread's current namespace."""
    idx = netns.ifindex(ifname)
    if idx is None:
        return False
    _ignore((errno.ENODEV,), lambda: ipr.link("del", index=idx))
    return True


# --- netns ----------------------------------------------------------------------
#
# A namespace's IPv4 settings are made per device over netlink (IFLA_INET_CONF,
# the neighbour table's proxy_delay), not through /proc/sys/net: looking that
# directory up costs the kernel time proportional to the number of namespaces
# that ever used it (one "net" dentry each, all with the same name), about
# 1 ms per lookup with 1000 VMs here. Forwarding and rp_filter work per input
# device (rp_filter: the larger of "all" and the device's), so the namespace's
# devices carry them; IPv6 gets no address on them (address generation "none")
# and is not forwarded (a new namespace's IPv6 forwarding is off).

DEVICE_CONF = {rtnl.IPV4_DEVCONF_FORWARDING: 1, rtnl.IPV4_DEVCONF_RP_FILTER: 1}  # strict: only the VM IP enters


def _ns_conf_ready(ipr: Rtnl) -> bool:
    """The namespace's "all" rp_filter lets the devices' strict value apply."""
    return ipr.netconf().get("rp_filter", 0) <= 1


def netns_ready(v: VmNet) -> bool:
    if not netns.exists(v.ns):
        return False
    with netns.entered(v.ns), netns.ns_ipr() as nipr:
        return _ns_conf_ready(nipr)


def netns_create(v: VmNet) -> None:
    v.run.fresh_ns = netns.create_sync(v.ns)
    with netns.entered(v.ns), netns.ns_ipr() as nipr:
        # inherited from the host: loose (2) there would make the devices' strict value moot
        if not _ns_conf_ready(nipr):
            netns.write_sysctl("net/ipv4/conf/all/rp_filter", "1")


def netns_remove(v: VmNet) -> None:
    netns.remove_sync(v.ns)


def _conf_ready(link: Any | None, wanted: dict[int, int]) -> bool:
    conf = link.get_attr("IFLA_INET_CONF") if link is not None else None
    return conf is not None and all(conf.get(key) == value for key, value in wanted.items())


def _configure_device(ipr: Rtnl, ifname: str) -> None:
    """Per-device IPv4 settings and no IPv6 address, then up (the order matters:
    an IPv6 link-local address is made when a device goes up)."""
    idx = netns.ifindex(ifname)
    if idx is None:
        raise BackendError(f"{ifname} vanished after creation")
    ipr.link("set", index=idx, inet_conf=DEVICE_CONF, inet6_addr_gen_mode=rtnl.IN6_ADDR_GEN_MODE_NONE)
    netns.set_up(ifname)


# --- veth ------------------------------------------------------------------------


def veth_ready(v: VmNet) -> bool:
    if v.run.fresh_ns or not netns.exists(v.ns):
        return False
    a = v.alloc
    ipr = netns.host_ipr()
    bridges.ensure(v.bridge, v.port_bridge)  # once per process: the extra bridge and its link
    vh, br = get_link(ipr, a.host_veth), netns.ifindex(v.port_bridge)
    if vh is None or br is None or vh.get_attr("IFLA_MASTER") != br or not _is_up(vh):
        return False
    with netns.entered(v.ns), netns.ns_ipr() as nipr:
        vn = get_link(nipr, a.ns_veth)
        if vn is None or not _is_up(vn):
            return False
        return bool(vn.get_attr("IFLA_ADDRESS") == v.vn_mac) and _conf_ready(vn, DEVICE_CONF)


def veth_create(v: VmNet) -> None:
    a = v.alloc
    ipr = netns.host_ipr()
    bridges.ensure(v.bridge, v.port_bridge)
    br = netns.ifindex(v.port_bridge)
    if br is None:
        raise BackendError(f"bridge {v.port_bridge} missing: host network not set up")
    _delete_link(ipr, a.host_veth)  # a half-made leftover
    nsfd = os.open(netns.path_of(v.ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        ipr.link(
            "add",
            ifname=a.host_veth,
            kind="veth",
            master=br,
            peer={"ifname": a.ns_veth, "net_ns_fd": nsfd, "address": v.vn_mac},
        )
    except NetlinkError as exc:
        if exc.code == errno.EXFULL:  # the kernel made no device: nothing to undo here
            raise ResourceExhausted(
                f"bridge {v.port_bridge} is full: a Linux bridge holds at most {BRIDGE_MAX_PORTS} ports "
                "(lower UNKEY_METALD_NETWORK_VMS_PER_BRIDGE)"
            ) from None
        raise
    finally:
        os.close(nsfd)
    idx = netns.ifindex(a.host_veth)
    if idx is None:
        raise BackendError(f"{a.host_veth} vanished after creation")
    netns.disable_host_ipv6(a.host_veth)  # before it goes up: no IPv6 link-local address
    # hairpin: with br_netfilter, a VM's connection to its own forwarded port
    # is DNATed and bridged back out of its port (port-to-port: rules.py)
    ipr.brport(
        "set", index=idx, mode=1, ifalias=IFALIAS_PREFIX + v.vm_id, flags=IFF_UP, change=IFF_UP
    )
    with netns.entered(v.ns), netns.ns_ipr() as nipr:
        _configure_device(nipr, a.ns_veth)


# --- tap -------------------------------------------------------------------------


def tap_ready(v: VmNet) -> bool:
    if v.run.fresh_ns or not netns.exists(v.ns):
        return False
    with netns.entered(v.ns), netns.ns_ipr() as ipr:
        tap = get_link(ipr, v.alloc.tap)
        if tap is None or not _is_up(tap) or not _conf_ready(tap, DEVICE_CONF):
            return False
        info = tap.get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA") if info else None
        if data is None:
            return True
        if v.owner_uid is not None and data.get_attr("IFLA_TUN_OWNER") != v.owner_uid:
            return False
        if v.owner_gid is not None and data.get_attr("IFLA_TUN_GROUP") != v.owner_gid:
            return False
        return True


def make_tap(name: str, uid: int | None, gid: int | None) -> None:
    """Create a persistent TAP in the calling thread's namespace, owned by
    uid/gid so that an unprivileged VMM can attach to it."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
        if uid is not None:
            fcntl.ioctl(fd, TUNSETOWNER, uid)
        if gid is not None:
            fcntl.ioctl(fd, TUNSETGROUP, gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def tap_create(v: VmNet) -> None:
    with netns.entered(v.ns), netns.ns_ipr() as ipr:
        if not v.run.fresh_ns and netns.ifindex(v.alloc.tap) is not None:
            _delete_link(ipr, v.alloc.tap)
        make_tap(v.alloc.tap, v.owner_uid, v.owner_gid)
        _configure_device(ipr, v.alloc.tap)


def tap_delete(v: VmNet) -> None:
    if not netns.exists(v.ns):
        return
    with netns.entered(v.ns), netns.ns_ipr() as ipr:
        _delete_link(ipr, v.alloc.tap)


# --- proxy ARP -------------------------------------------------------------------

PROXY_ON = {rtnl.IPV4_DEVCONF_PROXY_ARP: 1}


def _proxy_devices(v: VmNet) -> tuple[str, str]:
    return (v.alloc.ns_veth, v.alloc.tap)


def proxy_ready(v: VmNet) -> bool:
    if v.run.fresh_ns or not netns.exists(v.ns):
        return False
    with netns.entered(v.ns), netns.ns_ipr() as ipr:
        # proxy_delay is set before proxy_arp: proxy_arp on means both are
        return all(_conf_ready(get_link(ipr, dev), PROXY_ON) for dev in _proxy_devices(v))


def _proxy_set(v: VmNet, on: bool) -> None:
    with netns.entered(v.ns), netns.ns_ipr() as ipr:
        for dev in _proxy_devices(v):
            idx = netns.ifindex(dev)
            if idx is None:
                if on:
                    raise BackendError(f"{dev} missing in {v.ns}")
                continue
            if on:
                ipr.set_proxy_delay(idx, 0)  # answer the guest's ARP at once
            ipr.link("set", index=idx, inet_conf={rtnl.IPV4_DEVCONF_PROXY_ARP: int(on)})


def proxy_on(v: VmNet) -> None:
    _proxy_set(v, True)


def proxy_off(v: VmNet) -> None:
    if netns.exists(v.ns):
        _proxy_set(v, False)


# --- routes ----------------------------------------------------------------------


def _wanted_routes(v: VmNet) -> list[dict[str, Any]]:
    a = v.alloc
    return [
        {"dst": f"{a.gateway}/32", "dev": a.ns_veth, "scope": RT_SCOPE_LINK},
        {"dst": "default", "dev": a.ns_veth, "gateway": a.gateway},
        {"dst": f"{a.ip}/32", "dev": a.tap, "scope": RT_SCOPE_LINK},
    ]


def routes_ready(v: VmNet) -> bool:
    if v.run.fresh_ns or not netns.exists(v.ns):
        return False
    with netns.entered(v.ns), netns.ns_ipr() as ipr:
        idx = {dev: netns.ifindex(dev) for dev in (v.alloc.ns_veth, v.alloc.tap)}
        have = set()
        for r in ipr.get_routes(family=AF_INET, table=RT_TABLE_MAIN):
            dst = r.get_attr("RTA_DST")
            dst = f"{dst}/{r['dst_len']}" if dst else "default"
            have.add((dst, r.get_attr("RTA_OIF"), r.get_attr("RTA_GATEWAY")))
        return all(
            (w["dst"], idx[w["dev"]], w.get("gateway")) in have for w in _wanted_routes(v)
        )


def routes_set(v: VmNet) -> None:
    with netns.entered(v.ns), netns.ns_ipr() as ipr:
        for w in _wanted_routes(v):
            spec = dict(w)
            oif = netns.ifindex(spec.pop("dev"))
            if oif is None:
                raise BackendError(f"{w['dev']} missing in {v.ns}")
            ipr.route("replace", oif=oif, table=RT_TABLE_MAIN, **spec)


def routes_delete(v: VmNet) -> None:
    if not netns.exists(v.ns):
        return
    with netns.entered(v.ns), netns.ns_ipr() as ipr:
        for w in reversed(_wanted_routes(v)):
            spec = dict(w)
            oif = netns.ifindex(spec.pop("dev"))
            spec.pop("scope", None)
            if oif is not None:
                _ignore((errno.ESRCH, errno.ENOENT, errno.ENODEV), functools.partial(ipr.route, "del", oif=oif, **spec))


# --- neighbours ----------------------------------------------------------------


def _has_neigh(ipr: Rtnl, ifindex: int | None, ip: str, mac: str) -> bool:
    if ifindex is None:
        return False
    try:
        found = ipr.neigh("get", dst=ip, ifindex=ifindex)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ESRCH):
            return False
        raise
    return any(
        n.get_attr("NDA_LLADDR") == mac and bool(n["state"] & NUD_PERMANENT) for n in found
    )


def neigh_ready(v: VmNet) -> bool:
    if v.run.fresh_ns or not netns.exists(v.ns):
        return False
    a = v.alloc
    ipr = netns.host_ipr()
    if not _has_neigh(ipr, netns.ifindex(v.bridge), a.ip, v.vn_mac):
        return False
    if not bridges.has_vm_entry(v.bridge, v.port_bridge, v.vn_mac):
        return False
    with netns.entered(v.ns), netns.ns_ipr() as nipr:
        return _has_neigh(nipr, netns.ifindex(a.tap), a.ip, a.mac) and _has_neigh(
            nipr, netns.ifindex(a.ns_veth), a.gateway, v.bridge_mac
        )


def neigh_set(v: VmNet) -> None:
    a = v.alloc
    ipr = netns.host_ipr()
    br, vh = netns.ifindex(v.bridge), netns.ifindex(a.host_veth)
    if br is None or vh is None:
        raise BackendError(f"{v.bridge} or {a.host_veth} missing")
    ipr.neigh("replace", dst=a.ip, lladdr=v.vn_mac, ifindex=br, state=NUD_PERMANENT)
    # static FDB entry: frames for this VM never flood to the other VM ports
    ipr.fdb("replace", ifindex=vh, lladdr=v.vn_mac, state=NUD_NOARP, flags=NTF_MASTER)
    bridges.set_vm_entry(v.bridge, v.port_bridge, v.vn_mac)  # the same on the main bridge, if not on it
    with netns.entered(v.ns), netns.ns_ipr() as nipr:
        tap, vn = netns.ifindex(a.tap), netns.ifindex(a.ns_veth)
        if tap is None or vn is None:
            raise BackendError(f"{a.tap} or {a.ns_veth} missing in {v.ns}")
        nipr.neigh("replace", dst=a.ip, lladdr=a.mac, ifindex=tap, state=NUD_PERMANENT)
        nipr.neigh("replace", dst=a.gateway, lladdr=v.bridge_mac, ifindex=vn, state=NUD_PERMANENT)


def delete_host_neigh(ipr: Rtnl, bridge: str, ip: str, mac: str) -> bool:
    """Remove the host's permanent entry for ``ip`` if it still points at ``mac``."""
    br = netns.ifindex(bridge)
    if br is None or not _has_neigh(ipr, br, ip, mac):
        return False
    _ignore((errno.ENOENT, errno.ESRCH), lambda: ipr.neigh("del", dst=ip, ifindex=br))
    return True


def neigh_delete(v: VmNet) -> None:
    # the namespace's entries and the FDB entry on vh_ go with their devices
    delete_host_neigh(netns.host_ipr(), v.bridge, v.alloc.ip, v.vn_mac)
    bridges.delete_vm_entry(v.bridge, v.port_bridge, v.vn_mac)


# --- counters ---------------------------------------------------------------------


def _tap_counters(v: VmNet) -> tuple[int, int, int, int]:
    with netns.entered(v.ns), netns.ns_ipr() as ipr:
        tap = get_link(ipr, v.alloc.tap)
        if tap is None:
            raise BackendError(f"{v.alloc.tap} missing in {v.ns}")
        s = tap.get_attr("IFLA_STATS64") or tap.get_attr("IFLA_STATS")
    # The TAP's transmit is what the guest receives, and the reverse.
    return s["tx_bytes"], s["rx_bytes"], s["tx_packets"], s["rx_packets"]


async def tap_counters(v: VmNet) -> tuple[int, int, int, int]:
    try:
        return await netns.run(None, _tap_counters, v)
    except netns.NamespaceMissing:
        raise BackendError(f"network namespace {v.ns} missing") from None
