"""Snapshots of real guests through the API of a real `metald serve` (QEMU under
the jailer, each VM in its own namespace): hibernate + BootVm keeps the guest's
memory; clones answer on their own IPs with their own identity and RNG; a
fault at each step of SnapshotVm and CloneVm leaves nothing behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, RpcError
from tests.support.snapkit import http_get

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

SNAPS = "/metal.vmprovisioner.v1.SnapshotService/"
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
SNAPSHOT_STEPS = ("record", "save")
CLONE_STEPS = ("drives", "record", "allocate", "validate", "rundir", "network", "user")


class Daemon(DaemonProcess):
    def snap(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(self.url + SNAPS + method, json=body)
        data = r.json()
        if r.status_code != 200:
            raise RpcError(data.get("code", str(r.status_code)), data.get("message", ""))
        return data

    def ip(self, vm_id: str) -> str:
        return str(self.rpc("GetVmInfo", {"vmId": vm_id})["networkInfo"]["ipAddress"])

    def fault(self, item: str) -> None:
        (self.tmp / "faults").write_text(item)


@pytest.fixture
def daemon(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[Daemon]:
    d = Daemon(
        tmp_path, require_image, UNKEY_METALD_JAILER_UID="61000", UNKEY_METALD_JAILER_GID="61000",
        UNKEY_METALD_QEMU_ACCEL="tcg", METALD_FAULTS_FILE=str(tmp_path / "faults"),
    )  # fmt: skip
    d.start()
    yield d
    d.kill_with_vmms()


def wait_answer(ip: str, path: str = "/", timeout: float = 120) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = http_get(ip, path, timeout=1)
        if text is not None:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{ip}{path} did not answer")


def code_of(call: Any) -> str:
    with pytest.raises(RpcError) as info:
        call()
    return info.value.code


def test_hibernate_and_boot_keep_the_guests_memory(daemon: Daemon) -> None:
    daemon.rpc("CreateVm", {"vmId": "hib", "config": CONFIG})
    assert code_of(lambda: daemon.snap("SnapshotVm", {"vmId": "hib"})) == "failed_precondition"  # CREATED
    daemon.rpc("BootVm", {"vmId": "hib"})
    ip = daemon.ip("hib")
    wait_answer(ip)
    assert [http_get(ip, "/cgi-bin/counter") for _ in range(2)] == ["1", "2"]

    for step in SNAPSHOT_STEPS:  # each fault leaves no snapshot and the guest running
        daemon.fault(f"fail:snapshot.{step}")
        assert code_of(lambda: daemon.snap("SnapshotVm", {"vmId": "hib", "stop": True})) != "ok"
        daemon.fault("")
        assert daemon.snap("ListSnapshots", {}).get("snapshots", []) == []
        assert list((daemon.data_dir / "snapshots").glob("*")) == []
        assert daemon.state("hib") == "VM_STATE_RUNNING"
    assert http_get(ip, "/cgi-bin/counter") == "3"

    r = daemon.snap("SnapshotVm", {"vmId": "hib", "stop": True, "name": "night"})
    assert r["vmState"] == "VM_STATE_SHUTDOWN" and r["snapshot"]["purpose"] == "SNAPSHOT_PURPOSE_HIBERNATION"
    assert http_get(ip, "/", timeout=1) is None
    sid = r["snapshot"]["snapshotId"]
    assert code_of(lambda: daemon.snap("DeleteSnapshot", {"snapshotId": sid})) == "failed_precondition"
    assert daemon.rpc("BootVm", {"vmId": "hib"})["state"] == "VM_STATE_RUNNING"
    wait_answer(ip)
    assert http_get(ip, "/cgi-bin/counter") == "4"  # in-memory state survived: a resume, not a boot
    assert daemon.console("hib").count("METALD_GUEST_READY") == 1
    daemon.snap("DeleteSnapshot", {"snapshotId": sid})  # resumed: no longer in use


def test_clones_answer_on_their_own_ips(daemon: Daemon) -> None:
    daemon.rpc("CreateVm", {"vmId": "tpl", "config": CONFIG})
    daemon.rpc("BootVm", {"vmId": "tpl"})
    tpl_ip = daemon.ip("tpl")
    wait_answer(tpl_ip)
    sid = daemon.snap("SnapshotVm", {"vmId": "tpl", "snapshotId": "snap-tpl"})["snapshot"]["snapshotId"]
    assert daemon.state("tpl") == "VM_STATE_RUNNING"

    for step in CLONE_STEPS:  # each fault leaves no VM, no overlays, no run directory
        daemon.fault(f"fail:clone.{step}")
        assert code_of(lambda: daemon.snap("CloneVm", {"snapshotId": sid, "vmId": "bad", "boot": True})) != "ok"
        daemon.fault("")
        assert code_of(lambda: daemon.rpc("GetVmInfo", {"vmId": "bad"})) == "not_found"
        assert not (daemon.data_dir / "disks" / "bad").exists() and not (daemon.run_dir / "bad").exists()
        assert daemon.snap("GetSnapshot", {"snapshotId": sid})["snapshot"].get("usedByVmIds", []) == []

    ips = {}
    for name in ("clone-a", "clone-b"):
        assert daemon.snap("CloneVm", {"snapshotId": sid, "vmId": name, "boot": True})["state"] == "VM_STATE_RUNNING"
        ips[name] = daemon.ip(name)
    assert len({tpl_ip, *ips.values()}) == 3
    for name, ip in ips.items():
        assert wait_answer(ip) == name  # its own id, on its own IP
        assert f"hostname={name}" in (http_get(ip, "/info") or "")
    assert http_get(ips["clone-a"], "/cgi-bin/random") != http_get(ips["clone-b"], "/cgi-bin/random")
    assert wait_answer(tpl_ip) == "tpl"  # the template still answers as itself

    assert code_of(lambda: daemon.snap("DeleteSnapshot", {"snapshotId": sid})) == "failed_precondition"
    # a clone's cold boot runs on its overlays
    daemon.rpc("ShutdownVm", {"vmId": "clone-a", "force": True})
    daemon.rpc("BootVm", {"vmId": "clone-a"})
    assert wait_answer(ips["clone-a"], timeout=180) == "clone-a"
    for name in ips:
        daemon.rpc("DeleteVm", {"vmId": name, "force": True})
        assert not (daemon.data_dir / "disks" / name).exists()
    daemon.snap("DeleteSnapshot", {"snapshotId": sid})
    assert not (daemon.data_dir / "snapshots" / sid).exists()
