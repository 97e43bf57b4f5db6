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

Every operation is a plan whose steps undo themselves when a later one fails,
so a failed operation leaves exactly what was there before. Steps that cannot
be undone (stopping or resetting a guest) come last. Per operation:

* create: any failure undoes every step; an interrupted create is rolled back
  (the VM never existed).
* boot: a failure stops the VMM it started and removes the files and the jail
  it made (a SHUTDOWN VM keeps its logs and jail). Interrupted: if the VMM the
  store's handle names is alive and provably the same process, it is adopted
  and the VM is RUNNING (completed); otherwise any half-started VMM is killed,
  its files and (from CREATED) jail removed, and the VM is back in its
  previous state (rolled back).
* pause/resume: no intent. Each is one QMP command followed by one store
  write, and the outcome can be read back: on restart the recorded state of
  every adopted VM is set from the VMM's own run state (running/paused), which
  completes or rolls back an interrupted pause/resume. (A VM adopted on its
  VMM's identity gets this once its QMP is attached: in the background right
  after reconcile, and always before its next operation or read; see
  reconcile.py.)
* shutdown: the stop is the only step. Interrupted: a VMM still alive is
  adopted and keeps its state (rolled back; the caller may retry); a VMM that
  is gone makes the VM SHUTDOWN (completed).
* reboot: network check, then the reboot (the last step). Interrupted: a VMM
  that the handle proves is ours is adopted (RUNNING); if the restart of a
  graceful reboot was cut off, the reboot is completed by starting a new VMM
  (SHUTDOWN with the reason if that fails).
* delete: stop the VMM (forced delete only; this cannot be undone, so a later
  failure leaves the VM SHUTDOWN with all its resources), tear down the
  network, remove the jail, free the addresses, move the run directory aside,
  and finally forget the row. Every step but the first is undone on failure.
  Interrupted: completed (every part is idempotent).

A VMM that exits on its own is noticed at once (pidfd) and its VM recorded
SHUTDOWN with the reason; its IP, namespace and jail stay for a later boot and
are freed by delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
from metald.core.imageport import ImagePort
from metald.core.lifecycle import (
    ACTIVE,
    plain_files,
    state_name,
    trash_of,
)
from metald.core.models import BootSpec, NetworkAllocation, VmDraft, VmMetrics, VmState
from metald.core.plan import FuncStep, Plan, Step, StepObserver
from metald.core.ports import Backend, Network
from metald.core.reconcile import ReconcileMixin
from metald.core.specs import boot_spec, draft_from_dict, draft_to_dict
from metald.observability.logging import log_context
from metald.store.sqlite import DuplicateVm, Store, VmRow

log = logging.getLogger(__name__)

# Network steps that add nft elements (no way to tell whether they were there).
_ELEMENT_STEPS = frozenset({"firewall", "port_forwards"})

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


class VmEngine(ReconcileMixin):
    def __init__(
        self,
        settings: Settings,
        store: Store,
        backend: Backend,
        network: Network | None,
        step_observers: list[StepObserver] | None = None,
        operation_observers: list[OperationObserver] | None = None,
        images: ImagePort | None = None,
    ) -> None:
        self.settings = settings
        self.images = images  # container images as root disks (metald.images)
        self.store = store
        self.backend = backend
        self.network = network
        self.step_observers = step_observers or []
        self.operation_observers = operation_observers or []
        self._locks: dict[str, asyncio.Lock] = {}
        self._create_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # VMMs adopted on identity whose QMP is not attached yet: vm_id -> handle (reconcile.py)
        self._unsettled: dict[str, dict[str, Any]] = {}
        self._settling: asyncio.Task[None] | None = None
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
        self, name: str, vm_id: str, body: Callable[[], Awaitable[Any]], customer_id: str | None = None
    ) -> Any:
        """Run one operation under the VM's lock with intent, events and logs
        (``customer_id``: the owner to record before the VM's row exists)."""
        started = time.monotonic()
        with log_context(vm_id=vm_id, operation=name):
            async with self._lock(vm_id):
                self.store.add_event(vm_id, name, "started", customer_id=customer_id)
                try:
                    if vm_id in self._unsettled:
                        await self._settle(vm_id)  # the VMM's run state first (reconcile.py)
                    result = await body()
                except BaseException as exc:
                    outcome = "failed"
                    self._observe(name, outcome, started, exc)
                    if isinstance(exc, Exception | asyncio.CancelledError):
                        cancelled = isinstance(exc, asyncio.CancelledError)
                        code = exc.code if isinstance(exc, MetaldError) else "canceled" if cancelled else "internal"
                        self.store.add_event(vm_id, name, outcome, str(exc)[:1000], code=code, customer_id=customer_id)
                    if isinstance(exc, asyncio.CancelledError):  # client gone or its deadline passed
                        log.info("operation cancelled: the caller went away or its deadline passed")
                    else:
                        log.warning("operation failed: %s", str(exc) or type(exc).__name__)
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
                f"cannot {action} vm {row.vm_id}: it is {state_name(row.state)}"
                f" (allowed from {allowed_names})"
            )

    def _network_steps(self, alloc: NetworkAllocation | None) -> list[Step]:
        if self.network is None or alloc is None:
            return []
        # A jailed Firecracker opens its TAP after dropping root: the backend names the owner.
        owner: tuple[int, int] | None = getattr(self.backend, "tap_owner", None)
        if owner is not None:
            return list(self.network.setup_steps(alloc, *owner))
        return list(self.network.setup_steps(alloc))

    def _reapply_steps(self, alloc: NetworkAllocation | None) -> list[Step]:
        """The network steps for re-applying an existing VM network: missing parts
        are made again, present ones left alone. nft element steps cannot tell
        whether the elements were there before, so their undo is skipped (it
        would remove elements the VM had before the operation)."""
        return [s if s.name not in _ELEMENT_STEPS else _NoUndo(s) for s in self._network_steps(alloc)]

    def _backend_hook(self, name: str) -> Any:
        """An optional backend method (the QEMU backend has the recovery helpers)."""
        return getattr(self.backend, name, None)

    def _has_jail(self, vm_id: str) -> bool:
        hook = self._backend_hook("jail_exists")
        return bool(hook(vm_id)) if hook is not None else False

    async def _discard_vmm(self, vm_id: str, kill_strays: bool = True) -> None:
        """Kill any VMM of the VM and remove its runtime files (logs and jail stay)."""
        hook = self._backend_hook("discard")
        if hook is not None:
            await hook(vm_id, kill_strays=kill_strays)
        elif self.backend.is_running(vm_id):
            await self.backend.shutdown(vm_id, True, 0)

    async def _unboot(self, vm_id: str, run_dir: Path, before: set[str] | None, had_jail: bool) -> None:
        """Undo a (partial) boot: no VMM, no new files, no jail it made."""
        await self._discard_vmm(vm_id)
        if self.store.get_vm(vm_id) is not None:
            self.store.update_vm(vm_id, handle={})
        if before is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            for name in plain_files(run_dir) - before:
                with contextlib.suppress(OSError):
                    (run_dir / name).unlink()
        if not had_jail:
            hook = self._backend_hook("remove_jail")
            if hook is not None:
                await hook(vm_id)

    # --- create --------------------------------------------------------------
    async def create(
        self, vm_id: str, customer_id: str, draft: VmDraft, config: bytes
    ) -> VmRow:
        if self.store.get_vm(vm_id) is not None:
            raise AlreadyExists(f"vm {vm_id} already exists")

        async def body() -> VmRow:
            if self.store.get_vm(vm_id) is not None:
                raise AlreadyExists(f"vm {vm_id} already exists")
            nonlocal draft
            image_steps: list[Step] = []
            if draft.image:  # a root disk from a container image: one step, undone with the VM
                if self.images is None:
                    raise FailedPrecondition("container images are not enabled on this host")
                images, image_dir = self.images, self.settings.run_dir / vm_id
                draft = await images.prepare(vm_id, draft, self.backend.name, image_dir)
                made = draft
                image_steps.append(
                    FuncStep(
                        "image", lambda: images.attach(vm_id, made, image_dir), lambda: images.detach(vm_id, image_dir)
                    )
                )
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
            steps += image_steps
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

        return await self._operation("create", vm_id, body, customer_id)

    def _check_capacity(self, row: VmRow) -> None:
        """Memory is held by running VMs only: created and shut-down VMs cost none,
        so the budget (UNKEY_METALD_HOST_MAX_MEMORY_FRACTION of the host) is
        checked when a VM boots."""
        host_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = host_mem * self.settings.host_max_memory_fraction
        used = self.store.active_memory_bytes()
        if used + row.memory_bytes > budget:
            raise ResourceExhausted(
                f"host memory budget exhausted: {used >> 20} MiB of {int(budget) >> 20} MiB held by running VMs,"
                f" vm {row.vm_id} needs {row.memory_bytes >> 20} MiB"
            )

    # --- boot ----------------------------------------------------------------
    async def boot(self, vm_id: str) -> VmState:
        async def body() -> VmState:
            row = self._row(vm_id)
            self._require(row, (VmState.CREATED, VmState.SHUTDOWN), "boot")
            self._check_capacity(row)
            spec = self._spec(row)
            await self.backend.validate(spec)
            alloc = self._alloc(row)

            async def ensure_network() -> None:
                steps = self._reapply_steps(alloc)
                if steps:
                    await Plan("network", steps).run()

            undo: dict[str, Any] = {}

            async def start_vmm() -> None:
                undo["before"] = plain_files(spec.run_dir) if spec.run_dir.is_dir() else None
                undo["had_jail"] = self._has_jail(vm_id)
                try:
                    spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
                    handle = await self.backend.boot(spec)
                    self.store.update_vm(vm_id, handle=handle)
                except BaseException:
                    await stop_vmm()
                    raise

            async def stop_vmm() -> None:
                await self._unboot(vm_id, spec.run_dir, undo["before"], undo["had_jail"])

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
            result: dict[str, str] = {}

            async def stop() -> None:
                # The one step, and it cannot be undone: the guest is gone after it.
                try:
                    result["how"] = await self._backend_call(self.backend.shutdown(vm_id, force, timeout_s))
                except MetaldError as exc:
                    if not self.backend.is_running(vm_id):
                        self._record_stopped(row, f"shutdown failed: {exc}")
                    raise
                self._record_stopped(row, result["how"])

            self.store.begin_intent(vm_id, "shutdown", {"from": row.state})
            try:
                await self._plan("shutdown", [FuncStep("vmm", stop)]).run()
            except StepFailed as exc:
                raise _unwrap(exc) from exc
            finally:
                self.store.end_intent(vm_id)
            self.store.add_event(vm_id, "shutdown", "ok", result["how"])
            return VmState.SHUTDOWN

        return await self._operation("shutdown", vm_id, body)

    def _record_stopped(self, row: VmRow, how: str) -> None:
        status = dict(self._row(row.vm_id).status)
        status["last_exit"] = how
        status["exited_at"] = time.time()
        self._set_state(row.vm_id, VmState.SHUTDOWN, status=status, handle={})

    async def reboot(self, vm_id: str, force: bool) -> VmState:
        async def body() -> VmState:
            row = self._row(vm_id)
            self._require(row, (VmState.RUNNING,), "reboot")
            spec = self._spec(row)
            alloc = self._alloc(row)

            async def ensure_network() -> None:
                # a graceful reboot starts a new VMM: its TAP must be there
                steps = self._reapply_steps(alloc)
                if steps:
                    await Plan("network", steps).run()

            async def restart() -> None:
                # The last step; a reset or a restarted guest cannot be undone.
                try:
                    handle = await self._backend_call(self.backend.reboot(spec, force))
                except MetaldError as exc:
                    if not self.backend.is_running(vm_id):
                        await self._discard_vmm(vm_id)
                        self._record_stopped(row, f"reboot failed: {exc}")
                    raise
                status = dict(row.status)
                status["booted_at"] = time.time()
                status["reboots"] = int(status.get("reboots", 0)) + 1
                self.store.update_vm(vm_id, handle=handle or row.handle, status=status)

            self.store.begin_intent(vm_id, "reboot", {"force": force})
            try:
                await self._plan(
                    "reboot", [FuncStep("network", ensure_network), FuncStep("vmm", restart)]
                ).run()
            except StepFailed as exc:
                raise _unwrap(exc) from exc
            finally:
                self.store.end_intent(vm_id)
            self.store.add_event(vm_id, "reboot", "ok", "forced" if force else "graceful")
            return VmState.RUNNING

        return await self._operation("reboot", vm_id, body)

    # --- delete --------------------------------------------------------------
    async def delete(self, vm_id: str, force: bool) -> None:
        async def body() -> None:
            row = self._row(vm_id)
            if row.state in ACTIVE and not force:
                raise FailedPrecondition(
                    f"cannot delete vm {vm_id}: it is {state_name(row.state)};"
                    " shut it down first or pass force=true"
                )
            self.store.begin_intent(vm_id, "delete", {"from": row.state})
            try:
                await self._plan("delete", self._delete_steps(row)).run()
            except StepFailed as exc:
                if self.store.get_vm(vm_id) is not None:
                    self.store.end_intent(vm_id)
                raise _unwrap(exc) from exc
            self._locks.pop(vm_id, None)

        await self._operation("delete", vm_id, body)
        self.store.add_event(vm_id, "delete", "ok")

    def _delete_steps(self, row: VmRow) -> list[Step]:
        """vmm, network, jail, release, files, record: each undone if a later one fails
        (but a stopped VMM stays stopped); ``record`` forgets the VM and commits."""
        vm_id = row.vm_id
        alloc = self._alloc(row)
        spec = self._spec(row)
        run_dir = self.settings.run_dir / vm_id
        trash = trash_of(self.settings.run_dir, vm_id)
        had: dict[str, bool] = {}

        async def stop_vmm() -> None:
            if self.backend.is_running(vm_id):
                how = await self._backend_call(self.backend.shutdown(vm_id, True, 0))
                self._record_stopped(row, f"stopped by DeleteVm ({how})")
            await self._discard_vmm(vm_id)

        async def network_down() -> None:
            if self.network is not None and alloc is not None:
                await self.network.teardown(alloc)

        async def network_up() -> None:
            steps = self._network_steps(alloc)
            if steps:
                await Plan("network", steps).run()

        async def jail_down() -> None:
            had["jail"] = self._has_jail(vm_id)
            hook = self._backend_hook("remove_jail")
            if hook is not None:
                await hook(vm_id)

        async def jail_up() -> None:
            hook = self._backend_hook("restore_jail")
            if had.get("jail") and hook is not None:
                await hook(spec)

        held: dict[str, Any] = {}

        async def release() -> None:
            held.update(short=self.store.short_id_of(vm_id), ip=self.store.ip_of(vm_id))
            held["ports"] = self.store.ports_of(vm_id)
            if self.network is not None:
                await self.network.release(vm_id)

        async def reclaim() -> None:
            # exactly the claims the VM held (its allocation is still in its row)
            if held.get("short"):
                self.store.claim_short_id(vm_id, held["short"])
            if held.get("ip"):
                self.store.claim_ip(vm_id, held["ip"])
            for host_port, protocol, guest_port in held.get("ports", ()):
                self.store.claim_port(vm_id, host_port, protocol, guest_port)

        async def files_away() -> None:
            shutil.rmtree(trash, ignore_errors=True)
            if run_dir.exists():
                run_dir.rename(trash)

        async def files_back() -> None:
            if trash.exists() and not run_dir.exists():
                trash.rename(run_dir)

        async def forget() -> None:
            self.store.delete_vm(vm_id)  # also frees its addresses and its intent
            shutil.rmtree(trash, ignore_errors=True)
            try:
                await self.backend.cleanup(vm_id)  # drop the backend's memory of it
            except Exception:
                log.exception("backend cleanup after delete failed")

        return [
            FuncStep("vmm", stop_vmm),
            FuncStep("network", network_down, network_up),
            FuncStep("jail", jail_down, jail_up),
            FuncStep("release", release, reclaim),
            FuncStep("files", files_away, files_back),
            FuncStep("record", forget),
        ]

    async def _teardown(self, row: VmRow) -> None:
        """Remove everything of one VM; each part is idempotent, so this can run
        again after a crash (plan ``reconcile.teardown``)."""
        vm_id = row.vm_id
        steps: list[Step] = [FuncStep("vmm", lambda: self.backend.cleanup(vm_id))]
        alloc = self._alloc(row)
        if self.network is not None:
            if alloc is not None:
                net = self.network
                steps.append(FuncStep("network", lambda: net.teardown(alloc)))
            steps.append(FuncStep("release", lambda: self.network.release(vm_id)))  # type: ignore[union-attr]
        run_dir = self.settings.run_dir / vm_id
        trash = trash_of(self.settings.run_dir, vm_id)

        async def remove_files() -> None:
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)

        async def forget() -> None:
            self.store.delete_vm(vm_id)

        steps += [FuncStep("files", remove_files), FuncStep("record", forget)]
        try:
            await self._plan("reconcile.teardown", steps).run()
        except StepFailed as exc:
            raise _unwrap(exc) from exc

    # --- reads ---------------------------------------------------------------
    async def get(self, vm_id: str) -> VmView:
        if vm_id in self._unsettled:  # attach the adopted VMM, but never wait on it long (core.bounds)
            await self._settle_briefly(vm_id)
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
            metrics.notes["metrics"] = f"not measured: vm is {state_name(row.state)}"
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
                if self.images is not None and row.spec.get("image"):
                    reason = self.images.exit_reason(self.settings.run_dir / vm_id / "console.log") or reason
                status = dict(row.status)
                status["last_exit"] = reason
                status["exited_at"] = time.time()
                self._set_state(vm_id, VmState.SHUTDOWN, status=status, handle={})
                self.store.add_event(vm_id, "vmm-exit", "shutdown", reason)
                log.warning("VMM exited: %s", reason)
                for observer in self.operation_observers:
                    observer("vmm-exit", reason, 0.0, None)

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


class _NoUndo:
    """An nft element step re-applied: its undo is skipped (see ``VmEngine._reapply_steps``).

    The network's element step first tries ``create`` (to learn whether it
    added the elements) and falls back to ``add``; on a re-apply the elements
    are nearly always there, and batched ``create`` failures are bisected
    transaction by transaction, which made a 1000-VM start-up take seconds.
    So when the step exposes its elements and batcher, this goes straight to
    the idempotent ``add`` (one coalesced transaction for many VMs).
    """

    def __init__(self, step: Step) -> None:
        self.name = step.name
        self._step = step

    async def is_done(self) -> bool:
        return await self._step.is_done()

    async def do(self) -> None:
        elements = getattr(self._step, "_elements", None)
        batcher = getattr(self._step, "_batcher", None)
        if elements and batcher is not None:
            from metald.network import rules  # the network adapter's script syntax

            await batcher.apply(rules.add_script(elements))
            return
        await self._step.do()

    async def undo(self) -> None:
        return None
