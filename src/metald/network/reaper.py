"""Deletion of host-side links: batched now, or watched until the kernel does it.

Unregistering a network device waits for RCU grace periods (about 20 ms here)
whatever the number of devices deleted together. Links to delete are moved to
a reserved link group and the whole group is deleted in one request
(``ip link delete group``); requests arriving meanwhile share the next one.

A VM's teardown does not delete its host veth: unmounting the namespace lets
the kernel destroy it, and destroying ``vn_`` destroys its peer ``vh_`` too,
in the background. :meth:`LinkReaper.expect_gone` records the host end with
its ifindex and a deadline; a watcher thread checks every ``interval`` which
of them still exist and deletes (batched) those still there after ``grace``
seconds, e.g. because a process still holds the namespace. The ifindex tells
a re-created link of the same name from the old one.

The deletion runs on the reaper's own thread (which never leaves the host's
namespace), not on the namespace pool: a pool thread waiting out an RCU
barrier would hold up other VMs' network setup meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from metald.network import netns
from metald.network.batch import Coalescer
from metald.network.rtnl import Rtnl

log = logging.getLogger(__name__)

# Link group of links being deleted: "metd" in ASCII, unlikely to be in use.
REAP_GROUP = 0x6D657464
GRACE_SECONDS = 2.0
CHECK_INTERVAL = 0.05

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metald-reaper")
_local = threading.local()

Results = tuple[list[BaseException | None], int]


def _host_rtnl() -> Rtnl:
    ipr: Rtnl | None = getattr(_local, "ipr", None)
    if ipr is None:
        ipr = _local.ipr = Rtnl()
    return ipr


def _mark(ipr: Rtnl, index: int) -> BaseException | None | bool:
    """Move link ``index`` to REAP_GROUP: True, None if it is gone, or the error."""
    try:
        ipr.link("set", index=index, group=REAP_GROUP)
        return True
    except NetlinkError as exc:
        return None if exc.code == errno.ENODEV else exc


def _delete_group(ipr: Rtnl) -> None:
    try:
        ipr.link("del", index=0, group=REAP_GROUP)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:  # all of them vanished meanwhile
            raise


def _reap_indexes(indexes: Sequence[int | BaseException | None]) -> Results:
    """Delete links by ifindex (an error or None in the list is passed through
    as that link's result): (per-link result, number of links deleted)."""
    ipr = _host_rtnl()
    outcomes = [_mark(ipr, index) if isinstance(index, int) else index for index in indexes]
    marked = sum(o is True for o in outcomes)
    if marked:
        _delete_group(ipr)
    return [None if isinstance(o, bool) else o for o in outcomes], marked


def _reap(ifnames: Sequence[str]) -> Results:
    """Delete links by name: (per-name result, number of links deleted)."""
    ipr = _host_rtnl()
    indexes: list[int | BaseException | None] = []
    for ifname in ifnames:
        try:
            indexes.append(ipr.link("get", ifname=ifname)[0]["index"])
        except NetlinkError as exc:
            indexes.append(None if exc.code == errno.ENODEV else exc)
    return _reap_indexes(indexes)


def _on_reaper_thread(fn: Callable[[Sequence[Any]], Results], items: Sequence[Any]) -> Results:
    try:
        return fn(items)
    except OSError:  # the socket itself failed: a new one next time
        ipr = getattr(_local, "ipr", None)
        _local.ipr = None
        if ipr is not None:
            ipr.close()
        raise


class LinkReaper:
    def __init__(self, grace: float = GRACE_SECONDS, interval: float = CHECK_INTERVAL) -> None:
        self.grace = grace
        self.interval = interval
        self._coalescer: Coalescer[str] = Coalescer(self._apply_many)
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, float]] = {}  # name: (ifindex, deadline)
        self._watcher: threading.Thread | None = None
        self._tick = threading.Event()
        self.deleted = 0  # links this reaper deleted itself: delete() and overdue ones
        self.deleted_overdue = 0  # of which expected ones still there after the grace period
        self.vanished = 0  # expected ones the kernel removed

    async def delete(self, ifname: str) -> None:
        """Delete host link ``ifname`` now (no error if it does not exist)."""
        await self._coalescer.submit(ifname)

    async def _apply_many(self, ifnames: Sequence[str]) -> list[BaseException | None]:
        loop = asyncio.get_running_loop()
        results, deleted = await loop.run_in_executor(_executor, _on_reaper_thread, _reap, ifnames)
        with self._lock:
            self.deleted += deleted
        return results

    def expect_gone(self, ifname: str) -> None:
        """Watch host link ``ifname``, which the kernel is expected to destroy;
        delete it if it is still there after the grace period. Host namespace
        threads only (the caller's view of ``ifname`` is used)."""
        index = netns.ifindex(ifname)
        if index is None:
            return
        with self._lock:
            self._pending[ifname] = (index, time.monotonic() + self.grace)
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="metald-reaper-watch", daemon=True)
                self._watcher.start()

    def pending(self) -> set[str]:
        """Names of watched links not yet gone."""
        with self._lock:
            return set(self._pending)

    async def settle(self, timeout: float = 10.0) -> bool:
        """Wait until no watched link is left (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(self.interval / 2, left))
        return True

    def _watch(self) -> None:
        while True:
            self._tick.wait(self.interval)  # (an Event nobody sets: a sleep that profilers see as idle)
            with self._lock:
                items = dict(self._pending)
            try:
                self._check(items)
            except Exception:  # never let the watcher die with links pending
                log.exception("checking links expected to vanish failed")
            with self._lock:
                if not self._pending:
                    self._watcher = None
                    return

    def _check(self, items: dict[str, tuple[int, float]]) -> None:
        now = time.monotonic()
        vanished: list[str] = []
        overdue: list[str] = []
        for name, (index, deadline) in items.items():
            if netns.ifindex(name) != index:
                vanished.append(name)
            elif now >= deadline:
                overdue.append(name)
        removed: list[str] = []  # overdue ones deleted (or vanished meanwhile)
        retry: list[str] = []
        deleted = 0
        if overdue:
            try:
                results, deleted = _executor.submit(
                    _on_reaper_thread, _reap_indexes, [items[n][0] for n in overdue]
                ).result()
            except Exception as exc:  # noqa: BLE001 - retried after another grace period
                results = [exc] * len(overdue)
            for name, result in zip(overdue, results, strict=True):
                if result is None:
                    removed.append(name)
                    log.warning("link %s outlived its namespace by %.1fs: deleted", name, self.grace)
                else:
                    retry.append(name)
                    log.warning("deleting link %s failed (retrying in %.1fs): %s", name, self.grace, result)
        with self._lock:
            self.vanished += len(vanished)
            self.deleted += deleted
            self.deleted_overdue += deleted
            for name in vanished + removed + retry:
                if self._pending.get(name, (None, 0.0))[0] != items[name][0]:
                    continue  # expected again meanwhile, with another ifindex
                if name in retry:
                    self._pending[name] = (items[name][0], now + self.grace)
                else:
                    del self._pending[name]
