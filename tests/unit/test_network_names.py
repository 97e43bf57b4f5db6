from __future__ import annotations

import hashlib

import pytest

from metald.core.models import NetworkAllocation, PortForward, RateLimit
from metald.network import guest, names
from metald.network.allocation import allocation_from_dict, allocation_to_dict


def test_short_id_is_first_8_hex_of_sha256() -> None:
    assert names.short_id("vm-1") == hashlib.sha256(b"vm-1").hexdigest()[:8]
    assert names.is_short_id(names.short_id("anything"))


def test_candidates_are_distinct_and_start_with_the_short_id() -> None:
    cands = list(names.short_id_candidates("vm-1"))
    assert cands[0] == names.short_id("vm-1")
    assert cands[1] == hashlib.sha256(b"vm-1#1").hexdigest()[:8]
    assert len(set(cands)) == len(cands) == names.MAX_SHORT_ID_CANDIDATES


def test_device_names_fit_ifnamsiz() -> None:
    s = names.short_id("x" * 64)
    for name in (names.host_veth_name(s), names.ns_veth_name(s), names.tap_name(s)):
        assert len(name.encode()) <= names.IFNAMSIZ
    assert names.host_veth_name(s) == f"vh_{s}"
    assert names.ns_veth_name(s) == f"vn_{s}"
    assert names.tap_name(s) == f"tap_{s}"
    assert names.short_of_host_veth(f"vh_{s}") == s
    assert names.short_of_host_veth("vh_nothex!") is None


@pytest.mark.parametrize(
    "vm_id,ok",
    [("vm-1", True), ("A" * 64, True), ("A" * 65, False), ("", False), ("-x", False),
     ("a_b", False), ("a/b", False), ("a.b", False), ("ü", False)],
)
def test_valid_vm_id(vm_id: str, ok: bool) -> None:
    assert names.valid_vm_id(vm_id) is ok


def test_namespace_round_trip() -> None:
    assert names.namespace_name("vm-1") == "fc-vm-1"
    assert names.vm_id_of_namespace("fc-vm-1") == "vm-1"
    assert names.vm_id_of_namespace("other") is None
    assert names.vm_id_of_namespace("fc-bad/x") is None


def _is_local_unicast(mac: str) -> bool:
    first = int(mac.split(":")[0], 16)
    return bool(first & 2) and not first & 1


def test_macs() -> None:
    g = names.guest_mac("vm-1")
    assert _is_local_unicast(g) and len(g) == 17 and g == names.guest_mac("vm-1")
    s = names.short_id("vm-1")
    vn = names.ns_veth_mac(s)
    assert _is_local_unicast(vn) and vn == f"0a:{s[0:2]}:{s[2:4]}:{s[4:6]}:{s[6:8]}:01"
    assert names.ns_veth_mac("00000001") != names.ns_veth_mac("00000002")
    b = names.bridge_mac("br-vms")
    assert _is_local_unicast(b) and b != vn


def _alloc(**kw: object) -> NetworkAllocation:
    base: dict[str, object] = dict(
        short_id="2d62b003", namespace="fc-vm-1", host_veth="vh_2d62b003",
        ns_veth="vn_2d62b003", tap="tap_2d62b003", ip="10.100.0.7", prefix_len=16,
        gateway="10.100.0.1", mac="02:2d:62:b0:03:5f",
    )
    base.update(kw)
    return NetworkAllocation(**base)  # type: ignore[arg-type]


def test_kernel_ip_arg() -> None:
    a = _alloc()
    assert guest.kernel_ip_arg(a, "vm-1") == "ip=10.100.0.7::10.100.0.1:255.255.0.0:vm-1:eth0:off"
    a = _alloc(dns_servers=("1.1.1.1", "8.8.8.8", "9.9.9.9"), prefix_len=24)
    assert guest.kernel_ip_arg(a, "h" * 80) == (
        f"ip=10.100.0.7::10.100.0.1:255.255.255.0:{'h' * 63}:eth0:off:1.1.1.1:8.8.8.8"
    )


def test_allocation_dict_round_trip() -> None:
    a = _alloc(
        dns_servers=("1.1.1.1",),
        port_forwards=(PortForward(80, 32768, "tcp"), PortForward(53, 32769, "udp")),
        rx_rate_limit=RateLimit(1000, 100, 5000),
    )
    d = allocation_to_dict(a)
    assert d["port_forwards"][0] == {"guest_port": 80, "host_port": 32768, "protocol": "tcp"}
    assert d["tx_rate_limit"] is None
    assert allocation_from_dict(d) == a
    import json

    assert allocation_from_dict(json.loads(json.dumps(d))) == a
    # an allocation stored before extra bridges existed: on the main bridge
    del d["bridge"]
    assert allocation_from_dict(d).bridge == ""
