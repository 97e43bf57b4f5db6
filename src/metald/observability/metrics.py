"""Prometheus metrics on ``/metrics`` (when ``UNKEY_METALD_OTEL_ENABLED=true``).

Everything lives in a private :class:`CollectorRegistry`. Counters and
histograms are fed by the engine's operation and plan-step observers; VM counts
and the IP pool are read from the store at scrape time (one cheap query each);
per-VM resource usage is sampled from the backend by a background task, so a
scrape never waits on a VMM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from metald.config import Settings
from metald.core.models import VmMetrics, VmState
from metald.store.storage import KINDS as STORAGE_KINDS
from metald.store.storage import kind_of as storage_kind

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from metald.core.engine import VmEngine
    from metald.core.lifecycle import ReconcileReport
    from metald.store.sqlite import Store

log = logging.getLogger(__name__)

OPERATIONS = ("create", "boot", "pause", "resume", "shutdown", "reboot", "delete")
OUTCOMES = ("ok", "failed", "rejected")  # rejected: refused before it reached the engine
EXIT_REASONS = ("guest_poweroff", "signal", "exit_code", "other")
STATES = (VmState.CREATED, VmState.RUNNING, VmState.PAUSED, VmState.SHUTDOWN)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# (metric name, help, VmMetrics attribute)
PER_VM = (
    ("vm_cpu_seconds_total", "CPU time used by the VM's VMM process, in seconds", "cpu_seconds"),
    ("vm_memory_bytes", "Resident memory of the VM's VMM process, in bytes", "memory_usage_bytes"),
    ("vm_network_receive_bytes_total", "Bytes the guest received on its NIC", "net_rx_bytes"),
    ("vm_network_transmit_bytes_total", "Bytes the guest sent on its NIC", "net_tx_bytes"),
    ("vm_block_read_bytes_total", "Bytes the guest read from its drives", "block_read_bytes"),
    ("vm_block_write_bytes_total", "Bytes the guest wrote to its drives", "block_write_bytes"),
)


def exit_reason_class(reason: str) -> str:
    """Fold a backend's free-text VMM exit reason into one of :data:`EXIT_REASONS`."""
    text = reason.lower()
    if "poweroff" in text:
        return "guest_poweroff"
    if "signal" in text:
        return "signal"
    if "exit code" in text:
        return "exit_code"
    return "other"


def ip_pool_size(settings: Settings) -> int:
    """Addresses VMs can get: the subnet minus network, broadcast and bridge addresses."""
    subnet = ipaddress.ip_network(settings.network_vm_subnet_ipv4)
    size = subnet.num_addresses - 2
    bridge = ipaddress.ip_interface(settings.network_bridge_ipv4).ip
    if bridge in subnet and bridge not in (subnet.network_address, subnet.broadcast_address):
        size -= 1
    return max(size, 0)


class _StoreCollector(Collector):
    """``vm_instances`` and the IP pool gauges, read from the store per scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: VmEngine | None = None
        self.pool_size = ip_pool_size(settings)

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily("vm_instances", "VMs known to metald by state", labels=["state", "backend"]),
            GaugeMetricFamily("metald_ip_pool_size", "Addresses in the VM IP pool"),
            GaugeMetricFamily("metald_ip_pool_free", "Addresses in the VM IP pool not allocated"),
        ]

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        if engine is None:
            return
        store = cast("Store", engine.store)  # the daemon's repository is the SQLite store
        counts = store.count_by_state()
        family = GaugeMetricFamily("vm_instances", "VMs known to metald by state", labels=["state", "backend"])
        for state in STATES:
            family.add_metric([state.name.lower(), engine.backend.name], counts.get(int(state), 0))
        yield family
        if engine.network is None:
            return
        yield GaugeMetricFamily("metald_ip_pool_size", "Addresses in the VM IP pool", value=self.pool_size)
        free = max(self.pool_size - store.ip_count(), 0)
        yield GaugeMetricFamily("metald_ip_pool_free", "Addresses in the VM IP pool not allocated", value=free)


class _VmCollector(Collector):
    """Per-VM usage from the last background sample (summed unless per-VM labels are on)."""

    def __init__(self, per_vm: bool) -> None:
        self.per_vm = per_vm
        self.samples: dict[str, VmMetrics] = {}  # replaced whole by the sampler

    def describe(self) -> Iterable[Metric]:
        labels = ["vm_id"] if self.per_vm else []
        return [GaugeMetricFamily(name, text, labels=labels) for name, text, _ in PER_VM]

    def collect(self) -> Iterator[Metric]:
        samples = self.samples
        for name, text, attr in PER_VM:
            if self.per_vm:
                family = GaugeMetricFamily(name, text, labels=["vm_id"])
                for vm_id, metrics in sorted(samples.items()):
                    family.add_metric([vm_id], float(getattr(metrics, attr)))
            else:
                total = sum(float(getattr(m, attr)) for m in samples.values())
                family = GaugeMetricFamily(name, text, value=total)
            yield family


class Metrics:
    """metald's Prometheus metrics: ``attach(engine)``, then ``await start()`` ... ``await stop()``."""

    def __init__(self, settings: Settings, refresh_seconds: float = 5.0) -> None:
        disable_created_metrics()  # no *_created series next to every counter
        self.settings = settings
        self.refresh_seconds = refresh_seconds
        self.registry = CollectorRegistry()
        r = self.registry
        self.operations = Counter(
            "metald_operations", "VM operations by outcome", ["operation", "outcome"], registry=r
        )
        self.failures = Counter(
            "metald_operation_failures", "Failed VM operations by error class", ["operation", "reason"], registry=r
        )
        self.operation_duration = Histogram(
            "metald_operation_duration_seconds",
            "Duration of VM operations",
            ["operation"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "metald_plan_step_duration_seconds",
            "Duration of plan steps by outcome (done, skipped, failed)",
            ["step", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.vmm_exits = Counter(
            "metald_vmm_exits", "VMMs that exited on their own, by reason", ["reason"], registry=r
        )
        self.leftovers = Counter(
            "metald_leftovers_removed", "Leftover devices and rules removed at start-up", registry=r
        )
        self.storage_errors = Counter(
            "metald_storage_errors",
            "State writes that failed because the data directory is full, read-only or failing",
            ["kind"],
            registry=r,
        )
        self.orphans = Gauge(
            "metald_orphan_vms", "VMs found at start with no record in the store (nothing swept)", registry=r
        )
        self.reconcile_seconds = Gauge(
            "metald_reconcile_duration_seconds", "Duration of the last start-up reconcile", registry=r
        )
        for operation in OPERATIONS:
            self.operation_duration.labels(operation)
            for outcome in OUTCOMES:
                self.operations.labels(operation, outcome)
        for reason in EXIT_REASONS:
            self.vmm_exits.labels(reason)
        for kind in STORAGE_KINDS:
            self.storage_errors.labels(kind)
        self._store_collector = _StoreCollector(settings)
        self._vm_collector = _VmCollector(settings.metrics_per_vm_labels)
        r.register(self._store_collector)
        r.register(self._vm_collector)
        self._engine: VmEngine | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    # --- feeding -------------------------------------------------------------
    def attach(self, engine: VmEngine) -> None:
        """Register the engine observers and read VM counts from its store."""
        self._engine = engine
        self._store_collector.engine = engine
        engine.operation_observers.append(self.on_operation)
        engine.step_observers.append(self.on_step)

    def on_operation(self, operation: str, outcome: str, seconds: float, exc: BaseException | None) -> None:
        if operation == "vmm-exit":
            self.vmm_exits.labels(exit_reason_class(outcome)).inc()
            return
        self.operations.labels(operation, outcome).inc()
        if outcome != "rejected":  # durations are of operations the engine ran
            self.operation_duration.labels(operation).observe(seconds)
        if exc is not None:
            self.failures.labels(operation, type(exc).__name__).inc()
            kind = storage_kind(exc)
            if kind is not None:
                self.storage_errors.labels(kind).inc()

    def on_step(self, step: str, outcome: str, seconds: float, exc: BaseException | None) -> None:
        self.step_duration.labels(step, outcome).observe(seconds)

    def record_reconcile(self, report: ReconcileReport) -> None:
        self.reconcile_seconds.set(report.seconds)
        self.orphans.set(len(report.orphans))
        if report.leftovers_removed:
            self.leftovers.inc(len(report.leftovers_removed))

    # --- per-VM sampling -----------------------------------------------------
    async def refresh(self) -> None:
        """Sample every RUNNING VM's usage from the backend (best effort per VM)."""
        engine = self._engine
        if engine is None:
            return
        rows, _ = engine.store.list_vms([int(VmState.RUNNING)], 0, 1 << 30)
        samples: dict[str, VmMetrics] = {}
        for row in rows:
            if not engine.backend.is_running(row.vm_id):
                continue
            try:
                metrics = await asyncio.wait_for(engine.backend.metrics(row.vm_id), timeout=5)
                if engine.network is not None and row.network and not (metrics.net_rx_bytes or metrics.net_tx_bytes):
                    alloc = engine.network.allocation_from_dict(row.network)
                    metrics.net_rx_bytes, metrics.net_tx_bytes, _, _ = await engine.network.tap_counters(alloc)
            except Exception as exc:  # one VM's failure must not hide the others
                log.debug("metrics of %s not read: %s", row.vm_id, exc)
                continue
            samples[row.vm_id] = metrics
        self._vm_collector.samples = samples

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("sampling VM metrics failed")
            await asyncio.sleep(self.refresh_seconds)

    # --- serving -------------------------------------------------------------
    async def start(self) -> None:
        """Serve ``/metrics`` and start sampling per-VM usage."""
        from prometheus_client import start_http_server

        address, port = self.settings.otel_prometheus_address, self.settings.otel_prometheus_port
        try:
            self._server, self._thread = start_http_server(port, address, registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"cannot serve /metrics on {address}:{port} (UNKEY_METALD_OTEL_PROMETHEUS_ADDRESS/_PORT): {exc}"
            ) from exc
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())
        log.info("serving metrics", extra={"address": address, "metrics_port": port})

    @property
    def port(self) -> int | None:
        """The port /metrics is served on, while it is."""
        return self._server.server_port if self._server is not None else None

    async def stop(self) -> None:
        """Stop sampling and the HTTP listener."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        if thread is not None:
            await asyncio.to_thread(thread.join, 5)
