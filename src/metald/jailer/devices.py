"""Device nodes inside the jail, owned by the jailed uid, as Firecracker's jailer makes them.

``/dev/kvm`` and ``/dev/net/tun``; ``/dev/urandom`` (MMDS v2 tokens need it)
and, where the host has one, ``/dev/userfaultfd`` (snapshot restore with a
userfaultfd memory backend), whose minor number is dynamic and read from
``/proc/misc``.

A chrooted VMM that opens its devices after dropping root (Firecracker) can
only reach what exists inside its root. QEMU opens them before its own
``-chroot`` and does not need them, but they are harmless there. The chroot
dir must not be on a ``nodev`` mount (``check_settings`` checks that).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from metald.jailer.layout import Jail

# (path inside the jail, major, minor)
DEVICES: tuple[tuple[str, int, int], ...] = (
    ("dev/kvm", 10, 232),
    ("dev/net/tun", 10, 200),
    ("dev/urandom", 1, 9),
)
USERFAULTFD = "dev/userfaultfd"
MISC_MAJOR = 10
PROC_MISC = Path("/proc/misc")


def userfaultfd_minor(proc_misc: Path = PROC_MISC) -> int | None:
    """The minor number of /dev/userfaultfd (a dynamic misc device); None if the host has none."""
    try:
        text = proc_misc.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == "userfaultfd" and parts[0].isdigit():
            return int(parts[0])
    return None


def devices_for_host() -> tuple[tuple[str, int, int], ...]:
    minor = userfaultfd_minor()
    return DEVICES if minor is None else (*DEVICES, (USERFAULTFD, MISC_MAJOR, minor))


def make_devices(jail: Jail) -> None:
    """mknod each device (0600, uid:gid); an existing correct node is kept."""
    for rel, major, minor in devices_for_host():
        path = jail.root / rel
        rdev = os.makedev(major, minor)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not (stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev):
            os.unlink(path)
            st = None
        if st is None:
            os.mknod(path, stat.S_IFCHR | 0o600, rdev)
        os.chown(path, jail.uid, jail.gid, follow_symlinks=False)
        os.chmod(path, 0o600)


def remove_devices(jail: Jail) -> None:
    for rel in [rel for rel, _, _ in DEVICES] + [USERFAULTFD]:
        try:
            os.unlink(jail.root / rel)
        except FileNotFoundError:
            pass
