"""The lifecycle operations, one class each (see base.py for the shape)."""

from __future__ import annotations

from typing import Any

from metald.core.context import Context
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.operations.boot import Boot
from metald.core.operations.clone import Clone, CloneRequest
from metald.core.operations.create import Create, CreateRequest
from metald.core.operations.delete import Delete, DeleteRequest
from metald.core.operations.pause import Pause
from metald.core.operations.reboot import Reboot, RebootRequest
from metald.core.operations.resume import Resume
from metald.core.operations.shutdown import Shutdown, ShutdownRequest
from metald.core.operations.snapshot import Snapshot, SnapshotRequest

__all__ = [
    "Boot", "Clone", "CloneRequest", "Create", "CreateRequest", "Delete", "DeleteRequest", "Operation",
    "Operations", "Pause", "Planned", "Reboot", "RebootRequest", "Recovery", "Resume", "Shutdown",
    "ShutdownRequest", "Snapshot", "SnapshotRequest",
]  # fmt: skip


class Operations:
    """One instance of every operation, and the lookup reconcile uses for intents."""

    def __init__(self, ctx: Context) -> None:
        self.create = Create(ctx)
        self.boot = Boot(ctx)
        self.pause = Pause(ctx)
        self.resume = Resume(ctx)
        self.shutdown = Shutdown(ctx)
        self.reboot = Reboot(ctx)
        self.delete = Delete(ctx)
        self.snapshot = Snapshot(ctx)
        self.clone = Clone(ctx)
        everything: list[Operation[Any, Any]] = [
            self.create, self.boot, self.pause, self.resume, self.shutdown, self.reboot, self.delete,
            self.snapshot, self.clone,
        ]  # fmt: skip
        self.by_name = {op.name: op for op in everything}
