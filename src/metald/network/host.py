"""Host-wide network setup: forwarding, the VM bridge, metald's nft tables.

Every function here is idempotent: it compares what exists with what should
and changes only the difference, so running it at each start is harmless and
re-running it repairs partial damage.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from metald.config import Settings
from metald.core.errors import BackendError
from metald.network import bridges, iptables_view, names, netns, nft, rules

log = logging.getLogger(__name__)

SYSCTL_FILE = Path("/etc/sysctl.d/99-metald.conf")
SYSCTL_CONTENT = (
    "# Written by metald: VM traffic is routed (and NATed) through this host.\n"
    "net.ipv4.ip_forward = 1\n"
)
IFF_UP = 0x1
# Floor of the IPv4 neighbour (ARP) table's garbage-collection thresholds (see
# docs/scaling.md): metald's own per-VM entries are permanent and exempt, but
# the host's dynamic entries (VMs talking to the host and through it) scale
# with the VM count, and the kernel defaults (128/512/1024) are for a desktop.
NEIGH_GC_THRESHOLDS = (("gc_thresh1", 1024), ("gc_thresh2", 4096), ("gc_thresh3", 8192))


def persist_sysctl(path: Path = SYSCTL_FILE, content: str = SYSCTL_CONTENT) -> bool:
    """Write the sysctl.d file if its content differs; True if written."""
    try:
        if path.read_text() == content:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".99-metald.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def _ensure_bridge(settings: Settings) -> None:
    netns.write_sysctl("net/ipv4/ip_forward", "1")
    name = settings.network_bridge
    iface = ipaddress.IPv4Interface(settings.network_bridge_ipv4)
    mac = names.bridge_mac(name)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            ipr.link("add", ifname=name, kind="bridge", address=mac)
            found = ipr.link_lookup(ifname=name)
        idx = found[0]
        link = ipr.get_links(idx)[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind != "bridge":
            raise BackendError(f"{name} exists but is a {kind or 'plain'} device, not a bridge")
        if link.get_attr("IFLA_ADDRESS") != mac:
            ipr.link("set", index=idx, address=mac)
        have = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(index=idx, family=2)
        }
        if (str(iface.ip), iface.network.prefixlen) not in have:
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        if not link["flags"] & IFF_UP:
            ipr.link("set", index=idx, state="up")
    # 127.0.0.1:<forwarded port> from the host is DNATed out of the bridge.
    netns.write_sysctl(f"net/ipv4/conf/{name}/route_localnet", "1")


def in_initial_netns() -> bool:
    """True if this process shares PID 1's network namespace (a host daemon)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def raise_neigh_thresholds(proc_sys: Path = Path("/proc/sys"), only_in_initial_netns: bool = True) -> list[str]:
    """Raise net.ipv4.neigh.default.gc_thresh1/2/3 to at least NEIGH_GC_THRESHOLDS,
    never lowering a value; returns the settings changed ("name=value").

    The thresholds belong to the kernel's one ARP table, shared by every
    network namespace: written from a private namespace (tests, a container)
    they would change the whole machine, so by default this only acts in the
    initial namespace."""
    if only_in_initial_netns and not in_initial_netns():
        return []
    changed = []
    for name, floor in NEIGH_GC_THRESHOLDS:
        path = proc_sys / "net" / "ipv4" / "neigh" / "default" / name
        try:
            current = int(path.read_text().strip())
            if current < floor:
                path.write_text(str(floor))
                changed.append(f"{name}={floor}")
        except (OSError, ValueError) as exc:
            log.warning("cannot raise neighbour table limit", extra={"setting": name, "error": str(exc)})
    return changed


async def setup(settings: Settings) -> None:
    """ip_forward (live and persisted), neighbour table limits, the bridge, and the nft tables."""
    persist_sysctl()
    changed = raise_neigh_thresholds()
    if changed:
        log.info("raised neighbour table limits: %s", ", ".join(changed))
    await netns.run(None, _ensure_bridge, settings)
    bridges.forget()  # extra bridges are checked again when their VMs are
    script = rules.host_ruleset(settings)
    try:
        await nft.run(script)
    except nft.NftError as exc:
        # An incompatible older layout (e.g. a set of another type): start over.
        # Per-VM elements are lost; re-running the VMs' setup steps restores them.
        log.warning("replacing metald's nft tables", extra={"error": str(exc)})
        await nft.run(rules.delete_tables_script() + script)
    await iptables_view.ensure(settings)


def _delete_bridge(name: str) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as exc:
                if exc.code != 19:  # ENODEV
                    raise


async def teardown(settings: Settings) -> None:
    """Remove metald's nft tables and the bridges (for cleanup with no VMs left)."""
    await nft.run(rules.delete_tables_script())
    await iptables_view.remove(settings)
    await netns.run(None, bridges.remove_all, settings.network_bridge)
    await netns.run(None, _delete_bridge, settings.network_bridge)


def _bridge_state(name: str) -> tuple[bool, bool]:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False, False
        return True, bool(ipr.get_links(found[0])[0]["flags"] & IFF_UP)


async def check(settings: Settings) -> tuple[bool, str]:
    """(healthy, detail): bridge present and up, nft tables present, forwarding on."""
    problems = []
    exists, up = await netns.run(None, _bridge_state, settings.network_bridge)
    if not exists:
        problems.append(f"bridge {settings.network_bridge} missing")
    elif not up:
        problems.append(f"bridge {settings.network_bridge} down")
    try:
        tables = {
            (o["table"]["family"], o["table"]["name"])
            for o in await nft.list_json("tables")
            if "table" in o
        }
    except (nft.NftError, OSError) as exc:
        tables = set()
        problems.append(f"nft: {exc}")
    for family in ("inet", "bridge"):
        if (family, rules.INET_TABLE) not in tables:
            problems.append(f"nft table {family} {rules.INET_TABLE} missing")
    if netns.read_sysctl("net/ipv4/ip_forward") != "1":
        problems.append("net.ipv4.ip_forward is off")
    if problems:
        return False, "; ".join(problems)
    return True, f"bridge {settings.network_bridge} up, nft tables present, forwarding on"
