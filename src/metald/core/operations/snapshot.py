"""SnapshotVm: save a RUNNING or PAUSED guest (memory, devices, disks) into a new
snapshot; with ``stop`` (hibernate) the VM is then SHUTDOWN and its next BootVm
resumes it from the snapshot.

Steps: ``record`` (a pending row; undo: the row and directory go), ``save``
(the backend writes and fsyncs every file; on failure it removed its directory
and left the guest as it was; with stop the VMM quits last), ``complete`` (the
row becomes visible), and with stop ``hibernate`` (SHUTDOWN recorded with the
snapshot to resume from; retried, the VMM being gone). Interrupted: a snapshot
that is not complete is removed (never left complete-looking) and the guest
runs again if the save had stopped it; a completed hibernation whose VMM is
gone is recorded SHUTDOWN with its snapshot.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

from metald.core.context import settled_write
from metald.core.errors import MetaldError
from metald.core.models import VmState
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.plan import FuncStep, Step
from metald.core.records import SnapshotRecord, VmRecord

# Keys of a VM's status: the snapshot its next boot restores, and whether it is a clone.
RESTORE_FROM = "restore_from"
CLONE_OF = "clone_of"


@dataclass(frozen=True)
class SnapshotRequest:
    snapshot_id: str
    name: str
    stop: bool


class Snapshot(Operation[SnapshotRequest, SnapshotRecord]):
    name = "snapshot"
    allowed = (VmState.RUNNING, VmState.PAUSED)

    async def plan(self, vm_id: str, request: SnapshotRequest) -> Planned[SnapshotRecord]:
        ctx = self.ctx
        snapshotter, repo = ctx.snapshot_ports()
        row = self.load(vm_id, request)
        spec = ctx.spec(row)
        sid = request.snapshot_id
        done: dict[str, SnapshotRecord] = {}
        purpose: Literal["snapshot", "hibernation"] = "hibernation" if request.stop else "snapshot"

        async def record() -> None:
            repo.begin(
                sid, name=request.name, source_vm_id=vm_id, customer_id=row.customer_id,
                config=row.config, spec=row.spec, purpose=purpose,
            )  # fmt: skip

        async def forget() -> None:
            repo.abort(sid)

        async def save() -> None:
            saved = await ctx.backend_call(snapshotter.save(spec, repo.directory(sid), request.stop))
            done["saved"] = repo.complete(sid, saved.manifest, saved.state_bytes, saved.disk_bytes)

        async def hibernate() -> None:
            def write() -> None:
                status = dict(ctx.row(vm_id).status)
                status["last_exit"] = f"hibernated into snapshot {sid}"
                status["exited_at"] = time.time()
                status[RESTORE_FROM] = {"snapshot_id": sid, "clone": False}
                ctx.set_state(vm_id, VmState.SHUTDOWN, status=status, handle={})
                repo.add_user(vm_id, sid)

            settled_write(write)

        steps: list[Step] = [FuncStep("record", record, forget), FuncStep("save", save)]
        if request.stop:
            steps.append(FuncStep("hibernate", hibernate))
        state = "shutdown" if request.stop else "unchanged"
        return Planned(
            steps,
            answer=lambda: (done["saved"], f"snapshot {sid} ({state})"),
            intent={"from": int(row.state), "snapshot_id": sid, "stop": request.stop},
        )

    async def recover(self, found: Recovery) -> None:
        ctx, row, detail = self.ctx, found.row, found.intent.detail
        sid = str(detail.get("snapshot_id", ""))
        repo = ctx.snapshots
        complete = False
        if repo is not None and sid:
            try:
                repo.get(sid)
                complete = True
            except MetaldError:
                repo.abort(sid)  # pending: row and directory go
        if detail.get("stop") and complete and not found.adopted:
            await ctx.discard_vmm(row.vm_id, kill_strays=False)
            status = dict(row.status)
            status[RESTORE_FROM] = {"snapshot_id": sid, "clone": False}
            status["last_exit"] = f"hibernated into snapshot {sid}"
            ctx.set_state(row.vm_id, VmState.SHUTDOWN, status=status, handle={})
            if repo is not None:
                repo.add_user(row.vm_id, sid)
            ctx.event(row.vm_id, "reconcile", "shutdown", f"interrupted hibernation completed ({sid})")
            found.report.completed.append(row.vm_id)
            return
        if not found.adopted:
            await ctx.mark_gone(row, ctx.why_not_adopted(row.vm_id))
            found.report.rolled_back.append(row.vm_id)
            return
        # the VMM lives: a save cut short may have left the guest stopped
        if int(detail.get("from", VmState.RUNNING)) == VmState.RUNNING:
            with contextlib.suppress(Exception):
                if await ctx.backend.vmm_status(row.vm_id) == "paused":
                    await ctx.backend.resume(row.vm_id)
        await ctx.sync_run_state(row.vm_id)
        (found.report.completed if complete else found.report.rolled_back).append(row.vm_id)


def snapshot_of(row: VmRecord) -> str | None:
    """The snapshot the VM's drives (a clone) or next boot (hibernated) depend on."""
    restore = row.status.get(RESTORE_FROM)
    if isinstance(restore, dict) and restore.get("snapshot_id"):
        return str(restore["snapshot_id"])
    clone_of = row.status.get(CLONE_OF)
    return str(clone_of) if clone_of else None
