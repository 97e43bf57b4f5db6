"""Reading a VMM process's facts from /proc (start time, CPU, memory, netns counters), for every backend."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    state: str
    utime: int  # clock ticks
    stime: int
    start_time: int  # clock ticks after boot (field 22)

    @property
    def cpu_ticks(self) -> int:
        return self.utime + self.stime


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat; the comm field may contain spaces and parentheses."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    return ProcStat(state=rest[0], utime=int(rest[11]), stime=int(rest[12]), start_time=int(rest[19]))


def read_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def read_ppid(pid: int, proc: Path = PROC) -> int | None:
    try:
        text = (proc / str(pid) / "stat").read_text()
        return int(text[text.rindex(")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def read_cmdline(pid: int, proc: Path = PROC) -> list[str] | None:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def read_rss_bytes(pid: int, proc: Path = PROC) -> int | None:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def system_uptime(proc: Path = PROC) -> float:
    return float((proc / "uptime").read_text().split()[0])


def process_age_seconds(start_time_ticks: int, proc: Path = PROC) -> float:
    return max(0.0, system_uptime(proc) - start_time_ticks / CLK_TCK)


@dataclass(frozen=True)
class IfaceCounters:
    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int


def parse_net_dev(text: str, ifname: str) -> IfaceCounters | None:
    """Counters of ``ifname`` from a /proc/<pid>/net/dev table."""
    for line in text.splitlines()[2:]:
        name, sep, values = line.partition(":")
        if not sep or name.strip() != ifname:
            continue
        f = values.split()
        return IfaceCounters(rx_bytes=int(f[0]), rx_packets=int(f[1]), tx_bytes=int(f[8]), tx_packets=int(f[9]))
    return None


def read_iface_counters(pid: int, ifname: str, proc: Path = PROC) -> IfaceCounters | None:
    """Counters of an interface in the network namespace ``pid`` lives in.

    /proc/<pid>/net/dev shows the process's own namespace, so no setns is needed.
    """
    try:
        return parse_net_dev((proc / str(pid) / "net" / "dev").read_text(), ifname)
    except (OSError, ValueError, IndexError):
        return None


def pids(proc: Path = PROC) -> list[int]:
    return [int(p.name) for p in proc.iterdir() if p.name.isdigit()]


def identify(pid: int, start_time: int, proc: Path = PROC) -> tuple[str | None, list[str]]:
    """Is ``pid`` still the process that started at ``start_time``?

    Returns (why not, or None; its command line). A pid alone proves nothing:
    the start time rules out a reused pid, and callers then check the command
    line for their VMM's control socket.
    """
    if pid <= 1:
        return f"invalid pid {pid}", []
    stat = read_stat(pid, proc)
    if stat is None:
        return f"process {pid} is gone", []
    if stat.state in ("Z", "X"):
        return f"process {pid} has exited", []
    if stat.start_time != start_time:
        return f"pid {pid} was reused (start time {stat.start_time} != {start_time})", []
    argv = read_cmdline(pid, proc)
    if argv is None:
        return f"process {pid} has no command line", []
    return None, argv
