"""The lifecycle engine: the core's one entry point for the API and the daemon.

State machine::

    CREATED --boot--> RUNNING <--pause/resume--> PAUSED
    RUNNING|PAUSED --shutdown--> SHUTDOWN --boot--> RUNNING
    RUNNING --reboot--> RUNNING
    any --delete--> (gone)   (RUNNING/PAUSED need force=true)

Each operation is a class in ``core/operations`` (its allowed states, its plan
of undoable steps, its recovery); the runner (``core/runner.py``) runs it under
the VM's lock with its intent, event and observers; reconciliation
(``core/reconcile.py``) sends an interrupted operation's intent to its
``recover`` at the next start. A VMM that exits on its own is noticed at once
(pidfd) and its VM recorded SHUTDOWN with the reason; its IP, namespace and
jail stay for a later boot and are freed by delete. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from metald.config import Settings
from metald.core.context import Context
from metald.core.errors import AlreadyExists
from metald.core.imageport import ImagePort
from metald.core.lifecycle import ACTIVE, ReconcileReport, state_name
from metald.core.models import NetworkAllocation, VmDraft, VmMetrics, VmState
from metald.core.operations import (
    CloneRequest,
    CreateRequest,
    DeleteRequest,
    Operations,
    RebootRequest,
    ShutdownRequest,
    SnapshotRequest,
)
from metald.core.plan import StepObserver
from metald.core.ports import Backend, Network, OrphanScan, Repository, SnapshotStore
from metald.core.reconcile import Reconciler
from metald.core.records import SnapshotRecord, VmRecord
from metald.core.runner import OperationObserver, Runner

__all__ = ["ListPage", "OperationObserver", "ReconcileReport", "VmEngine", "VmView"]


@dataclass
class VmView:
    row: VmRecord
    network: NetworkAllocation | None
    metrics: VmMetrics
    backend_info: dict[str, str]


@dataclass
class ListPage:
    rows: list[VmRecord]
    total: int
    last_seq: int | None  # set when more rows may follow


class VmEngine:
    def __init__(
        self,
        settings: Settings,
        store: Repository,
        backend: Backend,
        network: Network | None,
        step_observers: list[StepObserver] | None = None,
        operation_observers: list[OperationObserver] | None = None,
        images: ImagePort | None = None,
        orphan_scan: OrphanScan | None = None,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self.settings = settings
        self.images = images  # container images as root disks (metald.images)
        self.store = store
        self.backend = backend
        self.network = network
        self.step_observers: list[StepObserver] = step_observers if step_observers is not None else []
        self.operation_observers: list[OperationObserver] = (
            operation_observers if operation_observers is not None else []
        )
        self.ctx = Context(
            settings, store, backend, network, self.step_observers, images=images, snapshots=snapshots
        )
        self.runner = Runner(self.ctx, self.operation_observers)
        self.operations = Operations(self.ctx)
        self.reconciler = Reconciler(self.ctx, self.runner, self.operations, orphan_scan)
        backend.set_exit_callback(self.runner.on_vmm_exit)

    # --- operations ------------------------------------------------------------
    async def create(self, vm_id: str, customer_id: str, draft: VmDraft, config: bytes) -> VmRecord:
        if self.store.get_vm(vm_id) is not None:
            raise AlreadyExists(f"vm {vm_id} already exists")
        return await self.runner.run(self.operations.create, vm_id, CreateRequest(customer_id, draft, config))

    async def boot(self, vm_id: str) -> VmState:
        return await self.runner.run(self.operations.boot, vm_id, None)

    async def pause(self, vm_id: str) -> VmState:
        return await self.runner.run(self.operations.pause, vm_id, None)

    async def resume(self, vm_id: str) -> VmState:
        return await self.runner.run(self.operations.resume, vm_id, None)

    async def shutdown(self, vm_id: str, force: bool, timeout_s: int) -> VmState:
        return await self.runner.run(self.operations.shutdown, vm_id, ShutdownRequest(force, timeout_s))

    async def reboot(self, vm_id: str, force: bool) -> VmState:
        return await self.runner.run(self.operations.reboot, vm_id, RebootRequest(force))

    async def delete(self, vm_id: str, force: bool) -> None:
        await self.runner.run(self.operations.delete, vm_id, DeleteRequest(force))

    async def snapshot(self, vm_id: str, snapshot_id: str, name: str, stop: bool) -> SnapshotRecord:
        return await self.runner.run(self.operations.snapshot, vm_id, SnapshotRequest(snapshot_id, name, stop))

    async def clone(self, vm_id: str, request: CloneRequest) -> VmRecord:
        if self.store.get_vm(vm_id) is not None:
            raise AlreadyExists(f"vm {vm_id} already exists")
        return await self.runner.run(self.operations.clone, vm_id, request)

    # --- start-up --------------------------------------------------------------
    async def start(self) -> ReconcileReport:
        if self.network is not None:
            await self.network.setup_host()
        return await self.reconcile()

    async def reconcile(self) -> ReconcileReport:
        return await self.reconciler.reconcile()

    async def wait_settled(self) -> None:
        await self.reconciler.wait_settled()

    # --- reads -----------------------------------------------------------------
    async def get(self, vm_id: str) -> VmView:
        if vm_id in self.reconciler.unsettled:  # attach the adopted VMM, but never wait on it long (core.bounds)
            await self.reconciler.settle_briefly(vm_id)
        row = self.ctx.row(vm_id)
        alloc = self.ctx.alloc(row)
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

    async def close(self) -> None:
        await self.runner.close()
        await self.backend.close()
