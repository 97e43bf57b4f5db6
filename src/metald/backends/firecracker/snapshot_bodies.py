"""Request bodies of Firecracker's snapshot API (``PUT /snapshot/create``,
``PUT /snapshot/load``), shaped exactly as firecracker-api-v1.16.1.yaml's
SnapshotCreateParams and SnapshotLoadParams; optional fields are left out.

Paths are as the jailed Firecracker sees them (inside its chroot).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

JSON = dict[str, Any]
SnapshotType = Literal["Full", "Diff"]
MemBackendType = Literal["File", "Uffd"]


def snapshot_create(snapshot_path: str, mem_file_path: str, snapshot_type: SnapshotType = "Full") -> JSON:
    """SnapshotCreateParams: the microVM state and guest memory files (VM must be Paused)."""
    return {"snapshot_path": snapshot_path, "mem_file_path": mem_file_path, "snapshot_type": snapshot_type}


def snapshot_load(
    snapshot_path: str,
    mem_backend_path: str,
    *,
    mem_backend_type: MemBackendType = "File",
    resume_vm: bool = False,
    network_overrides: Mapping[str, str] | None = None,
    track_dirty_pages: bool = False,
    clock_realtime: bool = False,
) -> JSON:
    """SnapshotLoadParams with ``mem_backend`` (never the deprecated ``mem_file_path``).

    ``network_overrides`` maps iface_id -> the new TAP (host_dev_name): a clone
    gets its own TAP in its own namespace. ``clock_realtime`` advances kvmclock
    by the time elapsed since the snapshot (a resumed hibernation).
    """
    body: JSON = {
        "snapshot_path": snapshot_path,
        "mem_backend": {"backend_type": mem_backend_type, "backend_path": mem_backend_path},
    }
    if resume_vm:
        body["resume_vm"] = True
    if track_dirty_pages:
        body["track_dirty_pages"] = True
    if network_overrides:
        body["network_overrides"] = [
            {"iface_id": iface, "host_dev_name": tap} for iface, tap in sorted(network_overrides.items())
        ]
    if clock_realtime:
        body["clock_realtime"] = True
    return body
