"""Two customers and an operator through the dev caller header: each customer
sees and acts on its own VMs only, and never learns the other's exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import RunningServer, make_settings, serve_in_thread

A = "spiffe://metald.test/customer/acme"
B = "spiffe://metald.test/customer/globex"
OPERATOR = "spiffe://metald.test/ops/console"
SVC = "/metal.vmprovisioner.v1.VmService/"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    settings = make_settings(tmp_path, network_enabled=True, operator_ids=OPERATOR)
    with serve_in_thread(settings, FakeBackend(), FakeNetwork()) as srv:
        yield srv


def call(srv: RunningServer, who: str | None, method: str, body: dict) -> httpx.Response:  # type: ignore[type-arg]
    headers = {"content-type": "application/json"}
    if who:
        headers["x-metald-caller"] = who
    return httpx.post(srv.url + SVC + method, json=body, headers=headers)


CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}


def test_customers_are_isolated(server: RunningServer) -> None:
    r = call(server, A, "CreateVm", {"vmId": "acme-1", "config": CONFIG})
    assert r.status_code == 200
    assert server.store.get_vm("acme-1").customer_id == "acme"  # tied to the caller
    assert call(server, B, "CreateVm", {"vmId": "globex-1", "config": CONFIG}).status_code == 200

    for method, body in [
        ("GetVmInfo", {"vmId": "acme-1"}),
        ("BootVm", {"vmId": "acme-1"}),
        ("PauseVm", {"vmId": "acme-1"}),
        ("ResumeVm", {"vmId": "acme-1"}),
        ("RebootVm", {"vmId": "acme-1"}),
        ("ShutdownVm", {"vmId": "acme-1"}),
        ("DeleteVm", {"vmId": "acme-1", "force": True}),
    ]:
        theirs = call(server, B, method, body)
        missing = call(server, B, method, {**body, "vmId": "no-such-vm"})
        assert theirs.status_code == 404 and theirs.json()["code"] == "not_found", (method, theirs.text)
        # indistinguishable from a VM that does not exist
        assert theirs.json()["message"].replace("acme-1", "X") == missing.json()["message"].replace("no-such-vm", "X")
    assert server.store.get_vm("acme-1").state == 1  # untouched

    listed = call(server, B, "ListVms", {}).json()
    assert [v["vmId"] for v in listed["vms"]] == ["globex-1"] and listed["totalCount"] == 1
    everything = call(server, OPERATOR, "ListVms", {}).json()
    assert {v["vmId"] for v in everything["vms"]} == {"acme-1", "globex-1"}


def test_create_for_another_customer_is_denied(server: RunningServer) -> None:
    r = call(server, A, "CreateVm", {"vmId": "x-1", "customerId": "globex", "config": CONFIG})
    assert r.status_code == 403 and r.json()["code"] == "permission_denied"
    assert server.store.get_vm("x-1") is None
    assert call(server, A, "CreateVm", {"vmId": "x-2", "customerId": "acme", "config": CONFIG}).status_code == 200


def test_taken_id_of_another_customer_does_not_leak(server: RunningServer) -> None:
    assert call(server, A, "CreateVm", {"vmId": "shared-name", "config": CONFIG}).status_code == 200
    r = call(server, B, "CreateVm", {"vmId": "shared-name", "config": CONFIG})
    assert r.json()["code"] == "permission_denied" and "acme" not in r.text


def test_operator_acts_on_all(server: RunningServer) -> None:
    call(server, A, "CreateVm", {"vmId": "acme-2", "config": CONFIG})
    assert call(server, OPERATOR, "BootVm", {"vmId": "acme-2"}).json()["state"] == "VM_STATE_RUNNING"
    r = call(server, OPERATOR, "CreateVm", {"vmId": "ops-1", "customerId": "globex", "config": CONFIG})
    assert r.status_code == 200 and server.store.get_vm("ops-1").customer_id == "globex"


def test_unknown_identity_is_denied(server: RunningServer) -> None:
    r = call(server, "spiffe://metald.test/random/thing", "ListVms", {})
    assert r.status_code == 403 and r.json()["code"] == "permission_denied"


def test_grpc_caller_header(server: RunningServer) -> None:
    import grpc

    from metald.gen.metal.vmprovisioner.v1 import vm_pb2, vm_pb2_grpc

    call(server, A, "CreateVm", {"vmId": "acme-3", "config": CONFIG})
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = vm_pb2_grpc.VmServiceStub(channel)
        listed = stub.ListVms(vm_pb2.ListVmsRequest(), metadata=[("x-metald-caller", B)], timeout=10)
        assert list(listed.vms) == []
        with pytest.raises(grpc.RpcError) as info:
            stub.ListVms(vm_pb2.ListVmsRequest(), metadata=[("x-metald-caller", "nobody")], timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
