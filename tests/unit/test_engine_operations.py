"""The operation runner and the backend contract, with the fake backend (which
implements every port the engine uses, so these run the engine's real branches)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from metald.core.engine import VmEngine
from metald.core.errors import MetaldError
from metald.core.models import VmState
from metald.store.sqlite import Store
from tests.support.engine import small_draft
from tests.support.fakes import FakeBackend, FakeNetwork


class FullDisk(Store):
    """A store whose next state write (or VM delete) fails like a full disk, once."""

    fail_state_writes = 0
    fail_deletes = 0

    def update_vm(self, vm_id: str, **fields: Any) -> None:
        if "state" in fields and self.fail_state_writes:
            self.fail_state_writes -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super().update_vm(vm_id, **fields)

    def delete_vm(self, vm_id: str) -> None:
        if self.fail_deletes:
            self.fail_deletes -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super().delete_vm(vm_id)


@pytest.fixture
def full_disk(parts):  # type: ignore[no-untyped-def]
    settings, plain = parts
    plain.close()
    store = FullDisk(Path(settings.db_path))
    yield settings, store
    store.close()


async def running(engine: VmEngine, vm_id: str) -> None:
    await engine.create(vm_id, "", small_draft(engine.settings.image_dir), b"")
    await engine.boot(vm_id)


async def test_pause_whose_state_write_fails_resumes_the_vmm(full_disk) -> None:  # type: ignore[no-untyped-def]
    settings, store = full_disk
    backend = FakeBackend()
    engine = VmEngine(settings, store, backend, FakeNetwork())
    await running(engine, "p1")
    store.fail_state_writes = 1
    with pytest.raises(MetaldError, match="disk is full"):
        await engine.pause("p1")
    row = store.get_vm("p1")
    assert row is not None and row.state == VmState.RUNNING and backend.running["p1"] == "running"
    assert ("resume", "p1") in backend.calls  # the pause was undone
    assert await engine.pause("p1") == VmState.PAUSED and backend.running["p1"] == "paused"


async def test_resume_whose_state_write_fails_pauses_the_vmm_again(full_disk) -> None:  # type: ignore[no-untyped-def]
    settings, store = full_disk
    backend = FakeBackend()
    engine = VmEngine(settings, store, backend, FakeNetwork())
    await running(engine, "r1")
    await engine.pause("r1")
    store.fail_state_writes = 1
    with pytest.raises(MetaldError, match="disk is full"):
        await engine.resume("r1")
    row = store.get_vm("r1")
    assert row is not None and row.state == VmState.PAUSED and backend.running["r1"] == "paused"
    assert await engine.resume("r1") == VmState.RUNNING and backend.running["r1"] == "running"


async def test_shutdown_state_write_is_retried_after_the_stop(full_disk) -> None:  # type: ignore[no-untyped-def]
    settings, store = full_disk
    backend = FakeBackend()
    engine = VmEngine(settings, store, backend, FakeNetwork())
    await running(engine, "s1")
    store.fail_state_writes = 1  # the VMM is gone once stopped: the record must follow it
    assert await engine.shutdown("s1", True, 0) == VmState.SHUTDOWN
    row = store.get_vm("s1")
    assert row is not None and row.state == VmState.SHUTDOWN and "s1" not in backend.running


async def test_failed_delete_restores_jail_network_claims_and_files(full_disk) -> None:  # type: ignore[no-untyped-def]
    settings, store = full_disk
    backend, network = FakeBackend(), FakeNetwork()
    engine = VmEngine(settings, store, backend, network)
    await running(engine, "d1")
    await engine.shutdown("d1", True, 0)
    assert backend.jail_exists("d1") and "d1" in network.allocs
    store.fail_deletes = 1  # the last step (forget the record) fails
    with pytest.raises(MetaldError, match="disk is full"):
        await engine.delete("d1", False)
    row = store.get_vm("d1")
    assert row is not None and row.state == VmState.SHUTDOWN
    assert backend.jail_exists("d1") and "d1" in network.allocs  # undone: jail made again, claims back
    assert (settings.run_dir / "d1").is_dir()
    await engine.delete("d1", False)
    assert store.get_vm("d1") is None and not backend.jail_exists("d1")


async def test_interrupted_pause_is_settled_from_the_vmms_run_state(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    backend, network = FakeBackend(), FakeNetwork()
    await running(VmEngine(settings, store, backend, network), "ip1")
    backend.running["ip1"] = "paused"  # paused; metald stopped before recording it
    backend.adoptable = {"ip1"}
    report = await VmEngine(settings, store, backend, network).start()
    row = store.get_vm("ip1")
    assert report.adopted == ["ip1"] and row is not None and row.state == VmState.PAUSED


async def test_vms_whose_vmm_is_not_adopted_are_shut_down_with_the_reason(parts) -> None:  # type: ignore[no-untyped-def]
    settings, store = parts
    backend, network = FakeBackend(), FakeNetwork()
    await running(VmEngine(settings, store, backend, network), "gone1")
    backend.running.clear()
    report = await VmEngine(settings, store, backend, network).start()
    row = store.get_vm("gone1")
    assert report.marked_shutdown == ["gone1"] and row is not None and row.state == VmState.SHUTDOWN
    assert "no VMM to adopt" in row.status["last_exit"] and "gone1" in backend.discarded
