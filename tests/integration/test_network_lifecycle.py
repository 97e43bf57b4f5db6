"""Rollback at every step, 200 VMs at once, and the sweep of leftovers."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from metald.config import Settings
from metald.core.errors import StepFailed
from metald.core.models import NicRequest, RateLimit
from metald.core.plan import FuncStep, Plan
from metald.network import netns
from metald.network.manager import NetworkManager
from metald.store.sqlite import Store
from tests.integration.test_network_fakeguest import (
    ROOT_ONLY,
    all_vm_elements,
    host_links,
    namespaces,
    nft_elements,
    permanent_neighbours,
    run,
)

pytestmark = ROOT_ONLY
STEPS = ["netns", "veth", "tap", "proxy_arp", "routes", "neighbours", "ratelimit", "firewall",
         "port_forwards"]
FULL_NIC = NicRequest(
    options=(("port_forwards", "80,33010:53/udp"),),
    rx_rate_limit=RateLimit(1_000_000, 0, 0),
    tx_rate_limit=RateLimit(1_000_000, 0, 0),
)


def _vm_links() -> list[str]:
    return [n for n in host_links() if n.startswith(("vh_", "vn_", "tap_"))]


async def _assert_clean(m: NetworkManager) -> None:
    # Teardown returns before the kernel has destroyed the veth pairs.
    assert await m.settle(10)
    assert [n for n in namespaces() if n.startswith("fc-")] == []
    assert _vm_links() == []
    assert all_vm_elements() == []
    assert permanent_neighbours() == []


def test_step_names_are_the_documented_ones(tmp_path: Path) -> None:
    m = NetworkManager(Settings(data_dir=tmp_path), Store(tmp_path / "db"))  # type: ignore[call-arg]
    alloc = m._allocator.allocate("x", FULL_NIC)
    assert [s.name for s in m.setup_steps(alloc)] == STEPS


@pytest.mark.parametrize("step", [*STEPS, "after-last"])
async def test_failure_at_each_step_leaves_nothing(
    manager: NetworkManager, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    alloc = await manager.allocate("vm-fault", FULL_NIC)
    steps = list(manager.setup_steps(alloc, 1000, 1000))
    if step == "after-last":

        async def boom() -> None:
            raise RuntimeError("later failure")

        steps.append(FuncStep("boot", boom))
    else:
        monkeypatch.setenv("METALD_FAULTS", f"fail:net.{step}")
    with pytest.raises(StepFailed) as info:
        await Plan("net", steps).run()
    assert info.value.step == (step if step != "after-last" else "boot")
    await _assert_clean(manager)
    await manager.release("vm-fault")
    assert manager.store.ip_of("vm-fault") is None and manager.store.ports_of("vm-fault") == []
    assert manager.store.short_id_of("vm-fault") is None


async def test_rerun_after_partial_setup_finishes_it(manager: NetworkManager) -> None:
    alloc = await manager.allocate("vm-partial", FULL_NIC)
    steps = manager.setup_steps(alloc)
    for s in steps[:4]:  # as if metald died after "proxy_arp"
        await s.do()
    performed = await Plan("net", manager.setup_steps(alloc)).run()
    assert performed == ["routes", "neighbours", "ratelimit", "firewall", "port_forwards"]
    assert (await Plan("net", manager.setup_steps(alloc)).run()) == ["firewall", "port_forwards"]
    await manager.teardown(alloc)
    await _assert_clean(manager)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_200_vms_concurrently(manager: NetworkManager) -> None:
    n = 200
    warm = [await manager.allocate(f"warm-{i}", None) for i in range(3)]  # starts the pool
    await asyncio.gather(*(Plan("net", manager.setup_steps(w)).run() for w in warm))
    await asyncio.gather(*(manager.teardown(w) for w in warm))
    await asyncio.sleep(0.2)  # let subprocess pipes and watcher threads finish
    fds, threads = _fds(), threading.active_count()
    allocs = [await manager.allocate(f"vm-{i:03d}", None) for i in range(n)]
    assert len({a.ip for a in allocs}) == n and len({a.short_id for a in allocs}) == n
    started = time.monotonic()
    await asyncio.gather(*(Plan("net", manager.setup_steps(a)).run() for a in allocs))
    setup = time.monotonic() - started
    assert len([x for x in namespaces() if x.startswith("fc-vm-")]) == n
    assert len([x for x in host_links() if x.startswith("vh_")]) == n
    assert len(nft_elements("bridge", "metald", "vm_src")) == n
    assert len(permanent_neighbours()) == n
    started = time.monotonic()
    await asyncio.gather(*(manager.teardown(a) for a in allocs))
    teardown = time.monotonic() - started
    await _assert_clean(manager)
    for a in allocs:
        await manager.release(a.namespace[3:])
    for i in range(3):
        await manager.release(f"warm-{i}")
    assert manager.store.ip_count() == 0
    await asyncio.sleep(0.2)
    assert _fds() <= fds and threading.active_count() <= threads  # nothing leaked
    print(f"\n200 VMs: setup {setup * 1000 / n:.1f} ms/VM, teardown {teardown * 1000 / n:.1f} ms/VM"
          f" (wall {setup:.2f}s + {teardown:.2f}s)")


async def test_sweep_leftovers(manager: NetworkManager) -> None:
    keep = await manager.allocate("keep", NicRequest(options=(("port_forwards", "80"),)))
    await Plan("net", manager.setup_steps(keep)).run()
    gone = await manager.allocate("gone", NicRequest(options=(("port_forwards", "81"),)))
    await Plan("net", manager.setup_steps(gone)).run()
    await manager.release("gone")  # the store forgot it, the host did not

    netns.create_sync("fc-unknown")
    run("ip", "link", "add", "vh_deadbeef", "type", "veth", "peer", "name", "vx_deadbeef")
    run("nft", "add", "element", "bridge", "metald", "vm_src",
        '{ "vh_deadbeef" . 0a:de:ad:be:ef:01 . 10.100.99.99 }')
    run("ip", "neigh", "add", "10.100.99.98", "lladdr", "0a:de:ad:be:ef:02", "dev", "br-vms",
        "nud", "permanent")
    netns.create_sync("unrelated")  # not ours: left alone

    removed = await manager.sweep_leftovers({"keep"})
    text = "\n".join(removed)
    for what in ("netns fc-unknown", "netns fc-gone", "link vh_deadbeef", f"link {gone.host_veth}",
                 "neigh 10.100.99.98", f"neigh {gone.ip}", "vh_deadbeef", "fwd_tcp"):
        assert what in text, what
    assert "keep" not in text and keep.host_veth not in text
    assert namespaces() == sorted([keep.namespace, "unrelated"])
    assert [x for x in host_links() if x.startswith(("vh_", "vx_"))] == [keep.host_veth]
    assert len(all_vm_elements()) == 3  # keep's vm_src, vm_mac and fwd_tcp
    assert await manager.sweep_leftovers({"keep"}) == []
    netns.remove_sync("unrelated")
    await manager.teardown(keep)


async def test_sequential_setup_and_teardown_time(manager: NetworkManager) -> None:
    """One VM at a time (prints the numbers; the bound only catches gross regressions
    on a loaded CI machine)."""
    n = 20
    nic = NicRequest(options=(("port_forwards", "80,53/udp"),))
    allocs = [await manager.allocate(f"seq-{i}", nic if i % 2 else None) for i in range(n)]
    setup = teardown = 0.0
    for a in allocs:
        t0 = time.perf_counter()
        await Plan("net", manager.setup_steps(a)).run()
        t1 = time.perf_counter()
        await manager.teardown(a)
        setup, teardown = setup + t1 - t0, teardown + time.perf_counter() - t1
    await _assert_clean(manager)
    print(f"\nsequential: setup {setup * 1000 / n:.1f} ms/VM, teardown {teardown * 1000 / n:.1f} ms/VM")
    assert (setup + teardown) / n < 0.5
