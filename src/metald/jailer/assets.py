"""Putting a VM's kernel, initrd and drives inside its jail.

Each asset appears at ``/<file name>`` in the chroot (``layout.path_in_jail``);
two assets with the same file name from different directories are rejected.
How it gets there depends on who may write it:

* Read-only assets (kernel, initrd, read-only drives) are often shared by many
  VMs, so the original is never chowned. If the jailed uid/gid can read it and
  cannot write it (world-readable, not writable by uid, gid or others), it is
  hard-linked; across filesystems (EXDEV) it is bind-mounted read-only
  (nosuid, nodev, noexec). Otherwise a private copy is made, owned
  uid:gid mode 0400.
* Writable drives belong to their VM: hard-linked, and the file (the same
  inode as the original) is chowned to uid:gid with u+rw, so the original
  stays owned by the jail uid after the VM is gone. Across filesystems the file
  is bind-mounted read-write instead, because a copy would silently lose the
  guest's writes.

Hard links need the chroot dir and the images on one filesystem: keep
``UNKEY_METALD_JAILER_CHROOT_DIR`` next to the image and asset dirs for the fast
path. Removing an asset unmounts or unlinks the jail's name only.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from metald.core.errors import InvalidArgument
from metald.core.models import BootSpec
from metald.jailer import syscalls
from metald.jailer.chroot import mounts_under
from metald.jailer.layout import Jail, asset_name


@dataclass(frozen=True)
class Asset:
    host_path: Path
    writable: bool
    field: str  # the request field it came from, for errors


def assets_of(spec: BootSpec) -> list[Asset]:
    """The files the VMM opens, without duplicates; rejects clashing names."""
    wanted = [Asset(spec.kernel_path, False, "config.boot.kernel_path")]
    if spec.initrd_path is not None:
        wanted.append(Asset(spec.initrd_path, False, "config.boot.initrd_path"))
    for i, drive in enumerate(spec.drives):
        wanted.append(Asset(drive.path, not drive.read_only, f"config.storage[{i}].path"))
    wanted += [Asset(path, False, "docker_image") for path in spec.extra_files]
    by_name: dict[str, Asset] = {}
    for asset in wanted:
        name = asset_name(asset.host_path)
        seen = by_name.get(name)
        if seen is None:
            by_name[name] = asset
        elif seen.host_path != asset.host_path:
            raise InvalidArgument(
                asset.field, f"file name {name!r} is also used by {seen.host_path}; names must be unique"
            )
        elif asset.writable and not seen.writable:
            by_name[name] = asset
    return list(by_name.values())


def _shareable(st: os.stat_result, uid: int, gid: int) -> bool:
    """World-readable and not writable by the jailed uid/gid."""
    mode = st.st_mode
    if not mode & stat.S_IROTH or mode & stat.S_IWOTH:
        return False
    if st.st_uid == uid and mode & stat.S_IWUSR:
        return False
    return not (st.st_gid == gid and mode & stat.S_IWGRP)


def _clear(path: Path) -> None:
    if path in mounts_under(path):
        syscalls.umount2(path, syscalls.MNT_DETACH | syscalls.UMOUNT_NOFOLLOW)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _bind(source: Path, target: Path, read_only: bool) -> None:
    target.touch(mode=0o600)
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    syscalls.mount(source, target, None, syscalls.MS_BIND)
    try:
        remount = syscalls.MS_REMOUNT | syscalls.MS_BIND | flags
        syscalls.mount(None, target, None, remount | (syscalls.MS_RDONLY if read_only else 0))
    except OSError:
        syscalls.umount2(target, syscalls.MNT_DETACH)
        raise


def place(jail: Jail, asset: Asset) -> str:
    """Make ``asset`` visible in the jail; returns how: "link", "copy" or "bind"."""
    source = asset.host_path
    target = jail.root / asset_name(source)
    _clear(target)
    st = os.stat(source)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(asset.field, f"{source} is not a regular file")
    if not asset.writable and not _shareable(st, jail.uid, jail.gid):
        shutil.copyfile(source, target, follow_symlinks=True)
        os.chown(target, jail.uid, jail.gid)
        os.chmod(target, 0o400)
        return "copy"
    try:
        os.link(source, target)
        how = "link"
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _bind(source, target, read_only=not asset.writable)
        how = "bind"
    if asset.writable:
        os.chown(source, jail.uid, jail.gid)
        os.chmod(source, stat.S_IMODE(st.st_mode) | stat.S_IRUSR | stat.S_IWUSR)
    return how


def remove(jail: Jail, asset: Asset) -> None:
    """Drop the jail's name for ``asset`` (unmount or unlink); idempotent."""
    _clear(jail.root / asset_name(asset.host_path))
