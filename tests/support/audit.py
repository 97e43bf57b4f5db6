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
import time
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOTS = [Path("/sys/fs/cgroup/memory/metald"), Path("/sys/fs/cgroup/cpu/metald"),
                Path("/sys/fs/cgroup/pids/metald"), Path("/sys/fs/cgroup/metald")]


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout


def _netns() -> set[str]:
    return {line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()}


# A VM's teardown returns before its host veth is gone: the kernel destroys the
# pair with the namespace, in the background (metald deletes it after a grace
# period of 2 s if something still holds the namespace).
IN_FLIGHT_WAIT_SECONDS = 5.0


def _link_list() -> tuple[set[str], set[str]]:
    """(host link names, metald host veths whose VM namespace is gone)."""
    names, dying = set(), set()
    namespaces = _netns()
    for line in _run("ip", "-o", "link", "show").splitlines():
        match = re.match(r"\d+: ([^:@]+)", line)
        if not match:
            continue
        names.add(match.group(1))
        owner = re.search(r"\\\s+alias metald:(\S+)", line)
        if match.group(1).startswith("vh_") and owner and f"fc-{owner.group(1)}" not in namespaces:
            dying.add(match.group(1))
    return names, dying


def _links() -> set[str]:
    """Host links, once the host veths of removed namespaces have vanished (or
    IN_FLIGHT_WAIT_SECONDS passed: then they are reported)."""
    deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
    while True:
        names, dying = _link_list()
        if not dying or time.monotonic() >= deadline:
            return names
        time.sleep(0.05)


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


def _cgroups(prefix: str = "", parent: str = "metald") -> set[str]:
    out = set()
    roots = [r.parent / parent for r in CGROUP_ROOTS]
    for root in roots:
        if root.is_dir():
            out |= {str(p) for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)}
    return out


def _daemon_cgroup_parent(run_dir: Path | None) -> str:
    marker = run_dir.parent / "cgroup-parent" if run_dir is not None else None
    if marker is not None and marker.is_file():
        return marker.read_text().strip()
    return "metald"


def _vmm_processes(marker: str) -> set[str]:
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "guest=accel-probe" in cmdline:
            continue  # metald's own KVM probe (backends/qemu/accel.py): short-lived, not a VM's VMM
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
             vmm_marker: str = "", cgroup_prefix: str = "", cgroup_parent: str | None = None) -> Snapshot:
    """``cgroup_prefix`` keeps only VM cgroups whose name starts with it: cgroups are
    host-wide (not in the test's namespaces), so concurrent test runs see each other's.
    ``cgroup_parent`` is the daemon's UNKEY_METALD_JAILER_CGROUP_PARENT; by default it is
    derived from ``run_dir`` when that belongs to a tests.support.daemon.DaemonProcess."""
    if cgroup_parent is None:
        cgroup_parent = _daemon_cgroup_parent(run_dir)
    return Snapshot(
        {
            "netns": _netns(),
            "links": _links(),
            "nft": _nft(),
            "store": _store(db),
            "run_files": _tree(run_dir),
            "jail_files": _tree(jail_dir, skip_top_dirs=True),
            "cgroups": _cgroups(cgroup_prefix, cgroup_parent),
            "processes": _vmm_processes(vmm_marker),
        }
    )


def assert_no_leaks(before: Snapshot, after: Snapshot, ignore: tuple[str, ...] = ()) -> None:
    changes = {k: v for k, v in before.diff(after).items() if k not in ignore}
    assert not changes, "leak audit: " + "; ".join(
        f"{kind}: +{sorted(added)[:5]} -{sorted(removed)[:5]}" for kind, (added, removed) in changes.items()
    )


# --- ownership: everything present belongs to a VM in the store -----------------

@dataclass
class StoredVm:
    vm_id: str
    state: int  # VmState number
    short_id: str | None
    ip: str | None


def stored_vms(db: Path) -> dict[str, StoredVm]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        shorts = {vm: short for short, vm in conn.execute("SELECT short_id, vm_id FROM net_short_ids")}
        ips = {vm: ip for ip, vm in conn.execute("SELECT ip, vm_id FROM ip_allocations")}
        return {
            vm_id: StoredVm(vm_id, state, shorts.get(vm_id), ips.get(vm_id))
            for vm_id, state in conn.execute("SELECT vm_id, state FROM vms")
        }
    finally:
        conn.close()


def intents(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [f"{vm}:{op}" for vm, op in conn.execute("SELECT vm_id, operation FROM intents")]
    finally:
        conn.close()


def vmm_processes_of(run_dir: Path) -> list[tuple[int, str]]:
    """(pid, vm_id) of live processes with ``-qmp unix:<run_dir>/<vm_id>/qmp.sock``."""
    marker = re.compile("unix:" + re.escape(str(run_dir)) + r"/([^/]+)/qmp\.sock")
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        match = marker.search(cmdline)
        if match:
            found.append((int(pid), match.group(1)))
    return found


def orphans(snap: Snapshot, db: Path, run_dir: Path, jail_dir: Path, cgroup_prefix: str = "",
            base: Snapshot | None = None) -> list[str]:
    """What in ``snap`` belongs to no VM in the store (or is missing for one).

    Items also in ``base`` (taken before any VM existed: the host bridge, the
    tables and their rules) are the host's, not a VM's. Running/paused VMs
    (states 2, 3) must have exactly one VMM process; others none.
    """
    vms = stored_vms(db)
    ignore = base.items if base is not None else {}
    problems: list[str] = []

    def new(kind: str) -> set[str]:
        return snap.items.get(kind, set()) - ignore.get(kind, set())

    for ns in new("netns"):
        if not (ns.startswith("fc-") and ns[3:] in vms):
            problems.append(f"netns {ns}")
    shorts = {v.short_id for v in vms.values() if v.short_id}
    for link in new("links"):
        if link[:3] in ("vh_", "vn_", "tap") and link.split("_", 1)[-1] not in shorts:
            problems.append(f"link {link}")
    ips = {v.ip for v in vms.values() if v.ip}
    for line in new("nft"):
        found = re.findall(r"10\.\d+\.\d+\.\d+", line)
        vhs = re.findall(r"vh_([0-9a-z]+)", line)
        if any(ip not in ips and not ip.endswith(".0.1") for ip in found) or any(v not in shorts for v in vhs):
            problems.append(f"nft {line[:160]}")
    for path in new("run_files"):
        rel = Path(path).relative_to(run_dir).parts
        if rel[0] not in vms:
            problems.append(f"run file {path}")
    for path in new("jail_files"):
        rel = Path(path).relative_to(jail_dir).parts
        if len(rel) >= 2 and rel[1] not in vms:
            problems.append(f"jail file {path}")
    for path in new("cgroups"):
        name = Path(path).name
        if name.startswith(cgroup_prefix) and name not in vms:
            problems.append(f"cgroup {path}")
    per_vm: dict[str, int] = {}
    for _, vm_id in vmm_processes_of(run_dir):
        per_vm[vm_id] = per_vm.get(vm_id, 0) + 1
    for vm_id, count in per_vm.items():
        vm = vms.get(vm_id)
        if vm is None or vm.state not in (2, 3) or count != 1:
            problems.append(f"{count} VMM process(es) of {vm_id!r} (state {vm.state if vm else 'no row'})")
    for vm in vms.values():
        if vm.state in (2, 3) and per_vm.get(vm.vm_id, 0) == 0:
            problems.append(f"{vm.vm_id} is recorded running/paused but has no VMM process")
    return problems
