"""Building and tearing down a jail's directory tree (layout in ``layout.py``).

Removal is the dangerous half: a jail holds hard links to shared images and
possibly bind mounts, and the jailed VMM may have planted symlinks. So
``remove_tree`` first unmounts everything mounted below the jail, refuses to
go on while anything is still mounted there, and then deletes with
``dir_fd``-relative calls and ``O_NOFOLLOW``: a symlink is unlinked, never
followed, and a directory on another device (a mount point) is never entered.
Unlinking a hard link only drops the jail's name for the file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from metald.jailer import mountinfo as mountinfo_mod
from metald.jailer import syscalls
from metald.jailer.layout import Jail

MOUNTINFO = mountinfo_mod.MOUNTINFO


def mounts_under(path: Path, mountinfo: Path = MOUNTINFO) -> list[Path]:
    """Mount points at or below ``path`` in metald's mount namespace, deepest first."""
    base = os.path.normpath(path)
    found = {
        m.point for m in mountinfo_mod.mounts(mountinfo) if str(m.point) == base or str(m.point).startswith(base + "/")
    }
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_under(path: Path) -> None:
    """Lazily unmount everything mounted at or below ``path``; raise if something stays."""
    for point in mounts_under(path):
        try:
            syscalls.umount2(point, syscalls.MNT_DETACH | syscalls.UMOUNT_NOFOLLOW)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
    left = mounts_under(path)
    if left:
        raise OSError(errno.EBUSY, f"still mounted inside the jail: {', '.join(map(str, left))}")


def ensure_dir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> None:
    """mkdir that insists on a real directory (not a symlink) with this owner and mode."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{path} exists and is not a directory")
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)


def make_tree(jail: Jail) -> None:
    """Create the jail directories (idempotent). The chroot dir itself may pre-exist."""
    base = jail.dir.parent.parent
    base.mkdir(mode=0o755, parents=True, exist_ok=True)  # concurrent boots race here
    vmm_dir = jail.dir.parent
    if not vmm_dir.exists():
        ensure_dir(vmm_dir, 0o755)
    ensure_dir(jail.dir, 0o700)
    ensure_dir(jail.root, 0o755)
    ensure_dir(jail.root / "dev", 0o755)
    ensure_dir(jail.root / "dev" / "net", 0o755)
    ensure_dir(jail.run_dir, 0o700, jail.uid, jail.gid)


def _remove_in(parent_fd: int, name: str, device: int) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        if os.fstat(fd).st_dev != device:
            raise OSError(errno.EXDEV, f"refusing to enter {name}: it is on another filesystem")
        with os.scandir(fd) as entries:
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False):
                    _remove_in(fd, entry.name, device)
                else:
                    os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it without following symlinks; idempotent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    unmount_under(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _remove_in(parent_fd, path.name, st.st_dev)
    finally:
        os.close(parent_fd)
