"""The QEMU (microvm) backend: one detached QEMU process per VM, driven over QMP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metald.backends import procfs
from metald.backends.process import ProcessWatch, describe_status, spawn
from metald.backends.qemu import console, handle
from metald.backends.qemu.accel import PROBE_TIMEOUT_S, AccelChooser, probe_kvm
from metald.backends.qemu.clock import cached_host_tsc_khz, tcg_extra_args
from metald.backends.qemu.command import (
    CommandOptions,
    argv_hash,
    build_argv,
    launch_argv,
    pid_file_path,
    qmp_socket_path,
    vmm_log_path,
)
from metald.backends.qemu.metrics import CpuSample, apply_blockstats, read_network, read_process
from metald.backends.qemu.qmp import QmpSession, describe_shutdown
from metald.backends.qemu.validate import validate_spec
from metald.config import Settings
from metald.core.bounds import UNRESPONSIVE, VMM_READ_BOUND_S, describe
from metald.core.errors import BackendError
from metald.core.models import BootSpec, VmMetrics
from metald.core.plan import Plan
from metald.core.ports import ExitCallback
from metald.jailer import cgroup as cgroups
from metald.jailer.jailer import Jailer
from metald.jailer.layout import VM_ID_RE
from metald.jailer.qemu import qemu_confinement_args, qemu_launch_argv

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT_S = 10.0
FORCED_QUIT_WAIT_S = 3.0
KILL_WAIT_S = 5.0
REBOOT_GRACE_S = 30.0
POWER_BUTTON_REPEAT_S = 2.0
CONSOLE_CHECK_INTERVAL_S = 1.0
EXIT_DRAIN_S = 1.0
# Under TCG, QEMU's translation cache and buffers need memory beyond the guest's
# and the configured VMM allowance; the jail's memory limit includes this.
TCG_MEMORY_OVERHEAD = 256 << 20
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

    def __init__(self, settings: Settings, jailer: Jailer | None = None) -> None:
        self.settings = settings
        self.jailer = jailer
        if jailer is None:
            log.warning("QEMU VMMs run UNJAILED (UNKEY_METALD_JAILER_ENABLED=false): development only")
        self._vms: dict[str, _Vm] = {}
        self._exit_callback: ExitCallback | None = None
        self._version: str | None = None
        self._console_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._adopt_errors: dict[str, str] = {}  # vm_id -> why the last adopt() said no
        self.accel = AccelChooser(
            settings.qemu_accel,
            settings.run_dir / "qemu-accel.json",
            self.qemu_version,
            lambda spec: probe_kvm(spec, settings.qemu_binary, settings.run_dir / "accel-probe", PROBE_TIMEOUT_S),
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
        image = self.settings.image_dir
        kernel, initrd, cmdline = image / "vmlinuz", image / "initramfs.cpio.gz", image / "cmdline"
        if self.settings.qemu_accel != "auto" or not kernel.is_file():
            return
        run_dir = self.settings.run_dir / "accel-probe"
        spec = BootSpec(
            vm_id="accel-probe",
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
        await self.accel.warm_up(spec)

    async def ping(self) -> tuple[bool, str]:
        try:
            version = await self.qemu_version()
        except (BackendError, OSError, TimeoutError) as exc:
            return False, str(exc)
        return True, f"QEMU {version}, accel={self.settings.qemu_accel}"

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
            sandbox=self.jailer is None,  # the jail adds its own -sandbox (see jailer/qemu.py)
        )
        argv = build_argv(spec, options)
        if argv_hook is not None:
            argv = argv_hook(argv)
        if self.jailer is not None:
            argv, command = await self._jailed(spec, argv, accel)
            argv = command[command.index("--") + 1 :]  # what QEMU's /proc cmdline will show
        else:
            command = launch_argv(spec, argv)
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

    async def _jailed(self, spec: BootSpec, argv: list[str], accel: str) -> tuple[list[str], list[str]]:
        """Prepare a fresh jail (chroot, cgroup) and return (qemu argv, launcher command)."""
        assert self.jailer is not None
        jail = self.jailer.jail_for(self.name, spec.vm_id)
        # A VM keeps its (empty) jail while SHUTDOWN and across reboots: reuse it
        # as it is, so a failed boot leaves it exactly as it was. Anything else
        # (half made, or with processes left in its cgroup) is made afresh.
        if not await asyncio.to_thread(_jail_ready, jail.root, jail.cgroup.dirs):
            try:
                await self.jailer.cleanup(jail)
            except OSError as exc:  # e.g. a process that is not this VM's VMM in its cgroup
                raise BackendError(f"cannot prepare the jail of {spec.vm_id}: {exc}") from exc
            await self._prepare_jail(spec, accel)
        argv = [*argv, *qemu_confinement_args(jail)]
        netns = spec.network.namespace if spec.network is not None else None
        return argv, qemu_launch_argv(self.jailer, jail, argv, netns)

    async def _prepare_jail(self, spec: BootSpec, accel: str) -> None:
        """Build the VM's jail (plan ``jail``: chroot, assets, devices, cgroup)."""
        assert self.jailer is not None
        jail = self.jailer.jail_for(self.name, spec.vm_id)
        try:
            await Plan("jail", self.jailer.prepare_steps(jail, self._sized(spec, accel))).run()
        except Exception as exc:
            raise BackendError(f"cannot prepare the jail of {spec.vm_id}: {exc}") from exc

    @staticmethod
    def _sized(spec: BootSpec, accel: str) -> BootSpec:
        """The spec the jail's limits are computed from (TCG needs memory of its own)."""
        if accel != "tcg":
            return spec
        from dataclasses import replace

        return replace(spec, memory_bytes=spec.memory_bytes + TCG_MEMORY_OVERHEAD)

    async def _remove_jail(self, vm_id: str) -> None:
        if self.jailer is not None:
            await self.jailer.cleanup(self.jailer.jail_for(self.name, vm_id))

    # --- recovery: jails, strays, adoption -------------------------------------

    def jail_exists(self, vm_id: str) -> bool:
        """Does the VM have a jail directory (it keeps one while SHUTDOWN)?"""
        if self.jailer is None:
            return False
        return self.jailer.jail_for(self.name, vm_id).dir.exists()

    async def remove_jail(self, vm_id: str) -> None:
        """Remove the VM's jail (cgroup, then chroot); kills what is left in the cgroup."""
        await self._remove_jail(vm_id)

    async def restore_jail(self, spec: BootSpec) -> None:
        """Build the VM's jail again (undo of :meth:`remove_jail` for a VM that had one)."""
        if self.jailer is not None:
            await self._prepare_jail(spec, await self.accel.choose(spec))

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
            killed = await asyncio.to_thread(_kill_processes, self._markers(only=vm_id, keep={}))
        run_dir = self.settings.run_dir / vm_id
        for path in (qmp_socket_path(run_dir), pid_file_path(run_dir)):
            path.unlink(missing_ok=True)
        return killed

    def adopt_error(self, vm_id: str) -> str | None:
        """Why the last :meth:`adopt` of this VM failed (None if it did not)."""
        return self._adopt_errors.get(vm_id)

    async def vmm_status(self, vm_id: str) -> str:
        """QEMU's run state over QMP (``running``, ``paused``, ...)."""
        return await (await self._ready(self._running(vm_id))).status()

    def _markers(self, only: str | None, keep: dict[str, int]) -> list[tuple[int, str]]:
        """(pid, vm_id) of processes carrying this metald's VMM markers (a QMP socket
        under its run dir), except ``keep`` (vm_id -> pid of the VMM to leave)."""
        found = []
        for pid, vm_id in _vmm_processes(self.settings.run_dir):
            if (only is None or vm_id == only) and keep.get(vm_id) != pid:
                found.append((pid, vm_id))
        return found

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        """Stray VMM processes, and jails and cgroups of VMs metald does not know.

        A process is stray when it carries the marker of a VMM of this metald
        (``-qmp unix:<run_dir>/<vm_id>/qmp.sock``, in QEMU or its launcher)
        but is not the VMM metald tracks for that VM. Only jails under this
        metald's chroot directory are looked at (a cgroup of ours always has
        its jail directory: it is made after it and removed before it), so
        two metalds with different directories never remove each other's.
        """
        keep = {vm_id: vm.handle.pid for vm_id, vm in self._vms.items() if vm.alive}
        strays = await asyncio.to_thread(_kill_processes, self._markers(None, keep))
        removed = [f"process {pid}" for pid in strays]
        if self.jailer is None:
            return removed
        base = self.settings.jailer_chroot_dir / self.name
        try:
            names = sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            names = []
        for vm_id in names:
            if vm_id in known_vm_ids or not VM_ID_RE.match(vm_id):
                continue
            try:
                await self._remove_jail(vm_id)
            except OSError as exc:  # e.g. a process in its cgroup that is not its VMM: left alone
                log.warning("could not remove leftover jail of %s: %s", vm_id, exc)
                continue
            removed.append(f"jail {vm_id}")
        return removed

    async def _reapply_cgroup(self, spec: BootSpec, vmm: handle.VmmHandle) -> None:
        """Put an adopted VMM back into its jail's cgroup if it is not there
        (e.g. the cgroup was removed by hand): the limits hold again."""
        if self.jailer is None:
            return
        jail = self.jailer.jail_for(self.name, spec.vm_id)
        dirs = jail.cgroup.dirs
        if all(vmm.pid in cgroups.procs(d) for d in dirs):
            return
        limits = self.jailer.limits_for(self._sized(spec, vmm.accel))
        await asyncio.to_thread(cgroups.create, jail.cgroup, limits)
        for directory in dirs:
            with contextlib.suppress(OSError), open(directory / "cgroup.procs", "w") as f:
                f.write(str(vmm.pid))
        log.warning("qemu %s: adopted pid %d put back into its cgroup", spec.vm_id, vmm.pid)

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
        results = await asyncio.to_thread(self._identify, checks)
        for (spec, vmm), (why, pidfd, misplaced) in zip(checks, results, strict=True):
            if why is not None:
                self._adopt_errors[spec.vm_id] = why
                log.info("qemu %s: not adopting: %s", spec.vm_id, why)
                continue
            vm = self._track(spec, vmm, None, pidfd)
            vm.unattached = True
            if misplaced:
                try:
                    await self._reapply_cgroup(spec, vmm)
                except OSError as exc:
                    log.warning("qemu %s: cannot put pid %d back into its cgroup: %s", spec.vm_id, vmm.pid, exc)
            log.info("qemu %s: adopted pid %d", spec.vm_id, vmm.pid)
            adopted.add(spec.vm_id)
        return adopted

    def _identify(self, checks: list[tuple[BootSpec, handle.VmmHandle]]) -> list[tuple[str | None, int | None, bool]]:
        """(why not, pidfd, outside its cgroup) per check (worker thread)."""
        out: list[tuple[str | None, int | None, bool]] = []
        for spec, vmm in checks:
            pidfd = None
            try:
                with contextlib.suppress(ProcessLookupError):  # gone: mismatch() says so
                    pidfd = os.pidfd_open(vmm.pid) if vmm.pid > 1 else None
                why = handle.mismatch(vmm)
                misplaced = False
                if why is None and self.jailer is not None:
                    dirs = self.jailer.jail_for(self.name, spec.vm_id).cgroup.dirs
                    misplaced = not all(vmm.pid in cgroups.procs(d) for d in dirs)
            except Exception as exc:  # noqa: BLE001 - one bad item must not stop the others
                why, misplaced = f"cannot check pid {vmm.pid}: {exc}", False
            if why is None and pidfd is None:
                why = f"process {vmm.pid} is gone"
            if why is not None and pidfd is not None:
                os.close(pidfd)
                pidfd = None
            out.append((why, pidfd, misplaced))
        return out

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
        self._ensure_console_task()
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
            self._cleanup_unknown(vm_id)
            await self._remove_jail(vm_id)
            return
        vm.stopping = True
        await self._kill(vm)
        await self._wait_finished(vm)
        vm.watch.close()
        await self._close_qmp(vm)
        _remove_files(vm.run_dir, vm.files())
        await self._remove_jail(vm_id)

    def _cleanup_unknown(self, vm_id: str) -> None:
        """Cleanup after a restart without adoption: trust only our own pidfile."""
        run_dir = self.settings.run_dir / vm_id
        pid_file = pid_file_path(run_dir)
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            cmdline = procfs.read_cmdline(pid) or []
            if any(str(qmp_socket_path(run_dir)) in arg for arg in cmdline):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
        files = [qmp_socket_path(run_dir), pid_file, vmm_log_path(run_dir), run_dir / "console.log"]
        _remove_files(run_dir, files)

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

    # --- console log cap -----------------------------------------------------

    def _ensure_console_task(self) -> None:
        if self._console_task is None or self._console_task.done():
            self._console_task = asyncio.get_running_loop().create_task(self._cap_consoles())

    async def _cap_consoles(self) -> None:
        limit = self.settings.console_log_max_bytes
        while True:
            await asyncio.sleep(CONSOLE_CHECK_INTERVAL_S)
            logs = []
            for vm in self._vms.values():
                if vm.alive:
                    logs.append((vm.vm_id, vmm_log_path(vm.run_dir)))  # QEMU's own stderr, opened O_APPEND too
                    if vm.console_log is not None:
                        logs.append((vm.vm_id, vm.console_log))
            await asyncio.to_thread(_cap_logs, logs, limit)  # a stat per log: off the event loop

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
        if self._console_task is not None:
            self._console_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._console_task
        for task in list(self._tasks):
            task.cancel()
        for vm in self._vms.values():
            vm.watch.close()
            await self._close_qmp(vm)
        self._vms.clear()


def exit_reason(failure: str | None, shutdown_cause: str | None, returncode: int | None) -> str:
    """One line on how a QEMU ended, from metald's own verdict, QMP and the exit status."""
    status = describe_status(returncode)
    if failure:
        return f"{failure} ({status})" if returncode is not None else failure
    event = describe_shutdown(shutdown_cause)
    if event is None:
        return status
    if returncode is None or returncode == 0:
        return event
    return f"{event} ({status})"


def _cap_logs(logs: list[tuple[str, Path]], limit: int) -> None:
    for vm_id, path in logs:
        try:
            if console.cap_log(path, limit):
                log.debug("qemu %s: %s cut to %d bytes", vm_id, path.name, limit // 2)
        except OSError as exc:
            log.warning("qemu %s: capping %s failed: %s", vm_id, path, exc)


def _remove_files(run_dir: Path, files: list[Path]) -> None:
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only if empty; never its parent


def _jail_ready(root: Path, cgroup_dirs: tuple[Path, ...]) -> bool:
    """A complete QEMU jail (its tree and cgroups) with no process in it."""
    tree = (root / "dev" / "net", root / "run")
    if not all(path.is_dir() for path in tree):
        return False
    return all(d.is_dir() for d in cgroup_dirs) and not any(cgroups.procs(d) for d in cgroup_dirs)


def _vmm_processes(run_root: Path) -> list[tuple[int, str]]:
    """(pid, vm_id) of every process whose command line has ``unix:<run_root>/<vm_id>/qmp.sock``."""
    marker = re.compile(r"unix:" + re.escape(str(run_root)) + r"/([^/]+)/qmp\.sock")
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        cmdline = procfs.read_cmdline(int(entry.name))
        if not cmdline:
            continue
        for arg in cmdline:
            match = marker.search(arg)
            if match and VM_ID_RE.match(match.group(1)):
                found.append((int(entry.name), match.group(1)))
                break
    return found


def _kill_processes(targets: list[tuple[int, str]], timeout: float = KILL_WAIT_S) -> list[int]:
    """SIGKILL each (pid, vm_id) (its process group too if it leads one); wait until gone."""
    killed = []
    for pid, vm_id in targets:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        log.warning("killed stray VMM process %d of %s", pid, vm_id)
        killed.append(pid)
    deadline = time.monotonic() + timeout
    for pid in killed:
        while time.monotonic() < deadline:
            stat = procfs.read_stat(pid)
            if stat is None or stat.state in ("Z", "X"):
                break
            time.sleep(0.01)
    return killed
