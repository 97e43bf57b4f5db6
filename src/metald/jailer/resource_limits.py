"""How much memory, CPU, tasks and file descriptors one jailed VMM may use.

The limits are derived from the VM's BootSpec plus the jailer settings:

* ``memory_max`` (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``) =
  guest memory rounded up to whole MiB (what QEMU actually allocates, see
  ``memory_mib`` in the QEMU command) + ``UNKEY_METALD_JAILER_MEMORY_LIMIT``,
  rounded up to a 4 KiB page (the kernel rounds limits down to pages). The
  setting is the VMM's own overhead allowance *on top of* the guest, so a VM
  is never capped below what it was given.
* CPU: ``cpu_percent`` = ``vcpus * 100 + UNKEY_METALD_JAILER_CPU_QUOTA`` percent
  of one host CPU, enforced per ``CPU_PERIOD_US`` (100 ms): quota
  ``cpu_percent * 1000`` µs (v2 ``cpu.max = "<quota> 100000"``, v1
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``). A VM can always run all its
  vCPUs flat out, plus the extra share for the VMM's I/O and emulation threads.
* ``pids_max`` = ``PIDS_BASE + PIDS_PER_VCPU * vcpus`` (256 + 2 per vCPU): the
  cgroup counts threads; QEMU needs one per vCPU plus its main loop, RCU,
  I/O and a worker pool of up to 64, Firecracker far fewer. The cap only
  stops a runaway fork/thread bomb.
* ``nofile`` (RLIMIT_NOFILE, soft = hard) = ``UNKEY_METALD_JAILER_FD_LIMIT``,
  which must be at least ``fds_needed(vcpus)`` = ``FD_BASE + FD_PER_VCPU *
  vcpus`` (64 + 8 per vCPU: a vCPU fd, its eventfds/irqfds and ioeventfds, on top
  of 64 for the VM fd, devices, TAP, drives, sockets and logs).
"""

from __future__ import annotations

from dataclasses import dataclass

from metald.config import Settings
from metald.core.errors import InvalidArgument
from metald.core.models import BootSpec

MIB = 1 << 20
PAGE = 4096
CPU_PERIOD_US = 100_000
PIDS_BASE = 256
PIDS_PER_VCPU = 2
FD_BASE = 64
FD_PER_VCPU = 8


@dataclass(frozen=True)
class Limits:
    memory_max: int  # bytes
    cpu_percent: int  # percent of one host CPU
    cpu_period_us: int
    pids_max: int
    nofile: int

    @property
    def cpu_quota_us(self) -> int:
        return self.cpu_percent * self.cpu_period_us // 100


def fds_needed(vcpus: int) -> int:
    """The smallest RLIMIT_NOFILE a VMM with ``vcpus`` vCPUs is given."""
    return FD_BASE + FD_PER_VCPU * vcpus


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def limits_for(settings: Settings, spec: BootSpec) -> Limits:
    """The limits for ``spec``; rejects a vCPU count the fd limit cannot serve."""
    need = fds_needed(spec.vcpu_count)
    if settings.jailer_fd_limit < need:
        raise InvalidArgument(
            "config.cpu.vcpu_count",
            f"{spec.vcpu_count} vCPUs need {need} file descriptors but "
            f"UNKEY_METALD_JAILER_FD_LIMIT is {settings.jailer_fd_limit}",
        )
    guest = _round_up(spec.memory_bytes, MIB)
    return Limits(
        memory_max=_round_up(guest + settings.jailer_memory_limit, PAGE),
        cpu_percent=spec.vcpu_count * 100 + settings.jailer_cpu_quota,
        cpu_period_us=CPU_PERIOD_US,
        pids_max=PIDS_BASE + PIDS_PER_VCPU * spec.vcpu_count,
        nofile=settings.jailer_fd_limit,
    )
