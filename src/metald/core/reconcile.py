"""Reconciliation at start: make the host agree with the store.

Per VM (concurrently, under the VM's lock): an interrupted operation's intent
goes to that operation's ``recover`` (``core/operations``); before it, unless
the operation says otherwise, the VM's network is re-applied (missing parts
made again, present ones left alone) and its VMM adopted if the handle proves
it is the same process. A VM with no intent keeps its recorded state if its
VMM was adopted (the VMM's own run state wins: running or paused) and becomes
SHUTDOWN if not. Then what belongs to no VM is removed: namespaces, links, nft
elements, jails, cgroups, run directories and stray VMM processes carrying
this metald's markers.

A RUNNING/PAUSED VM with no interrupted operation is adopted on its VMM's
identity alone when the backend offers it (``IdentityAdopter``: one batch of
/proc checks); its control socket is attached after reconcile, by a
background task (:meth:`Reconciler.settle_adopted`) or by the VM's next
operation or read, whichever comes first (:meth:`Reconciler.settle`). Only
then is its recorded state set from the VMM's, or, if the socket does not
answer, the VM handled as a VMM that could not be adopted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from typing import Any

from metald.core.bounds import UNRESPONSIVE, VMM_READ_BOUND_S
from metald.core.context import Context
from metald.core.errors import StepFailed
from metald.core.layout import TRASH_PREFIX
from metald.core.lifecycle import ACTIVE, RECONCILE_CONCURRENCY, VM_DIR_RE, ReconcileReport
from metald.core.logs import log_context
from metald.core.operations import Operations, Recovery
from metald.core.ports import IdentityAdopter, OrphanScan
from metald.core.records import Intent, VmRecord
from metald.core.runner import Runner

log = logging.getLogger(__name__)

# VMMs adopted on identity whose QMP is attached at once after reconcile.
SETTLE_CONCURRENCY = 32


class Reconciler:
    def __init__(
        self, ctx: Context, runner: Runner, operations: Operations, orphan_scan: OrphanScan | None = None
    ) -> None:
        self.ctx = ctx
        self.orphan_scan = orphan_scan
        self.runner = runner
        self.operations = operations
        self.adopter: IdentityAdopter | None = ctx.backend.identity_adopter()  # read once
        # VMMs adopted on identity whose control socket is not attached yet: vm_id -> handle
        self.unsettled: dict[str, dict[str, Any]] = {}
        self._settling: asyncio.Task[None] | None = None
        runner.settle = self.settle
        runner.unsettled = self.unsettled.__contains__

    async def reconcile(self) -> ReconcileReport:
        """Make the host agree with the store after a (re)start (module docstring)."""
        ctx, started, report = self.ctx, time.monotonic(), ReconcileReport()
        with log_context(operation="reconcile"):
            intents = {i.vm_id: i for i in ctx.store.intents()}
            for vm_id in [v for v in intents if ctx.store.get_vm(v) is None]:
                ctx.store.end_intent(vm_id)
                del intents[vm_id]
            gate = asyncio.Semaphore(RECONCILE_CONCURRENCY)
            rows = ctx.store.all_vms()
            claimed = await self._adopt_on_identity(rows, intents)

            async def one(row: VmRecord) -> None:
                async with gate, self.runner.lock(row.vm_id):
                    with log_context(vm_id=row.vm_id):
                        try:
                            await self._reconcile_vm(row, intents.get(row.vm_id), report, claimed.get(row.vm_id))
                        except Exception:
                            log.exception("reconciling vm failed")
                            report.failed.append(row.vm_id)

            await asyncio.gather(*(one(row) for row in rows))
            known = {row.vm_id for row in ctx.store.all_vms()}
            found = await asyncio.to_thread(self.orphan_scan, known) if self.orphan_scan is not None else None
            if found:  # a lost or replaced store: never sweep (see metald.recovery.orphans)
                report.orphans = found.ids
                log.error("%s", found.summary(), extra={"orphans": found.ids})
            else:
                if ctx.network is not None:
                    report.leftovers_removed = await ctx.network.sweep_leftovers(known)
                swept = await ctx.backend.sweep_leftovers(known)
                report.leftovers_removed += [i if " " in i else f"jail {i}" for i in swept]
                report.leftovers_removed += await asyncio.to_thread(self._sweep_run_dirs, known)
            for item in report.leftovers_removed:
                log.warning("removed leftover %s", item)
                ctx.event("", "leftover", "removed", item)
        for names in (report.adopted, report.marked_shutdown, report.rolled_back, report.completed):
            names.sort()
        report.seconds = time.monotonic() - started
        log.info(
            "reconciled",
            extra={
                "adopted": len(report.adopted),
                "marked_shutdown": len(report.marked_shutdown),
                "rolled_back": len(report.rolled_back),
                "completed": len(report.completed),
                "leftovers_removed": len(report.leftovers_removed),
                "orphans": len(report.orphans),
                "qmp_pending": len(self.unsettled),
                "seconds": round(report.seconds, 3),
            },
        )
        if self.unsettled:
            task = asyncio.get_running_loop().create_task(self.settle_adopted())
            self._settling = task
            self.runner.track(task)
        return report

    async def _adopt_on_identity(self, rows: list[VmRecord], intents: dict[str, Intent]) -> dict[str, bool]:
        """Adopt the VMMs of RUNNING/PAUSED VMs with no interrupted operation on
        their identity alone, in one batch. Returns vm_id -> adopted for the VMs
        tried; the others adopt one by one."""
        if self.adopter is None:
            return {}
        items = []
        for row in rows:
            if row.handle and row.state in ACTIVE and row.vm_id not in intents:
                try:
                    items.append((self.ctx.spec(row), row.handle))
                except Exception:
                    log.exception("cannot build the boot spec", extra={"vm_id": row.vm_id})
        if not items:
            return {}
        try:
            adopted = await self.adopter.adopt_many(items)
        except Exception:
            log.exception("adopting on identity failed; adopting one by one")
            return {}
        return {spec.vm_id: spec.vm_id in adopted for spec, _ in items}

    async def settle_adopted(self) -> None:
        """Attach every VMM adopted on identity, SETTLE_CONCURRENCY at a time (see :meth:`settle`)."""
        started = time.monotonic()
        pending = iter(sorted(self.unsettled))
        stopped: list[str] = []

        async def worker() -> None:
            for vm_id in pending:
                async with self.runner.lock(vm_id):
                    with log_context(vm_id=vm_id, operation="reconcile"):
                        try:
                            if await self.settle(vm_id) is False:
                                stopped.append(vm_id)
                        except Exception:
                            log.exception("attaching the adopted VMM failed")

        await asyncio.gather(*(worker() for _ in range(SETTLE_CONCURRENCY)))
        log.info(
            "adopted VMMs attached",
            extra={"marked_shutdown": len(stopped), "seconds": round(time.monotonic() - started, 3)},
        )

    async def wait_settled(self) -> None:
        """Wait until every VMM adopted on identity at start-up is attached (or given up)."""
        if self._settling is not None:
            await asyncio.shield(self._settling)

    async def settle_briefly(self, vm_id: str) -> None:
        """:meth:`settle` for a read: wait at most VMM_READ_BOUND_S (it goes on in the background)."""

        async def settle() -> None:
            async with self.runner.lock(vm_id):
                await self.settle(vm_id)

        task = asyncio.get_running_loop().create_task(settle())
        self.runner.track(task)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged by settle's callers
        with contextlib.suppress(Exception):  # TimeoutError included: the read goes on without it
            await asyncio.wait_for(asyncio.shield(task), VMM_READ_BOUND_S)

    async def settle(self, vm_id: str) -> bool | None:
        """Finish the adoption of a VMM adopted on identity (the caller holds the VM's
        lock): attach its control socket and record the VMM's run state; if the
        socket does not answer, kill the VMM and record SHUTDOWN, as reconcile does
        with a VMM it cannot adopt. None if there was nothing to settle."""
        ctx = self.ctx
        handle = self.unsettled.pop(vm_id, None)
        if handle is None:
            return None
        row = ctx.store.get_vm(vm_id)
        if row is None or row.state not in ACTIVE or row.handle != handle:
            return None  # stopped, deleted or given a new VMM meanwhile
        if self.adopter is None or await self.adopter.attach(vm_id):
            await ctx.sync_run_state(vm_id)
            return True
        if ctx.backend.is_running(vm_id):
            # alive (its identity proven) but silent, e.g. stopped by SIGSTOP: keep it, never kill it;
            # reads report it unresponsive and the next operation tries to attach again
            why = ctx.why_not_adopted(vm_id)
            ctx.event(vm_id, "reconcile", UNRESPONSIVE, why)
            log.warning("adopted VMM is alive but %s: kept as it is: %s", UNRESPONSIVE, why)
            return None
        reason = f"VMM exited while metald was not running ({ctx.why_not_adopted(vm_id)})"
        await ctx.mark_gone(row, reason)
        log.warning("adopted VMM did not answer: recorded SHUTDOWN: %s", reason)
        return False

    async def _reconcile_vm(
        self, row: VmRecord, intent: Intent | None, report: ReconcileReport, claimed: bool | None = None
    ) -> None:
        """``claimed``: the result of :meth:`_adopt_on_identity` for this VM (None: not tried)."""
        ctx, vm_id = self.ctx, row.vm_id
        op = self.operations.by_name.get(intent.operation) if intent is not None else None
        if intent is not None and op is None:
            log.warning("unknown interrupted operation %r: ignored", intent.operation)
        if op is not None and not op.adopts_on_recovery:
            assert intent is not None
            await op.recover(Recovery(row, intent, False, report))
            return

        async def network() -> None:
            steps = ctx.reapply_steps(ctx.alloc(row))
            if steps:
                try:
                    await ctx.plan("reconcile.network", steps).run()
                except StepFailed:
                    log.exception("re-applying network failed")

        async def adopt() -> bool:
            if claimed is not None:
                return claimed
            if not row.handle or not (row.state in ACTIVE or op is not None):
                return False
            try:
                return await ctx.backend.adopt(ctx.spec(row), row.handle)
            except Exception:
                log.exception("adopt failed")
                return False

        # independent: a running VMM holds its TAP open whatever the re-apply finds
        _, adopted = await asyncio.gather(network(), adopt())
        if adopted:
            report.adopted.append(vm_id)
            ctx.event(vm_id, "adopt", "ok", "VMM adopted at start")
        if op is not None:
            assert intent is not None
            await op.recover(Recovery(row, intent, adopted, report))
            ctx.store.end_intent(vm_id)
            return
        if intent is not None:
            ctx.store.end_intent(vm_id)
        if row.state in ACTIVE:
            if not adopted:
                await ctx.mark_gone(row, f"VMM exited while metald was not running ({ctx.why_not_adopted(vm_id)})")
                report.marked_shutdown.append(vm_id)
            elif claimed:
                self.unsettled[vm_id] = row.handle  # run state read once attached (settle)
            else:
                await ctx.sync_run_state(vm_id)
        elif row.handle:
            # CREATED/SHUTDOWN with a handle left: no VMM may run for it
            await ctx.discard_vmm(vm_id, kill_strays=False)
            ctx.store.update_vm(vm_id, handle={})

    def _sweep_run_dirs(self, known: set[str]) -> list[str]:
        """Run directories (and ones moved aside by delete) of VMs not in the store."""
        removed = []
        reserved = self.ctx.backend.run_dir_entries()
        try:
            entries = list(os.scandir(self.ctx.layout.run_root))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) or entry.name in reserved:
                continue
            name = entry.name.removeprefix(TRASH_PREFIX)
            if not VM_DIR_RE.match(name) or (name in known and name == entry.name):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(f"run dir {entry.path}")
        return removed
