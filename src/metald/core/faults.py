"""Fault injection for tests, driven by the environment and off by default.

``METALD_FAULTS`` is a comma-separated list of ``<action>:<point>`` items:

* ``fail:<step>``  the named plan step raises before doing its work
* ``die:<point>``  the process is killed with SIGKILL at that point
  (points are ``before:<step>`` and ``after:<step>``)

A step name is ``<plan>.<step>``, for example ``create.network``; a plan run
inside a step is named after it, so nested steps read ``boot.network.tap`` or
``boot.vmm.jail.cgroup`` (see :mod:`metald.core.plan`). ``*`` in place of the
plan matches every plan (``*.tap``).

Two more variables serve tests that drive a long-running ``metald serve``:

* ``METALD_FAULTS_FILE=<path>``: the file holds more items in the same syntax
  and is read again at every check, so a test can change faults without a
  restart (a missing file means none).
* ``METALD_FAULTS_TRACE=<path>``: every step name is appended to that file
  (one line, ``<step>``) when the step is reached; the list of fault points an
  operation passes, taken from the code as it runs.

Nothing here is active unless one of the variables is set.
"""

from __future__ import annotations

import os
import signal

_ENV = "METALD_FAULTS"
_FILE_ENV = "METALD_FAULTS_FILE"
_TRACE_ENV = "METALD_FAULTS_TRACE"


class InjectedFault(RuntimeError):
    pass


def _raw() -> str:
    raw = os.environ.get(_ENV, "")
    path = os.environ.get(_FILE_ENV)
    if path:
        try:
            with open(path) as f:
                raw += "," + f.read().replace("\n", ",")
        except OSError:
            pass
    return raw


def _items() -> list[tuple[str, str]]:
    out = []
    for item in _raw().split(","):
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


def _trace(step: str) -> None:
    path = os.environ.get(_TRACE_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{step}\n".encode())
        finally:
            os.close(fd)


def active() -> bool:
    return _ENV in os.environ or _FILE_ENV in os.environ or _TRACE_ENV in os.environ


def check(step: str, when: str) -> None:
    """Raise or die if a fault is configured for ``step`` at ``when``.

    ``when`` is ``before`` (fail and die-before apply) or ``after``.
    """
    if not active():
        return
    if when == "before":
        _trace(step)
    for action, point in _items():
        if action == "fail" and when == "before" and _matches(point, step):
            raise InjectedFault(f"injected failure at {step}")
        if action == "die" and point.startswith(when + ":") and _matches(
            point.split(":", 1)[1], step
        ):
            os.kill(os.getpid(), signal.SIGKILL)
