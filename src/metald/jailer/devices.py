"""Device nodes inside the jail: /dev/kvm and /dev/net/tun, owned by the jailed uid.

A chrooted VMM that opens its devices after dropping root (Firecracker) can
only reach what exists inside its root. QEMU opens them before its own
``-chroot`` and does not need them, but they are harmless there. The chroot
dir must not be on a ``nodev`` mount (``check_settings`` checks that).
"""

from __future__ import annotations

import os
import stat

from metald.jailer.layout import Jail

# (path inside the jail, major, minor)
DEVICES: tuple[tuple[str, int, int], ...] = (
    ("dev/kvm", 10, 232),
    ("dev/net/tun", 10, 200),
)


def make_devices(jail: Jail) -> None:
    """mknod each device (0600, uid:gid); an existing correct node is kept."""
    for rel, major, minor in DEVICES:
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
    for rel, _, _ in DEVICES:
        try:
            os.unlink(jail.root / rel)
        except FileNotFoundError:
            pass
