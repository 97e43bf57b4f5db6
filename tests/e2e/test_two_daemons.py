"""Two metald daemons on one host, each with its own cgroup parent, the same VM id in both.

Each daemon's VMM lands in its own ``<controller>/<parent>/<vm_id>`` cgroup, and
neither daemon's BootVm, DeleteVm or start-up sweep touches the other's guest.
Real QEMU guests (TCG), no network (the daemons would share the bridge).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metald.jailer import cgroup as cg
from tests.support.audit import vmm_processes_of
from tests.support.daemon import DaemonProcess

pytestmark = [pytest.mark.xdist_group("net")]

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
JAIL_UID = "61000"
VM = "twin-1"


def _ticks(d: DaemonProcess) -> int:
    found = re.findall(r"METALD_TICK (\d+)", d.console(VM))
    return int(found[-1]) if found else -1


def _wait_ticking(d: DaemonProcess, timeout: float = 180) -> None:
    """The guest's console counter moves on (it runs, it is not frozen or dead)."""
    start = _ticks(d)
    deadline = time.monotonic() + timeout
    while _ticks(d) <= start:
        if time.monotonic() > deadline:
            raise AssertionError(f"{d.url}: {VM} does not tick; console:\n{d.console(VM)[-2000:]}")
        time.sleep(0.3)


def _pid(d: DaemonProcess) -> int:
    return int(d.rpc("GetVmInfo", {"vmId": VM})["backendInfo"]["pid"])


@pytest.fixture
def daemons(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[list[DaemonProcess]]:
    out = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        out.append(DaemonProcess(tmp_path / name, require_image, UNKEY_METALD_NETWORK_ENABLED="false",
                                 UNKEY_METALD_JAILER_UID=JAIL_UID, UNKEY_METALD_JAILER_GID=JAIL_UID))
    try:
        for d in out:
            d.start()
        yield out
    finally:
        for d in out:
            d.kill_with_vmms()
            for pid, _ in vmm_processes_of(d.run_dir):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.vm
def test_two_daemons_same_vm_id_keep_their_guests(daemons: list[DaemonProcess]) -> None:
    a, b = daemons
    assert a.cgroup_parent != b.cgroup_parent
    for d in (a, b):
        d.rpc("CreateVm", {"vmId": VM, "config": CONFIG})
    a.rpc("BootVm", {"vmId": VM})
    _wait_ticking(a)
    pid_a = _pid(a)
    b.rpc("BootVm", {"vmId": VM})
    _wait_ticking(b)
    pid_b = _pid(b)
    assert pid_a != pid_b
    # each VMM is in its own daemon's cgroup, under that daemon's parent
    fs = cg.detect()
    for d, pid in ((a, pid_a), (b, pid_b)):
        for directory in cg.CgroupFs(fs.version, fs.bases, d.cgroup_parent).paths_for(VM).dirs:
            assert pid in cg.procs(directory), (directory, d.log.read_text()[-2000:])
    # both guests keep running
    _wait_ticking(a)
    _wait_ticking(b)
    assert a.state(VM) == b.state(VM) == "VM_STATE_RUNNING"

    # a restart of b (its start-up sweep) leaves a's guest alone, and b adopts its own
    b.kill()
    b.start()
    assert _pid(b) == pid_b
    _wait_ticking(a)

    # deleting the VM in b removes b's guest only
    b.rpc("DeleteVm", {"vmId": VM, "force": True})
    assert not Path(f"/proc/{pid_b}").exists() or Path(f"/proc/{pid_b}/stat").read_text().split()[2] in "ZX"
    _wait_ticking(a)
    assert _pid(a) == pid_a and a.state(VM) == "VM_STATE_RUNNING"
    a.rpc("DeleteVm", {"vmId": VM, "force": True})
