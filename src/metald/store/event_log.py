"""The host's event log in SQLite: one row per event, numbered by the table's
AUTOINCREMENT id, which never goes back (not after a restart, not after
pruning), so it serves as the per-host sequence number of the event stream.

Rows are only ever appended, inside the transaction of the change they
describe (a state change and its event commit together), and removed from the
front by :func:`prune`. So the log always holds one contiguous range
``(floor, head]`` of sequence numbers.

The functions take the store's connection and are called under its lock.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

# Schema migration 3 (appended to the store's MIGRATIONS).
MIGRATION = """
    ALTER TABLE events ADD COLUMN customer_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE events ADD COLUMN kind INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE events ADD COLUMN state INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE events ADD COLUMN previous_state INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE events ADD COLUMN code TEXT NOT NULL DEFAULT '';
    CREATE INDEX events_ts ON events(ts);
"""


class Kind(IntEnum):
    """Mirrors ``metal.vmprovisioner.v1.EventKind`` (events.proto)."""

    UNSPECIFIED = 0
    STATE_CHANGED = 1
    VM_REMOVED = 2
    OPERATION_STARTED = 3
    OPERATION_SUCCEEDED = 4
    OPERATION_FAILED = 5
    VMM_EXITED = 6
    RECONCILED = 7
    VMM_ADOPTED = 8
    LEFTOVER_REMOVED = 9
    WORKLOAD_EXITED = 10


# add_event(operation=...) values that name a kind of their own.
_KIND_OF_OPERATION = {
    "vmm-exit": Kind.VMM_EXITED,
    "reconcile": Kind.RECONCILED,
    "adopt": Kind.VMM_ADOPTED,
    "leftover": Kind.LEFTOVER_REMOVED,
    "workload": Kind.WORKLOAD_EXITED,
}


def classify(operation: str, outcome: str) -> Kind:
    """The kind of an ``add_event(operation, outcome)`` record."""
    if outcome == "started":
        return Kind.OPERATION_STARTED
    if outcome == "failed":
        return Kind.OPERATION_FAILED
    return _KIND_OF_OPERATION.get(operation, Kind.OPERATION_SUCCEEDED)


@dataclass(frozen=True, slots=True)
class EventRecord:
    sequence: int
    ts: float
    vm_id: str
    customer_id: str
    kind: int
    state: int
    previous_state: int
    operation: str
    outcome: str
    code: str
    message: str


_COLUMNS = "id, ts, vm_id, customer_id, kind, state, previous_state, operation, outcome, code, detail"


def _record(row: Sequence[object]) -> EventRecord:
    return EventRecord(*row)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Filter:
    """What a reader wants; empty fields match everything. ``customer_id`` None: every customer."""

    vm_id: str = ""
    states: frozenset[int] = frozenset()
    kinds: frozenset[int] = frozenset()
    customer_id: str | None = None

    def matches(self, event: EventRecord) -> bool:
        return (
            (not self.vm_id or event.vm_id == self.vm_id)
            and (not self.states or event.state in self.states)
            and (not self.kinds or event.kind in self.kinds)
            and (self.customer_id is None or event.customer_id == self.customer_id)
        )

    def sql(self) -> tuple[str, list[object]]:
        where: list[str] = []
        args: list[object] = []
        if self.vm_id:
            where.append("vm_id = ?")
            args.append(self.vm_id)
        if self.states:
            where.append(f"state IN ({','.join('?' * len(self.states))})")
            args += sorted(self.states)
        if self.kinds:
            where.append(f"kind IN ({','.join('?' * len(self.kinds))})")
            args += sorted(self.kinds)
        if self.customer_id is not None:
            where.append("customer_id = ?")
            args.append(self.customer_id)
        return (" AND ".join(where) or "1=1"), args


def append(
    db: sqlite3.Connection,
    vm_id: str,
    kind: Kind,
    operation: str,
    outcome: str,
    detail: str = "",
    *,
    code: str = "",
    customer_id: str | None = None,
    state: int | None = None,
    previous_state: int = 0,
) -> None:
    """Append one event. The VM's customer and state are read from its row when
    not given; a VM whose row is gone keeps the customer of its last event."""
    if customer_id is None or state is None:
        row = db.execute("SELECT customer_id, state FROM vms WHERE vm_id = ?", (vm_id,)).fetchone()
        if row is None:
            last = db.execute(
                "SELECT customer_id FROM events WHERE vm_id = ? ORDER BY id DESC LIMIT 1", (vm_id,)
            ).fetchone()
            row = (last[0] if last else "", 0)
        customer_id = row[0] if customer_id is None else customer_id
        state = row[1] if state is None else state
    db.execute(
        "INSERT INTO events (ts, vm_id, operation, outcome, detail, customer_id, kind, state,"
        " previous_state, code) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (time.time(), vm_id, operation, outcome, detail, customer_id, int(kind), state, previous_state, code),
    )


def head(db: sqlite3.Connection) -> int:
    """The last sequence number ever given (0: none yet)."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    return int(row[0]) if row else 0


def floor(db: sqlite3.Connection) -> int:
    """Every event after this sequence is still in the log (pruning removed the rest)."""
    row = db.execute("SELECT MIN(id) FROM events").fetchone()
    return int(row[0]) - 1 if row and row[0] is not None else head(db)


def after(
    db: sqlite3.Connection, sequence: int, until: int, flt: Filter, limit: int
) -> list[EventRecord]:
    """Matching events with ``sequence < id <= until``, oldest first."""
    cond, args = flt.sql()
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM events WHERE id > ? AND id <= ? AND {cond} ORDER BY id LIMIT ?",
        [sequence, until, *args, limit],
    ).fetchall()
    return [_record(r) for r in rows]


def tail_start(db: sqlite3.Connection, until: int, flt: Filter, count: int) -> int:
    """The sequence to replay from so that the last ``count`` matching events up to ``until`` follow."""
    if count <= 0:
        return until
    cond, args = flt.sql()
    rows = db.execute(
        f"SELECT id FROM events WHERE id <= ? AND {cond} ORDER BY id DESC LIMIT ?",
        [until, *args, count],
    ).fetchall()
    if len(rows) < count:
        return floor(db)
    return int(rows[-1][0]) - 1


def prune(db: sqlite3.Connection, keep_count: int, older_than: float, batch: int) -> int:
    """Remove up to ``batch`` of the oldest events beyond ``keep_count`` or recorded
    before ``older_than`` (Unix seconds). Returns how many were removed."""
    bound = head(db) - keep_count
    aged = db.execute("SELECT MAX(id) FROM events WHERE ts < ?", (older_than,)).fetchone()[0]
    if aged is not None:
        bound = max(bound, int(aged))
    low = floor(db)
    bound = min(bound, low + batch)
    if bound <= low:
        return 0
    return db.execute("DELETE FROM events WHERE id <= ?", (bound,)).rowcount
