"""Fault points of nested plans, the fault file and the step trace; engine recovery
rules with the fake backend (no root, no VMs: real ones in tests/e2e/test_recovery*)."""

from __future__ import annotations

from pathlib import Path

import pytest

from metald.core import faults
from metald.core.engine import VmEngine
from metald.core.errors import StepFailed
from metald.core.models import VmState
from metald.core.plan import FuncStep, Plan, current_step, qualified
from tests.support.engine import small_draft
from tests.support.fakes import FakeBackend, FakeNetwork


def test_qualified_names() -> None:
    assert qualified(None, "jail") == "jail"
    assert qualified("boot.vmm", "jail") == "boot.vmm.jail"
    assert qualified("boot.network", "network") == "boot.network"
    assert qualified("create.network", "create.network") == "create.network"


async def test_nested_plans_are_named_and_observed_from_the_outer_step() -> None:
    seen: list[tuple[str, str]] = []
    scopes: list[str | None] = []

    async def inner_work() -> None:
        scopes.append(current_step())

    async def outer_work() -> None:
        await Plan("jail", [FuncStep("chroot", inner_work), FuncStep("cgroup", inner_work)]).run()

    plan = Plan("boot", [FuncStep("vmm", outer_work)], observers=[lambda s, o, t, e: seen.append((s, o))])
    await plan.run()
    assert seen == [("boot.vmm.jail.chroot", "done"), ("boot.vmm.jail.cgroup", "done"), ("boot.vmm", "done")]
    assert scopes == ["boot.vmm.jail.chroot", "boot.vmm.jail.cgroup"]
    assert current_step() is None


async def test_nested_fault_point_fails_the_outer_step(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []

    async def mark(name: str) -> None:
        log.append(name)

    async def outer_work() -> None:
        await Plan("jail", [FuncStep("chroot", lambda: mark("chroot"), lambda: mark("-chroot")),
                            FuncStep("cgroup", lambda: mark("cgroup"))]).run()

    monkeypatch.setenv("METALD_FAULTS", "fail:boot.vmm.jail.cgroup")
    plan = Plan("boot", [FuncStep("net", lambda: mark("net"), lambda: mark("-net")), FuncStep("vmm", outer_work)])
    with pytest.raises(StepFailed) as info:
        await plan.run()
    assert info.value.step == "vmm" and "injected failure at boot.vmm.jail.cgroup" in str(info.value)
    assert log == ["net", "chroot", "-chroot", "-net"]


async def test_fault_file_is_read_at_every_check_and_trace_lists_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault_file, trace = tmp_path / "faults", tmp_path / "trace"
    monkeypatch.delenv("METALD_FAULTS", raising=False)
    monkeypatch.setenv("METALD_FAULTS_FILE", str(fault_file))
    monkeypatch.setenv("METALD_FAULTS_TRACE", str(trace))

    async def nothing() -> None:
        return None

    def plan() -> Plan:
        return Plan("p", [FuncStep("a", nothing), FuncStep("b", nothing, is_done_fn=lambda: _true())])

    await plan().run()  # no file: no fault
    fault_file.write_text("fail:p.b\n")
    with pytest.raises(StepFailed):
        await plan().run()  # skipped steps are fault points too
    fault_file.write_text("")
    await plan().run()
    assert trace.read_text().split() == ["p.a", "p.b"] * 3
    faults.check("x.y", "after")  # "after" points are not traced


async def _true() -> bool:
    return True


# --- recovery rules with the fake backend ------------------------------------------




async def test_interrupted_boot_without_a_vmm_goes_back_to_the_previous_state(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    engine = VmEngine(settings, store, FakeBackend(), FakeNetwork())
    await engine.create("b1", "", small_draft(settings.image_dir), b"")
    await engine.create("b2", "", small_draft(settings.image_dir), b"")
    await engine.boot("b2")
    await engine.shutdown("b2", True, 0)
    store.begin_intent("b1", "boot", {"from": int(VmState.CREATED)})
    store.begin_intent("b2", "boot", {"from": int(VmState.SHUTDOWN)})
    store.update_vm("b2", state=int(VmState.RUNNING))  # died after boot.record, VMM gone
    report = await VmEngine(settings, store, FakeBackend(), FakeNetwork()).reconcile()
    assert report.rolled_back == ["b1", "b2"] and store.intents() == []
    assert store.get_vm("b1").state == VmState.CREATED and store.get_vm("b2").state == VmState.SHUTDOWN


async def test_interrupted_boot_with_an_adoptable_vmm_is_completed(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    engine = VmEngine(settings, store, FakeBackend(), FakeNetwork())
    await engine.create("b3", "", small_draft(settings.image_dir), b"")
    store.begin_intent("b3", "boot", {"from": int(VmState.CREATED)})
    store.update_vm("b3", handle={"pid": 1, "fake": True})  # died after boot.vmm
    backend = FakeBackend()
    backend.adoptable = {"b3"}
    report = await VmEngine(settings, store, backend, FakeNetwork()).reconcile()
    assert report.completed == ["b3"] and report.adopted == ["b3"]
    assert store.get_vm("b3").state == VmState.RUNNING


async def test_interrupted_shutdown_and_reboot(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    engine = VmEngine(settings, store, FakeBackend(), FakeNetwork())
    for vm in ("s-alive", "s-gone", "r-gone"):
        await engine.create(vm, "", small_draft(settings.image_dir), b"")
        await engine.boot(vm)
        store.begin_intent(vm, "shutdown" if vm.startswith("s") else "reboot")
    backend = FakeBackend()
    backend.adoptable = {"s-alive"}
    report = await VmEngine(settings, store, backend, FakeNetwork()).reconcile()
    assert store.get_vm("s-alive").state == VmState.RUNNING  # rolled back: the VMM runs on
    assert store.get_vm("s-gone").state == VmState.SHUTDOWN  # completed: the VMM is gone
    assert store.get_vm("r-gone").state == VmState.RUNNING  # reboot completed with a new VMM
    assert ("boot", "r-gone") in backend.calls and store.intents() == []
    assert report.rolled_back == ["s-alive"] and report.marked_shutdown == ["s-gone"]


async def test_failed_delete_step_restores_everything(parts, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    network = FakeNetwork()
    engine = VmEngine(settings, store, FakeBackend(), network)
    await engine.create("d1", "", small_draft(settings.image_dir), b"")
    (settings.run_dir / "d1" / "console.log").write_text("keep")
    for step in ("vmm", "network", "jail", "release", "files", "record"):
        monkeypatch.setenv("METALD_FAULTS", f"fail:delete.{step}")
        with pytest.raises(Exception, match="injected"):
            await engine.delete("d1", False)
        row = store.get_vm("d1")
        assert row is not None and row.state == VmState.CREATED and store.intents() == []
        assert (settings.run_dir / "d1" / "console.log").read_text() == "keep"
    monkeypatch.delenv("METALD_FAULTS")
    await engine.delete("d1", False)
    assert store.get_vm("d1") is None and not (settings.run_dir / "d1").exists()
