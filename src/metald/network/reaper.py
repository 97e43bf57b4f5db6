"""Batched deletion of host-side links.

Unregistering a network device waits for RCU grace periods (about 20 ms here)
whatever the number of devices deleted together. Links to delete are moved to
a reserved link group and the whole group is deleted in one request
(``ip link delete group``); requests arriving meanwhile share the next one.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from pyroute2.netlink.exceptions import NetlinkError

from metald.network import netns
from metald.network.batch import Coalescer

# Link group of links being deleted: "metd" in ASCII, unlikely to be in use.
REAP_GROUP = 0x6D657464


def _reap(ifnames: Sequence[str]) -> list[BaseException | None]:
    ipr = netns.host_ipr()
    results: list[BaseException | None] = []
    marked = False
    for ifname in ifnames:
        try:
            found = ipr.link("get", ifname=ifname)
            ipr.link("set", index=found[0]["index"], group=REAP_GROUP)
            marked = True
            results.append(None)
        except NetlinkError as exc:
            results.append(None if exc.code == errno.ENODEV else exc)
    if marked:
        try:
            ipr.link("del", index=0, group=REAP_GROUP)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:  # all of them vanished meanwhile
                raise
    return results


class LinkReaper:
    def __init__(self) -> None:
        self._coalescer: Coalescer[str] = Coalescer(self._apply_many)

    async def delete(self, ifname: str) -> None:
        """Delete host link ``ifname`` (no error if it does not exist)."""
        await self._coalescer.submit(ifname)

    @staticmethod
    async def _apply_many(ifnames: Sequence[str]) -> list[BaseException | None]:
        return await netns.run(None, _reap, ifnames)
