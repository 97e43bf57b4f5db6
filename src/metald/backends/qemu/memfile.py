"""Turn a full migration stream into a mappable guest-memory file plus a small
device-state stream, so restores map guest memory instead of reading it.

QEMU 7.2 has no mapped-ram migration format. Instead a short-lived converter
QEMU (never running the guest: ``-S -incoming defer``) loads the stream into
``-object memory-backend-file,share=on,mem-path=<dir>/memory`` (the RAM lands
in the file) and migrates out again with the ``x-ignore-shared`` capability,
which leaves the shared RAM out: the device state alone is ~100 KiB.

A restore then maps that file ``share=off`` (MAP_PRIVATE) with the same RAM
block id and loads only the device state: no copy of guest memory at start,
pages fault in lazily from the page cache, and clones of one template share
its unmodified pages (copy on write) - visible as PSS far below RSS.

The converter has the source's devices (device state must match): its drives
are the snapshot's disk copies opened ``snapshot=on`` (writes go nowhere), its
virtio-net backend a TAP QEMU creates itself inside a fresh network namespace
(``unshare --net``; virtio-net state needs a vnet_hdr peer), console null. It
confines itself like a VM's QEMU: ``-chroot`` to an empty directory,
``-runas`` the jail uid, seccomp.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from metald.backends.qemu.command import Accel, CommandOptions, build_argv, memory_mib
from metald.backends.qemu.qmp import QmpSession
from metald.core.errors import BackendError
from metald.core.models import BootSpec
from metald.jailer.qemu import SANDBOX

# QEMU's id of the RAM block of the microvm machine (its default_ram_id);
# the restore's memory backend must carry it so the stream's RAM section matches.
RAM_ID = "microvm.ram"
MEMORY_FILE = "memory"
CONVERT_TIMEOUT_S = 300.0
POLL_S = 0.01
FD_NAME = "metald-convert"


def memory_backend(path: Path, memory_mib: int, share: bool) -> list[str]:
    """The -object argument for a file-backed RAM block with QEMU's own id."""
    share_opt = "on" if share else "off"
    return ["-object", f"memory-backend-file,id={RAM_ID},size={memory_mib}M,mem-path={path},share={share_opt}"]


def with_memory_backend(argv: list[str], path: Path, memory_mib: int, share: bool) -> list[str]:
    """``argv`` (from build_argv) with its RAM in ``path`` instead of anonymous memory."""
    out = list(argv)
    machine = out.index("-M") + 1
    out[machine] = f"{out[machine]},memory-backend={RAM_ID}"
    return [*out, *memory_backend(path, memory_mib, share)]


async def set_ignore_shared(qmp: QmpSession, on: bool = True) -> None:
    """A restored QEMU keeps it on: saves of it must turn it off (a full stream)."""
    caps = [{"capability": "x-ignore-shared", "state": on}]
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})


async def pass_fd(qmp: QmpSession, fd: int, name: str) -> None:
    if qmp.client is None:
        raise BackendError("QMP is not connected")
    qmp.client.send_fd_scm(fd)
    await qmp.execute("getfd", {"fdname": name})


async def wait_migration(qmp: QmpSession, what: str, timeout: float = CONVERT_TIMEOUT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise BackendError(f"{what} failed: {info.get('error-desc', status)}")
        if loop.time() > deadline:
            raise BackendError(f"{what} took longer than {timeout:g}s")
        await asyncio.sleep(POLL_S)


async def wait_loaded(qmp: QmpSession, what: str, timeout: float = CONVERT_TIMEOUT_S) -> None:
    """Until an incoming migration finished (runstate leaves ``inmigrate``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (status := await qmp.status()) == "inmigrate":
        if loop.time() > deadline:
            raise BackendError(f"{what} took longer than {timeout:g}s")
        await asyncio.sleep(POLL_S / 2)
    if status not in ("paused", "running"):
        raise BackendError(f"{what} ended in state {status!r}")


async def convert(
    spec: BootSpec,
    stream: Path,
    directory: Path,
    *,
    binary: str,
    accel: Accel,
    disk_files: dict[str, Path],
    runas: tuple[int, int] | None,
) -> Path:
    """Load ``stream`` (a full migration of ``spec``'s guest) into ``directory/memory``
    and write the device state alone to ``directory/<stream name>.dev``; returns it.

    ``disk_files`` maps drive_id -> the snapshot's copy of that drive.
    """
    # sockets and the empty chroot in a short private directory (sun_path is 108 bytes)
    work = Path(tempfile.mkdtemp(prefix="metald-convert-"))
    drives = tuple(replace(d, path=disk_files[d.drive_id]) for d in spec.drives)
    conv_spec = replace(spec, drives=drives, run_dir=work, console_enabled=False, console_log=work / "console")
    # the source's accelerator and CPU model: the CPU state must load
    argv = build_argv(conv_spec, CommandOptions(binary=binary, accel=accel, snapshot_drives=True, sandbox=False))
    argv = with_memory_backend(argv, directory / MEMORY_FILE, memory_mib(spec.memory_bytes), share=True)
    argv += ["-S", "-incoming", "defer", "-sandbox", SANDBOX]
    if runas is not None:
        empty = work / "root"
        empty.mkdir(mode=0o755)
        argv += ["-chroot", str(empty), "-runas", f"{runas[0]}:{runas[1]}"]
    out_path = directory / (stream.name + ".dev")
    log_path = work / "vmm.log"
    with open(log_path, "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            "unshare", "--net", "--", *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )
    qmp = QmpSession("qmp-convert", work / "qmp.sock")
    try:
        await qmp.connect(10.0, lambda: proc.returncode is None)
        fd = os.open(stream, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await pass_fd(qmp, fd, FD_NAME)
        finally:
            os.close(fd)
        await qmp.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
        await wait_loaded(qmp, "loading the snapshot stream")
        await set_ignore_shared(qmp)
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            await pass_fd(qmp, fd, FD_NAME + "-out")
            await qmp.execute("migrate-set-parameters", {"max-bandwidth": 64 << 30})
            await qmp.execute("migrate", {"uri": f"fd:{FD_NAME}-out"})
            await wait_migration(qmp, "writing the device state")
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(BackendError):
            await qmp.execute("quit", timeout=5)
    except BaseException as exc:
        tail = log_path.read_text(errors="replace")[-400:].strip() if log_path.exists() else ""
        if isinstance(exc, Exception) and not isinstance(exc, BackendError):
            raise BackendError(f"converting the snapshot failed: {exc}; log: {tail}") from exc
        if isinstance(exc, BackendError):
            raise BackendError(f"{exc}; log: {tail}") from None
        raise
    finally:
        await qmp.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    fd = os.open(directory / MEMORY_FILE, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return out_path
