"""The guide's view of NAT: one masquerade rule in iptables' nat POSTROUTING.

metald's NAT lives in its own nftables table (``inet metald``). The root
deployment guide checks NAT with ``iptables -t nat -L POSTROUTING -n -v | grep
10.100.0.0``, which only lists iptables' own tables; so metald also keeps one
equivalent, commented masquerade rule there. Both match the same traffic and
NAT is decided once per connection, so the duplicate changes nothing on the
wire. The rule is added once (checked with ``-C``) and removed on teardown.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

from metald.config import Settings

log = logging.getLogger(__name__)
COMMENT = "metald: VM subnet NAT (see nft list table inet metald)"


def _rule(settings: Settings) -> list[str]:
    return [
        "POSTROUTING", "-s", settings.network_vm_subnet_ipv4, "!", "-o", settings.network_bridge,
        "-m", "comment", "--comment", COMMENT, "-j", "MASQUERADE",
    ]


async def _iptables(*args: str) -> int:
    binary = shutil.which("iptables")
    if binary is None:
        return 127
    proc = await asyncio.create_subprocess_exec(
        binary, "-w", "5", "-t", "nat", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait()


async def ensure(settings: Settings) -> None:
    """Add the rule unless it is there (idempotent); no iptables means nothing to show."""
    rule = _rule(settings)
    if await _iptables("-C", *rule) == 0:
        return
    if await _iptables("-A", *rule) != 0:
        log.warning("could not add the iptables view of metald's NAT (iptables -t nat)")


async def remove(settings: Settings) -> None:
    rule = _rule(settings)
    while await _iptables("-C", *rule) == 0:
        if await _iptables("-D", *rule) != 0:
            break
