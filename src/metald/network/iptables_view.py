"""The guide's view of NAT: a masquerade rule in iptables' nat POSTROUTING.

metald's NAT lives in its own nftables table (``inet metald``). The root
deployment guide checks NAT with ``iptables -t nat -L POSTROUTING -n -v | grep
10.100.0.0``, which only lists iptables' own tables; so metald also keeps an
equivalent, commented masquerade rule there (and the exemption its nft rule has). Both match the same traffic and
NAT is decided once per connection, so the duplicate changes nothing on the
wire. The rules are added once (checked with ``-C``) and removed on teardown.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

from metald.config import Settings

log = logging.getLogger(__name__)
COMMENT = "metald: VM subnet NAT (see nft list table inet metald)"


def _rules(settings: Settings) -> list[tuple[str, list[str]]]:
    """(how to add, rule) pairs. Extra bridges (network/bridges.py) carry VM
    traffic at layer 2 only: with br_netfilter their frames pass here too, so
    they are exempted first (``-I``: before any other rule)."""
    subnet, comment = settings.network_vm_subnet_ipv4, ["-m", "comment", "--comment", COMMENT]
    return [
        ("-I", ["POSTROUTING", "-s", subnet, "-o", settings.network_bridge + "-+", *comment, "-j", "RETURN"]),
        ("-A", ["POSTROUTING", "-s", subnet, "!", "-o", settings.network_bridge, *comment, "-j", "MASQUERADE"]),
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
    """Add the rules unless they are there (idempotent); no iptables means nothing to show."""
    for how, rule in _rules(settings):
        if await _iptables("-C", *rule) == 0:
            continue
        if await _iptables(how, *rule) != 0:
            log.warning("could not add the iptables view of metald's NAT (iptables -t nat)")
            return


async def remove(settings: Settings) -> None:
    for _, rule in _rules(settings):
        while await _iptables("-C", *rule) == 0:
            if await _iptables("-D", *rule) != 0:
                break
