"""The QEMU (microvm) backend: one detached QEMU process per VM, driven over QMP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metald.backends import procfs
from metald.backends.process import ProcessWatch, spawn
from metald.backends.qemu import console, handle, strays
from metald.backends.qemu.accel import PROBE_TIMEOUT_S, AccelChooser, probe_kvm, probe_spec
from metald.backends.qemu.clock import cached_host_tsc_khz, tcg_extra_args
from metald.backends.qemu.command import (
    CommandOptions,
    argv_hash,
    build_argv,
    pid_file_path,
    qmp_socket_path,
    vmm_log_path,
)
from metald.backends.qemu.launch import JailedLauncher, PlainLauncher, QemuLauncher
from metald.backends.qemu.metrics import CpuSample, apply_blockstats, read_network, read_process
from metald.backends.qemu.qmp import QmpSession, exit_reason
from metald.backends.qemu.validate import max_vcpus, validate_spec
from metald.config import Settings
from metald.core.bounds import UNRESPONSIVE, VMM_READ_BOUND_S, describe
from metald.core.errors import BackendError
from metald.core.layout import VmLayout
from metald.core.models import BootSpec, VmMetrics
from metald.core.ports import BackendLimits, ExitCallback, IdentityAdopter, RunState, WarmUp
from metald.jailer.jailer import Jailer

if TYPE_CHECKING:
    from metald.backends.qemu.snapshotter import QemuSnapshotter

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT_S = 10.0
FORCED_QUIT_WAIT_S = 3.0
KILL_WAIT_S = 5.0
REBOOT_GRACE_S = 30.0
POWER_BUTTON_REPEAT_S = 2.0
EXIT_DRAIN_S = 1.0
ACCEL_PROBE_DIR = "accel-probe"  # in the run directory: the KVM probe's files
# Edits QEMU's argv before the launcher wraps it (restores, see snapshot.py).
ArgvHook = Callable[[list[str]], list[str]]
VERSION_RE = re.compile(r"version (\S+)")


@dataclass
class _Vm:
    """What the backend knows about one VM's QEMU."""

    vm_id: str
    run_dir: Path
    console_log: Path | None
    tap: str | None
    handle: handle.VmmHandle
    watch: ProcessWatch
    qmp: QmpSession
    stopping: bool = False  # metald asked for this exit: no exit callback
    failure: str | None = None  # why metald killed it on its own (e.g. KVM error)
    exit_reason: str | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cpu_sample: CpuSample | None = None
    # Adopted on identity alone: QMP is connected on first use (QemuBackend._ready).
    unattached: bool = False
    attaching: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.watch.alive

    def files(self) -> list[Path]:
        files = [qmp_socket_path(self.run_dir), pid_file_path(self.run_dir)]
        files.append(vmm_log_path(self.run_dir))
        if self.console_log is not None:
            files.append(self.console_log)
        return files


class QemuBackend:
    name = "qemu"

    def __init__(
        self, settings: Settings, jailer: Jailer | None = None, launcher: QemuLauncher | None = None
    ) -> None:
        self.settings = settings
        self.layout = VmLayout.from_settings(settings)
        self.launcher: QemuLauncher = launcher or (
            JailedLauncher(jailer, settings.jailer_chroot_dir) if jailer is not None else PlainLauncher()
        )
        self._vms: dict[str, _Vm] = {}
        self._exit_callback: ExitCallback | None = None
        self._version: str | None = None
        self._consoles = console.LogCap(settings.console_log_max_bytes, self._logs)
        self._tasks: set[asyncio.Task[None]] = set()
        self._adopt_errors: dict[str, str] = {}  # vm_id -> why the last adopt() said no
        self._snapshotter: QemuSnapshotter | None = None
        self.accel = AccelChooser(
            settings.qemu_accel,
            settings.run_dir / "qemu-accel.json",
            self.qemu_version,
            lambda spec: probe_kvm(spec, settings.qemu_binary, settings.run_dir / ACCEL_PROBE_DIR, PROBE_TIMEOUT_S),
        )

    # --- setup ---------------------------------------------------------------

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._exit_callback = callback

    async def qemu_version(self) -> str:
        if self._version is None:
            binary = shutil.which(self.settings.qemu_binary)
            if binary is None:
                raise BackendError(f"QEMU binary {self.settings.qemu_binary!r} not found")
            proc = await asyncio.create_subprocess_exec(
                binary,
                "--version",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
            match = VERSION_RE.search(out.decode(errors="replace"))
            if proc.returncode != 0 or match is None:
                raise BackendError(f"{binary} --version failed: {out[:200]!r}")
            self._version = match.group(1)
        return self._version

    async def warm_up(self) -> None:
        """Start the KVM probe for the bundled image in the background (``qemu_accel=auto``)."""
        if self.settings.qemu_accel != "auto":
            return
        spec = probe_spec(self.settings.image_dir, ACCEL_PROBE_DIR, self.layout.run_dir(ACCEL_PROBE_DIR))
        if spec is not None:
            await self.accel.warm_up(spec)

    async def ping(self) -> tuple[bool, str]:
        try:
            version = await self.qemu_version()
        except (BackendError, OSError, TimeoutError) as exc:
            return False, str(exc)
        return True, f"QEMU {version}, accel={self.settings.qemu_accel}"

    def limits(self) -> BackendLimits:
        return BackendLimits(max_vcpus=max_vcpus())

    async def validate(self, spec: BootSpec) -> None:
        validate_spec(spec)

    # --- lifecycle -----------------------------------------------------------

    async def boot(self, spec: BootSpec, argv_hook: ArgvHook | None = None) -> dict[str, Any]:
        """Start the VM's QEMU; ``argv_hook`` edits its argv first (restores, see snapshot.py)."""
        old = self._vms.get(spec.vm_id)
        if old is not None and old.alive:
            raise BackendError(f"VM {spec.vm_id} already has a running QEMU (pid {old.handle.pid})")
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (qmp_socket_path(spec.run_dir), pid_file_path(spec.run_dir)):
            stale.unlink(missing_ok=True)
        accel = await self.accel.choose(spec)
        extra = tcg_extra_args(spec.kernel_args, cached_host_tsc_khz()) if accel == "tcg" else []
        options = CommandOptions(
            binary=self.settings.qemu_binary,
            accel=accel,
            extra_kernel_args=tuple(extra),
            tcg_tb_size_mib=self.settings.qemu_tcg_tb_size_mib,
            sandbox=self.launcher.sandbox,  # a jail adds its own -sandbox (see jailer/qemu.py)
        )
        argv = build_argv(spec, options)
        if argv_hook is not None:
            argv = argv_hook(argv)
        argv, command = await self.launcher.command(spec, argv, accel)
        popen = spawn(command, vmm_log_path(spec.run_dir))
        stat = procfs.read_stat(popen.pid)
        vmm = handle.VmmHandle(
            pid=popen.pid,
            start_time=stat.start_time if stat else 0,
            qmp_socket=str(qmp_socket_path(spec.run_dir)),
            accel=accel,
            argv_hash=argv_hash(argv),
        )
        vm = self._track(spec, vmm, popen)
        try:
            await vm.qmp.connect(QMP_CONNECT_TIMEOUT_S, lambda: vm.alive)
            await vm.qmp.status()
        except BaseException as exc:
            vm.stopping = True
            with contextlib.suppress(BackendError):
                await self._kill(vm)
            if not isinstance(exc, Exception):
                raise
            tail = console.tail_text(vmm_log_path(spec.run_dir), 500).strip()
            raise BackendError(f"QEMU for {spec.vm_id} did not start: {exc}; log: {tail}") from exc
        log.info("qemu %s: started pid %d (accel %s)", spec.vm_id, vmm.pid, accel)
        return vmm.to_dict()

    # --- recovery: jails, strays, adoption -------------------------------------

    def jail_exists(self, vm_id: str) -> bool:
        """Does the VM have a jail directory (it keeps one while SHUTDOWN)?"""
        return self.launcher.has_jail(vm_id)

    async def remove_jail(self, vm_id: str) -> None:
        """Remove the VM's jail (cgroup, then chroot); kills what is left in the cgroup."""
        await self.launcher.remove_jail(vm_id)

    async def restore_jail(self, spec: BootSpec) -> None:
        """Build the VM's jail again (undo of :meth:`remove_jail` for a VM that had one)."""
        await self.launcher.restore_jail(spec, await self.accel.choose(spec))

    async def discard(self, vm_id: str, kill_strays: bool = True) -> list[int]:
        """Kill every VMM process of this VM (tracked or not) and remove its socket and
        pid file; logs and the jail stay. Returns the pids killed.

        ``kill_strays=False`` skips the /proc scan for untracked ones (start-up
        reconcile, whose leftover sweep kills every stray at the end)."""
        vm = self._vms.get(vm_id)
        if vm is not None:
            vm.stopping = True
            if vm.alive:
                with contextlib.suppress(BackendError):
                    await self._kill(vm)
                await self._wait_finished(vm)
            vm.watch.close()
            await self._close_qmp(vm)
            if self._vms.get(vm_id) is vm:
                del self._vms[vm_id]
        killed = []
        if kill_strays:
            killed = await asyncio.to_thread(strays.kill, self._markers(only=vm_id, keep={}))
        run_dir = self.layout.run_dir(vm_id)
        for path in (qmp_socket_path(run_dir), pid_file_path(run_dir)):
            path.unlink(missing_ok=True)
        return killed

    def adopt_error(self, vm_id: str) -> str | None:
        """Why the last :meth:`adopt` of this VM failed (None if it did not)."""
        return self._adopt_errors.get(vm_id)

    async def vmm_status(self, vm_id: str) -> RunState:
        """QEMU's run state over QMP: ``running``, ``paused``, or ``other``
        (prelaunch, an error state, ...)."""
        status = await (await self._ready(self._running(vm_id))).status()
        return "running" if status == "running" else "paused" if status == "paused" else "other"

    def run_dir_entries(self) -> frozenset[str]:
        return frozenset({ACCEL_PROBE_DIR})

    def identity_adopter(self) -> IdentityAdopter:
        """QEMU adopts on identity in one batch and attaches QMP later (adopt_many, attach)."""
        return self

    def warmer(self) -> WarmUp:
        """QEMU probes KVM in the background from start (:meth:`warm_up`)."""
        return self

    def snapshotter(self) -> QemuSnapshotter:
        """Snapshots, restores and clones (backends/qemu/snapshot.py)."""
        if self._snapshotter is None:
            from metald.backends.qemu.snapshotter import QemuSnapshotter  # it imports this module

            self._snapshotter = QemuSnapshotter(self)
        return self._snapshotter

    @property
    def tap_owner(self) -> tuple[int, int] | None:
        """None: QEMU opens its TAP before the jail drops root (see jailer/qemu.py)."""
        return None

    def _markers(self, only: str | None, keep: dict[str, int]) -> list[tuple[int, str]]:
        """(pid, vm_id) of processes carrying this metald's VMM markers (a QMP socket
        under its run dir), except ``keep`` (vm_id -> pid of the VMM to leave)."""
        found = []
        for pid, vm_id in strays.vmm_processes(self.layout.run_root):
            if (only is None or vm_id == only) and keep.get(vm_id) != pid:
                found.append((pid, vm_id))
        return found

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        """Stray VMM processes, and jails and cgroups of VMs metald does not know.

        A process is stray when it carries the marker of a VMM of this metald
        (``-qmp unix:<run_dir>/<vm_id>/qmp.sock``, in QEMU or its launcher)
        but is not the VMM metald tracks for that VM (see strays.py).
        """
        keep = {vm_id: vm.handle.pid for vm_id, vm in self._vms.items() if vm.alive}
        killed = await asyncio.to_thread(strays.kill, self._markers(None, keep))
        return [f"process {pid}" for pid in killed] + await self.launcher.sweep(known_vm_ids)

    async def adopt(self, spec: BootSpec, handle_data: dict[str, Any]) -> bool:
        """Re-attach to the VMM the handle describes, only if it provably is that
        process (see :meth:`adopt_many`) and its QMP socket answers."""
        if spec.vm_id not in await self.adopt_many([(spec, handle_data)]):
            return False
        if await self.attach(spec.vm_id):
            return True
        vm = self._vms.pop(spec.vm_id, None)
        if vm is not None:  # left running: the leftover sweep (or cleanup) kills it
            vm.stopping = True
            vm.watch.close()
            await self._close_qmp(vm)
        return False

    async def adopt_many(self, items: list[tuple[BootSpec, dict[str, Any]]]) -> set[str]:
        """Adopt VMMs on their identity alone; return the vm_ids adopted.

        A handle's process must provably be that VMM: same pid, same start time,
        a command line with the handle's QMP socket and hash (``handle.mismatch``),
        checked after its pidfd is open, so a pid reused after the check is never
        watched. The /proc (and cgroup) reads for all items run in one worker
        thread. Each adopted VMM is watched (pidfd) and put back into its cgroup
        if needed; its QMP is connected by :meth:`attach` or its first use.
        ``adopt_error`` says why the others were not adopted.
        """
        adopted: set[str] = set()
        checks: list[tuple[BootSpec, handle.VmmHandle]] = []
        for spec, handle_data in items:
            self._adopt_errors.pop(spec.vm_id, None)
            vmm = handle.VmmHandle.from_dict(handle_data)
            if vmm is None:
                self._adopt_errors[spec.vm_id] = "no usable VMM handle"
                log.warning("qemu %s: unusable handle %r", spec.vm_id, handle_data)
                continue
            old = self._vms.get(spec.vm_id)
            if old is not None and old.alive and old.handle == vmm:
                adopted.add(spec.vm_id)
                continue
            checks.append((spec, vmm))
        if not checks:
            return adopted
        results = await asyncio.to_thread(handle.identify, checks, self.launcher.cgroup_dirs)
        for (spec, vmm), (why, pidfd, misplaced) in zip(checks, results, strict=True):
            if why is not None:
                self._adopt_errors[spec.vm_id] = why
                log.info("qemu %s: not adopting: %s", spec.vm_id, why)
                continue
            vm = self._track(spec, vmm, None, pidfd)
            vm.unattached = True
            if misplaced:
                try:
                    await self.launcher.reapply_cgroup(spec, vmm)
                except OSError as exc:
                    log.warning("qemu %s: cannot put pid %d back into its cgroup: %s", spec.vm_id, vmm.pid, exc)
            log.info("qemu %s: adopted pid %d", spec.vm_id, vmm.pid)
            adopted.add(spec.vm_id)
        return adopted

    async def attach(self, vm_id: str) -> bool:
        """Connect the QMP of a VMM adopted by :meth:`adopt_many` (or wait for the
        attempt under way). False, with ``adopt_error`` saying why, if it did not
        answer; the VMM is left running and tracked (``discard`` ends it)."""
        vm = self._vms.get(vm_id)
        if vm is None:
            self._adopt_errors.setdefault(vm_id, "no VMM to adopt")
            return False
        try:
            await self._ready(vm)
        except BackendError:
            return False
        return True

    async def _ready(self, vm: _Vm) -> QmpSession:
        """The VM's QMP session, connected: an adopted VMM's is connected on first
        use, once (later callers wait for the same attempt, or get its error)."""
        if not vm.unattached:
            return vm.qmp
        task = vm.attaching
        if task is None or (task.done() and not task.cancelled() and task.exception() is not None and vm.alive):
            # first use, or the last attempt failed while the VMM lives on (e.g. it was stopped): try again
            task = vm.attaching = asyncio.get_running_loop().create_task(self._attach(vm))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            raise BackendError(f"QMP of VM {vm.vm_id} was closed") from None
        return vm.qmp

    async def _attach(self, vm: _Vm) -> None:
        try:
            await vm.qmp.connect(QMP_CONNECT_TIMEOUT_S, lambda: vm.alive)
        except Exception as exc:
            why = f"QMP of pid {vm.handle.pid} did not answer: {describe(exc)}"
            self._adopt_errors[vm.vm_id] = why
            log.warning("qemu %s: adopted pid %d but QMP failed: %s", vm.vm_id, vm.handle.pid, exc)
            raise BackendError(why) from None
        vm.unattached = False

    async def _close_qmp(self, vm: _Vm) -> None:
        """Drop the VM's QMP connection, or the attempt to make it."""
        task = vm.attaching
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        await vm.qmp.close()

    def _track(
        self, spec: BootSpec, vmm: handle.VmmHandle, popen: subprocess.Popen[bytes] | None, pidfd: int | None = None
    ) -> _Vm:
        qmp = QmpSession(f"qmp-{spec.vm_id}", Path(vmm.qmp_socket))
        vm = _Vm(
            vm_id=spec.vm_id,
            run_dir=spec.run_dir,
            console_log=spec.console_log if spec.console_enabled else None,
            tap=spec.network.tap if spec.network else None,
            handle=vmm,
            watch=ProcessWatch(vmm.pid, popen, lambda rc: self._on_exit(vm, rc)),
            qmp=qmp,
        )
        qmp.on_stop = lambda: self._spawn(self._check_stopped(vm))
        self._vms[spec.vm_id] = vm
        vm.watch.start(pidfd)
        self._consoles.start()
        return vm

    def _get(self, vm_id: str) -> _Vm:
        vm = self._vms.get(vm_id)
        if vm is None:
            raise BackendError(f"no QEMU is running for VM {vm_id}")
        return vm

    def _running(self, vm_id: str) -> _Vm:
        vm = self._get(vm_id)
        if not vm.alive:
            raise BackendError(f"QEMU of VM {vm_id} has exited ({vm.exit_reason})")
        return vm

    async def pause(self, vm_id: str) -> None:
        await (await self._ready(self._running(vm_id))).execute("stop")

    async def resume(self, vm_id: str) -> None:
        await (await self._ready(self._running(vm_id))).execute("cont")

    async def shutdown(self, vm_id: str, force: bool, timeout_s: float) -> str:
        vm = self._vms.get(vm_id)
        if vm is None:
            return "not running"
        if not vm.alive:
            await self._wait_finished(vm)
            return vm.exit_reason or "already stopped"
        vm.stopping = True
        try:
            await self._ready(vm)
        except BackendError as exc:  # no QMP: neither power button nor quit
            vm.failure = f"{exc}; killed"
            await self._kill(vm)
            await self._wait_finished(vm)
            return vm.exit_reason or "killed"
        if not force and not await self._power_button(vm, timeout_s):
            vm.failure = f"guest did not power off within {timeout_s:g}s (or its VMM did not answer); stopped"
            force = True
        if force:
            await self._force_stop(vm)
        await self._wait_finished(vm)
        return vm.exit_reason or "stopped"

    async def _power_button(self, vm: _Vm, timeout_s: float) -> bool:
        """Press the ACPI power button until the guest powers off; True if it did.

        The guest's acpid only hears presses once it runs, so a press during
        early boot is lost: repeat it every POWER_BUTTON_REPEAT_S.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while True:
            try:
                status = await vm.qmp.status(timeout=VMM_READ_BOUND_S)
            except BackendError as exc:  # a stopped or wedged VMM cannot hear the button either
                log.warning("qemu %s: %s; not waiting for the guest: %s", vm.vm_id, UNRESPONSIVE, exc)
                return False
            try:
                if status == "paused":
                    await vm.qmp.execute("cont", timeout=VMM_READ_BOUND_S)  # a paused guest cannot see the button
                await vm.qmp.execute("system_powerdown", timeout=VMM_READ_BOUND_S)
            except BackendError as exc:
                log.warning("qemu %s: power button press failed: %s", vm.vm_id, exc)
            remaining = deadline - loop.time()
            if await vm.watch.wait(max(0.0, min(POWER_BUTTON_REPEAT_S, remaining))):
                return True
            if loop.time() >= deadline:
                return False

    async def _force_stop(self, vm: _Vm) -> None:
        """QMP quit (QEMU flushes its drives), SIGKILL if that does not end it."""
        with contextlib.suppress(BackendError):
            await vm.qmp.execute("quit", timeout=FORCED_QUIT_WAIT_S)
        if not await vm.watch.wait(FORCED_QUIT_WAIT_S):
            await self._kill(vm)

    async def reboot(self, spec: BootSpec, force: bool) -> dict[str, Any]:
        vm = self._running(spec.vm_id)
        if force:
            qmp = await self._ready(vm)
            await qmp.execute("system_reset")
            if await qmp.status() == "paused":
                await qmp.execute("cont")
            return vm.handle.to_dict()
        # microvm has no keyboard controller for ctrl-alt-del and the guest treats
        # the ACPI button as poweroff, so a graceful reboot is poweroff + boot.
        await self.shutdown(spec.vm_id, force=False, timeout_s=REBOOT_GRACE_S)
        return await self.boot(spec)

    async def cleanup(self, vm_id: str) -> None:
        vm = self._vms.pop(vm_id, None)
        if vm is None:
            strays.kill_by_pid_file(self.layout.run_dir(vm_id))  # after a restart without adoption
            await self.launcher.remove_jail(vm_id)
            return
        vm.stopping = True
        await self._kill(vm)
        await self._wait_finished(vm)
        vm.watch.close()
        await self._close_qmp(vm)
        strays.remove_files(vm.run_dir, vm.files())
        await self.launcher.remove_jail(vm_id)

    def is_running(self, vm_id: str) -> bool:
        vm = self._vms.get(vm_id)
        return vm is not None and vm.alive

    # --- exits ---------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_exit(self, vm: _Vm, returncode: int | None) -> None:
        self._spawn(self._finish_exit(vm, returncode))

    async def _finish_exit(self, vm: _Vm, returncode: int | None) -> None:
        await vm.qmp.drained(EXIT_DRAIN_S)  # let the SHUTDOWN event arrive
        vm.exit_reason = exit_reason(vm.failure, vm.qmp.shutdown_reason, returncode)
        await self._close_qmp(vm)
        if self._vms.get(vm.vm_id) is vm:
            # QEMU cannot remove these itself (they are outside its chroot); a
            # stopped VM keeps only its logs (and its jail, network and IP).
            for stale in (Path(vm.handle.qmp_socket), pid_file_path(vm.run_dir)):
                stale.unlink(missing_ok=True)
        vm.finished.set()
        log.info("qemu %s: pid %d ended: %s", vm.vm_id, vm.handle.pid, vm.exit_reason)
        if not vm.stopping and self._exit_callback is not None and self._vms.get(vm.vm_id) is vm:
            try:
                self._exit_callback(vm.vm_id, vm.exit_reason)
            except Exception:
                log.exception("qemu %s: exit callback failed", vm.vm_id)

    async def _check_stopped(self, vm: _Vm) -> None:
        """A STOP event: if it was a KVM internal error, the VM would hang; end it."""
        try:
            status = await vm.qmp.status()
        except BackendError:
            return
        if status == "internal-error":
            vm.failure = f"accelerator {vm.handle.accel} internal error (VM killed)"
            log.error("qemu %s: %s", vm.vm_id, vm.failure)
            vm.watch.kill()

    async def _kill(self, vm: _Vm) -> None:
        vm.watch.kill()
        if not await vm.watch.wait(KILL_WAIT_S):
            raise BackendError(f"QEMU pid {vm.handle.pid} of {vm.vm_id} survived SIGKILL")

    async def _wait_finished(self, vm: _Vm) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(vm.finished.wait(), EXIT_DRAIN_S + 1)

    def _logs(self) -> list[tuple[str, Path]]:
        """(vm_id, path) of the logs the running QEMUs append to (capped by LogCap)."""
        logs = []
        for vm in self._vms.values():
            if vm.alive:
                logs.append((vm.vm_id, vmm_log_path(vm.run_dir)))  # QEMU's own stderr, opened O_APPEND too
                if vm.console_log is not None:
                    logs.append((vm.vm_id, vm.console_log))
        return logs

    # --- observation ---------------------------------------------------------

    async def info(self, vm_id: str) -> dict[str, str]:
        vm = self._vms.get(vm_id)
        if vm is None:
            return {"backend": "qemu", "status": "not running"}
        out = {
            "backend": "qemu",
            "pid": str(vm.handle.pid),
            "accel": vm.handle.accel,
            "qmp_socket": vm.handle.qmp_socket,
            "run_dir": str(vm.run_dir),
        }
        with contextlib.suppress(BackendError):
            out["qemu_version"] = await self.qemu_version()
        if vm.alive:
            try:  # a read never waits on the VMM longer than VMM_READ_BOUND_S
                out["status"] = await asyncio.wait_for(self._status(vm), VMM_READ_BOUND_S)
            except (TimeoutError, BackendError) as exc:
                out["status"] = UNRESPONSIVE
                silent = f"no answer over QMP within {VMM_READ_BOUND_S:g}s"
                out["status_detail"] = silent if isinstance(exc, TimeoutError) else describe(exc)
        else:
            out["status"] = "exited"
        if vm.exit_reason:
            out["last_exit_reason"] = vm.exit_reason
        if self.accel.last_detail:
            out["accel_probe"] = self.accel.last_detail
        return out

    async def _status(self, vm: _Vm) -> str:
        return await (await self._ready(vm)).status(timeout=VMM_READ_BOUND_S)

    async def _blockstats(self, vm: _Vm) -> Any:
        return await (await self._ready(vm)).execute("query-blockstats", timeout=VMM_READ_BOUND_S)

    async def metrics(self, vm_id: str) -> VmMetrics:
        vm = self._vms.get(vm_id)
        metrics = VmMetrics()
        if vm is None:
            metrics.notes["process"] = "no QEMU is running for this VM"
            return metrics
        if not vm.alive:
            metrics.notes["process"] = f"QEMU has exited ({vm.exit_reason})"
            return metrics
        vm.cpu_sample = read_process(metrics, vm.handle.pid, vm.handle.start_time, vm.cpu_sample)
        if vm.cpu_sample is None:
            return metrics
        read_network(metrics, vm.handle.pid, vm.tap)
        try:
            stats = await asyncio.wait_for(self._blockstats(vm), VMM_READ_BOUND_S)
            apply_blockstats(metrics, stats)
        except TimeoutError:
            metrics.notes["storage"] = f"VMM {UNRESPONSIVE}: no answer over QMP within {VMM_READ_BOUND_S:g}s"
        except BackendError as exc:
            metrics.notes["storage"] = describe(exc)
        metrics.measured = True
        return metrics

    async def close(self) -> None:
        if self._snapshotter is not None:
            await self._snapshotter.close()
        await self._consoles.close()
        for task in list(self._tasks):
            task.cancel()
        for vm in self._vms.values():
            vm.watch.close()
            await self._close_qmp(vm)
        self._vms.clear()
