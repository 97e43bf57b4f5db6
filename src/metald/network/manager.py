"""NetworkManager: the network API the lifecycle engine calls."""

from __future__ import annotations

import errno
import logging
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from metald.config import Settings
from metald.core.models import NetworkAllocation, NicRequest
from metald.core.plan import Step
from metald.network import allocation, guest, host, names, netns, nft, rules, steps, vm
from metald.network.reaper import LinkReaper
from metald.network.rtnl import AF_BRIDGE, NTF_MASTER, NUD_NOARP, NUD_PERMANENT
from metald.store.sqlite import Store

log = logging.getLogger(__name__)


class NetworkManager:
    """Host setup, per-VM allocation (store), per-VM devices (steps) and cleanup.

    Per-VM operations touch only that VM's namespace, links, neighbour entry
    and nft elements; only :meth:`sweep_leftovers` lists everything.
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._allocator = allocation.Allocator(settings, store)
        self._batcher = nft.Batcher()
        self._reaper = LinkReaper()

    # --- host ------------------------------------------------------------------
    async def setup_host(self) -> None:
        await host.setup(self.settings)

    async def teardown_host(self) -> None:
        await host.teardown(self.settings)

    async def check(self) -> tuple[bool, str]:
        return await host.check(self.settings)

    # --- store allocations -------------------------------------------------------
    async def allocate(self, vm_id: str, nic: NicRequest | None) -> NetworkAllocation:
        """Claim IP, host ports and device-name id (idempotent per VM)."""
        return self._allocator.allocate(vm_id, nic)

    async def release(self, vm_id: str) -> None:
        self._allocator.release(vm_id)

    # --- devices -----------------------------------------------------------------
    def _vm(
        self, alloc: NetworkAllocation, uid: int | None = None, gid: int | None = None
    ) -> vm.VmNet:
        return vm.VmNet(vm.vm_id_of(alloc), alloc, self.settings.network_bridge, uid, gid)

    def setup_steps(
        self,
        alloc: NetworkAllocation,
        owner_uid: int | None = None,
        owner_gid: int | None = None,
    ) -> list[Step]:
        return steps.steps(self._vm(alloc, owner_uid, owner_gid), self._reaper, self._batcher)

    def reapply_steps(
        self,
        alloc: NetworkAllocation,
        owner_uid: int | None = None,
        owner_gid: int | None = None,
    ) -> list[Step]:
        """The setup steps for an existing VM network: missing parts are made
        again, present ones left alone, and nothing the VM had is undone."""
        return steps.reapply_steps(steps.steps(self._vm(alloc, owner_uid, owner_gid), self._reaper, self._batcher))

    def release_step(self, vm_id: str) -> Step:
        """Release the VM's claims (IP, host ports, device-name id); the undo claims
        exactly them again (DeleteVm's ``release`` step)."""
        return allocation.ReleaseStep(self._allocator, vm_id)

    async def teardown(self, alloc: NetworkAllocation) -> None:
        """Namespace, host neighbour entry and nft elements; the kernel destroys
        the veth pair in the background (see :meth:`settle`)."""
        await steps.teardown(self._vm(alloc), self._reaper, self._batcher)

    async def settle(self, timeout: float = 10.0) -> bool:
        """Wait until the host veths of torn-down VMs are gone (False: ``timeout``
        passed first)."""
        return await self._reaper.settle(timeout)

    async def tap_counters(self, alloc: NetworkAllocation) -> tuple[int, int, int, int]:
        """(rx_bytes, tx_bytes, rx_packets, tx_packets) from the guest's view."""
        return await vm.tap_counters(self._vm(alloc))

    def kernel_ip_arg(self, alloc: NetworkAllocation) -> str:
        return guest.kernel_ip_arg(alloc, vm.vm_id_of(alloc))

    @staticmethod
    def allocation_to_dict(alloc: NetworkAllocation) -> dict[str, Any]:
        return allocation.allocation_to_dict(alloc)

    @staticmethod
    def allocation_from_dict(d: dict[str, Any]) -> NetworkAllocation:
        return allocation.allocation_from_dict(d)

    # --- leftovers ---------------------------------------------------------------
    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        """Remove namespaces, host veths, host neighbour entries and nft elements
        that belong to no known VM; return what was removed."""
        shorts = {s for s, vm_id in self.store.short_ids().items() if vm_id in known_vm_ids}
        ips = {ip for ip, vm_id in self.store.allocated_ips().items() if vm_id in known_vm_ids}
        ports: dict[tuple[int, str], str] = {}
        ip_of = {vm_id: ip for ip, vm_id in self.store.allocated_ips().items()}
        for vm_id in known_vm_ids:
            for host_port, proto, guest_port in self.store.ports_of(vm_id):
                if vm_id in ip_of:
                    ports[(host_port, proto)] = f"{ip_of[vm_id]} . {guest_port}"
        removed = await netns.run(
            None, _sweep_links, self.settings.network_bridge, known_vm_ids, shorts, ips, self._reaper.pending()
        )
        removed += await self._sweep_elements(shorts, ips, ports)
        return removed

    async def _sweep_elements(
        self, shorts: set[str], ips: set[str], ports: dict[tuple[int, str], str]
    ) -> list[str]:
        stale: list[rules.Element] = []
        for set_name in ("vm_src", "vm_mac"):
            for key in await _set_keys("bridge", rules.BRIDGE_TABLE, set_name):
                ifname, rest = key[0], key[1:]
                short = names.short_of_host_veth(ifname)
                ok = short in shorts and (set_name == "vm_mac" or rest[-1] in ips)
                if not ok:
                    text = " . ".join([f'"{ifname}"', *rest])
                    stale.append(rules.Element("bridge", rules.BRIDGE_TABLE, set_name, text))
        for proto, map_name in rules.FWD_MAPS.items():
            for port, value in await _map_items("inet", rules.INET_TABLE, map_name):
                if ports.get((int(port), proto)) != value:
                    stale.append(rules.Element("inet", rules.INET_TABLE, map_name, port, value))
        if stale:
            await steps.remove_elements(stale, self._batcher)
        return [f"nft {e.family} {e.table} {e.set} {{ {e.text()} }}" for e in stale]


def _sweep_links(
    bridge: str, known: set[str], shorts: set[str], ips: set[str], reaping: set[str]
) -> list[str]:
    """``reaping``: host veths of torn-down VMs the reaper already watches."""
    removed = []
    ipr = netns.host_ipr()
    # Listed before namespaces go: removing one also removes its veth pair, later.
    stale_links = []
    links = ipr.get_links()
    for link in links:
        ifname = link.get_attr("IFLA_IFNAME") or ""
        if not ifname.startswith(names.HOST_VETH_PREFIX) or ifname in reaping:
            continue
        alias = link.get_attr("IFLA_IFALIAS") or ""
        owner = alias[len(vm.IFALIAS_PREFIX) :] if alias.startswith(vm.IFALIAS_PREFIX) else None
        if owner not in known and names.short_of_host_veth(ifname) not in shorts:
            stale_links.append((link["index"], ifname))
    for name in netns.list_names():
        vm_id = names.vm_id_of_namespace(name)
        if name.startswith(names.NAMESPACE_PREFIX) and vm_id not in known:
            netns.remove_sync(name)
            removed.append(f"netns {name}")
    for index, ifname in stale_links:
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
        removed.append(f"link {ifname}")
    removed += _sweep_trunk_entries(ipr, links, {names.ns_veth_mac(s) for s in shorts})
    found = ipr.link_lookup(ifname=bridge)
    if found:
        for n in ipr.get_neighbours(family=2, ifindex=found[0]):
            dst = n.get_attr("NDA_DST")
            if n["state"] & NUD_PERMANENT and dst not in ips:
                try:
                    ipr.neigh("del", dst=dst, ifindex=found[0])
                except NetlinkError as exc:
                    if exc.code not in (errno.ENOENT, errno.ESRCH):
                        raise
                removed.append(f"neigh {dst} dev {bridge}")
    return removed


def _sweep_trunk_entries(ipr: Any, links: list[Any], known_macs: set[str]) -> list[str]:
    """Static FDB entries on the main bridge's ports towards extra bridges
    (bridges.py) whose VM is gone."""
    trunks = {
        link["index"]: link.get_attr("IFLA_IFNAME")
        for link in links
        if (link.get_attr("IFLA_IFNAME") or "").startswith(names.TRUNK_MAIN_PREFIX)
    }
    removed: list[str] = []
    if not trunks:
        return removed
    for entry in ipr.get_neighbours(family=AF_BRIDGE):
        mac = entry.get_attr("NDA_LLADDR")
        if entry["ifindex"] in trunks and entry["state"] & NUD_NOARP and mac not in known_macs:
            try:
                ipr.fdb("del", ifindex=entry["ifindex"], lladdr=mac, flags=NTF_MASTER)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ENODEV):
                    raise
            removed.append(f"fdb {mac} dev {trunks[entry['ifindex']]}")
    return removed


def _concat(value: Any) -> list[str]:
    """Parts of an element key/value in ``nft -j`` output."""
    if isinstance(value, dict) and "elem" in value:  # an element with attributes
        value = value["elem"].get("val")
    if isinstance(value, dict) and "concat" in value:
        return [str(x) for x in value["concat"]]
    return [str(value)]


async def _set_keys(family: str, table: str, name: str) -> list[list[str]]:
    try:
        objs = await nft.list_json("set", family, table, name)
    except nft.NftError:
        return []
    return [_concat(e) for o in objs for e in o.get("set", {}).get("elem", [])]


async def _map_items(family: str, table: str, name: str) -> list[tuple[str, str]]:
    try:
        objs = await nft.list_json("map", family, table, name)
    except nft.NftError:
        return []
    out = []
    for o in objs:
        for key, value in o.get("map", {}).get("elem", []):
            out.append((" . ".join(_concat(key)), " . ".join(_concat(value))))
    return out
