"""PauseVm: the VMM's vCPUs stopped, then PAUSED recorded.

No intent: the outcome can be read back from the VMM. If the state write
fails (a full disk), the VMM is resumed again (the step's undo) so that the
store and the VMM agree, and the error is reported. Interrupted: reconcile
records the adopted VMM's own run state (running or paused).
"""

from __future__ import annotations

from metald.core.models import VmState
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.plan import FuncStep


class Pause(Operation[None, VmState]):
    name = "pause"
    allowed = (VmState.RUNNING,)

    async def plan(self, vm_id: str, request: None) -> Planned[VmState]:
        ctx = self.ctx
        self.load(vm_id, request)

        async def pause() -> None:
            await ctx.backend_call(ctx.backend.pause(vm_id))

        async def resume() -> None:
            await ctx.backend_call(ctx.backend.resume(vm_id))

        async def record() -> None:
            ctx.set_state(vm_id, VmState.PAUSED)

        steps = [FuncStep("vmm", pause, resume), FuncStep("record", record)]
        return Planned(steps, answer=lambda: (VmState.PAUSED, ""), intent=None)

    async def recover(self, found: Recovery) -> None:
        await settle_run_state(self, found)


async def settle_run_state(op: Operation[None, VmState], found: Recovery) -> None:
    """An interrupted pause or resume: the VMM's own run state is the truth."""
    ctx, vm_id = op.ctx, found.row.vm_id
    if found.adopted:
        await ctx.sync_run_state(vm_id)
        found.report.completed.append(vm_id)
        return
    await ctx.mark_gone(found.row, f"VMM exited while metald was not running ({ctx.why_not_adopted(vm_id)})")
    found.report.marked_shutdown.append(vm_id)
    found.report.completed.append(vm_id)
