"""Turning a stored VmDraft into JSON and back, and into a backend BootSpec."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from metald.core.models import BootSpec, Drive, NetworkAllocation, NicRequest, RateLimit, VmDraft


def draft_to_dict(draft: VmDraft) -> dict[str, Any]:
    data = asdict(draft)
    data["kernel_path"] = str(draft.kernel_path)
    data["initrd_path"] = str(draft.initrd_path) if draft.initrd_path else None
    data["drives"] = [{**asdict(d), "path": str(d.path)} for d in draft.drives]
    data["extra_files"] = [str(p) for p in draft.extra_files]
    return data


def _rate(data: dict[str, Any] | None) -> RateLimit | None:
    return RateLimit(**data) if data else None


def draft_from_dict(data: dict[str, Any]) -> VmDraft:
    nic = data.get("nic")
    return VmDraft(
        vcpu_count=data["vcpu_count"],
        memory_bytes=data["memory_bytes"],
        kernel_path=Path(data["kernel_path"]),
        initrd_path=Path(data["initrd_path"]) if data.get("initrd_path") else None,
        kernel_args=data["kernel_args"],
        drives=tuple(
            Drive(d["drive_id"], Path(d["path"]), d["read_only"], d["is_root"])
            for d in data.get("drives", [])
        ),
        nic=NicRequest(
            mac=nic.get("mac"),
            tap=nic.get("tap"),
            ipv4=nic.get("ipv4"),
            rx_rate_limit=_rate(nic.get("rx_rate_limit")),
            tx_rate_limit=_rate(nic.get("tx_rate_limit")),
            options=tuple((str(k), str(v)) for k, v in nic.get("options", ())),
        )
        if nic
        else None,
        console_enabled=data.get("console_enabled", True),
        metadata=tuple((str(k), str(v)) for k, v in data.get("metadata", ())),
        image=data.get("image", ""),
        extra_files=tuple(Path(p) for p in data.get("extra_files", ())),
    )


def kernel_args(draft: VmDraft, vm_id: str, ip_arg: str | None) -> str:
    """The caller's args plus what metald adds: the VM id and the ``ip=`` argument
    (unless the caller already set one)."""
    words = draft.kernel_args.split()
    parts = [draft.kernel_args.strip(), f"metald.vm_id={vm_id}"]
    if ip_arg and not any(w.startswith("ip=") for w in words):
        parts.append(ip_arg)
    return " ".join(p for p in parts if p)


def boot_spec(
    vm_id: str,
    draft: VmDraft,
    network: NetworkAllocation | None,
    ip_arg: str | None,
    run_dir: Path,
) -> BootSpec:
    """``run_dir``: the VM's own run directory (see core/layout.py)."""
    return BootSpec(
        vm_id=vm_id,
        vcpu_count=draft.vcpu_count,
        memory_bytes=draft.memory_bytes,
        kernel_path=draft.kernel_path,
        initrd_path=draft.initrd_path,
        kernel_args=kernel_args(draft, vm_id, ip_arg),
        drives=draft.drives,
        network=network,
        run_dir=run_dir,
        console_log=run_dir / "console.log",
        console_enabled=draft.console_enabled,
        extra_files=draft.extra_files,
    )
