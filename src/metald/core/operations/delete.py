"""DeleteVm: stop the VMM (forced delete only), tear down the network, remove the
jail, free the addresses, move the run directory aside, and finally forget the
record.

Every step but the first is undone if a later one fails; the stop cannot be
undone, so a later failure leaves the VM SHUTDOWN with all its resources.
Interrupted: completed (every part is idempotent: :func:`teardown`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

from metald.core.context import Context
from metald.core.errors import FailedPrecondition
from metald.core.lifecycle import ACTIVE, state_name
from metald.core.models import VmState
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.plan import FuncStep, Plan, Step
from metald.core.records import VmRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeleteRequest:
    force: bool


class Delete(Operation[DeleteRequest, None]):
    name = "delete"
    allowed = tuple(VmState)
    adopts_on_recovery = False

    def check(self, row: VmRecord, request: DeleteRequest) -> None:
        if row.state in ACTIVE and not request.force:
            raise FailedPrecondition(
                f"cannot delete vm {row.vm_id}: it is {state_name(row.state)}; shut it down first or pass force=true"
            )

    async def plan(self, vm_id: str, request: DeleteRequest) -> Planned[None]:
        ctx = self.ctx
        row = self.load(vm_id, request)
        alloc = ctx.alloc(row)
        spec = ctx.spec(row)
        run_dir, trash = ctx.layout.run_dir(vm_id), ctx.layout.trash(vm_id)
        had: dict[str, bool] = {}

        async def stop_vmm() -> None:
            if ctx.backend.is_running(vm_id):
                how = await ctx.backend_call(ctx.backend.shutdown(vm_id, True, 0))
                ctx.record_stopped(row, f"stopped by DeleteVm ({how})")
            await ctx.discard_vmm(vm_id)

        async def network_down() -> None:
            if ctx.network is not None and alloc is not None:
                await ctx.network.teardown(alloc)

        async def network_up() -> None:
            steps = ctx.network_steps(alloc)
            if steps:
                await Plan("network", steps).run()

        async def jail_down() -> None:
            had["jail"] = ctx.backend.jail_exists(vm_id)
            await ctx.backend.remove_jail(vm_id)

        async def jail_up() -> None:
            if had.get("jail"):
                await ctx.backend.restore_jail(spec)

        async def files_away() -> None:
            shutil.rmtree(trash, ignore_errors=True)
            if run_dir.exists():
                run_dir.rename(trash)

        async def files_back() -> None:
            if trash.exists() and not run_dir.exists():
                trash.rename(run_dir)

        async def forget() -> None:
            ctx.store.delete_vm(vm_id)  # also frees its addresses and its intent
            shutil.rmtree(trash, ignore_errors=True)
            forget_snapshot_use(ctx, vm_id)
            try:
                await ctx.backend.cleanup(vm_id)  # drop the backend's memory of it
            except Exception:
                log.exception("backend cleanup after delete failed")

        release: Step = ctx.network.release_step(vm_id) if ctx.network is not None else FuncStep("release", _nothing)
        steps: list[Step] = [
            FuncStep("vmm", stop_vmm),
            FuncStep("network", network_down, network_up),
            FuncStep("jail", jail_down, jail_up),
            release,
            FuncStep("files", files_away, files_back),
            FuncStep("record", forget),
        ]
        return Planned(steps, answer=lambda: (None, ""), intent={"from": int(row.state)})

    async def recover(self, found: Recovery) -> None:
        await teardown(self.ctx, found.row)
        found.report.completed.append(found.row.vm_id)


async def _nothing() -> None:
    return None


async def teardown(ctx: Context, row: VmRecord) -> None:
    """Remove everything of one VM; each part is idempotent, so this can run
    again after a crash (plan ``reconcile.teardown``)."""
    vm_id, network = row.vm_id, ctx.network
    alloc = ctx.alloc(row)

    async def vmm() -> None:
        await ctx.backend.cleanup(vm_id)

    async def network_down() -> None:
        if network is not None and alloc is not None:
            await network.teardown(alloc)

    async def release() -> None:
        if network is not None:
            await network.release(vm_id)

    async def remove_files() -> None:
        shutil.rmtree(ctx.layout.run_dir(vm_id), ignore_errors=True)
        shutil.rmtree(ctx.layout.trash(vm_id), ignore_errors=True)

    async def forget() -> None:
        ctx.store.delete_vm(vm_id)
        forget_snapshot_use(ctx, vm_id)

    steps: list[Step] = [FuncStep("vmm", vmm)]
    if network is not None:
        if alloc is not None:
            steps.append(FuncStep("network", network_down))
        steps.append(FuncStep("release", release))
    steps += [FuncStep("files", remove_files), FuncStep("record", forget)]
    await ctx.plan("reconcile.teardown", steps).run()


def forget_snapshot_use(ctx: Context, vm_id: str) -> None:
    """A deleted clone's overlays go, and no snapshot is in use by the VM any more."""
    shutil.rmtree(ctx.disks_dir(vm_id), ignore_errors=True)
    if ctx.snapshots is not None:
        ctx.snapshots.remove_user(vm_id)
