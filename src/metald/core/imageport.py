"""The port through which the engine gives a VM a root disk made from a
container image (implemented by metald.images.vmdisk)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from metald.core.models import VmDraft


class ImagePort(Protocol):
    async def prepare(self, vm_id: str, draft: VmDraft, backend: str, run_dir: Path) -> VmDraft:
        """The draft with the image's root drive, boot files and kernel arguments
        filled in; no side effects beyond building metald-init once."""
        ...

    async def attach(self, vm_id: str, draft: VmDraft, run_dir: Path) -> None:
        """Pull and convert the image if it is not cached, and make the VM's
        copy-on-write disk in ``run_dir``."""
        ...

    async def detach(self, vm_id: str, run_dir: Path) -> None:
        """Remove the VM's disk (idempotent)."""
        ...

    def exit_reason(self, console_log: Path) -> str | None:
        """How the workload ended, from the console's last boot, if it did."""
        ...
