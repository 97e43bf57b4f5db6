"""Rate limits with tc (``tc -n <netns> -batch -``).

Both directions are shaped with a token bucket (tbf) on an *egress* queue
inside the VM's namespace:

* rx (what the guest receives): root tbf on ``tap_<s>``;
* tx (what the guest sends): root tbf on ``vn_<s>``, the only way out of the
  namespace for the guest's packets.

Shaping on egress queues excess packets instead of dropping them (friendlier
to TCP than an ingress policer) and needs only sch_tbf; act_police and
cls_matchall are absent from some kernels (including the CI host's).

Mapping of RateLimit: ``bandwidth`` bytes/s is the tbf rate; the bucket is
``burst`` bytes, or when 0 the bytes refilled in ``refill_time`` ms (100 ms if
that is 0 too); it is at least MIN_BURST so that a full-size frame or a small
GSO batch always fits.
"""

from __future__ import annotations

import asyncio
import json

from metald.core.errors import BackendError
from metald.core.models import RateLimit

TC_BINARY = "tc"
MIN_BURST = 16 * 1024
LATENCY = "50ms"
DEFAULT_REFILL_MS = 100


def burst_bytes(limit: RateLimit) -> int:
    if limit.burst > 0:
        burst = limit.burst
    else:
        refill = limit.refill_time_ms or DEFAULT_REFILL_MS
        burst = limit.bandwidth * refill // 1000
    return max(burst, MIN_BURST)


async def _tc(ns: str, script: str, *flags: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        TC_BINARY,
        "-n",
        ns,
        *flags,
        "-batch",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(script.encode())
    if proc.returncode != 0 and "-force" not in flags:
        raise BackendError(f"tc in {ns}: {err.decode(errors='replace').strip()}")
    return out.decode()


async def apply(ns: str, limits: dict[str, RateLimit]) -> None:
    """Install (or replace) the tbf of each device."""
    lines = [
        f"qdisc replace dev {dev} root tbf rate {rl.bandwidth * 8}bit "
        f"burst {burst_bytes(rl)} latency {LATENCY}"
        for dev, rl in limits.items()
    ]
    if lines:
        await _tc(ns, "\n".join(lines) + "\n")


async def clear(ns: str, devices: list[str]) -> None:
    script = "".join(f"qdisc del dev {dev} root\n" for dev in devices)
    await _tc(ns, script, "-force")


async def has_shaping(ns: str, limits: dict[str, RateLimit]) -> bool:
    """True if every device has a root tbf at the wanted rate."""
    proc = await asyncio.create_subprocess_exec(
        TC_BINARY,
        "-n",
        ns,
        "-j",
        "qdisc",
        "show",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        return False
    try:
        qdiscs = json.loads(out or b"[]")
    except ValueError:
        return False
    found = {
        q.get("dev"): q.get("options", {}).get("rate")
        for q in qdiscs
        if q.get("kind") == "tbf" and q.get("root")
    }
    return all(found.get(dev) == rl.bandwidth for dev, rl in limits.items())
