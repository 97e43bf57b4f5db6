"""Reconciliation at start: make the host agree with the store.

A mixin of :class:`metald.core.engine.VmEngine`: it uses the engine's locks,
store, backend, network and step helpers. The rule for each interrupted
operation is in the engine's module docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time

from metald.core import orphans
from metald.core.bounds import UNRESPONSIVE, VMM_READ_BOUND_S
from metald.core.errors import (
    StepFailed,
)
from metald.core.lifecycle import (
    ACTIVE,
    RECONCILE_CONCURRENCY,
    RUN_DIR_RESERVED,
    TRASH_PREFIX,
    VM_DIR_RE,
    ReconcileReport,
    plain_files,
    state_name,
)
from metald.core.models import VmState
from metald.observability.logging import log_context
from metald.store.sqlite import Intent, VmRow

log = logging.getLogger(__name__)

# VMMs adopted on identity whose QMP is attached at once after reconcile.
SETTLE_CONCURRENCY = 32


class ReconcileMixin:
    """Start-up reconciliation of every stored VM (see the engine docstring)."""

    # --- start-up ------------------------------------------------------------
    async def start(self) -> ReconcileReport:
        if self.network is not None:
            await self.network.setup_host()
        return await self.reconcile()

    async def reconcile(self) -> ReconcileReport:
        """Make the host agree with the store after a (re)start.

        Per VM (concurrently, under the VM's lock): finish or roll back its
        interrupted operation (module docstring), re-apply its network plan
        (missing parts made again, present ones left alone), adopt its VMM if
        the handle proves it is the same process, and set the recorded state
        from the VMM's own (running/paused/gone). Then remove what belongs to
        no VM: namespaces, links, nft elements, jails, cgroups, run
        directories and stray VMM processes carrying this metald's markers.

        A RUNNING/PAUSED VM with no interrupted operation is adopted on its
        VMM's identity alone when the backend can (``adopt_many``: one batch
        of /proc checks); its control socket is attached after reconcile, by
        a background task (:meth:`_settle_adopted`) or by the VM's next
        operation or read, whichever comes first (:meth:`_settle`). Only
        then is its recorded state set from the VMM's, or, if the socket does
        not answer, the VM handled as a VMM that could not be adopted.
        """
        started = time.monotonic()
        report = ReconcileReport()
        with log_context(operation="reconcile"):
            intents = {i.vm_id: i for i in self.store.intents()}
            for vm_id in [v for v in intents if self.store.get_vm(v) is None]:
                self.store.end_intent(vm_id)
                del intents[vm_id]
            gate = asyncio.Semaphore(RECONCILE_CONCURRENCY)
            rows = self.store.all_vms()
            claimed = await self._adopt_on_identity(rows, intents)

            async def one(row: VmRow) -> None:
                async with gate, self._lock(row.vm_id):
                    with log_context(vm_id=row.vm_id):
                        try:
                            await self._reconcile_vm(row, intents.get(row.vm_id), report, claimed.get(row.vm_id))
                        except Exception:
                            log.exception("reconciling vm failed")
                            report.failed.append(row.vm_id)

            await asyncio.gather(*(one(row) for row in rows))
            known = {row.vm_id for row in self.store.all_vms()}
            found = await asyncio.to_thread(orphans.scan, self.settings, known, orphans.store_is_empty(self.store))
            report.orphans = found.ids
            if found:  # a lost or replaced store: never sweep (see metald.core.orphans)
                log.error("%s", found.summary(), extra={"orphans": found.ids})
            else:
                if self.network is not None:
                    report.leftovers_removed = await self.network.sweep_leftovers(known)
                sweep = getattr(self.backend, "sweep_leftovers", None)
                if sweep is not None:
                    report.leftovers_removed += [i if " " in i else f"jail {i}" for i in await sweep(known)]
                report.leftovers_removed += await asyncio.to_thread(self._sweep_run_dirs, known)
            for item in report.leftovers_removed:
                log.warning("removed leftover %s", item)
                self.store.add_event("", "leftover", "removed", item)
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
                "qmp_pending": len(self._unsettled),
                "seconds": round(report.seconds, 3),
            },
        )
        if self._unsettled:
            task = asyncio.get_running_loop().create_task(self._settle_adopted())
            self._settling = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return report

    async def _adopt_on_identity(self, rows: list[VmRow], intents: dict[str, Intent]) -> dict[str, bool]:
        """Adopt the VMMs of RUNNING/PAUSED VMs with no interrupted operation on
        their identity alone, in one batch (backends with ``adopt_many``).
        Returns vm_id -> adopted for the VMs tried; the others adopt one by one."""
        hook = self._backend_hook("adopt_many")
        if hook is None:
            return {}
        items = []
        for row in rows:
            if row.handle and row.state in ACTIVE and row.vm_id not in intents:
                try:
                    items.append((self._spec(row), row.handle))
                except Exception:
                    log.exception("cannot build the boot spec", extra={"vm_id": row.vm_id})
        if not items:
            return {}
        try:
            adopted = await hook(items)
        except Exception:
            log.exception("adopting on identity failed; adopting one by one")
            return {}
        return {spec.vm_id: spec.vm_id in adopted for spec, _ in items}

    async def _settle_adopted(self) -> None:
        """Attach every VMM adopted on identity, SETTLE_CONCURRENCY at a time (see :meth:`_settle`)."""
        started = time.monotonic()
        pending = iter(sorted(self._unsettled))
        stopped: list[str] = []

        async def worker() -> None:
            for vm_id in pending:
                async with self._lock(vm_id):
                    with log_context(vm_id=vm_id, operation="reconcile"):
                        try:
                            if await self._settle(vm_id) is False:
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

    async def _settle_briefly(self, vm_id: str) -> None:
        """:meth:`_settle` for a read: wait at most VMM_READ_BOUND_S (it goes on in the background)."""

        async def settle() -> None:
            async with self._lock(vm_id):
                await self._settle(vm_id)

        task = asyncio.get_running_loop().create_task(settle())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged by _settle's callers
        with contextlib.suppress(Exception):  # TimeoutError included: the read goes on without it
            await asyncio.wait_for(asyncio.shield(task), VMM_READ_BOUND_S)

    async def _settle(self, vm_id: str) -> bool | None:
        """Finish the adoption of a VMM adopted on identity (the caller holds the VM's
        lock): attach its control socket and record the VMM's run state; if the
        socket does not answer, kill the VMM and record SHUTDOWN, as reconcile does
        with a VMM it cannot adopt. None if there was nothing to settle."""
        handle = self._unsettled.pop(vm_id, None)
        if handle is None:
            return None
        row = self.store.get_vm(vm_id)
        if row is None or row.state not in ACTIVE or row.handle != handle:
            return None  # stopped, deleted or given a new VMM meanwhile
        attach = self._backend_hook("attach")
        if attach is None or await attach(vm_id):
            await self._sync_run_state(vm_id)
            return True
        if self.backend.is_running(vm_id):
            # alive (its identity proven) but silent, e.g. stopped by SIGSTOP: keep it, never kill it;
            # reads report it unresponsive and the next operation tries to attach again
            why = self._why_not_adopted(vm_id)
            self.store.add_event(vm_id, "reconcile", UNRESPONSIVE, why)
            log.warning("adopted VMM is alive but %s: kept as it is: %s", UNRESPONSIVE, why)
            return None
        reason = f"VMM exited while metald was not running ({self._why_not_adopted(vm_id)})"
        await self._discard_vmm(vm_id, kill_strays=False)
        self._record_stopped(row, reason)
        self.store.add_event(vm_id, "reconcile", "shutdown", reason)
        log.warning("adopted VMM did not answer: recorded SHUTDOWN: %s", reason)
        return False

    async def _reconcile_vm(
        self, row: VmRow, intent: Intent | None, report: ReconcileReport, claimed: bool | None = None
    ) -> None:
        """``claimed``: the result of :meth:`_adopt_on_identity` for this VM (None: not tried)."""
        vm_id = row.vm_id
        operation = intent.operation if intent else None
        if operation in ("create", "delete"):
            # An interrupted create is rolled back; an interrupted delete is finished.
            await self._teardown(row)
            (report.rolled_back if operation == "create" else report.completed).append(vm_id)
            return

        async def network() -> None:
            steps = self._reapply_steps(self._alloc(row))
            if steps:
                try:
                    await self._plan("reconcile.network", steps).run()
                except StepFailed:
                    log.exception("re-applying network failed")

        async def adopt() -> bool:
            if claimed is not None:
                return claimed
            if not row.handle or not (row.state in ACTIVE or operation in ("boot", "reboot", "shutdown")):
                return False
            try:
                return await self.backend.adopt(self._spec(row), row.handle)
            except Exception:
                log.exception("adopt failed")
                return False

        # independent: a running VMM holds its TAP open whatever the re-apply finds
        _, adopted = await asyncio.gather(network(), adopt())
        if adopted:
            report.adopted.append(vm_id)
            self.store.add_event(vm_id, "adopt", "ok", "VMM adopted at start")
        if operation == "boot":
            if adopted:
                status = dict(row.status)
                status.pop("last_exit", None)
                status.setdefault("booted_at", time.time())
                self._set_state(vm_id, VmState.RUNNING, status=status)
                await self._sync_run_state(vm_id)
                report.completed.append(vm_id)
            else:
                assert intent is not None
                previous = VmState(int(intent.detail.get("from", VmState.CREATED)))
                await self._roll_back_boot(row, previous)
                report.rolled_back.append(vm_id)
        elif operation == "reboot" and not adopted:
            await self._finish_reboot(row)
            report.completed.append(vm_id)
        elif row.state in ACTIVE or (operation == "shutdown" and adopted):
            if adopted:
                if claimed:
                    self._unsettled[vm_id] = row.handle  # run state read once attached (_settle)
                else:
                    await self._sync_run_state(vm_id)
                if operation is not None:  # shutdown: rolled back; pause-like ops: completed
                    (report.rolled_back if operation == "shutdown" else report.completed).append(vm_id)
            else:
                why = self._why_not_adopted(vm_id)
                if operation == "shutdown":
                    reason = "stopped by ShutdownVm (finished while metald restarted)"
                else:
                    reason = f"VMM exited while metald was not running ({why})"
                await self._discard_vmm(vm_id, kill_strays=False)  # the sweep below kills strays
                self._record_stopped(row, reason)
                self.store.add_event(vm_id, "reconcile", "shutdown", reason)
                report.marked_shutdown.append(vm_id)
                if operation is not None:
                    report.completed.append(vm_id)
        elif row.handle:
            # CREATED/SHUTDOWN with a handle left: no VMM may run for it
            await self._discard_vmm(vm_id, kill_strays=False)
            self.store.update_vm(vm_id, handle={})
        if intent is not None:
            self.store.end_intent(vm_id)

    def _why_not_adopted(self, vm_id: str) -> str:
        hook = self._backend_hook("adopt_error")
        why = hook(vm_id) if hook is not None else None
        return why or "no VMM to adopt"

    async def _sync_run_state(self, vm_id: str) -> None:
        """Record RUNNING or PAUSED as the adopted VMM reports it (an interrupted
        pause/resume is completed or rolled back by this)."""
        hook = self._backend_hook("vmm_status")
        if hook is None:
            return
        try:
            status = await hook(vm_id)
        except Exception as exc:
            log.warning("cannot read the VMM's run state: %s", exc)
            return
        wanted = {"running": VmState.RUNNING, "paused": VmState.PAUSED}.get(status)
        row = self.store.get_vm(vm_id)
        if wanted is not None and row is not None and row.state != wanted:
            log.warning("recorded %s but the VMM is %s: recording %s", state_name(row.state), status, wanted.name)
            self._set_state(vm_id, wanted)
            self.store.add_event(vm_id, "reconcile", wanted.name.lower(), f"VMM is {status}")

    async def _roll_back_boot(self, row: VmRow, previous: VmState) -> None:
        """Back to the state before an interrupted boot: no VMM, no runtime files;
        from CREATED also no logs and no jail (a SHUTDOWN VM keeps both)."""
        vm_id = row.vm_id
        await self._discard_vmm(vm_id)
        if previous == VmState.CREATED:
            run_dir = self.settings.run_dir / vm_id
            for name in plain_files(run_dir):
                with contextlib.suppress(OSError):
                    (run_dir / name).unlink()
            hook = self._backend_hook("remove_jail")
            if hook is not None:
                await hook(vm_id)
        self._set_state(vm_id, previous, handle={})
        self.store.add_event(vm_id, "reconcile", previous.name.lower(), "interrupted boot rolled back")

    async def _finish_reboot(self, row: VmRow) -> None:
        """A reboot cut off between stopping the old VMM and recording the new one:
        start a fresh VMM (the reboot completed), or record SHUTDOWN if that fails."""
        vm_id = row.vm_id
        await self._discard_vmm(vm_id)
        try:
            handle = await self.backend.boot(self._spec(row))
        except Exception as exc:
            await self._discard_vmm(vm_id)
            self._record_stopped(row, f"reboot interrupted by a metald restart; restart failed: {exc}")
            return
        status = dict(row.status)
        status["booted_at"] = time.time()
        status["reboots"] = int(status.get("reboots", 0)) + 1
        self._set_state(vm_id, VmState.RUNNING, handle=handle, status=status)
        self.store.add_event(vm_id, "reconcile", "running", "interrupted reboot completed")

    def _sweep_run_dirs(self, known: set[str]) -> list[str]:
        """Run directories (and ones moved aside by delete) of VMs not in the store."""
        removed = []
        try:
            entries = list(os.scandir(self.settings.run_dir))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) or entry.name in RUN_DIR_RESERVED:
                continue
            name = entry.name.removeprefix(TRASH_PREFIX)
            if not VM_DIR_RE.match(name) or (name in known and name == entry.name):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(f"run dir {entry.path}")
        return removed
