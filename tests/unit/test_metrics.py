"""/metrics over real HTTP: a VM lifecycle through the real server (fake VMM), then exact values."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metald.config import Settings
from metald.core.engine import VmEngine
from metald.core.lifecycle import ReconcileReport
from metald.core.models import VmMetrics
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.observability.metrics import Metrics, exit_reason_class, ip_pool_size
from tests.support.clients import ConnectJsonClient, RpcFailed, small_config
from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import free_port, make_settings, serve_in_thread

USAGE = {  # what the fake VMM reports per VM
    "vm-a": VmMetrics(
        measured=True, cpu_seconds=1.25, memory_usage_bytes=1000, net_rx_bytes=30, net_tx_bytes=40,
        block_read_bytes=100, block_write_bytes=200,
    ),
    # no NIC counters from the VMM: the TAP counters (FakeNetwork: rx 10, tx 20) are used
    "vm-f": VmMetrics(
        measured=True, cpu_seconds=2.5, memory_usage_bytes=3000, block_read_bytes=300, block_write_bytes=400,
    ),
}


class UsageBackend(FakeBackend):
    async def metrics(self, vm_id: str) -> VmMetrics:
        usage = USAGE.get(vm_id, VmMetrics(measured=True, cpu_seconds=99.0, memory_usage_bytes=99))
        return VmMetrics(**{**usage.__dict__, "notes": {}})


class StoreNetwork(FakeNetwork):
    """FakeNetwork that records its addresses in the store, as the real IPAM does."""

    store: Any = None

    async def allocate(self, vm_id: str, nic: Any) -> Any:
        alloc = await super().allocate(vm_id, nic)
        if self.store.ip_of(vm_id) is None:
            self.store.claim_ip(vm_id, alloc.ip)
        return alloc

    async def release(self, vm_id: str) -> None:
        await super().release(vm_id)
        self.store.release_ip(vm_id)

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        return ["vh_0ld0ld00"]


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return values


def value(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


def metric_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(
        tmp_path,
        network_enabled=True,
        network_vm_subnet_ipv4="10.100.0.0/24",
        network_bridge_ipv4="10.100.0.1/24",
        otel_enabled=True,
        otel_prometheus_port=free_port(),
        **overrides,
    )


def create(client: ConnectJsonClient, vm_id: str) -> None:
    client.call("CreateVm", pb.CreateVmRequest(vm_id=vm_id, config=small_config()))


def drive_lifecycle(client: ConnectJsonClient, srv: Any) -> None:
    """Leaves a, f RUNNING; b, g SHUTDOWN; c CREATED; e PAUSED; d deleted."""
    for vm_id in ("vm-a", "vm-b", "vm-c", "vm-d", "vm-e", "vm-f", "vm-g"):
        create(client, vm_id)
    for vm_id in ("vm-a", "vm-b", "vm-e", "vm-f", "vm-g"):
        client.call("BootVm", pb.BootVmRequest(vm_id=vm_id))
    client.call("PauseVm", pb.PauseVmRequest(vm_id="vm-b"))
    client.call("ResumeVm", pb.ResumeVmRequest(vm_id="vm-b"))
    client.call("ShutdownVm", pb.ShutdownVmRequest(vm_id="vm-b"))
    client.call("PauseVm", pb.PauseVmRequest(vm_id="vm-e"))
    with pytest.raises(RpcFailed) as failed:
        client.call("PauseVm", pb.PauseVmRequest(vm_id="vm-c"))
    assert failed.value.code == "failed_precondition"
    client.call("DeleteVm", pb.DeleteVmRequest(vm_id="vm-d"))
    with pytest.raises(RpcFailed) as running:  # RUNNING needs force=true
        client.call("DeleteVm", pb.DeleteVmRequest(vm_id="vm-a"))
    assert running.value.code == "failed_precondition"
    # refused before the engine: an unknown VM, a malformed id, a bad config
    for call, request in (("BootVm", pb.BootVmRequest(vm_id="vm-nope")), ("BootVm", pb.BootVmRequest(vm_id="-x")),
                          ("CreateVm", pb.CreateVmRequest(vm_id="vm-h", config=pb.VmConfig()))):
        with pytest.raises(RpcFailed):
            client.call(call, request)
    srv.loop.call_soon_threadsafe(srv.backend.crash, "vm-g")  # SIGKILLed VMM


@pytest.fixture(params=[False, True], ids=["summed", "per-vm"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Metrics, ReconcileReport]]:
    settings = metric_settings(tmp_path, metrics_per_vm_labels=request.param)
    metrics = Metrics(settings, refresh_seconds=3600)
    network = StoreNetwork()
    reports: list[ReconcileReport] = []

    async def on_start(engine: VmEngine, report: ReconcileReport) -> None:
        network.store = engine.store
        metrics.attach(engine)
        metrics.record_reconcile(report)
        reports.append(report)
        await metrics.start()

    with serve_in_thread(settings, UsageBackend(), network, on_start=on_start, on_stop=metrics.stop) as srv:
        yield srv, metrics, reports[0]


def test_lifecycle_metrics(served: tuple[Any, Metrics, ReconcileReport]) -> None:
    srv, metrics, report = served
    port = metrics.settings.otel_prometheus_port
    client = ConnectJsonClient(srv.url)
    try:
        drive_lifecycle(client, srv)
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while value(scrape(port), "metald_vmm_exits_total", reason="signal") < 1:
        assert time.monotonic() < deadline, "the VMM exit was not counted"
        time.sleep(0.05)
    srv.call(metrics.refresh())
    v = scrape(port)

    # VMs by state, always all four
    states = {"created": 1, "running": 2, "paused": 1, "shutdown": 2}
    for state, count in states.items():
        assert value(v, "vm_instances", state=state, backend="fake") == count
    assert sum(1 for name, _ in v if name == "vm_instances") == 4

    # operations by outcome; failures by error class
    ops = {
        ("create", "ok"): 7, ("boot", "ok"): 5, ("pause", "ok"): 2, ("pause", "failed"): 1,
        ("resume", "ok"): 1, ("shutdown", "ok"): 1, ("delete", "ok"): 1, ("delete", "failed"): 1,
        ("reboot", "ok"): 0, ("boot", "failed"): 0, ("boot", "rejected"): 2, ("create", "rejected"): 1,
        ("create", "failed"): 0,
    }
    for (operation, outcome), count in ops.items():
        assert value(v, "metald_operations_total", operation=operation, outcome=outcome) == count, operation
    failures = {labels: n for (name, labels), n in v.items() if name == "metald_operation_failures_total"}
    assert failures == {
        frozenset({("operation", "pause"), ("reason", "FailedPrecondition")}): 1,
        frozenset({("operation", "delete"), ("reason", "FailedPrecondition")}): 1,
        frozenset({("operation", "boot"), ("reason", "NotFound")}): 1,
        frozenset({("operation", "boot"), ("reason", "InvalidArgument")}): 1,
        frozenset({("operation", "create"), ("reason", "InvalidArgument")}): 1,
    }
    assert value(v, "metald_operation_duration_seconds_count", operation="boot") == 5
    assert value(v, "metald_operation_duration_seconds_count", operation="pause") == 3
    assert value(v, "metald_operation_duration_seconds_bucket", operation="boot", le="+Inf") == 5
    assert value(v, "metald_operation_duration_seconds_sum", operation="boot") > 0
    steps = {
        "create.record": 7, "create.allocate": 7, "create.validate": 7, "create.rundir": 7, "create.network": 7,
        "boot.network": 5, "boot.vmm": 5, "boot.record": 5,
        "delete.vmm": 1, "delete.network": 1, "delete.release": 1, "delete.files": 1, "delete.record": 1,
    }
    for step, count in steps.items():
        assert value(v, "metald_plan_step_duration_seconds_count", step=step, outcome="done") == count, step

    # VMM exits, normalised
    exits = {"signal": 1, "guest_poweroff": 0, "exit_code": 0, "other": 0}
    for reason, count in exits.items():
        assert value(v, "metald_vmm_exits_total", reason=reason) == count

    # IP pool: a /24 less network, broadcast and bridge; 6 VMs hold an address (vm-d released its own)
    assert value(v, "metald_ip_pool_size") == 253
    assert value(v, "metald_ip_pool_free") == 247

    # start-up reconcile
    assert value(v, "metald_leftovers_removed_total") == 1
    assert value(v, "metald_reconcile_duration_seconds") == pytest.approx(report.seconds)
    assert report.seconds > 0

    # per-VM usage of the RUNNING VMs only (vm-a, vm-f)
    per_vm = {name: {k: val for k, val in labels} for name, labels in v if name.startswith("vm_") and labels}
    expected = {
        "vm_cpu_seconds_total": (1.25, 2.5),
        "vm_memory_bytes": (1000, 3000),
        "vm_network_receive_bytes_total": (30, 10),
        "vm_network_transmit_bytes_total": (40, 20),
        "vm_block_read_bytes_total": (100, 300),
        "vm_block_write_bytes_total": (200, 400),
    }
    if metrics.settings.metrics_per_vm_labels:
        for name, (a, f) in expected.items():
            assert value(v, name, vm_id="vm-a") == a, name
            assert value(v, name, vm_id="vm-f") == f, name
            assert {labels for n, labels in v if n == name} == {
                frozenset({("vm_id", "vm-a")}), frozenset({("vm_id", "vm-f")})
            }
    else:
        assert not [name for name in per_vm if name != "vm_instances"], "no vm_id label without the switch"
        for name, (a, f) in expected.items():
            assert value(v, name) == a + f, name

    # everything the guide's `grep vm_` should find is there
    assert {name for name, _ in v if name.startswith("vm_")} == {"vm_instances", *expected}


def test_stop_closes_the_listener(tmp_path: Path) -> None:
    settings = metric_settings(tmp_path)
    metrics = Metrics(settings)

    async def scenario() -> None:
        from metald.store.sqlite import Store

        store = Store(settings.db_path)
        engine = VmEngine(settings, store, FakeBackend(), None)
        metrics.attach(engine)
        await metrics.start()
        try:
            text = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{metrics.port}/metrics")).text
            assert 'vm_instances{backend="fake",state="created"} 0.0' in text
            assert "metald_ip_pool_size" not in text  # networking off: no pool
            assert "vm_cpu_seconds_total 0.0" in text
        finally:
            await metrics.stop()
            store.close()
        with pytest.raises(httpx.TransportError):
            await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{settings.otel_prometheus_port}/metrics")
        assert metrics.port is None

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("guest poweroff", "guest_poweroff"),
        ("guest poweroff (exit code 1)", "guest_poweroff"),
        ("killed by signal SIGKILL", "signal"),
        ("terminated by a signal to QEMU", "signal"),
        ("exit code 1", "exit_code"),
        ("guest panic", "other"),
        ("exited (exit status unknown: not a child of this metald)", "other"),
    ],
)
def test_exit_reason_class(reason: str, expected: str) -> None:
    assert exit_reason_class(reason) == expected


def test_ip_pool_size(tmp_path: Path) -> None:
    assert ip_pool_size(make_settings(tmp_path)) == 65536 - 3
    small = make_settings(tmp_path, network_vm_subnet_ipv4="10.9.0.0/29", network_bridge_ipv4="10.9.0.1/29")
    assert ip_pool_size(small) == 8 - 3
