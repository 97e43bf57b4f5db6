"""Process limits metald needs for hundreds of VMs (see docs/scaling.md).

metald holds a few descriptors per running VM (its QMP socket, a pidfd, the
console log it watches) besides its listening and client sockets; with the
default soft RLIMIT_NOFILE of 1024, a few hundred VMs exhaust it. The systemd
unit sets ``LimitNOFILE=1048576``; when metald runs elsewhere (a shell,
another supervisor) the soft limit may still be 1024 while the hard limit is
higher, and raising the soft limit up to the hard one needs no privilege.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Below this many descriptors metald warns at start (about 3 per VM for ~1000 VMs).
RECOMMENDED_NOFILE = 8192


def raise_nofile_limit(wanted: int | None = None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to ``wanted`` (default: the hard limit),
    never above the hard limit and never lowering it. Returns (soft, hard) as
    they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target == resource.RLIM_INFINITY or (soft != resource.RLIM_INFINITY and target > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE", extra={"soft": soft, "hard": hard, "error": str(exc)})
    if soft != resource.RLIM_INFINITY and soft < RECOMMENDED_NOFILE:
        log.warning(
            "RLIMIT_NOFILE is %d: not enough for hundreds of VMs; raise LimitNOFILE (systemd) or the hard limit",
            soft,
        )
    return soft, hard
