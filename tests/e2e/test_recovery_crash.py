"""Crash rounds: metald is SIGKILLed in the middle of a burst of operations, again and again.

Each round starts a burst of mixed operations (create, boot, pause, resume,
shutdown, reboot, delete) on a few real VMs at once, kills metald at a random
moment (a random delay, or a random ``die:before|after:<step>`` point taken
from the steps traced in earlier rounds), and restarts it. Then:

* no intent is left, and the leak audit finds nothing that belongs to no VM
  in the store (namespaces, links, nft elements, run files, jails, cgroups,
  VMM processes), and nothing missing for one (namespace, host veth, jail);
* every VM the store says RUNNING answers HTTP on its IP with its id, every
  PAUSED one is paused (QMP status, no console ticks), SHUTDOWN and CREATED
  ones have no VMM process.

Knobs: METALD_CRASH_ROUNDS (default 5), METALD_CRASH_VMS (default 3),
METALD_CRASH_SEED (default: random, printed).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.audit import Snapshot, assert_no_leaks, intents, orphans, snapshot, stored_vms, vmm_processes_of
from tests.support.daemon import DaemonProcess, RpcError

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

ROUNDS = int(os.environ.get("METALD_CRASH_ROUNDS", "5"))
VMS = int(os.environ.get("METALD_CRASH_VMS", "3"))
SEED = int(os.environ.get("METALD_CRASH_SEED", str(random.randrange(1 << 30))))
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
PREFIX = "crash-"
STATES = {1: "CREATED", 2: "RUNNING", 3: "PAUSED", 4: "SHUTDOWN"}
SETTLE_S = 120  # a freshly booted guest answers within this (TCG, shared cores)


def ticks(console: str) -> int:
    lines = [line for line in console.splitlines() if line.startswith("METALD_TICK ")]
    return int(lines[-1].split()[1]) if lines else -1


class Rounds:
    def __init__(self, tmp: Path, image: Path) -> None:
        self.faults = tmp / "faults"
        self.trace = tmp / "trace"
        self.d = DaemonProcess(
            tmp, image, UNKEY_METALD_JAILER_UID="61000", UNKEY_METALD_JAILER_GID="61000",
            METALD_FAULTS_FILE=str(self.faults), METALD_FAULTS_TRACE=str(self.trace),
        )
        self.db = self.d.data_dir / "metald.db"
        self.rng = random.Random(SEED)
        self.vms = [f"{PREFIX}{i}" for i in range(VMS)]
        self.log: list[str] = []

    def audit(self) -> Snapshot:
        return snapshot(self.db, self.d.run_dir, self.d.jail_dir, str(self.d.tmp), cgroup_prefix=PREFIX)

    # --- the burst ---------------------------------------------------------------
    def _call(self, method: str, body: dict[str, object]) -> None:
        try:
            self.d.rpc(method, body)
        except (RpcError, httpx.HTTPError, ValueError):
            pass  # refused (wrong state) or cut off by the kill: both are part of the game

    def _ops(self, vm: str, state: int | None) -> list[tuple[str, dict[str, object]]]:
        """1-3 operations that make sense from ``state`` (later ones may be refused)."""
        r = self.rng
        choices: dict[int | None, list[tuple[str, dict[str, object]]]] = {
            None: [("CreateVm", {"vmId": vm, "config": CONFIG})],
            1: [("BootVm", {"vmId": vm}), ("BootVm", {"vmId": vm}), ("DeleteVm", {"vmId": vm})],
            2: [("PauseVm", {"vmId": vm}), ("RebootVm", {"vmId": vm, "force": True}),
                ("RebootVm", {"vmId": vm, "force": False}),
                ("ShutdownVm", {"vmId": vm, "force": True}), ("ShutdownVm", {"vmId": vm, "timeoutSeconds": 3}),
                ("DeleteVm", {"vmId": vm, "force": True})],
            3: [("ResumeVm", {"vmId": vm}), ("ShutdownVm", {"vmId": vm, "force": True}),
                ("DeleteVm", {"vmId": vm, "force": True})],
            4: [("BootVm", {"vmId": vm}), ("BootVm", {"vmId": vm}), ("DeleteVm", {"vmId": vm})],
        }
        ops = [r.choice(choices[state])]
        follow = {"CreateVm": 1, "BootVm": 2, "ResumeVm": 2, "PauseVm": 3, "ShutdownVm": 4, "RebootVm": 2}
        for _ in range(r.randrange(0, 3)):
            nxt = follow.get(ops[-1][0])
            if nxt is None:
                break
            ops.append(r.choice(choices[nxt]))
        return ops

    def plan_burst(self) -> dict[str, list[tuple[str, dict[str, object]]]]:
        states = {vm: row.state for vm, row in stored_vms(self.db).items()}
        burst = {vm: self._ops(vm, states.get(vm)) for vm in self.vms}
        for vm, ops in burst.items():
            self.log.append(f"  {vm} {STATES.get(states.get(vm, 0), 'absent')}: " + ", ".join(m for m, _ in ops))
        return burst

    def start_burst(self, burst: dict[str, list[tuple[str, dict[str, object]]]]) -> list[threading.Thread]:
        threads = []
        for ops in burst.values():

            def run(ops: list[tuple[str, dict[str, object]]] = ops) -> None:
                for method, body in ops:
                    self._call(method, body)

            threads.append(threading.Thread(target=run, daemon=True))
        for t in threads:
            t.start()
        return threads

    def die_points(self, burst: dict[str, list[tuple[str, dict[str, object]]]]) -> list[str]:
        """Steps traced so far (taken from the code as it ran) of operations in this burst."""
        seen = set(self.trace.read_text().split()) if self.trace.exists() else set()
        ops = {m.removesuffix("Vm").lower() for calls in burst.values() for m, _ in calls}
        return sorted(s for s in seen if s.split(".", 1)[0] in ops and ".undo" not in s)

    def crash_round(self, n: int) -> None:
        assert self.d.proc is not None
        burst = self.plan_burst()
        points = self.die_points(burst)
        if points and self.rng.random() < 0.5:
            point = f"die:{self.rng.choice(['before', 'after'])}:{self.rng.choice(points)}"
            self.faults.write_text(point + "\n")
            self.log.insert(len(self.log) - len(burst), f"round {n}: {point}")
            threads = self.start_burst(burst)
            deadline = time.monotonic() + 30
            while any(t.is_alive() for t in threads) and self.d.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            hit = self.d.proc.poll() is not None
            self.log.append(f"  {'died there' if hit else 'point not reached: SIGKILL'}")
        else:
            delay = self.rng.uniform(0, 1.5)
            self.log.insert(len(self.log) - len(burst), f"round {n}: SIGKILL after {delay:.2f}s")
            threads = self.start_burst(burst)
            time.sleep(delay)
        self.d.kill()
        self.faults.write_text("")
        for t in threads:
            t.join(30)
        running = vmm_processes_of(self.d.run_dir)
        if running and self.rng.random() < 0.25:  # a VMM also dies while metald is down
            pid, vm = self.rng.choice(running)
            os.kill(pid, signal.SIGKILL)
            self.log.append(f"  killed the VMM of {vm} while metald was down")
        started = time.monotonic()
        self.d.start()
        self.log.append(f"  restart {time.monotonic() - started:.2f}s; "
                        + " ".join(f"{k}={v}" for k, v in self._reconciled().items()))

    def _reconciled(self) -> dict[str, object]:
        records = [r for r in self.d.log_records() if r.get("msg") == "reconciled"]
        keys = ("adopted", "marked_shutdown", "rolled_back", "completed", "leftovers_removed", "seconds")
        return {k: records[-1].get(k) for k in keys} if records else {}

    # --- the checks ----------------------------------------------------------------
    def problems(self, base: Snapshot) -> list[str]:
        found = [f"intent {i}" for i in intents(self.db)]
        found += orphans(self.audit(), self.db, self.d.run_dir, self.d.jail_dir, PREFIX, base)
        netns = set(os.listdir("/run/netns"))
        for vm_id, vm in stored_vms(self.db).items():
            info = self.d.rpc("GetVmInfo", {"vmId": vm_id})
            if info["state"] != f"VM_STATE_{STATES[vm.state]}":
                found.append(f"{vm_id}: API says {info['state']}, store {vm.state}")
            if f"fc-{vm_id}" not in netns:
                found.append(f"{vm_id}: namespace missing")
            if vm.state in (2, 3):
                if not (self.d.jail_dir / "qemu" / vm_id).is_dir():
                    found.append(f"{vm_id}: jail missing")
                status = info["backendInfo"].get("status")
                wanted = "running" if vm.state == 2 else "paused"
                if status != wanted:
                    found.append(f"{vm_id}: recorded {STATES[vm.state]} but QMP says {status}")
                elif vm.state == 2:
                    ip = info["networkInfo"]["ipAddress"]
                    try:
                        answer = httpx.get(f"http://{ip}:8080/", timeout=2).text.strip()
                    except httpx.HTTPError as exc:
                        answer = f"no answer ({type(exc).__name__})"
                    if answer != vm_id:
                        found.append(f"{vm_id}: RUNNING but HTTP on {ip}: {answer[:60]}")
        return found

    def paused_ones_are_paused(self) -> list[str]:
        paused = [vm for vm, row in stored_vms(self.db).items() if row.state == 3]
        if not paused:
            return []
        before = {vm: ticks(self.d.console(vm)) for vm in paused}
        time.sleep(1.5)
        return [f"{vm}: PAUSED but still ticking" for vm in paused if ticks(self.d.console(vm)) != before[vm]]

    def settle(self, base: Snapshot) -> None:
        """All checks pass (guests that were just booted get time to come up)."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            found = self.problems(base)
            if not found:
                break
            if time.monotonic() > deadline:
                raise AssertionError("after the crash: " + "; ".join(found) + "\n" + "\n".join(self.log[-12:]))
            time.sleep(1)
        found = self.paused_ones_are_paused()
        assert not found, found


@pytest.fixture
def rounds(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[Rounds]:
    r = Rounds(tmp_path, require_image)
    r.d.start()
    yield r
    r.d.kill_with_vmms()
    print("\n".join(r.log))


@pytest.mark.timeout(max(600, ROUNDS * 240))
def test_crash_rounds(rounds: Rounds) -> None:
    r = rounds
    base = r.audit()
    started = time.monotonic()
    for n in range(1, ROUNDS + 1):
        r.crash_round(n)
        r.settle(base)
        states = {vm: STATES[row.state] for vm, row in stored_vms(r.db).items()}
        r.log.append(f"  ok: {states}")
    elapsed = time.monotonic() - started
    r.log.append(f"CRASH ROUNDS={ROUNDS} vms={VMS} seed={SEED} seconds={elapsed:.0f}")
    for vm in stored_vms(r.db):
        r.d.rpc("DeleteVm", {"vmId": vm, "force": True})
    assert_no_leaks(base, r.audit())
