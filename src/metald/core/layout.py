"""Where a VM's things live on the host: one owner for each path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metald.config import Settings

NETNS_DIR = Path("/run/netns")
# delete moves a VM's run directory to <run_dir>/<TRASH_PREFIX><vm_id> until it commits.
TRASH_PREFIX = ".deleting-"


@dataclass(frozen=True)
class VmLayout:
    """The host paths of every VM, from the settings."""

    run_root: Path  # UNKEY_METALD_RUN_DIR: one directory per VM below it
    jail_root: Path  # UNKEY_METALD_JAILER_CHROOT_DIR: <jail_root>/<vmm>/<vm_id>
    netns_dir: Path = NETNS_DIR

    @classmethod
    def from_settings(cls, settings: Settings) -> VmLayout:
        return cls(run_root=settings.run_dir, jail_root=settings.jailer_chroot_dir)

    def run_dir(self, vm_id: str) -> Path:
        """Sockets, logs and the console of one VM."""
        return self.run_root / vm_id

    def trash(self, vm_id: str) -> Path:
        """Where delete moves the run directory until the VM is forgotten."""
        return self.run_root / f"{TRASH_PREFIX}{vm_id}"

    def netns_path(self, namespace: str) -> Path:
        return self.netns_dir / namespace

    def jail_dir(self, vmm: str, vm_id: str) -> Path:
        return self.jail_root / vmm / vm_id
