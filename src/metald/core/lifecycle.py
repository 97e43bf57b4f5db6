"""Names and small helpers the operations and reconciliation share."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from metald.core.models import VmState

ACTIVE = (VmState.RUNNING, VmState.PAUSED)
# VMs reconciled at once at start-up (network re-apply and QMP adoption overlap).
RECONCILE_CONCURRENCY = 32
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


def host_memory_bytes() -> int:
    """This host's physical memory (the base of the memory budget)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plain_files(directory: Path) -> set[str]:
    """Names of the plain files (and sockets) directly in ``directory``."""
    try:
        return {e.name for e in os.scandir(directory) if not e.is_dir(follow_symlinks=False)}
    except FileNotFoundError:
        return set()
