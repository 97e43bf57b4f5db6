"""Giving TCG guests the TSC frequency so they do not calibrate it.

Under TCG the guest's TSC ticks at the host's TSC rate, but the guest kernel
measures it against the emulated PIT. On a busy host the emulated vCPU is
descheduled during that measurement; the kernel then reports "Unable to
calibrate against PIT ... Marking TSC unstable" and, with no HPET or ACPI PM
timer on microvm, hangs before userspace. ``tsc_early_khz=`` skips the
measurement. The value comes from the host kernel's own knowledge.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

SYS_TSC_KHZ = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
CPUINFO = Path("/proc/cpuinfo")
ARG = "tsc_early_khz"


KMSG = Path("/dev/kmsg")
# Most to least exact: the refined calibration, the TSC itself, the CPU clock.
KMSG_PATTERNS = (
    re.compile(r"tsc: Refined TSC clocksource calibration: ([0-9.]+) MHz"),
    re.compile(r"tsc: Detected ([0-9.]+) MHz TSC"),
    re.compile(r"tsc: Detected ([0-9.]+) MHz processor"),
)


def host_tsc_khz(sys_file: Path = SYS_TSC_KHZ, cpuinfo: Path = CPUINFO, kmsg: Path = KMSG) -> int | None:
    """The host TSC frequency in kHz as the host kernel knows it, else None.

    Sources: sysfs (some kernels), the kernel's own boot messages (while they
    are still in the ring buffer), then /proc/cpuinfo's "cpu MHz", which is
    the TSC rate only when the kernel took it from CPUID or the hypervisor
    (flag ``tsc_known_freq``) and does not report the live clock (``aperfmperf``).
    """
    try:
        return int(sys_file.read_text().strip())
    except (OSError, ValueError):
        pass
    from_log = _from_kernel_log(kmsg)
    if from_log is not None:
        return from_log
    return _from_cpuinfo(cpuinfo)


def _from_kernel_log(kmsg: Path) -> int | None:
    try:
        text = _read_kmsg(kmsg)
    except OSError:
        return None
    for pattern in KMSG_PATTERNS:
        match = pattern.search(text)
        if match:
            return round(float(match.group(1)) * 1000)
    return None


def _read_kmsg(kmsg: Path, limit: int = 1 << 20) -> str:
    """The kernel ring buffer, read without blocking (one record per read)."""
    fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    chunks: list[bytes] = []
    size = 0
    try:
        while size < limit:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # a record was overwritten while reading: go on
                continue
            if not record:
                break
            chunks.append(record)
            size += len(record)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _from_cpuinfo(cpuinfo: Path) -> int | None:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)$", text, re.M)
    if not flags or not mhz:
        return None
    names = set(flags.group(1).split())
    if "tsc_known_freq" not in names or "constant_tsc" not in names or "aperfmperf" in names:
        return None
    return round(float(mhz.group(1)) * 1000)


@functools.cache
def cached_host_tsc_khz() -> int | None:
    khz = host_tsc_khz()
    if khz is None:
        log.warning("host TSC frequency unknown: TCG guests may hang calibrating their TSC")
    return khz


def tcg_extra_args(kernel_args: str, tsc_khz: int | None) -> list[str]:
    """Kernel args to add for a TCG boot, unless the caller already chose them."""
    if tsc_khz is None or any(w.startswith(ARG + "=") for w in kernel_args.split()):
        return []
    return [f"{ARG}={tsc_khz}"]
