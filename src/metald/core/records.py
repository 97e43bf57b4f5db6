"""What the repository port hands the core: a VM record and an operation intent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metald.core.models import VmState


@dataclass
class VmRecord:
    """One stored VM. ``state`` is typed; the JSON columns are plain dicts."""

    seq: int
    vm_id: str
    customer_id: str
    state: VmState
    config: bytes  # serialized VmConfig protobuf
    spec: dict[str, Any]  # the validated VmDraft (see metald.core.specs)
    backend: str
    handle: dict[str, Any]  # the backend's VMM handle (empty: no VMM)
    network: dict[str, Any]  # the network's allocation (see Network.allocation_to_dict)
    status: dict[str, Any]  # last_exit, exited_at, booted_at, reboots
    vcpu_count: int
    memory_bytes: int
    metadata: dict[str, str]
    created_at: int
    modified_at: int


@dataclass
class Intent:
    """A mutating operation recorded before its first side effect (finished or
    rolled back by reconcile if metald stops in the middle of it)."""

    vm_id: str
    operation: str
    started_at: float
    detail: dict[str, Any] = field(default_factory=dict)


class DuplicateVm(Exception):
    """The repository already holds a VM with this id."""


@dataclass(frozen=True)
class SnapshotRecord:
    """One stored snapshot (rows of ``metald.store.snapshots``)."""

    seq: int
    snapshot_id: str
    name: str
    source_vm_id: str
    customer_id: str
    state: str  # 'pending' | 'complete'
    purpose: str  # 'snapshot' | 'hibernation'
    config: bytes  # the source VM's VmConfig protobuf when it was taken
    spec: dict[str, Any]  # the source VM's VmDraft (metald.core.specs)
    manifest: dict[str, Any]  # the backend's manifest
    state_bytes: int
    disk_bytes: int
    created_at: int
    completed_at: int | None

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    @property
    def size_bytes(self) -> int:
        return self.state_bytes + self.disk_bytes
