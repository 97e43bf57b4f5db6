"""Figure 10: a VM's network end to end through the API against the guide's recipe.

A plain HTTP client (bench.client: Connect, binary, one keep-alive connection)
makes CreateVm + DeleteVm (no boot) on a real ``metald serve`` (network and
jailer on), interleaved sample by sample with the root deployment guide's
``ip``/``sysctl``/``iptables`` recipe (bench.network) set up and torn down, in
one private namespace, with N VMs of each present. metald uses its own bridge
and subnet (``br-md``, 10.200.0.0/16) so the two never share a device.

Sizes: METALD_BENCH_E2E_LEVELS (0,1000), METALD_BENCH_E2E_SAMPLES (20).
Targets (issue 18): metald at least 10x cheaper at both sizes, its cost growing
at most 1.3x from the empty host to N.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from bench.client import Connection
from bench.common import (
    Dist,
    Figure,
    command_line,
    env_int,
    env_ints,
    fmt_ratio,
    load_average,
    require_isolated,
    start_daemon,
    write_figure,
)
from bench.network import (
    RecipeVm,
    parallel,
    recipe_down,
    recipe_host_setup,
    recipe_host_teardown,
    recipe_up,
    reset_host,
)
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb

HOST = "127.0.0.1"


def config() -> pb.VmConfig:
    return pb.VmConfig(cpu=pb.CpuConfig(vcpu_count=1), memory=pb.MemoryConfig(size_bytes=32 << 20))


async def populate(port: int, prefix: str, count: int, clients: int = 8) -> None:
    queue = list(range(count))

    async def worker() -> None:
        conn = await Connection(HOST, port).open()
        while queue:
            i = queue.pop()
            await conn.call("CreateVm", pb.CreateVmRequest(vm_id=f"{prefix}-{i}", config=config()),
                            pb.CreateVmResponse)
        await conn.close()

    await asyncio.gather(*(worker() for _ in range(clients)))


async def level(port: int, n: int, samples: int, tag: str) -> tuple[list[float], list[float]]:
    await populate(port, f"bg{tag}", n)
    background = [RecipeVm(10_000 + i) for i in range(n)]
    await asyncio.to_thread(parallel, recipe_up, background)
    await asyncio.sleep(1)
    conn = await Connection(HOST, port).open()
    ours, theirs = [], []
    for i in range(samples):
        t = time.perf_counter()
        await conn.call("CreateVm", pb.CreateVmRequest(vm_id=f"e2e{tag}-{i}", config=config()), pb.CreateVmResponse)
        await conn.call("DeleteVm", pb.DeleteVmRequest(vm_id=f"e2e{tag}-{i}"), pb.DeleteVmResponse)
        ours.append(time.perf_counter() - t)
        vm = RecipeVm(i)
        t = time.perf_counter()
        await asyncio.to_thread(recipe_up, vm)
        await asyncio.to_thread(recipe_down, vm)
        theirs.append(time.perf_counter() - t)
    await conn.close()
    return ours, theirs


async def main_async(levels: list[int], samples: int, fig: Figure) -> None:
    medians: dict[int, tuple[float, float]] = {}
    for n in levels:
        reset_host()
        recipe_host_setup()
        tmp = Path(tempfile.mkdtemp(prefix="metald-bench-e2e-"))
        daemon = start_daemon(tmp, UNKEY_METALD_NETWORK_BRIDGE="br-md",
                              UNKEY_METALD_NETWORK_BRIDGE_IPV4="10.200.0.1/16",
                              UNKEY_METALD_NETWORK_VM_SUBNET_IPV4="10.200.0.0/16")
        try:
            ours, theirs = await level(daemon.port, n, samples, str(n))
        finally:
            daemon.kill()
            shutil.rmtree(tmp, ignore_errors=True)
            recipe_host_teardown()
            reset_host()
        a, b = Dist.of_seconds(ours), Dist.of_seconds(theirs)
        medians[n] = (a.median, b.median)
        fig.rows.append([str(n), a.short(), b.short(), fmt_ratio(b.median, a.median), str(samples)])
    for n in levels:
        ratio = medians[n][1] / medians[n][0]
        fig.target(f"recipe / metald with {n} VMs of each present", ">= 10x", f"{ratio:.1f}x", ratio >= 10)
    if len(levels) > 1:
        growth = medians[levels[-1]][0] / medians[levels[0]][0]
        recipe_growth = medians[levels[-1]][1] / medians[levels[0]][1]
        fig.target(f"metald's growth from {levels[0]} to {levels[-1]} VMs", "<= 1.3x", f"{growth:.2f}x",
                   growth <= 1.3)
        fig.notes.append(f"The recipe's cost grew {recipe_growth:.2f}x over the same range.")


def main() -> None:
    require_isolated()
    levels = env_ints("METALD_BENCH_E2E_LEVELS", [0, 1000])
    samples = env_int("METALD_BENCH_E2E_SAMPLES", 20)
    cmd = command_line("METALD_BENCH_E2E_LEVELS", "METALD_BENCH_E2E_SAMPLES")
    fig = Figure("e2e_network", "10. A VM's network end to end through the API (CreateVm + DeleteVm, no boot) "
                 "against the guide's recipe", cmd,
                 ["VMs of each present", "metald CreateVm+DeleteVm ms (median / p95 / p99)",
                  "recipe up+down ms", "recipe / metald (medians)", "samples"])
    load = list(load_average())
    started = time.monotonic()
    asyncio.run(main_async(levels, samples, fig))
    fig.load_before, fig.load_after = load, list(load_average())
    fig.seconds = time.monotonic() - started
    print(write_figure(fig))
    for row in fig.rows:
        print(" | ".join(row))
    for t in fig.targets:
        print(t)


if __name__ == "__main__":
    main()
