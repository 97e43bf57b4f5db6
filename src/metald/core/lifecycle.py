"""Names and small helpers the engine and reconciliation share."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from metald.core.models import VmState

ACTIVE = (VmState.RUNNING, VmState.PAUSED)
# VMs reconciled at once at start-up (network re-apply and QMP adoption overlap).
RECONCILE_CONCURRENCY = 32
# delete moves a VM's run directory to <run_dir>/<TRASH_PREFIX><vm_id> until it commits.
TRASH_PREFIX = ".deleting-"
# Entries of the run directory that are not a VM's (the QEMU accelerator probe).
RUN_DIR_RESERVED = frozenset({"accel-probe"})
VM_DIR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


@dataclass
class ReconcileReport:
    adopted: list[str] = field(default_factory=list)
    marked_shutdown: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    leftovers_removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # VMs found with no record: nothing swept
    seconds: float = 0.0


def state_name(state: int) -> str:
    return VmState(state).name


def plain_files(directory: Path) -> set[str]:
    """Names of the plain files (and sockets) directly in ``directory``."""
    try:
        return {e.name for e in os.scandir(directory) if not e.is_dir(follow_symlinks=False)}
    except FileNotFoundError:
        return set()


def trash_of(run_root: Path, vm_id: str) -> Path:
    return run_root / f"{TRASH_PREFIX}{vm_id}"
