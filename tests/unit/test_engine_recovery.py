"""Reconciliation after a crash, with a fake VMM (real VMMs: tests/e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from metald.core.engine import VmEngine
from metald.core.errors import AlreadyExists
from metald.core.models import VmState
from metald.core.specs import draft_to_dict
from metald.store.sqlite import Store
from tests.support.engine import small_draft
from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import make_settings


async def test_interrupted_create_is_rolled_back(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    network = FakeNetwork()
    # what a crash between the first steps of CreateVm leaves behind
    store.begin_intent("half", "create")
    store.insert_vm("half", "", 1, b"", draft_to_dict(small_draft(settings.image_dir)), "fake", 1, 128 << 20, {})
    await network.allocate("half", None)
    engine = VmEngine(settings, store, FakeBackend(), network)
    report = await engine.start()
    assert report.rolled_back == ["half"]
    assert store.get_vm("half") is None and store.intents() == [] and "half" not in network.allocs


async def test_interrupted_delete_is_finished(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    backend, network = FakeBackend(), FakeNetwork()
    engine = VmEngine(settings, store, backend, network)
    await engine.create("gone", "", small_draft(settings.image_dir), b"")
    store.begin_intent("gone", "delete")
    report = await VmEngine(settings, store, backend, network).reconcile()
    assert report.completed == ["gone"] and store.get_vm("gone") is None
    assert ("cleanup", "gone") in backend.calls


async def test_running_vm_whose_vmm_died_is_marked_shutdown(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    backend = FakeBackend()
    engine = VmEngine(settings, store, backend, FakeNetwork())
    await engine.create("r1", "", small_draft(settings.image_dir), b"")
    await engine.create("r2", "", small_draft(settings.image_dir), b"")
    await engine.boot("r1")
    await engine.boot("r2")
    restarted = FakeBackend()
    restarted.adoptable = {"r2"}
    report = await VmEngine(settings, store, restarted, FakeNetwork()).reconcile()
    assert report.adopted == ["r2"] and report.marked_shutdown == ["r1"]
    row = store.get_vm("r1")
    assert row.state == VmState.SHUTDOWN and "metald was not running" in row.status["last_exit"]
    assert store.get_vm("r2").state == VmState.RUNNING


async def test_duplicate_create_is_refused_before_side_effects(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    network = FakeNetwork()
    engine = VmEngine(settings, store, FakeBackend(), network)
    await engine.create("dup", "", small_draft(settings.image_dir), b"")
    with pytest.raises(AlreadyExists):
        await engine.create("dup", "", small_draft(settings.image_dir), b"")
    assert list(network.allocs) == ["dup"]


async def test_failed_create_step_leaves_nothing(parts, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    network = FakeNetwork()
    engine = VmEngine(settings, store, FakeBackend(), network)
    for step in ("record", "allocate", "validate", "rundir"):
        monkeypatch.setenv("METALD_FAULTS", f"fail:create.{step}")
        with pytest.raises(Exception, match="injected"):
            await engine.create("f1", "", small_draft(settings.image_dir), b"")
        assert store.get_vm("f1") is None and network.allocs == {} and store.intents() == []
        assert not (settings.run_dir / "f1").exists()


async def test_memory_budget_counts_running_vms_only(tmp_path: Path) -> None:
    import os

    from metald.core.errors import ResourceExhausted

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    settings = make_settings(tmp_path, network_enabled=False, host_max_memory_fraction=(300 << 20) / host)
    store = Store(settings.db_path)
    engine = VmEngine(settings, store, FakeBackend(), None)
    for name in ("m1", "m2", "m3"):  # creating costs no memory
        await engine.create(name, "", small_draft(settings.image_dir), b"")
    await engine.boot("m1")
    await engine.boot("m2")
    with pytest.raises(ResourceExhausted, match="held by running VMs"):
        await engine.boot("m3")
    assert store.get_vm("m3").state == VmState.CREATED
    await engine.shutdown("m1", True, 0)
    assert await engine.boot("m3") == VmState.RUNNING
    store.close()
