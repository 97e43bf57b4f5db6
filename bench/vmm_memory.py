"""VMM overhead per VM: QEMU's resident memory for a 128 MiB guest under TCG, by mapping.

Boots one VM per translation-buffer size through a real metald (jailer and
network on), waits for METALD_GUEST_READY plus 5 s, and reads the QEMU
process's VmRSS and its largest mappings from /proc/<pid>/smaps.

    tests/isolated.sh .venv/bin/python -m bench.vmm_memory [TB_SIZE_MIB ...]   # default: 0 16
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

from tests.support.daemon import DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
GUEST_MIB = 128


def mappings(pid: int) -> list[tuple[int, str, int]]:
    """(size MiB, name, resident MiB) of every mapping, largest resident first."""
    out: list[list[object]] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append([(end - start) >> 20, parts[5] if len(parts) > 5 else "[anon]", 0])
        elif line.startswith("Rss:") and out:
            out[-1][2] = int(line.split()[1]) >> 10
    rows = [(int(s), str(n), int(r)) for s, n, r in out]  # type: ignore[call-overload]
    return sorted(rows, key=lambda m: -m[2])


def measure(tb_size: int) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench-vmm-"))
    d = DaemonProcess(tmp, ROOT / "build" / "image", UNKEY_METALD_JAILER_UID="61000",
                      UNKEY_METALD_JAILER_GID="61000", UNKEY_METALD_QEMU_ACCEL="tcg",
                      UNKEY_METALD_QEMU_TCG_TB_SIZE_MIB=str(tb_size))
    d.start()
    try:
        vm = "vmm-mem"
        d.rpc("CreateVm", {"vmId": vm, "config": {"cpu": {"vcpuCount": 1},
                                                  "memory": {"sizeBytes": str(GUEST_MIB << 20)}}})
        started = time.monotonic()
        d.rpc("BootVm", {"vmId": vm})
        d.wait_console(vm, "METALD_GUEST_READY", timeout=300)
        ready = time.monotonic() - started
        time.sleep(5)
        pid = int(d.rpc("GetVmInfo", {"vmId": vm})["backendInfo"]["pid"])
        rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) >> 10  # type: ignore[union-attr]
        top = mappings(pid)
        guest = next((r for s, _, r in top if s == GUEST_MIB), 0)
        tcg = next((r for s, n, r in top if n == "[anon]" and s in (tb_size - 1, tb_size, 1023, 1024)), 0)
        label = f"{tb_size} MiB" if tb_size else "QEMU default (1 GiB)"
        return (f"| {label} | {rss} | {rss - GUEST_MIB} | {guest} | {tcg} | {rss - guest - tcg} | {ready:.1f} |")
    finally:
        d.kill_with_vmms()


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [0, 16]
    print("| TCG tb-size | QEMU RSS MiB | over the 128 MiB guest | guest RAM resident | TCG code buffer | rest "
          "(QEMU binary, heap, TLBs, stacks) | BootVm to READY s |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        print(measure(size), flush=True)


if __name__ == "__main__":
    main()
