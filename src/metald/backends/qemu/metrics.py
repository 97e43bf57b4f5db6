"""VM metrics from the QEMU process (/proc) and QMP block statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from metald.backends import procfs
from metald.core.models import VmMetrics


@dataclass(frozen=True)
class CpuSample:
    ticks: int
    at: float  # time.monotonic()


def read_process(metrics: VmMetrics, pid: int, start_time: int, previous: CpuSample | None) -> CpuSample | None:
    """Fill CPU %, RSS and uptime; return the CPU sample for the next call.

    CPU is the share of one host core used since ``previous`` (or since the
    process started, on the first call); a 2-vCPU guest can show up to 200.
    """
    stat = procfs.read_stat(pid)
    if stat is None or stat.start_time != start_time:
        metrics.notes["process"] = f"QEMU process {pid} not readable"
        return None
    now = time.monotonic()
    age = procfs.process_age_seconds(start_time)
    if previous is not None and now > previous.at:
        used = (stat.cpu_ticks - previous.ticks) / procfs.CLK_TCK
        span = now - previous.at
    else:
        used = stat.cpu_ticks / procfs.CLK_TCK
        span = age
    metrics.cpu_usage_percent = round(100.0 * used / span, 2) if span > 0 else 0.0
    if hasattr(metrics, "cpu_seconds"):
        metrics.cpu_seconds = stat.cpu_ticks / procfs.CLK_TCK
    metrics.uptime_seconds = int(age)
    rss = procfs.read_rss_bytes(pid)
    if rss is None:
        metrics.notes["memory"] = "VmRSS not readable"
    else:
        metrics.memory_usage_bytes = rss
    return CpuSample(stat.cpu_ticks, now)


def read_network(metrics: VmMetrics, pid: int, tap: str | None) -> None:
    """TAP counters from QEMU's network namespace; the TAP's tx is the guest's rx."""
    if tap is None:
        metrics.notes["network"] = "VM has no network interface"
        return
    counters = procfs.read_iface_counters(pid, tap)
    if counters is None:
        metrics.notes["network"] = f"TAP {tap} not found in QEMU's network namespace"
        return
    metrics.net_rx_bytes = counters.tx_bytes
    metrics.net_rx_packets = counters.tx_packets
    metrics.net_tx_bytes = counters.rx_bytes
    metrics.net_tx_packets = counters.rx_packets


def apply_blockstats(metrics: VmMetrics, result: Any) -> None:
    """Sum QMP ``query-blockstats`` over all drives."""
    for entry in result or []:
        stats = entry.get("stats", {})
        metrics.block_read_bytes += int(stats.get("rd_bytes", 0))
        metrics.block_write_bytes += int(stats.get("wr_bytes", 0))
        metrics.block_read_ops += int(stats.get("rd_operations", 0))
        metrics.block_write_ops += int(stats.get("wr_operations", 0))
