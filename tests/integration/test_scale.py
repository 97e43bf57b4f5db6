"""More VM networks than one Linux bridge can hold (1100; a bridge takes at
most 1023 ports), with metald's NetworkManager: made concurrently in batches,
every one checked (namespace, devices, routes, neighbours, nft elements, its
bridge), every one answering real traffic on its address through a fake guest
on its TAP, and everything removed again with nothing left behind.

The scenario runs in a child process in a network and mount namespace of its
own (a nested tests/isolated.sh), so that other network tests running at the
same time in the suite's namespace cannot disturb it (they reset the host's
namespaces and nft ruleset), and it cannot disturb them.

Sizes: METALD_SCALE_VMS (1100), METALD_SCALE_PINGS (all of them).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.test_network_fakeguest import ROOT_ONLY, FakeGuest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [*ROOT_ONLY, pytest.mark.xdist_group("net"), pytest.mark.timeout(600)]

BATCH = 50
GUESTS_AT_ONCE = 100


def test_1100_vm_networks_made_checked_and_removed() -> None:
    env = {k: v for k, v in os.environ.items() if k != "METALD_ISOLATED"}  # a fresh private namespace
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    code = "import asyncio, tests.integration.test_scale as t; asyncio.run(t.scenario())"
    started = time.monotonic()
    proc = subprocess.run([str(ROOT / "tests" / "isolated.sh"), sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=580, check=False)
    assert proc.returncode == 0, f"scenario failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert "scale scenario: ok" in proc.stdout, proc.stdout[-4000:]
    print(proc.stdout, f"({time.monotonic() - started:.1f} s)")


# --- the scenario (runs in the child) -----------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


async def scenario() -> None:
    from metald.config import Settings
    from metald.core.plan import Plan
    from metald.network.manager import NetworkManager
    from metald.store.sqlite import Store

    assert os.environ.get("METALD_ISOLATED") == "1"
    count = int(os.environ.get("METALD_SCALE_VMS", "1100"))
    pings = int(os.environ.get("METALD_SCALE_PINGS", str(count)))
    tmp = Path(tempfile.mkdtemp(prefix="metald-scale-"))
    store = Store(tmp / "metald.db")
    manager = NetworkManager(Settings(data_dir=tmp), store)  # type: ignore[call-arg]
    await manager.setup_host()

    async def up(vm_id: str) -> object:
        alloc = await manager.allocate(vm_id, None)
        await Plan("net", manager.setup_steps(alloc)).run()
        return alloc

    t = time.monotonic()
    allocs: dict[str, object] = {}
    ids = [f"scale-{i:04d}" for i in range(count)]
    for start in range(0, count, BATCH):
        batch = ids[start : start + BATCH]
        for vm_id, alloc in zip(batch, await asyncio.gather(*(up(v) for v in batch)), strict=True):
            allocs[vm_id] = alloc
    log(f"{count} VM networks made in {time.monotonic() - t:.1f} s")

    t = time.monotonic()
    await asyncio.to_thread(check_all, allocs, manager.settings.network_bridge)
    log(f"all {count} checked (namespace, devices, routes, neighbours, nft) in {time.monotonic() - t:.1f} s")
    ports = bridge_ports()
    log(f"bridge ports: {dict(sorted(ports.items()))}")
    per_bridge = manager.settings.network_vms_per_bridge
    extra = len(ports) - 1
    main = ports.pop(manager.settings.network_bridge)
    assert extra >= 1 and all(n <= per_bridge + 1 for n in ports.values()), ports  # + the link to the main one
    assert main <= per_bridge + extra, main  # + a link to each extra one
    ports[manager.settings.network_bridge] = main
    assert sum(ports.values()) == count + 2 * extra  # the VMs, and both ends of each link

    t = time.monotonic()
    sample = random.Random(1).sample(sorted(allocs), min(pings, count))
    for start in range(0, len(sample), GUESTS_AT_ONCE):
        batch = [allocs[v] for v in sample[start : start + GUESTS_AT_ONCE]]
        await asyncio.gather(*(asyncio.to_thread(ping_sample, [a]) for a in batch))
    log(f"{len(sample)} VMs answered UDP on their address through their fake guest in {time.monotonic() - t:.1f} s")

    t = time.monotonic()
    items = list(allocs.items())
    for start in range(0, len(items), 100):
        await asyncio.gather(*(down(manager, v, a) for v, a in items[start : start + 100]))
    log(f"{len(items)} VM networks removed in {time.monotonic() - t:.1f} s")
    assert await manager.settle(60)
    await asyncio.to_thread(assert_nothing_left, store, manager.settings.network_bridge)
    await manager.teardown_host()
    left = [n for n in host_links() if n.startswith(("br-vms", "vbp_", "vbs_"))]
    assert left == [], left
    log("nothing left: namespaces, links, neighbours, nft elements, store allocations")
    print("scale scenario: ok", flush=True)


async def down(manager: object, vm_id: str, alloc: object) -> None:
    await manager.teardown(alloc)  # type: ignore[attr-defined]
    await manager.release(vm_id)  # type: ignore[attr-defined]


def host_links() -> dict[str, object]:
    from metald.network.rtnl import Rtnl

    with Rtnl() as ipr:
        return {link.get_attr("IFLA_IFNAME"): link for link in ipr.get_links()}


def bridge_ports() -> dict[str, int]:
    """Ports per bridge (by name)."""
    links = host_links()
    by_index = {link["index"]: name for name, link in links.items()}  # type: ignore[index]
    ports: dict[str, int] = {}
    for link in links.values():
        master = link.get_attr("IFLA_MASTER")  # type: ignore[attr-defined]
        if master is not None:
            ports[by_index[master]] = ports.get(by_index[master], 0) + 1
    return ports


def check_all(allocs: dict[str, object], bridge: str) -> None:
    from metald.network import bridges, names, netns, nft, rules
    from metald.network.manager import _concat
    from metald.network.rtnl import Rtnl

    links = host_links()
    br = links[bridge]["index"]  # type: ignore[index]
    with Rtnl() as ipr:
        neigh = {n.get_attr("NDA_DST"): n for n in ipr.get_neighbours(family=2, ifindex=br)}
        fdb = {(n["ifindex"], n.get_attr("NDA_LLADDR")) for n in ipr.get_neighbours(family=7)}
    present = set(netns.list_names())
    elements = asyncio.run(nft.list_json("set", "bridge", rules.BRIDGE_TABLE, "vm_src"))
    keys = {tuple(_concat(e)) for o in elements if "set" in o for e in o["set"].get("elem", [])}
    for vm_id, alloc in allocs.items():
        a = alloc
        assert a.namespace in present, vm_id  # type: ignore[attr-defined]
        vh = links.get(a.host_veth)  # type: ignore[attr-defined]
        port_bridge = links[a.bridge]["index"]  # type: ignore[attr-defined, index]
        assert vh is not None and vh.get_attr("IFLA_MASTER") == port_bridge and vh["flags"] & 1, vm_id  # type: ignore[attr-defined]
        trunk = bridges.trunk_port(bridge, a.bridge)  # type: ignore[attr-defined]
        assert trunk is None or (links[trunk]["index"], names.ns_veth_mac(a.short_id)) in fdb, vm_id  # type: ignore[attr-defined, index]
        n = neigh.get(a.ip)  # type: ignore[attr-defined]
        assert n is not None and n["state"] & 0x80, f"{vm_id}: no permanent host neighbour"
        assert n.get_attr("NDA_LLADDR") == names.ns_veth_mac(a.short_id), vm_id  # type: ignore[attr-defined]
        assert (a.host_veth, names.ns_veth_mac(a.short_id), a.ip) in keys, vm_id  # type: ignore[attr-defined]
        with netns.entered(a.namespace), Rtnl() as nipr:  # type: ignore[attr-defined]
            tap = nipr.link("get", ifname=a.tap)[0]  # type: ignore[attr-defined]
            assert tap["flags"] & 1, f"{vm_id}: TAP down"
            routes = {(r.get_attr("RTA_DST"), r.get_attr("RTA_OIF"), r.get_attr("RTA_GATEWAY"))
                      for r in nipr.get_routes(family=2, table=254)}
            vn = nipr.link_lookup(a.ns_veth)[0]  # type: ignore[attr-defined]
            assert (a.ip, tap["index"], None) in routes, f"{vm_id}: no route to the VM via the TAP"  # type: ignore[attr-defined]
            assert (None, vn, a.gateway) in routes, f"{vm_id}: no default route"  # type: ignore[attr-defined]
            inside = {(n.get_attr("NDA_DST"), n["ifindex"]) for n in nipr.get_neighbours(family=2)}
            assert (a.ip, tap["index"]) in inside and (a.gateway, vn) in inside, vm_id  # type: ignore[attr-defined]
    assert len([n for n in present if n.startswith("fc-scale-")]) == len(allocs)


def ping_sample(allocs: list[object]) -> None:
    for a in allocs:
        guest = FakeGuest(a.namespace, a.tap, a.mac, a.ip, a.gateway)  # type: ignore[attr-defined]
        with guest, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            # A persistent TAP has no carrier until someone attaches; the kernel turns
            # it on in its link-watch work, up to a second later: resend meanwhile.
            sock.settimeout(0.25)
            payload = f"hello {a.ip}".encode()  # type: ignore[attr-defined]
            deadline = time.monotonic() + 5
            while True:
                sock.sendto(payload, (a.ip, 7))  # type: ignore[attr-defined]
                try:
                    data, peer = sock.recvfrom(2048)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, f"no answer from {a.ip}"  # type: ignore[attr-defined]
            assert data == payload and peer[0] == a.ip, (data, peer)  # type: ignore[attr-defined]


def assert_nothing_left(store: object, bridge: str) -> None:
    import sqlite3

    from metald.network import netns, nft, rules

    assert [n for n in netns.list_names() if n.startswith("fc-")] == []
    left = [n for n in host_links() if n.startswith(("vh_", "vn_", "tap_"))]
    assert left == [], left[:10]
    links = host_links()
    from metald.network.rtnl import Rtnl

    with Rtnl() as ipr:
        permanent = [n.get_attr("NDA_DST") for n in ipr.get_neighbours(family=2, ifindex=links[bridge]["index"])
                     if n["state"] & 0x80]
    assert permanent == [], permanent[:10]
    for family, kind, name in (("bridge", "set", "vm_src"), ("bridge", "set", "vm_mac"),
                               ("inet", "map", "fwd_tcp"), ("inet", "map", "fwd_udp")):
        objs = asyncio.run(nft.list_json(kind, family, rules.BRIDGE_TABLE, name))
        assert all(not o.get(kind, {}).get("elem") for o in objs), (family, name)
    db = sqlite3.connect(store.path)  # type: ignore[attr-defined]
    for table in ("ip_allocations", "port_allocations", "net_short_ids"):
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table
    db.close()
