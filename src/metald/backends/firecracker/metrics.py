"""Turning Firecracker's metrics file and /proc into running totals.

Firecracker writes one JSON object per line to its metrics file, on every
``FlushMetrics`` action and every 60 s. Its counters (``SharedIncMetric``)
hold the *increase since the previous line*, so totals are the sum of all
lines; the newest line alone is only the last interval. ``net`` and ``block``
are the aggregates over all devices (``net_<iface>``/``block_<drive>`` are the
per-device ones).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metald.backends import procfs

# (section, key in Firecracker's JSON, attribute of Totals)
_FIELDS = (
    ("net", "rx_bytes_count", "net_rx_bytes"),
    ("net", "tx_bytes_count", "net_tx_bytes"),
    ("net", "rx_packets_count", "net_rx_packets"),
    ("net", "tx_packets_count", "net_tx_packets"),
    ("block", "read_bytes", "block_read_bytes"),
    ("block", "write_bytes", "block_write_bytes"),
    ("block", "read_count", "block_read_ops"),
    ("block", "write_count", "block_write_ops"),
)


@dataclass
class Totals:
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    net_rx_packets: int = 0
    net_tx_packets: int = 0
    block_read_bytes: int = 0
    block_write_bytes: int = 0
    block_read_ops: int = 0
    block_write_ops: int = 0
    lines: int = 0
    bad_lines: int = 0

    def counters(self) -> dict[str, int]:
        """The totals under VmMetrics' field names (the same names as here)."""
        return {attr: getattr(self, attr) for _, _, attr in _FIELDS}

    def add(self, line: dict[str, Any]) -> None:
        for section, key, attr in _FIELDS:
            value = line.get(section, {}).get(key, 0)
            if isinstance(value, int) and value >= 0:
                setattr(self, attr, getattr(self, attr) + value)
        self.lines += 1


@dataclass
class MetricsFile:
    """Reads the lines added since the last call and adds them to ``totals``."""

    path: Path
    totals: Totals = field(default_factory=Totals)
    _offset: int = 0
    _partial: bytes = b""

    @property
    def consumed(self) -> int:
        """Bytes of the file read as complete lines (what may be freed; see logcap)."""
        return self._offset - len(self._partial)

    def read_new(self) -> int:
        """Number of complete lines read now (0 if the file is missing)."""
        fragment = False
        try:
            with open(self.path, "rb") as fh:
                size = fh.seek(0, 2)
                if size < self._offset:  # recreated by a new VMM
                    self.totals, self._offset, self._partial = Totals(), 0, b""
                if self._offset == 0:  # skip a hole an earlier metald punched (logcap)
                    try:
                        self._offset = fh.seek(0, os.SEEK_DATA)
                    except OSError:  # ENXIO: nothing but a hole (or an empty file)
                        self._offset = size
                    fragment = self._offset > 0  # the first block may start mid-line
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return 0
        self._offset += len(data)
        if fragment:
            newline = data.find(b"\n")
            if newline < 0:
                self._partial = b""
                return 0
            data = data[newline + 1 :]
        *complete, self._partial = (self._partial + data).split(b"\n")
        count = 0
        for raw in complete:
            if not raw.strip():
                continue
            try:
                parsed = json.loads(raw)
            except ValueError:
                self.totals.bad_lines += 1
                continue
            if isinstance(parsed, dict):
                self.totals.add(parsed)
                count += 1
        return count


@dataclass
class CpuSampler:
    """CPU use of one process between two calls (percent of one host CPU)."""

    pid: int
    _last: tuple[float, int] | None = None

    def sample(self, stat: procfs.ProcStat) -> float:
        now = time.monotonic()
        if self._last is None:
            age = procfs.process_age_seconds(stat.start_time)
            percent = 100.0 * stat.cpu_ticks / procfs.CLK_TCK / age if age > 0 else 0.0
        else:
            then, ticks = self._last
            elapsed = now - then
            used = (stat.cpu_ticks - ticks) / procfs.CLK_TCK
            percent = 100.0 * used / elapsed if elapsed > 0 else 0.0
        self._last = (now, stat.cpu_ticks)
        return max(0.0, percent)
