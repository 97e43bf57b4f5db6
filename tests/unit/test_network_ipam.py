from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest

from metald.config import Settings
from metald.core.errors import InvalidArgument, ResourceExhausted
from metald.core.models import NicRequest, RateLimit
from metald.network import names
from metald.network.allocation import Allocator
from metald.network.ipam import Ipv4Pool, normalize_mac
from metald.store.sqlite import Store

FIELD = "config.network[0].ipv4_config.address"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "metald.db")


def _settings(tmp_path: Path, subnet: str = "10.100.0.0/16", bridge: str = "10.100.0.1/16",
              **kw: object) -> Settings:
    return Settings(data_dir=tmp_path, network_vm_subnet_ipv4=subnet,  # type: ignore[call-arg]
                    network_bridge_ipv4=bridge, **kw)


def _pool(subnet: str = "10.0.0.0/29", bridge: str = "10.0.0.1") -> Ipv4Pool:
    return Ipv4Pool(ipaddress.IPv4Network(subnet), {ipaddress.IPv4Address(bridge)})


def test_skips_network_broadcast_and_bridge(store: Store) -> None:
    pool = _pool()
    got = [pool.allocate(store, f"vm-{i}") for i in range(5)]
    assert got == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    assert pool.size == 5


def test_exhaustion_then_release(store: Store) -> None:
    pool = _pool()
    for i in range(5):
        pool.allocate(store, f"vm-{i}")
    with pytest.raises(ResourceExhausted):
        pool.allocate(store, "vm-5")
    pool.release(store, "vm-2")
    assert pool.allocate(store, "vm-5") == "10.0.0.4"


def test_allocate_is_idempotent_per_vm(store: Store) -> None:
    pool = _pool()
    assert pool.allocate(store, "a") == pool.allocate(store, "a") == "10.0.0.2"
    assert store.ip_count() == 1


def test_requested_address(store: Store) -> None:
    pool = _pool()
    assert pool.allocate(store, "a", "10.0.0.5") == "10.0.0.5"
    for bad, why in [("10.0.0.5", "in use"), ("10.0.1.5", "outside"), ("10.0.0.1", "reserved"),
                     ("10.0.0.0", "network"), ("10.0.0.7", "broadcast"), ("nope", "not an IPv4")]:
        with pytest.raises(InvalidArgument) as info:
            pool.allocate(store, "b", bad)
        assert info.value.field == FIELD and why in str(info.value)
    # the pool's own allocation then skips the requested address
    got = {pool.allocate(store, f"x{i}") for i in range(4)}
    assert "10.0.0.5" not in got and len(got) == 4


def test_two_pools_on_one_store_never_collide(store: Store) -> None:
    a, b = _pool(), _pool()
    got = [a.allocate(store, "a1"), b.allocate(store, "b1"), a.allocate(store, "a2"),
           b.allocate(store, "b2")]
    assert len(set(got)) == 4
    # b's cache does not know that a released one; exhaustion reloads it
    for i in range(1):
        b.allocate(store, f"b-more{i}")
    a.release(store, "a1")
    assert b.allocate(store, "b-last") == "10.0.0.2"


def test_concurrent_threads_get_distinct_addresses(store: Store) -> None:
    pools = [_pool("10.1.0.0/22", "10.1.0.1") for _ in range(2)]
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(50):
                ip = pools[n % 2].allocate(store, f"vm-{n}-{i}")
                with lock:
                    results.append(ip)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 400 and len(set(results)) == 400
    assert len(store.allocated_ips()) == 400


def test_large_pool_allocation_is_next_fit(store: Store) -> None:
    pool = _pool("10.100.0.0/16", "10.100.0.1")
    for i in range(300):
        pool.allocate(store, f"vm-{i}")
    pool.release(store, "vm-0")  # 10.100.0.2 is free again, but next-fit goes on
    assert pool.allocate(store, "new") == str(ipaddress.IPv4Address("10.100.0.2") + 300)


@pytest.mark.parametrize(
    "value,expected",
    [("02:AB:cd:00:11:22", "02:ab:cd:00:11:22"), ("02-ab-cd-00-11-22", "02:ab:cd:00:11:22"),
     ("00:11:22:33:44:55", "00:11:22:33:44:55")],
)
def test_mac_ok(value: str, expected: str) -> None:
    assert normalize_mac(value) == expected


@pytest.mark.parametrize(
    "value", ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "02:ab:cd:00:11",
              "02:ab:cd:00:11:2g", "02:ab-cd:00:11:22", ""],
)
def test_mac_rejected(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        normalize_mac(value)
    assert info.value.field == "config.network[0].mac_address"


# --- the allocator (short id + IP + MAC + ports) -----------------------------------


def test_allocator_builds_names_from_short_id(tmp_path: Path, store: Store) -> None:
    alloc = Allocator(_settings(tmp_path, network_dns_servers="1.1.1.1, 8.8.8.8"), store)
    a = alloc.allocate("vm-1", None)
    s = names.short_id("vm-1")
    assert (a.short_id, a.namespace, a.host_veth, a.ns_veth, a.tap) == (
        s, "fc-vm-1", f"vh_{s}", f"vn_{s}", f"tap_{s}")
    assert (a.ip, a.prefix_len, a.gateway) == ("10.100.0.2", 16, "10.100.0.1")
    assert a.mac == names.guest_mac("vm-1") and a.dns_servers == ("1.1.1.1", "8.8.8.8")
    assert alloc.allocate("vm-1", None) == a  # idempotent
    assert store.short_id_of("vm-1") == s


def test_short_id_collision_rehashes(tmp_path: Path, store: Store) -> None:
    alloc = Allocator(_settings(tmp_path), store)
    first, second = list(names.short_id_candidates("vm-1"))[:2]
    store.claim_short_id("someone-else", first)  # as if "someone-else" hashed the same
    a = alloc.allocate("vm-1", None)
    assert a.short_id == second and a.tap == f"tap_{second}"
    assert alloc.allocate("vm-1", None).short_id == second


def test_allocator_validation(tmp_path: Path, store: Store) -> None:
    alloc = Allocator(_settings(tmp_path), store)
    cases = [
        (NicRequest(options=(("colour", "red"),)), "config.network[0].options.colour"),
        (NicRequest(mac="01:00:00:00:00:01"), "config.network[0].mac_address"),
        (NicRequest(tap="tap0"), "config.network[0].tap_device"),
        (NicRequest(ipv4="192.168.0.2"), FIELD),
        (NicRequest(rx_rate_limit=RateLimit(-1, 0, 0)), "config.network[0].rx_rate_limit.bandwidth"),
        (NicRequest(tx_rate_limit=RateLimit(10, -1, 0)),
         "config.network[0].tx_rate_limit.refill_time"),
        (NicRequest(options=(("port_forwards", "80:80"),)),
         "config.network[0].options.port_forwards"),
    ]
    for nic, field in cases:
        with pytest.raises(InvalidArgument) as info:
            alloc.allocate("vm-1", nic)
        assert info.value.field == field, nic
    with pytest.raises(InvalidArgument) as info:
        alloc.allocate("bad_id", None)
    assert info.value.field == "vm_id"
    # nothing was left claimed by the failed calls
    assert store.ip_of("vm-1") is None and store.short_id_of("vm-1") is None
    assert store.ports_of("vm-1") == []


def test_allocator_honours_mac_ip_tap_and_limits(tmp_path: Path, store: Store) -> None:
    alloc = Allocator(_settings(tmp_path), store)
    s = names.short_id("vm-1")
    nic = NicRequest(mac="02:00:00:00:00:AA", ipv4="10.100.3.4", tap=f"tap_{s}",
                     rx_rate_limit=RateLimit(1000, 0, 0), tx_rate_limit=RateLimit(0, 0, 0),
                     options=(("port_forwards", "80, 32800:53/udp"),))
    a = alloc.allocate("vm-1", nic)
    assert a.mac == "02:00:00:00:00:aa" and a.ip == "10.100.3.4"
    assert a.rx_rate_limit == RateLimit(1000, 0, 0) and a.tx_rate_limit is None
    assert [(p.guest_port, p.protocol) for p in a.port_forwards] == [(80, "tcp"), (53, "udp")]
    assert a.port_forwards[1].host_port == 32800
    assert alloc.allocate("vm-1", nic) == a
    # a different forward request re-claims ports; the IP stays
    b = alloc.allocate("vm-1", NicRequest(mac="02:00:00:00:00:aa", ipv4="10.100.3.4",
                                          options=(("port_forwards", "22"),)))
    assert b.ip == a.ip and [p.guest_port for p in b.port_forwards] == [22]
    assert len(store.ports_of("vm-1")) == 1
    with pytest.raises(InvalidArgument):
        alloc.allocate("vm-1", NicRequest(ipv4="10.100.3.5"))


def test_failed_port_claim_releases_ip(tmp_path: Path, store: Store) -> None:
    alloc = Allocator(_settings(tmp_path), store)
    alloc.allocate("a", NicRequest(options=(("port_forwards", "32768:80"),)))
    with pytest.raises(InvalidArgument) as info:
        alloc.allocate("b", NicRequest(options=(("port_forwards", "32768:80"),)))
    assert "in use" in str(info.value)
    assert store.ip_of("b") is None and store.short_id_of("b") is None


def test_release_frees_everything(tmp_path: Path, store: Store) -> None:
    alloc = Allocator(_settings(tmp_path, subnet="10.0.0.0/30", bridge="10.0.0.1/30"), store)
    alloc.allocate("a", NicRequest(options=(("port_forwards", "80"),)))
    with pytest.raises(ResourceExhausted):
        alloc.allocate("b", None)
    alloc.release("a")
    assert store.ip_count() == 0 and store.short_ids() == {} and store.used_ports("tcp") == set()
    assert alloc.allocate("b", None).ip == "10.0.0.2"


def test_bridge_by_address_block(tmp_path: Path, store: Store) -> None:
    """Block n of the subnet (UNKEY_METALD_NETWORK_VMS_PER_BRIDGE addresses) is on br-vms-<n>."""
    alloc = Allocator(_settings(tmp_path), store)  # 256 per bridge: block n is 10.100.n.0/24
    assert alloc.allocate("vm-1", None).bridge == "br-vms"
    assert alloc.allocate("vm-2", NicRequest(ipv4="10.100.0.255")).bridge == "br-vms"
    assert alloc.allocate("vm-3", NicRequest(ipv4="10.100.1.0")).bridge == "br-vms-1"
    assert alloc.allocate("vm-4", NicRequest(ipv4="10.100.255.254")).bridge == "br-vms-255"
    small = Allocator(_settings(tmp_path, subnet="10.100.0.0/22", network_vms_per_bridge=3), store)
    assert [small.bridge_of(f"10.100.0.{i}") for i in (1, 2, 3, 5, 6)] == [
        "br-vms", "br-vms", "br-vms-1", "br-vms-1", "br-vms-2"]
    assert names.block_of_bridge("br-vms", "br-vms-12") == 12
    assert names.block_of_bridge("br-vms", "br-vms") is None
    assert names.block_of_bridge("br-vms", "br-vms-x") is None
    assert names.trunk_names(12) == ("vbp_12", "vbs_12")
