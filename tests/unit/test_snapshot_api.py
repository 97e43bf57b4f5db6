"""SnapshotService over Connect JSON with the fake backend: tenancy, validation
naming fields, in-use refusal, clone with boot, and unimplemented without the
capability."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import RunningServer, make_settings, serve_in_thread

A = "spiffe://metald.test/customer/acme"
B = "spiffe://metald.test/customer/globex"
VMS = "/metal.vmprovisioner.v1.VmService/"
SNAPS = "/metal.vmprovisioner.v1.SnapshotService/"
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    settings = make_settings(tmp_path, network_enabled=True)
    with serve_in_thread(settings, FakeBackend(), FakeNetwork()) as srv:
        yield srv


def call(srv: RunningServer, who: str, path: str, body: dict) -> httpx.Response:  # type: ignore[type-arg]
    headers = {"content-type": "application/json", "x-metald-caller": who}
    return httpx.post(srv.url + path, json=body, headers=headers)


def running_vm(srv: RunningServer, vm_id: str) -> None:
    assert call(srv, A, VMS + "CreateVm", {"vmId": vm_id, "config": CONFIG}).status_code == 200
    assert call(srv, A, VMS + "BootVm", {"vmId": vm_id}).status_code == 200


def test_snapshot_clone_and_delete_through_the_api(server: RunningServer) -> None:
    running_vm(server, "tpl")
    r = call(server, A, SNAPS + "SnapshotVm", {"vmId": "tpl", "name": "base", "snapshotId": "snap-1"})
    assert r.status_code == 200, r.text
    assert r.json()["snapshot"]["snapshotId"] == "snap-1" and r.json()["vmState"] == "VM_STATE_RUNNING"
    listed = call(server, A, SNAPS + "ListSnapshots", {}).json()["snapshots"]
    assert [s["snapshotId"] for s in listed] == ["snap-1"] and listed[0]["name"] == "base"

    r = call(server, A, SNAPS + "CloneVm", {"snapshotId": "snap-1", "vmId": "k1", "boot": True})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "VM_STATE_RUNNING"
    assert server.store.get_vm("k1").customer_id == "acme"
    info = call(server, A, SNAPS + "GetSnapshot", {"snapshotId": "snap-1"}).json()["snapshot"]
    assert info["usedByVmIds"] == ["k1"]

    r = call(server, A, SNAPS + "DeleteSnapshot", {"snapshotId": "snap-1"})
    assert r.status_code == 400 and r.json()["code"] == "failed_precondition" and "k1" in r.json()["message"]
    assert call(server, A, SNAPS + "DeleteSnapshot", {"snapshotId": "snap-1", "force": True}).status_code == 200
    assert call(server, A, SNAPS + "GetSnapshot", {"snapshotId": "snap-1"}).json()["code"] == "not_found"


def test_another_customers_snapshot_is_not_found(server: RunningServer) -> None:
    running_vm(server, "mine")
    assert call(server, A, SNAPS + "SnapshotVm", {"vmId": "mine", "snapshotId": "snap-a"}).status_code == 200
    for method, body in [
        ("GetSnapshot", {"snapshotId": "snap-a"}),
        ("DeleteSnapshot", {"snapshotId": "snap-a", "force": True}),
        ("CloneVm", {"snapshotId": "snap-a", "vmId": "theirs"}),
        ("SnapshotVm", {"vmId": "mine"}),
    ]:
        r = call(server, B, SNAPS + method, body)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (method, r.text)
    assert call(server, B, SNAPS + "ListSnapshots", {}).json().get("snapshots", []) == []
    assert server.store.get_vm("theirs") is None


def test_bad_input_names_the_field_and_wrong_state_is_failed_precondition(server: RunningServer) -> None:
    assert call(server, A, VMS + "CreateVm", {"vmId": "c1", "config": CONFIG}).status_code == 200
    r = call(server, A, SNAPS + "SnapshotVm", {"vmId": "c1"})
    assert r.json()["code"] == "failed_precondition" and "CREATED" in r.json()["message"]
    r = call(server, A, SNAPS + "SnapshotVm", {"vmId": "c1", "snapshotId": "Bad_Id"})
    assert r.json()["code"] == "invalid_argument" and r.json()["message"].startswith("snapshot_id")
    running_vm(server, "t2")
    call(server, A, SNAPS + "SnapshotVm", {"vmId": "t2", "snapshotId": "snap-2"})
    r = call(server, A, SNAPS + "CloneVm", {"snapshotId": "snap-2", "config": {"cpu": {"vcpuCount": 2}}})
    assert r.json()["code"] == "invalid_argument" and r.json()["message"].startswith("config.cpu.vcpu_count")


def test_without_the_capability_the_rpcs_are_unimplemented(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, network_enabled=True)
    with serve_in_thread(settings, FakeBackend(snapshots=False), FakeNetwork()) as srv:
        running_vm(srv, "u1")
        r = call(srv, A, SNAPS + "SnapshotVm", {"vmId": "u1"})
        assert r.json()["code"] == "unimplemented" and "fake backend" in r.json()["message"]
        assert call(srv, A, SNAPS + "ListSnapshots", {}).json()["code"] == "unimplemented"


def test_cli_snapshot_clone_list_and_rm(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from metald.cli.main import main

    running_vm(server, "cli-tpl")
    assert main(["vm", "--server", server.url, "snapshot", "cli-tpl", "--name", "base"]) == 0
    sid = capsys.readouterr().out.strip()
    assert sid.startswith("snap-")
    assert main(["vm", "--server", server.url, "create", "--from-snapshot", sid, "--id", "cli-k", "--boot"]) == 0
    assert capsys.readouterr().out.split() == ["cli-k", "RUNNING"]
    assert main(["snapshot", "--server", server.url, "--json", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)["snapshots"]
    assert [(s["snapshotId"], s["usedByVmIds"]) for s in listed] == [(sid, ["cli-k"])]
    assert main(["snapshot", "--server", server.url, "info", sid]) == 0
    assert "cli-tpl" in capsys.readouterr().out
    assert main(["snapshot", "--server", server.url, "rm", sid]) == 1  # in use
    assert "failed_precondition" in capsys.readouterr().err
    assert main(["vm", "--server", server.url, "snapshot", "cli-tpl", "--stop"]) == 0
    assert server.store.get_vm("cli-tpl").state == 4  # SHUTDOWN (hibernated)
    capsys.readouterr()
    assert main(["vm", "--server", server.url, "boot", "cli-tpl"]) == 0
    assert "RUNNING" in capsys.readouterr().out
