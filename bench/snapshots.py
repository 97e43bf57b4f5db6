"""Snapshots: cold boot vs resume of a hibernated VM vs a clone of a template,
each timed from the VMM start (boot or restore call) to the guest answering
HTTP on its own IP; snapshot time and size; host memory of clones vs cold VMs.

QEMU under the jailer, each VM in its own namespace, through the backend and
the snapshot module directly (the RPCs are not wired yet). Writes its section
of bench/RESULTS.md (between the ``snapshots`` markers).

    tests/isolated.sh .venv/bin/python -m bench.snapshots
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    IMAGE_DIR,
    ROOT,
    Dist,
    command_line,
    env_int,
    load_average,
    machine,
    require_isolated,
)

sys.path.insert(0, str(ROOT))

from metald.backends.qemu.snapshot import GuestIdentity, clone_drives, read_manifest  # noqa: E402
from tests.support.snapkit import Kit, wait_http  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- snapshots:begin -->", "<!-- snapshots:end -->"
MIB = 1 << 20
SIZE_VARIABLES = ("METALD_BENCH_SNAP_RUNS", "METALD_BENCH_SNAP_MEMORY_VMS", "METALD_BENCH_SNAP_BIG_MIB")


def smaps(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of a process in KiB, from /proc/<pid>/smaps_rollup."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def pid_of(kit: Kit, vm_id: str) -> int:
    return kit.backend._running(vm_id).handle.pid


def memory_of(kit: Kit, vm_ids: list[str]) -> tuple[float, float]:
    """Sum of (RSS, PSS) in MiB of the QEMUs of ``vm_ids``."""
    total_rss = total_pss = 0
    for vm_id in vm_ids:
        rss, pss = smaps(pid_of(kit, vm_id))
        total_rss += rss
        total_pss += pss
    return total_rss / 1024, total_pss / 1024


async def run(tmp: Path, runs: int, memory_vms: int, big_mib: int) -> dict[str, object]:
    kit = Kit(tmp, IMAGE_DIR)
    await kit.start()
    out: dict[str, object] = {}
    try:
        draft = kit.draft(128 * MIB)
        net_setup: list[float] = []

        # 1. cold boots (the first memory_vms stay up for the memory figure)
        cold: list[float] = []
        cold_ids = []
        for i in range(max(runs, memory_vms)):
            t0 = time.monotonic()
            vm = await kit.make_vm(f"cold-{i}", draft)
            net_setup.append(time.monotonic() - t0)
            t0 = time.monotonic()
            await kit.cold_boot(vm)
            await wait_http(vm.ip)
            cold.append(time.monotonic() - t0)
            cold_ids.append(vm.spec.vm_id)
        await asyncio.sleep(3)  # idle a moment like the clones below
        out["cold_memory"] = memory_of(kit, cold_ids[:memory_vms])
        for vm_id in cold_ids[1:]:
            await kit.remove(vm_id)
        template = kit.vms["cold-0"]

        # 2. the template snapshot (the guest keeps running)
        snap_dir = kit.settings.data_dir / "snapshots"
        snap_dir.mkdir(parents=True, exist_ok=True)
        tdir = snap_dir / "template"
        manifest, timings = await kit.snapshots.save(template.spec, tdir, stop=False)
        out["snapshot_128"] = (timings.total_s, timings.stopped_s, manifest.memory_disk_bytes, manifest.state_bytes,
                               manifest.disk_bytes)

        # 3. clones: overlays + restore + new identity, until HTTP answers with the clone's id
        clones: list[float] = []
        clone_ids = []
        for i in range(max(runs, memory_vms)):
            vm_id = f"clone-{i}"
            t0 = time.monotonic()
            manifest = read_manifest(tdir)
            drives, qcow2 = clone_drives(tdir, manifest, kit.settings.data_dir / "disks" / vm_id)
            t_disks = time.monotonic() - t0
            vm = await kit.make_vm(vm_id, draft, drives)
            t0 = time.monotonic()
            await kit.snapshots.restore(vm.spec, tdir, identity=GuestIdentity.for_clone(vm_id, vm.alloc), qcow2=qcow2)
            await wait_http(vm.ip, expect=vm_id)
            clones.append(time.monotonic() - t0 + t_disks)
            clone_ids.append(vm_id)
        await asyncio.sleep(3)
        out["clone_memory"] = memory_of(kit, clone_ids[:memory_vms])
        for vm_id in clone_ids:
            await kit.remove(vm_id)

        # 4. hibernate + resume of one VM, repeatedly
        resumes: list[float] = []
        hibernations: list[float] = []
        for i in range(runs):
            hdir = snap_dir / f"hib-{i}"
            t0 = time.monotonic()
            await kit.snapshots.save(template.spec, hdir, stop=True)
            hibernations.append(time.monotonic() - t0)
            t0 = time.monotonic()
            await kit.snapshots.restore(template.spec, hdir, identity=GuestIdentity(), require_ack=False)
            await wait_http(template.ip)
            resumes.append(time.monotonic() - t0)
            shutil.rmtree(hdir)
        out["cold"], out["clone"], out["resume"] = cold, clones, resumes
        out["hibernate"] = hibernations
        out["net_setup"] = net_setup
        await kit.remove("cold-0")

        # 5. a bigger guest: snapshot time and size
        if big_mib:
            vm = await kit.make_vm("big-0", kit.draft(big_mib * MIB))
            await kit.cold_boot(vm)
            await wait_http(vm.ip)
            manifest, timings = await kit.snapshots.save(vm.spec, snap_dir / "big", stop=False)
            out["snapshot_big"] = (timings.total_s, timings.stopped_s, manifest.memory_disk_bytes,
                                   manifest.state_bytes, manifest.disk_bytes)
            await kit.remove("big-0")
    finally:
        await kit.close()
    return out


def render(out: dict[str, object], runs: int, memory_vms: int, big_mib: int, load: list[float]) -> str:
    cold = Dist.of_seconds(out["cold"])  # type: ignore[arg-type]
    clone = Dist.of_seconds(out["clone"])  # type: ignore[arg-type]
    resume = Dist.of_seconds(out["resume"])  # type: ignore[arg-type]
    hib = Dist.of_seconds(out["hibernate"])  # type: ignore[arg-type]
    net = Dist.of_seconds(out["net_setup"])  # type: ignore[arg-type]
    m = machine()
    lines = [
        BEGIN,
        "## Snapshots: cold boot vs resume vs clone (QEMU, TCG, jailed)",
        "",
        "Command: `" + command_line(*SIZE_VARIABLES) + "`",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {m['cores']} cores, load average at start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; {runs} runs each, 128 MiB 1-vCPU guests. Each time runs "
        "from the VMM start (QEMU launched through the jailer; for a clone, from creating its qcow2 overlays) to "
        "the guest answering HTTP on its own IP (a clone: with its own id, so after it took its new identity). "
        f"The VM's network (namespace, TAP, rules) is made before and is the same for all three: {net.median:.0f} "
        "ms median.",
        "",
        "| start | n | median ms | p95 ms | vs cold (median) |",
        "|---|---|---|---|---|",
    ]
    for name, d in (("cold boot", cold), ("resume of a hibernated VM", resume), ("clone of a template", clone)):
        lines.append(f"| {name} | {d.n} | {d.median:.0f} | {d.p95:.0f} | {d.median / cold.median:.3f} |")
    lines += ["", "| snapshot | guest stopped ms | total ms | memory file on disk MiB | device state KiB"
              " | disk copies MiB |"]
    lines.append("|---|---|---|---|---|---|")
    for key, label in (("snapshot_128", "128 MiB guest, kept running"), ("snapshot_big", f"{big_mib} MiB guest")):
        if key in out:
            total, stopped, memory, state, disks = out[key]  # type: ignore[misc]
            ms = f"{stopped * 1000:.0f} | {total * 1000:.0f}"
            lines.append(f"| {label} | {ms} | {memory / MIB:.1f} | {state / 1024:.0f} | {disks / MIB:.1f} |")
    hib_ms = f"{hib.median:.0f} median, {hib.p95:.0f} p95"
    lines.append(f"| hibernate (snapshot + QEMU quit), {hib.n} runs | | {hib_ms} | | | |")
    crss, cpss = out["cold_memory"]  # type: ignore[misc]
    krss, kpss = out["clone_memory"]  # type: ignore[misc]
    lines += [
        "",
        f"Host memory of {memory_vms} VMs, sum over their QEMU processes ~3 s after each answered "
        "(/proc/PID/smaps_rollup):",
        "",
        "| VMs | RSS MiB | PSS MiB |",
        "|---|---|---|",
        f"| {memory_vms} cold-booted | {crss:.0f} | {cpss:.0f} |",
        f"| {memory_vms} clones of one template | {krss:.0f} | {kpss:.0f} |",
        "",
    ]
    targets = [
        ("resume <= 1/10 of cold boot (median)", resume.median <= cold.median / 10),
        ("clone <= 1/10 of cold boot (median)", clone.median <= cold.median / 10),
        ("resume median <= 250 ms", resume.median <= 250),
        ("clone median <= 250 ms", clone.median <= 250),
    ]
    lines += ["| target | met |", "|---|---|"] + [f"| {t} | {'yes' if ok else 'no'} |" for t, ok in targets]
    lines += ["", END]
    return "\n".join(lines)


def write_section(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# metald benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    require_isolated()
    runs = env_int("METALD_BENCH_SNAP_RUNS", 5)
    memory_vms = env_int("METALD_BENCH_SNAP_MEMORY_VMS", 5)
    big_mib = env_int("METALD_BENCH_SNAP_BIG_MIB", 1024)
    load = list(load_average())
    with tempfile.TemporaryDirectory(prefix="metald-bench-snap-") as tmp:
        out = asyncio.run(run(Path(tmp), runs, memory_vms, big_mib))
    section = render(out, runs, memory_vms, big_mib, load)
    print(section)
    write_section(section)
    print(f"bench: wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
