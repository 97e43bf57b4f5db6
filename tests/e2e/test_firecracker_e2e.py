"""The Firecracker backend through the API: a real `metald serve`, networking on,
and THE FIRECRACKER TEST DOUBLE (tests/firecracker_double) as the VMM.

No registry ships Firecracker and /dev/kvm here cannot run stock guests, so:

* jailed (the production path): metald's integrated jailer runs the double in
  Firecracker's place. The double validates every request against the official
  API description and opens the in-jail paths, /dev/kvm and the TAP with the
  jailed credentials; the test then reads /proc of the double's process (uid,
  gid, root, namespaces, cgroup and limits, RLIMIT_NOFILE, environment). The
  double is Python, so its interpreter is bind-mounted into each jail by a
  test-only step (tests/firecracker_double/jail_runtime.py); a real
  Firecracker is static and needs nothing of it.
* a real guest (FC_DOUBLE_BOOT_QEMU=1, marked ``vm``): the double boots the
  bundled image under QEMU/TCG from the configuration metald sent. QEMU is
  dynamically linked and cannot run in a chroot, so this runs with the jailer
  off (metald's development mode, DirectLauncher).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metald.backends.qemu.clock import cached_host_tsc_khz
from metald.jailer.cgroup import CgroupPaths, detect
from tests.conftest import ROOT
from tests.firecracker_double import harness
from tests.support import daemon as daemon_mod
from tests.support.audit import assert_no_leaks, snapshot
from tests.support.daemon import DaemonProcess, RpcError

# Marked vm (with the real-guest tests) although only the last test boots a guest: a jailed
# metald sweeps cgroups of VMs it does not know at start, and the cgroup tree is shared by
# tests/run-suite.sh's two parallel groups, so jailed daemons must not run in both at once.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

JAIL_ID = 61000
MIB = 1 << 20
# The cgroup tree is the host's, shared with test runs in other namespaces: this VM's cgroups
# are checked by name (_cgroup_dirs) instead.
SHARED = ("cgroups",)
RX = {"bandwidth": "1000000", "refillTime": "100", "burst": "5000"}
TX = {"bandwidth": "2000000"}


class Jailed:
    """A jailed-Firecracker daemon and the double's workspace."""

    def __init__(self, tmp: Path, daemon: DaemonProcess, workspace: Path, assets: Path) -> None:
        self.tmp = tmp
        self.daemon = daemon
        self.workspace = workspace
        self.assets = assets
        self.record = workspace / "requests.jsonl"
        self.knobs = workspace / "knobs"

    def set_knobs(self, **env: str) -> None:
        """The knobs the next double start reads (FC_DOUBLE_CHECK_TAP/KVM always on)."""
        harness.write_knobs(self.knobs, self.record, FC_DOUBLE_CHECK_TAP="1", FC_DOUBLE_CHECK_KVM="1", **env)

    def requests(self) -> list[dict]:
        return harness.read_record(self.record)

    def snapshot(self, vm: str = "") -> object:
        d = self.daemon
        return snapshot(d.data_dir / "metald.db", d.run_dir, d.jail_dir, vmm_marker=vm)

    def jail_dir(self, vm: str) -> Path:
        return self.daemon.jail_dir / "firecracker" / vm


@pytest.fixture
def jailed(tmp_path: Path, require_isolated: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Jailed]:
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4", "data.img"):
        (assets / name).write_bytes(b"\0" * 65536)
        (assets / name).chmod(0o644)
    workspace = tmp_path / "double"
    workspace.mkdir()
    os.chown(workspace, JAIL_ID, JAIL_ID)  # the jailed double writes its record here
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("a C compiler is needed to build the jailed double's static stub (apt-get install gcc)")
    stub = harness.build_jail_stub(tmp_path, workspace / "knobs")
    # `metald serve` with the test-only step that shows the interpreter inside jails
    monkeypatch.setattr(
        daemon_mod, "METALD", [daemon_mod.sys.executable, "-m", "tests.firecracker_double.jail_runtime", str(workspace)]
    )
    d = DaemonProcess(
        tmp_path,
        assets,
        UNKEY_METALD_BACKEND="firecracker",
        UNKEY_METALD_FIRECRACKER_BINARY=str(stub),
        UNKEY_METALD_JAILER_UID=str(JAIL_ID),
        UNKEY_METALD_JAILER_GID=str(JAIL_ID),
        PYTHONPATH=str(ROOT),
    )
    env = Jailed(tmp_path, d, workspace, assets)
    env.set_knobs()
    d.start()
    yield env
    d.kill()


def _config(assets: Path) -> dict:
    return {
        "cpu": {"vcpuCount": 1},
        "memory": {"sizeBytes": str(128 * MIB)},
        "storage": [
            {"id": "rootfs", "path": str(assets / "rootfs.ext4"), "isRootDevice": True},
            {"id": "data", "path": str(assets / "data.img"), "readOnly": True},
        ],
        "network": [{"rxRateLimit": RX, "txRateLimit": TX}],
    }


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _vmm_pid(d: DaemonProcess, vm: str) -> int:
    info = d.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]
    assert info["launcher"] == "metald-jailer", info
    return int(info["vmm_pid"])


def _cgroup_paths(parent: str, vm: str) -> CgroupPaths:
    """The VM's cgroup under the daemon's own UNKEY_METALD_JAILER_CGROUP_PARENT."""
    return dataclasses.replace(detect(), parent=parent).paths_for(vm)


def _cgroup_limits(parent: str, vm: str) -> dict[str, str]:
    paths = _cgroup_paths(parent, vm)
    if paths.version == 2:
        d = paths.dir_for("memory")
        return {
            "memory": (d / "memory.max").read_text().strip(),
            "cpu": (d / "cpu.max").read_text().strip(),
            "pids": (d / "pids.max").read_text().strip(),
        }
    cpu = paths.dir_for("cpu")
    return {
        "memory": (paths.dir_for("memory") / "memory.limit_in_bytes").read_text().strip(),
        "cpu": f"{(cpu / 'cpu.cfs_quota_us').read_text().strip()} {(cpu / 'cpu.cfs_period_us').read_text().strip()}",
        "pids": (paths.dir_for("pids") / "pids.max").read_text().strip(),
    }


def _cgroup_dirs(parent: str, vm: str) -> list[Path]:
    return list(_cgroup_paths(parent, vm).dirs)


def check_jailed_process(env: Jailed, vm: str) -> int:
    """The double runs as Firecracker would under metald's jailer; returns its host pid."""
    d = env.daemon
    pid = _vmm_pid(d, vm)
    root = env.jail_dir(vm) / "root"
    status = _status(pid)
    assert status["Uid"].split() == [str(JAIL_ID)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(JAIL_ID)] * 4, status["Gid"]
    assert status["Groups"] == ""
    assert status["NoNewPrivs"] == "1"
    assert status["NSpid"].split()[1:] == ["1"], status["NSpid"]  # pid 1 of its own PID namespace
    assert os.readlink(f"/proc/{pid}/root") == str(root)
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/fc-{vm}").st_ino
    for ns in ("mnt", "pid"):
        assert os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino, ns
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"^Max open files\s+1024\s+1024\s", limits, re.M), limits
    # its cgroup(s), with the VM's limits: guest memory + the VMM allowance, vCPUs + 100 % CPU, tasks
    for directory in _cgroup_dirs(d.cgroup_parent, vm):
        assert str(pid) in (directory / "cgroup.procs").read_text().split(), directory
    limits = {"memory": str(128 * MIB + 128 * MIB), "cpu": "200000 100000", "pids": "258"}
    assert _cgroup_limits(d.cgroup_parent, vm) == limits
    # the jail: assets and device nodes owned by the jailed ids, nothing else of the host
    for name, kind in (("dev/kvm", stat.S_ISCHR), ("dev/net/tun", stat.S_ISCHR), ("vmlinuz", stat.S_ISREG)):
        st = os.lstat(root / name)
        assert kind(st.st_mode), name
    assert os.lstat(root / "dev/kvm").st_uid == JAIL_ID
    assert os.lstat(root / "rootfs.ext4").st_uid == JAIL_ID  # writable drive: the VM's own
    return pid


def check_requests(env: Jailed, vm: str, net: dict) -> None:
    """Every request valid against the official API description, with in-jail paths."""
    validator = harness.validator()
    writes = [r for r in env.requests() if r["method"] != "GET"]
    for r in writes:
        assert r["status"] == 204, r
        validator.check(r["method"], r["path"], json.dumps(r["body"]).encode())
    first = [(r["method"], r["path"]) for r in writes[:8]]
    assert first == [
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/drives/data"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/actions"),
    ]
    bodies = {r["path"]: r["body"] for r in writes[:8]}
    assert bodies["/logger"]["log_path"] == "/run/firecracker.log"
    assert bodies["/metrics"] == {"metrics_path": "/run/firecracker.metrics"}
    assert bodies["/machine-config"] == {"vcpu_count": 1, "mem_size_mib": 128, "smt": False}
    boot = bodies["/boot-source"]
    assert (boot["kernel_image_path"], boot["initrd_path"]) == ("/vmlinuz", "/initramfs.cpio.gz")
    assert f"ip={net['ipAddress']}" in boot["boot_args"]
    assert bodies["/drives/rootfs"] == {
        "drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": True, "is_read_only": False,
    }  # fmt: skip
    assert bodies["/drives/data"]["path_on_host"] == "/data.img" and bodies["/drives/data"]["is_read_only"]
    assert bodies["/network-interfaces/eth0"] == {
        "iface_id": "eth0",
        "host_dev_name": net["tapDevice"],
        "guest_mac": net["macAddress"],
        "rx_rate_limiter": {"bandwidth": {"size": 100000, "refill_time": 100, "one_time_burst": 5000}},
        "tx_rate_limiter": {"bandwidth": {"size": 2000000, "refill_time": 1000}},
    }
    assert bodies["/actions"] == {"action_type": "InstanceStart"}


def test_jailed_firecracker_lifecycle_through_the_api(jailed: Jailed) -> None:
    d, vm = jailed.daemon, "fcj-life"
    before = jailed.snapshot(vm)
    assert d.rpc("CreateVm", {"vmId": vm, "config": _config(jailed.assets)})["state"] == "VM_STATE_CREATED"
    assert d.rpc("BootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    info = d.rpc("GetVmInfo", {"vmId": vm})
    net = info["networkInfo"]
    assert info["backendInfo"]["state"] == "Running" and info["backendInfo"]["chroot"].endswith(f"/{vm}/root")
    # The double attached to the TAP and opened /dev/kvm with the jailed credentials
    # (FC_DOUBLE_CHECK_TAP/KVM): the TAP belongs to the jailed uid/gid.
    pid = check_jailed_process(jailed, vm)
    check_requests(jailed, vm, net)
    metrics = d.rpc("GetVmInfo", {"vmId": vm})["metrics"]
    assert int(metrics["memoryUsageBytes"]) > 0 and int(metrics["networkStats"]["bytesReceived"]) > 0

    def writes() -> list[tuple[str, str, object]]:
        flush = {"action_type": "FlushMetrics"}  # GetVmInfo's metrics
        return [
            (r["method"], r["path"], r["body"])
            for r in jailed.requests()
            if r["method"] != "GET" and r["body"] != flush
        ]

    # pause / resume
    assert d.rpc("PauseVm", {"vmId": vm})["state"] == "VM_STATE_PAUSED"
    assert d.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]["state"] == "Paused"
    assert d.rpc("ResumeVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    assert writes()[-2:] == [("PATCH", "/vm", {"state": "Paused"}), ("PATCH", "/vm", {"state": "Resumed"})]

    # graceful reboot: Ctrl+Alt+Del, then a fresh jailed Firecracker configured again
    assert d.rpc("RebootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    assert ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) in writes()
    assert not Path(f"/proc/{pid}").exists()
    pid = check_jailed_process(jailed, vm)
    assert writes().count(("PUT", "/actions", {"action_type": "InstanceStart"})) == 2
    # forced reboot: killed, started again
    assert d.rpc("RebootVm", {"vmId": vm, "force": True})["state"] == "VM_STATE_RUNNING"
    assert not Path(f"/proc/{pid}").exists()
    pid = check_jailed_process(jailed, vm)

    # graceful shutdown: the guest powers off; a SHUTDOWN VM keeps its jail (Firecracker's log)
    # with an empty cgroup until the next boot (which builds it afresh) or delete
    assert d.rpc("ShutdownVm", {"vmId": vm, "timeoutSeconds": 10})["state"] == "VM_STATE_SHUTDOWN"
    assert d.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]["last_exit_reason"] == "guest poweroff"
    assert not Path(f"/proc/{pid}").exists()
    assert (jailed.jail_dir(vm) / "root" / "run" / "firecracker.log").exists()
    assert all((p / "cgroup.procs").read_text() == "" for p in _cgroup_dirs(jailed.daemon.cgroup_parent, vm))

    # boot again, then a forced shutdown
    assert d.rpc("BootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    pid = check_jailed_process(jailed, vm)
    assert d.rpc("ShutdownVm", {"vmId": vm, "force": True})["state"] == "VM_STATE_SHUTDOWN"
    assert not Path(f"/proc/{pid}").exists()

    # delete: no chroot, no cgroup, nothing else either
    assert d.rpc("BootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    pid = check_jailed_process(jailed, vm)
    assert d.rpc("DeleteVm", {"vmId": vm, "force": True})["success"] is True
    assert not Path(f"/proc/{pid}").exists()
    assert not jailed.jail_dir(vm).exists()
    assert not any(p.exists() for p in _cgroup_dirs(jailed.daemon.cgroup_parent, vm))
    assert_no_leaks(before, jailed.snapshot(vm), ignore=SHARED)
    assert all(r["status"] in (200, 204) for r in jailed.requests()), [r for r in jailed.requests() if r["fault"]]


def test_firecracker_error_is_a_clear_rpc_error_and_leaves_nothing(jailed: Jailed) -> None:
    d, vm = jailed.daemon, "fcj-fail"
    before = jailed.snapshot(vm)
    message = "Drive config error: injected by the test"
    jailed.set_knobs(FC_DOUBLE_FAIL="PUT /drives/{drive_id}", FC_DOUBLE_FAIL_MESSAGE=message)
    d.rpc("CreateVm", {"vmId": vm, "config": _config(jailed.assets)})
    created = jailed.snapshot(vm)
    with pytest.raises(RpcError) as err:
        d.rpc("BootVm", {"vmId": vm})
    assert err.value.code == "unavailable"
    assert "PUT /drives/rootfs" in str(err.value) and message in str(err.value)
    assert d.state(vm) == "VM_STATE_CREATED"
    # nothing of the failed boot is left: no process, jail or cgroup (the VM's network stays)
    assert_no_leaks(created, jailed.snapshot(vm), ignore=("run_files", *SHARED))
    assert not jailed.jail_dir(vm).exists()
    assert not any(p.exists() for p in _cgroup_dirs(jailed.daemon.cgroup_parent, vm))

    jailed.set_knobs()  # the next start works
    assert d.rpc("BootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    assert d.rpc("DeleteVm", {"vmId": vm, "force": True})["success"] is True
    assert_no_leaks(before, jailed.snapshot(vm), ignore=SHARED)


def test_leftover_jails_are_swept_at_start(tmp_path: Path, jailed: Jailed) -> None:
    d, vm = jailed.daemon, "fcj-left"
    d.rpc("CreateVm", {"vmId": vm, "config": _config(jailed.assets)})
    d.rpc("BootVm", {"vmId": vm})
    pid = _vmm_pid(d, vm)
    d.kill()  # metald dies; its jailed Firecracker goes on
    assert Path(f"/proc/{pid}").exists()
    # forget the VM (as if its record were lost): its running VMM is an orphan, never swept
    import sqlite3

    with sqlite3.connect(d.data_dir / "metald.db") as db:
        db.execute("DELETE FROM vms WHERE vm_id = ?", (vm,))
    d.start()
    assert Path(f"/proc/{pid}").exists() and jailed.jail_dir(vm).exists()
    assert vm in d.http.get(d.url + "/_/health").json()["checks"]["orphans"]["detail"]
    # `metald cleanup --force` removes it: the VMM, its jail and its cgroup
    import subprocess

    from tests.support.daemon import METALD

    out = subprocess.run([*METALD, "cleanup", "--force"], env=d.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
    assert not jailed.jail_dir(vm).exists()
    assert not any(p.exists() for p in _cgroup_dirs(jailed.daemon.cgroup_parent, vm))
    assert f"jail {vm}" in out.stdout or vm in out.stdout


# --- a real guest through the double (jailer off) -------------------------------------------------------


def _ticks(console: str) -> int:
    found = re.findall(r"METALD_TICK (\d+)", console)
    return int(found[-1]) if found else -1


def test_real_guest_through_the_double(tmp_path: Path, require_isolated: None, require_image: Path) -> None:
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    record = tmp_path / "requests.jsonl"
    knobs = {"FC_DOUBLE_BOOT_QEMU": "1", "FC_DOUBLE_CHECK_TAP": "1"}
    khz = cached_host_tsc_khz()
    if khz:
        knobs["FC_DOUBLE_TSC_KHZ"] = str(khz)
    shim = harness.make_shim(shim_dir, record, **knobs)
    d = DaemonProcess(
        tmp_path,
        require_image,
        UNKEY_METALD_BACKEND="firecracker",
        UNKEY_METALD_FIRECRACKER_BINARY=str(shim),
        UNKEY_METALD_JAILER_ENABLED="false",
    )
    d.start()
    try:
        vm = "fcq-1"
        before = snapshot(d.data_dir / "metald.db", d.run_dir, d.jail_dir, vmm_marker=vm)
        config = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(256 * MIB)}}
        d.rpc("CreateVm", {"vmId": vm, "config": config})
        assert d.rpc("BootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
        assert d.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]["launcher"] == "direct"
        console = d.wait_console(vm, "METALD_GUEST_READY")
        assert f"vm_id={vm}" in console
        net = d.rpc("GetVmInfo", {"vmId": vm})["networkInfo"]
        assert vm in httpx.get(f"http://{net['ipAddress']}:8080/", timeout=20).text

        assert d.rpc("PauseVm", {"vmId": vm})["state"] == "VM_STATE_PAUSED"
        time.sleep(0.6)
        paused_at = _ticks(d.console(vm))
        time.sleep(2)
        assert _ticks(d.console(vm)) == paused_at
        assert d.rpc("ResumeVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
        deadline = time.monotonic() + 10
        while _ticks(d.console(vm)) <= paused_at and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ticks(d.console(vm)) > paused_at

        assert d.rpc("ShutdownVm", {"vmId": vm, "timeoutSeconds": 30})["state"] == "VM_STATE_SHUTDOWN"
        assert "METALD_GUEST_POWEROFF" in d.console(vm)
        assert d.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]["last_exit_reason"] == "guest poweroff"
        assert all(r["status"] in (200, 204) for r in harness.read_record(record))
        assert d.rpc("DeleteVm", {"vmId": vm})["success"] is True
        assert_no_leaks(before, snapshot(d.data_dir / "metald.db", d.run_dir, d.jail_dir, vmm_marker=vm), ignore=SHARED)
        assert "UNJAILED" in d.log.read_text()
    finally:
        d.kill()


FC_REAL_NAME = "firecracker-v1.16.1-x86_64"


@pytest.fixture
def own_jailer(tmp_path: Path, require_isolated: None) -> Iterator[Jailed]:
    """`metald serve` with UNKEY_METALD_FIRECRACKER_USE_OWN_JAILER: the jailer double runs the double."""
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4", "data.img"):
        (assets / name).write_bytes(b"\0" * 65536)
        (assets / name).chmod(0o644)
    workspace = tmp_path / "double"
    workspace.mkdir()
    os.chown(workspace, JAIL_ID, JAIL_ID)
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("a C compiler is needed to build the jailed double's static stub (apt-get install gcc)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = harness.build_jail_stub(bin_dir, workspace / "knobs").rename(bin_dir / FC_REAL_NAME)
    (bin_dir / "firecracker").symlink_to(real.name)  # the jail is named after the real file
    d = DaemonProcess(
        tmp_path,
        assets,
        UNKEY_METALD_BACKEND="firecracker",
        UNKEY_METALD_FIRECRACKER_BINARY=str(bin_dir / "firecracker"),
        UNKEY_METALD_FIRECRACKER_USE_OWN_JAILER="true",
        UNKEY_METALD_FIRECRACKER_JAILER_BINARY=str(harness.make_jailer_shim(tmp_path, workspace)),
        UNKEY_METALD_JAILER_UID=str(JAIL_ID),
        UNKEY_METALD_JAILER_GID=str(JAIL_ID),
    )
    env = Jailed(tmp_path, d, workspace, assets)
    env.set_knobs()
    d.start()
    yield env
    d.kill()


def test_own_jailer_lifecycle_through_the_api(own_jailer: Jailed) -> None:
    env, vm = own_jailer, "fco-life"
    d = env.daemon
    jail = d.jail_dir / FC_REAL_NAME / vm
    before = env.snapshot(vm)
    d.rpc("CreateVm", {"vmId": vm, "config": _config(env.assets)})

    def vmm() -> int:
        info = d.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]
        assert info["launcher"] == "firecracker-jailer" and info["chroot"] == str(jail / "root"), info
        pid = int(info["pid"])
        assert _status(pid)["Uid"].split() == [str(JAIL_ID)] * 4
        assert os.readlink(f"/proc/{pid}/root") == str(jail / "root")
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/fc-{vm}").st_ino
        for directory in _cgroup_dirs(d.cgroup_parent, vm):  # --cgroup: the same limits as metald's jailer
            assert str(pid) in (directory / "cgroup.procs").read_text().split(), directory
        assert _cgroup_limits(d.cgroup_parent, vm) == {"memory": str(256 * MIB), "cpu": "200000 100000", "pids": "258"}
        return pid

    assert d.rpc("BootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    pid = vmm()  # the double attached to the TAP and opened /dev/kvm inside the jail (checks on)
    assert d.rpc("RebootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"
    assert not Path(f"/proc/{pid}").exists()
    pid = vmm()
    assert d.rpc("ShutdownVm", {"vmId": vm, "timeoutSeconds": 10})["state"] == "VM_STATE_SHUTDOWN"
    assert d.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]["last_exit_reason"] == "guest poweroff"
    assert d.rpc("BootVm", {"vmId": vm})["state"] == "VM_STATE_RUNNING"  # from SHUTDOWN, a fresh jail
    pid = vmm()
    starts = [r for r in env.requests() if r["body"] == {"action_type": "InstanceStart"}]
    assert len(starts) == 3 and all(r["status"] in (200, 204) for r in env.requests())
    assert d.rpc("DeleteVm", {"vmId": vm, "force": True})["success"] is True
    assert not Path(f"/proc/{pid}").exists() and not jail.exists()
    assert not any(p.exists() for p in _cgroup_dirs(d.cgroup_parent, vm))
    assert_no_leaks(before, env.snapshot(vm), ignore=SHARED)
