"""Real guests through the API: the QEMU backend, the bundled image, the VM
network and the jailer together, driven by a real `metald serve`.

TCG boots cost seconds on two cores, so one VM goes through the whole
lifecycle in one test.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.audit import assert_no_leaks, snapshot
from tests.support.daemon import DaemonProcess, RpcError

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(256 << 20)}}


def ticks(console: str) -> int:
    found = re.findall(r"METALD_TICK (\d+)", console)
    return int(found[-1]) if found else -1


@pytest.fixture
def daemon(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, require_image, UNKEY_METALD_JAILER_UID="61000", UNKEY_METALD_JAILER_GID="61000")
    d.start()
    yield d
    d.kill_with_vmms()


def _pid_of(daemon: DaemonProcess, vm_id: str) -> int:
    info = daemon.rpc("GetVmInfo", {"vmId": vm_id})
    return int(info["backendInfo"]["pid"])


def test_lifecycle_of_a_real_guest(daemon: DaemonProcess) -> None:
    vm = "life-1"
    before = snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir, vmm_marker=vm)
    assert daemon.rpc("CreateVm", {"vmId": vm, "config": CONFIG})["state"] == "VM_STATE_CREATED"
    assert daemon.rpc("BootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    console = daemon.wait_console(vm, "METALD_GUEST_READY")
    assert f"vm_id={vm}" in console

    info = daemon.rpc("GetVmInfo", {"vmId": vm})
    net = info["networkInfo"]
    assert net["networkNamespace"] == f"fc-{vm}" and net["tapDevice"].startswith("tap_")
    # the host reaches the guest's HTTP server on its IP
    answer = httpx.get(f"http://{net['ipAddress']}:8080/", timeout=20).text
    assert vm in answer

    # jailed: the VMM runs as the jailer's uid inside the VM's namespace
    pid = _pid_of(daemon, vm)
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^Uid:\s+61000\s", status, re.M), status
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/fc-{vm}").st_ino

    # metrics come from the VMM
    time.sleep(1)
    info = daemon.rpc("GetVmInfo", {"vmId": vm})
    metrics = info["metrics"]
    assert info["backendInfo"]["metrics_measured"] == "true"
    assert int(metrics["memoryUsageBytes"]) > 10 << 20 and float(metrics["cpuUsagePercent"]) > 0
    assert int(metrics.get("uptimeSeconds", 0)) >= 1
    assert int(metrics["networkStats"].get("bytesTransmitted", 0)) > 0

    # pause: the guest stops making progress; resume: it continues
    assert daemon.rpc("PauseVm", {"vmId": vm})["state"] == "VM_STATE_PAUSED"
    time.sleep(0.6)
    paused_at = ticks(daemon.console(vm))
    time.sleep(2)
    assert ticks(daemon.console(vm)) == paused_at
    assert daemon.rpc("ResumeVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    deadline = time.monotonic() + 10
    while ticks(daemon.console(vm)) <= paused_at and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ticks(daemon.console(vm)) > paused_at

    # reboot: the console shows a second boot
    assert daemon.rpc("RebootVm", {"vmId": vm, "force": True})["state"] == "VM_STATE_RUNNING"
    daemon.wait_console(vm, "METALD_GUEST_READY", count=2)

    # graceful shutdown within the timeout: the guest powers itself off
    started = time.monotonic()
    assert daemon.rpc("ShutdownVm", {"vmId": vm, "timeoutSeconds": 30})["state"] == "VM_STATE_SHUTDOWN"
    assert time.monotonic() - started < 30
    assert "METALD_GUEST_POWEROFF" in daemon.console(vm)
    info = daemon.rpc("GetVmInfo", {"vmId": vm})
    assert "poweroff" in info["backendInfo"]["last_exit_reason"]
    with pytest.raises(RpcError) as err:
        daemon.rpc("PauseVm", {"vmId": vm})
    assert err.value.code == "failed_precondition"

    # boot again from SHUTDOWN, then kill the VMM from outside
    assert daemon.rpc("BootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    pid = _pid_of(daemon, vm)
    os.kill(pid, signal.SIGKILL)
    daemon.wait_state(vm, "VM_STATE_SHUTDOWN", timeout=5)
    reason = daemon.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]["last_exit_reason"]
    assert "SIGKILL" in reason or "signal 9" in reason

    # forced shutdown of a running VM, then delete: nothing is left
    daemon.rpc("BootVm", {"vmId": vm})
    pid = _pid_of(daemon, vm)
    assert daemon.rpc("ShutdownVm", {"vmId": vm, "force": True})["state"] == "VM_STATE_SHUTDOWN"
    assert not Path(f"/proc/{pid}").exists()
    assert daemon.rpc("DeleteVm", {"vmId": vm})["success"] is True
    after = snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir, vmm_marker=vm)
    assert_no_leaks(before, after)
    assert f"fc-{vm}" not in os.listdir("/run/netns")


def test_bad_assets_are_refused_and_leave_nothing(daemon: DaemonProcess, tmp_path: Path) -> None:
    before = snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir)
    image = Path(daemon.env["UNKEY_METALD_IMAGE_DIR"])
    cases = [
        ({"boot": {"kernelPath": str(image / "missing-kernel")}}, "config.boot.kernel_path"),
        ({"boot": {"kernelPath": str(image)}}, "config.boot.kernel_path"),
        ({"storage": [{"id": "d", "path": "/dev/null"}]}, "config.storage[0].path"),
        ({"cpu": {"vcpuCount": 0}}, "config.cpu.vcpu_count"),
        ({"memory": {"sizeBytes": str(1 << 50)}}, "config.memory.size_bytes"),
    ]
    for override, field in cases:
        with pytest.raises(RpcError) as err:
            daemon.rpc("CreateVm", {"vmId": "bad-1", "config": {**CONFIG, **override}})
        assert err.value.code == "invalid_argument" and str(err.value).startswith(f"invalid_argument: {field}")
    assert_no_leaks(before, snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir))
