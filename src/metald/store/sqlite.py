"""Durable state in one SQLite file (WAL): VMs, IP and port allocations, and
an append-only event log of operations.

All writes go through this class. Calls are synchronous and short (indexed
single-row statements); the daemon calls them from its event loop.
Uniqueness of IPs and host ports is enforced by the schema, so an address can
never be handed out twice, whatever the concurrency.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metald.core.models import VmState
from metald.core.records import DuplicateVm, Intent, VmRecord

__all__ = ["AddressTaken", "DuplicateVm", "Intent", "Store", "VmRow"]

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE vms (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL UNIQUE,
        customer_id TEXT NOT NULL DEFAULT '',
        state INTEGER NOT NULL,
        config BLOB NOT NULL,
        spec TEXT NOT NULL DEFAULT '{}',
        backend TEXT NOT NULL DEFAULT '',
        handle TEXT NOT NULL DEFAULT '{}',
        network TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL DEFAULT '{}',
        vcpu_count INTEGER NOT NULL DEFAULT 0,
        memory_bytes INTEGER NOT NULL DEFAULT 0,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        modified_at INTEGER NOT NULL
    );
    CREATE INDEX vms_state ON vms(state, seq);
    CREATE INDEX vms_customer ON vms(customer_id, seq);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        vm_id TEXT NOT NULL,
        operation TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_vm ON events(vm_id, id);
    CREATE TABLE ip_allocations (
        ip TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL UNIQUE
    );
    CREATE TABLE port_allocations (
        host_port INTEGER NOT NULL,
        protocol TEXT NOT NULL,
        vm_id TEXT NOT NULL,
        guest_port INTEGER NOT NULL,
        PRIMARY KEY (host_port, protocol)
    );
    CREATE INDEX port_allocations_vm ON port_allocations(vm_id);
    CREATE TABLE intents (
        vm_id TEXT PRIMARY KEY,
        operation TEXT NOT NULL,
        started_at REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    """,
    # 2: short ids used in per-VM device names (vh_/vn_/tap_<short>), unique
    """
    CREATE TABLE net_short_ids (
        short_id TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL UNIQUE
    );
    """,
    # 3: snapshots and the VMs restored from them (see metald.store.snapshots)
    """
    CREATE TABLE snapshots (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        snapshot_id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL DEFAULT '',
        source_vm_id TEXT NOT NULL,
        customer_id TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL CHECK (state IN ('pending', 'complete')),
        purpose TEXT NOT NULL DEFAULT 'snapshot',
        config BLOB NOT NULL,
        spec TEXT NOT NULL DEFAULT '{}',
        manifest TEXT NOT NULL DEFAULT '{}',
        state_bytes INTEGER NOT NULL DEFAULT 0,
        disk_bytes INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        completed_at INTEGER
    );
    CREATE INDEX snapshots_customer ON snapshots(customer_id, seq);
    CREATE INDEX snapshots_source ON snapshots(source_vm_id);
    CREATE TABLE snapshot_users (
        vm_id TEXT PRIMARY KEY,
        snapshot_id TEXT NOT NULL
    );
    CREATE INDEX snapshot_users_snapshot ON snapshot_users(snapshot_id);
    """,
]


class VmRow(VmRecord):
    """A VmRecord read from the store: its JSON columns are decoded on first use
    (see _row_to_vm)."""

    def __getattr__(self, name: str) -> Any:
        raw = self.__dict__.get("_raw")
        if raw is not None and name in raw:
            value = json.loads(raw[name])
            setattr(self, name, value)
            return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class AddressTaken(Exception):
    pass


_VM_COLUMNS = (
    "seq, vm_id, customer_id, state, config, spec, backend, handle, network, status, "
    "vcpu_count, memory_bytes, metadata, created_at, modified_at"
)


def _row_to_vm(row: Sequence[Any]) -> VmRow:
    """A VmRow whose JSON columns are decoded when first read: a ListVms page
    uses only ``metadata`` of them, and decoding all five columns of 100 rows
    was most of its cost."""
    vm = object.__new__(VmRow)
    vm.__dict__.update(
        seq=row[0],
        vm_id=row[1],
        customer_id=row[2],
        state=VmState(row[3]),
        config=row[4],
        backend=row[6],
        vcpu_count=row[10],
        memory_bytes=row[11],
        created_at=row[13],
        modified_at=row[14],
        _raw={"spec": row[5], "handle": row[7], "network": row[8], "status": row[9], "metadata": row[12]},
    )
    return vm


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=30
        )
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    # --- plumbing ------------------------------------------------------------
    def _migrate(self) -> None:
        with self._tx():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> None:
        with self._lock:
            self._db.execute("SELECT 1").fetchone()

    # --- VMs -----------------------------------------------------------------
    def insert_vm(
        self,
        vm_id: str,
        customer_id: str,
        state: int,
        config: bytes,
        spec: dict[str, Any],
        backend: str,
        vcpu_count: int,
        memory_bytes: int,
        metadata: dict[str, str],
        network: dict[str, Any] | None = None,
    ) -> VmRecord:
        now = int(time.time())
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO vms (vm_id, customer_id, state, config, spec, backend, network,"
                    " vcpu_count, memory_bytes, metadata, created_at, modified_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        vm_id,
                        customer_id,
                        state,
                        config,
                        json.dumps(spec),
                        backend,
                        json.dumps(network or {}),
                        vcpu_count,
                        memory_bytes,
                        json.dumps(metadata),
                        now,
                        now,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise DuplicateVm(vm_id) from exc
        vm = self.get_vm(vm_id)
        assert vm is not None
        return vm

    def get_vm(self, vm_id: str) -> VmRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_VM_COLUMNS} FROM vms WHERE vm_id = ?", (vm_id,)
            ).fetchone()
        return _row_to_vm(row) if row else None

    def update_vm(self, vm_id: str, **fields: Any) -> None:
        """Update columns of one VM; dict values are stored as JSON."""
        if not fields:
            return
        sets, values = [], []
        for key, value in fields.items():
            sets.append(f"{key} = ?")
            values.append(json.dumps(value) if isinstance(value, dict) else value)
        sets.append("modified_at = ?")
        values.append(int(time.time()))
        values.append(vm_id)
        with self._tx() as db:
            db.execute(f"UPDATE vms SET {', '.join(sets)} WHERE vm_id = ?", values)

    def delete_vm(self, vm_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM vms WHERE vm_id = ?", (vm_id,))
            db.execute("DELETE FROM ip_allocations WHERE vm_id = ?", (vm_id,))
            db.execute("DELETE FROM port_allocations WHERE vm_id = ?", (vm_id,))
            db.execute("DELETE FROM net_short_ids WHERE vm_id = ?", (vm_id,))
            db.execute("DELETE FROM intents WHERE vm_id = ?", (vm_id,))

    def list_vms(
        self,
        states: Sequence[int] = (),
        after_seq: int = 0,
        limit: int = 100,
        customer_id: str | None = None,
    ) -> tuple[list[VmRecord], int]:
        """One page in creation order after ``after_seq``, and the filtered total."""
        where: list[str] = ["1=1"]
        args: list[object] = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        if customer_id is not None:
            where.append("customer_id = ?")
            args.append(customer_id)
        cond = " AND ".join(where)
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM vms WHERE {cond}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {_VM_COLUMNS} FROM vms WHERE {cond} AND seq > ? ORDER BY seq LIMIT ?",
                [*args, after_seq, limit],
            ).fetchall()
        return [_row_to_vm(r) for r in rows], total

    def all_vms(self) -> list[VmRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_VM_COLUMNS} FROM vms ORDER BY seq").fetchall()
        return [_row_to_vm(r) for r in rows]

    def count_by_state(self) -> dict[int, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM vms GROUP BY state").fetchall()
        return {state: count for state, count in rows}

    def active_memory_bytes(self) -> int:
        """Memory of the VMs that hold it: RUNNING and PAUSED (uses the state index)."""
        with self._lock:
            return self._db.execute(
                "SELECT COALESCE(SUM(memory_bytes),0) FROM vms WHERE state IN (2, 3)"
            ).fetchone()[0]

    # --- events --------------------------------------------------------------
    def add_event(self, vm_id: str, operation: str, outcome: str, detail: str = "") -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (ts, vm_id, operation, outcome, detail) VALUES (?,?,?,?,?)",
                (time.time(), vm_id, operation, outcome, detail),
            )

    def events(self, vm_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            if vm_id is None:
                rows = self._db.execute(
                    "SELECT id, ts, vm_id, operation, outcome, detail FROM events"
                    " ORDER BY id DESC LIMIT ?",
                    (limit,),
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT id, ts, vm_id, operation, outcome, detail FROM events"
                    " WHERE vm_id = ? ORDER BY id DESC LIMIT ?",
                    (vm_id, limit),
                ).fetchall()
        keys = ("id", "ts", "vm_id", "operation", "outcome", "detail")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # --- intents (write-ahead record of a mutating operation) ---------------
    def begin_intent(self, vm_id: str, operation: str, detail: dict[str, Any] | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO intents (vm_id, operation, started_at, detail)"
                " VALUES (?,?,?,?)",
                (vm_id, operation, time.time(), json.dumps(detail or {})),
            )

    def end_intent(self, vm_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM intents WHERE vm_id = ?", (vm_id,))

    def intents(self) -> list[Intent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT vm_id, operation, started_at, detail FROM intents"
            ).fetchall()
        return [Intent(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    # --- IP addresses --------------------------------------------------------
    def claim_ip(self, vm_id: str, ip: str) -> None:
        """Record ``ip`` as the VM's; AddressTaken if another VM holds it."""
        try:
            with self._tx() as db:
                db.execute("INSERT INTO ip_allocations (ip, vm_id) VALUES (?,?)", (ip, vm_id))
        except sqlite3.IntegrityError as exc:
            raise AddressTaken(ip) from exc

    def ip_of(self, vm_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT ip FROM ip_allocations WHERE vm_id = ?", (vm_id,)
            ).fetchone()
        return row[0] if row else None

    def release_ip(self, vm_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM ip_allocations WHERE vm_id = ?", (vm_id,))

    def allocated_ips(self) -> dict[str, str]:
        """ip -> vm_id for every allocation."""
        with self._lock:
            rows = self._db.execute("SELECT ip, vm_id FROM ip_allocations").fetchall()
        return dict(rows)

    def ip_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM ip_allocations").fetchone()[0]

    # --- host ports ----------------------------------------------------------
    def claim_port(self, vm_id: str, host_port: int, protocol: str, guest_port: int) -> None:
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO port_allocations (host_port, protocol, vm_id, guest_port)"
                    " VALUES (?,?,?,?)",
                    (host_port, protocol, vm_id, guest_port),
                )
        except sqlite3.IntegrityError as exc:
            raise AddressTaken(f"{host_port}/{protocol}") from exc

    def ports_of(self, vm_id: str) -> list[tuple[int, str, int]]:
        """(host_port, protocol, guest_port) of the VM's forwards."""
        with self._lock:
            rows = self._db.execute(
                "SELECT host_port, protocol, guest_port FROM port_allocations"
                " WHERE vm_id = ? ORDER BY host_port",
                (vm_id,),
            ).fetchall()
        return [(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    def used_ports(self, protocol: str) -> set[int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT host_port FROM port_allocations WHERE protocol = ?", (protocol,)
            ).fetchall()
        return {r[0] for r in rows}

    def release_ports(self, vm_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM port_allocations WHERE vm_id = ?", (vm_id,))

    # --- device-name short ids -------------------------------------------------
    def claim_short_id(self, vm_id: str, short_id: str) -> None:
        """Record ``short_id`` as the VM's; AddressTaken if another VM holds it."""
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO net_short_ids (short_id, vm_id) VALUES (?,?)",
                    (short_id, vm_id),
                )
        except sqlite3.IntegrityError as exc:
            raise AddressTaken(short_id) from exc

    def short_id_of(self, vm_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT short_id FROM net_short_ids WHERE vm_id = ?", (vm_id,)
            ).fetchone()
        return row[0] if row else None

    def release_short_id(self, vm_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM net_short_ids WHERE vm_id = ?", (vm_id,))

    def short_ids(self) -> dict[str, str]:
        """short_id -> vm_id for every VM holding one."""
        with self._lock:
            rows = self._db.execute("SELECT short_id, vm_id FROM net_short_ids").fetchall()
        return dict(rows)
