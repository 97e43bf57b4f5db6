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
    """A taken id is refused exactly as the owner's own retry is: nothing says another customer has it."""
    assert call(server, A, "CreateVm", {"vmId": "shared-name", "config": CONFIG}).status_code == 200
    theirs = call(server, B, "CreateVm", {"vmId": "shared-name", "config": CONFIG})
    own = call(server, A, "CreateVm", {"vmId": "shared-name", "config": CONFIG})
    assert (theirs.status_code, theirs.json()) == (own.status_code, own.json())
    assert theirs.json()["code"] == "already_exists" and "acme" not in theirs.text


def raw_call(srv: RunningServer, headers: list[tuple[str, str]], method: str = "ListVms") -> httpx.Response:
    """A call with exactly these headers (repeats kept)."""
    return httpx.post(srv.url + SVC + method, json={}, headers=[("content-type", "application/json"), *headers])


@pytest.mark.parametrize(
    "headers",
    [
        [("x-metald-caller", "")],
        [("x-metald-caller", A), ("x-metald-caller", B)],
        [("x-metald-caller", A), ("authorization", "Bearer dev_user_acme")],
        [("authorization", "Bearer dev_user_acme"), ("authorization", "Bearer dev_user_globex")],
        [("authorization", "Bearer nonsense")],
        [("authorization", "Basic YWNtZTp4")],
        [("authorization", "Bearer dev_user_")],
        [("authorization", "Bearer dev_user_..")],
        [("authorization", "Bearer dev_user_acme"), ("x-tenant-id", "bad tenant")],
        [("x-metald-caller", "spiffe://metald.test/customer/..")],
    ],
    ids=[
        "empty", "repeated", "header-and-token", "repeated-token", "bad-token", "basic",
        "empty-id", "dotdot-id", "bad-tenant", "dotdot-spiffe",
    ],
)
def test_malformed_caller_is_refused_not_operator(server: RunningServer, headers: list[tuple[str, str]]) -> None:
    call(server, OPERATOR, "CreateVm", {"vmId": "ops-9", "config": CONFIG})
    r = raw_call(server, headers)
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated", r.text
    assert r.json()["message"]


@pytest.mark.parametrize("kind", ["dev_user", "dev_customer"])
def test_dev_tokens_name_the_customer(server: RunningServer, kind: str) -> None:
    assert call(server, A, "CreateVm", {"vmId": "acme-7", "config": CONFIG}).status_code == 200
    assert call(server, B, "CreateVm", {"vmId": "globex-7", "config": CONFIG}).status_code == 200
    r = raw_call(server, [("authorization", f"Bearer {kind}_acme"), ("x-tenant-id", "team-1")])
    assert r.status_code == 200 and [v["vmId"] for v in r.json()["vms"]] == ["acme-7"]
    r = raw_call(server, [("authorization", f"Bearer {kind}_globex")], "GetVmInfo")
    assert r.status_code == 400  # vm_id missing: the token was accepted
    with httpx.Client() as http:
        r = http.post(
            server.url + SVC + "GetVmInfo", json={"vmId": "acme-7"}, headers={"authorization": f"Bearer {kind}_globex"}
        )
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_trust_domain_applies_to_the_header(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, spiffe_trust_domain="metald.test")
    with serve_in_thread(settings, FakeBackend()) as srv:
        assert call(srv, A, "ListVms", {}).status_code == 200
        r = call(srv, "spiffe://elsewhere.test/customer/acme", "ListVms", {})
        assert r.status_code == 403 and r.json()["code"] == "permission_denied"


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
