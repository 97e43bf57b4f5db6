"""metald killed at chosen steps (``METALD_FAULTS=die:...`` in `metald serve`'s
environment): the next start completes or rolls back the interrupted operation,
as the rules in ``metald.core.engine`` say, and leaves nothing half done.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.audit import Snapshot, assert_no_leaks, intents, snapshot, vmm_processes_of
from tests.support.daemon import DaemonProcess, RpcError

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
VM = "intr-1"


class Interrupted:
    def __init__(self, tmp: Path, image: Path) -> None:
        self.d = DaemonProcess(tmp, image, UNKEY_METALD_JAILER_UID="61000", UNKEY_METALD_JAILER_GID="61000")
        self.db = self.d.data_dir / "metald.db"

    def audit(self) -> Snapshot:
        return snapshot(self.db, self.d.run_dir, self.d.jail_dir, str(self.d.tmp), cgroup_prefix="intr-")

    def dies_at(self, point: str, call: Callable[[], object]) -> None:
        """Restart metald with ``METALD_FAULTS=<point>``, make ``call`` hit it, restart clean."""
        self.d.kill()
        self.d.env["METALD_FAULTS"] = point
        self.d.start()
        with pytest.raises((httpx.HTTPError, RpcError, ValueError)):
            call()
        assert self.d.proc is not None
        assert self.d.proc.wait(10) == -signal.SIGKILL, f"{point} not reached"
        del self.d.env["METALD_FAULTS"]
        self.d.start()
        assert intents(self.db) == []

    def state(self) -> str:
        return self.d.state(VM)

    def rpc(self, method: str, **body: object) -> dict[str, object]:
        return self.d.rpc(method, {"vmId": VM, **body})


@pytest.fixture
def it(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[Interrupted]:
    i = Interrupted(tmp_path, require_image)
    i.d.start()
    yield i
    i.d.kill_with_vmms()


def test_interrupted_operations_are_completed_or_rolled_back(it: Interrupted) -> None:
    empty = it.audit()

    # create: rolled back, the VM never existed
    it.dies_at("die:after:create.rundir", lambda: it.rpc("CreateVm", config=CONFIG))
    with pytest.raises(RpcError, match="not_found"):
        it.state()
    assert_no_leaks(empty, it.audit())

    # boot cut off while making the jail: back to CREATED, no jail, no VMM
    it.rpc("CreateVm", config=CONFIG)
    created = it.audit()
    it.dies_at("die:before:boot.vmm.jail.cgroup", lambda: it.rpc("BootVm"))
    assert it.state() == "VM_STATE_CREATED"
    assert_no_leaks(created, it.audit())

    # boot cut off once the VMM runs and its handle is stored: adopted, RUNNING
    it.dies_at("die:after:boot.vmm", lambda: it.rpc("BootVm"))
    assert it.state() == "VM_STATE_RUNNING"
    pids = vmm_processes_of(it.d.run_dir)
    assert len(pids) == 1
    ip = it.rpc("GetVmInfo")["networkInfo"]["ipAddress"]  # type: ignore[index]
    it.d.wait_console(VM, "METALD_GUEST_READY")
    assert httpx.get(f"http://{ip}:8080/", timeout=10).text.strip() == VM

    # shutdown cut off before the stop: rolled back, the same VMM runs on
    it.dies_at("die:before:shutdown.vmm", lambda: it.rpc("ShutdownVm", force=True))
    assert it.state() == "VM_STATE_RUNNING" and vmm_processes_of(it.d.run_dir) == pids

    # reboot cut off after its network check: still RUNNING on the same VMM
    it.dies_at("die:after:reboot.network", lambda: it.rpc("RebootVm", force=True))
    assert it.state() == "VM_STATE_RUNNING" and vmm_processes_of(it.d.run_dir) == pids

    # pause has no intent: the recorded state follows the VMM's own run state
    it.rpc("PauseVm")
    it.d.kill()
    it.d.start()
    assert it.state() == "VM_STATE_PAUSED"
    assert it.rpc("GetVmInfo")["backendInfo"]["status"] == "paused"  # type: ignore[index]
    it.rpc("ResumeVm")

    # delete cut off half way (jail gone, addresses not yet freed): completed
    it.dies_at("die:after:delete.jail", lambda: it.rpc("DeleteVm", force=True))
    with pytest.raises(RpcError, match="not_found"):
        it.state()
    assert_no_leaks(empty, it.audit())
