from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from metald.config import Settings
from metald.core.errors import InvalidArgument, ResourceExhausted
from metald.core.models import NetworkAllocation, PortForward
from metald.network import rules
from metald.network.batch import Coalescer
from metald.network.portfwd import ForwardRequest, PortPool, matches, parse_options, parse_port_forwards
from metald.store.sqlite import Store

FIELD = "config.network[0].options.port_forwards"


def test_parse_forms() -> None:
    assert parse_port_forwards("80, 8080/udp ,33000:22/tcp,,53/UDP") == [
        ForwardRequest(80, "tcp"),
        ForwardRequest(8080, "udp"),
        ForwardRequest(22, "tcp", 33000),
        ForwardRequest(53, "udp"),
    ]
    assert parse_port_forwards("") == []


@pytest.mark.parametrize(
    "value", ["0", "65536", "http", "80/sctp", "1:2:3", ":80", "80:", "33000:80,33000:81",
              ",".join(str(p) for p in range(1, 70))],
)
def test_parse_errors_name_the_option(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_port_forwards(value)
    assert info.value.field == FIELD


def test_same_host_port_different_protocols_is_fine() -> None:
    assert len(parse_port_forwards("33000:53/tcp,33000:53/udp")) == 2


def test_unknown_option_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_options((("port_forwards", "80"), ("mtu", "9000")))
    assert info.value.field == "config.network[0].options.mtu"
    assert parse_options({"port_forwards": "80"}) == [ForwardRequest(80, "tcp")]


def test_port_pool(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    pool = PortPool(40000, 40002)
    got = [pool.claim(store, "a", ForwardRequest(80, "tcp")).host_port for _ in range(3)]
    assert got == [40000, 40001, 40002]
    assert pool.claim(store, "a", ForwardRequest(53, "udp")).host_port == 40000
    with pytest.raises(ResourceExhausted):
        pool.claim(store, "b", ForwardRequest(80, "tcp"))
    with pytest.raises(InvalidArgument) as info:
        pool.claim(store, "b", ForwardRequest(80, "tcp", 40001))
    assert "in use" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        pool.claim(store, "b", ForwardRequest(80, "tcp", 22))
    assert "outside" in str(info.value)
    pool.release(store, "a")
    assert store.used_ports("tcp") == set()
    assert pool.claim(store, "b", ForwardRequest(80, "tcp", 40001)).host_port == 40001


def test_matches() -> None:
    held = [PortForward(80, 40000, "tcp"), PortForward(80, 40001, "tcp")]
    assert matches(held, [ForwardRequest(80, "tcp"), ForwardRequest(80, "tcp", 40000)])
    assert not matches(held, [ForwardRequest(80, "tcp", 40002), ForwardRequest(80, "tcp")])
    assert not matches(held, [ForwardRequest(80, "udp"), ForwardRequest(80, "tcp")])
    assert matches([], [])


# --- nft text --------------------------------------------------------------------


def test_host_ruleset_reflects_settings(tmp_path: Path) -> None:
    text = rules.host_ruleset(Settings(data_dir=tmp_path))  # type: ignore[call-arg]
    assert 'oifname != "br-vms" oifname != "br-vms-*" ip saddr 10.100.0.0/16 masquerade' in text
    assert 'iifname "br-vms" oifname "br-vms" counter drop' in text
    assert "th dport { 8080, 9464 } counter drop" in text
    assert "flush chain inet metald forward" in text and "delete" not in text
    open_text = rules.host_ruleset(
        Settings(data_dir=tmp_path, network_allow_vm_to_vm=True,  # type: ignore[call-arg]
                 network_allow_vm_to_host=True, network_bridge="br-x")
    )
    assert 'oifname "br-x"' in open_text
    assert 'iifname "br-x" oifname "br-x" counter drop' not in open_text
    assert "th dport" not in open_text


def test_vm_elements() -> None:
    a = NetworkAllocation(
        short_id="2d62b003", namespace="fc-vm-1", host_veth="vh_2d62b003", ns_veth="vn_2d62b003",
        tap="tap_2d62b003", ip="10.100.0.7", prefix_len=16, gateway="10.100.0.1",
        mac="02:00:00:00:00:01",
        port_forwards=(PortForward(80, 32768, "tcp"), PortForward(53, 32769, "udp")),
    )
    fw = rules.firewall_elements(a)
    assert fw[0].add() == (
        'add element bridge metald vm_src { "vh_2d62b003" . 0a:2d:62:b0:03:01 . 10.100.0.7 }\n'
    )
    assert fw[1].text() == '"vh_2d62b003" . 0a:2d:62:b0:03:01'
    fwd = rules.forward_elements(a)
    assert [e.set for e in fwd] == ["fwd_tcp", "fwd_udp"]
    assert fwd[0].create() == "create element inet metald fwd_tcp { 32768 : 10.100.0.7 . 80 }\n"
    assert rules.remove_script(fwd[:1]) == (
        "add element inet metald fwd_tcp { 32768 : 10.100.0.7 . 80 }\n"
        "delete element inet metald fwd_tcp { 32768 : 10.100.0.7 . 80 }\n"
    )


# --- coalescing ------------------------------------------------------------------


async def test_coalescer_batches_concurrent_requests() -> None:
    batches: list[list[int]] = []

    async def apply_many(items: Sequence[int]) -> list[BaseException | None]:
        batches.append(list(items))
        await asyncio.sleep(0.01)
        return [ValueError(i) if i == 13 else None for i in items]

    c: Coalescer[int] = Coalescer(apply_many)
    results = await asyncio.gather(*(c.submit(i) for i in range(20)), return_exceptions=True)
    assert [type(r).__name__ for r in results].count("ValueError") == 1
    assert isinstance(results[13], ValueError)
    assert sum(len(b) for b in batches) == 20 and len(batches) <= 2
    await c.submit(1)  # works again after the drain finished
