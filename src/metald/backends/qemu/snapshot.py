"""Snapshots of QEMU guests: save memory + device state and disks, restore them.

Save (a RUNNING or PAUSED guest): QMP ``stop`` (QEMU drains and flushes its
drives), the full migration stream written to a file metald opened and
passed to the jailed QEMU over QMP (SCM_RIGHTS + ``getfd``, ``migrate
fd:``: the chrooted, unprivileged, seccomp-confined QEMU needs no path and
no exec), the drives copied (``copy_file_range``) while the guest is still
stopped; then ``cont`` (a PAUSED guest stays paused), and off the guest's
critical path :mod:`metald.backends.qemu.memfile` turns the stream into a
memory file plus a ~100 KiB device-state file. A hibernation (``stop=True``)
quits QEMU last, once every file and the manifest are durable, so a failure
at any step leaves the guest as it was.

Restore: a new QEMU from the VM's BootSpec with its RAM mapped from the
snapshot's memory file (``memory-backend-file,share=off``: MAP_PRIVATE, lazy,
copy on write, shared between clones), ``-S -incoming defer``, the
``x-ignore-shared`` capability, the device state handed over as an fd
(``migrate-incoming fd:``), then ``cont``. QEMU 7.2 has no ``file:`` URI and
no mapped-ram; ``exec:`` is refused by the jail's ``spawn=deny`` filter.

Identity: the console of a restored QEMU is a unix socket chardev that still
logs to the console file (``logfile=``). metald writes one
``METALD_IDENTITY`` line (new address, MAC, route, hostname, clock, a fresh
RNG seed, an ack word) to the guest's ttyS0 before ``cont``, and waits for
``METALD_GUEST_IDENTITY ack=<word>`` (guest/agent.c applies it).

Clones get copy-on-write qcow2 overlays backed by the snapshot's disk copies
(:func:`clone_drives`). The restore spec must match the snapshot's vCPUs,
memory and drives (:func:`check_compatible`): the template's config wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from metald.backends.qemu import console, memfile
from metald.backends.qemu.backend import QemuBackend
from metald.backends.qemu.command import memory_mib, opt_escape, ordered_drives, vmm_log_path
from metald.backends.qemu.launch import JailedLauncher
from metald.core.errors import BackendError, FailedPrecondition, InvalidArgument
from metald.core.models import BootSpec, Drive, NetworkAllocation

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
MANIFEST_FILE = "snapshot.json"
STATE_FILE = "vmstate"  # device state only (memory is in MEMORY_FILE)
STREAM_FILE = "vmstate.stream"  # the full stream, while the snapshot is being made
MEMORY_FILE = memfile.MEMORY_FILE
SERIAL_SOCKET = "serial.sock"
FD_NAME = "metald-snapshot"
# The guest is stopped: migrate as fast as the disk takes it.
MAX_BANDWIDTH = 64 << 30
MIGRATE_POLL_S = 0.005
MIGRATE_TIMEOUT_S = 300.0
QUIT_TIMEOUT_S = 10.0
COPY_CHUNK = 64 << 20
SEED_BYTES = 32
IDENTITY_TIMEOUT_S = 30.0

GuestState = Literal["running", "paused"]


@dataclass(frozen=True)
class SnapshotDisk:
    """One drive of the snapshot: a copy of the VM's drive file taken while stopped."""

    drive_id: str
    file: str  # name inside the snapshot directory
    read_only: bool
    is_root: bool
    size: int


@dataclass(frozen=True)
class SnapshotManifest:
    """What a snapshot directory holds (``snapshot.json``); restores check against it."""

    source_vm_id: str
    vcpu_count: int
    memory_bytes: int
    accel: str
    qemu_version: str
    guest_state: GuestState  # what the guest was doing when saved
    state_bytes: int  # the device state file
    memory_disk_bytes: int  # what the (sparse) memory file takes on disk
    disks: tuple[SnapshotDisk, ...]
    created_at: float
    stop_seconds: float  # how long the guest was stopped for the save
    format: int = MANIFEST_FORMAT
    memory_file: str = MEMORY_FILE  # guest RAM, mapped (MAP_PRIVATE) by restores

    @property
    def disk_bytes(self) -> int:
        return sum(d.size for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SnapshotManifest:
        try:
            disks = tuple(SnapshotDisk(**d) for d in data["disks"])
            return cls(**{**data, "disks": disks})
        except (KeyError, TypeError) as exc:
            raise BackendError(f"snapshot manifest is malformed: {exc}") from None


@dataclass(frozen=True)
class GuestIdentity:
    """What a restored guest is told over its console (guest/init ``apply_identity``).

    Every field is optional: a resumed (hibernated) VM gets only the clock and
    a seed; a clone gets its id, hostname, address, MAC and routes too.
    """

    vm_id: str | None = None
    hostname: str | None = None
    ip: str | None = None
    prefix_len: int | None = None
    gateway: str | None = None
    mac: str | None = None
    dns: tuple[str, ...] = ()
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(SEED_BYTES), repr=False)

    @classmethod
    def for_clone(cls, vm_id: str, alloc: NetworkAllocation | None, hostname: str | None = None) -> GuestIdentity:
        if alloc is None:
            return cls(vm_id=vm_id, hostname=hostname or vm_id)
        return cls(
            vm_id=vm_id,
            hostname=hostname or vm_id,
            ip=alloc.ip,
            prefix_len=alloc.prefix_len,
            gateway=alloc.gateway,
            mac=alloc.mac,
            dns=alloc.dns_servers[:2],
        )

    def line(self, ack: str = "", now: float | None = None) -> bytes:
        """The console line; values are checked so nothing can inject shell words."""
        words = ["METALD_IDENTITY"]
        pairs: list[tuple[str, str | None]] = [
            ("vm_id", self.vm_id),
            ("host", self.hostname),
            ("ip", f"{self.ip}/{self.prefix_len}" if self.ip else None),
            ("gw", self.gateway),
            ("mac", self.mac),
            ("dns", ",".join(self.dns) if self.dns else None),
            ("time", str(int(time.time() if now is None else now))),
            ("seed", self.seed.hex()),
            ("ack", ack or None),
        ]
        for key, value in pairs:
            if value is None:
                continue
            if not value or not all(c.isalnum() or c in "-_.:/," for c in value):
                raise InvalidArgument(f"identity.{key}", f"unsafe value {value!r}")
            words.append(f"{key}={value}")
        return (" ".join(words) + "\n").encode()


@dataclass(frozen=True)
class SaveTimings:
    stopped_s: float  # the guest was not running for this long
    total_s: float
    convert_s: float = 0.0  # making the memory file, after the guest runs again


# --- save ----------------------------------------------------------------------


def check_compatible(manifest: SnapshotManifest, spec: BootSpec) -> None:
    """The restore spec must have the snapshot's shape (the template's config wins:
    callers build the spec from the manifest)."""
    if spec.vcpu_count != manifest.vcpu_count:
        raise InvalidArgument("config.cpu.vcpu_count", f"the snapshot has {manifest.vcpu_count} vCPUs")
    if spec.memory_bytes != manifest.memory_bytes:
        raise InvalidArgument("config.memory.size_bytes", f"the snapshot has {manifest.memory_bytes} bytes")
    want = sorted(d.drive_id for d in manifest.disks)
    have = sorted(d.drive_id for d in spec.drives)
    if want != have:
        raise InvalidArgument("config.storage", f"the snapshot has drives {want}, the VM {have}")


def verify_files(directory: Path, manifest: SnapshotManifest) -> None:
    """Refuse a snapshot whose files are missing or of the wrong size (truncated)."""
    expected = [(STATE_FILE, manifest.state_bytes), (manifest.memory_file, memory_mib(manifest.memory_bytes) << 20)]
    expected += [(d.file, d.size) for d in manifest.disks]
    for name, size in expected:
        path = directory / name
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise FailedPrecondition(f"snapshot file {path} is missing") from None
        if actual != size:
            raise FailedPrecondition(f"snapshot file {path} has {actual} bytes, expected {size}: corrupted")


def read_manifest(directory: Path) -> SnapshotManifest:
    try:
        data = json.loads((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise FailedPrecondition(f"snapshot {directory} has no {MANIFEST_FILE}") from None
    except ValueError as exc:
        raise FailedPrecondition(f"snapshot {directory}: {MANIFEST_FILE} is corrupted: {exc}") from None
    return SnapshotManifest.from_dict(data)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: Path, dst: Path) -> int:
    """Copy with copy_file_range (in-kernel; shares extents where the fs can), fsynced."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        done = 0
        while done < size:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), min(COPY_CHUNK, size - done))
            if n == 0:
                break
            done += n
        if done != size:
            raise BackendError(f"copying {src}: {done} of {size} bytes")
        os.fsync(fout.fileno())
    return size


def _copy_disks(spec: BootSpec, directory: Path) -> tuple[SnapshotDisk, ...]:
    disks = []
    for index, drive in enumerate(ordered_drives(spec.drives)):
        name = f"disk{index}.img"
        size = _copy_file(drive.path, directory / name)
        disks.append(SnapshotDisk(drive.drive_id, name, drive.read_only, drive.is_root, size))
    return tuple(disks)


def _write_manifest(directory: Path, manifest: SnapshotManifest) -> None:
    tmp = directory / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.to_dict(), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST_FILE)
    _fsync_path(directory)


class QemuSnapshots:
    """Save and restore guests of one :class:`QemuBackend` (which keeps tracking them)."""

    def __init__(self, backend: QemuBackend) -> None:
        self.backend = backend
        # crash injection for tests: called with a step name before each step
        self.fault: Callable[[str], None] = lambda step: None
        self._lingering: set[asyncio.Task[None]] = set()  # identity lines not waited for

    async def save(self, spec: BootSpec, directory: Path, *, stop: bool) -> tuple[SnapshotManifest, SaveTimings]:
        """Snapshot the VM's guest into ``directory`` (created; must not exist).

        ``stop=True`` hibernates: QEMU quits once the files are durable. On any
        failure the directory is removed and the guest is left as it was.
        """
        vm = self.backend._running(spec.vm_id)
        qmp = await self.backend._ready(vm)
        status = await qmp.status()
        if status not in ("running", "paused"):
            raise FailedPrecondition(f"the guest of {spec.vm_id} is {status!r}, not running or paused")
        directory.mkdir(parents=False, exist_ok=False)
        started = time.monotonic()
        stopped_at: float | None = None
        resumed = False
        try:
            self.fault("stop")
            if status == "running":
                await qmp.execute("stop")
                stopped_at = time.monotonic()
            stream_path = directory / STREAM_FILE
            fd = os.open(stream_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                self.fault("migrate")
                await qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
                await memfile.set_ignore_shared(qmp, on=False)
                await self._pass_fd(qmp, fd)
                await qmp.execute("migrate", {"uri": f"fd:{FD_NAME}"})
                await self._wait_migration(qmp, spec.vm_id)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.fault("disks")
            disks = await asyncio.to_thread(_copy_disks, spec, directory)
            if not stop and status == "running":
                await qmp.execute("cont")  # the memory file is made while the guest runs again
                resumed = True
            stopped_s = time.monotonic() - stopped_at if stopped_at is not None else 0.0
            converting = time.monotonic()
            self.fault("convert")
            state_path = directory / STATE_FILE
            device_state = await memfile.convert(
                spec,
                stream_path,
                directory,
                binary=self.backend.settings.qemu_binary,
                accel="kvm" if vm.handle.accel == "kvm" else "tcg",
                disk_files={d.drive_id: directory / d.file for d in disks},
                runas=_jail_user(self.backend),
            )
            os.replace(device_state, state_path)
            stream_path.unlink()
            convert_s = time.monotonic() - converting
            self.fault("manifest")
            manifest = SnapshotManifest(
                source_vm_id=spec.vm_id,
                vcpu_count=spec.vcpu_count,
                memory_bytes=spec.memory_bytes,
                accel=vm.handle.accel,
                qemu_version=await self.backend.qemu_version(),
                guest_state="running" if status == "running" else "paused",
                state_bytes=state_path.stat().st_size,
                memory_disk_bytes=(directory / MEMORY_FILE).stat().st_blocks * 512,
                disks=disks,
                created_at=time.time(),
                stop_seconds=round(stopped_s, 4),
            )
            await asyncio.to_thread(_write_manifest, directory, manifest)
            if stop:  # last: any failure before leaves the guest as it was
                self.fault("quit")
                reason = await self.backend.shutdown(spec.vm_id, force=True, timeout_s=QUIT_TIMEOUT_S)
                log.info("qemu %s: hibernated (%s)", spec.vm_id, reason)
        except BaseException:
            with contextlib.suppress(BackendError):
                await qmp.execute("migrate_cancel")
            if status == "running" and not resumed and self.backend.is_running(spec.vm_id):
                with contextlib.suppress(BackendError):
                    await qmp.execute("cont")
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        timings = SaveTimings(manifest.stop_seconds, time.monotonic() - started, convert_s)
        log.info(
            "qemu %s: snapshot of %d bytes memory, %d state, %d disks in %.3fs (guest stopped %.3fs)",
            spec.vm_id, manifest.memory_disk_bytes, manifest.state_bytes, manifest.disk_bytes,
            timings.total_s, timings.stopped_s,
        )
        return manifest, timings

    async def close(self) -> None:
        """Hang up the consoles still waiting for a guest's answer."""
        for task in list(self._lingering):
            task.cancel()
        await asyncio.gather(*self._lingering, return_exceptions=True)

    @staticmethod
    async def _pass_fd(qmp: Any, fd: int) -> None:
        """Hand ``fd`` to QEMU under FD_NAME (SCM_RIGHTS, then ``getfd``)."""
        if qmp.client is None:
            raise BackendError("QMP is not connected")
        with contextlib.suppress(BackendError):
            await qmp.execute("closefd", {"fdname": FD_NAME})  # a leftover of a failed attempt
        try:
            qmp.client.send_fd_scm(fd)
        except Exception as exc:
            raise BackendError(f"cannot pass the snapshot file to QEMU: {exc}") from exc
        await qmp.execute("getfd", {"fdname": FD_NAME})

    async def _wait_migration(self, qmp: Any, vm_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MIGRATE_TIMEOUT_S
        while True:
            info = await qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise BackendError(f"saving {vm_id} failed: {info.get('error-desc', status)}")
            if loop.time() > deadline:
                raise BackendError(f"saving {vm_id} took longer than {MIGRATE_TIMEOUT_S:g}s")
            await asyncio.sleep(MIGRATE_POLL_S)

    # --- restore -----------------------------------------------------------------

    @staticmethod
    def restore_argv_hook(
        spec: BootSpec, directory: Path, manifest: SnapshotManifest, qcow2: frozenset[Path]
    ) -> Callable[[list[str]], list[str]]:
        """Edit the boot argv into a restore argv (see the module docstring)."""

        def hook(argv: list[str]) -> list[str]:
            out = list(argv)
            accel = out[out.index("-accel") + 1]
            if accel != manifest.accel:
                raise FailedPrecondition(
                    f"the snapshot was taken under {manifest.accel}, this host runs guests under {accel}"
                )
            out = with_qcow2_drives(out, qcow2)
            for i, arg in enumerate(out):
                if i and out[i - 1] == "-chardev" and arg.startswith("file,id=console0,"):
                    sock = opt_escape(spec.run_dir / SERIAL_SOCKET)
                    logfile = opt_escape(spec.console_log)
                    out[i] = f"socket,id=console0,path={sock},server=on,wait=off,logfile={logfile},logappend=on"
            memory = directory / manifest.memory_file
            out = memfile.with_memory_backend(out, memory, memory_mib(manifest.memory_bytes), share=False)
            return [*out, "-S", "-incoming", "defer"]

        return hook

    async def restore(
        self,
        spec: BootSpec,
        directory: Path,
        *,
        identity: GuestIdentity | None,
        start: bool = True,
        require_ack: bool = True,
        qcow2: frozenset[Path] = frozenset(),
    ) -> dict[str, Any]:
        """Start the VM's QEMU from the snapshot in ``directory``; returns its handle.

        ``spec`` is the VM to start (its own id, network, drives: the clone's
        overlays from :func:`clone_drives`, or a hibernated VM's own drives).
        ``identity`` is written to the guest's console once its state is loaded;
        with ``require_ack`` (clones) the restore waits until the guest confirmed
        it, else (a resume: clock and seed only) it does not wait. With
        ``start=False`` the guest stays paused. On failure QEMU is gone.
        """
        manifest = await asyncio.to_thread(read_manifest, directory)
        check_compatible(manifest, spec)
        await asyncio.to_thread(verify_files, directory, manifest)
        serial = spec.run_dir / SERIAL_SOCKET
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        serial.unlink(missing_ok=True)
        if len(str(serial)) > 107:
            raise BackendError(f"serial socket path too long: {serial}")
        t0 = time.monotonic()
        handle = await self.backend.boot(spec, argv_hook=self.restore_argv_hook(spec, directory, manifest, qcow2))
        t1 = time.monotonic()
        try:
            vm = self.backend._running(spec.vm_id)
            qmp = await self.backend._ready(vm)
            fd = os.open(directory / STATE_FILE, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.fault("incoming")
                await memfile.set_ignore_shared(qmp)
                await self._pass_fd(qmp, fd)
                await qmp.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
                await self._wait_incoming(qmp, spec)
            finally:
                os.close(fd)
            t2 = time.monotonic()
            self.fault("identity")
            if identity is None:
                if start:
                    await qmp.execute("cont")
            else:
                await self._identify(qmp, serial, identity, start, require_ack)
        except BaseException:
            with contextlib.suppress(BackendError):
                await self.backend.shutdown(spec.vm_id, force=True, timeout_s=QUIT_TIMEOUT_S)
            raise
        finally:
            serial.unlink(missing_ok=True)  # QEMU keeps listening; nothing else needs the path
        t3 = time.monotonic()
        log.info(
            "qemu %s: restored from %s (QEMU start %.3fs, state load %.3fs, identity %.3fs)",
            spec.vm_id, directory, t1 - t0, t2 - t1, t3 - t2,
        )
        return handle

    async def _identify(
        self, qmp: Any, serial: Path, identity: GuestIdentity, start: bool, require_ack: bool
    ) -> None:
        """Write the identity line to the guest's console; with ``require_ack`` wait for its ack.

        The connection stays open until the ack (in the background when not
        waited for): QEMU drops what it has not yet fed to the 16-byte UART
        FIFO when the client hangs up. A guest left paused (``start=False``)
        reads the line when it is continued.
        """
        ack = secrets.token_hex(6)
        marker = f"METALD_GUEST_IDENTITY ack={ack}".encode()
        reader, writer = await asyncio.open_unix_connection(str(serial))
        try:
            writer.write(identity.line(ack=ack))
            await writer.drain()
            if start:
                await qmp.execute("cont")
        except BaseException:
            writer.close()
            raise
        if not (start and require_ack):
            task = asyncio.get_running_loop().create_task(_linger(reader, writer, marker))
            self._lingering.add(task)
            task.add_done_callback(self._lingering.discard)
            return
        try:
            await _await_ack(reader, writer, marker)
        except TimeoutError:
            raise BackendError(
                f"the guest did not confirm its new identity within {IDENTITY_TIMEOUT_S:g}s"
                " (is its init the bundled one?)"
            ) from None

    async def _wait_incoming(self, qmp: Any, spec: BootSpec) -> None:
        """Until the state is loaded (runstate leaves ``inmigrate``); QEMU exits if the stream is bad."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MIGRATE_TIMEOUT_S
        while True:
            try:
                status = await qmp.status()
            except BackendError as exc:
                tail = console.tail_text(vmm_log_path(spec.run_dir), 400).strip()
                raise BackendError(f"restoring {spec.vm_id} failed: {exc}; log: {tail}") from None
            if status != "inmigrate":
                if status not in ("paused", "running"):
                    raise BackendError(f"restoring {spec.vm_id} ended in state {status!r}")
                return
            if loop.time() > deadline:
                raise BackendError(f"restoring {spec.vm_id} took longer than {MIGRATE_TIMEOUT_S:g}s")
            await asyncio.sleep(MIGRATE_POLL_S)


def _jail_user(backend: QemuBackend) -> tuple[int, int] | None:
    """The uid/gid the jailed QEMU runs as (the converter runs as them too); None unjailed."""
    launcher = backend.launcher
    if isinstance(launcher, JailedLauncher):
        return launcher.jailer.settings.jailer_uid, launcher.jailer.settings.jailer_gid
    return None


def with_qcow2_drives(argv: list[str], qcow2: frozenset[Path]) -> list[str]:
    """``argv`` with the drives in ``qcow2`` (overlays metald made) opened as qcow2.

    Never derive this from a path a caller gave: a qcow2 header names a
    backing file, which QEMU would open as root before its chroot.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if i and out[i - 1] == "-drive" and any(f"file={opt_escape(p)}," in arg for p in qcow2):
            out[i] = arg.replace("format=raw", "format=qcow2")
    return out


def overlay_argv_hook(qcow2: frozenset[Path]) -> Callable[[list[str]], list[str]]:
    """For ``QemuBackend.boot(spec, argv_hook=...)``: a cold boot of a clone (its overlays)."""
    return lambda argv: with_qcow2_drives(argv, qcow2)


async def _await_ack(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, marker: bytes) -> None:
    """Read the console until ``marker`` (TimeoutError after IDENTITY_TIMEOUT_S); then hang up."""
    seen = b""
    try:
        async with asyncio.timeout(IDENTITY_TIMEOUT_S):
            while marker not in seen:
                chunk = await reader.read(4096)
                if not chunk:
                    raise BackendError("the guest console closed before the guest took its identity")
                seen = (seen + chunk)[-4096:]
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, marker: bytes) -> None:
    try:
        await _await_ack(reader, writer, marker)
    except (TimeoutError, BackendError, OSError) as exc:
        log.info("a restored guest did not confirm its identity line: %s", exc or "timeout")


def clone_drives(directory: Path, manifest: SnapshotManifest, dest: Path) -> tuple[tuple[Drive, ...], frozenset[Path]]:
    """qcow2 overlays in ``dest`` backed by the snapshot's disk copies (copy on write).

    Returns the clone's drives and the set of overlay paths (``restore(qcow2=...)``).
    The snapshot must outlive its clones: the overlays read their backing files.
    """
    dest.mkdir(parents=True, exist_ok=True)
    drives = []
    for disk in manifest.disks:
        overlay = dest / f"{disk.drive_id}.qcow2"
        backing = (directory / disk.file).resolve()
        result = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing), str(overlay)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise BackendError(f"qemu-img create {overlay} failed: {result.stderr.strip()}")
        drives.append(Drive(disk.drive_id, overlay, disk.read_only, disk.is_root))
    return tuple(drives), frozenset(d.path for d in drives)
