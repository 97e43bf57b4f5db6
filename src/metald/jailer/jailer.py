"""The integrated jailer: one object the backends ask for jails, steps and argv.

Life of a jail::

    jail = jailer.jail_for("firecracker", vm_id)          # pure: paths and ids
    await Plan("jail", jailer.prepare_steps(jail, spec)).run()
    argv = jailer.launch_argv(jail, vmm_argv, netns, chroot=True, new_pid_ns=False)
    ...                                                  # metald spawns argv as root
    await jailer.cleanup(jail)                           # after the VMM is gone

``prepare_steps`` returns undoable steps named ``chroot``, ``assets``,
``devices`` and ``cgroup`` (fault points ``<plan>.<step>``). Each step that
fails half-way removes what it made before raising, and the plan undoes the
finished ones, so a failed prepare leaves no chroot, device node or cgroup.
For QEMU, which opens kernel, initrd, drives, /dev/kvm and the TAP by host
path before its own ``-chroot``, ``assets`` and ``devices`` do nothing (the
steps stay, so fault points are the same for every VMM): its root holds only
``dev/`` and ``run/``.

For QEMU see ``metald.jailer.qemu``: it is launched without ``--chroot`` and
without dropping privileges, and confines itself with ``-chroot``/``-runas``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from metald.config import Settings
from metald.core.errors import BackendError
from metald.core.models import BootSpec
from metald.core.plan import FuncStep, Step
from metald.jailer import assets, cgroup, chroot, devices, layout, ownership
from metald.jailer.checks import check_settings
from metald.jailer.layout import Jail
from metald.jailer.resource_limits import Limits, limits_for

log = logging.getLogger(__name__)


def _in_thread(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await asyncio.to_thread(fn)

    return run


class Jailer:
    def __init__(self, settings: Settings, *, cgroup_fs: cgroup.CgroupFs | None = None) -> None:
        self.settings = settings
        self._fs = cgroup_fs

    @property
    def cgroup_fs(self) -> cgroup.CgroupFs:
        """The cgroup hierarchy in use (detected on first use)."""
        if self._fs is None:
            detected = cgroup.detect()
            self._fs = dataclasses.replace(detected, parent=self.settings.jailer_cgroup_parent)
        return self._fs

    def check_settings(self) -> None:
        """Raise JailerConfigError for settings or a host the jailer cannot work with."""
        found = check_settings(self.settings, self._fs)
        if found is not None and self._fs is None:
            # the detected hierarchy, under this daemon's own parent (never the default's);
            # a hierarchy given to the constructor (or detected already) is kept as it is
            self._fs = dataclasses.replace(found, parent=self.settings.jailer_cgroup_parent)

    def jail_for(self, vmm_name: str, vm_id: str) -> Jail:
        layout.check_vmm_name(vmm_name)
        layout.check_vm_id(vm_id)
        directory = layout.jail_dir(self.settings.jailer_chroot_dir, vmm_name, vm_id)
        return Jail(
            vm_id=vm_id,
            vmm_name=vmm_name,
            root=directory / "root",
            uid=self.settings.jailer_uid,
            gid=self.settings.jailer_gid,
            cgroup=self.cgroup_fs.paths_for(vm_id),
        )

    def limits_for(self, spec: BootSpec) -> Limits:
        return limits_for(self.settings, spec)

    def path_in_jail(self, jail: Jail, host_path: Path) -> str:
        """Where the VMM sees a host asset inside its chroot, e.g. ``/vmlinuz``."""
        return layout.path_in_jail(host_path)

    def prepare_steps(self, jail: Jail, spec: BootSpec) -> list[Step]:
        """Undoable steps building the jail; bad input is rejected before any step."""
        limits = self.limits_for(spec)
        wanted = assets.assets_of(spec)
        if jail.vmm_name in layout.SELF_CONFINING:
            wanted = []  # QEMU opens its files by host path before its own -chroot
        inside = jail.vmm_name not in layout.SELF_CONFINING
        owned = self.owned_by(jail.vm_id)

        def place_all() -> None:
            try:
                for asset in wanted:
                    assets.place(jail, asset)
            except BaseException:
                remove_all()
                raise

        def remove_all() -> None:
            for asset in wanted:
                assets.remove(jail, asset)

        def make_devices() -> None:
            if not inside:
                return
            try:
                devices.make_devices(jail)
            except BaseException:
                devices.remove_devices(jail)
                raise

        def make_cgroup() -> None:
            try:
                cgroup.create(jail.cgroup, limits)
            except BaseException:
                cgroup.remove(jail.cgroup, 5.0, self.owned_by(jail.vm_id))
                raise

        return [
            FuncStep(
                "chroot",
                _in_thread(lambda: chroot.make_tree(jail)),
                _in_thread(lambda: chroot.remove_tree(jail.dir)),
            ),
            FuncStep("assets", _in_thread(place_all), _in_thread(remove_all)),
            FuncStep("devices", _in_thread(make_devices), _in_thread(lambda: devices.remove_devices(jail))),
            FuncStep("cgroup", _in_thread(make_cgroup), _in_thread(lambda: cgroup.remove(jail.cgroup, 5.0, owned))),
        ]

    def launch_argv(
        self,
        jail: Jail,
        argv: list[str],
        netns: str | None,
        chroot: bool,
        new_pid_ns: bool,
        *,
        drop_privileges: bool = True,
    ) -> list[str]:
        """The command metald (root) runs to exec ``argv`` jailed.

        ``drop_privileges=False`` keeps root (QEMU drops it itself with
        ``-runas``); it cannot be combined with ``chroot``. The interpreter runs
        with ``-I`` so no PYTHON* variable or the working directory can inject
        code into this root process.
        """
        if chroot and not drop_privileges:
            raise ValueError("a chroot without dropping root is no jail")
        if not argv:
            raise ValueError("empty command")
        exe = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0])
        if exe is None:
            raise BackendError(f"{argv[0]}: executable not found in PATH")
        out = [sys.executable, "-I", "-m", "metald.jailer.exec"]
        if netns is not None:
            out += ["--netns", netns]
        for directory in jail.cgroup.dirs:
            out += ["--cgroup", str(directory)]
        if drop_privileges:
            out += ["--uid", str(jail.uid), "--gid", str(jail.gid)]
        out += ["--fd-limit", str(self.settings.jailer_fd_limit)]
        if chroot:
            out += ["--chroot", str(jail.root)]
        if new_pid_ns:
            out += ["--new-pid-ns", "--pid-file", str(jail.pid_file)]
        return [*out, "--", exe, *argv[1:]]

    def owned_by(self, vm_id: str) -> ownership.Owned:
        """Which processes in ``vm_id``'s cgroup are its VMM (confined to one of its jail roots)."""
        roots = [layout.jail_dir(self.settings.jailer_chroot_dir, name, vm_id) / "root" for name in layout.VMM_NAMES]
        return ownership.vmm_of(roots)

    async def cleanup(self, jail: Jail) -> None:
        """Kill the VM's VMM left in its cgroup, remove it and the jail tree; idempotent.

        A process in the cgroup that is not provably this VM's VMM is never
        signalled: ForeignProcesses is raised and cgroup and jail stay."""
        await asyncio.to_thread(cgroup.remove, jail.cgroup, 5.0, self.owned_by(jail.vm_id))
        await asyncio.to_thread(chroot.remove_tree, jail.dir)

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        """Remove chroots and cgroups of VMs metald does not know; return their ids."""
        return await asyncio.to_thread(self._sweep, set(known_vm_ids))

    def _sweep(self, known: set[str]) -> list[str]:
        """Cgroups first (a VMM is recognised by its jail root), then the jail trees;
        a jail whose cgroup could not be emptied is kept."""
        removed: set[str] = set()
        kept: set[str] = set()
        for vm_id in sorted(cgroup.vm_ids(self.cgroup_fs) - known):
            if not layout.VM_ID_RE.match(vm_id):
                continue
            try:
                cgroup.remove(self.cgroup_fs.paths_for(vm_id), 5.0, self.owned_by(vm_id))
                removed.add(vm_id)
            except OSError as exc:
                kept.add(vm_id)
                log.warning("could not remove leftover cgroup of %s: %s", vm_id, exc)
        for vmm_name in layout.VMM_NAMES:
            base = self.settings.jailer_chroot_dir / vmm_name
            try:
                entries = [e for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name in known or entry.name in kept or not layout.VM_ID_RE.match(entry.name):
                    continue
                try:
                    chroot.remove_tree(Path(entry.path))
                    removed.add(entry.name)
                except OSError:
                    log.exception("could not remove leftover jail", extra={"path": entry.path})
        return sorted(removed)
