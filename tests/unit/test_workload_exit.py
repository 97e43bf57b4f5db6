"""Workload exits reported on a guest's console become WORKLOAD_EXITED events."""

from __future__ import annotations

from pathlib import Path

from metald.store.event_log import Filter, Kind
from metald.store.sqlite import Store
from metald.streams.workload import WorkloadWatcher
from tests.support.server import make_settings


def test_console_marker_becomes_an_event(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    store = Store(settings.db_path)
    store.insert_vm("w-1", "cust", 2, b"", {}, "fake", 1, 1 << 27, {})  # RUNNING
    store.insert_vm("w-2", "cust", 4, b"", {}, "fake", 1, 1 << 27, {})  # SHUTDOWN: not read
    log = settings.run_dir / "w-1" / "console.log"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"METALD_WORKLOAD_EXIT code=9\n")  # before metald looked: not reported
    watcher = WorkloadWatcher(store, settings)
    assert watcher.scan() == 0
    with open(log, "ab") as f:
        f.write(b"booting\nMETALD_WORKLOAD_EXIT code=3\nMETALD_WORKLOAD_EX")
    assert watcher.scan() == 1
    with open(log, "ab") as f:  # the rest of a line written in two parts
        f.write(b"IT code=0\nnot METALD_WORKLOAD_EXIT code=5\n")
    assert watcher.scan() == 1
    events = store.events_after(0, 1 << 40, Filter(kinds=frozenset({int(Kind.WORKLOAD_EXITED)})))
    assert [(e.vm_id, e.customer_id, e.message, e.state) for e in events] == [
        ("w-1", "cust", "code=3", 2), ("w-1", "cust", "code=0", 2)]
    store.close()
