"""A lost database never costs a running guest.

Two real guests run; metald is killed and its database emptied (0 bytes, as
found by a hostile test run). The restarted metald keeps both guests, their
namespaces and jails, and says so in its log, ``/_/health`` and ``metald
doctor``; plain ``metald cleanup`` refuses, ``metald recover adopt`` takes them
back into the store, and ``metald cleanup --force`` removes orphans.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.audit import vmm_processes_of
from tests.support.daemon import METALD, DaemonProcess

pytestmark = [pytest.mark.xdist_group("net")]

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
JAIL_UID = "61000"
VMS = ("orph-a", "orph-b")


def _ticks(d: DaemonProcess, vm: str) -> int:
    found = re.findall(r"METALD_TICK (\d+)", d.console(vm))
    return int(found[-1]) if found else -1


def _wait_ticking(d: DaemonProcess, vm: str, timeout: float = 180) -> None:
    start = _ticks(d, vm)
    deadline = time.monotonic() + timeout
    while _ticks(d, vm) <= start:
        assert time.monotonic() < deadline, f"{vm} does not tick:\n{d.console(vm)[-2000:]}"
        time.sleep(0.3)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _cli(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*METALD, *args], env=d.env, capture_output=True, text=True, timeout=120)


def _lose_database(d: DaemonProcess) -> None:
    db = d.data_dir / "metald.db"
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    db.write_bytes(b"")


@pytest.fixture
def daemon(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, require_image, UNKEY_METALD_JAILER_UID=JAIL_UID, UNKEY_METALD_JAILER_GID=JAIL_UID)
    d.start()
    try:
        yield d
    finally:
        d.kill_with_vmms()
        for pid, _ in vmm_processes_of(d.run_dir):
            os.kill(pid, signal.SIGKILL)
        _cli(d, "cleanup", "--force")


@pytest.mark.vm
def test_lost_database_keeps_guests_and_reports_them(daemon: DaemonProcess) -> None:
    d = daemon
    for vm in VMS:
        d.rpc("CreateVm", {"vmId": vm, "config": CONFIG})
        d.rpc("BootVm", {"vmId": vm})
    for vm in VMS:
        _wait_ticking(d, vm)
    pids = {vm: int(d.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]["pid"]) for vm in VMS}
    ips = {vm: d.rpc("GetVmInfo", {"vmId": vm})["networkInfo"]["ipAddress"] for vm in VMS}
    d.kill()
    _lose_database(d)

    d.start()
    records = [r for r in d.log_records() if r.get("msg", "").startswith("2 VM(s) on this host have no record")]
    assert records and records[-1]["level"] == "error" and all(vm in str(records[-1]["orphans"]) for vm in VMS)
    assert [r for r in d.log_records() if r.get("msg") == "reconciled"][-1]["leftovers_removed"] == 0
    r = d.http.get(d.url + "/_/health")
    assert r.status_code == 200 and r.json()["status"] == "degraded"
    orphans = r.json()["checks"]["orphans"]
    assert orphans["ok"] is False and all(vm in orphans["detail"] for vm in VMS)
    assert "metald recover adopt" in orphans["detail"] and "cleanup --force" in orphans["detail"]
    for vm in VMS:
        assert _alive(pids[vm]) and Path(f"/run/netns/fc-{vm}").exists() and (d.jail_dir / "qemu" / vm).is_dir()
        _wait_ticking(d, vm)

    doctor = json.loads(_cli(d, "doctor", "--json").stdout)
    finding = next(c for c in doctor["checks"] if c["name"] == "orphans")
    assert finding["status"] == "fail" and all(vm in finding["detail"] for vm in VMS)

    refused = _cli(d, "cleanup")
    assert refused.returncode == 1 and "refusing" in refused.stderr
    assert all(_alive(pid) for pid in pids.values())

    # adopt them back: rebuilt from the VMMs and namespaces, then a restart adopts the VMMs
    adopted = _cli(d, "recover", "adopt", "--json")
    assert adopted.returncode == 0, adopted.stderr
    assert sorted(json.loads(adopted.stdout)["adopted"]) == list(VMS)
    d.kill()
    d.start()
    assert [r for r in d.log_records() if r.get("msg") == "reconciled"][-1]["adopted"] == len(VMS)
    for vm in VMS:
        info = d.rpc("GetVmInfo", {"vmId": vm})
        assert info["state"] == "VM_STATE_RUNNING" and int(info["backendInfo"]["pid"]) == pids[vm]
        assert info["networkInfo"]["ipAddress"] == ips[vm] and info["config"]["memory"]["sizeBytes"] == str(128 << 20)
        _wait_ticking(d, vm)
    assert d.http.get(d.url + "/_/health").json()["checks"]["orphans"]["ok"] is True
    d.rpc("PauseVm", {"vmId": VMS[0]})
    d.rpc("ResumeVm", {"vmId": VMS[0]})
    _wait_ticking(d, VMS[0])

    # lose them again; this time remove them
    d.kill()
    _lose_database(d)
    d.start()
    assert all(_alive(pid) for pid in pids.values())
    forced = _cli(d, "cleanup", "--force")
    assert forced.returncode == 0, forced.stderr
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids.values()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for vm in VMS:
        assert not Path(f"/run/netns/fc-{vm}").exists() and not (d.jail_dir / "qemu" / vm).exists()
    # the orphans check clears by itself (the host setup went too: the store has no VM)
    assert d.http.get(d.url + "/_/health").json()["checks"]["orphans"]["ok"] is True
