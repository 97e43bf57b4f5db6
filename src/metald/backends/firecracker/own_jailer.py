"""Firecracker's own jailer (``UNKEY_METALD_FIRECRACKER_USE_OWN_JAILER``), as v1.16.1 behaves.

The jailer (``src/jailer/src/env.rs``) builds ``<chroot-base>/<exec-file-name>/<id>/root``,
where ``<exec-file-name>`` is the file name of the *canonicalized* ``--exec-file``
(a symlink ``/usr/local/bin/firecracker -> firecracker-v1.16.1-x86_64`` gives
``firecracker-v1.16.1-x86_64``). On every run it copies the binary in, ``mknod``s
``/dev/net/tun`` and ``/dev/kvm`` and creates ``/<exec-file-name>.pid``
exclusively: a second run into the same directory fails with "File exists".
So every start (first boot, reboot, boot from SHUTDOWN) gets a fresh jail:
``setup`` removes what an earlier run left, then places the assets; the
jailer does the rest.

Assets are placed before the jailer runs, by metald's own placement rules
(``metald.jailer.assets``): shared read-only files are hard-linked when the
jailed uid may read and not write them, else copied privately (never chowned);
a writable drive is hard-linked on the same file system and bind-mounted
across file systems (never copied: the guest's writes would be lost with the
jail). The jailer unshares its mount namespace and bind-mounts the chroot
recursively, so those bind mounts are what the VMM sees.

Limits: ``--cgroup-version`` (the detected hierarchy), ``--parent-cgroup``
(``UNKEY_METALD_JAILER_CGROUP_PARENT``, so the VM's cgroup is the same
``<hierarchy>/<parent>/<vm_id>`` metald's own jailer uses, and is removed and
swept the same way), ``--cgroup`` for memory, CPU and pids (the same values as
``metald.jailer.resource_limits``) and ``--resource-limit no-file=``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from metald.backends.firecracker.launch import JAILED_API_SOCK, VMM_NAME, Launch
from metald.core.errors import BackendError, MetaldError
from metald.core.models import BootSpec
from metald.jailer import assets, cgroup, chroot, layout
from metald.jailer.layout import Jail
from metald.jailer.resource_limits import Limits

if TYPE_CHECKING:
    from metald.jailer.jailer import Jailer


def cgroup_args(version: int, limits: Limits) -> list[str]:
    """``--cgroup FILE=VALUE`` pairs for the jailer, for cgroup v2 or v1."""
    if version == 2:
        values = {
            "memory.max": str(limits.memory_max),
            "cpu.max": f"{limits.cpu_quota_us} {limits.cpu_period_us}",
            "pids.max": str(limits.pids_max),
        }
    else:
        values = {
            "memory.limit_in_bytes": str(limits.memory_max),
            "cpu.cfs_period_us": str(limits.cpu_period_us),
            "cpu.cfs_quota_us": str(limits.cpu_quota_us),
            "pids.max": str(limits.pids_max),
        }
    out: list[str] = []
    for name, value in values.items():
        out += ["--cgroup", f"{name}={value}"]
    return out


class OwnJailerLauncher:
    """Firecracker's jailer: chroot, cgroup, rlimit, uid/gid drop, netns (see the module docstring)."""

    name = "firecracker-jailer"

    def __init__(self, jailer_binary: str, firecracker: str, jailer: Jailer) -> None:
        self.jailer_binary = jailer_binary
        self.firecracker = firecracker
        self.jailer = jailer
        settings = jailer.settings
        self.uid = settings.jailer_uid
        self.gid = settings.jailer_gid
        self.chroot_base = settings.jailer_chroot_dir

    @property
    def exec_file_name(self) -> str:
        """The jail's directory name: the canonicalized binary's file name, as the jailer computes it."""
        return Path(os.path.realpath(self.firecracker)).name

    def base_dir(self) -> Path:
        return Path(os.path.realpath(self.chroot_base)) / self.exec_file_name

    def jail(self, vm_id: str) -> Jail:
        layout.check_vm_id(vm_id)
        return Jail(
            vm_id=vm_id,
            vmm_name=VMM_NAME,
            root=self.base_dir() / vm_id / "root",
            uid=self.uid,
            gid=self.gid,
            cgroup=self.jailer.cgroup_fs.paths_for(vm_id),
        )

    def chroot_of(self, vm_id: str) -> Path:
        return self.jail(vm_id).root

    def api_sock_arg(self, vm_id: str, run_dir: Path) -> str:
        return JAILED_API_SOCK

    def validate(self, spec: BootSpec) -> None:
        """Reject at create what the jail could not hold: clashing asset names, too many vCPUs."""
        self.jailer.limits_for(spec)
        assets.assets_of(spec)

    def prepare(self, spec: BootSpec) -> Launch:
        jail = self.jail(spec.vm_id)
        fs = self.jailer.cgroup_fs
        argv = [
            self.jailer_binary,
            "--id", spec.vm_id,
            "--exec-file", self.firecracker,
            "--uid", str(self.uid),
            "--gid", str(self.gid),
            "--chroot-base-dir", str(self.chroot_base),
        ]  # fmt: skip
        if spec.network is not None:
            argv += ["--netns", f"/run/netns/{spec.network.namespace}"]
        argv += ["--cgroup-version", str(fs.version), "--parent-cgroup", fs.parent]
        argv += cgroup_args(fs.version, self.jailer.limits_for(spec))
        argv += ["--resource-limit", f"no-file={self.jailer.settings.jailer_fd_limit}"]
        # The jailer adds --id itself; no --new-pid-ns, so the pid we start is the VMM's.
        argv += ["--", "--api-sock", JAILED_API_SOCK]
        return Launch(
            argv=argv,
            api_sock_arg=JAILED_API_SOCK,
            socket_path=jail.root / JAILED_API_SOCK.lstrip("/"),
            files_dir=jail.root,
            chroot=jail.root,
            owner=(self.uid, self.gid),
            placed=layout.path_in_jail,
        )

    async def setup(self, spec: BootSpec) -> None:
        """A fresh jail (the jailer refuses to run into a used one) with the VM's assets placed."""
        jail = self.jail(spec.vm_id)
        wanted = assets.assets_of(spec)
        await self.teardown(spec.vm_id)
        try:
            await asyncio.to_thread(self._build, jail, wanted)
        except BaseException as exc:
            await self.teardown(spec.vm_id)
            if isinstance(exc, MetaldError | asyncio.CancelledError):
                raise
            raise BackendError(f"cannot prepare the jail of {spec.vm_id}: {exc}") from exc

    @staticmethod
    def _build(jail: Jail, wanted: list[assets.Asset]) -> None:
        jail.dir.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        jail.dir.mkdir(mode=0o700, exist_ok=True)
        jail.root.mkdir(mode=0o755, exist_ok=True)
        jail.run_dir.mkdir(mode=0o700, exist_ok=True)  # the client opens it to reach a long socket path
        for asset in wanted:
            assets.place(jail, asset)

    async def teardown(self, vm_id: str) -> None:
        """Kill what is left in the VM's cgroup; remove it and the jail (unmounting binds first)."""
        jail = self.jail(vm_id)
        await asyncio.to_thread(cgroup.remove, jail.cgroup)
        await asyncio.to_thread(chroot.remove_tree, jail.dir)

    def discard(self, vm_id: str) -> None:
        chroot.remove_tree(self.jail(vm_id).dir)

    def has_jail(self, vm_id: str) -> bool:
        return self.jail(vm_id).dir.exists()

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        """Jails under ``<base>/<exec-file-name>`` and cgroups of VMs metald does not know."""
        removed = set(await self.jailer.sweep_leftovers(known_vm_ids))
        base = self.base_dir()
        try:
            names = [e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            names = []
        for name in names:
            if name not in known_vm_ids and layout.VM_ID_RE.match(name):
                await asyncio.to_thread(chroot.remove_tree, base / name)
                removed.add(name)
        return sorted(removed)
