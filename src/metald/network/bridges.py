"""Extra bridges, so that no bridge holds more than one block of VMs.

A Linux bridge holds at most 1023 ports, and adding a port or bringing one
up costs the kernel work over all the bridge's ports. The VM subnet is
therefore cut into blocks (``UNKEY_METALD_NETWORK_VMS_PER_BRIDGE`` addresses,
see :func:`metald.network.names.bridge_block`): block 0's VMs are ports of the
main bridge, block n's of ``<main>-<n>``.

``<main>-<n>`` has no address. The veth pair ``vbp_<n>`` (a port of the main
bridge) / ``vbs_<n>`` (a port of ``<main>-<n>``) joins it to the main bridge,
so every VM is on one layer-2 segment with the gateway: the gateway address,
NAT, the host's routes and its neighbour entries stay on the main bridge, and
the nft rules need no change. Static FDB entries keep frames from flooding:
on ``<main>-<n>`` the main bridge's MAC is behind ``vbs_<n>``; on the main
bridge each VM's ``vn_`` MAC is behind its block's ``vbp_<n>`` (added and
removed with the VM's other neighbour entries).

An extra bridge is made when the first VM of its block needs it, checked once
per process, and removed with the host setup (``metald cleanup`` with no VM
left). Everything here runs on namespace-pool threads at home.
"""

from __future__ import annotations

import errno
import threading

from pyroute2.netlink.exceptions import NetlinkError

from metald.core.errors import BackendError
from metald.network import names, netns
from metald.network.rtnl import NTF_MASTER, NUD_NOARP

_lock = threading.Lock()
_checked: set[str] = set()


def forget() -> None:
    """Check every extra bridge again on next use (after the host setup ran)."""
    with _lock:
        _checked.clear()


def trunk_port(main: str, bridge: str) -> str | None:
    """The main bridge's port towards ``bridge`` (None for the main bridge itself)."""
    block = names.block_of_bridge(main, bridge)
    return names.trunk_names(block)[0] if block else None


def _index(ifname: str) -> int:
    idx = netns.ifindex(ifname)
    if idx is None:
        raise BackendError(f"{ifname} vanished after creation")
    return idx


def ensure(main: str, bridge: str) -> None:
    """Make extra bridge ``bridge`` and its link to ``main`` if missing (idempotent)."""
    if bridge == main or bridge in _checked:
        return
    block = names.block_of_bridge(main, bridge)
    if block is None:
        raise BackendError(f"{bridge} is not an extra bridge of {main}")
    with _lock:
        if bridge in _checked:
            return
        ipr = netns.host_ipr()
        main_idx = netns.ifindex(main)
        if main_idx is None:
            raise BackendError(f"bridge {main} missing: host network not set up")
        if netns.ifindex(bridge) is None:
            ipr.link("add", ifname=bridge, kind="bridge", address=names.bridge_mac(bridge))
        idx = _index(bridge)
        netns.disable_host_ipv6(bridge)
        ipr.link("set", index=idx, state="up")
        on_main, on_extra = names.trunk_names(block)
        if netns.ifindex(on_main) is None or netns.ifindex(on_extra) is None:
            for stale in (on_main, on_extra):  # one end of a half-made pair
                _delete(stale)
            ipr.link("add", ifname=on_main, kind="veth", peer={"ifname": on_extra})
        for port, master in ((on_main, main_idx), (on_extra, idx)):
            port_idx = _index(port)
            netns.disable_host_ipv6(port)
            ipr.link("set", index=port_idx, master=master, state="up")
        # frames to the gateway never flood the extra bridge's VM ports
        ipr.fdb("replace", ifindex=_index(on_extra), lladdr=names.bridge_mac(main), state=NUD_NOARP,
                flags=NTF_MASTER)
        _checked.add(bridge)


def _delete(ifname: str) -> bool:
    idx = netns.ifindex(ifname)
    if idx is None:
        return False
    try:
        netns.host_ipr().link("del", index=idx)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise
    return True


def remove_all(main: str) -> list[str]:
    """Delete every extra bridge of ``main`` and the pairs joining them."""
    removed = []
    with _lock:
        for link in netns.host_ipr().get_links():
            ifname = link.get_attr("IFLA_IFNAME") or ""
            extra = names.block_of_bridge(main, ifname) is not None
            if extra or ifname.startswith((names.TRUNK_MAIN_PREFIX, names.TRUNK_EXTRA_PREFIX)):
                if _delete(ifname):
                    removed.append(ifname)
        _checked.clear()
    return removed


def set_vm_entry(main: str, bridge: str, mac: str) -> None:
    """On the main bridge: ``mac`` (a VM's vn_) is behind the port towards ``bridge``."""
    port = trunk_port(main, bridge)
    if port is not None:
        netns.host_ipr().fdb("replace", ifindex=_index(port), lladdr=mac, state=NUD_NOARP, flags=NTF_MASTER)


def has_vm_entry(main: str, bridge: str, mac: str) -> bool:
    port = trunk_port(main, bridge)
    if port is None:
        return True
    idx = netns.ifindex(port)
    if idx is None:
        return False
    try:
        found = netns.host_ipr().fdb("get", ifindex=idx, lladdr=mac, flags=NTF_MASTER)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise
    return any(f["ifindex"] == idx and f["state"] & NUD_NOARP for f in found)


def delete_vm_entry(main: str, bridge: str, mac: str) -> None:
    port = trunk_port(main, bridge)
    idx = netns.ifindex(port) if port is not None else None
    if idx is None:
        return
    try:
        netns.host_ipr().fdb("del", ifindex=idx, lladdr=mac, flags=NTF_MASTER)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ENODEV):
            raise
