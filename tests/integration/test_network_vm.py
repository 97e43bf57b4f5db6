"""One VM's network: the configured state, then real traffic through it with
the test process playing the guest on the TAP (see test_network_fakeguest)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from metald.config import Settings
from metald.core.models import NetworkAllocation, NicRequest, RateLimit
from metald.core.plan import Plan
from metald.network import bridges, names, netns
from metald.network.manager import NetworkManager
from metald.store.sqlite import Store
from tests.integration.test_network_fakeguest import (
    ETH_P_IP,
    ROOT_ONLY,
    FakeGuest,
    Frame,
    all_vm_elements,
    host_links,
    ip_packet,
    mac_bytes,
    namespaces,
    nft_elements,
    permanent_neighbours,
    reset_host,
    run,
    udp_segment,
)

pytestmark = ROOT_ONLY
CLIENT_NS = "client"
HOST_ON_CLIENT_SIDE = "192.0.2.1"
CLIENT_IP = "192.0.2.2"


# "extra bridges": 3 addresses per bridge, so that vm-a (10.100.0.2) is a port
# of br-vms and vm-b (10.100.0.3) of br-vms-1, joined to it by vbp_1/vbs_1.
EXTRA_BRIDGES = {"network_vm_subnet_ipv4": "10.100.0.0/22", "network_vms_per_bridge": 3}


@pytest.fixture(params=["one bridge", "extra bridges"])
def bridge_layout(request: pytest.FixtureRequest) -> dict[str, object]:
    return EXTRA_BRIDGES if request.param == "extra bridges" else {}


@pytest.fixture
async def managers(tmp_path: Path, bridge_layout: dict[str, object]) -> AsyncIterator[NetworkManager]:
    """A manager with each bridge layout."""
    reset_host()
    settings = Settings(data_dir=tmp_path, **bridge_layout)  # type: ignore[call-arg, arg-type]
    m = NetworkManager(settings, Store(tmp_path / "metald.db"))
    await m.setup_host()
    yield m
    assert await m.settle()
    await m.teardown_host()
    assert not [n for n in host_links() if n.startswith(("br-vms-", "vbp_", "vbs_"))]
    reset_host()


async def _up(m: NetworkManager, vm_id: str, nic: NicRequest | None = None,
              uid: int | None = None, gid: int | None = None) -> NetworkAllocation:
    alloc = await m.allocate(vm_id, nic)
    await Plan("net", m.setup_steps(alloc, uid, gid)).run()
    return alloc


def _in_ns(name: str, fn, *args):  # type: ignore[no-untyped-def]
    def call():  # type: ignore[no-untyped-def]
        with netns.entered(name):
            return fn(*args)
    return asyncio.get_running_loop().run_in_executor(None, call)


async def test_configured_state_and_teardown(manager: NetworkManager) -> None:
    nic = NicRequest(
        options=(("port_forwards", "22,33002:7/udp"),),
        rx_rate_limit=RateLimit(1_000_000, 0, 0),
        tx_rate_limit=RateLimit(500_000, 0, 64 * 1024),
    )
    a = await _up(manager, "vm-state", nic, uid=1234, gid=2345)
    s = names.short_id("vm-state")
    assert (a.host_veth, a.ns_veth, a.tap) == (f"vh_{s}", f"vn_{s}", f"tap_{s}")
    assert a.namespace in namespaces()

    vh = run("ip", "-d", "link", "show", a.host_veth)
    assert "master br-vms" in vh and "state UP" in vh and "hairpin on" in vh
    assert "alias metald:vm-state" in vh
    assert run("bridge", "fdb", "show", "dev", a.host_veth).count(names.ns_veth_mac(s)) == 1

    inside = run("ip", "-n", a.namespace, "-d", "link", "show")
    assert names.ns_veth_mac(s) in inside and "user 1234 group 2345" in inside
    assert "persist on" in inside
    assert "inet " not in run("ip", "-n", a.namespace, "-4", "addr", "show")  # no address at all
    routes = run("ip", "-n", a.namespace, "route", "show")
    assert f"default via 10.100.0.1 dev {a.ns_veth}" in routes
    assert f"10.100.0.1 dev {a.ns_veth}" in routes and "scope link" in routes
    assert f"{a.ip} dev {a.tap}" in routes

    sysctls = await _in_ns(a.namespace, lambda: {
        k: netns.read_sysctl(k) for k in (
            f"net/ipv4/conf/{a.ns_veth}/forwarding", f"net/ipv4/conf/{a.tap}/forwarding",
            f"net/ipv4/conf/{a.ns_veth}/proxy_arp", f"net/ipv4/conf/{a.tap}/proxy_arp",
            f"net/ipv4/neigh/{a.ns_veth}/proxy_delay", f"net/ipv4/neigh/{a.tap}/proxy_delay",
            f"net/ipv4/conf/{a.tap}/rp_filter", f"net/ipv4/conf/{a.ns_veth}/rp_filter",
            "net/ipv4/conf/all/rp_filter", "net/ipv6/conf/all/forwarding")
    })
    assert all(sysctls[f"net/ipv4/conf/{d}/{k}"] == "1" for d in (a.ns_veth, a.tap)
               for k in ("forwarding", "proxy_arp", "rp_filter")), sysctls
    assert sysctls[f"net/ipv4/neigh/{a.tap}/proxy_delay"] == "0" == sysctls[f"net/ipv4/neigh/{a.ns_veth}/proxy_delay"]
    assert sysctls["net/ipv4/conf/all/rp_filter"] in ("0", "1") and sysctls["net/ipv6/conf/all/forwarding"] == "0"
    # no IPv6 address on any of the VM's devices
    assert "inet6" not in run("ip", "-n", a.namespace, "addr", "show") + run("ip", "addr", "show", a.host_veth)

    assert any(a.ip in n and names.ns_veth_mac(s) in n for n in permanent_neighbours())
    ns_neigh = run("ip", "-n", a.namespace, "neigh", "show")
    assert f"{a.ip} dev {a.tap} lladdr {a.mac} PERMANENT" in ns_neigh
    assert f"10.100.0.1 dev {a.ns_veth} lladdr {names.bridge_mac('br-vms')} PERMANENT" in ns_neigh

    qdiscs = run("tc", "-n", a.namespace, "qdisc", "show")
    assert "tbf 8" in qdiscs and f"dev {a.tap} root" in qdiscs and "rate 8Mbit" in qdiscs
    assert f"dev {a.ns_veth} root" in qdiscs and "rate 4Mbit" in qdiscs

    assert len(nft_elements("bridge", "metald", "vm_src")) == 1
    tcp = nft_elements("inet", "metald", "fwd_tcp", "map")
    assert len(tcp) == 1 and a.ip in tcp[0]
    assert "33002" in nft_elements("inet", "metald", "fwd_udp", "map")[0]
    assert manager.kernel_ip_arg(a) == f"ip={a.ip}::10.100.0.1:255.255.0.0:vm-state:eth0:off"
    assert await manager.tap_counters(a) == (0, 0, 0, 0)

    # running the plan again touches nothing in the kernel
    performed = await Plan("net", manager.setup_steps(a, 1234, 2345)).run()
    assert performed == ["firewall", "port_forwards"]  # nft adds are idempotent

    await manager.teardown(a)
    assert a.namespace not in namespaces()
    assert await manager.settle() and a.host_veth not in host_links()  # the kernel deletes it
    assert all_vm_elements() == [] and permanent_neighbours() == []
    await manager.teardown(a)  # idempotent
    await manager.release("vm-state")
    assert manager.store.ip_of("vm-state") is None


# --- traffic -------------------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[None]:
    """Another namespace on a routed link to the host, as an outside client."""
    netns.create_sync(CLIENT_NS)
    run("ip", "link", "add", "cl0", "type", "veth", "peer", "name", "cl1", "netns", CLIENT_NS)
    run("ip", "addr", "add", f"{HOST_ON_CLIENT_SIDE}/24", "dev", "cl0")
    run("ip", "link", "set", "cl0", "up")
    run("ip", "-n", CLIENT_NS, "addr", "add", f"{CLIENT_IP}/24", "dev", "cl1")
    run("ip", "-n", CLIENT_NS, "link", "set", "cl1", "up")
    run("ip", "-n", CLIENT_NS, "link", "set", "lo", "up")
    run("ip", "-n", CLIENT_NS, "route", "add", "default", "via", HOST_ON_CLIENT_SIDE)
    yield
    run("ip", "link", "del", "cl0", check=False)
    netns.remove_sync(CLIENT_NS)


def _udp_echo(sock: socket.socket, addr: tuple[str, int], data: bytes) -> bytes | None:
    sock.settimeout(2)
    sock.sendto(data, addr)
    try:
        return sock.recvfrom(2048)[0]
    except TimeoutError:
        return None


def _tcp_connects(sock: socket.socket, addr: tuple[str, int]) -> bool:
    sock.settimeout(2)
    try:
        sock.connect(addr)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _ping(ip: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(2)
        body = struct.pack("!BBHHH", 8, 0, 0, 99, 1) + b"ping"
        from tests.integration.test_network_fakeguest import checksum

        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        s.sendto(body, (ip, 0))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                data, (src, _) = s.recvfrom(2048)
            except TimeoutError:
                return False
            if src == ip and data[20] == 0:
                return True
        return False


def _sock_in(ns: str, kind: int) -> socket.socket:
    def make() -> socket.socket:
        with netns.entered(ns):
            return socket.socket(socket.AF_INET, kind)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(make).result()


def _guest(a: NetworkAllocation) -> FakeGuest:
    return FakeGuest(a.namespace, a.tap, a.mac, a.ip, a.gateway)


async def test_traffic_host_forwards_nat_and_counters(manager: NetworkManager, client: None) -> None:
    a = await _up(manager, "vm-web", NicRequest(options=(("port_forwards", "33001:22,33002:7/udp"),)))
    with _guest(a) as g:
        gw_mac = await asyncio.to_thread(g.resolve_gateway)  # proxy ARP on tap_
        assert gw_mac != names.bridge_mac("br-vms")

        # the host reaches the VM IP directly
        assert await asyncio.to_thread(_ping, a.ip)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            assert await asyncio.to_thread(_udp_echo, s, (a.ip, 7), b"direct") == b"direct"
        assert await asyncio.to_thread(
            _tcp_connects, socket.socket(socket.AF_INET, socket.SOCK_STREAM), (a.ip, 22))

        # forwarded ports: from the host via loopback and via its own addresses
        for host_ip in ("127.0.0.1", "10.100.0.1", HOST_ON_CLIENT_SIDE):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                got = await asyncio.to_thread(_udp_echo, s, (host_ip, 33002), b"fwd")
                assert got == b"fwd", host_ip
            assert await asyncio.to_thread(
                _tcp_connects, socket.socket(socket.AF_INET, socket.SOCK_STREAM), (host_ip, 33001)
            ), host_ip
        # ... and from another namespace (an outside client)
        s = _sock_in(CLIENT_NS, socket.SOCK_DGRAM)
        with s:
            assert await asyncio.to_thread(
                _udp_echo, s, (HOST_ON_CLIENT_SIDE, 33002), b"outside") == b"outside"
        assert await asyncio.to_thread(
            _tcp_connects, _sock_in(CLIENT_NS, socket.SOCK_STREAM), (HOST_ON_CLIENT_SIDE, 33001))
        # an unforwarded port is not reachable from outside
        assert not await asyncio.to_thread(
            _tcp_connects, _sock_in(CLIENT_NS, socket.SOCK_STREAM), (a.ip, 22))

        # the VM reaches the outside, masqueraded behind the host
        listener = _sock_in(CLIENT_NS, socket.SOCK_DGRAM)
        with listener:
            listener.bind((CLIENT_IP, 9999))
            listener.settimeout(2)
            g.send_udp(CLIENT_IP, 4000, 9999, b"out")
            data, (src, _) = await asyncio.to_thread(listener.recvfrom, 2048)
            assert data == b"out" and src == HOST_ON_CLIENT_SIDE
            # a spoofed source address never leaves the namespace (strict rp_filter)
            g.send_udp(CLIENT_IP, 4000, 9999, b"spoofed", src="10.100.77.77")
            listener.settimeout(1)
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(listener.recvfrom, 2048)

        rx, tx, rxp, txp = await manager.tap_counters(a)
        assert rx > 0 and tx > 0 and rxp > 0 and txp > 0
    await manager.teardown(a)


async def test_vm_to_host_ports(manager: NetworkManager) -> None:
    a = await _up(manager, "vm-h")
    api, other = manager.settings.port, 5555
    socks = []
    for port in (api, other):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        s.settimeout(1)
        socks.append(s)
    try:
        with _guest(a) as g:
            g.send_udp("10.100.0.1", 4000, other, b"ok")
            assert (await asyncio.to_thread(socks[1].recvfrom, 100))[0] == b"ok"
            g.send_udp("10.100.0.1", 4000, api, b"api")
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(socks[0].recvfrom, 100)
    finally:
        for s in socks:
            s.close()
    await manager.teardown(a)


async def test_vm_to_vm_isolation_and_exception(manager: NetworkManager, tmp_path: Path) -> None:
    a = await _up(manager, "vm-a")
    b = await _up(manager, "vm-b")
    with _guest(a) as ga, _guest(b) as gb:
        ga.send_ping(b.ip, seq=1)
        assert gb.wait_for(lambda f: f.ip is not None and f.ip[2] == 1, timeout=1) is None
        open_settings = Settings(data_dir=tmp_path, network_allow_vm_to_vm=True)  # type: ignore[call-arg]
        await NetworkManager(open_settings, manager.store).setup_host()
        ga.send_ping(b.ip, seq=2)
        assert gb.wait_for(lambda f: f.ip is not None and f.ip[2] == 1) is not None
        reply = ga.wait_for(lambda f: f.ip is not None and f.ip[0] == b.ip and f.ip[3][:1] == b"\0")
        assert reply is not None
    await manager.setup_host()
    for x in (a, b):
        await manager.teardown(x)


async def test_bridge_anti_spoofing(manager: NetworkManager) -> None:
    """Even a namespace that sends raw frames on vn_ cannot use another
    VM's source IP or another MAC: the bridge drops them."""
    a = await _up(manager, "vm-s")
    vn_mac = names.ns_veth_mac(a.short_id)
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("10.100.0.1", 5556))
    listener.settimeout(1)

    def send(src_ip: str, src_mac: str, data: bytes) -> None:
        with netns.entered(a.namespace):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with raw:
            raw.bind((a.ns_veth, 0))
            frame = (mac_bytes(names.bridge_mac("br-vms")) + mac_bytes(src_mac)
                     + struct.pack("!H", ETH_P_IP)
                     + ip_packet(src_ip, "10.100.0.1", 17, udp_segment(4000, 5556, data)))
            raw.send(frame)

    try:
        await asyncio.to_thread(send, a.ip, vn_mac, b"genuine")
        assert (await asyncio.to_thread(listener.recvfrom, 100))[0] == b"genuine"
        await asyncio.to_thread(send, "10.100.0.200", vn_mac, b"other ip")
        await asyncio.to_thread(send, a.ip, "0a:11:22:33:44:55", b"other mac")
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(listener.recvfrom, 100)
    finally:
        listener.close()
    drops = run("nft", "list", "chain", "bridge", "metald", "from_vm")
    assert "counter packets 0 " not in drops.split("drop")[0].splitlines()[-1]
    await manager.teardown(a)


def _udp_back(g: FakeGuest, sport: int, data: bytes) -> Frame | None:
    return g.wait_for(lambda f: f.ip is not None and f.ip[2] == 17
                      and f.ip[3][2:4] == struct.pack("!H", sport) and f.ip[3][8:] == data,
                      timeout=1.5)


@pytest.mark.parametrize(("br_netfilter", "rp_filter"), [("1", "0"), ("0", "0"), ("1", "1")])
async def test_forwarded_ports_from_the_bridge_side(managers: NetworkManager, br_netfilter: str,
                                                    rp_filter: str) -> None:
    """Each VM using its own or the other VM's forwarded port via the host, and
    a plain namespace on the bridge doing the same; with and without
    br_netfilter (which bridges such DNATed frames instead of routing them),
    and with a strict host-wide rp_filter."""
    netns.write_sysctl("net/bridge/bridge-nf-call-iptables", br_netfilter)
    netns.write_sysctl("net/ipv4/conf/all/rp_filter", rp_filter)
    a = await _up(managers, "vm-a", NicRequest(options=(("port_forwards", "33020:7/udp"),)))
    b = await _up(managers, "vm-b", NicRequest(options=(("port_forwards", "33021:7/udp"),)))
    netns.create_sync("onbridge")
    run("ip", "link", "add", "brc0", "type", "veth", "peer", "name", "brc1", "netns", "onbridge")
    run("ip", "link", "set", "brc0", "master", "br-vms", "up")
    run("ip", "-n", "onbridge", "addr", "add", "10.100.255.254/16", "dev", "brc1")
    run("ip", "-n", "onbridge", "link", "set", "brc1", "up")
    try:
        with _guest(a) as ga, _guest(b) as gb:
            ga.send_udp("10.100.0.1", 4001, 33020, b"self")  # its own port
            assert await asyncio.to_thread(_udp_back, ga, 4001, b"self") is not None
            ga.send_udp("10.100.0.1", 4002, 33021, b"other")  # b's port
            assert await asyncio.to_thread(_udp_back, ga, 4002, b"other") is not None
            assert gb.wait_for(lambda f: f.ip is not None and f.ip[3][8:] == b"other")
            # with extra bridges, b is a port of one; with br_netfilter its packets to a
            # forwarded port are DNATed there: the limits in docs/scaling.md apply
            extra_and_brnf = br_netfilter == "1" and managers.settings.network_vms_per_bridge != 256
            if not extra_and_brnf or rp_filter == "0":
                gb.send_udp("10.100.0.1", 4004, 33020, b"b other")
                assert await asyncio.to_thread(_udp_back, gb, 4004, b"b other") is not None
            if not extra_and_brnf:
                gb.send_udp("10.100.0.1", 4003, 33021, b"b self")
                assert await asyncio.to_thread(_udp_back, gb, 4003, b"b self") is not None
            s = _sock_in("onbridge", socket.SOCK_DGRAM)
            with s:
                assert await asyncio.to_thread(
                    _udp_echo, s, ("10.100.0.1", 33021), b"neighbour") == b"neighbour"
    finally:
        run("ip", "link", "del", "brc0", check=False)
        netns.remove_sync("onbridge")
        netns.write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
        netns.write_sysctl("net/ipv4/conf/all/rp_filter", "0")
    for x in (a, b):
        await managers.teardown(x)


@pytest.mark.parametrize("br_netfilter", ["1", "0"])
async def test_no_frames_between_vm_ports(managers: NetworkManager, br_netfilter: str) -> None:
    """A namespace sending a genuine-looking frame straight to another VM's
    veth MAC (bypassing the router): the bridge does not forward it."""
    netns.write_sysctl("net/bridge/bridge-nf-call-iptables", br_netfilter)
    a = await _up(managers, "vm-a")
    b = await _up(managers, "vm-b")

    def send() -> None:
        with netns.entered(a.namespace):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with raw:
            raw.bind((a.ns_veth, 0))
            raw.send(mac_bytes(names.ns_veth_mac(b.short_id)) + mac_bytes(names.ns_veth_mac(
                a.short_id)) + struct.pack("!H", ETH_P_IP)
                + ip_packet(a.ip, b.ip, 17, udp_segment(4000, 7, b"direct l2")))

    try:
        with _guest(b) as gb:
            await asyncio.to_thread(send)
            assert gb.wait_for(lambda f: f.ip is not None and f.ip[3][8:] == b"direct l2",
                               timeout=1) is None
    finally:
        netns.write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
    if br_netfilter == "0":
        drops = run("nft", "list", "chain", "bridge", "metald", "forward")
        assert any("drop" in line and "counter packets 0 " not in line for line in drops.splitlines()), drops
    for x in (a, b):
        await managers.teardown(x)


async def test_extra_bridges(tmp_path: Path) -> None:
    """VMs spread over bridges by address block: the devices, the links between
    the bridges and their FDB entries, traffic both ways, an unchanged re-run,
    a sweep of a stale entry, and nothing left after the host teardown."""
    reset_host()
    settings = Settings(data_dir=tmp_path, **EXTRA_BRIDGES)  # type: ignore[call-arg, arg-type]
    m = NetworkManager(settings, Store(tmp_path / "metald.db"))
    await m.setup_host()
    a = await _up(m, "vm-a")  # 10.100.0.2: block 0
    b = await _up(m, "vm-b")  # 10.100.0.3: block 1
    c = await _up(m, "vm-c")  # 10.100.0.4: block 1
    d = await _up(m, "vm-d", NicRequest(ipv4="10.100.0.9"))  # block 3
    assert [x.bridge for x in (a, b, c, d)] == ["br-vms", "br-vms-1", "br-vms-1", "br-vms-3"]
    for x in (a, b, c, d):
        assert f"master {x.bridge} " in run("ip", "-o", "link", "show", x.host_veth)
    for block in (1, 3):
        assert "master br-vms " in run("ip", "-o", "link", "show", f"vbp_{block}")
        assert f"master br-vms-{block} " in run("ip", "-o", "link", "show", f"vbs_{block}")
        assert names.bridge_mac("br-vms") in run("bridge", "fdb", "show", "dev", f"vbs_{block}")
        assert "inet" not in run("ip", "addr", "show", f"br-vms-{block}")  # no address, no IPv6
    trunk1 = run("bridge", "fdb", "show", "dev", "vbp_1")
    assert names.ns_veth_mac(b.short_id) in trunk1 and names.ns_veth_mac(c.short_id) in trunk1
    assert not [n for n in host_links() if n in ("br-vms-2", "vbp_2")]  # no VM in block 2

    # the host reaches every VM, and every VM the host, whatever its bridge
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind(("10.100.0.1", 0))
    host.settimeout(2)
    with host:
        for x in (a, b, c, d):
            with _guest(x) as g:
                await asyncio.to_thread(g.resolve_gateway)  # also: the TAP's carrier is up
                assert await asyncio.to_thread(_udp_echo, host, (x.ip, 7), x.ip.encode()) == x.ip.encode()
                g.send_udp("10.100.0.1", 4000, host.getsockname()[1], b"from " + x.ip.encode())
                data, (src, _) = await asyncio.to_thread(host.recvfrom, 2048)
                assert data == b"from " + x.ip.encode() and src == x.ip

    # re-running the plans changes nothing in the kernel, also after a restart's forget()
    bridges.forget()
    for x in (a, b, c, d):
        assert await Plan("net", m.setup_steps(x)).run() == ["firewall"]

    # one VM of block 1 goes: its entry on the main bridge with it; the other stays reachable
    await m.teardown(b)
    await m.release("vm-b")
    assert names.ns_veth_mac(b.short_id) not in run("bridge", "fdb", "show", "dev", "vbp_1")
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with host, _guest(c) as g:
        await asyncio.to_thread(g.resolve_gateway)
        assert await asyncio.to_thread(_udp_echo, host, (c.ip, 7), b"still") == b"still"

    # a stale entry (a VM gone while metald was down) is swept at start
    run("bridge", "fdb", "replace", "0a:de:ad:be:ef:01", "dev", "vbp_1", "master", "static")
    removed = await m.sweep_leftovers({"vm-a", "vm-c", "vm-d"})
    assert removed == ["fdb 0a:de:ad:be:ef:01 dev vbp_1"]
    assert names.ns_veth_mac(c.short_id) in run("bridge", "fdb", "show", "dev", "vbp_1")

    for vm_id, x in (("vm-a", a), ("vm-c", c), ("vm-d", d)):
        await m.teardown(x)
        await m.release(vm_id)
    assert await m.settle()
    await m.teardown_host()
    assert not [n for n in host_links() if n.startswith(("br-vms", "vbp_", "vbs_", "vh_"))]
    reset_host()
