"""The runner: everything around an operation's plan, in one place.

Under the VM's lock (operations on one VM are serialised; different VMs run
concurrently) it lets a VMM adopted on identity settle first, asks the
operation for its plan, records the intent before the first side effect, runs
the plan (which undoes its finished steps if one fails), ends the intent,
appends the event, logs, and tells the operation observers (metrics, traces).
It also records VMMs that exit on their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from metald.core.bounds import describe
from metald.core.context import Context
from metald.core.errors import BackendError, MetaldError, StepFailed
from metald.core.lifecycle import ACTIVE
from metald.core.logs import log_context
from metald.core.models import VmState
from metald.core.operations.base import Operation
from metald.core.records import VmRecord

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")

# Called after every operation: (operation, outcome, seconds, error or None)
OperationObserver = Callable[[str, str, float, BaseException | None], None]


class Runner:
    def __init__(self, ctx: Context, observers: list[OperationObserver]) -> None:
        self.ctx = ctx
        self.observers = observers
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # settles a VMM adopted on identity before its VM's next operation (reconcile.py)
        self.settle: Callable[[str], Awaitable[object]] | None = None
        self.unsettled: Callable[[str], bool] = lambda vm_id: False

    def lock(self, vm_id: str) -> asyncio.Lock:
        lock = self._locks.get(vm_id)
        if lock is None:
            lock = self._locks[vm_id] = asyncio.Lock()
        return lock

    async def run(self, op: Operation[Req, Res], vm_id: str, request: Req) -> Res:
        """Run one operation under the VM's lock with intent, plan, event and logs."""
        ctx, started = self.ctx, time.monotonic()
        with log_context(vm_id=vm_id, operation=op.name):
            async with self.lock(vm_id):
                customer_id = op.owner(request)
                ctx.event(vm_id, op.name, "started", customer_id=customer_id)
                try:
                    if self.settle is not None and self.unsettled(vm_id):
                        await self.settle(vm_id)  # the VMM's run state first
                    planned = await op.plan(vm_id, request)
                    if planned.intent is not None:
                        ctx.store.begin_intent(vm_id, op.name, planned.intent)
                    try:
                        await ctx.plan(op.name, planned.steps).run()
                    except StepFailed as exc:
                        raise unwrap(exc) from exc
                    finally:
                        if planned.intent is not None:
                            ctx.store.end_intent(vm_id)
                    result, detail = planned.answer()
                except BaseException as exc:
                    self._observe(op.name, "failed", started, exc)
                    if isinstance(exc, Exception | asyncio.CancelledError):
                        cancelled = isinstance(exc, asyncio.CancelledError)
                        code = exc.code if isinstance(exc, MetaldError) else "canceled" if cancelled else "internal"
                        ctx.event(vm_id, op.name, "failed", str(exc)[:1000], code=code, customer_id=customer_id)
                    if isinstance(exc, asyncio.CancelledError):  # client gone or its deadline passed
                        log.info("operation cancelled: the caller went away or its deadline passed")
                    else:
                        log.warning("operation failed: %s", describe(exc))
                    raise
                ctx.event(vm_id, op.name, "ok", detail)
                if ctx.store.get_vm(vm_id) is None:
                    self._locks.pop(vm_id, None)  # the VM is gone (delete)
                self._observe(op.name, "ok", started, None)
                log.info("operation done", extra={"seconds": round(time.monotonic() - started, 4)})
                return result

    def _observe(self, name: str, outcome: str, started: float, exc: BaseException | None) -> None:
        for observer in self.observers:
            observer(name, outcome, time.monotonic() - started, exc)

    # --- VMMs that exit on their own -------------------------------------------
    def on_vmm_exit(self, vm_id: str, reason: str) -> None:
        """A VMM exited on its own: record the VM as SHUTDOWN with the reason.

        Runs under the VM's lock, so an exit seen during an operation that stops
        or restarts the VMM itself (shutdown, reboot, delete) is judged after it:
        only a VM still recorded as running whose VMM is gone changes state.
        """
        task = asyncio.get_running_loop().create_task(self._record_exit(vm_id, reason))
        self.track(task)

    def track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_exit(self, vm_id: str, reason: str) -> None:
        ctx = self.ctx
        with log_context(vm_id=vm_id, operation="vmm-exit"):
            async with self.lock(vm_id):
                row: VmRecord | None = ctx.store.get_vm(vm_id)
                if row is None or row.state not in ACTIVE or ctx.backend.is_running(vm_id):
                    return
                if ctx.images is not None and row.spec.get("image"):
                    reason = ctx.images.exit_reason(ctx.layout.run_dir(vm_id) / "console.log") or reason
                status = dict(row.status)
                status["last_exit"] = reason
                status["exited_at"] = time.time()
                ctx.set_state(vm_id, VmState.SHUTDOWN, status=status, handle={})
                ctx.event(vm_id, "vmm-exit", "shutdown", reason)
                log.warning("VMM exited: %s", reason)
                for observer in self.observers:
                    observer("vmm-exit", reason, 0.0, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def unwrap(exc: StepFailed) -> MetaldError:
    """Report a domain error raised inside a step as itself; wrap anything else."""
    cause = exc.cause
    while isinstance(cause, StepFailed):
        cause = cause.cause
    if isinstance(cause, MetaldError):
        return cause
    return BackendError(str(exc))
