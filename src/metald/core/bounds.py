"""How long a read (GetVmInfo, ListVms) may wait on a VMM.

A VMM that does not answer within :data:`VMM_READ_BOUND_S` (stopped by
SIGSTOP, wedged, swapping) does not hold up a read: the answer comes from the
store, with the backend status :data:`UNRESPONSIVE`. ListVms never asks a VMM.
"""

from __future__ import annotations

VMM_READ_BOUND_S = 2.0
UNRESPONSIVE = "unresponsive"


def describe(exc: BaseException) -> str:
    """An exception as text that never ends in an empty cause (``TimeoutError()`` has no message)."""
    text = str(exc).strip()
    return text if text else type(exc).__name__
