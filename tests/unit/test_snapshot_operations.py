"""SnapshotVm, hibernation, CloneVm and their rollbacks, with the fake backend
(tests/support/fakes.py FakeSnapshotter) and the real snapshot repository."""

from __future__ import annotations

from dataclasses import replace

import pytest

from metald.core.engine import VmEngine
from metald.core.errors import FailedPrecondition, MetaldError, NotFound, Unimplemented
from metald.core.models import Drive, VmState
from metald.core.operations import CloneRequest
from metald.store.snapshots import SnapshotRepository
from tests.support.engine import small_draft
from tests.support.fakes import FakeBackend, FakeNetwork


@pytest.fixture
def world(parts):  # type: ignore[no-untyped-def]
    settings, store = parts
    repo = SnapshotRepository(settings.db_path, settings.data_dir / "snapshots")
    backend = FakeBackend()
    network = FakeNetwork()
    engine = VmEngine(settings, store, backend, network, snapshots=repo)
    yield engine, backend, repo, store
    repo.close()


async def running(engine: VmEngine, vm_id: str, customer: str = "acme") -> None:
    draft = small_draft(engine.settings.image_dir)
    rootfs = Drive("rootfs", engine.settings.image_dir / "rootfs.ext4", read_only=True, is_root=True)
    await engine.create(vm_id, customer, replace(draft, drives=(rootfs,)), b"cfg")
    await engine.boot(vm_id)


async def test_snapshot_keeps_the_vm_running_and_lists_the_snapshot(world) -> None:  # type: ignore[no-untyped-def]
    engine, backend, repo, store = world
    await running(engine, "t1")
    snap = await engine.snapshot("t1", "snap-a", "first", stop=False)
    assert snap.complete and snap.customer_id == "acme" and snap.purpose == "snapshot"
    assert store.get_vm("t1").state == VmState.RUNNING and backend.running["t1"] == "running"
    assert [s.snapshot_id for s in repo.list_snapshots("acme")] == ["snap-a"]
    assert repo.list_snapshots("other") == []


async def test_hibernate_then_boot_restores_from_the_snapshot(world) -> None:  # type: ignore[no-untyped-def]
    engine, backend, repo, store = world
    await running(engine, "h1")
    await engine.snapshot("h1", "snap-h", "", stop=True)
    assert store.get_vm("h1").state == VmState.SHUTDOWN and "h1" not in backend.running
    assert repo.users("snap-h") == ["h1"]
    with pytest.raises(FailedPrecondition, match="in use by h1"):
        repo.delete("snap-h")
    assert await engine.boot("h1") == VmState.RUNNING
    assert ("restore", "h1") in backend.calls and ("boot", "h1") not in backend.calls[-1:]
    assert repo.users("snap-h") == []  # resumed: no longer waiting on it
    await engine.shutdown("h1", True, 0)
    await engine.boot("h1")  # a later boot is a cold one
    assert backend.calls[-1] == ("boot", "h1")


async def test_snapshot_from_a_wrong_state_is_failed_precondition(world) -> None:  # type: ignore[no-untyped-def]
    engine, _, repo, _ = world
    await engine.create("c1", "acme", small_draft(engine.settings.image_dir), b"")
    with pytest.raises(FailedPrecondition, match="CREATED"):
        await engine.snapshot("c1", "snap-x", "", stop=False)
    assert repo.list_snapshots() == [] and not (repo.root / "snap-x").exists()


@pytest.mark.parametrize("step", ["record", "save"])
async def test_a_fault_at_each_snapshot_step_leaves_nothing(world, monkeypatch, step) -> None:  # type: ignore[no-untyped-def]
    engine, backend, repo, store = world
    await running(engine, "f1")
    monkeypatch.setenv("METALD_FAULTS", f"fail:snapshot.{step}")
    with pytest.raises(MetaldError):
        await engine.snapshot("f1", "snap-f", "", stop=True)
    monkeypatch.delenv("METALD_FAULTS")
    with pytest.raises(NotFound):
        repo.get("snap-f")
    assert not (repo.root / "snap-f").exists()
    assert store.get_vm("f1").state == VmState.RUNNING and backend.running["f1"] == "running"
    assert store.intents() == []


async def test_a_failed_hibernation_record_keeps_the_only_copy_of_the_guest(world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine, backend, repo, _ = world
    await running(engine, "f2")
    monkeypatch.setenv("METALD_FAULTS", "fail:snapshot.hibernate")
    with pytest.raises(MetaldError):
        await engine.snapshot("f2", "snap-g", "", stop=True)
    assert repo.get("snap-g").complete and "f2" not in backend.running  # the VMM quit: cannot be undone


async def test_clone_is_a_new_vm_whose_first_boot_restores(world) -> None:  # type: ignore[no-untyped-def]
    engine, backend, repo, store = world
    await running(engine, "tpl")
    await engine.snapshot("tpl", "snap-t", "", stop=False)
    row = await engine.clone("k1", CloneRequest("snap-t", "acme"))
    assert row.state == VmState.CREATED and row.network and row.network != store.get_vm("tpl").network
    assert (engine.ctx.disks_dir("k1") / "rootfs.qcow2").exists()
    assert repo.users("snap-t") == ["k1"]
    await engine.boot("k1")
    assert ("restore_clone", "k1") in backend.calls
    await engine.shutdown("k1", True, 0)
    await engine.boot("k1")
    assert backend.calls[-2:] == [("boot_clone", "k1"), ("boot", "k1")]
    await engine.delete("k1", force=True)
    assert not engine.ctx.disks_dir("k1").exists() and repo.users("snap-t") == []
    repo.delete("snap-t")  # no longer in use


async def test_another_customers_snapshot_cannot_be_cloned(world) -> None:  # type: ignore[no-untyped-def]
    engine, _, _, store = world
    await running(engine, "tpl2")
    await engine.snapshot("tpl2", "snap-p", "", stop=False)
    with pytest.raises(NotFound):
        await engine.clone("k2", CloneRequest("snap-p", "intruder"))
    assert store.get_vm("k2") is None


@pytest.mark.parametrize("step", ["drives", "record", "allocate", "validate", "rundir", "network", "user"])
async def test_a_fault_at_each_clone_step_leaves_nothing(world, monkeypatch, step) -> None:  # type: ignore[no-untyped-def]
    engine, _, repo, store = world
    await running(engine, "tpl3")
    await engine.snapshot("tpl3", "snap-c", "", stop=False)
    monkeypatch.setenv("METALD_FAULTS", f"fail:clone.{step}")
    with pytest.raises(MetaldError):
        await engine.clone("k3", CloneRequest("snap-c", "acme"))
    monkeypatch.delenv("METALD_FAULTS")
    assert store.get_vm("k3") is None and repo.users("snap-c") == [] and store.intents() == []
    assert not engine.ctx.disks_dir("k3").exists() and not engine.ctx.layout.run_dir("k3").exists()


async def test_interrupted_snapshot_leaves_no_complete_snapshot_and_runs_the_guest(world) -> None:  # type: ignore[no-untyped-def]
    engine, backend, repo, store = world
    await running(engine, "i1")
    repo.begin("snap-i", name="", source_vm_id="i1", customer_id="acme", config=b"", spec={})
    store.begin_intent("i1", "snapshot", {"from": int(VmState.RUNNING), "snapshot_id": "snap-i", "stop": False})
    backend.running["i1"] = "paused"  # the save had stopped the guest when metald died
    backend.adoptable.add("i1")
    engine2 = VmEngine(engine.settings, store, backend, FakeNetwork(), snapshots=repo)
    await engine2.reconcile()
    await engine2.wait_settled()
    with pytest.raises(NotFound):
        repo.get("snap-i")
    assert not (repo.root / "snap-i").exists()
    assert backend.running["i1"] == "running" and store.get_vm("i1").state == VmState.RUNNING


async def test_backend_without_snapshots_is_unimplemented_naming_it(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    engine = VmEngine(settings, store, FakeBackend(snapshots=False), FakeNetwork(), snapshots=None)
    await running(engine, "u1")
    with pytest.raises(Unimplemented, match="fake backend"):
        await engine.snapshot("u1", "snap-u", "", stop=False)
