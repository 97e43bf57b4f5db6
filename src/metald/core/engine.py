"""The lifecycle engine: every VM operation as a plan of undoable steps.

State machine::

    CREATED --boot--> RUNNING <--pause/resume--> PAUSED
    RUNNING|PAUSED --shutdown--> SHUTDOWN --boot--> RUNNING
    RUNNING --reboot--> RUNNING
    any --delete--> (gone)   (RUNNING/PAUSED need force=true)

Operations on one VM are serialised by a per-VM lock; different VMs proceed
concurrently. Each mutating operation is recorded as an intent in the store
before its first side effect, so a crash mid-operation is finished or rolled
back by :meth:`VmEngine.reconcile` on the next start.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metald.config import Settings
from metald.core.errors import (
    AlreadyExists,
    BackendError,
    FailedPrecondition,
    MetaldError,
    NotFound,
    ResourceExhausted,
    StepFailed,
)
from metald.core.models import BootSpec, NetworkAllocation, VmDraft, VmMetrics, VmState
from metald.core.plan import FuncStep, Plan, Step, StepObserver
from metald.core.ports import Backend, Network
from metald.core.specs import boot_spec, draft_from_dict, draft_to_dict
from metald.observability.logging import log_context
from metald.store.sqlite import DuplicateVm, Store, VmRow

log = logging.getLogger(__name__)

ACTIVE = (VmState.RUNNING, VmState.PAUSED)

# Called after every operation: (operation, outcome, seconds, error or None)
OperationObserver = Callable[[str, str, float, BaseException | None], None]


@dataclass
class VmView:
    row: VmRow
    network: NetworkAllocation | None
    metrics: VmMetrics
    backend_info: dict[str, str]


@dataclass
class ListPage:
    rows: list[VmRow]
    total: int
    last_seq: int | None  # set when more rows may follow


@dataclass
class ReconcileReport:
    adopted: list[str] = field(default_factory=list)
    marked_shutdown: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    leftovers_removed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _state_name(state: int) -> str:
    return VmState(state).name


class VmEngine:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        backend: Backend,
        network: Network | None,
        step_observers: list[StepObserver] | None = None,
        operation_observers: list[OperationObserver] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.network = network
        self.step_observers = step_observers or []
        self.operation_observers = operation_observers or []
        self._locks: dict[str, asyncio.Lock] = {}
        self._create_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        backend.set_exit_callback(self._on_vmm_exit)

    # --- plumbing ------------------------------------------------------------
    def _lock(self, vm_id: str) -> asyncio.Lock:
        lock = self._locks.get(vm_id)
        if lock is None:
            lock = self._locks[vm_id] = asyncio.Lock()
        return lock

    def _plan(self, name: str, steps: list[Step]) -> Plan:
        return Plan(name, steps, observers=list(self.step_observers))

    def _row(self, vm_id: str) -> VmRow:
        row = self.store.get_vm(vm_id)
        if row is None:
            raise NotFound(f"vm {vm_id} not found")
        return row

    def _alloc(self, row: VmRow) -> NetworkAllocation | None:
        if self.network is None or not row.network:
            return None
        return self.network.allocation_from_dict(row.network)

    def _spec(self, row: VmRow) -> BootSpec:
        draft = draft_from_dict(row.spec)
        alloc = self._alloc(row)
        ip_arg = self.network.kernel_ip_arg(alloc) if self.network and alloc else None
        return boot_spec(row.vm_id, draft, alloc, ip_arg, self.settings.run_dir)

    async def _operation(
        self, name: str, vm_id: str, body: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Run one operation under the VM's lock with intent, events and logs."""
        started = time.monotonic()
        with log_context(vm_id=vm_id, operation=name):
            async with self._lock(vm_id):
                try:
                    result = await body()
                except BaseException as exc:
                    outcome = "failed"
                    self._observe(name, outcome, started, exc)
                    if isinstance(exc, MetaldError | Exception) and self.store.get_vm(vm_id):
                        self.store.add_event(vm_id, name, outcome, str(exc)[:1000])
                    log.warning("operation failed: %s", exc)
                    raise
                self._observe(name, "ok", started, None)
                log.info("operation done", extra={"seconds": round(time.monotonic() - started, 4)})
                return result

    def _observe(self, name: str, outcome: str, started: float, exc: BaseException | None) -> None:
        for observer in self.operation_observers:
            observer(name, outcome, time.monotonic() - started, exc)

    def _set_state(self, vm_id: str, state: VmState, **fields: Any) -> None:
        self.store.update_vm(vm_id, state=int(state), **fields)

    @staticmethod
    def _require(row: VmRow, allowed: tuple[VmState, ...], action: str) -> None:
        if row.state not in allowed:
            allowed_names = ", ".join(s.name for s in allowed)
            raise FailedPrecondition(
                f"cannot {action} vm {row.vm_id}: it is {_state_name(row.state)}"
                f" (allowed from {allowed_names})"
            )

    def _network_steps(self, alloc: NetworkAllocation | None) -> list[Step]:
        if self.network is None or alloc is None:
            return []
        return list(self.network.setup_steps(alloc))

    # --- create --------------------------------------------------------------
    async def create(
        self, vm_id: str, customer_id: str, draft: VmDraft, config: bytes
    ) -> VmRow:
        if self.store.get_vm(vm_id) is not None:
            raise AlreadyExists(f"vm {vm_id} already exists")

        async def body() -> VmRow:
            if self.store.get_vm(vm_id) is not None:
                raise AlreadyExists(f"vm {vm_id} already exists")
            await self._check_capacity(draft)
            holder: dict[str, Any] = {}

            async def record() -> None:
                try:
                    self.store.insert_vm(
                        vm_id,
                        customer_id,
                        int(VmState.CREATED),
                        config,
                        draft_to_dict(draft),
                        self.backend.name,
                        draft.vcpu_count,
                        draft.memory_bytes,
                        dict(draft.metadata),
                    )
                except DuplicateVm:
                    raise AlreadyExists(f"vm {vm_id} already exists") from None

            async def unrecord() -> None:
                self.store.delete_vm(vm_id)

            async def allocate() -> None:
                assert self.network is not None
                alloc = await self.network.allocate(vm_id, draft.nic)
                holder["alloc"] = alloc
                self.store.update_vm(vm_id, network=self.network.allocation_to_dict(alloc))

            async def release() -> None:
                assert self.network is not None
                await self.network.release(vm_id)

            async def validate() -> None:
                alloc = holder.get("alloc")
                ip_arg = self.network.kernel_ip_arg(alloc) if self.network and alloc else None
                spec = boot_spec(vm_id, draft, alloc, ip_arg, self.settings.run_dir)
                await self.backend.validate(spec)

            run_dir = self.settings.run_dir / vm_id

            async def make_run_dir() -> None:
                run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)

            async def remove_run_dir() -> None:
                shutil.rmtree(run_dir, ignore_errors=True)

            steps: list[Step] = [FuncStep("record", record, unrecord)]
            if self.network is not None:
                steps.append(FuncStep("allocate", allocate, release))
            steps.append(FuncStep("validate", validate))
            steps.append(FuncStep("rundir", make_run_dir, remove_run_dir))
            plan_steps: list[Step] = list(steps)
            if self.network is not None:
                plan_steps.append(_Deferred("network", lambda: holder.get("alloc"), self))
            self.store.begin_intent(vm_id, "create")
            try:
                await self._plan("create", plan_steps).run()
            except StepFailed as exc:
                self.store.end_intent(vm_id)
                raise _unwrap(exc) from exc
            self.store.end_intent(vm_id)
            self.store.add_event(vm_id, "create", "ok")
            return self._row(vm_id)

        return await self._operation("create", vm_id, body)

    async def _check_capacity(self, draft: VmDraft) -> None:
        import os

        host_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = host_mem * self.settings.host_max_memory_fraction
        if self.store.total_memory_bytes() + draft.memory_bytes > budget:
            raise ResourceExhausted(
                f"host memory budget exhausted: {int(budget) >> 20} MiB for all VMs"
            )

    # --- boot ----------------------------------------------------------------
    async def boot(self, vm_id: str) -> VmState:
        async def body() -> VmState:
            row = self._row(vm_id)
            self._require(row, (VmState.CREATED, VmState.SHUTDOWN), "boot")
            spec = self._spec(row)
            await self.backend.validate(spec)
            alloc = self._alloc(row)

            async def ensure_network() -> None:
                steps = self._network_steps(alloc)
                if steps:
                    await Plan("network", steps).run()

            async def start_vmm() -> None:
                spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
                handle = await self.backend.boot(spec)
                self.store.update_vm(vm_id, handle=handle)

            async def stop_vmm() -> None:
                await self.backend.shutdown(vm_id, True, 0)

            async def record() -> None:
                status = dict(row.status)
                status.pop("last_exit", None)
                status["booted_at"] = time.time()
                self._set_state(vm_id, VmState.RUNNING, status=status)

            self.store.begin_intent(vm_id, "boot", {"from": row.state})
            try:
                await self._plan(
                    "boot",
                    [
                        FuncStep("network", ensure_network),
                        FuncStep("vmm", start_vmm, stop_vmm),
                        FuncStep("record", record),
                    ],
                ).run()
            except StepFailed as exc:
                raise _unwrap(exc) from exc
            finally:
                self.store.end_intent(vm_id)
            self.store.add_event(vm_id, "boot", "ok")
            return VmState.RUNNING

        return await self._operation("boot", vm_id, body)

    # --- pause / resume ------------------------------------------------------
    async def pause(self, vm_id: str) -> VmState:
        async def body() -> VmState:
            row = self._row(vm_id)
            self._require(row, (VmState.RUNNING,), "pause")
            await self._backend_call(self.backend.pause(vm_id))
            self._set_state(vm_id, VmState.PAUSED)
            self.store.add_event(vm_id, "pause", "ok")
            return VmState.PAUSED

        return await self._operation("pause", vm_id, body)

    async def resume(self, vm_id: str) -> VmState:
        async def body() -> VmState:
            row = self._row(vm_id)
            self._require(row, (VmState.PAUSED,), "resume")
            await self._backend_call(self.backend.resume(vm_id))
            self._set_state(vm_id, VmState.RUNNING)
            self.store.add_event(vm_id, "resume", "ok")
            return VmState.RUNNING

        return await self._operation("resume", vm_id, body)

    async def _backend_call(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except MetaldError:
            raise
        except Exception as exc:
            raise BackendError(str(exc)) from exc

    # --- shutdown / reboot ---------------------------------------------------
    async def shutdown(self, vm_id: str, force: bool, timeout_s: int) -> VmState:
        async def body() -> VmState:
            row = self._row(vm_id)
            self._require(row, ACTIVE, "shut down")
            self.store.begin_intent(vm_id, "shutdown")
            try:
                how = await self._backend_call(self.backend.shutdown(vm_id, force, timeout_s))
            finally:
                self.store.end_intent(vm_id)
            status = dict(row.status)
            status["last_exit"] = how
            status["exited_at"] = time.time()
            self._set_state(vm_id, VmState.SHUTDOWN, status=status, handle={})
            self.store.add_event(vm_id, "shutdown", "ok", how)
            return VmState.SHUTDOWN

        return await self._operation("shutdown", vm_id, body)

    async def reboot(self, vm_id: str, force: bool) -> VmState:
        async def body() -> VmState:
            row = self._row(vm_id)
            self._require(row, (VmState.RUNNING,), "reboot")
            spec = self._spec(row)
            self.store.begin_intent(vm_id, "reboot")
            try:
                handle = await self._backend_call(self.backend.reboot(spec, force))
            except MetaldError:
                if not self.backend.is_running(vm_id):
                    status = dict(row.status)
                    status["last_exit"] = "reboot failed"
                    self._set_state(vm_id, VmState.SHUTDOWN, status=status, handle={})
                raise
            finally:
                self.store.end_intent(vm_id)
            status = dict(row.status)
            status["booted_at"] = time.time()
            status["reboots"] = int(status.get("reboots", 0)) + 1
            self.store.update_vm(vm_id, handle=handle or row.handle, status=status)
            self.store.add_event(vm_id, "reboot", "ok", "forced" if force else "graceful")
            return VmState.RUNNING

        return await self._operation("reboot", vm_id, body)

    # --- delete --------------------------------------------------------------
    async def delete(self, vm_id: str, force: bool) -> None:
        async def body() -> None:
            row = self._row(vm_id)
            if row.state in ACTIVE and not force:
                raise FailedPrecondition(
                    f"cannot delete vm {vm_id}: it is {_state_name(row.state)};"
                    " shut it down first or pass force=true"
                )
            self.store.begin_intent(vm_id, "delete")
            await self._teardown(row)
            self._locks.pop(vm_id, None)

        await self._operation("delete", vm_id, body)
        self.store.add_event(vm_id, "delete", "ok")

    async def _teardown(self, row: VmRow) -> None:
        """Remove everything of one VM; each part is idempotent, so this can run
        again after a crash."""
        vm_id = row.vm_id
        steps: list[Step] = [FuncStep("vmm", lambda: self.backend.cleanup(vm_id))]
        alloc = self._alloc(row)
        if self.network is not None:
            if alloc is not None:
                net = self.network
                steps.append(FuncStep("network", lambda: net.teardown(alloc)))
            steps.append(FuncStep("release", lambda: self.network.release(vm_id)))  # type: ignore[union-attr]
        run_dir = self.settings.run_dir / vm_id

        async def remove_files() -> None:
            shutil.rmtree(run_dir, ignore_errors=True)

        async def forget() -> None:
            self.store.delete_vm(vm_id)

        steps += [FuncStep("files", remove_files), FuncStep("record", forget)]
        try:
            await self._plan("delete", steps).run()
        except StepFailed as exc:
            raise _unwrap(exc) from exc

    # --- reads ---------------------------------------------------------------
    async def get(self, vm_id: str) -> VmView:
        row = self._row(vm_id)
        alloc = self._alloc(row)
        metrics = VmMetrics()
        info: dict[str, str] = {"backend": row.backend or self.backend.name}
        if row.state in ACTIVE and self.backend.is_running(vm_id):
            try:
                metrics = await self.backend.metrics(vm_id)
                if alloc is not None and self.network is not None:
                    rx, tx, rxp, txp = await self.network.tap_counters(alloc)
                    if not metrics.net_rx_bytes and not metrics.net_tx_bytes:
                        metrics.net_rx_bytes, metrics.net_tx_bytes = rx, tx
                        metrics.net_rx_packets, metrics.net_tx_packets = rxp, txp
                info.update(await self.backend.info(vm_id))
            except Exception as exc:  # metrics are best effort; say why they are missing
                metrics = VmMetrics(measured=False, notes={"error": str(exc)[:200]})
        else:
            metrics.notes["metrics"] = f"not measured: vm is {_state_name(row.state)}"
        for key, value in metrics.notes.items():
            info[f"metrics_{key}" if not key.startswith("metrics") else key] = value
        info["metrics_measured"] = "true" if metrics.measured else "false"
        if "last_exit" in row.status:
            info["last_exit_reason"] = str(row.status["last_exit"])
        return VmView(row=row, network=alloc, metrics=metrics, backend_info=info)

    def list(
        self,
        states: list[int],
        page_size: int,
        after_seq: int,
        customer_id: str | None = None,
    ) -> ListPage:
        rows, total = self.store.list_vms(states, after_seq, page_size + 1, customer_id)
        more = len(rows) > page_size
        rows = rows[:page_size]
        return ListPage(rows=rows, total=total, last_seq=rows[-1].seq if more and rows else None)

    # --- supervision ---------------------------------------------------------
    def _on_vmm_exit(self, vm_id: str, reason: str) -> None:
        """A VMM exited on its own: record the VM as SHUTDOWN with the reason.

        Runs under the VM's lock, so an exit seen during an operation that stops
        or restarts the VMM itself (shutdown, reboot, delete) is judged after it:
        only a VM still recorded as running whose VMM is gone changes state.
        """
        task = asyncio.get_running_loop().create_task(self._record_exit(vm_id, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_exit(self, vm_id: str, reason: str) -> None:
        with log_context(vm_id=vm_id, operation="vmm-exit"):
            async with self._lock(vm_id):
                row = self.store.get_vm(vm_id)
                if row is None or row.state not in ACTIVE or self.backend.is_running(vm_id):
                    return
                status = dict(row.status)
                status["last_exit"] = reason
                status["exited_at"] = time.time()
                self._set_state(vm_id, VmState.SHUTDOWN, status=status, handle={})
                self.store.add_event(vm_id, "vmm-exit", "shutdown", reason)
                log.warning("VMM exited: %s", reason)
                for observer in self.operation_observers:
                    observer("vmm-exit", reason, 0.0, None)

    # --- start-up ------------------------------------------------------------
    async def start(self) -> ReconcileReport:
        if self.network is not None:
            await self.network.setup_host()
        return await self.reconcile()

    async def reconcile(self) -> ReconcileReport:
        """Make the host agree with the store after a (re)start."""
        started = time.monotonic()
        report = ReconcileReport()
        with log_context(operation="reconcile"):
            for intent in self.store.intents():
                row = self.store.get_vm(intent.vm_id)
                if row is None:
                    self.store.end_intent(intent.vm_id)
                    continue
                if intent.operation in ("create", "delete"):
                    # An interrupted create is rolled back; a delete is finished.
                    await self._teardown(row)
                    (report.rolled_back if intent.operation == "create" else report.completed).append(
                        row.vm_id
                    )
                else:
                    self.store.end_intent(intent.vm_id)
            for row in self.store.all_vms():
                alloc = self._alloc(row)
                steps = self._network_steps(alloc)
                if steps:
                    try:
                        await Plan("network", steps).run()
                    except StepFailed:
                        log.exception("re-applying network failed", extra={"vm_id": row.vm_id})
                if row.state in ACTIVE:
                    adopted = False
                    if row.handle:
                        try:
                            adopted = await self.backend.adopt(self._spec(row), row.handle)
                        except Exception:
                            log.exception("adopt failed", extra={"vm_id": row.vm_id})
                    if adopted:
                        report.adopted.append(row.vm_id)
                    else:
                        status = dict(row.status)
                        status["last_exit"] = "VMM gone while metald was not running"
                        self._set_state(row.vm_id, VmState.SHUTDOWN, status=status, handle={})
                        self.store.add_event(row.vm_id, "reconcile", "shutdown", status["last_exit"])
                        report.marked_shutdown.append(row.vm_id)
            known = {row.vm_id for row in self.store.all_vms()}
            if self.network is not None:
                report.leftovers_removed = await self.network.sweep_leftovers(known)
            sweep = getattr(self.backend, "sweep_leftovers", None)
            if sweep is not None:
                report.leftovers_removed += [f"jail {vm}" for vm in await sweep(known)]
                for item in report.leftovers_removed:
                    log.warning("removed leftover %s", item)
        report.seconds = time.monotonic() - started
        log.info(
            "reconciled",
            extra={
                "adopted": len(report.adopted),
                "marked_shutdown": len(report.marked_shutdown),
                "rolled_back": len(report.rolled_back),
                "seconds": round(report.seconds, 3),
            },
        )
        return report

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.backend.close()


class _Deferred:
    """The network setup steps, built once the allocation exists (they depend on it)."""

    def __init__(
        self, name: str, get_alloc: Callable[[], NetworkAllocation | None], engine: VmEngine
    ) -> None:
        self.name = name
        self._get_alloc = get_alloc
        self._engine = engine
        self._plan: Plan | None = None

    async def is_done(self) -> bool:
        return False

    async def do(self) -> None:
        steps = self._engine._network_steps(self._get_alloc())
        self._plan = Plan("create.network", steps, observers=list(self._engine.step_observers))
        await self._plan.run()

    async def undo(self) -> None:
        alloc = self._get_alloc()
        if alloc is not None and self._engine.network is not None:
            await self._engine.network.teardown(alloc)


def _unwrap(exc: StepFailed) -> MetaldError:
    """Report a domain error raised inside a step as itself; wrap anything else."""
    cause = exc.cause
    while isinstance(cause, StepFailed):
        cause = cause.cause
    if isinstance(cause, MetaldError):
        return cause
    return BackendError(str(exc))


def run_dir_of(settings: Settings, vm_id: str) -> Path:
    return settings.run_dir / vm_id
