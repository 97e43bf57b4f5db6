"""Figure 7: the QEMU boot path through the API, one VM after the other.

For each VM: CreateVm, then BootVm (returns once QEMU answers on QMP: the VMM
is ready), then the time until the guest's init prints METALD_GUEST_READY on
the serial console (the console file is polled every 10 ms). The VMs stay
running, so later boots share the CPU with the guests already up, as on a
host. Memory: each VMM's RSS when its guest is ready, and the daemon's RSS
with all of them running. The guest runs under TCG (software emulation): this
machine's /dev/kvm cannot run stock guest kernels (see the SPEC).

Sizes: METALD_BENCH_BOOTS (5), METALD_BENCH_BOOT_MEMORY_MIB (256).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.common import (
    IMAGE_DIR,
    Dist,
    Figure,
    command_line,
    env_int,
    load_average,
    require_isolated,
    rss_kib,
    start_daemon,
    write_figure,
)

MARKER = "METALD_GUEST_READY"
POLL_S = 0.01
READY_TIMEOUT_S = 180.0


def main() -> None:
    require_isolated()
    count = env_int("METALD_BENCH_BOOTS", 5)
    memory = env_int("METALD_BENCH_BOOT_MEMORY_MIB", 256)
    fig = Figure(
        "boot",
        f"7. QEMU boot path through the API ({count} VMs, sequential, {memory} MiB, 1 vCPU, TCG)",
        command_line("METALD_BENCH_BOOTS", "METALD_BENCH_BOOT_MEMORY_MIB"),
        ["VM", "BootVm ms (VMM ready)", "BootVm to METALD_GUEST_READY ms", "VMM RSS MiB at ready", "accel"],
        load_before=list(load_average()),
    )
    if not (IMAGE_DIR / "vmlinuz").exists():
        fig.notes.append(f"skipped: no guest image in {IMAGE_DIR} (make image)")
        print(write_figure(fig))
        return
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="metald-bench-boot-"))
    daemon = start_daemon(tmp)
    boots, readies, vmm_rss = [], [], []
    config = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(memory << 20)}}
    try:
        for i in range(count):
            vm = f"boot-{i}"
            daemon.rpc("CreateVm", {"vmId": vm, "config": config})
            t0 = time.monotonic()
            daemon.rpc("BootVm", {"vmId": vm})
            t1 = time.monotonic()
            console = daemon.run_dir / vm / "console.log"
            while MARKER not in (console.read_text(errors="replace") if console.exists() else ""):
                if time.monotonic() - t0 > READY_TIMEOUT_S:
                    raise RuntimeError(f"{vm}: no {MARKER} after {READY_TIMEOUT_S} s")
                time.sleep(POLL_S)
            t2 = time.monotonic()
            backend = daemon.rpc("GetVmInfo", {"vmId": vm}).get("backendInfo", {})
            pid = int(backend.get("pid", 0))
            rss = rss_kib(pid)[0] / 1024 if pid else float("nan")
            boots.append(t1 - t0)
            readies.append(t2 - t0)
            vmm_rss.append(rss)
            fig.rows.append([vm, f"{(t1 - t0) * 1000:.0f}", f"{(t2 - t0) * 1000:.0f}", f"{rss:.1f}",
                             backend.get("accel", "?")])
        b, r = Dist.of_seconds(boots), Dist.of_seconds(readies)
        fig.rows.append(["median / p95", f"{b.median:.0f} / {b.p95:.0f}", f"{r.median:.0f} / {r.p95:.0f}",
                         f"{sorted(vmm_rss)[len(vmm_rss) // 2]:.1f} / {max(vmm_rss):.1f} (max)", ""])
        rss, hwm = rss_kib(daemon.proc.pid)
        fig.notes.append(f"daemon RSS with {count} VMs running: {rss / 1024:.1f} MiB (peak {hwm / 1024:.1f} MiB)")
        fig.notes.append("p95 of a handful of samples is close to the maximum; the row per VM shows them all.")
        for i in range(count):
            daemon.rpc("DeleteVm", {"vmId": f"boot-{i}", "force": True})
    finally:
        daemon.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    fig.load_after = list(load_average())
    fig.seconds = time.monotonic() - started
    print(write_figure(fig))


if __name__ == "__main__":
    main()
