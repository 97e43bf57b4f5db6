"""Real VMs for the snapshot tests and benchmark: QEMU under the jailer, each VM
in its own network namespace, without the engine (the operations that will
drive snapshots are not wired yet). Needs root inside tests/isolated.sh."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from metald.backends.qemu import QemuBackend
from metald.backends.qemu.snapshot import GuestIdentity, QemuSnapshots, clone_drives
from metald.config import Settings
from metald.core.models import BootSpec, Drive, NetworkAllocation, VmDraft
from metald.core.plan import Plan
from metald.core.specs import boot_spec
from metald.jailer import Jailer
from metald.jailer import cgroup as cg
from metald.network.manager import NetworkManager
from metald.store.sqlite import Store

JAIL_UID, JAIL_GID = 61000, 61000


@dataclass
class Vm:
    spec: BootSpec
    alloc: NetworkAllocation

    @property
    def ip(self) -> str:
        return self.alloc.ip


class Kit:
    """Settings, store, jailer, network and QEMU backend in one temporary directory."""

    def __init__(self, base: Path, image: Path) -> None:
        self.base = base
        self.image = image
        parent = f"metald-snaptest-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
        self.settings = Settings(  # type: ignore[call-arg]
            data_dir=base / "data",
            run_dir=base / "run",
            image_dir=image,
            jailer_chroot_dir=base / "jails",
            jailer_uid=JAIL_UID,
            jailer_gid=JAIL_GID,
            jailer_cgroup_parent=parent,
            qemu_accel="tcg",
        )
        self.store = Store(self.settings.db_path)
        self.jailer = Jailer(self.settings)
        self.jailer.check_settings()
        self.network = NetworkManager(self.settings, self.store)
        self.backend = QemuBackend(self.settings, self.jailer)
        self.snapshots = QemuSnapshots(self.backend)
        self.vms: dict[str, Vm] = {}

    async def start(self) -> None:
        await self.network.setup_host()

    def draft(self, memory: int = 128 << 20) -> VmDraft:
        base = (self.image / "cmdline").read_text().strip()
        drives = (Drive("rootfs", self.image / "rootfs.ext4", read_only=True, is_root=True),)
        return VmDraft(1, memory, self.image / "vmlinuz", self.image / "initramfs.cpio.gz", base, drives, None)

    async def make_vm(self, vm_id: str, draft: VmDraft, drives: tuple[Drive, ...] | None = None) -> Vm:
        """Network (namespace, TAP, rules) and a BootSpec; ``drives`` replaces the draft's."""
        alloc = await self.network.allocate(vm_id, None)
        await Plan("net", self.network.setup_steps(alloc, JAIL_UID, JAIL_GID)).run()
        if drives is not None:
            draft = replace(draft, drives=drives)
        spec = boot_spec(vm_id, draft, alloc, self.network.kernel_ip_arg(alloc), self.settings.run_dir)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        vm = Vm(spec, alloc)
        self.vms[vm_id] = vm
        return vm

    async def cold_boot(self, vm: Vm) -> None:
        await self.backend.boot(vm.spec)

    async def clone(self, directory: Path, vm_id: str, draft: VmDraft) -> tuple[Vm, float]:
        """A new VM restored from the snapshot in ``directory``; (vm, seconds to restore)."""
        from metald.backends.qemu.snapshot import read_manifest

        started = time.monotonic()
        manifest = read_manifest(directory)
        drives, qcow2 = clone_drives(directory, manifest, self.settings.data_dir / "disks" / vm_id)
        vm = await self.make_vm(vm_id, draft, drives)
        await self.snapshots.restore(vm.spec, directory, identity=GuestIdentity.for_clone(vm_id, vm.alloc), qcow2=qcow2)
        return vm, time.monotonic() - started

    async def remove(self, vm_id: str) -> None:
        vm = self.vms.pop(vm_id, None)
        await self.backend.cleanup(vm_id)
        if vm is not None:
            await self.network.teardown(vm.alloc)
            await self.network.release(vm_id)
        shutil.rmtree(self.settings.data_dir / "disks" / vm_id, ignore_errors=True)

    async def close(self) -> None:
        for vm_id in list(self.vms):
            with contextlib.suppress(Exception):
                await self.remove(vm_id)
        await self.snapshots.close()
        await self.backend.close()
        await self.network.settle(10)
        with contextlib.suppress(Exception):
            await self.network.teardown_host()
        fs = self.jailer.cgroup_fs
        for vm_id in cg.vm_ids(fs):
            cg.remove(fs.paths_for(vm_id))
        for parent in fs.parents():
            with contextlib.suppress(OSError):
                parent.rmdir()
        self.store.close()


def http_get(ip: str, path: str = "/", timeout: float = 2.0) -> str | None:
    try:
        return httpx.get(f"http://{ip}:8080{path}", timeout=timeout).text.strip()
    except httpx.HTTPError:
        return None


async def wait_http(ip: str, path: str = "/", timeout: float = 120.0, expect: str | None = None) -> float:
    """Poll the guest's HTTP server until it answers (with ``expect``); seconds waited."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            try:
                text = (await client.get(f"http://{ip}:8080{path}")).text.strip()
                if expect is None or text == expect:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{ip}:8080{path} did not answer {expect!r} within {timeout:g}s")
            await asyncio.sleep(0.005)
