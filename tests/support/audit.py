"""The leak audit every test that changes the host shares.

A snapshot lists everything metald can leave behind: network namespaces,
links, nftables rules, store rows and allocations, jails, cgroups, VMM
processes and run files. Two snapshots are compared item by item, so a test
can assert that a failed (or finished) operation left exactly what was there
before.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOTS = [Path("/sys/fs/cgroup/memory/metald"), Path("/sys/fs/cgroup/cpu/metald"),
                Path("/sys/fs/cgroup/pids/metald"), Path("/sys/fs/cgroup/metald")]


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout


def _netns() -> set[str]:
    return {line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()}


def _links() -> set[str]:
    names = set()
    for line in _run("ip", "-o", "link", "show").splitlines():
        match = re.match(r"\d+: ([^:@]+)", line)
        if match:
            names.add(match.group(1))
    return names


def _nft() -> set[str]:
    """Rules and set elements of metald's tables, one normalised line each."""
    out = _run("nft", "-s", "list", "ruleset")
    lines, table = set(), ""
    for raw in out.splitlines():
        line = re.sub(r"\s+", " ", raw.strip())
        if line.startswith("table "):
            table = line
        if "metald" in table and line and line not in ("}", "{"):
            lines.add(f"{table} | {line}")
    return lines


def _store(db: Path | None) -> set[str]:
    if db is None or not db.exists():
        return set()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        items = set()
        for table in ("vms", "ip_allocations", "port_allocations", "intents", "net_short_ids"):
            try:
                rows = conn.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608 - fixed names
            except sqlite3.Error:
                continue
            for row in rows:
                key = row[:2] if table != "vms" else (row[1], row[3])
                items.add(f"{table}:{key}")
        return items
    finally:
        conn.close()


# Host-level state that is not any VM's: the accelerator verdict cache and the
# per-VMM parent directories of the jails.
HOST_LEVEL = {"qemu-accel.json", "accel-probe"}


def _tree(root: Path | None, skip_top_dirs: bool = False) -> set[str]:
    if root is None or not root.exists():
        return set()
    out = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in HOST_LEVEL or (skip_top_dirs and len(rel.parts) == 1 and path.is_dir()):
            continue
        out.add(str(path))
    return out


def _cgroups() -> set[str]:
    out = set()
    for root in CGROUP_ROOTS:
        if root.is_dir():
            out |= {str(p) for p in root.iterdir() if p.is_dir()}
    return out


def _vmm_processes(marker: str) -> set[str]:
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker and marker in cmdline and ("qemu-system" in cmdline or "firecracker" in cmdline):
            found.add(f"{pid}:{cmdline[:120]}")
    return found


@dataclass
class Snapshot:
    items: dict[str, set[str]] = field(default_factory=dict)

    def diff(self, other: Snapshot) -> dict[str, tuple[set[str], set[str]]]:
        """{kind: (appeared, disappeared)} for every kind that changed."""
        out = {}
        for kind in sorted(set(self.items) | set(other.items)):
            before, after = self.items.get(kind, set()), other.items.get(kind, set())
            if before != after:
                out[kind] = (after - before, before - after)
        return out


def snapshot(db: Path | None = None, run_dir: Path | None = None, jail_dir: Path | None = None,
             vmm_marker: str = "") -> Snapshot:
    return Snapshot(
        {
            "netns": _netns(),
            "links": _links(),
            "nft": _nft(),
            "store": _store(db),
            "run_files": _tree(run_dir),
            "jail_files": _tree(jail_dir, skip_top_dirs=True),
            "cgroups": _cgroups(),
            "processes": _vmm_processes(vmm_marker),
        }
    )


def assert_no_leaks(before: Snapshot, after: Snapshot, ignore: tuple[str, ...] = ()) -> None:
    changes = {k: v for k, v in before.diff(after).items() if k not in ignore}
    assert not changes, "leak audit: " + "; ".join(
        f"{kind}: +{sorted(added)[:5]} -{sorted(removed)[:5]}" for kind, (added, removed) in changes.items()
    )
