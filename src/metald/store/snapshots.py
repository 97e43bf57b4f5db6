"""The snapshot repository: rows in SQLite (table ``snapshots``, migration 4 of
``metald.store.sqlite``) and one directory per snapshot under
``<data_dir>/snapshots/<snapshot_id>/``.

Crash-safety rules:

* A row is inserted ``pending`` before any file is written, and set
  ``complete`` only after the backend returned, i.e. after every file and the
  directory were fsynced. Only complete rows are ever returned for use.
* A pending row is never resumed: :meth:`SnapshotRepository.sweep` (at start)
  deletes pending rows and their directories, and directories that have no
  row at all (a delete cut short after its row went).
* Delete removes the row first, then the directory, so no row ever names
  missing files because of metald; files lost otherwise are caught by the
  backend's check before a restore (missing or wrong-sized file).
* A snapshot with users (VMs restored from it whose disks are overlays on its
  files, or a hibernated VM waiting to resume) is deleted only with force.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from metald.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from metald.core.records import SnapshotRecord

log = logging.getLogger(__name__)

SNAPSHOT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NAME_MAX = 128
Purpose = Literal["snapshot", "hibernation"]
COLUMNS = (
    "seq, snapshot_id, name, source_vm_id, customer_id, state, purpose, config, spec, manifest,"
    " state_bytes, disk_bytes, created_at, completed_at"
)


SnapshotRow = SnapshotRecord  # the core's type (metald.core.records)


def _row(r: Sequence[Any]) -> SnapshotRow:
    return SnapshotRow(
        seq=r[0],
        snapshot_id=r[1],
        name=r[2],
        source_vm_id=r[3],
        customer_id=r[4],
        state=r[5],
        purpose=r[6],
        config=bytes(r[7]),
        spec=json.loads(r[8]),
        manifest=json.loads(r[9]),
        state_bytes=r[10],
        disk_bytes=r[11],
        created_at=r[12],
        completed_at=r[13],
    )


def new_snapshot_id() -> str:
    return f"snap-{secrets.token_hex(6)}"


def check_snapshot_id(snapshot_id: str) -> str:
    if not SNAPSHOT_ID_RE.match(snapshot_id):
        raise InvalidArgument("snapshot_id", "must be 1-63 of a-z, 0-9 and '-', starting with a letter or digit")
    return snapshot_id


class SnapshotRepository:
    """Snapshot rows (own connection to the store's SQLite file) and their directories.

    The schema comes from the store's migrations: open ``Store(path)`` first.
    """

    def __init__(self, db_path: Path, root: Path) -> None:
        self.root = root
        self._db = sqlite3.connect(str(db_path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def directory(self, snapshot_id: str) -> Path:
        return self.root / check_snapshot_id(snapshot_id)

    # --- taking a snapshot ----------------------------------------------------------
    def begin(
        self,
        snapshot_id: str,
        *,
        name: str,
        source_vm_id: str,
        customer_id: str,
        config: bytes,
        spec: dict[str, Any],
        purpose: Purpose = "snapshot",
    ) -> Path:
        """Record a pending snapshot; returns the directory the backend writes (not created)."""
        check_snapshot_id(snapshot_id)
        if len(name) > NAME_MAX:
            raise InvalidArgument("name", f"at most {NAME_MAX} characters")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO snapshots (snapshot_id, name, source_vm_id, customer_id, state, purpose,"
                    " config, spec, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                    (snapshot_id, name, source_vm_id, customer_id, purpose, config, json.dumps(spec), int(time.time())),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"snapshot {snapshot_id} already exists") from None
        return self.directory(snapshot_id)

    def complete(self, snapshot_id: str, manifest: dict[str, Any], state_bytes: int, disk_bytes: int) -> SnapshotRow:
        """Mark the snapshot complete: call only once its files are durable."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE snapshots SET state = 'complete', manifest = ?, state_bytes = ?, disk_bytes = ?,"
                " completed_at = ? WHERE snapshot_id = ? AND state = 'pending'",
                (json.dumps(manifest), state_bytes, disk_bytes, int(time.time()), snapshot_id),
            )
            if cur.rowcount != 1:
                raise NotFound(f"no pending snapshot {snapshot_id}")
        row = self._get(snapshot_id)
        assert row is not None
        return row

    def abort(self, snapshot_id: str) -> None:
        """Forget a pending snapshot and its files (undo of :meth:`begin`)."""
        shutil.rmtree(self.directory(snapshot_id), ignore_errors=True)
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE snapshot_id = ? AND state = 'pending'", (snapshot_id,))

    # --- reading --------------------------------------------------------------------
    def _get(self, snapshot_id: str) -> SnapshotRow | None:
        with self._lock:
            r = self._db.execute(f"SELECT {COLUMNS} FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)).fetchone()
        return _row(r) if r else None

    def get(self, snapshot_id: str, customer_id: str | None = None) -> SnapshotRow:
        """A complete snapshot; NotFound for pending ones and other customers' (invisible)."""
        row = self._get(snapshot_id)
        if row is None or not row.complete or (customer_id is not None and row.customer_id != customer_id):
            raise NotFound(f"snapshot {snapshot_id} not found")
        return row

    def list_snapshots(
        self, customer_id: str | None = None, source_vm_id: str | None = None, after_seq: int = 0, limit: int = 1000
    ) -> list[SnapshotRow]:
        """Complete snapshots in creation order, optionally of one customer or source VM."""
        query = f"SELECT {COLUMNS} FROM snapshots WHERE state = 'complete' AND seq > ?"
        args: list[Any] = [after_seq]
        if customer_id is not None:
            query += " AND customer_id = ?"
            args.append(customer_id)
        if source_vm_id is not None:
            query += " AND source_vm_id = ?"
            args.append(source_vm_id)
        query += " ORDER BY seq LIMIT ?"
        args.append(limit)
        with self._lock:
            return [_row(r) for r in self._db.execute(query, args).fetchall()]

    # --- users (VMs whose disks or resume depend on the snapshot's files) ---------------
    def add_user(self, vm_id: str, snapshot_id: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO snapshot_users (vm_id, snapshot_id) VALUES (?, ?)", (vm_id, snapshot_id)
            )

    def remove_user(self, vm_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM snapshot_users WHERE vm_id = ?", (vm_id,))

    def users(self, snapshot_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT vm_id FROM snapshot_users WHERE snapshot_id = ? ORDER BY vm_id", (snapshot_id,)
            ).fetchall()
        return [r[0] for r in rows]

    # --- deleting -----------------------------------------------------------------------
    def delete(self, snapshot_id: str, customer_id: str | None = None, force: bool = False) -> None:
        """Delete a complete snapshot: the row, then its directory."""
        self.get(snapshot_id, customer_id)
        users = self.users(snapshot_id)
        if users and not force:
            raise FailedPrecondition(
                f"snapshot {snapshot_id} is in use by {', '.join(users)}: delete those first or use force"
            )
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE snapshot_id = ?", (snapshot_id,))
            db.execute("DELETE FROM snapshot_users WHERE snapshot_id = ?", (snapshot_id,))
        shutil.rmtree(self.directory(snapshot_id), ignore_errors=True)

    def sweep(self) -> list[str]:
        """At start: remove pending snapshots (rows and files) and directories without a row."""
        removed: list[str] = []
        with self._tx() as db:
            pending = [r[0] for r in db.execute("SELECT snapshot_id FROM snapshots WHERE state = 'pending'")]
            db.execute("DELETE FROM snapshots WHERE state = 'pending'")
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT snapshot_id FROM snapshots")}
        for snapshot_id in pending:
            shutil.rmtree(self.root / snapshot_id, ignore_errors=True)
            removed.append(snapshot_id)
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.name not in known and entry.name not in removed:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed.append(entry.name)
        if removed:
            log.warning("removed incomplete snapshots: %s", ", ".join(sorted(removed)))
        return sorted(removed)
