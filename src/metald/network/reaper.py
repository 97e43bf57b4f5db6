"""Batched deletion of host-side links.

Unregistering a network device waits for RCU grace periods (about 20 ms here)
whatever the number of devices deleted together. Links to delete are moved to
a reserved link group and the whole group is deleted in one request
(``ip link delete group``); requests arriving meanwhile share the next one.

The deletion runs on the reaper's own thread (which never leaves the host's
namespace), not on the namespace pool: a pool thread waiting out an RCU
barrier would hold up other VMs' network setup meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from pyroute2.netlink.exceptions import NetlinkError

from metald.network.batch import Coalescer
from metald.network.rtnl import Rtnl

# Link group of links being deleted: "metd" in ASCII, unlikely to be in use.
REAP_GROUP = 0x6D657464


_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metald-reaper")
_local = threading.local()


def _host_rtnl() -> Rtnl:
    ipr: Rtnl | None = getattr(_local, "ipr", None)
    if ipr is None:
        ipr = _local.ipr = Rtnl()
    return ipr


def _reap(ifnames: Sequence[str]) -> list[BaseException | None]:
    ipr = _host_rtnl()
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
        return await asyncio.get_running_loop().run_in_executor(_executor, _reap_or_reset, ifnames)


def _reap_or_reset(ifnames: Sequence[str]) -> list[BaseException | None]:
    try:
        return _reap(ifnames)
    except OSError:  # the socket itself failed: a new one next time
        ipr = getattr(_local, "ipr", None)
        _local.ipr = None
        if ipr is not None:
            ipr.close()
        raise
