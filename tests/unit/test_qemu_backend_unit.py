"""QemuBackend behaviour that needs no running QEMU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from metald.backends import procfs
from metald.backends.qemu import QemuBackend
from metald.config import Settings
from metald.core.errors import BackendError
from metald.core.models import BootSpec


def make_backend(tmp_path: Path, **kw: object) -> QemuBackend:
    return QemuBackend(Settings(run_dir=tmp_path / "run", data_dir=tmp_path / "data", **kw))  # type: ignore[arg-type]


async def test_unknown_vm_is_reported_not_running(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    assert not backend.is_running("nope")
    assert (await backend.info("nope"))["status"] == "not running"
    m = await backend.metrics("nope")
    assert not m.measured and "process" in m.notes
    assert await backend.shutdown("nope", force=True, timeout_s=0) == "not running"
    with pytest.raises(BackendError):
        await backend.pause("nope")
    await backend.close()


async def test_cleanup_of_unknown_vm_removes_only_its_files(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    run_dir = tmp_path / "run" / "vm1"
    run_dir.mkdir(parents=True)
    for name in ("qmp.sock", "qemu.pid", "vmm.log"):
        (run_dir / name).write_text("1\n")  # pid 1 is never QEMU: must not be signalled
    await backend.cleanup("vm1")
    assert not run_dir.exists()
    assert (tmp_path / "run").is_dir()


async def test_ping_reports_missing_binary(tmp_path: Path) -> None:
    backend = make_backend(tmp_path, qemu_binary="/nonexistent/qemu")
    ok, detail = await backend.ping()
    assert not ok and "not found" in detail


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
async def test_ping_reads_version(tmp_path: Path) -> None:
    ok, detail = await make_backend(tmp_path).ping()
    assert ok and detail.startswith("QEMU ")


async def test_adopt_refuses_foreign_handles(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    spec = BootSpec(
        vm_id="vm1",
        vcpu_count=1,
        memory_bytes=128 << 20,
        kernel_path=tmp_path / "k",
        initrd_path=None,
        kernel_args="",
        drives=(),
        network=None,
        run_dir=tmp_path / "run" / "vm1",
        console_log=tmp_path / "run" / "vm1" / "console.log",
    )
    assert not await backend.adopt(spec, {})
    assert not await backend.adopt(spec, {"backend": "firecracker", "pid": 1})
    # This test process is alive, but it is not that VM's QEMU.
    me = procfs.read_stat(os.getpid())
    assert me is not None
    fake = {
        "pid": os.getpid(),
        "start_time": me.start_time,
        "qmp_socket": str(spec.run_dir / "qmp.sock"),
        "accel": "tcg",
        "argv_hash": "0" * 64,
    }
    assert not await backend.adopt(spec, fake)
    assert not backend.is_running("vm1")
