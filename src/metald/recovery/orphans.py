"""VMs that run on this host but have no record in metald's store.

A lost, emptied or replaced ``metald.db`` must never cost a running guest. At
start metald looks for what carries its markers:

* VMM processes whose command line names one of its per-VM paths:
  ``<run_dir>/<vm_id>/`` (QEMU's ``-qmp unix:`` socket, Firecracker's API
  socket) or ``<jailer_chroot_dir>/<vmm>/<vm_id>/root`` (the jail);
* when the store holds no VM and no event at all (it was lost or replaced):
  also network namespaces ``fc-<vm_id>``, jails and run directories.

Each such VM id with no row is an *orphan*. With orphans present the start-up
sweep removes nothing (no process, namespace, link, firewall element, jail,
cgroup or run directory), metald says so in its log, in ``/_/health``
(``orphans`` check) and in ``metald doctor``, and the operator chooses:
``metald recover adopt`` writes them back into the store (a restart then
adopts their VMMs), ``metald cleanup --force`` removes them.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from metald.backends import procfs
from metald.config import Settings
from metald.core.layout import TRASH_PREFIX
from metald.core.lifecycle import VM_DIR_RE
from metald.network import names

NETNS_DIR = Path("/run/netns")
VMM_NAMES = ("qemu", "firecracker")
# Entries of the run directory that are not a VM's (each backend's run_dir_entries()).
RUN_DIR_RESERVED = frozenset({"accel-probe"})


@dataclass
class Orphans:
    """Orphan VM ids and what was found of each."""

    vmms: dict[str, list[int]] = field(default_factory=dict)  # vm_id -> pids of its VMM processes
    parts: dict[str, list[str]] = field(default_factory=dict)  # vm_id -> "namespace", "jail", "run dir"

    @property
    def ids(self) -> list[str]:
        return sorted(set(self.vmms) | set(self.parts))

    def __bool__(self) -> bool:
        return bool(self.vmms or self.parts)

    def summary(self) -> str:
        """One line: how many, which, and what to do."""
        shown = ", ".join(self.ids[:10]) + (f" and {len(self.ids) - 10} more" if len(self.ids) > 10 else "")
        running = len(self.vmms)
        return (
            f"{len(self.ids)} VM(s) on this host have no record in the store ({running} with a running VMM): "
            f"{shown}; nothing was swept. Run `metald recover adopt` to take them back into the store "
            "(then restart metald), or `metald cleanup --force` to remove them"
        )


def _marker(settings: Settings) -> re.Pattern[str]:
    run = re.escape(str(settings.run_dir).rstrip("/"))
    jail = re.escape(str(settings.jailer_chroot_dir).rstrip("/"))
    vmms = "|".join(VMM_NAMES)
    vm_id = r"([A-Za-z0-9][A-Za-z0-9-]{0,63})"
    return re.compile(rf"(?:{run}/{vm_id}/|{jail}/(?:{vmms})/{vm_id}/root(?:$|/))")


def vmm_processes(settings: Settings, proc: Path = procfs.PROC) -> dict[str, list[int]]:
    """vm_id -> pids of processes carrying this metald's per-VM markers."""
    marker = _marker(settings)
    me = os.getpid()
    found: dict[str, list[int]] = {}
    try:
        entries = [e.name for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return found
    for name in entries:
        pid = int(name)
        if pid == me:
            continue
        for arg in procfs.read_cmdline(pid, proc) or []:
            match = marker.search(arg)
            if match and (match.group(1) or match.group(2)) not in RUN_DIR_RESERVED:
                found.setdefault(match.group(1) or match.group(2), []).append(pid)
                break
    return found


def _dirs(path: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def host_parts(settings: Settings, netns_dir: Path = NETNS_DIR) -> dict[str, list[str]]:
    """vm_id -> the parts of it found on the host: namespace, jail, run dir."""
    parts: dict[str, list[str]] = {}
    if settings.network_enabled:
        try:
            for entry in os.scandir(netns_dir):
                vm_id = names.vm_id_of_namespace(entry.name)
                if vm_id is not None:
                    parts.setdefault(vm_id, []).append("namespace")
        except OSError:
            pass
    for vmm in VMM_NAMES:
        for vm_id in _dirs(settings.jailer_chroot_dir / vmm):
            if VM_DIR_RE.match(vm_id):
                parts.setdefault(vm_id, []).append("jail")
    for name in _dirs(settings.run_dir):
        if name in RUN_DIR_RESERVED or name.startswith(TRASH_PREFIX) or not VM_DIR_RE.match(name):
            continue
        parts.setdefault(name, []).append("run dir")
    return parts


class _Rows(Protocol):
    def all_vms(self) -> Sequence[object]: ...
    def events(self, vm_id: str | None = None, limit: int = 1000) -> Sequence[object]: ...


def store_is_empty(store: _Rows) -> bool:
    """No VM and no event ever: a new, emptied or replaced database."""
    return not store.all_vms() and not store.events(limit=1)


def scan(settings: Settings, known: set[str], store_is_empty: bool) -> Orphans:
    """The orphans of this host (see the module docstring); blocking: run in a thread."""
    out = Orphans()
    for vm_id, pids in vmm_processes(settings).items():
        if vm_id not in known:
            out.vmms[vm_id] = sorted(pids)
    if store_is_empty or out.vmms:
        for vm_id, found in host_parts(settings).items():
            if vm_id not in known and (store_is_empty or vm_id in out.vmms):
                out.parts[vm_id] = found
    return out


class OrphanWatch:
    """The ``orphans`` health check: what start-up found, looked at again until resolved."""

    def __init__(self, settings: Settings, store: _Rows) -> None:
        self.settings = settings
        self.store = store
        self.ids: list[str] = []

    def found(self, ids: list[str]) -> None:
        self.ids = list(ids)

    async def check(self) -> tuple[bool, str]:
        if not self.ids:
            return True, "none"
        known = {getattr(row, "vm_id", "") for row in self.store.all_vms()}
        now = await asyncio.to_thread(scan, self.settings, known, store_is_empty(self.store))
        self.ids = now.ids
        return (False, now.summary()) if now else (True, "none (resolved)")
