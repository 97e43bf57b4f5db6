"""Teardown returns once the namespace is unmounted and the nft elements are
gone; the kernel destroys the veth pair in the background, and the reaper
deletes a host veth that outlives its grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from metald.core.models import NetworkAllocation, NicRequest
from metald.core.plan import Plan
from metald.network import netns
from metald.network.manager import NetworkManager
from tests.integration.test_network_fakeguest import (
    ROOT_ONLY,
    all_vm_elements,
    host_links,
    reset_host,
    run,
)

pytestmark = ROOT_ONLY
NIC = NicRequest(options=(("port_forwards", "80"),))


async def _up(m: NetworkManager, vm_id: str) -> NetworkAllocation:
    alloc = await m.allocate(vm_id, NIC)
    await Plan("net", m.setup_steps(alloc)).run()
    return alloc


def _ip_netns() -> list[str]:
    return [line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.strip()]


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until ``cond()`` held (fails after ``timeout``)."""
    started = time.monotonic()
    while not cond():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def _ifindex(name: str) -> int | None:
    return netns.ifindex(name)


async def test_kernel_removes_the_pair_after_teardown_returns(manager: NetworkManager) -> None:
    alloc = await _up(manager, "vm-a")
    assert alloc.host_veth in host_links() and all_vm_elements()
    await manager.teardown(alloc)
    assert alloc.namespace not in _ip_netns()
    assert all_vm_elements() == []
    await _until(lambda: alloc.host_veth not in host_links())
    assert await manager.settle(5)
    reaper = manager._reaper
    assert reaper.pending() == set()
    assert reaper.deleted == 0 and reaper.deleted_overdue == 0  # nothing deleted explicitly


async def test_held_namespace_is_cut_off_after_the_grace_period(manager: NetworkManager) -> None:
    alloc = await _up(manager, "vm-held")
    ns_inode = os.stat(netns.path_of(alloc.namespace)).st_ino
    holder = subprocess.Popen(["ip", "netns", "exec", alloc.namespace, "sleep", "30"])
    try:
        await _until(lambda: os.stat(f"/proc/{holder.pid}/ns/net").st_ino == ns_inode)
        started = time.monotonic()
        await manager.teardown(alloc)
        assert alloc.namespace not in _ip_netns() and all_vm_elements() == []
        assert not await manager.settle(0.3)  # the holder keeps the namespace and the pair alive
        assert alloc.host_veth in host_links() and manager._reaper.pending() == {alloc.host_veth}

        await manager.release("vm-held")  # the VM is gone from the store: the sweep leaves the link to the reaper
        assert not [r for r in await manager.sweep_leftovers(set()) if alloc.host_veth in r]

        await _until(lambda: alloc.host_veth not in host_links(), timeout=manager._reaper.grace + 5)
        assert time.monotonic() - started >= manager._reaper.grace
        assert await manager.settle(1)
        assert manager._reaper.deleted_overdue == 1  # counted once the deletion request returned
        inside = run("nsenter", f"--net=/proc/{holder.pid}/ns/net", "ip", "-o", "link", "show")
        assert alloc.ns_veth not in inside and alloc.tap in inside  # vn_ went with its peer
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


async def test_same_vm_set_up_again_right_after_teardown(manager: NetworkManager) -> None:
    manager._reaper.grace = 0.5
    alloc = await _up(manager, "vm-again")
    old = _ifindex(alloc.host_veth)
    await manager.teardown(alloc)
    await Plan("net", manager.setup_steps(alloc)).run()
    new = _ifindex(alloc.host_veth)
    assert new is not None and new != old
    assert alloc.namespace in _ip_netns() and len(all_vm_elements()) == 3
    assert await manager.settle(5)
    await asyncio.sleep(manager._reaper.grace + 0.3)
    assert _ifindex(alloc.host_veth) == new  # the reaper left the new link alone
    assert manager._reaper.deleted_overdue == 0

    await manager.teardown(alloc)  # and again, with the allocation released and made anew
    await manager.release("vm-again")
    again = await manager.allocate("vm-again", NIC)
    await Plan("net", manager.setup_steps(again)).run()
    assert _ifindex(again.host_veth) is not None
    await manager.teardown(again)
    assert await manager.settle(5)
    assert again.host_veth not in host_links()


async def test_settle_after_50_teardowns_at_once(manager: NetworkManager) -> None:
    assert await manager.settle(0)  # nothing pending
    allocs = await asyncio.gather(*(_up(manager, f"vm-{i:02d}") for i in range(50)))
    assert len([n for n in host_links() if n.startswith("vh_")]) == 50
    await asyncio.gather(*(manager.teardown(a) for a in allocs))
    assert [n for n in _ip_netns() if n.startswith("fc-")] == [] and all_vm_elements() == []
    assert await manager.settle(10)
    assert manager._reaper.pending() == set()
    assert [n for n in host_links() if n.startswith("vh_")] == []


def test_audit_waits_for_host_veths_being_destroyed(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support import audit

    reset_host()
    monkeypatch.setattr(audit, "IN_FLIGHT_WAIT_SECONDS", 0.5)
    # A host veth with a metald alias and no namespace left, that stays: reported.
    run("ip", "link", "add", "vh_stays", "type", "veth", "peer", "name", "vx_stays")
    run("ip", "link", "set", "vh_stays", "alias", "metald:ghost")
    started = time.monotonic()
    assert "vh_stays" in audit.snapshot().items["links"]
    assert time.monotonic() - started >= 0.5
    run("ip", "link", "del", "vh_stays")
    # One whose peer's namespace was just removed: not reported.
    netns.create_sync("fc-dying")
    run("ip", "link", "add", "vh_dying", "type", "veth", "peer", "name", "vn_dying", "netns", "fc-dying")
    run("ip", "link", "set", "vh_dying", "alias", "metald:dying")
    netns.remove_sync("fc-dying")
    assert "vh_dying" not in audit.snapshot().items["links"]
