"""How a QEMU is started: in a jail (production) or plainly (development).

The launcher is the jail's strategy, as for Firecracker (``backends/firecracker/launch.py``).
:class:`JailedLauncher` builds the VM's jail (plan ``jail``: chroot, assets,
devices, cgroup; run inside the boot plan's ``vmm`` step, so its steps are
``boot.vmm.jail.*``) and wraps QEMU's argv in metald's jail launcher (see
``jailer/qemu.py``); :class:`PlainLauncher` runs QEMU as root under its own
seccomp sandbox. The backend asks the launcher for the command and for
everything about the jail (does it exist, remove it, make it again, sweep
those of unknown VMs, put an adopted VMM back into its cgroup).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from metald.backends.qemu.command import launch_argv
from metald.backends.qemu.handle import VmmHandle
from metald.core.errors import BackendError
from metald.core.models import BootSpec
from metald.core.plan import Plan
from metald.jailer import cgroup as cgroups
from metald.jailer.jailer import Jailer
from metald.jailer.layout import VM_ID_RE
from metald.jailer.qemu import qemu_confinement_args, qemu_launch_argv

log = logging.getLogger(__name__)

VMM_NAME = "qemu"
# Under TCG, QEMU's translation cache and buffers need memory beyond the guest's
# and the configured VMM allowance; the jail's memory limit includes this.
TCG_MEMORY_OVERHEAD = 256 << 20


class QemuLauncher(Protocol):
    name: str
    sandbox: bool  # QEMU's own -sandbox in its argv (the jail adds its own)

    async def command(self, spec: BootSpec, argv: list[str], accel: str) -> tuple[list[str], list[str]]:
        """(QEMU's argv as /proc will show it, the command to spawn)."""
        ...

    def has_jail(self, vm_id: str) -> bool: ...

    def runas(self) -> tuple[int, int] | None:
        """uid/gid the jailed QEMU runs as (helpers it starts run so too); None: root."""
        ...

    async def remove_jail(self, vm_id: str) -> None: ...

    async def restore_jail(self, spec: BootSpec, accel: str) -> None: ...

    async def sweep(self, known_vm_ids: set[str]) -> list[str]:
        """Remove the jails of VMs metald does not know; return "jail <id>" items."""
        ...

    def cgroup_dirs(self, vm_id: str) -> tuple[Path, ...]:
        """The VM's cgroup directories (none without a jail)."""
        ...

    async def reapply_cgroup(self, spec: BootSpec, vmm: VmmHandle) -> None: ...


class PlainLauncher:
    """No jail: QEMU runs as root with its own seccomp sandbox. Development only."""

    name = "plain"
    sandbox = True

    def __init__(self) -> None:
        log.warning("QEMU VMMs run UNJAILED (UNKEY_METALD_JAILER_ENABLED=false): development only")

    async def command(self, spec: BootSpec, argv: list[str], accel: str) -> tuple[list[str], list[str]]:
        return argv, launch_argv(spec, argv)

    def has_jail(self, vm_id: str) -> bool:
        return False

    def runas(self) -> tuple[int, int] | None:
        return None

    async def remove_jail(self, vm_id: str) -> None:
        return None

    async def restore_jail(self, spec: BootSpec, accel: str) -> None:
        return None

    async def sweep(self, known_vm_ids: set[str]) -> list[str]:
        return []

    def cgroup_dirs(self, vm_id: str) -> tuple[Path, ...]:
        return ()

    async def reapply_cgroup(self, spec: BootSpec, vmm: VmmHandle) -> None:
        return None


class JailedLauncher:
    """metald's jail: chroot, cgroup, namespaces; QEMU chroots and drops root itself."""

    name = "metald-jailer"
    sandbox = False

    def __init__(self, jailer: Jailer, chroot_dir: Path) -> None:
        self.jailer = jailer
        self.base = chroot_dir / VMM_NAME

    async def command(self, spec: BootSpec, argv: list[str], accel: str) -> tuple[list[str], list[str]]:
        jail = self.jailer.jail_for(VMM_NAME, spec.vm_id)
        # A VM keeps its (empty) jail while SHUTDOWN and across reboots: reuse it
        # as it is, so a failed boot leaves it exactly as it was. Anything else
        # (half made, or with processes left in its cgroup) is made afresh.
        if not await asyncio.to_thread(_jail_ready, jail.root, jail.cgroup.dirs):
            try:
                await self.jailer.cleanup(jail)
            except OSError as exc:  # e.g. a process that is not this VM's VMM in its cgroup
                raise BackendError(f"cannot prepare the jail of {spec.vm_id}: {exc}") from exc
            await self._prepare(spec, accel)
        argv = [*argv, *qemu_confinement_args(jail)]
        netns = spec.network.namespace if spec.network is not None else None
        command = qemu_launch_argv(self.jailer, jail, argv, netns)
        return command[command.index("--") + 1 :], command

    async def _prepare(self, spec: BootSpec, accel: str) -> None:
        """Build the VM's jail (plan ``jail``: chroot, assets, devices, cgroup)."""
        jail = self.jailer.jail_for(VMM_NAME, spec.vm_id)
        try:
            await Plan("jail", self.jailer.prepare_steps(jail, sized(spec, accel))).run()
        except Exception as exc:
            raise BackendError(f"cannot prepare the jail of {spec.vm_id}: {exc}") from exc

    def runas(self) -> tuple[int, int] | None:
        return self.jailer.settings.jailer_uid, self.jailer.settings.jailer_gid

    def has_jail(self, vm_id: str) -> bool:
        return self.jailer.jail_for(VMM_NAME, vm_id).dir.exists()

    async def remove_jail(self, vm_id: str) -> None:
        """Cgroup (killing what is left in it), then chroot."""
        await self.jailer.cleanup(self.jailer.jail_for(VMM_NAME, vm_id))

    async def restore_jail(self, spec: BootSpec, accel: str) -> None:
        await self._prepare(spec, accel)

    async def sweep(self, known_vm_ids: set[str]) -> list[str]:
        """Only jails under this metald's chroot directory are looked at (a cgroup
        of ours always has its jail directory: it is made after it and removed
        before it), so two metalds with different directories never remove each
        other's."""
        try:
            names = sorted(e.name for e in os.scandir(self.base) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            names = []
        removed = []
        for vm_id in names:
            if vm_id in known_vm_ids or not VM_ID_RE.match(vm_id):
                continue
            try:
                await self.remove_jail(vm_id)
            except OSError as exc:  # e.g. a process in its cgroup that is not its VMM: left alone
                log.warning("could not remove leftover jail of %s: %s", vm_id, exc)
                continue
            removed.append(f"jail {vm_id}")
        return removed

    def cgroup_dirs(self, vm_id: str) -> tuple[Path, ...]:
        return tuple(self.jailer.jail_for(VMM_NAME, vm_id).cgroup.dirs)

    async def reapply_cgroup(self, spec: BootSpec, vmm: VmmHandle) -> None:
        """Put an adopted VMM back into its jail's cgroup if it is not there
        (e.g. the cgroup was removed by hand): the limits hold again."""
        jail = self.jailer.jail_for(VMM_NAME, spec.vm_id)
        dirs = jail.cgroup.dirs
        if all(vmm.pid in cgroups.procs(d) for d in dirs):
            return
        limits = self.jailer.limits_for(sized(spec, vmm.accel))
        await asyncio.to_thread(cgroups.create, jail.cgroup, limits)
        for directory in dirs:
            with contextlib.suppress(OSError), open(directory / "cgroup.procs", "w") as f:
                f.write(str(vmm.pid))
        log.warning("qemu %s: adopted pid %d put back into its cgroup", spec.vm_id, vmm.pid)


def sized(spec: BootSpec, accel: str) -> BootSpec:
    """The spec the jail's limits are computed from (TCG needs memory of its own)."""
    if accel != "tcg":
        return spec
    return replace(spec, memory_bytes=spec.memory_bytes + TCG_MEMORY_OVERHEAD)


def _jail_ready(root: Path, cgroup_dirs: tuple[Path, ...]) -> bool:
    """A complete QEMU jail (its tree and cgroups) with no process in it."""
    tree = (root / "dev" / "net", root / "run")
    if not all(path.is_dir() for path in tree):
        return False
    return all(d.is_dir() for d in cgroup_dirs) and not any(cgroups.procs(d) for d in cgroup_dirs)
