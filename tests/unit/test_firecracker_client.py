"""Firecracker request bodies match the API description; faults become BackendError."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from metald.backends.firecracker import bodies
from metald.backends.firecracker.client import FirecrackerApiError, FirecrackerClient
from metald.core.errors import BackendError
from metald.core.models import RateLimit
from tests.firecracker_double import harness

RX = RateLimit(bandwidth=1_000_000, refill_time_ms=100, burst=50_000)
TX = RateLimit(bandwidth=333, refill_time_ms=10, burst=0)

CASES = [
    ("Logger", bodies.logger("/run/x/firecracker.log")),
    ("Metrics", bodies.metrics("/run/x/firecracker.metrics")),
    ("MachineConfiguration", bodies.machine_config(2, 512)),
    ("BootSource", bodies.boot_source("/k", "/i", "console=ttyS0")),
    ("BootSource", bodies.boot_source("/k", None, "")),
    ("Drive", bodies.drive("rootfs", "/r.ext4", True, False)),
    ("NetworkInterface", bodies.network_interface("eth0", "tap_x", "AA:FC:00:00:00:01", RX, TX)),
    ("NetworkInterface", bodies.network_interface("eth0", "tap_x")),
    ("InstanceActionInfo", bodies.action("InstanceStart")),
    ("InstanceActionInfo", bodies.action("SendCtrlAltDel")),
    ("InstanceActionInfo", bodies.action("FlushMetrics")),
    ("Vm", bodies.vm_state("Paused")),
    ("Vm", bodies.vm_state("Resumed")),
]


@pytest.mark.parametrize(("definition", "body"), CASES)
def test_body_is_valid_against_the_spec(definition: str, body: dict) -> None:
    errors = list(harness.validator().definition_validator(definition).iter_errors(body))
    assert errors == [], [e.message for e in errors]


def test_rate_limiter_numbers() -> None:
    # bytes/s * refill ms / 1000 = bytes per refill; burst only when set
    assert bodies.token_bucket(RX) == {"size": 100_000, "refill_time": 100, "one_time_burst": 50_000}
    # 3.33 bytes per 10 ms rounds up: 0 would mean "unlimited" to Firecracker
    assert bodies.token_bucket(TX) == {"size": 4, "refill_time": 10}


def test_optional_fields_are_left_out_not_null() -> None:
    assert "initrd_path" not in bodies.boot_source("/k", None, "")
    assert bodies.network_interface("eth0", "tap_x") == {"iface_id": "eth0", "host_dev_name": "tap_x"}


def mock_client(handler: httpx.MockTransport) -> FirecrackerClient:
    return FirecrackerClient(Path("/nonexistent.sock"), transport=handler)


async def test_requests_go_to_the_right_endpoint() -> None:
    seen: list[tuple[str, str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body))
        if request.url.path == "/version":
            return httpx.Response(200, json={"firecracker_version": "1.16.1"})
        return httpx.Response(204)

    async with mock_client(httpx.MockTransport(handler)) as client:
        await client.put_drive("data", "/d.img", False, True)
        await client.put_network_interface("eth0", "tap_x", None, RX, None)
        await client.pause()
        await client.flush_metrics()
        assert await client.version() == "1.16.1"
    assert seen[0] == ("PUT", "/drives/data", bodies.drive("data", "/d.img", False, True))
    assert seen[1][:2] == ("PUT", "/network-interfaces/eth0")
    assert seen[2] == ("PATCH", "/vm", {"state": "Paused"})
    assert seen[3] == ("PUT", "/actions", {"action_type": "FlushMetrics"})


async def test_fault_message_becomes_backend_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        msg = "The requested operation is not supported after starting the microVM."
        return httpx.Response(400, json={"fault_message": msg})

    async with mock_client(httpx.MockTransport(handler)) as client:
        with pytest.raises(FirecrackerApiError) as caught:
            await client.put_machine_config(1, 128)
    err = caught.value
    assert isinstance(err, BackendError)
    assert err.fault_message.startswith("The requested operation is not supported after")
    assert str(err).startswith("firecracker PUT /machine-config: The requested operation")
    assert err.status == 400


async def test_unreachable_socket_is_a_backend_error(tmp_path: Path) -> None:
    async with FirecrackerClient(tmp_path / "none.sock", timeout=1) as client:
        with pytest.raises(BackendError, match="unreachable"):
            await client.describe_instance()
