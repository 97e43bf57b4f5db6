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
from metald.network import names, netns
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


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[NetworkManager]:
    reset_host()
    m = NetworkManager(Settings(data_dir=tmp_path), Store(tmp_path / "metald.db"))  # type: ignore[call-arg]
    await m.setup_host()
    yield m
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
            "net/ipv4/ip_forward", f"net/ipv4/conf/{a.ns_veth}/proxy_arp",
            f"net/ipv4/conf/{a.tap}/proxy_arp", f"net/ipv4/neigh/{a.tap}/proxy_delay",
            f"net/ipv4/conf/{a.tap}/rp_filter")
    })
    assert set(sysctls.values()) <= {"1", "0"} and sysctls["net/ipv4/ip_forward"] == "1"
    assert sysctls[f"net/ipv4/conf/{a.tap}/proxy_arp"] == "1"
    assert sysctls[f"net/ipv4/neigh/{a.tap}/proxy_delay"] == "0"

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
    assert a.namespace not in namespaces() and a.host_veth not in host_links()
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


@pytest.mark.parametrize("br_netfilter", ["1", "0"])
async def test_forwarded_ports_from_the_bridge_side(manager: NetworkManager, br_netfilter: str) -> None:
    """A VM using its own or another VM's forwarded port via the host, and a
    plain namespace on the bridge doing the same; with and without br_netfilter
    (which bridges such DNATed frames instead of routing them)."""
    netns.write_sysctl("net/bridge/bridge-nf-call-iptables", br_netfilter)
    a = await _up(manager, "vm-a", NicRequest(options=(("port_forwards", "33020:7/udp"),)))
    b = await _up(manager, "vm-b", NicRequest(options=(("port_forwards", "33021:7/udp"),)))
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
            s = _sock_in("onbridge", socket.SOCK_DGRAM)
            with s:
                assert await asyncio.to_thread(
                    _udp_echo, s, ("10.100.0.1", 33021), b"neighbour") == b"neighbour"
    finally:
        run("ip", "link", "del", "brc0", check=False)
        netns.remove_sync("onbridge")
        netns.write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
    for x in (a, b):
        await manager.teardown(x)


@pytest.mark.parametrize("br_netfilter", ["1", "0"])
async def test_no_frames_between_vm_ports(manager: NetworkManager, br_netfilter: str) -> None:
    """A namespace sending a genuine-looking frame straight to another VM's
    veth MAC (bypassing the router): the bridge does not forward it."""
    netns.write_sysctl("net/bridge/bridge-nf-call-iptables", br_netfilter)
    a = await _up(manager, "vm-a")
    b = await _up(manager, "vm-b")

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
        assert "counter packets 0 " not in drops
    for x in (a, b):
        await manager.teardown(x)
