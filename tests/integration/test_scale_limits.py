"""The host limits raised for many VMs (docs/scaling.md): RLIMIT_NOFILE and
the neighbour table's GC thresholds. No root needed: the thresholds are
written to a stand-in /proc/sys tree and RLIMIT_NOFILE is changed in a child
process."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from metald.network import host

ROOT = Path(__file__).resolve().parents[2]


def _proc_sys(tmp: Path, values: dict[str, int]) -> Path:
    base = tmp / "net" / "ipv4" / "neigh" / "default"
    base.mkdir(parents=True)
    for name, value in values.items():
        (base / name).write_text(f"{value}\n")
    return tmp


def _read(proc_sys: Path, name: str) -> int:
    return int((proc_sys / "net" / "ipv4" / "neigh" / "default" / name).read_text())


def test_neigh_thresholds_raised_never_lowered(tmp_path: Path) -> None:
    proc_sys = _proc_sys(tmp_path, {"gc_thresh1": 128, "gc_thresh2": 512, "gc_thresh3": 100000})
    changed = host.raise_neigh_thresholds(proc_sys, only_in_initial_netns=False)
    assert changed == ["gc_thresh1=1024", "gc_thresh2=4096"]
    assert [_read(proc_sys, n) for n in ("gc_thresh1", "gc_thresh2", "gc_thresh3")] == [1024, 4096, 100000]
    assert host.raise_neigh_thresholds(proc_sys, only_in_initial_netns=False) == []  # idempotent


def test_neigh_thresholds_missing_files_are_not_fatal(tmp_path: Path) -> None:
    assert host.raise_neigh_thresholds(tmp_path, only_in_initial_netns=False) == []


def test_neigh_thresholds_left_alone_outside_the_initial_namespace(tmp_path: Path) -> None:
    proc_sys = _proc_sys(tmp_path, {"gc_thresh1": 128, "gc_thresh2": 512, "gc_thresh3": 1024})
    if host.in_initial_netns():
        return  # the suite runs in the host's namespace here: nothing to check
    assert host.raise_neigh_thresholds(proc_sys) == []
    assert _read(proc_sys, "gc_thresh3") == 1024


def test_nofile_soft_limit_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low_hard = hard if hard != resource.RLIM_INFINITY else 65536
    code = (
        "import resource, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'src')!r})\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (256, {low_hard}))\n"
        "from metald.limits import raise_nofile_limit\n"
        "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "print(raise_nofile_limit(300))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == f"({low_hard}, {low_hard}) ({low_hard}, {low_hard})"
    assert out[1] == f"({low_hard}, {low_hard})"  # never lowered
