"""The snapshot repository: pending rows are never used and are swept; users block delete."""

from __future__ import annotations

from pathlib import Path

import pytest

from metald.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from metald.store.snapshots import SnapshotRepository
from metald.store.sqlite import Store


@pytest.fixture
def repo(tmp_path: Path) -> SnapshotRepository:
    Store(tmp_path / "metald.db").close()  # runs the migrations
    return SnapshotRepository(tmp_path / "metald.db", tmp_path / "snapshots")


def _begin(repo: SnapshotRepository, snapshot_id: str, customer: str = "c1") -> Path:
    return repo.begin(snapshot_id, name="n", source_vm_id="vm1", customer_id=customer, config=b"\x01", spec={"a": 1})


def test_pending_is_invisible_until_complete(repo: SnapshotRepository) -> None:
    directory = _begin(repo, "s1")
    directory.mkdir()
    with pytest.raises(NotFound):
        repo.get("s1")
    assert repo.list_snapshots() == []
    row = repo.complete("s1", {"format": 1}, 10, 20)
    assert row.complete and row.size_bytes == 30 and row.config == b"\x01" and row.spec == {"a": 1}
    assert [r.snapshot_id for r in repo.list_snapshots()] == ["s1"]
    with pytest.raises(NotFound):
        repo.complete("s1", {}, 0, 0)  # only a pending row completes


def test_other_customers_snapshot_is_invisible(repo: SnapshotRepository) -> None:
    _begin(repo, "s1", customer="c1")
    repo.complete("s1", {}, 1, 1)
    assert repo.get("s1", "c1").snapshot_id == "s1"
    with pytest.raises(NotFound):
        repo.get("s1", "c2")
    assert repo.list_snapshots(customer_id="c2") == []
    with pytest.raises(NotFound):
        repo.delete("s1", customer_id="c2")


def test_bad_and_duplicate_ids(repo: SnapshotRepository) -> None:
    with pytest.raises(InvalidArgument, match="snapshot_id"):
        _begin(repo, "../x")
    _begin(repo, "s1")
    with pytest.raises(AlreadyExists):
        _begin(repo, "s1")


def test_delete_refuses_with_users_unless_forced(repo: SnapshotRepository) -> None:
    directory = _begin(repo, "s1")
    directory.mkdir()
    (directory / "vmstate").write_bytes(b"x")
    repo.complete("s1", {}, 1, 0)
    repo.add_user("clone-1", "s1")
    with pytest.raises(FailedPrecondition, match="clone-1"):
        repo.delete("s1")
    assert directory.exists()
    repo.delete("s1", force=True)
    assert not directory.exists() and repo.users("s1") == []
    with pytest.raises(NotFound):
        repo.get("s1")


def test_sweep_removes_pending_and_orphan_directories(repo: SnapshotRepository) -> None:
    pending = _begin(repo, "pending-1")
    pending.mkdir()
    (pending / "vmstate").write_bytes(b"half")
    done = _begin(repo, "done-1")
    done.mkdir()
    repo.complete("done-1", {}, 1, 0)
    orphan = repo.root / "orphan-1"
    orphan.mkdir()
    assert repo.sweep() == ["orphan-1", "pending-1"]
    assert not pending.exists() and not orphan.exists() and done.exists()
    assert [r.snapshot_id for r in repo.list_snapshots()] == ["done-1"]
    _begin(repo, "pending-1")  # the id is free again


def test_abort_removes_row_and_files(repo: SnapshotRepository) -> None:
    directory = _begin(repo, "s1")
    directory.mkdir()
    repo.abort("s1")
    assert not directory.exists()
    _begin(repo, "s1")
