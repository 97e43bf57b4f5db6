"""Checks that a BootSpec can run under QEMU on this host, naming the bad field."""

from __future__ import annotations

import os

from metald.backends.qemu.command import MAX_SOCKET_PATH, qmp_socket_path
from metald.core.errors import InvalidArgument
from metald.core.files import check_regular_file
from metald.core.models import BootSpec

MIN_MEMORY_BYTES = 32 << 20
# QEMU's microvm machine accepts up to 288 vCPUs; a VM never needs more threads
# than this host has cores times this factor.
VCPU_OVERCOMMIT = 2


def max_vcpus() -> int:
    return max(1, (os.cpu_count() or 1) * VCPU_OVERCOMMIT)


def validate_spec(spec: BootSpec, vcpu_limit: int | None = None) -> None:
    limit = vcpu_limit or max_vcpus()
    if not 1 <= spec.vcpu_count <= limit:
        raise InvalidArgument("config.cpu.vcpu_count", f"must be between 1 and {limit} on this host")
    if spec.memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument("config.memory.size_bytes", f"must be at least {MIN_MEMORY_BYTES >> 20} MiB")
    check_regular_file("config.boot.kernel_path", spec.kernel_path)
    if spec.initrd_path is not None:
        check_regular_file("config.boot.initrd_path", spec.initrd_path)
    if "\0" in spec.kernel_args:
        raise InvalidArgument("config.boot.kernel_args", "contains a NUL byte")
    if sum(1 for d in spec.drives if d.is_root) > 1:
        raise InvalidArgument("config.storage", "more than one root device")
    for i, drive in enumerate(spec.drives):
        check_regular_file(f"config.storage[{i}].path", drive.path, writable=not drive.read_only)
    sock = str(qmp_socket_path(spec.run_dir))
    if len(sock.encode()) > MAX_SOCKET_PATH:
        raise InvalidArgument("vm_id", f"run directory too long for a unix socket: {sock}")
