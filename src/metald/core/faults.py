"""Fault injection for tests, driven by the environment and off by default.

``METALD_FAULTS`` is a comma-separated list of ``<action>:<point>`` items:

* ``fail:<step>``  the named plan step raises before doing its work
* ``die:<point>``  the process is killed with SIGKILL at that point
  (points are ``before:<step>`` and ``after:<step>``)

A step name is ``<plan>.<step>``, for example ``create.netns``; ``*`` in place
of the plan matches every plan. Nothing here is active unless the variable is set.
"""

from __future__ import annotations

import os
import signal

_ENV = "METALD_FAULTS"


class InjectedFault(RuntimeError):
    pass


def _items() -> list[tuple[str, str]]:
    raw = os.environ.get(_ENV, "")
    out = []
    for item in raw.split(","):
        item = item.strip()
        if ":" in item:
            action, point = item.split(":", 1)
            out.append((action, point))
    return out


def _matches(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    if pattern.startswith("*."):
        return name.split(".", 1)[-1] == pattern[2:]
    return False


def check(step: str, when: str) -> None:
    """Raise or die if a fault is configured for ``step`` at ``when``.

    ``when`` is ``before`` (fail and die-before apply) or ``after``.
    """
    if _ENV not in os.environ:
        return
    for action, point in _items():
        if action == "fail" and when == "before" and _matches(point, step):
            raise InjectedFault(f"injected failure at {step}")
        if action == "die" and point.startswith(when + ":") and _matches(
            point.split(":", 1)[1], step
        ):
            os.kill(os.getpid(), signal.SIGKILL)
