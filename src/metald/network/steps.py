"""One VM's network as plan steps: the device functions of ``vm.py`` wrapped as
checkable, undoable steps, the nft element steps, and the teardown.

``steps`` gives the plan that makes a VM's network; ``reapply_steps`` the same
plan for an existing network (the element steps never undo there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from metald.core.models import RateLimit
from metald.core.plan import Step
from metald.network import netns, nft, rules, tc
from metald.network.reaper import LinkReaper
from metald.network.vm import (
    RunState,
    VmNet,
    neigh_delete,
    neigh_ready,
    neigh_set,
    netns_create,
    netns_ready,
    netns_remove,
    proxy_off,
    proxy_on,
    proxy_ready,
    routes_delete,
    routes_ready,
    routes_set,
    tap_create,
    tap_delete,
    tap_ready,
    veth_create,
    veth_ready,
)

log = logging.getLogger(__name__)


def remove_ns_and_neigh(v: VmNet) -> None:
    netns.remove_sync(v.ns)
    neigh_delete(v)


async def teardown(v: VmNet, reaper: LinkReaper, batcher: nft.Batcher) -> None:
    """Namespace first, the host neighbour entry, then the nft elements (batched
    with other VMs' teardowns). Returns without waiting for the devices: the
    kernel destroys tap_ and vn_ with the namespace once its last user is gone,
    and vh_ with vn_; the reaper deletes vh_ if it outlives its grace period."""
    await netns.run(None, remove_ns_and_neigh, v)
    reaper.expect_gone(v.alloc.host_veth)
    await remove_elements(rules.firewall_elements(v.alloc) + rules.forward_elements(v.alloc), batcher)


# --- steps -------------------------------------------------------------------------


class NetlinkStep:
    """A step made of blocking functions run on the namespace pool."""

    def __init__(
        self,
        name: str,
        v: VmNet,
        ready: Callable[[VmNet], bool],
        do: Callable[[VmNet], None],
        undo: Callable[[VmNet], None],
    ) -> None:
        self.name = name
        self._v, self._ready, self._do, self._undo = v, ready, do, undo

    async def is_done(self) -> bool:
        run = self._v.run
        if run.ready is not None and self.name in run.ready:
            return run.ready[self.name]  # checked a moment ago, with the netns step
        if not netns.exists(self._v.ns) or (run.fresh_ns and self.name != "netns"):
            return False  # nothing to ask the kernel
        if self.name == "netns" and run.ready is None:
            # Re-applying an existing network (start-up, boot): one trip to the
            # pool for all the checks instead of one per step.
            run.ready = await netns.run(None, _all_ready, self._v)
        if run.ready is not None and self.name in run.ready:
            return run.ready[self.name]
        return await netns.run(None, self._ready, self._v)

    async def do(self) -> None:
        self._v.run.ready = None  # what this changes may change the later steps' state
        await netns.run(None, self._do, self._v)

    async def undo(self) -> None:
        await netns.run(None, self._undo, self._v)


class VethStep(NetlinkStep):
    def __init__(self, v: VmNet, reaper: LinkReaper) -> None:
        super().__init__("veth", v, veth_ready, veth_create, lambda v: None)
        self._reaper = reaper

    async def undo(self) -> None:
        await self._reaper.delete(self._v.alloc.host_veth)


class RateLimitStep:
    """tbf on ``tap_`` egress (rx: what the guest receives) and on ``vn_``
    egress (tx: what the guest sends, which leaves the namespace only there)."""

    name = "ratelimit"

    def __init__(self, v: VmNet) -> None:
        self._v = v

    def _wanted(self) -> dict[str, RateLimit]:
        a = self._v.alloc
        out = {}
        if a.rx_rate_limit is not None:
            out[a.tap] = a.rx_rate_limit
        if a.tx_rate_limit is not None:
            out[a.ns_veth] = a.tx_rate_limit
        return out

    async def is_done(self) -> bool:
        wanted = self._wanted()
        if not wanted:
            return True
        if self._v.run.fresh_ns:
            return False
        return await tc.has_shaping(self._v.ns, wanted)

    async def do(self) -> None:
        await tc.apply(self._v.ns, self._wanted())

    async def undo(self) -> None:
        if self._wanted() and netns.exists(self._v.ns):
            await tc.clear(self._v.ns, list(self._wanted()))


class ElementsStep:
    """Add nft set/map elements. ``do`` uses ``create`` so that it can tell
    whether it added them (and so ``undo`` removes only what it added).

    Re-applying an existing VM network (the plan found the namespace there:
    start-up, boot) uses ``add`` at once: the elements are most likely present,
    and a failing ``create`` per VM would make a combined transaction of many
    VMs fail and be bisected into about two transactions per VM."""

    def __init__(
        self, name: str, elements: list[rules.Element], batcher: nft.Batcher, run: RunState | None = None
    ) -> None:
        self.name = name
        self.elements = elements
        self.batcher = batcher
        self._run = run
        self._added = False

    async def is_done(self) -> bool:
        return not self.elements

    async def do(self) -> None:
        if self._run is not None and not self._run.fresh_ns:
            await self.batcher.apply(rules.add_script(self.elements))
        else:
            try:
                await self.batcher.apply(rules.create_script(self.elements))
            except nft.NftError:
                # Some exist already (a re-run): make sure all do, and own them.
                await self.batcher.apply(rules.add_script(self.elements))
        self._added = True

    async def undo(self) -> None:
        if self._added:
            await remove_elements(self.elements, self.batcher)
            self._added = False


async def remove_elements(elements: list[rules.Element], batcher: nft.Batcher) -> None:
    """Remove elements, present or not, in one transaction (one by one, ignoring
    failures, if that fails: e.g. a map key now holds another VM's value)."""
    if not elements:
        return
    try:
        await batcher.apply(rules.remove_script(elements))
    except nft.NftError:
        for element in elements:
            try:
                await batcher.apply(rules.remove_script([element]))
            except nft.NftError as exc:
                log.warning("nft element not removed", extra={"error": str(exc)})


def _all_ready(v: VmNet) -> dict[str, bool]:
    """Every netlink step's readiness (stops at the first that is not ready:
    the later ones are checked again after it has run)."""
    out: dict[str, bool] = {}
    if not netns.exists(v.ns):
        return {"netns": False}
    with netns.shared_ns_ipr(v.ns):
        for name, ready in _READY:
            out[name] = ready(v)
            if not out[name]:
                break
    return out


_READY: tuple[tuple[str, Callable[[VmNet], bool]], ...] = (
    ("netns", netns_ready),
    ("veth", veth_ready),
    ("tap", tap_ready),
    ("proxy_arp", proxy_ready),
    ("routes", routes_ready),
    ("neighbours", neigh_ready),
)


def steps(v: VmNet, reaper: LinkReaper, batcher: nft.Batcher) -> list[Step]:
    """The per-VM plan steps, in order."""
    return [
        NetlinkStep("netns", v, netns_ready, netns_create, netns_remove),
        VethStep(v, reaper),
        NetlinkStep("tap", v, tap_ready, tap_create, tap_delete),
        NetlinkStep("proxy_arp", v, proxy_ready, proxy_on, proxy_off),
        NetlinkStep("routes", v, routes_ready, routes_set, routes_delete),
        NetlinkStep("neighbours", v, neigh_ready, neigh_set, neigh_delete),
        RateLimitStep(v),
        ElementsStep("firewall", rules.firewall_elements(v.alloc), batcher, v.run),
        ElementsStep("port_forwards", rules.forward_elements(v.alloc), batcher, v.run),
    ]


class ReappliedElements:
    """An nft element step re-applied on an existing VM network: the idempotent
    ``add`` at once (one coalesced transaction for many VMs; a ``create`` would
    fail on present elements and be bisected transaction by transaction, which
    made a 1000-VM start-up take seconds), and no undo (it would remove
    elements the VM had before the operation)."""

    def __init__(self, step: ElementsStep) -> None:
        self.name = step.name
        self._step = step

    async def is_done(self) -> bool:
        return await self._step.is_done()

    async def do(self) -> None:
        await self._step.batcher.apply(rules.add_script(self._step.elements))

    async def undo(self) -> None:
        return None


def reapply_steps(setup: list[Step]) -> list[Step]:
    """``setup`` for an existing VM network: the element steps never undo."""
    return [ReappliedElements(s) if isinstance(s, ElementsStep) else s for s in setup]
