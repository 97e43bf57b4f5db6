from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.config import Settings
from metald.core.plan import Plan
from metald.network import host, netns
from metald.network.manager import NetworkManager
from metald.store.sqlite import Store
from tests.integration.test_network_fakeguest import ROOT_ONLY, all_vm_elements, reset_host, run

pytestmark = ROOT_ONLY


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[NetworkManager]:
    reset_host()
    m = NetworkManager(Settings(data_dir=tmp_path), Store(tmp_path / "metald.db"))  # type: ignore[call-arg]
    yield m
    reset_host()


def _snapshot() -> tuple[str, str, str, str]:
    links = re.sub(r"\w+_timer\s+[\d.]+", "", run("ip", "-d", "link", "show"))  # running clocks
    return (
        run("nft", "list", "ruleset"),
        links,
        run("ip", "addr", "show"),
        host.SYSCTL_FILE.read_text(),
    )


async def test_setup_twice_changes_nothing(manager: NetworkManager) -> None:
    await manager.setup_host()
    first = _snapshot()
    await manager.setup_host()
    assert _snapshot() == first
    assert "10.100.0.1/16" in first[2] and "br-vms" in first[1]
    assert "net.ipv4.ip_forward = 1" in first[3]
    assert netns.read_sysctl("net/ipv4/ip_forward") == "1"
    assert netns.read_sysctl("net/ipv4/conf/br-vms/route_localnet") == "1"
    ok, detail = await manager.check()
    assert ok, detail


async def test_sysctl_file_written_only_when_different(tmp_path: Path) -> None:
    path = tmp_path / "sysctl.d" / "99-metald.conf"
    assert host.persist_sysctl(path) is True
    mtime = path.stat().st_mtime_ns
    assert host.persist_sysctl(path) is False and path.stat().st_mtime_ns == mtime
    path.write_text("net.ipv4.ip_forward = 0\n")
    assert host.persist_sysctl(path) is True and path.read_text() == host.SYSCTL_CONTENT


async def test_setup_again_keeps_vm_elements_and_follows_settings(
    manager: NetworkManager, tmp_path: Path
) -> None:
    await manager.setup_host()
    alloc = await manager.allocate("keep", None)
    await Plan("net", manager.setup_steps(alloc)).run()
    before = all_vm_elements()
    assert len(before) == 2
    other = NetworkManager(
        Settings(data_dir=tmp_path, network_allow_vm_to_vm=True),  # type: ignore[call-arg]
        manager.store,
    )
    await other.setup_host()
    assert all_vm_elements() == before
    assert 'iifname "br-vms" oifname "br-vms"' not in run("nft", "list", "chain", "inet",
                                                          "metald", "forward")
    await manager.setup_host()
    assert 'iifname "br-vms" oifname "br-vms"' in run("nft", "list", "chain", "inet", "metald",
                                                      "forward")
    await manager.teardown(alloc)


async def test_teardown_host_and_check(manager: NetworkManager) -> None:
    ok, detail = await manager.check()
    assert not ok and "br-vms missing" in detail and "nft table inet metald missing" in detail
    await manager.setup_host()
    await manager.teardown_host()
    assert "metald" not in run("nft", "list", "tables")
    assert "br-vms" not in run("ip", "link", "show")
    await manager.teardown_host()  # idempotent
    run("ip", "link", "add", "br-vms", "type", "bridge")
    await manager.setup_host()  # adopts an existing bridge
    assert (await manager.check())[0]


async def test_refuses_a_non_bridge_device_with_the_bridge_name(manager: NetworkManager) -> None:
    run("ip", "link", "add", "br-vms", "type", "veth", "peer", "name", "br-peer")
    try:
        with pytest.raises(Exception, match="not a bridge"):
            await manager.setup_host()
    finally:
        run("ip", "link", "del", "br-vms", check=False)
