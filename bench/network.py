"""Figure 1: one VM's network, set up and torn down, with metald's
NetworkManager and with the root deployment guide's ``ip``/``iptables``
commands, at 1, 100 and 1000 existing VM networks.

Both build the same topology per VM: namespace ``fc-<id>``, veth ``vh_``/``vn_``
(host end on ``br-vms``), TAP ``tap_`` in the namespace, forwarding and proxy
ARP in the namespace, the three routes, permanent neighbour entries (host and
namespace), and the per-VM firewall state (metald: two nft set elements; the
recipe: two ``iptables -A`` rules). Samples are sequential: K set-ups one
after the other, then their K teardowns, with N other VM networks (made the
same way) present. Each approach gets its own background; the other one's is
removed first.

Sizes: METALD_BENCH_NET_LEVELS (1,100,1000), METALD_BENCH_NET_SAMPLES (20),
METALD_BENCH_NET_BULK (100 VMs, 10 at a time; 0 skips).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    Dist,
    Figure,
    command_line,
    env_int,
    env_ints,
    fmt_ratio,
    load_average,
    require_isolated,
    write_figure,
)
from metald.config import Settings
from metald.core.models import NetworkAllocation
from metald.core.plan import Plan
from metald.network import bridges, names, netns
from metald.network.manager import NetworkManager
from metald.store.sqlite import Store

BRIDGE = "br-vms"
GATEWAY = "10.100.0.1"
RECIPE_CHAIN = "METALD-VMS"
BRIDGE_MAX_PORTS = 1023


# --- the guide's recipe ---------------------------------------------------------------


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class RecipeVm:
    index: int

    @property
    def short(self) -> str:
        return f"{0xA0000000 + self.index:08x}"

    @property
    def ns(self) -> str:
        return f"fc-recipe-{self.index}"

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.100.128.2")) + self.index))

    @property
    def vn_mac(self) -> str:
        return names.ns_veth_mac(self.short)

    @property
    def guest_mac(self) -> str:
        return names.guest_mac(self.ns)

    def rules(self) -> list[list[str]]:
        vh = f"vh_{self.short}"
        return [
            [RECIPE_CHAIN, "-i", BRIDGE, "-m", "physdev", "--physdev-in", vh, "-s", self.ip,
             "-m", "mac", "--mac-source", self.vn_mac, "-j", "ACCEPT"],
            [RECIPE_CHAIN, "-i", BRIDGE, "-m", "physdev", "--physdev-in", vh, "-j", "DROP"],
        ]


def recipe_host_setup() -> None:
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{GATEWAY}/16", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "address", names.bridge_mac(BRIDGE), "up")
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("iptables", "-N", RECIPE_CHAIN)
    sh("iptables", "-A", "FORWARD", "-j", RECIPE_CHAIN)
    sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.100.0.0/16", "!", "-o", BRIDGE, "-j", "MASQUERADE")


def recipe_up(vm: RecipeVm) -> None:
    s, ns = vm.short, vm.ns
    vh, vn, tap = f"vh_{s}", f"vn_{s}", f"tap_{s}"
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", vh, "type", "veth", "peer", "name", vn)
    sh("ip", "link", "set", vn, "netns", ns)
    sh("ip", "link", "set", vh, "master", BRIDGE)
    sh("ip", "link", "set", vh, "up")
    sh("ip", "-n", ns, "link", "set", vn, "address", vm.vn_mac, "up")
    sh("ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap")
    sh("ip", "-n", ns, "link", "set", tap, "up")
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=1",
       f"net.ipv4.conf.{vn}.proxy_arp=1", f"net.ipv4.conf.{tap}.proxy_arp=1",
       f"net.ipv4.neigh.{vn}.proxy_delay=0", f"net.ipv4.neigh.{tap}.proxy_delay=0")
    sh("ip", "-n", ns, "route", "add", f"{GATEWAY}/32", "dev", vn, "scope", "link")
    sh("ip", "-n", ns, "route", "add", "default", "via", GATEWAY, "dev", vn)
    sh("ip", "-n", ns, "route", "add", f"{vm.ip}/32", "dev", tap)
    sh("ip", "neigh", "replace", vm.ip, "lladdr", vm.vn_mac, "dev", BRIDGE, "nud", "permanent")
    sh("ip", "-n", ns, "neigh", "replace", vm.ip, "lladdr", vm.guest_mac, "dev", tap, "nud", "permanent")
    sh("ip", "-n", ns, "neigh", "replace", GATEWAY, "lladdr", names.bridge_mac(BRIDGE), "dev", vn, "nud", "permanent")
    for rule in vm.rules():
        sh("iptables", "-A", *rule)


def recipe_down(vm: RecipeVm) -> None:
    for rule in vm.rules():
        sh("iptables", "-D", *rule)
    sh("ip", "netns", "del", vm.ns)
    sh("ip", "link", "del", f"vh_{vm.short}", check=False)  # usually still there: the namespace dies asynchronously
    sh("ip", "neigh", "del", vm.ip, "dev", BRIDGE, check=False)


def recipe_clear() -> None:
    """Remove every recipe VM quickly (not timed): rules, namespaces, links."""
    sh("iptables", "-F", RECIPE_CHAIN, check=False)
    for name in netns.list_names():
        if name.startswith("fc-recipe-"):
            netns.remove_sync(name)
    _delete_links("vh_a")
    sh("ip", "neigh", "flush", "dev", BRIDGE, "nud", "permanent", check=False)


def recipe_host_teardown() -> None:
    recipe_clear()
    sh("iptables", "-F", "FORWARD", check=False)
    sh("iptables", "-X", RECIPE_CHAIN, check=False)
    sh("iptables", "-t", "nat", "-F", "POSTROUTING", check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


def _delete_links(prefix: str) -> None:
    out = sh("ip", "-o", "link", "show").stdout
    batch = []
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix):
            batch.append(f"link set {name} group 99\n")
    if batch:
        subprocess.run(["ip", "-batch", "-"], input="".join(batch), text=True, capture_output=True, check=False)
        sh("ip", "link", "del", "group", "99", check=False)


def parallel(fn: Callable[[RecipeVm], None], vms: Sequence[RecipeVm], workers: int = 6) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, vms):
            pass


def recipe_level(level: int, samples: int, background_offset: int) -> tuple[list[float], list[float]]:
    """Set up ``level`` recipe VMs, then time ``samples`` set-ups and teardowns."""
    background = [RecipeVm(background_offset + i) for i in range(level)]
    parallel(recipe_up, background)
    sample_vms = [RecipeVm(i) for i in range(samples)]
    time.sleep(0.5)
    up, down = [], []
    for vm in sample_vms:
        t = time.perf_counter()
        recipe_up(vm)
        up.append(time.perf_counter() - t)
    time.sleep(0.5)
    for vm in sample_vms:
        t = time.perf_counter()
        recipe_down(vm)
        down.append(time.perf_counter() - t)
    recipe_clear()
    time.sleep(1)
    return up, down


def recipe_bulk(count: int, workers: int) -> tuple[float, float]:
    vms = [RecipeVm(i) for i in range(count)]
    t = time.perf_counter()
    parallel(recipe_up, vms, workers)
    up = time.perf_counter() - t
    t = time.perf_counter()
    parallel(recipe_down, vms, workers)
    down = time.perf_counter() - t
    recipe_clear()
    return up, down


# --- metald ------------------------------------------------------------------------


class Metald:
    def __init__(self, tmp: Path) -> None:
        self.store = Store(tmp / "metald.db")
        self.manager = NetworkManager(Settings(data_dir=tmp), self.store)  # type: ignore[call-arg]
        self.steps: dict[str, list[float]] = collections.defaultdict(list)

    def observe(self, step: str, outcome: str, seconds: float, exc: BaseException | None) -> None:
        self.steps[step.split(".", 1)[1]].append(seconds)

    async def up(self, vm_id: str, observe: bool = False) -> NetworkAllocation:
        t = time.perf_counter()
        alloc = await self.manager.allocate(vm_id, None)
        self.steps["allocate"].append(time.perf_counter() - t) if observe else None
        await Plan("net", self.manager.setup_steps(alloc), observers=[self.observe] if observe else []).run()
        return alloc

    async def down(self, vm_id: str, alloc: NetworkAllocation) -> None:
        await self.manager.teardown(alloc)
        await self.manager.release(vm_id)

    async def populate(self, prefix: str, count: int, batch: int = 50) -> list[tuple[str, NetworkAllocation]]:
        made: list[tuple[str, NetworkAllocation]] = []
        for start in range(0, count, batch):
            ids = [f"{prefix}-{i}" for i in range(start, min(count, start + batch))]
            allocs = await asyncio.gather(*(self.up(vm_id) for vm_id in ids))
            made += list(zip(ids, allocs, strict=True))
        return made

    async def clear(self, made: list[tuple[str, NetworkAllocation]], batch: int = 100) -> None:
        for start in range(0, len(made), batch):
            await asyncio.gather(*(self.down(v, a) for v, a in made[start : start + batch]))

    async def level(self, level: int, samples: int) -> tuple[list[float], list[float]]:
        background = await self.populate(f"bg{level}", level)
        await asyncio.sleep(0.5)
        up, made = [], []
        for i in range(samples):
            vm_id = f"sample{level}-{i}"
            t = time.perf_counter()
            alloc = await self.up(vm_id, observe=True)
            up.append(time.perf_counter() - t)
            made.append((vm_id, alloc))
        await asyncio.sleep(0.5)
        down = []
        for vm_id, alloc in made:
            t = time.perf_counter()
            await self.down(vm_id, alloc)
            down.append(time.perf_counter() - t)
        await self.clear(background)
        await asyncio.sleep(1)
        return up, down

    async def bulk(self, count: int, concurrency: int) -> tuple[float, float]:
        sem = asyncio.Semaphore(concurrency)
        made: list[tuple[str, NetworkAllocation]] = []

        async def one_up(vm_id: str) -> None:
            async with sem:
                made.append((vm_id, await self.up(vm_id)))

        async def one_down(vm_id: str, alloc: NetworkAllocation) -> None:
            async with sem:
                await self.down(vm_id, alloc)

        t = time.perf_counter()
        await asyncio.gather(*(one_up(f"bulk-{i}") for i in range(count)))
        up = time.perf_counter() - t
        t = time.perf_counter()
        await asyncio.gather(*(one_down(v, a) for v, a in made))
        return up, time.perf_counter() - t


def reset_host() -> None:
    for name in netns.list_names():
        if name.startswith("fc-"):
            netns.remove_sync(name)
    for prefix in ("vh_", "vbp_", "vbs_", BRIDGE + "-"):  # + metald's extra bridges and their links
        _delete_links(prefix)
    sh("ip", "link", "del", BRIDGE, check=False)
    sh("nft", "flush", "ruleset", check=False)
    bridges.forget()


# --- the figure ------------------------------------------------------------------------


async def main_async(levels: list[int], samples: int, bulk: int) -> Figure:
    fig = Figure(
        key="network",
        title="1. One VM's network: set-up and teardown, metald NetworkManager vs the guide's ip/iptables commands",
        command=command_line("METALD_BENCH_NET_LEVELS", "METALD_BENCH_NET_SAMPLES", "METALD_BENCH_NET_BULK"),
        columns=[
            "existing VM networks", "metald set-up ms (median / p95 / p99)", "recipe set-up ms",
            "set-up ratio", "metald teardown ms", "recipe teardown ms", "teardown ratio",
            "set-up + teardown ratio (medians)",
        ],
        load_before=list(load_average()),
    )
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="metald-bench-net-"))
    breakdown: dict[int, dict[str, float]] = {}
    try:
        for level in levels:
            if level + samples > BRIDGE_MAX_PORTS:
                fig.notes.append(f"level {level}: {level}+{samples} samples exceed the bridge's "
                                 f"{BRIDGE_MAX_PORTS} ports; background reduced to {BRIDGE_MAX_PORTS - samples}")
            background = min(level, BRIDGE_MAX_PORTS - samples)
            reset_host()
            metald = Metald(tmp / f"l{level}")
            await metald.manager.setup_host()
            m_up, m_down = await metald.level(background, samples)
            breakdown[level] = {step: Dist.of_seconds(v).median for step, v in metald.steps.items()}
            reset_host()
            recipe_host_setup()
            r_up, r_down = await asyncio.to_thread(recipe_level, background, samples, 1000)
            recipe_host_teardown()
            mu, md, ru, rd = (Dist.of_seconds(x) for x in (m_up, m_down, r_up, r_down))
            fig.rows.append([
                str(level), mu.short(), ru.short(), fmt_ratio(ru.median, mu.median), md.short(), rd.short(),
                fmt_ratio(rd.median, md.median), fmt_ratio(ru.median + rd.median, mu.median + md.median),
            ])
            fig.extra[f"level_{level}"] = {"metald_up": mu.__dict__, "metald_down": md.__dict__,
                                           "recipe_up": ru.__dict__, "recipe_down": rd.__dict__}
            setup_ratio = ru.median / mu.median
            fig.target(f"set-up at {level} existing: metald >= 10x faster than the recipe", ">= 10x",
                       f"{setup_ratio:.1f}x", setup_ratio >= 10)
            total_ratio = (ru.median + rd.median) / (mu.median + md.median)
            fig.target(f"set-up + teardown at {level} existing: metald >= 10x faster", ">= 10x",
                       f"{total_ratio:.1f}x", total_ratio >= 10)
        if bulk:
            reset_host()
            metald = Metald(tmp / "bulk")
            await metald.manager.setup_host()
            m_bulk = await metald.bulk(bulk, 10)
            reset_host()
            recipe_host_setup()
            r_bulk = await asyncio.to_thread(recipe_bulk, bulk, 10)
            recipe_host_teardown()
            fig.notes.append(
                f"Throughput, {bulk} VM networks 10 at a time (metald: 10 concurrent tasks; recipe: 10 threads "
                f"running the commands): set-up {bulk / m_bulk[0]:.0f} vs {bulk / r_bulk[0]:.0f} VMs/s "
                f"({fmt_ratio(r_bulk[0], m_bulk[0])}), teardown {bulk / m_bulk[1]:.0f} vs {bulk / r_bulk[1]:.0f} "
                f"VMs/s ({fmt_ratio(r_bulk[1], m_bulk[1])})."
            )
        steps = sorted({s for b in breakdown.values() for s in b})
        table = " | ".join(["step", *(f"{lv} existing" for lv in breakdown)])
        lines = [f"| {table} |", "|" + "---|" * (len(breakdown) + 1)]
        for step in steps:
            lines.append("| " + " | ".join([step, *(f"{b.get(step, 0):.2f}" for b in breakdown.values())]) + " |")
        fig.extra["breakdown_markdown"] = "\n".join(lines)
    finally:
        reset_host()
        shutil.rmtree(tmp, ignore_errors=True)
    fig.load_after = list(load_average())
    fig.seconds = time.monotonic() - started
    return fig


def main() -> None:
    require_isolated()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    levels = env_ints("METALD_BENCH_NET_LEVELS", [1, 100, 1000])
    samples = env_int("METALD_BENCH_NET_SAMPLES", 20)
    bulk = env_int("METALD_BENCH_NET_BULK", 100)
    fig = asyncio.run(main_async(levels, samples, bulk))
    print(write_figure(fig))


if __name__ == "__main__":
    main()
