"""The Firecracker snapshot calls: bodies valid against the API description,
sent to the right endpoints, faults reported in Firecracker's words."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from metald.backends.firecracker import snapshot_bodies
from metald.backends.firecracker.client import FirecrackerApiError, FirecrackerClient
from tests.firecracker_double import harness

OVERRIDE = {"eth0": "tap_x"}
CASES = [
    ("SnapshotCreateParams", snapshot_bodies.snapshot_create("/snap/vmstate", "/snap/memory")),
    ("SnapshotCreateParams", snapshot_bodies.snapshot_create("/s", "/m", "Diff")),
    ("SnapshotLoadParams", snapshot_bodies.snapshot_load("/snap/vmstate", "/snap/memory")),
    (
        "SnapshotLoadParams",
        snapshot_bodies.snapshot_load(
            "/s", "/m", resume_vm=True, network_overrides={"eth0": "tap_ab12cd34"}, clock_realtime=True
        ),
    ),
]


@pytest.mark.parametrize(("definition", "body"), CASES)
def test_body_is_valid_against_the_spec(definition: str, body: dict) -> None:
    errors = list(harness.validator().definition_validator(definition).iter_errors(body))
    assert errors == [], [e.message for e in errors]


def test_load_uses_mem_backend_never_the_deprecated_field() -> None:
    body = snapshot_bodies.snapshot_load("/s", "/m")
    # "exactly one of the two mem_* fields": only mem_backend, and no optional field as null
    assert body == {"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}
    overridden = snapshot_bodies.snapshot_load("/s", "/m", network_overrides={"eth1": "tap_b", "eth0": "tap_a"})
    assert overridden["network_overrides"] == [
        {"iface_id": "eth0", "host_dev_name": "tap_a"},
        {"iface_id": "eth1", "host_dev_name": "tap_b"},
    ]


def test_a_wrong_value_is_refused_by_the_spec() -> None:
    """The check above can fail: a snapshot_type outside the spec's enum is an error."""
    bad = {**snapshot_bodies.snapshot_create("/s", "/m"), "snapshot_type": "Incremental"}
    assert list(harness.validator().definition_validator("SnapshotCreateParams").iter_errors(bad))


async def test_snapshot_requests_and_faults() -> None:
    seen: list[tuple[str, str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, json.loads(request.content)))
        if request.url.path == "/snapshot/load":
            fault = "Loading a microVM snapshot not allowed after configuring boot-specific resources."
            return httpx.Response(400, json={"fault_message": fault})
        return httpx.Response(204)

    async with FirecrackerClient(Path("/nonexistent.sock"), transport=httpx.MockTransport(handler)) as client:
        await client.create_snapshot("/snap/vmstate", "/snap/memory")
        with pytest.raises(FirecrackerApiError, match="not allowed after configuring") as info:
            await client.load_snapshot("/snap/vmstate", "/snap/memory", resume_vm=True, network_overrides=OVERRIDE)
    assert info.value.status == 400
    create = {"snapshot_path": "/snap/vmstate", "mem_file_path": "/snap/memory", "snapshot_type": "Full"}
    assert seen[0] == ("PUT", "/snapshot/create", create)
    assert seen[1][:2] == ("PUT", "/snapshot/load")
    assert seen[1][2] == snapshot_bodies.snapshot_load(
        "/snap/vmstate", "/snap/memory", resume_vm=True, network_overrides=OVERRIDE
    )
