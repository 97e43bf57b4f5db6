"""Per-VM cgroups: find the hierarchy, create one with limits, empty and remove it.

Every VM gets ``<base>/metald/<vm_id>``; metald never creates cgroups anywhere
else. The hierarchy is found from /proc/self/mountinfo:

* cgroup v2 (production hosts: /sys/fs/cgroup is cgroup2) is used when its
  ``cgroup.controllers`` offers memory, cpu and pids. metald enables them in
  ``cgroup.subtree_control`` of the base and of ``metald`` (which never holds
  processes itself, as v2's no-internal-processes rule wants).
* Otherwise cgroup v1: each of memory, cpu and pids must be mounted on its own
  (or shared, e.g. ``cpu,cpuacct``) v1 hierarchy, and the VM gets a
  ``metald/<vm_id>`` directory in each. On a hybrid host (v1 controllers, v2
  at /sys/fs/cgroup/unified holding none of them) this is what is used.

Limits (see ``resource_limits``) are written as v2 ``memory.max``,
``cpu.max``, ``pids.max`` or v1 ``memory.limit_in_bytes``,
``cpu.cfs_period_us``/``cpu.cfs_quota_us``, ``pids.max``. Swap limits are left
alone. A process joins by writing its pid to ``cgroup.procs`` of every
directory (``metald.jailer.exec`` does that).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from metald.jailer import mountinfo as mountinfo_mod
from metald.jailer.errors import JailerConfigError
from metald.jailer.resource_limits import Limits

CONTROLLERS = ("memory", "cpu", "pids")
PARENT = "metald"
MOUNTINFO = mountinfo_mod.MOUNTINFO


@dataclass(frozen=True)
class CgroupPaths:
    """One VM's cgroup directories: one on v2, one per controller hierarchy on v1."""

    version: Literal[1, 2]
    # (controller, directory); on v2 every controller maps to the same directory.
    by_controller: tuple[tuple[str, Path], ...]

    def dir_for(self, controller: str) -> Path:
        for name, path in self.by_controller:
            if name == controller:
                return path
        raise KeyError(controller)

    @property
    def dirs(self) -> tuple[Path, ...]:
        """The distinct directories, in controller order."""
        seen: list[Path] = []
        for _, path in self.by_controller:
            if path not in seen:
                seen.append(path)
        return tuple(seen)


@dataclass(frozen=True)
class CgroupFs:
    """Where the controllers metald needs are mounted on this host."""

    version: Literal[1, 2]
    bases: tuple[tuple[str, Path], ...]  # (controller, hierarchy mount point)
    parent: str = PARENT  # relative path under each base holding the VM cgroups

    def parents(self) -> tuple[Path, ...]:
        """The distinct ``<base>/<parent>`` directories."""
        out: list[Path] = []
        for _, base in self.bases:
            if base / self.parent not in out:
                out.append(base / self.parent)
        return tuple(out)

    def paths_for(self, vm_id: str) -> CgroupPaths:
        return CgroupPaths(self.version, tuple((name, base / self.parent / vm_id) for name, base in self.bases))


def detect(mountinfo: Path = MOUNTINFO) -> CgroupFs:
    """Pick v2 when it has all controllers, else v1; raise JailerConfigError if neither works."""
    mounts = [
        (m.fstype, m.point, m.super_options)
        for m in mountinfo_mod.mounts(mountinfo)
        if m.fstype in ("cgroup", "cgroup2")
    ]
    v2 = sorted(
        (point for fstype, point, _ in mounts if fstype == "cgroup2"),
        key=lambda p: (p != Path("/sys/fs/cgroup"), len(p.parts)),
    )
    for point in v2:
        try:
            available = set((point / "cgroup.controllers").read_text().split())
        except OSError:
            continue
        if set(CONTROLLERS) <= available:
            return CgroupFs(2, tuple((name, point) for name in CONTROLLERS))
    v1: dict[str, Path] = {}
    for fstype, point, options in mounts:
        if fstype == "cgroup":
            for name in CONTROLLERS:
                if name in options and name not in v1:
                    v1[name] = point
    if len(v1) == len(CONTROLLERS):
        return CgroupFs(1, tuple((name, v1[name]) for name in CONTROLLERS))
    where = ", ".join(str(p) for p in v2) or "none"
    raise JailerConfigError(
        "UNKEY_METALD_JAILER_ENABLED: the jailer needs the cgroup controllers "
        f"{', '.join(CONTROLLERS)} on cgroup v2 (mounted: {where}) or each on a v1 "
        f"hierarchy (found: {', '.join(sorted(v1)) or 'none'}); set "
        "UNKEY_METALD_JAILER_ENABLED=false or mount them"
    )


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _enable_subtree(directory: Path) -> None:
    wanted = " ".join(f"+{c}" for c in CONTROLLERS)
    enabled = set((directory / "cgroup.subtree_control").read_text().split())
    if not set(CONTROLLERS) <= enabled:
        _write(directory / "cgroup.subtree_control", wanted)


def _make_dirs(directory: Path, version: int) -> None:
    """mkdir ``directory`` and missing ancestors; on v2 enable the controllers on the way."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for new in reversed(missing):
        if version == 2:
            _enable_subtree(new.parent)
        new.mkdir(mode=0o755, exist_ok=True)


def create(paths: CgroupPaths, limits: Limits) -> None:
    """Create the VM's cgroup(s) and write the limits; idempotent."""
    for directory in paths.dirs:
        _make_dirs(directory, paths.version)
    if paths.version == 2:
        d = paths.dirs[0]
        _write(d / "memory.max", str(limits.memory_max))
        _write(d / "cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}")
        _write(d / "pids.max", str(limits.pids_max))
    else:
        _write(paths.dir_for("memory") / "memory.limit_in_bytes", str(limits.memory_max))
        cpu = paths.dir_for("cpu")
        _write(cpu / "cpu.cfs_period_us", str(limits.cpu_period_us))
        _write(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota_us))
        _write(paths.dir_for("pids") / "pids.max", str(limits.pids_max))


def procs(directory: Path) -> list[int]:
    """Pids in one cgroup directory; empty if it does not exist."""
    try:
        return [int(p) for p in (directory / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


class ForeignProcesses(OSError):
    """A VM's cgroup holds processes metald cannot prove are that VM's VMM."""


def remove_dirs(dirs: Iterable[Path], timeout: float = 5.0, owned: Callable[[int], bool] | None = None) -> None:
    """SIGKILL the processes in the cgroup directories, then remove them.

    ``owned`` (see :mod:`metald.jailer.ownership`) says which processes may be
    killed; with a process it rejects in them, nothing foreign is signalled and
    ForeignProcesses is raised (the directories stay). Idempotent. Raises
    OSError if a directory cannot be emptied in ``timeout``.
    """
    dirs = list(dirs)
    deadline = time.monotonic() + timeout
    if owned is not None:
        foreign = sorted(pid for pid in {p for d in dirs for p in procs(d)} if not owned(pid))
        if foreign:
            for pid in {p for d in dirs for p in procs(d)} - set(foreign):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise ForeignProcesses(
                errno.EBUSY,
                f"cgroup {dirs[0]} holds processes {foreign} that are not this VM's VMM; "
                "left running and the cgroup kept (see UNKEY_METALD_JAILER_CGROUP_PARENT)",
            )
    for directory in dirs:
        kill = directory / "cgroup.kill"  # v2, Linux 5.14+: kills atomically, forks included
        if kill.exists():
            try:
                _write(kill, "1")
            except FileNotFoundError:
                pass
    while True:
        alive = {pid for d in dirs for pid in procs(d)}
        if not alive:
            break
        if time.monotonic() > deadline:
            raise OSError(errno.EBUSY, f"processes {sorted(alive)} survive in cgroup {dirs[0]}")
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    for directory in dirs:
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:  # EBUSY while the last task finishes exiting
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def remove(paths: CgroupPaths, timeout: float = 5.0, owned: Callable[[int], bool] | None = None) -> None:
    remove_dirs(paths.dirs, timeout, owned)


def vm_ids(fs: CgroupFs) -> set[str]:
    """Names of the VM cgroups under every ``<base>/<parent>``."""
    out: set[str] = set()
    for parent in fs.parents():
        try:
            out |= {e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)}
        except FileNotFoundError:
            pass
    return out
