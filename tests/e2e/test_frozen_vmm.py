"""A frozen VMM (QEMU stopped by SIGSTOP) does not stall reads and is not killed as if it had exited."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.audit import vmm_processes_of
from tests.support.daemon import DaemonProcess

pytestmark = [pytest.mark.xdist_group("net")]

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
JAIL_UID = "61000"
VM = "frz-1"


def _ticks(d: DaemonProcess) -> int:
    found = re.findall(r"METALD_TICK (\d+)", d.console(VM))
    return int(found[-1]) if found else -1


def _wait_ticking(d: DaemonProcess, timeout: float = 180) -> None:
    start = _ticks(d)
    deadline = time.monotonic() + timeout
    while _ticks(d) <= start:
        assert time.monotonic() < deadline, d.console(VM)[-2000:]
        time.sleep(0.3)


def _state_letter(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def daemon(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, require_image, UNKEY_METALD_NETWORK_ENABLED="false",
                      UNKEY_METALD_JAILER_UID=JAIL_UID, UNKEY_METALD_JAILER_GID=JAIL_UID)
    d.start()
    try:
        yield d
    finally:
        d.kill_with_vmms()
        for pid, _ in vmm_processes_of(d.run_dir):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.vm
def test_frozen_vmm_reads_restart_and_reboot(daemon: DaemonProcess) -> None:
    d = daemon
    d.rpc("CreateVm", {"vmId": VM, "config": CONFIG})
    d.rpc("BootVm", {"vmId": VM})
    _wait_ticking(d)
    pid = int(d.rpc("GetVmInfo", {"vmId": VM})["backendInfo"]["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        info = d.rpc("GetVmInfo", {"vmId": VM})
        assert info["state"] == "VM_STATE_RUNNING"
        assert info["backendInfo"]["status"] == "unresponsive", info["backendInfo"]
        assert info["backendInfo"]["status_detail"].strip().endswith("s"), info["backendInfo"]
        assert d.rpc("ListVms", {})["vms"][0]["vmId"] == VM

        # a restart while it is frozen: identity holds, so it is kept, reported unresponsive, not "exited"
        d.kill()
        d.start()
        info = d.rpc("GetVmInfo", {"vmId": VM})
        assert info["state"] == "VM_STATE_RUNNING" and int(info["backendInfo"]["pid"]) == pid
        assert info["backendInfo"]["status"] == "unresponsive", info["backendInfo"]
        assert "last_exit_reason" not in info["backendInfo"]
        deadline = time.monotonic() + 60  # the background attach gives up; the VMM stays
        while not any(r.get("msg", "").startswith("adopted VMM is alive but unresponsive") for r in d.log_records()):
            assert time.monotonic() < deadline, d.log.read_text()[-3000:]
            time.sleep(0.2)
        assert _state_letter(pid) == "T"  # still there, still stopped
        info = d.rpc("GetVmInfo", {"vmId": VM})
        assert info["state"] == "VM_STATE_RUNNING" and "last_exit_reason" not in info["backendInfo"]
        for record in d.log_records():
            assert not str(record.get("msg", "")).rstrip().endswith(":"), record  # no empty cause
    finally:
        os.kill(pid, signal.SIGCONT)
    _wait_ticking(d)
    info = d.rpc("GetVmInfo", {"vmId": VM})
    assert info["backendInfo"]["status"] == "running", info["backendInfo"]

    # graceful reboot of a frozen VMM does not wait out the grace period on a VMM that cannot answer
    os.kill(pid, signal.SIGSTOP)
    d.rpc("RebootVm", {"vmId": VM})
    new_pid = int(d.rpc("GetVmInfo", {"vmId": VM})["backendInfo"]["pid"])
    assert new_pid != pid
    _wait_ticking(d)
    d.rpc("DeleteVm", {"vmId": VM, "force": True})
