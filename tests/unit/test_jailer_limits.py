"""Resource limits of a jailed VMM: exactly what the module docstring promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from metald.config import Settings
from metald.core.errors import InvalidArgument
from metald.core.models import BootSpec
from metald.jailer import Jailer
from metald.jailer.cgroup import CgroupFs
from metald.jailer.resource_limits import fds_needed

MIB = 1 << 20
FS = CgroupFs(2, (("memory", Path("/cg")), ("cpu", Path("/cg")), ("pids", Path("/cg"))))


def spec(vcpus: int = 1, memory: int = 128 * MIB) -> BootSpec:
    return BootSpec(
        vm_id="vm1",
        vcpu_count=vcpus,
        memory_bytes=memory,
        kernel_path=Path("/img/vmlinuz"),
        initrd_path=None,
        kernel_args="",
        drives=(),
        network=None,
        run_dir=Path("/run/metald/vm1"),
        console_log=Path("/run/metald/vm1/console.log"),
    )


def jailer(**kw: object) -> Jailer:
    return Jailer(Settings(**kw), cgroup_fs=FS)  # type: ignore[arg-type]


def test_defaults_for_one_vcpu() -> None:
    lim = jailer().limits_for(spec())
    assert lim.memory_max == 128 * MIB + 134217728
    assert lim.cpu_percent == 200 and lim.cpu_period_us == 100_000 and lim.cpu_quota_us == 200_000
    assert lim.pids_max == 256 + 2
    assert lim.nofile == 1024


def test_memory_is_never_below_the_guest() -> None:
    lim = jailer(jailer_memory_limit=16 * MIB).limits_for(spec(memory=100 * MIB + 1))
    assert lim.memory_max == 101 * MIB + 16 * MIB  # guest rounded up to MiB, like QEMU
    assert lim.memory_max % 4096 == 0


def test_overhead_is_page_rounded() -> None:
    lim = jailer(jailer_memory_limit=16 * MIB + 1).limits_for(spec())
    assert lim.memory_max == 128 * MIB + 16 * MIB + 4096


def test_cpu_scales_with_vcpus() -> None:
    lim = jailer(jailer_cpu_quota=50).limits_for(spec(vcpus=4))
    assert lim.cpu_percent == 450 and lim.cpu_quota_us == 450_000
    assert jailer(jailer_cpu_quota=0).limits_for(spec(vcpus=2)).cpu_quota_us == 200_000
    assert lim.pids_max == 264


def test_fd_limit_must_serve_the_vcpus() -> None:
    assert fds_needed(1) == 72 and fds_needed(64) == 576
    with pytest.raises(InvalidArgument) as info:
        jailer(jailer_fd_limit=100).limits_for(spec(vcpus=8))
    assert info.value.field == "config.cpu.vcpu_count"
    assert "UNKEY_METALD_JAILER_FD_LIMIT" in str(info.value)
    assert jailer(jailer_fd_limit=128).limits_for(spec(vcpus=8)).nofile == 128
