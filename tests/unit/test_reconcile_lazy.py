"""Start-up adoption on identity, with QMP attached after reconcile (fake backend).

The real QEMU backend on stand-in VMM processes: tests/integration/test_qemu_adopt_lazy.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from metald.core.engine import VmEngine
from metald.core.models import BootSpec, VmState
from metald.core.reconcile import SETTLE_CONCURRENCY
from tests.support.engine import small_draft
from tests.support.fakes import FakeBackend, FakeNetwork


class LazyBackend(FakeBackend):
    """A backend with ``adopt_many`` (identity only) and ``attach`` (the QMP connection)."""

    def __init__(self) -> None:
        super().__init__(identity_adoption=True)
        self.mute: set[str] = set()  # adopted VMMs whose QMP never answers
        self.slow: set[str] = set()  # attach waits for ``release``
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most_in_flight = 0

    async def adopt_many(self, items: list[tuple[BootSpec, dict[str, Any]]]) -> set[str]:
        self.calls.append(("adopt_many", ",".join(spec.vm_id for spec, _ in items)))
        adopted = {spec.vm_id for spec, _ in items if spec.vm_id in self.adoptable}
        for vm_id in adopted:
            self.running.setdefault(vm_id, "running")
        return adopted

    async def attach(self, vm_id: str) -> bool:
        self.calls.append(("attach", vm_id))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if vm_id in self.slow:
                await self.release.wait()
        finally:
            self.in_flight -= 1
        return vm_id not in self.mute

    def adopt_error(self, vm_id: str) -> str | None:
        return "QMP of pid 1 did not answer: fake" if vm_id in self.mute else None

    async def vmm_status(self, vm_id: str) -> str:
        self._call("status", vm_id)
        return self.running[vm_id]

    async def discard(self, vm_id: str, kill_strays: bool = True) -> list[int]:
        self.calls.append(("discard", vm_id))
        self.running.pop(vm_id, None)
        return []


async def running_vms(settings, store, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    """VMs booted by a metald that then went away (their VMMs keep running)."""
    engine = VmEngine(settings, store, FakeBackend(), FakeNetwork())
    for name in names:
        await engine.create(name, "", small_draft(settings.image_dir), b"")
        await engine.boot(name)


def attached(backend: LazyBackend) -> list[str]:
    return [vm_id for op, vm_id in backend.calls if op == "attach"]


async def test_adopted_on_identity_then_attached_after_reconcile(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    await running_vms(settings, store, ["a1", "a2", "gone"])
    backend = LazyBackend()
    backend.adoptable = {"a1", "a2"}
    backend.running = {"a1": "paused"}  # paused by a pause metald did not get to record
    engine = VmEngine(settings, store, backend, FakeNetwork())
    report = await engine.start()
    assert report.adopted == ["a1", "a2"] and report.marked_shutdown == ["gone"]
    assert [op for op, _ in backend.calls].count("adopt_many") == 1  # one batch, no adopt() one by one
    assert ("adopt", "a1") not in backend.calls
    assert attached(backend) == []  # not during reconcile
    assert store.get_vm("a1").state == VmState.RUNNING  # not known yet
    await engine.wait_settled()
    assert sorted(attached(backend)) == ["a1", "a2"]
    assert store.get_vm("a1").state == VmState.PAUSED
    assert store.get_vm("a2").state == VmState.RUNNING
    assert store.get_vm("gone").state == VmState.SHUTDOWN
    await engine.close()


async def test_adopted_vmm_whose_qmp_does_not_answer_is_kept_unresponsive(parts) -> None:  # type: ignore[no-untyped-def]
    """Alive with its identity proven but silent (e.g. SIGSTOP): kept, never killed nor recorded as exited."""
    settings, store = parts
    await running_vms(settings, store, ["mute", "ok"])
    backend = LazyBackend()
    backend.adoptable = {"mute", "ok"}
    backend.mute = {"mute"}
    engine = VmEngine(settings, store, backend, FakeNetwork())
    report = await engine.start()
    assert report.adopted == ["mute", "ok"]
    await engine.wait_settled()
    row = store.get_vm("mute")
    assert row.state == VmState.RUNNING and row.handle and "last_exit" not in row.status
    assert ("discard", "mute") not in backend.calls and "mute" in backend.running
    events = [(e["operation"], e["outcome"], e["detail"]) for e in store.events("mute")]
    assert ("reconcile", "unresponsive", "QMP of pid 1 did not answer: fake") in events
    assert store.get_vm("ok").state == VmState.RUNNING
    await engine.close()


async def test_first_operation_attaches_and_reads_the_run_state_first(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    names = [f"v{i:02d}" for i in range(SETTLE_CONCURRENCY + 8)]
    await running_vms(settings, store, names)
    backend = LazyBackend()
    backend.adoptable = set(names)
    target, other = names[-1], names[-2]  # the background attaches in sorted order: these come last
    backend.running = {target: "paused"}
    backend.slow = set(names) - {target, other}
    engine = VmEngine(settings, store, backend, FakeNetwork())
    await engine.start()
    for _ in range(500):  # until the background has every slot busy on slow VMMs
        if backend.in_flight == SETTLE_CONCURRENCY:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)
    assert backend.in_flight == SETTLE_CONCURRENCY and target not in attached(backend)
    # recorded RUNNING, but its VMM is paused: resume works, as the state is read first
    assert await engine.resume(target) == VmState.RUNNING
    assert attached(backend).count(target) == 1 and backend.running[target] == "running"
    # a read attaches too, and a shutdown right after a restart works
    assert (await engine.get(other)).row.state == VmState.RUNNING and other in attached(backend)
    assert await engine.shutdown(other, force=True, timeout_s=0) == VmState.SHUTDOWN
    backend.release.set()
    await engine.wait_settled()
    assert sorted(attached(backend)) == names  # each VMM attached exactly once
    assert store.get_vm(target).state == VmState.RUNNING
    assert store.get_vm(other).state == VmState.SHUTDOWN
    await engine.close()


async def test_attaching_is_bounded(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    names = [f"b{i:03d}" for i in range(3 * SETTLE_CONCURRENCY)]
    await running_vms(settings, store, names)
    backend = LazyBackend()
    backend.adoptable = set(names)
    engine = VmEngine(settings, store, backend, FakeNetwork())
    await engine.start()
    await engine.wait_settled()
    assert sorted(attached(backend)) == names
    assert backend.most_in_flight == SETTLE_CONCURRENCY
    await engine.close()


async def test_interrupted_operations_still_adopt_one_by_one(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    await running_vms(settings, store, ["plain", "stopping"])
    store.begin_intent("stopping", "shutdown")  # cut off before the stop
    backend = LazyBackend()
    backend.adoptable = {"plain", "stopping"}
    engine = VmEngine(settings, store, backend, FakeNetwork())
    report = await engine.start()
    assert ("adopt", "stopping") in backend.calls and ("adopt", "plain") not in backend.calls
    assert report.rolled_back == ["stopping"] and store.get_vm("stopping").state == VmState.RUNNING
    await engine.wait_settled()
    assert attached(backend) == ["plain"]
    await engine.close()
