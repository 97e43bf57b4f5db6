"""ResumeVm: the VMM's vCPUs run again, then RUNNING recorded (the mirror of Pause:
a failed state write pauses the VMM again)."""

from __future__ import annotations

from metald.core.models import VmState
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.operations.pause import settle_run_state
from metald.core.plan import FuncStep


class Resume(Operation[None, VmState]):
    name = "resume"
    allowed = (VmState.PAUSED,)

    async def plan(self, vm_id: str, request: None) -> Planned[VmState]:
        ctx = self.ctx
        self.load(vm_id, request)

        async def resume() -> None:
            await ctx.backend_call(ctx.backend.resume(vm_id))

        async def pause() -> None:
            await ctx.backend_call(ctx.backend.pause(vm_id))

        async def record() -> None:
            ctx.set_state(vm_id, VmState.RUNNING)

        steps = [FuncStep("vmm", resume, pause), FuncStep("record", record)]
        return Planned(steps, answer=lambda: (VmState.RUNNING, ""), intent=None)

    async def recover(self, found: Recovery) -> None:
        await settle_run_state(self, found)
