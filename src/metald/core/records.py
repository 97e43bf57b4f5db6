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
