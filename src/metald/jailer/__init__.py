"""metald's integrated jailer: chroot, cgroup, namespaces and uid drop per VMM.

Public API: :class:`Jailer`, :class:`Jail`, :class:`Limits`,
:class:`CgroupPaths`, :class:`JailerConfigError`; the launcher is
``python -m metald.jailer.exec``; QEMU's self-confinement flags are in
:mod:`metald.jailer.qemu`. Names are imported lazily so that the launcher,
which runs as root before every VMM, loads only the standard library.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metald.jailer.cgroup import CgroupPaths
    from metald.jailer.errors import JailerConfigError
    from metald.jailer.jailer import Jailer
    from metald.jailer.layout import Jail
    from metald.jailer.resource_limits import Limits

_WHERE = {
    "CgroupPaths": "metald.jailer.cgroup",
    "JailerConfigError": "metald.jailer.errors",
    "Jailer": "metald.jailer.jailer",
    "Jail": "metald.jailer.layout",
    "Limits": "metald.jailer.resource_limits",
}

__all__ = ["CgroupPaths", "Jail", "Jailer", "JailerConfigError", "Limits"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
