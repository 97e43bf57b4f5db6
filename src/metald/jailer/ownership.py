"""Which processes in a VM's cgroup metald may kill: only ones it can prove are that VM's VMM.

A cgroup directory is just a name; another daemon (or an operator) can put any
process in it. Before metald kills what is left in a VM's cgroup it checks
each process. A process is this VM's VMM when one of these holds:

* its command line names the VM's jail root (``<chroot_dir>/<vmm>/<vm_id>/root``):
  QEMU's ``-chroot``, and the launcher's ``--chroot`` or QEMU arguments;
* its root directory (``/proc/<pid>/root``) is the jail root, i.e. it has
  chrooted into it (a Firecracker in its own PID namespace);
* its parent is such a process (the VMM forked by the launcher).

A process already gone or a zombie counts as owned (nothing to protect).
Anything else is foreign: it is left running and the cgroup is not removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from metald.backends import procfs

PROC = Path("/proc")
# How far up the parent chain a process may be from a proven VMM process.
MAX_DEPTH = 4

Owned = Callable[[int], bool]


def _same_dir(a: str | Path, b: os.stat_result) -> bool:
    try:
        st = os.stat(a)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (b.st_dev, b.st_ino)


def vmm_of(roots: Iterable[Path], proc: Path = PROC) -> Owned:
    """A predicate: is ``pid`` a VMM (or a child of one) confined to one of ``roots``?"""
    roots = [Path(r) for r in roots]
    markers = [str(r) for r in roots]
    stats: list[os.stat_result] = []
    for root in roots:
        try:
            stats.append(os.stat(root))
        except OSError:
            pass

    def proven(pid: int) -> bool:
        argv = procfs.read_cmdline(pid, proc) or []
        if any(m == arg or arg.startswith(m + "/") or arg.endswith("=" + m) for arg in argv for m in markers):
            return True
        return any(_same_dir(proc / str(pid) / "root", st) for st in stats)

    def owned(pid: int) -> bool:
        stat = procfs.read_stat(pid, proc)
        if stat is None or stat.state in ("Z", "X"):
            return True  # already gone or exiting: signalling it harms nobody
        current: int | None = pid
        for _ in range(MAX_DEPTH + 1):
            if current is None or current <= 1:
                return False
            if proven(current):
                return True
            current = procfs.read_ppid(current, proc)
        return False

    return owned
