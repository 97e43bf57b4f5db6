"""Figure: one VM's jail, set up and removed, with none and with many jails
present (the per-VM jail cost must not grow with the number of VMs).

A jail is what the integrated jailer makes before a VMM starts: the chroot
tree, the kernel hard-linked in, /dev/kvm and /dev/net/tun device nodes, and a
cgroup with memory, CPU and pids limits (Firecracker's layout, which has every
step; QEMU's skips the assets and device nodes). The background jails are
real too. Everything lives under a temporary chroot directory and a cgroup
parent of its own, removed at the end.

Sizes: METALD_BENCH_JAILS (1000), METALD_BENCH_JAIL_SAMPLES (30).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Dist, Figure, command_line, env_int, load_average, require_isolated, write_figure
from metald.config import Settings
from metald.core.models import BootSpec
from metald.core.plan import Plan
from metald.jailer.jailer import Jailer

VMM = "firecracker"
BATCH = 25


def _spec(vm_id: str, kernel: Path, run_dir: Path) -> BootSpec:
    return BootSpec(vm_id=vm_id, vcpu_count=1, memory_bytes=128 << 20, kernel_path=kernel, initrd_path=None,
                    kernel_args="console=ttyS0", drives=(), network=None, run_dir=run_dir,
                    console_log=run_dir / "console.log")


class Jails:
    def __init__(self, tmp: Path) -> None:
        self.kernel = tmp / "vmlinux"
        self.kernel.write_bytes(b"\0" * 4096)
        self.run_dir = tmp / "run"
        self.run_dir.mkdir()
        settings = Settings(  # type: ignore[call-arg]
            data_dir=tmp / "data", jailer_chroot_dir=tmp / "jails", jailer_uid=61000, jailer_gid=61000,
            jailer_cgroup_parent=f"metald-bench-{os.getpid()}",
        )
        settings.jailer_chroot_dir.mkdir()
        self.jailer = Jailer(settings)
        self.jailer.check_settings()

    async def up(self, vm_id: str) -> float:
        jail = self.jailer.jail_for(VMM, vm_id)
        started = time.perf_counter()
        await Plan("jail", self.jailer.prepare_steps(jail, _spec(vm_id, self.kernel, self.run_dir))).run()
        return time.perf_counter() - started

    async def down(self, vm_id: str) -> float:
        started = time.perf_counter()
        await self.jailer.cleanup(self.jailer.jail_for(VMM, vm_id))
        return time.perf_counter() - started

    async def many(self, fn: object, ids: list[str]) -> None:
        for start in range(0, len(ids), BATCH):
            await asyncio.gather(*(fn(v) for v in ids[start : start + BATCH]))  # type: ignore[operator]

    async def samples(self, prefix: str, count: int) -> tuple[list[float], list[float]]:
        ups = [await self.up(f"{prefix}-{i}") for i in range(count)]
        downs = [await self.down(f"{prefix}-{i}") for i in range(count)]
        return ups, downs


async def main_async(n: int, samples: int) -> Figure:
    fig = Figure(
        key="jail",
        title="8. One VM's jail (chroot, kernel, device nodes, cgroup with limits), set up and removed",
        command=command_line("METALD_BENCH_JAILS", "METALD_BENCH_JAIL_SAMPLES"),
        columns=["jails present", "set-up ms (median / p95 / p99)", "removal ms (median / p95 / p99)", "samples"],
        load_before=list(load_average()),
    )
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="metald-bench-jail-"))
    jails = Jails(tmp)
    background = [f"bg-{i:05d}" for i in range(n)]
    try:
        await jails.samples("warm", samples)
        up0, down0 = await jails.samples("empty", samples)
        t = time.monotonic()
        await jails.many(jails.up, background)
        fig.notes.append(f"{n} background jails made in {time.monotonic() - t:.1f} s ({BATCH} at a time)")
        upn, downn = await jails.samples("full", samples)
        t = time.monotonic()
        await jails.many(jails.down, background)
        fig.notes.append(f"and removed in {time.monotonic() - t:.1f} s")
        background = []
        up0b, down0b = await jails.samples("again", samples)
    finally:
        await jails.many(jails.down, background)
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in jails.jailer.cgroup_fs.parents():
            try:
                parent.rmdir()
            except OSError:
                pass
    d0, dn = Dist.of_seconds(up0 + up0b), Dist.of_seconds(upn)
    fig.rows.append(["0 (before)", Dist.of_seconds(up0).short(), Dist.of_seconds(down0).short(), str(len(up0))])
    fig.rows.append([str(n), dn.short(), Dist.of_seconds(downn).short(), str(len(upn))])
    fig.rows.append(["0 (after)", Dist.of_seconds(up0b).short(), Dist.of_seconds(down0b).short(), str(len(up0b))])
    fig.notes.append("The ratio compares the median with the jails present to the median of both runs with none.")
    ratio = dn.median / d0.median
    fig.target(f"jail set-up median with {n} jails present / with 0", "<= 1.5x", f"{ratio:.2f}x", ratio <= 1.5)
    fs = jails.jailer.cgroup_fs
    fig.notes.append(f"cgroup hierarchy: {'v2' if fs.version == 2 else 'v1'}; layout of a {VMM} jail "
                     "(chroot tree, kernel hard link, /dev/kvm and /dev/net/tun nodes, cgroup)")
    fig.load_after = list(load_average())
    fig.seconds = time.monotonic() - started
    return fig


def main() -> None:
    require_isolated()
    fig = asyncio.run(main_async(env_int("METALD_BENCH_JAILS", 1000), env_int("METALD_BENCH_JAIL_SAMPLES", 30)))
    print(write_figure(fig))
    for row in fig.rows:
        print(" | ".join(row))
    for t in fig.targets:
        print(t)


if __name__ == "__main__":
    main()
