"""Choosing the VMM backend from the settings."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from metald.config import Settings
from metald.core.errors import Unavailable
from metald.core.ports import Backend

if TYPE_CHECKING:
    from metald.jailer.jailer import Jailer

log = logging.getLogger(__name__)


def _jailer(settings: Settings) -> Jailer | None:
    if not settings.jailer_enabled:
        return None
    from metald.jailer.jailer import Jailer

    jailer = Jailer(settings)
    jailer.check_settings()  # raises a ConfigError naming the variable
    return jailer


def _qemu(settings: Settings) -> Backend:
    from metald.backends.qemu.backend import QemuBackend

    return QemuBackend(settings, _jailer(settings))


def _firecracker(settings: Settings) -> Backend:
    from metald.backends.firecracker.backend import FirecrackerBackend

    # The jailer settings are checked for Firecracker's own jailer too (same uid/gid/chroot dir).
    return FirecrackerBackend(settings, jailer=_jailer(settings))


async def make_backend(settings: Settings) -> Backend:
    """The configured backend; with ``auto``, Firecracker when usable, else QEMU.

    Raises Unavailable with what is missing when an explicitly chosen backend
    cannot run on this host.
    """
    if settings.backend == "auto":
        firecracker = _firecracker(settings)
        ok, detail = await firecracker.ping()
        if ok:
            log.info("backend: firecracker (auto)")
            return firecracker
        log.info("backend: qemu (auto; firecracker not usable: %s)", detail)
        chosen = _qemu(settings)
    elif settings.backend == "firecracker":
        chosen = _firecracker(settings)
    else:
        chosen = _qemu(settings)
    ok, detail = await chosen.ping()
    if not ok:
        raise Unavailable(f"backend {chosen.name} cannot run on this host: {detail}")
    log.info("backend: %s", chosen.name)
    return chosen
