"""Request bodies of the Firecracker API, shaped exactly as firecracker-api-v1.16.1.yaml.

Pure functions from metald's values to JSON-ready dicts; optional fields are
left out rather than sent as null (Firecracker's structs deny unknown fields).
"""

from __future__ import annotations

from typing import Any, Literal

from metald.core.models import RateLimit

JSON = dict[str, Any]
LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]
Action = Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]
VmStateName = Literal["Paused", "Resumed"]


def logger(log_path: str, level: LogLevel = "Info", show_level: bool = True) -> JSON:
    """Logger definition."""
    return {"log_path": log_path, "level": level, "show_level": show_level, "show_log_origin": False}


def metrics(metrics_path: str) -> JSON:
    """Metrics definition."""
    return {"metrics_path": metrics_path}


def machine_config(vcpu_count: int, mem_size_mib: int) -> JSON:
    """MachineConfiguration definition (SMT off, no CPU template)."""
    return {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib, "smt": False}


def boot_source(kernel_image_path: str, initrd_path: str | None, boot_args: str) -> JSON:
    """BootSource definition."""
    body: JSON = {"kernel_image_path": kernel_image_path, "boot_args": boot_args}
    if initrd_path is not None:
        body["initrd_path"] = initrd_path
    return body


def drive(drive_id: str, path_on_host: str, is_root_device: bool, is_read_only: bool) -> JSON:
    """Drive definition for a virtio-block device."""
    return {
        "drive_id": drive_id,
        "path_on_host": path_on_host,
        "is_root_device": is_root_device,
        "is_read_only": is_read_only,
    }


def token_bucket(limit: RateLimit) -> JSON:
    """TokenBucket for a bytes/s limit: ``size`` bytes are refilled every ``refill_time`` ms.

    size = bandwidth * refill_time / 1000, rounded up so a small limit never
    becomes 0 (which Firecracker reads as "no limit").
    """
    size = -(-limit.bandwidth * limit.refill_time_ms // 1000)
    bucket: JSON = {"size": size, "refill_time": limit.refill_time_ms}
    if limit.burst > 0:
        bucket["one_time_burst"] = limit.burst
    return bucket


def rate_limiter(limit: RateLimit) -> JSON:
    """RateLimiter with a bandwidth bucket only."""
    return {"bandwidth": token_bucket(limit)}


def network_interface(
    iface_id: str,
    host_dev_name: str,
    guest_mac: str | None = None,
    rx: RateLimit | None = None,
    tx: RateLimit | None = None,
) -> JSON:
    """NetworkInterface definition."""
    body: JSON = {"iface_id": iface_id, "host_dev_name": host_dev_name}
    if guest_mac is not None:
        body["guest_mac"] = guest_mac
    if rx is not None:
        body["rx_rate_limiter"] = rate_limiter(rx)
    if tx is not None:
        body["tx_rate_limiter"] = rate_limiter(tx)
    return body


def action(action_type: Action) -> JSON:
    """InstanceActionInfo definition."""
    return {"action_type": action_type}


def vm_state(state: VmStateName) -> JSON:
    """Vm definition (PATCH /vm)."""
    return {"state": state}
