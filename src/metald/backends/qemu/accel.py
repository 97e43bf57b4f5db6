"""Choosing KVM or TCG.

``qemu_accel=auto`` only trusts KVM after a short KVM boot of the configured
guest reached its READY marker. On hosts whose KVM is a nested hypervisor
that cannot run stock guest kernels ("KVM internal error ... emulation
failure"), the probe fails fast and every VM uses TCG. Verdicts are cached
in a JSON file, keyed by host kernel, QEMU version, guest kernel and initrd.

The probe never holds up a boot: metald starts it in the background at start
(for the bundled image) and for the first boot of any other guest kernel;
until its verdict is in, VMs use TCG. A KVM that hangs instead of failing is
recognised early: the probe boots without ``quiet``, so a working guest prints
on its console at once (TCG within about a second), and silence for
:data:`CONSOLE_SILENCE_S` means KVM hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from metald.backends.process import ProcessWatch, spawn
from metald.backends.qemu import console
from metald.backends.qemu.command import Accel, CommandOptions, build_argv, vmm_log_path
from metald.core.models import BootSpec

log = logging.getLogger(__name__)

READY_MARKER = b"METALD_GUEST_READY"
KVM_FAILURE = re.compile(rb"KVM internal error|emulation failure|Could not access KVM")
PROBE_TIMEOUT_S = 20.0
CONSOLE_SILENCE_S = 5.0
PROBE_VM_ID = "accel-probe"
CACHE_FILE = "qemu-accel.json"

Prober = Callable[[BootSpec], Awaitable[tuple[bool, str]]]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def probe_kernel_args(args: str) -> str:
    """The guest's own args, with the probe's VM id and without an IP config."""
    words = [w for w in args.split() if not w.startswith(("metald.vm_id=", "ip=")) and w != "quiet"]
    return " ".join([*words, f"metald.vm_id={PROBE_VM_ID}"])


async def probe_kvm(
    spec: BootSpec, binary: str, work_parent: Path, timeout: float, silence_s: float = CONSOLE_SILENCE_S
) -> tuple[bool, str]:
    """Boot ``spec``'s kernel and initrd under KVM until READY, a KVM error or timeout.

    Drives are attached with snapshot=on so the probe never writes to them.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not usable"
    work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="accel-probe-", dir=work_parent))
    try:
        probe = replace(
            spec,
            vm_id=PROBE_VM_ID,
            run_dir=work,
            console_log=work / "console.log",
            console_enabled=True,
            network=None,
            kernel_args=probe_kernel_args(spec.kernel_args),
        )
        opts = CommandOptions(binary=binary, accel="kvm", qmp=False, snapshot_drives=True)
        popen = spawn(build_argv(probe, opts), vmm_log_path(work))
        watch = ProcessWatch(popen.pid, popen, lambda _rc: None)
        watch.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while True:
                elapsed = loop.time() - started
                if console.contains(probe.console_log, READY_MARKER):
                    return True, f"KVM boot reached READY in {elapsed:.1f}s"
                failure = KVM_FAILURE.search(vmm_log_path(work).read_bytes())
                if failure:
                    return False, f"KVM failed: {failure.group().decode().strip()}"
                if not watch.alive:
                    lines = console.tail_text(vmm_log_path(work), 600).strip().splitlines()
                    return False, f"KVM probe exited early: {'; '.join(lines[-2:])[:240]}"
                if elapsed >= silence_s and not _has_output(probe.console_log):
                    return False, (
                        f"KVM guest printed nothing on its console in {silence_s:g}s "
                        "(a TCG boot prints within about a second): KVM hangs"
                    )
                if elapsed >= timeout:
                    return False, f"KVM boot did not reach READY in {timeout:g}s"
                await asyncio.sleep(0.1)
        finally:
            watch.kill()
            await watch.wait(5)
            watch.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def probe_spec(image: Path, vm_id: str, run_dir: Path) -> BootSpec | None:
    """The probe's VM: the bundled image's kernel (None when there is no image)."""
    kernel, initrd, cmdline = image / "vmlinuz", image / "initramfs.cpio.gz", image / "cmdline"
    if not kernel.is_file():
        return None
    return BootSpec(
        vm_id=vm_id,
        vcpu_count=1,
        memory_bytes=128 << 20,
        kernel_path=kernel,
        initrd_path=initrd if initrd.is_file() else None,
        kernel_args=cmdline.read_text().strip() if cmdline.is_file() else "console=ttyS0",
        drives=(),
        network=None,
        run_dir=run_dir,
        console_log=run_dir / "console.log",
    )


def _has_output(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


class AccelChooser:
    """Picks the accelerator for a spec according to ``qemu_accel``."""

    def __init__(
        self,
        mode: str,
        cache_path: Path,
        qemu_version: Callable[[], Awaitable[str]],
        prober: Prober,
    ) -> None:
        self.mode = mode
        self.cache_path = cache_path
        self._qemu_version = qemu_version
        self._prober = prober
        self._lock = asyncio.Lock()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}  # cache key -> probe under way
        self.last_detail = ""

    async def choose(self, spec: BootSpec) -> Accel:
        if self.mode in ("kvm", "tcg"):
            return "kvm" if self.mode == "kvm" else "tcg"
        try:
            key = await self._key(spec)
        except OSError as exc:  # the boot itself will report the missing file
            self.last_detail = f"cannot fingerprint the guest ({exc}); using TCG"
            return "tcg"
        cached = self._load().get(key)
        if cached is not None:
            self.last_detail = str(cached.get("detail", ""))
            return "kvm" if cached.get("accel") == "kvm" else "tcg"
        self._start(key, spec)
        self.last_detail = "KVM probe under way: TCG until it answers"
        return "tcg"

    async def warm_up(self, spec: BootSpec) -> None:
        """Start the probe for ``spec``'s kernel in the background unless a verdict is cached."""
        if self.mode != "auto":
            return
        try:
            key = await self._key(spec)
        except OSError as exc:
            log.info("qemu accelerator probe not started: %s", exc)
            return
        if self._load().get(key) is None:
            self._start(key, spec)

    async def wait_probes(self) -> None:
        """Wait for the probes under way (tests, shutdown)."""
        if self._probes:
            await asyncio.gather(*self._probes.values(), return_exceptions=True)

    def _start(self, key: str, spec: BootSpec) -> None:
        if key not in self._probes:
            self._probes[key] = asyncio.get_running_loop().create_task(self._probe(key, spec))

    async def _probe(self, key: str, spec: BootSpec) -> None:
        async with self._lock:  # one probe boot at a time
            try:
                ok, detail = await self._prober(spec)
            except Exception as exc:  # noqa: BLE001 - a broken probe means TCG, said once
                ok, detail = False, f"KVM probe failed: {str(exc).strip() or type(exc).__name__}"
            verdict: Accel = "kvm" if ok else "tcg"
            self.last_detail = detail
            log.info("qemu accelerator probe: %s -> %s", detail, verdict)
            self._store(key, {"accel": verdict, "detail": detail, "at": int(time.time())})

    async def _key(self, spec: BootSpec) -> str:
        parts = [os.uname().release, await self._qemu_version()]
        for path in (spec.kernel_path, spec.initrd_path):
            parts.append(await self._hash(path) if path is not None else "-")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    async def _hash(self, path: Path) -> str:
        st = path.stat()
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if memo not in self._hashes:
            self._hashes[memo] = await asyncio.to_thread(file_sha256, path)
        return self._hashes[memo]

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _store(self, key: str, entry: dict[str, object]) -> None:
        data = self._load()
        data[key] = entry
        tmp = self.cache_path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.cache_path)
