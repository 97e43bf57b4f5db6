"""A fake VMM backend and network for unit tests of the engine and API logic.

The backend records calls and keeps VM states and jails in memory; it never
starts a process. It implements every contract of ``metald.core.ports.Backend``
(and, when built with ``identity_adoption=True``, the optional
``IdentityAdopter``), so the engine's unit tests run the same branches as with
a real backend. Real-VMM behaviour is covered by the QEMU end-to-end tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metald.core.errors import BackendError, FailedPrecondition, InvalidArgument
from metald.core.models import BootSpec, Drive, NetworkAllocation, VmMetrics
from metald.core.plan import FuncStep, Step
from metald.core.ports import BackendLimits, ExitCallback, IdentityAdopter, RunState, SavedSnapshot, Snapshotter


class FakeBackend:
    name = "fake"

    def __init__(self, identity_adoption: bool = False, snapshots: bool = True) -> None:
        self.calls: list[tuple[str, str]] = []
        self.running: dict[str, str] = {}  # vm_id -> "running" | "paused"
        self.fail: set[str] = set()  # operation names that raise BackendError
        self.adoptable: set[str] = set()
        self.callback: ExitCallback | None = None
        self.jails: set[str] = set()  # VMs with a jail (made at boot, kept while SHUTDOWN)
        self.discarded: list[str] = []
        self.identity_adoption = identity_adoption
        self.snapshots = FakeSnapshotter(self) if snapshots else None

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self.callback = callback

    def _call(self, op: str, vm_id: str) -> None:
        self.calls.append((op, vm_id))
        if op in self.fail:
            raise BackendError(f"fake {op} failure")

    async def ping(self) -> tuple[bool, str]:
        return True, "fake"

    def limits(self) -> BackendLimits:
        return BackendLimits(max_vcpus=32)

    async def validate(self, spec: BootSpec) -> None:
        if spec.vcpu_count > 32:
            raise InvalidArgument("config.cpu.vcpu_count", "fake limit")

    async def boot(self, spec: BootSpec) -> dict[str, Any]:
        self._call("boot", spec.vm_id)
        self.running[spec.vm_id] = "running"
        self.jails.add(spec.vm_id)
        return {"pid": 1, "fake": True}

    async def adopt(self, spec: BootSpec, handle: dict[str, Any]) -> bool:
        self.calls.append(("adopt", spec.vm_id))
        if spec.vm_id in self.adoptable:
            self.running.setdefault(spec.vm_id, "running")  # a VMM keeps its run state
            return True
        return False

    async def pause(self, vm_id: str) -> None:
        self._call("pause", vm_id)
        self.running[vm_id] = "paused"

    async def resume(self, vm_id: str) -> None:
        self._call("resume", vm_id)
        self.running[vm_id] = "running"

    async def shutdown(self, vm_id: str, force: bool, timeout_s: float) -> str:
        self._call("shutdown", vm_id)
        self.running.pop(vm_id, None)
        return "killed" if force else "guest poweroff"

    async def reboot(self, spec: BootSpec, force: bool) -> dict[str, Any]:
        self._call("reboot", spec.vm_id)
        return {"pid": 2, "fake": True}

    async def cleanup(self, vm_id: str) -> None:
        self._call("cleanup", vm_id)
        self.running.pop(vm_id, None)
        self.jails.discard(vm_id)

    def is_running(self, vm_id: str) -> bool:
        return vm_id in self.running

    async def info(self, vm_id: str) -> dict[str, str]:
        return {"backend": "fake", "status": self.running.get(vm_id, "stopped")}

    async def metrics(self, vm_id: str) -> VmMetrics:
        return VmMetrics(measured=True, cpu_usage_percent=1.5, memory_usage_bytes=4096, uptime_seconds=3)

    async def close(self) -> None:
        pass

    # --- VmmRecovery ---------------------------------------------------------
    async def vmm_status(self, vm_id: str) -> RunState:
        state = self.running.get(vm_id)
        if state is None:
            raise BackendError(f"no fake VMM for {vm_id}")
        return "paused" if state == "paused" else "running"

    async def discard(self, vm_id: str, kill_strays: bool = True) -> list[int]:
        self.discarded.append(vm_id)
        self.running.pop(vm_id, None)
        return []

    def adopt_error(self, vm_id: str) -> str | None:
        return None if vm_id in self.adoptable else "no VMM to adopt"

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        gone = sorted(self.jails - known_vm_ids)
        self.jails -= set(gone)
        return gone

    def run_dir_entries(self) -> frozenset[str]:
        return frozenset()

    # --- JailKeeper ----------------------------------------------------------
    @property
    def tap_owner(self) -> tuple[int, int] | None:
        return None

    def jail_exists(self, vm_id: str) -> bool:
        return vm_id in self.jails

    async def remove_jail(self, vm_id: str) -> None:
        self.jails.discard(vm_id)

    async def restore_jail(self, spec: BootSpec) -> None:
        self.jails.add(spec.vm_id)

    # --- IdentityAdopter (when built with identity_adoption=True) -------------
    def identity_adopter(self) -> IdentityAdopter | None:
        return self if self.identity_adoption else None

    def warmer(self) -> None:
        return None

    def snapshotter(self) -> Snapshotter | None:
        return self.snapshots

    async def adopt_many(self, items: list[tuple[BootSpec, dict[str, Any]]]) -> set[str]:
        self.calls.append(("adopt_many", ",".join(spec.vm_id for spec, _ in items)))
        adopted = {spec.vm_id for spec, _ in items if spec.vm_id in self.adoptable}
        for vm_id in adopted:
            self.running.setdefault(vm_id, "running")
        return adopted

    async def attach(self, vm_id: str) -> bool:
        self.calls.append(("attach", vm_id))
        return vm_id in self.running

    def crash(self, vm_id: str, reason: str = "killed by signal SIGKILL") -> None:
        """Simulate a VMM dying on its own."""
        self.running.pop(vm_id, None)
        assert self.callback is not None
        self.callback(vm_id, reason)


class FakeNetwork:
    """In-memory stand-in for metald.network for API logic tests (no root).

    Addresses come from a counter; the real IPAM, devices and rules are tested
    in tests/integration and tests/e2e.
    """

    def __init__(self) -> None:
        from metald.core.models import NetworkAllocation, PortForward

        self._alloc_type = NetworkAllocation
        self._pf = PortForward
        self.allocs: dict[str, NetworkAllocation] = {}
        self.next = 2

    async def setup_host(self) -> None:
        pass

    async def teardown_host(self) -> None:
        pass

    async def allocate(self, vm_id: str, nic: Any) -> Any:
        if vm_id in self.allocs:
            return self.allocs[vm_id]
        ip = (nic.ipv4 if nic and nic.ipv4 else None) or f"10.100.0.{self.next}"
        self.next += 1
        forwards = ()
        for key, value in (nic.options if nic else ()):
            if key == "port_forwards":
                forwards = tuple(
                    self._pf(int(p.split("/")[0]), 40000 + i, "tcp")
                    for i, p in enumerate(value.split(","))
                )
        alloc = self._alloc_type(
            short_id="abcd1234", namespace=f"fc-{vm_id}", host_veth="vh_abcd1234",
            ns_veth="vn_abcd1234", tap="tap_abcd1234", ip=ip, prefix_len=16, gateway="10.100.0.1",
            mac="02:00:00:00:00:01", port_forwards=forwards,
        )
        self.allocs[vm_id] = alloc
        return alloc

    async def release(self, vm_id: str) -> None:
        self.allocs.pop(vm_id, None)

    def setup_steps(
        self, alloc: NetworkAllocation, owner_uid: int | None = None, owner_gid: int | None = None
    ) -> list[Step]:
        return []

    def reapply_steps(
        self, alloc: NetworkAllocation, owner_uid: int | None = None, owner_gid: int | None = None
    ) -> list[Step]:
        return []

    def release_step(self, vm_id: str) -> Step:
        held: dict[str, NetworkAllocation] = {}

        async def release() -> None:
            if vm_id in self.allocs:
                held["alloc"] = self.allocs.pop(vm_id)

        async def reclaim() -> None:
            if "alloc" in held:
                self.allocs[vm_id] = held["alloc"]

        return FuncStep("release", release, reclaim)

    async def teardown(self, alloc: NetworkAllocation) -> None:
        pass

    async def settle(self, timeout: float = 10.0) -> bool:
        return True

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        return []

    async def check(self) -> tuple[bool, str]:
        return True, "fake"

    def kernel_ip_arg(self, alloc: Any) -> str:
        return f"ip={alloc.ip}::{alloc.gateway}:255.255.0.0::eth0:off"

    async def tap_counters(self, alloc: Any) -> tuple[int, int, int, int]:
        return (10, 20, 1, 2)

    def allocation_to_dict(self, alloc: Any) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(alloc)

    def allocation_from_dict(self, data: dict[str, Any]) -> Any:
        forwards = tuple(self._pf(**p) for p in data.get("port_forwards", ()))
        dns = tuple(data["dns_servers"])
        return self._alloc_type(**{**data, "port_forwards": forwards, "dns_servers": dns})


class FakeSnapshotter:
    """Snapshots as small files: a manifest naming the source's vCPUs, memory and
    drives. ``backend.fail`` may name "save", "restore", "clone_drives"."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    async def save(self, spec: BootSpec, directory: Path, stop: bool) -> SavedSnapshot:
        if self.backend.running.get(spec.vm_id) not in ("running", "paused"):
            raise FailedPrecondition(f"the guest of {spec.vm_id} is not running or paused")
        directory.mkdir()
        try:
            self.backend._call("save", spec.vm_id)
        except BaseException:
            directory.rmdir()
            raise
        manifest = {"vcpu_count": spec.vcpu_count, "memory_bytes": spec.memory_bytes,
                    "drives": [d.drive_id for d in spec.drives]}  # fmt: skip
        (directory / "snapshot.json").write_text(json.dumps(manifest))
        if stop:
            self.backend.running.pop(spec.vm_id, None)
        return SavedSnapshot(manifest, 10, 20, 0.0)

    def check_restorable(self, directory: Path, spec: BootSpec) -> None:
        manifest = json.loads((directory / "snapshot.json").read_text())
        if spec.vcpu_count != manifest["vcpu_count"]:
            raise InvalidArgument("config.cpu.vcpu_count", "differs from the snapshot")

    def clone_drives(self, directory: Path, dest: Path) -> tuple[Drive, ...]:
        self.backend._call("clone_drives", dest.name)
        manifest = json.loads((directory / "snapshot.json").read_text())
        dest.mkdir(parents=True, exist_ok=True)
        drives = []
        for drive_id in manifest["drives"]:
            (dest / f"{drive_id}.qcow2").write_bytes(b"overlay")
            drives.append(Drive(drive_id, dest / f"{drive_id}.qcow2", False, drive_id == "rootfs"))
        return tuple(drives)

    async def restore(self, spec: BootSpec, directory: Path, *, clone: bool) -> dict[str, Any]:
        self.check_restorable(directory, spec)
        self.backend._call("restore_clone" if clone else "restore", spec.vm_id)
        self.backend.running[spec.vm_id] = "running"
        self.backend.jails.add(spec.vm_id)
        return {"pid": 1, "fake": True, "restored": True}

    async def boot_clone(self, spec: BootSpec) -> dict[str, Any]:
        self.backend._call("boot_clone", spec.vm_id)
        return await self.backend.boot(spec)
