"""CloneVm: a new VM from a snapshot: its drives copy-on-write overlays on the
snapshot's disk copies, its vCPUs, memory and boot the template's, its own id,
addresses, namespace and run directory. It is CREATED; its first BootVm
restores the snapshot (the guest takes its new identity), later cold boots
start from its overlays.

Steps: ``drives`` (the overlays; undo: removed), the create steps (record,
addresses, network, run directory; each undone), ``user`` (the snapshot is in
use by the clone; undo: no longer). Interrupted: rolled back (the clone never
existed, its overlays are removed).
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, replace

from metald.core.errors import BackendError
from metald.core.models import VmDraft
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.operations.create import Create, CreateRequest
from metald.core.operations.delete import teardown
from metald.core.operations.snapshot import CLONE_OF, RESTORE_FROM
from metald.core.plan import FuncStep, Step
from metald.core.records import VmRecord
from metald.core.specs import draft_from_dict


@dataclass(frozen=True)
class CloneRequest:
    snapshot_id: str
    customer_id: str
    metadata: tuple[tuple[str, str], ...] = ()


class Clone(Operation[CloneRequest, VmRecord]):
    name = "clone"
    allowed = ()
    adopts_on_recovery = False

    async def plan(self, vm_id: str, request: CloneRequest) -> Planned[VmRecord]:
        ctx = self.ctx
        snapshotter, repo = ctx.snapshot_ports()
        snap = repo.get(request.snapshot_id, request.customer_id)  # another customer's: not found
        directory = repo.directory(snap.snapshot_id)
        template: VmDraft = draft_from_dict(snap.spec)
        metadata = request.metadata or template.metadata
        dest = ctx.disks_dir(vm_id)
        # the overlays' paths are known before they exist: the create steps record them
        planned = tuple(replace(d, path=dest / f"{d.drive_id}.qcow2") for d in template.drives)
        draft = replace(template, drives=planned, metadata=metadata)
        snapshotter.check_restorable(directory, ctx.spec_of(vm_id, draft, None))
        created = await Create(ctx).plan(vm_id, CreateRequest(request.customer_id, draft, snap.config))

        async def drives() -> None:
            made = await asyncio.to_thread(snapshotter.clone_drives, directory, dest)
            if {d.path for d in made} != {d.path for d in planned}:
                raise BackendError(f"the clone's drives {made} are not the planned {planned}")

        async def no_drives() -> None:
            await asyncio.to_thread(shutil.rmtree, dest, True)

        async def user() -> None:
            status = dict(ctx.row(vm_id).status)
            status[CLONE_OF] = snap.snapshot_id
            status[RESTORE_FROM] = {"snapshot_id": snap.snapshot_id, "clone": True}
            ctx.store.update_vm(vm_id, status=status)
            repo.add_user(vm_id, snap.snapshot_id)

        async def no_user() -> None:
            repo.remove_user(vm_id)

        steps: list[Step] = [
            FuncStep("drives", drives, no_drives),
            *created.steps,
            FuncStep("user", user, no_user),
        ]
        return Planned(
            steps,
            answer=lambda: (ctx.row(vm_id), f"from snapshot {snap.snapshot_id}"),
            intent={"snapshot_id": snap.snapshot_id},
        )

    async def recover(self, found: Recovery) -> None:
        await teardown(self.ctx, found.row)
        shutil.rmtree(self.ctx.disks_dir(found.row.vm_id), ignore_errors=True)
        if self.ctx.snapshots is not None:
            self.ctx.snapshots.remove_user(found.row.vm_id)
        found.report.rolled_back.append(found.row.vm_id)
