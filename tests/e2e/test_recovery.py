"""Nothing lost: VMs outlive metald, restarts adopt them, drift and leftovers are repaired.

Real `metald serve` processes with the network and the jailer on, real QEMU
guests (TCG, 1 vCPU, 128 MiB). The guest's HTTP server answers ``GET /`` with
its VM id and ``GET /info`` with its ``boot_id`` (new for every boot), and its
console prints ``METALD_TICK <n>`` twice a second while it runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metald.network import names
from tests.support.audit import assert_no_leaks, snapshot, vmm_processes_of
from tests.support.daemon import DaemonProcess

pytestmark = [pytest.mark.xdist_group("net")]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
JAIL_UID = "61000"


def ticks(console: str) -> int:
    found = re.findall(r"METALD_TICK (\d+)", console)
    return int(found[-1]) if found else -1


def guest_get(ip: str, path: str = "/", timeout: float = 5) -> str:
    return httpx.get(f"http://{ip}:8080{path}", timeout=timeout).text


def guest_info(ip: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in guest_get(ip, "/info").splitlines() if "=" in line)


def wait_http(ip: str, vm_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if guest_get(ip, timeout=2).strip() == vm_id:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{vm_id} at {ip} did not answer HTTP: {last}")


def stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def new_daemon(tmp: Path, image: Path, **env: str) -> DaemonProcess:
    return DaemonProcess(tmp, image, UNKEY_METALD_JAILER_UID=JAIL_UID, UNKEY_METALD_JAILER_GID=JAIL_UID, **env)


def reconciled(d: DaemonProcess) -> dict[str, object]:
    """The last start-up reconcile record in the daemon's log."""
    records = [r for r in d.log_records() if r.get("msg") == "reconciled"]
    assert records, d.log.read_text()[-3000:]
    return records[-1]


def vm_pid(d: DaemonProcess, vm_id: str) -> int:
    return int(d.rpc("GetVmInfo", {"vmId": vm_id})["backendInfo"]["pid"])


def ip_of(d: DaemonProcess, vm_id: str) -> str:
    return str(d.rpc("GetVmInfo", {"vmId": vm_id})["networkInfo"]["ipAddress"])


@pytest.fixture
def daemon(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[DaemonProcess]:
    d = new_daemon(tmp_path, require_image)
    d.start()
    yield d
    d.kill_with_vmms()
    for pid, _ in vmm_processes_of(d.run_dir):  # never leave guests behind
        os.kill(pid, signal.SIGKILL)


def test_unit_file_keeps_vmms_when_metald_stops() -> None:
    unit = (ROOT / "deploy" / "metald.service").read_text()
    kill_modes = re.findall(r"^KillMode=(\S+)", unit, re.M)
    assert kill_modes == ["process"], kill_modes  # only metald gets the stop signal
    assert not re.search(r"^ExecStop(Post)?=", unit, re.M)  # nothing stops VMs on the way out


@pytest.mark.vm
def test_vmm_outlives_metald_and_is_adopted(daemon: DaemonProcess) -> None:
    vm = "rcv-outlive"
    before = snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir, vm, cgroup_prefix="rcv-")
    daemon.rpc("CreateVm", {"vmId": vm, "config": CONFIG})
    daemon.rpc("BootVm", {"vmId": vm})
    ip = ip_of(daemon, vm)
    wait_http(ip, vm)
    boot_id = guest_info(ip)["boot_id"]
    pid = vm_pid(daemon, vm)
    assert daemon.proc is not None
    metald = daemon.proc.pid

    # detached: its own session and process group, not metald's
    fields = stat_fields(pid)
    pgid, sid = int(fields[2]), int(fields[3])
    assert sid == pid and pgid == pid
    assert sid != os.getsid(metald) and pgid != os.getpgid(metald)

    # SIGKILL metald: the guest keeps running and answering
    daemon.kill()
    assert Path(f"/proc/{pid}").exists()
    assert guest_get(ip).strip() == vm
    ticks_down = ticks(daemon.console(vm))

    # restart: adopted (same pid, same boot), monitoring resumes
    started = time.monotonic()
    daemon.start()
    restart_s = time.monotonic() - started
    report = reconciled(daemon)
    assert report["adopted"] == 1 and report["marked_shutdown"] == 0, report
    assert daemon.state(vm) == "VM_STATE_RUNNING" and vm_pid(daemon, vm) == pid
    assert guest_info(ip)["boot_id"] == boot_id
    deadline = time.monotonic() + 10
    while ticks(daemon.console(vm)) <= ticks_down and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ticks(daemon.console(vm)) > ticks_down  # uptime continues
    assert restart_s < 15, restart_s

    # a VMM killed after adoption is noticed at once and recorded with a reason
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    daemon.wait_state(vm, "VM_STATE_SHUTDOWN", timeout=5)
    noticed = time.monotonic() - killed
    assert noticed < 2.5, noticed
    info = daemon.rpc("GetVmInfo", {"vmId": vm})
    assert info["backendInfo"]["last_exit_reason"], info
    # its resources stay for a later boot: same IP, namespace, jail
    assert info["networkInfo"]["ipAddress"] == ip
    assert f"fc-{vm}" in os.listdir("/run/netns")
    assert (daemon.jail_dir / "qemu" / vm).is_dir()

    daemon.rpc("BootVm", {"vmId": vm})
    wait_http(ip, vm)
    assert guest_info(ip)["boot_id"] != boot_id

    # a clean stop (SIGTERM) also leaves it running; the next start adopts it
    pid = vm_pid(daemon, vm)
    assert daemon.stop() == 0
    assert guest_get(ip).strip() == vm
    daemon.start()
    assert reconciled(daemon)["adopted"] == 1 and vm_pid(daemon, vm) == pid

    daemon.rpc("DeleteVm", {"vmId": vm, "force": True})
    after = snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir, vm, cgroup_prefix="rcv-")
    assert_no_leaks(before, after)


def _ifindex(ifname: str) -> int:
    out = subprocess.run(["ip", "-o", "link", "show", "dev", ifname], capture_output=True, text=True, check=True)
    return int(out.stdout.split(":", 1)[0])


def _netns_exec(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True)


@pytest.mark.vm
def test_restart_repairs_drift_and_removes_leftovers(daemon: DaemonProcess) -> None:
    """No guest boots here: a CREATED and a SHUTDOWN VM, damaged and littered around."""
    db = daemon.data_dir / "metald.db"
    keep, stopped = "rcv-keep", "rcv-stopped"
    for vm in (keep, stopped):
        daemon.rpc("CreateVm", {"vmId": vm, "config": CONFIG})
    daemon.rpc("BootVm", {"vmId": stopped})
    daemon.rpc("ShutdownVm", {"vmId": stopped, "force": True})
    good = snapshot(db, daemon.run_dir, daemon.jail_dir, "rcv-", cgroup_prefix="rcv-")
    net = daemon.rpc("GetVmInfo", {"vmId": keep})["networkInfo"]
    short = net["tapDevice"].removeprefix("tap_")
    daemon.kill()

    # drift: the VM's TAP, host veth and anti-spoofing element are gone
    _netns_exec(f"fc-{keep}", "ip", "link", "del", net["tapDevice"])
    subprocess.run(["ip", "link", "del", f"vh_{short}"], check=True)
    mac = names.ns_veth_mac(short)
    subprocess.run(["nft", "delete", "element", "bridge", "metald", "vm_mac", f'{{ "vh_{short}" . {mac} }}'],
                   check=True)
    damaged = good.diff(snapshot(db, daemon.run_dir, daemon.jail_dir, "rcv-", cgroup_prefix="rcv-"))
    assert set(damaged) == {"links", "nft"}, damaged

    # leftovers of no VM: namespace, link, jail + cgroup, run dir; a stray VMM process of a known VM
    ghost = "rcv-ghost"
    subprocess.run(["ip", "netns", "add", f"fc-{ghost}"], check=True)
    subprocess.run(["ip", "link", "add", "vh_0badf00d", "type", "veth", "peer", "name", "vx_0badf00d"], check=True)
    (daemon.jail_dir / "qemu" / ghost / "root" / "run").mkdir(parents=True)
    cgroups = [Path(f"/sys/fs/cgroup/{c}/{daemon.cgroup_parent}/{ghost}") for c in ("memory", "cpu", "pids")]
    for cg in cgroups:
        if cg.parent.is_dir():
            cg.mkdir()
    (daemon.run_dir / ghost).mkdir()
    (daemon.run_dir / ghost / "console.log").write_text("old")
    # (a live VMM of a VM with no record is an orphan and is never swept: tests/e2e/test_orphans.py)
    stray_of_known = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "-qmp", f"unix:{daemon.run_dir}/{stopped}/qmp.sock"],
        start_new_session=True)

    daemon.start()
    report = reconciled(daemon)
    assert report["leftovers_removed"] >= 5 and report["orphans"] == 0, report
    assert stray_of_known.wait(5) == -signal.SIGKILL
    assert not any(cg.exists() for cg in cgroups)
    after = snapshot(db, daemon.run_dir, daemon.jail_dir, "rcv-", cgroup_prefix="rcv-")
    assert_no_leaks(good, after)  # the TAP, veth and element are back; every leftover is gone

    # present parts are left alone: a second restart recreates nothing
    index = _ifindex(f"vh_{short}")
    daemon.kill()
    daemon.start()
    assert reconciled(daemon)["leftovers_removed"] == 0
    assert _ifindex(f"vh_{short}") == index
    assert_no_leaks(good, snapshot(db, daemon.run_dir, daemon.jail_dir, "rcv-", cgroup_prefix="rcv-"))
    for vm in (keep, stopped):
        daemon.rpc("DeleteVm", {"vmId": vm})


def _adopt_count() -> int:
    return int(os.environ.get("METALD_ADOPT_GUESTS", "3"))


@pytest.mark.vm
@pytest.mark.timeout(1800)
def test_restart_with_running_guests_adopts_all(daemon: DaemonProcess) -> None:
    """METALD_ADOPT_GUESTS guests (default 3) survive a SIGKILL of metald; all are adopted
    quickly, none is rebooted (same boot_id, ticks go on)."""
    n = _adopt_count()
    vms = [f"rcv-many-{i}" for i in range(n)]
    for vm in vms:
        daemon.rpc("CreateVm", {"vmId": vm, "config": CONFIG})
        daemon.rpc("BootVm", {"vmId": vm})
    ips = {vm: ip_of(daemon, vm) for vm in vms}
    booted = time.monotonic()
    for vm in vms:
        wait_http(ips[vm], vm, timeout=120 + 15 * n)
    boot_s = time.monotonic() - booted
    boot_ids = {vm: guest_info(ips[vm])["boot_id"] for vm in vms}
    pids = {vm: vm_pid(daemon, vm) for vm in vms}

    daemon.kill()
    tick_at_kill = {vm: ticks(daemon.console(vm)) for vm in vms}
    started = time.monotonic()
    daemon.start()
    ready_s = time.monotonic() - started
    report = reconciled(daemon)
    assert report["adopted"] == n and report["marked_shutdown"] == 0, report
    assert ready_s < 10, ready_s
    for vm in vms:
        assert vm_pid(daemon, vm) == pids[vm]
        assert guest_info(ips[vm])["boot_id"] == boot_ids[vm]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(ticks(daemon.console(vm)) <= tick_at_kill[vm] for vm in vms):
        time.sleep(0.3)
    assert all(ticks(daemon.console(vm)) > tick_at_kill[vm] for vm in vms)
    print(f"\nADOPT guests={n} boot_all_s={boot_s:.1f} restart_to_healthy_s={ready_s:.2f} "
          f"reconcile_s={report['seconds']}")
    for vm in vms:
        daemon.rpc("DeleteVm", {"vmId": vm, "force": True})
