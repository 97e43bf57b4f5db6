"""Storage health: a full, read-only or failing data directory, and an unusable database.

At start (:func:`open_store`): a database SQLite cannot read (truncated,
garbage, not a database) or a data directory metald cannot write stops metald
with one line naming the file, ``UNKEY_METALD_DATA_DIR`` and what to do.

While running: a write that fails because the disk is full, the file system is
read-only or the disk fails is :class:`StorageUnavailable` (RPC
``unavailable``) with a message saying so, instead of ``internal``;
:class:`StorageMonitor` counts these (``metald_storage_errors_total``) and is
the ``store`` health check, which writes a small probe file to the data
directory, so it goes red while writes fail and green again, with no restart,
once space returns.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Literal

from metald.core.errors import StepFailed, Unavailable
from metald.store.sqlite import Store

Kind = Literal["full", "read_only", "io"]
KINDS: tuple[Kind, ...] = ("full", "read_only", "io")
PROBE_NAME = ".metald-write-probe"
PROBE_BYTES = 4096

_WHAT: dict[Kind, str] = {
    "full": "storage is full",
    "read_only": "storage is read-only",
    "io": "storage is failing (I/O error)",
}
_ERRNO: dict[int, Kind] = {
    errno.ENOSPC: "full",
    errno.EDQUOT: "full",
    errno.EROFS: "read_only",
    errno.EIO: "io",
}


class StorageUnavailable(Unavailable):
    """A state write failed because of the data directory's storage."""

    def __init__(self, kind: Kind, data_dir: Path, cause: str) -> None:
        super().__init__(
            f"{_WHAT[kind]}: cannot write metald's state in {data_dir} (UNKEY_METALD_DATA_DIR): {cause}; "
            "nothing was changed; retry once space is freed or the file system is writable again"
        )
        self.kind = kind


class StoreOpenError(Unavailable):
    """The database cannot be used at start: one line for the operator."""


def kind_of(exc: BaseException) -> Kind | None:
    """The storage failure behind ``exc`` (or its causes), if it is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageUnavailable):
            return current.kind
        if isinstance(current, sqlite3.OperationalError | sqlite3.DatabaseError):
            text = str(current).lower()
            if "disk is full" in text or "database or disk is full" in text:
                return "full"
            if "readonly" in text or "read-only" in text:
                return "read_only"
            if "disk i/o error" in text:
                return "io"
        if isinstance(current, OSError) and current.errno in _ERRNO:
            return _ERRNO[current.errno]
        nxt = current.cause if isinstance(current, StepFailed) else None
        current = nxt or current.__cause__ or current.__context__
    return None


class StorageMonitor:
    """Counts storage failures and checks that the data directory takes writes."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.counts: dict[Kind, int] = {k: 0 for k in KINDS}
        self.last: tuple[float, str] | None = None  # (time, message) of the last failure

    def translate(self, exc: BaseException) -> StorageUnavailable | None:
        """``exc`` as StorageUnavailable (counted) if storage caused it, else None."""
        kind = kind_of(exc)
        if kind is None:
            return None
        if isinstance(exc, StorageUnavailable):
            out = exc
        else:
            cause = str(exc).strip() or type(exc).__name__
            out = StorageUnavailable(kind, self.data_dir, cause)
        self.counts[kind] += 1
        self.last = (time.time(), str(out))
        return out

    def probe(self) -> tuple[bool, str]:
        """Write and remove a small file in the data directory (blocking); ENOSPC/EROFS show here."""
        path = self.data_dir / PROBE_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\0" * PROBE_BYTES)  # no fsync: it would make health slow under I/O load
            finally:
                os.close(fd)
            path.unlink()
        except OSError as exc:
            with_kind = _ERRNO.get(exc.errno or 0)
            what = _WHAT[with_kind] if with_kind else "storage is not writable"
            return False, f"{what}: {self.data_dir} (UNKEY_METALD_DATA_DIR): {exc.strerror or exc}"
        return True, "writable"

    async def check(self, store: Store) -> tuple[bool, str]:
        """The ``store`` health check: the database answers and the data directory takes writes."""
        store.ping()
        ok, detail = await asyncio.to_thread(self.probe)
        failures = sum(self.counts.values())
        suffix = f"; {failures} state writes failed for storage since start" if failures else ""
        if not ok:
            return False, detail + suffix
        return True, f"sqlite schema v{store.schema_version}, data directory writable{suffix}"


_installed: StorageMonitor | None = None


def install(monitor: StorageMonitor) -> None:
    """The daemon's monitor, used by :func:`translate` (the API's error mapping)."""
    global _installed
    _installed = monitor


def translate(exc: BaseException) -> StorageUnavailable | None:
    """``exc`` as StorageUnavailable if storage caused it (counted by the installed monitor)."""
    if _installed is not None:
        return _installed.translate(exc)
    kind = kind_of(exc)
    return None if kind is None else StorageUnavailable(kind, Path("."), str(exc) or type(exc).__name__)


def open_store(db_path: Path) -> Store:
    """Open (and quickly check) the database; StoreOpenError with one line if it cannot be used."""
    data_dir = db_path.parent
    hint = f"UNKEY_METALD_DATA_DIR={data_dir}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreOpenError(
            f"cannot create the data directory {data_dir} ({hint}): {exc.strerror or exc}; "
            "create it (root, mode 0750) or point UNKEY_METALD_DATA_DIR at a writable directory"
        ) from None
    writable, detail = StorageMonitor(data_dir).probe()
    if not writable:
        raise StoreOpenError(
            f"the data directory cannot be written: {detail}; the database is {db_path}; make it writable by "
            "root with free space, or point UNKEY_METALD_DATA_DIR at another directory"
        )
    if db_path.exists() and db_path.stat().st_size > 0:
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            try:
                result = db.execute("PRAGMA quick_check").fetchone()
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            result = (str(exc),)
        if not result or result[0] != "ok":
            raise StoreOpenError(
                f"the database {db_path} is damaged or not a metald database ({result[0] if result else 'no answer'}); "
                f"restore it from a backup (docs/operations.md), or move it aside to start with an empty store "
                f"(running VMs are then kept as orphans); {hint}"
            )
    try:
        return Store(db_path)
    except (sqlite3.Error, OSError) as exc:
        kind = kind_of(exc)
        what = _WHAT[kind] if kind else "cannot be opened for writing"
        raise StoreOpenError(
            f"the database {db_path} {('is unusable: ' + what) if kind else what} ({exc}); "
            f"make {data_dir} writable by root with free space, or point UNKEY_METALD_DATA_DIR elsewhere"
        ) from None
