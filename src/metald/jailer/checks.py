"""Start-up checks: jailer settings (and host facts) that cannot work.

Run once at start; each error names the ``UNKEY_METALD_JAILER_*`` variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from metald.config import Settings
from metald.jailer import cgroup
from metald.jailer.errors import JailerConfigError
from metald.jailer.resource_limits import MIB, fds_needed

# Below this, no VMM fits next to its guest (Firecracker needs ~5 MiB, QEMU
# under TCG tens of MiB for its translation cache).
MIN_VMM_OVERHEAD = 16 * MIB


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_settings(settings: Settings, fs: cgroup.CgroupFs | None = None) -> cgroup.CgroupFs | None:
    """Raise JailerConfigError for a jailer configuration that cannot work.

    Returns the cgroup hierarchy found (None with the jailer off). ``fs``
    skips detection (tests).
    """
    if not settings.jailer_enabled:
        return None
    if os.geteuid() != 0:
        raise JailerConfigError(
            "UNKEY_METALD_JAILER_ENABLED: the jailer needs metald to run as root "
            "(or set UNKEY_METALD_JAILER_ENABLED=false)"
        )
    for name, value in (("UID", settings.jailer_uid), ("GID", settings.jailer_gid)):
        if value == 0:
            raise JailerConfigError(
                f"UNKEY_METALD_JAILER_{name}: must not be 0 with the jailer enabled, "
                "or the VMM keeps root; use a dedicated unprivileged user (e.g. 'jailer')"
            )
    chroot_dir = settings.jailer_chroot_dir
    if not chroot_dir.is_absolute():
        raise JailerConfigError(f"UNKEY_METALD_JAILER_CHROOT_DIR: {chroot_dir} must be an absolute path")
    if chroot_dir.exists() and not chroot_dir.is_dir():
        raise JailerConfigError(f"UNKEY_METALD_JAILER_CHROOT_DIR: {chroot_dir} exists and is not a directory")
    flags = os.statvfs(_existing_ancestor(chroot_dir)).f_flag
    if flags & os.ST_NODEV:
        raise JailerConfigError(
            f"UNKEY_METALD_JAILER_CHROOT_DIR: {chroot_dir} is on a nodev mount, so /dev/kvm "
            "and /dev/net/tun cannot work inside jails; pick a directory on another filesystem"
        )
    if flags & os.ST_RDONLY:
        raise JailerConfigError(f"UNKEY_METALD_JAILER_CHROOT_DIR: {chroot_dir} is on a read-only mount")
    need = fds_needed(1)
    if settings.jailer_fd_limit < need:
        raise JailerConfigError(
            f"UNKEY_METALD_JAILER_FD_LIMIT: {settings.jailer_fd_limit} is below the {need} "
            "file descriptors a 1-vCPU VMM needs (64 + 8 per vCPU)"
        )
    if settings.jailer_memory_limit < MIN_VMM_OVERHEAD:
        raise JailerConfigError(
            f"UNKEY_METALD_JAILER_MEMORY_LIMIT: {settings.jailer_memory_limit} bytes is the VMM's "
            f"allowance on top of the guest memory and must be at least {MIN_VMM_OVERHEAD} (16 MiB)"
        )
    fs = fs or cgroup.detect()
    for _, base in fs.bases:
        if os.statvfs(base).f_flag & os.ST_RDONLY:
            raise JailerConfigError(f"UNKEY_METALD_JAILER_ENABLED: the cgroup hierarchy {base} is mounted read-only")
    return fs
