"""Small builders for engine-level tests with the fake backend."""

from __future__ import annotations

from pathlib import Path

from metald.core.models import VmDraft


def small_draft(image: Path) -> VmDraft:
    """A 1-vCPU, 128 MiB VM on the (test) image's kernel, without a NIC request."""
    return VmDraft(1, 128 << 20, image / "vmlinuz", None, "console=ttyS0", (), None)
