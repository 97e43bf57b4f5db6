"""BootVm: the VM's network made whole, its jail and VMM started, RUNNING recorded.

A hibernated VM (SnapshotVm with stop) resumes from its snapshot and a clone's
first boot restores its template (the guest takes its own identity); later
boots of a clone start cold from its overlays. Which one is in the VM's status
(``restore_from``, ``clone_of``: core/operations/snapshot.py).

A failure stops the VMM it started and removes the files and the jail it made
(a SHUTDOWN VM keeps its logs and jail). Interrupted: if the VMM the stored
handle names is alive and provably the same process, it is adopted and the VM
is RUNNING (completed); otherwise any half-started VMM is killed, its files
and (from CREATED) jail removed, and the VM is back in its previous state
(rolled back).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from metald.core.errors import ResourceExhausted
from metald.core.lifecycle import host_memory_bytes, plain_files
from metald.core.models import BootSpec, VmState
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.operations.snapshot import CLONE_OF, RESTORE_FROM
from metald.core.plan import FuncStep
from metald.core.records import VmRecord


class Boot(Operation[None, VmState]):
    name = "boot"
    allowed = (VmState.CREATED, VmState.SHUTDOWN)

    async def plan(self, vm_id: str, request: None) -> Planned[VmState]:
        ctx = self.ctx
        row = self.load(vm_id, request)
        self.check_capacity(row)
        spec = ctx.spec(row)
        await ctx.backend.validate(spec)
        alloc = ctx.alloc(row)
        before: dict[str, set[str] | None] = {}
        had_jail: dict[str, bool] = {}

        async def network() -> None:
            await ctx.reapply_network(alloc)

        async def start_vmm() -> None:
            before["files"] = plain_files(spec.run_dir) if spec.run_dir.is_dir() else None
            had_jail["jail"] = ctx.backend.jail_exists(vm_id)
            try:
                spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
                handle = await self.start(row, spec)
                ctx.store.update_vm(vm_id, handle=handle)
            except BaseException:
                await stop_vmm()
                raise

        async def stop_vmm() -> None:
            await ctx.unboot(vm_id, spec.run_dir, before["files"], had_jail["jail"])

        async def record() -> None:
            ctx.set_state(vm_id, VmState.RUNNING, status=self.booted_status(row))

        steps = [FuncStep("network", network), FuncStep("vmm", start_vmm, stop_vmm), FuncStep("record", record)]
        return Planned(steps, answer=lambda: (VmState.RUNNING, ""), intent={"from": int(row.state)})

    async def start(self, row: VmRecord, spec: BootSpec) -> dict[str, Any]:
        """A cold boot, or a restore when the VM was hibernated or is a clone's first boot."""
        ctx = self.ctx
        restore = row.status.get(RESTORE_FROM)
        if isinstance(restore, dict):
            snapshotter, repo = ctx.snapshot_ports()
            directory = repo.directory(str(restore["snapshot_id"]))
            return await snapshotter.restore(spec, directory, clone=bool(restore.get("clone")))
        if row.status.get(CLONE_OF):
            snapshotter, _ = ctx.snapshot_ports()
            return await snapshotter.boot_clone(spec)
        return await ctx.backend.boot(spec)

    def booted_status(self, row: VmRecord) -> dict[str, Any]:
        """RUNNING's status; a hibernated VM no longer depends on its snapshot."""
        status = dict(row.status)
        status.pop("last_exit", None)
        status["booted_at"] = time.time()
        restore = status.pop(RESTORE_FROM, None)
        if isinstance(restore, dict) and not restore.get("clone") and self.ctx.snapshots is not None:
            self.ctx.snapshots.remove_user(row.vm_id)
        return status

    def check_capacity(self, row: VmRecord) -> None:
        """Memory is held by running VMs only: created and shut-down VMs cost none,
        so the budget (UNKEY_METALD_HOST_MAX_MEMORY_FRACTION of the host) is
        checked when a VM boots."""
        budget = host_memory_bytes() * self.ctx.settings.host_max_memory_fraction
        used = self.ctx.store.active_memory_bytes()
        if used + row.memory_bytes > budget:
            raise ResourceExhausted(
                f"host memory budget exhausted: {used >> 20} MiB of {int(budget) >> 20} MiB held by running VMs,"
                f" vm {row.vm_id} needs {row.memory_bytes >> 20} MiB"
            )

    async def recover(self, found: Recovery) -> None:
        ctx, row = self.ctx, found.row
        if found.adopted:
            ctx.set_state(row.vm_id, VmState.RUNNING, status=self.booted_status(row))
            await ctx.sync_run_state(row.vm_id)
            found.report.completed.append(row.vm_id)
            return
        previous = VmState(int(found.intent.detail.get("from", VmState.CREATED)))
        await self.roll_back(row, previous)
        found.report.rolled_back.append(row.vm_id)

    async def roll_back(self, row: VmRecord, previous: VmState) -> None:
        """Back to the state before an interrupted boot: no VMM, no runtime files;
        from CREATED also no logs and no jail (a SHUTDOWN VM keeps both)."""
        ctx, vm_id = self.ctx, row.vm_id
        await ctx.discard_vmm(vm_id)
        if previous == VmState.CREATED:
            run_dir = ctx.layout.run_dir(vm_id)
            for name in plain_files(run_dir):
                with contextlib.suppress(OSError):
                    (run_dir / name).unlink()
            await ctx.backend.remove_jail(vm_id)
        ctx.set_state(vm_id, previous, handle={})
        ctx.event(vm_id, "reconcile", previous.name.lower(), "interrupted boot rolled back")
