"""Where one VM's jail lives, derived only from the settings, the VMM and the VM id.

Layout (the same as Firecracker's own jailer, so both can share a chroot dir)::

    <chroot_dir>/<vmm_name>/<vm_id>/          root:root 0700  (Jail.dir)
        vmm.pid                               host pid of the VMM with --new-pid-ns
        root/                                 root:root 0755  the VMM's "/" (Jail.root)
            <asset basename>                  kernel, initrd, drives (assets.py; not for QEMU)
            dev/kvm, dev/net/tun              char devices, uid:gid 0600 (not for QEMU)
            run/                              uid:gid 0700: the VMM's sockets and logs;
                                              metald reaches them as <root>/run/...

Nothing here touches the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from metald.core.errors import InvalidArgument
from metald.jailer.cgroup import CgroupPaths

VMM_NAMES = ("qemu", "firecracker")
# VMMs that open every file before chrooting themselves: nothing is placed in their jail.
SELF_CONFINING = frozenset({"qemu"})
# The API's vm_id rule, which is also Firecracker's jailer id rule: letters, digits
# and hyphens, at most 64, so an id is always one safe path component and cgroup name.
VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
# Names metald itself creates at the top of the chroot; assets may not use them.
RESERVED = frozenset({"dev", "run", "proc", "sys", "tmp"})


@dataclass(frozen=True)
class Jail:
    """Everything about one VM's jail."""

    vm_id: str
    vmm_name: str  # "qemu" | "firecracker"
    root: Path  # <chroot_dir>/<vmm_name>/<vm_id>/root
    uid: int
    gid: int
    cgroup: CgroupPaths

    @property
    def dir(self) -> Path:
        """``<chroot_dir>/<vmm_name>/<vm_id>``: removed as a whole on cleanup."""
        return self.root.parent

    @property
    def run_dir(self) -> Path:
        """Host path of the jail's ``/run`` (writable by the jailed uid)."""
        return self.root / "run"

    @property
    def pid_file(self) -> Path:
        """Where the launcher records the VMM's host pid when it uses a PID namespace."""
        return self.dir / "vmm.pid"


def check_vm_id(vm_id: str) -> None:
    """Reject ids that are unsafe as one path component and cgroup name."""
    if not VM_ID_RE.match(vm_id):
        raise InvalidArgument("vm_id", "must be 1-64 letters, digits or hyphens, starting with a letter or digit")


def check_vmm_name(vmm_name: str) -> None:
    if vmm_name not in VMM_NAMES:
        raise ValueError(f"unknown VMM {vmm_name!r}; expected one of {', '.join(VMM_NAMES)}")


def jail_dir(chroot_dir: Path, vmm_name: str, vm_id: str) -> Path:
    return chroot_dir / vmm_name / vm_id


def asset_name(host_path: Path) -> str:
    """The file name an asset gets at the top of the chroot."""
    name = host_path.name
    if not name or name in (".", "..") or name in RESERVED:
        raise InvalidArgument("config", f"{host_path}: file name {name!r} cannot be used inside the jail")
    return name


def path_in_jail(host_path: Path) -> str:
    """Where the jailed VMM sees a host asset, e.g. ``/vmlinuz``."""
    return "/" + asset_name(host_path)
