"""ShutdownVm: the VMM stopped (gracefully within the timeout, or forced), SHUTDOWN
recorded with how it ended.

The stop is the only step and cannot be undone; the state write after it is
retried before an error is reported. Interrupted: a VMM still alive is adopted
and keeps its state (rolled back; the caller may retry); a VMM that is gone
makes the VM SHUTDOWN (completed).
"""

from __future__ import annotations

from dataclasses import dataclass

from metald.core.errors import MetaldError
from metald.core.lifecycle import ACTIVE
from metald.core.models import VmState
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.plan import FuncStep


@dataclass(frozen=True)
class ShutdownRequest:
    force: bool
    timeout_s: int


class Shutdown(Operation[ShutdownRequest, VmState]):
    name = "shutdown"
    allowed = ACTIVE

    @property
    def verb(self) -> str:
        return "shut down"

    async def plan(self, vm_id: str, request: ShutdownRequest) -> Planned[VmState]:
        ctx = self.ctx
        row = self.load(vm_id, request)
        result: dict[str, str] = {}

        async def stop() -> None:
            try:
                how = await ctx.backend_call(ctx.backend.shutdown(vm_id, request.force, request.timeout_s))
            except MetaldError as exc:
                if not ctx.backend.is_running(vm_id):
                    ctx.record_stopped(row, f"shutdown failed: {exc}")
                raise
            result["how"] = how
            ctx.record_stopped(row, how)

        return Planned(
            [FuncStep("vmm", stop)],
            answer=lambda: (VmState.SHUTDOWN, result["how"]),
            intent={"from": int(row.state)},
        )

    async def recover(self, found: Recovery) -> None:
        ctx, row, report = self.ctx, found.row, found.report
        if found.adopted:
            await ctx.sync_run_state(row.vm_id)
            report.rolled_back.append(row.vm_id)
        elif row.state in ACTIVE:
            await ctx.mark_gone(row, "stopped by ShutdownVm (finished while metald restarted)")
            report.marked_shutdown.append(row.vm_id)
            report.completed.append(row.vm_id)
        elif row.handle:
            await ctx.discard_vmm(row.vm_id, kill_strays=False)
            ctx.store.update_vm(row.vm_id, handle={})
