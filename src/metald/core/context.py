"""What every operation works with: the ports and a few shared helpers.

One :class:`Context` per engine. Operations (``core/operations``) and
reconciliation read VMs, build boot specs and network steps, and stop VMMs
through it, so each fact about a VM (its spec, run directory, network steps)
is computed in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from metald.config import Settings
from metald.core.errors import BackendError, MetaldError, NotFound, Unimplemented
from metald.core.imageport import ImagePort
from metald.core.layout import VmLayout
from metald.core.lifecycle import plain_files, state_name
from metald.core.models import BootSpec, NetworkAllocation, VmState
from metald.core.plan import Plan, Step, StepObserver
from metald.core.ports import Backend, Network, Repository, SnapshotStore, Snapshotter
from metald.core.records import VmRecord
from metald.core.specs import boot_spec, draft_from_dict

log = logging.getLogger(__name__)

T = TypeVar("T")

# A state write that follows a change that cannot be undone (a stopped VMM) is
# tried this many times before the operation reports the error.
SETTLED_WRITE_ATTEMPTS = 3
SETTLED_WRITE_PAUSE_S = 0.05


class Context:
    def __init__(
        self,
        settings: Settings,
        store: Repository,
        backend: Backend,
        network: Network | None,
        step_observers: list[StepObserver],
        images: ImagePort | None = None,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self.settings = settings
        self.images = images  # container images as root disks (metald.images)
        self.store = store
        self.backend = backend
        self.network = network
        self.step_observers = step_observers
        self.layout = VmLayout.from_settings(settings)
        self.snapshots = snapshots
        self._snapshotter = backend.snapshotter()

    # --- snapshots (optional) ----------------------------------------------------
    def snapshot_ports(self) -> tuple[Snapshotter, SnapshotStore]:
        """The backend's snapshotter and the snapshot store, or Unimplemented naming
        the backend (Firecracker: its test double does not serve snapshots yet)."""
        if self._snapshotter is None:
            raise Unimplemented(f"snapshots are not available on the {self.backend.name} backend")
        if self.snapshots is None:
            raise Unimplemented("snapshots are not configured (no snapshot store)")
        return self._snapshotter, self.snapshots

    def disks_dir(self, vm_id: str) -> Path:
        """A clone's own drives (copy-on-write overlays on its snapshot's disks)."""
        return self.settings.data_dir / "disks" / vm_id

    # --- reading a VM ----------------------------------------------------------
    def plan(self, name: str, steps: Sequence[Step]) -> Plan:
        return Plan(name, steps, observers=list(self.step_observers))

    def row(self, vm_id: str) -> VmRecord:
        row = self.store.get_vm(vm_id)
        if row is None:
            raise NotFound(f"vm {vm_id} not found")
        return row

    def alloc(self, row: VmRecord) -> NetworkAllocation | None:
        if self.network is None or not row.network:
            return None
        return self.network.allocation_from_dict(row.network)

    def spec(self, row: VmRecord) -> BootSpec:
        return self.spec_of(row.vm_id, draft_from_dict(row.spec), self.alloc(row))

    def spec_of(self, vm_id: str, draft: Any, alloc: NetworkAllocation | None) -> BootSpec:
        ip_arg = self.network.kernel_ip_arg(alloc) if self.network is not None and alloc is not None else None
        return boot_spec(vm_id, draft, alloc, ip_arg, self.layout.run_dir(vm_id))

    # --- network ---------------------------------------------------------------
    def network_steps(self, alloc: NetworkAllocation | None) -> list[Step]:
        if self.network is None or alloc is None:
            return []
        owner = self.backend.tap_owner or (None, None)  # a jailed VMM opens its TAP without root
        return self.network.setup_steps(alloc, *owner)

    def reapply_steps(self, alloc: NetworkAllocation | None) -> list[Step]:
        """Steps making an existing VM network whole again (nothing it had is undone)."""
        if self.network is None or alloc is None:
            return []
        owner = self.backend.tap_owner or (None, None)
        return self.network.reapply_steps(alloc, *owner)

    async def reapply_network(self, alloc: NetworkAllocation | None) -> None:
        """Run :meth:`reapply_steps` as a plan nested in the running step."""
        steps = self.reapply_steps(alloc)
        if steps:
            await Plan("network", steps).run()

    # --- the VMM ---------------------------------------------------------------
    async def backend_call(self, call: Awaitable[T]) -> T:
        """A backend call whose unexpected errors are reported as BackendError."""
        try:
            return await call
        except MetaldError:
            raise
        except Exception as exc:
            raise BackendError(str(exc)) from exc

    async def discard_vmm(self, vm_id: str, kill_strays: bool = True) -> None:
        """Kill any VMM of the VM and remove its runtime files (logs and jail stay)."""
        await self.backend.discard(vm_id, kill_strays=kill_strays)

    async def unboot(self, vm_id: str, run_dir: Path, before: set[str] | None, had_jail: bool) -> None:
        """Undo a (partial) boot: no VMM, no new files, no jail it made."""
        await self.discard_vmm(vm_id)
        if self.store.get_vm(vm_id) is not None:
            self.store.update_vm(vm_id, handle={})
        if before is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            for name in plain_files(run_dir) - before:
                with contextlib.suppress(OSError):
                    (run_dir / name).unlink()
        if not had_jail:
            await self.backend.remove_jail(vm_id)

    async def sync_run_state(self, vm_id: str) -> None:
        """Record RUNNING or PAUSED as the adopted VMM reports it (an interrupted
        pause/resume is completed or rolled back by this)."""
        try:
            status = await self.backend.vmm_status(vm_id)
        except Exception as exc:
            log.warning("cannot read the VMM's run state: %s", exc)
            return
        wanted = {"running": VmState.RUNNING, "paused": VmState.PAUSED}.get(status)
        row = self.store.get_vm(vm_id)
        if wanted is not None and row is not None and row.state != wanted:
            log.warning("recorded %s but the VMM is %s: recording %s", state_name(row.state), status, wanted.name)
            self.set_state(vm_id, wanted)
            self.event(vm_id, "reconcile", wanted.name.lower(), f"VMM is {status}")

    def why_not_adopted(self, vm_id: str) -> str:
        return self.backend.adopt_error(vm_id) or "no VMM to adopt"

    # --- writing ---------------------------------------------------------------
    def set_state(self, vm_id: str, state: VmState, **fields: Any) -> None:
        self.store.update_vm(vm_id, state=int(state), **fields)

    def record_stopped(self, row: VmRecord, how: str) -> None:
        """SHUTDOWN with how the VMM ended (after a stop, which cannot be undone:
        the write is retried before the error is reported)."""

        def write() -> None:
            status = dict(self.row(row.vm_id).status)
            status["last_exit"] = how
            status["exited_at"] = time.time()
            self.set_state(row.vm_id, VmState.SHUTDOWN, status=status, handle={})

        settled_write(write)

    async def mark_gone(self, row: VmRecord, reason: str) -> None:
        """The VM's VMM is gone (or could not be adopted): none left, SHUTDOWN with the reason."""
        await self.discard_vmm(row.vm_id, kill_strays=False)  # reconcile's sweep kills strays
        self.record_stopped(row, reason)
        self.event(row.vm_id, "reconcile", "shutdown", reason)

    def event(
        self,
        vm_id: str,
        operation: str,
        outcome: str,
        detail: str = "",
        *,
        code: str = "",
        customer_id: str | None = None,
    ) -> None:
        """Append to the event log; a failed append is logged, never the operation's error."""
        try:
            self.store.add_event(vm_id, operation, outcome, detail, code=code, customer_id=customer_id)
        except Exception as exc:
            log.warning("event not recorded: %s", exc, extra={"event": f"{operation} {outcome}"})


def settled_write(write: Callable[[], None]) -> None:
    """Run a store write that follows an irreversible change, trying it again
    (SETTLED_WRITE_ATTEMPTS in all) before its error is raised."""
    for attempt in range(1, SETTLED_WRITE_ATTEMPTS + 1):
        try:
            write()
            return
        except Exception as exc:
            if attempt == SETTLED_WRITE_ATTEMPTS:
                raise
            log.warning("state write failed (attempt %d): %s; trying again", attempt, exc)
            time.sleep(SETTLED_WRITE_PAUSE_S * attempt)


async def gather_limited(limit: int, items: list[T], fn: Callable[[T], Awaitable[None]]) -> None:
    """Run ``fn`` over ``items``, at most ``limit`` at once."""
    gate = asyncio.Semaphore(limit)

    async def one(item: T) -> None:
        async with gate:
            await fn(item)

    await asyncio.gather(*(one(i) for i in items))
