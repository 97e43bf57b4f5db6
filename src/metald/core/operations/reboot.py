"""RebootVm: the network made whole (a graceful reboot starts a new VMM, whose TAP
must be there), then the reboot, the last step (a reset or a restarted guest
cannot be undone).

Interrupted: a VMM that the handle proves is ours is adopted (RUNNING); if the
restart of a graceful reboot was cut off, the reboot is completed by starting
a new VMM (SHUTDOWN with the reason if that fails).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from metald.core.context import settled_write
from metald.core.errors import MetaldError
from metald.core.models import VmState
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.plan import FuncStep
from metald.core.records import VmRecord


@dataclass(frozen=True)
class RebootRequest:
    force: bool


class Reboot(Operation[RebootRequest, VmState]):
    name = "reboot"
    allowed = (VmState.RUNNING,)

    async def plan(self, vm_id: str, request: RebootRequest) -> Planned[VmState]:
        ctx = self.ctx
        row = self.load(vm_id, request)
        spec = ctx.spec(row)
        alloc = ctx.alloc(row)

        async def network() -> None:
            await ctx.reapply_network(alloc)

        async def restart() -> None:
            try:
                handle = await ctx.backend_call(ctx.backend.reboot(spec, request.force))
            except MetaldError as exc:
                if not ctx.backend.is_running(vm_id):
                    await ctx.discard_vmm(vm_id)
                    ctx.record_stopped(row, f"reboot failed: {exc}")
                raise
            status = _rebooted(row)
            settled_write(lambda: ctx.store.update_vm(vm_id, handle=handle or row.handle, status=status))

        steps = [FuncStep("network", network), FuncStep("vmm", restart)]
        detail = "forced" if request.force else "graceful"
        return Planned(steps, answer=lambda: (VmState.RUNNING, detail), intent={"force": request.force})

    async def recover(self, found: Recovery) -> None:
        if found.adopted:
            await self.ctx.sync_run_state(found.row.vm_id)
        else:
            await self.finish(found.row)
        found.report.completed.append(found.row.vm_id)

    async def finish(self, row: VmRecord) -> None:
        """A reboot cut off between stopping the old VMM and recording the new one:
        start a fresh VMM (the reboot completed), or record SHUTDOWN if that fails."""
        ctx, vm_id = self.ctx, row.vm_id
        await ctx.discard_vmm(vm_id)
        try:
            handle = await ctx.backend.boot(ctx.spec(row))
        except Exception as exc:
            await ctx.discard_vmm(vm_id)
            ctx.record_stopped(row, f"reboot interrupted by a metald restart; restart failed: {exc}")
            return
        ctx.set_state(vm_id, VmState.RUNNING, handle=handle, status=_rebooted(row))
        ctx.event(vm_id, "reconcile", "running", "interrupted reboot completed")


def _rebooted(row: VmRecord) -> dict[str, object]:
    status = dict(row.status)
    status["booted_at"] = time.time()
    status["reboots"] = int(status.get("reboots", 0)) + 1
    return status
