"""The QEMU backend's :class:`metald.core.ports.Snapshotter`: the core's calls
mapped onto :class:`~metald.backends.qemu.snapshot.QemuSnapshots`.

A clone's drives are qcow2 overlays named ``<drive_id>.qcow2`` in its disks
directory (made here, by :func:`clone_drives`); its boots and restores open
exactly those files as qcow2, never a format read from a caller's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metald.backends.qemu.backend import QemuBackend
from metald.backends.qemu.snapshot import (
    GuestIdentity,
    QemuSnapshots,
    check_compatible,
    clone_drives,
    overlay_argv_hook,
    read_manifest,
)
from metald.core.models import BootSpec, Drive
from metald.core.ports import SavedSnapshot


def _overlays(spec: BootSpec) -> frozenset[Path]:
    return frozenset(d.path for d in spec.drives if d.path.name == f"{d.drive_id}.qcow2")


class QemuSnapshotter:
    def __init__(self, backend: QemuBackend) -> None:
        self.snaps = QemuSnapshots(backend)
        self.backend = backend

    async def save(self, spec: BootSpec, directory: Path, stop: bool) -> SavedSnapshot:
        manifest, timings = await self.snaps.save(spec, directory, stop=stop)
        return SavedSnapshot(
            manifest=manifest.to_dict(),
            state_bytes=manifest.state_bytes + manifest.memory_disk_bytes,
            disk_bytes=manifest.disk_bytes,
            stopped_s=timings.stopped_s,
        )

    def check_restorable(self, directory: Path, spec: BootSpec) -> None:
        check_compatible(read_manifest(directory), spec)

    def clone_drives(self, directory: Path, dest: Path) -> tuple[Drive, ...]:
        drives, _ = clone_drives(directory, read_manifest(directory), dest)
        return drives

    async def restore(self, spec: BootSpec, directory: Path, *, clone: bool) -> dict[str, Any]:
        if clone:
            identity = GuestIdentity.for_clone(spec.vm_id, spec.network)
            return await self.snaps.restore(spec, directory, identity=identity, qcow2=_overlays(spec))
        return await self.snaps.restore(spec, directory, identity=GuestIdentity(), require_ack=False)

    async def boot_clone(self, spec: BootSpec) -> dict[str, Any]:
        return await self.backend.boot(spec, argv_hook=overlay_argv_hook(_overlays(spec)))

    async def close(self) -> None:
        await self.snaps.close()
