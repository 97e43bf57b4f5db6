"""A forced failure at any step of create, boot, shutdown, reboot and delete leaves
exactly the state before the operation.

One real `metald serve` (network and jailer on, QEMU guests) with
``METALD_FAULTS_FILE`` (faults changed between calls without a restart) and
``METALD_FAULTS_TRACE`` (every step name reached). The step names are not
listed here: each operation runs once while its trace is recorded, and then
fails at each traced step in turn. After every failure the leak audit must
find no namespace, link, nft line, store row, run file, jail file, cgroup or
VMM process more or less than before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.audit import Snapshot, assert_no_leaks, intents, snapshot, vmm_processes_of
from tests.support.daemon import DaemonProcess, RpcError

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
PREFIX = "flt-"
OPERATIONS = ("create", "boot", "shutdown", "reboot", "delete")


class Faulty:
    """The daemon plus its fault file and step trace."""

    def __init__(self, tmp: Path, image: Path) -> None:
        self.faults = tmp / "faults"
        self.trace = tmp / "trace"
        self.d = DaemonProcess(
            tmp, image, UNKEY_METALD_JAILER_UID="61000", UNKEY_METALD_JAILER_GID="61000",
            METALD_FAULTS_FILE=str(self.faults), METALD_FAULTS_TRACE=str(self.trace),
        )

    def audit(self) -> Snapshot:
        d = self.d
        return snapshot(d.data_dir / "metald.db", d.run_dir, d.jail_dir, str(d.tmp), cgroup_prefix=PREFIX)

    def traced(self, call: Callable[[], object]) -> list[str]:
        """Step names reached by ``call``, in order, each once."""
        self.trace.write_text("")
        call()
        seen: list[str] = []
        for line in self.trace.read_text().split():
            if line not in seen:
                seen.append(line)
        return seen

    def rpc(self, method: str, **body: object) -> dict[str, object]:
        return self.d.rpc(method, dict(body))

    def fails_cleanly(self, step: str, call: Callable[[], object], state: str | None) -> None:
        """``call`` with ``fail:<step>`` raises and changes nothing; the VM stays in ``state``."""
        before = self.audit()
        self.faults.write_text(f"fail:{step}\n")
        try:
            with pytest.raises(RpcError) as err:
                call()
        finally:
            self.faults.write_text("")
        assert f"injected failure at {step}" in str(err.value), (step, str(err.value))
        after = self.audit()
        try:
            assert_no_leaks(before, after)
        except AssertionError as exc:
            raise AssertionError(f"after fail:{step}: {exc}") from None
        assert intents(self.d.data_dir / "metald.db") == []
        vm = self._vm
        if state is None:
            with pytest.raises(RpcError, match="not_found"):
                self.d.state(vm)
        else:
            assert self.d.state(vm) == state, step

    _vm = ""

    def each_step(self, steps: list[str], vm: str, call: Callable[[], object], state: str | None) -> None:
        self._vm = vm
        for step in steps:
            self.fails_cleanly(step, call, state)


@pytest.fixture
def faulty(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[Faulty]:
    f = Faulty(tmp_path, require_image)
    f.d.start()
    yield f
    f.d.kill_with_vmms()


@pytest.mark.timeout(900)
def test_failure_at_every_step_leaves_the_state_before(faulty: Faulty) -> None:
    f = faulty
    empty = f.audit()

    # 1. each operation once, recording the steps it passes
    a = f"{PREFIX}trace"
    steps = {
        "create": f.traced(lambda: f.rpc("CreateVm", vmId=a, config=CONFIG)),
        "boot": f.traced(lambda: f.rpc("BootVm", vmId=a)),
        "reboot": f.traced(lambda: f.rpc("RebootVm", vmId=a, force=True)),
        "shutdown": f.traced(lambda: f.rpc("ShutdownVm", vmId=a, force=True)),
        "boot-again": f.traced(lambda: f.rpc("BootVm", vmId=a)),
    }
    f.rpc("ShutdownVm", vmId=a, force=True)
    steps["delete"] = f.traced(lambda: f.rpc("DeleteVm", vmId=a))
    assert_no_leaks(empty, f.audit())
    for op in OPERATIONS:
        assert steps[op] and all(s.startswith(op + ".") for s in steps[op]), (op, steps[op])
    # network and jail sub-steps are fault points too
    for nested in ("create.network.tap", "boot.network.tap", "boot.vmm.jail.chroot", "boot.vmm.jail.cgroup",
                   "reboot.network.tap"):
        assert any(s == nested for ss in steps.values() for s in ss), nested
    print("\nSTEPS " + " ".join(f"{op}={len(s)}" for op, s in steps.items()))

    # 2. create fails at every step: no VM, nothing left
    b = f"{PREFIX}b"
    f.each_step(steps["create"], b, lambda: f.rpc("CreateVm", vmId=b, config=CONFIG), None)

    # 3. boot of a CREATED VM fails at every step: CREATED, no VMM, jail or files
    f.rpc("CreateVm", vmId=b, config=CONFIG)
    f.each_step(steps["boot"], b, lambda: f.rpc("BootVm", vmId=b), "VM_STATE_CREATED")

    # 4. reboot (forced and graceful) and shutdown of a RUNNING VM fail at every step: untouched
    f.rpc("BootVm", vmId=b)
    pid = vmm_processes_of(f.d.run_dir)
    f.each_step(steps["reboot"], b, lambda: f.rpc("RebootVm", vmId=b, force=True), "VM_STATE_RUNNING")
    f.each_step(steps["reboot"], b, lambda: f.rpc("RebootVm", vmId=b), "VM_STATE_RUNNING")
    f.each_step(steps["shutdown"], b, lambda: f.rpc("ShutdownVm", vmId=b, force=True), "VM_STATE_RUNNING")
    assert vmm_processes_of(f.d.run_dir) == pid  # the same VMM throughout

    # 5. a SHUTDOWN VM (it keeps its jail, logs, network and IP): boot and delete fail cleanly
    f.rpc("ShutdownVm", vmId=b, force=True)
    f.each_step(steps["boot-again"], b, lambda: f.rpc("BootVm", vmId=b), "VM_STATE_SHUTDOWN")
    f.each_step(steps["delete"], b, lambda: f.rpc("DeleteVm", vmId=b), "VM_STATE_SHUTDOWN")

    # 6. a CREATED VM: delete fails cleanly at every step too
    c = f"{PREFIX}c"
    f.rpc("CreateVm", vmId=c, config=CONFIG)
    f.each_step(steps["delete"], c, lambda: f.rpc("DeleteVm", vmId=c), "VM_STATE_CREATED")
    f.rpc("DeleteVm", vmId=c)

    # 7. a forced delete of a RUNNING VM cannot bring the guest back once it is
    #    stopped: a later failure leaves it SHUTDOWN with all its resources
    f.rpc("BootVm", vmId=b)
    running = f.audit()
    f.faults.write_text("fail:delete.network\n")
    with pytest.raises(RpcError):
        f.rpc("DeleteVm", vmId=b, force=True)
    f.faults.write_text("")
    assert f.d.state(b) == "VM_STATE_SHUTDOWN"
    changes = running.diff(f.audit())
    assert set(changes) <= {"processes", "store", "run_files"}, changes
    assert {Path(p).name for p in changes.get("run_files", (set(), set()))[1]} <= {"qmp.sock", "qemu.pid"}
    assert changes["run_files"][0] == set() and vmm_processes_of(f.d.run_dir) == []

    f.rpc("DeleteVm", vmId=b)
    assert_no_leaks(empty, f.audit())
