"""FirecrackerBackend: metald's Backend port on the Firecracker VMM.

One Firecracker process per VM, configured over its API socket
(logger, metrics, machine-config, boot-source, drives, network-interfaces,
then InstanceStart). Firecracker cannot reboot in place: a reboot is a stop
and a fresh process from the same spec.

How Firecracker is started is the launcher's job (``launch.py``): metald's
integrated jailer by default (``UNKEY_METALD_JAILER_ENABLED``, the production
path), Firecracker's own jailer (``UNKEY_METALD_FIRECRACKER_USE_OWN_JAILER``),
or, with the jailer off, directly as root (development only). A jail is built
fresh at every boot and kept while the VM is SHUTDOWN (Firecracker's log is
in it) until the next boot or delete; the TAP is owned by the jailed
uid/gid (``tap_owner``) so Firecracker can open it after dropping root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metald.backends import procfs
from metald.backends.firecracker.client import FirecrackerClient
from metald.backends.firecracker.exits import describe_exit
from metald.backends.firecracker.handle import FcHandle, is_vmm_of, mismatch
from metald.backends.firecracker.hostcheck import binary_version, executable, kvm_unusable, not_static
from metald.backends.firecracker.launch import (
    DirectLauncher,
    JailerLauncher,
    Launch,
    Launcher,
)
from metald.backends.firecracker.logcap import LogCapper, VmFiles
from metald.backends.firecracker.metrics import CpuSampler, MetricsFile
from metald.backends.firecracker.own_jailer import OwnJailerLauncher
from metald.backends.firecracker.validation import MAX_VCPUS, MIB, boot_args, check_spec
from metald.backends.process import ProcessWatch, spawn
from metald.config import Settings
from metald.core.errors import BackendError, FailedPrecondition
from metald.core.layout import VmLayout
from metald.core.models import BootSpec, VmMetrics
from metald.core.ports import BackendLimits, ExitCallback, RunState

if TYPE_CHECKING:
    from metald.jailer.jailer import Jailer

__all__ = ["FirecrackerBackend", "default_launcher", "kvm_unusable"]

log = logging.getLogger(__name__)

LOG_NAME = "firecracker.log"
METRICS_NAME = "firecracker.metrics"
STDERR_NAME = "firecracker.stderr"
IFACE_ID = "eth0"
PID_FILE_WAIT_S = 5.0
INSTALL_HINT = (
    "install the static release binary (firecracker-v1.16.1-x86_64 from the "
    "firecracker-microvm/firecracker GitHub releases, e.g. as /usr/local/bin/firecracker)"
)


@dataclass
class _Vm:
    handle: FcHandle
    watch: ProcessWatch
    client: FirecrackerClient
    metrics: MetricsFile
    cpu: CpuSampler
    stderr_path: Path | None = None
    expected_exit: bool = True  # until boot succeeds, and again while metald stops it
    exit_reason: str | None = None
    version: str | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    vmm_fd: int | None = None  # pidfd of the VMM when ``watch`` follows the jailer's launcher
    console_path: Path | None = None  # the guest's serial output (capped by logcap)

    def watch_vmm(self, vmm_pid: int) -> None:
        """Keep a pidfd of the VMM inside the launcher's PID namespace (checked to be its child)."""
        if procfs.read_ppid(vmm_pid) != self.handle.pid:
            return
        with contextlib.suppress(OSError):
            self.vmm_fd = os.pidfd_open(vmm_pid)

    def kill(self) -> None:
        """SIGKILL the VMM; with a launcher, the VMM first, so the launcher reaps it and exits."""
        if self.vmm_fd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.vmm_fd, signal.SIGKILL)
                return
        self.watch.kill(signal.SIGKILL, group=False)

    def close_fds(self) -> None:
        if self.vmm_fd is not None:
            os.close(self.vmm_fd)
            self.vmm_fd = None


def default_launcher(settings: Settings, jailer: Jailer | None) -> Launcher:
    """Firecracker's own jailer if asked for, else metald's jailer, else none (development)."""
    if settings.firecracker_use_own_jailer:
        from metald.jailer.jailer import Jailer

        own = jailer or Jailer(settings)  # its cgroup layout and limits
        return OwnJailerLauncher(settings.firecracker_jailer_binary, settings.firecracker_binary, own)
    if jailer is not None:
        return JailerLauncher(jailer, settings.firecracker_binary)
    log.warning(
        "Firecracker VMMs run UNJAILED and as root (UNKEY_METALD_JAILER_ENABLED=false): "
        "development only, never on a host with tenants"
    )
    return DirectLauncher(settings.firecracker_binary)


class FirecrackerBackend:
    name = "firecracker"

    def __init__(
        self,
        settings: Settings,
        launcher: Launcher | None = None,
        kvm_path: Path = Path("/dev/kvm"),
        start_timeout_s: float = 10.0,
        reboot_grace_s: float = 10.0,
        jailer: Jailer | None = None,
    ) -> None:
        self.settings = settings
        self.layout = VmLayout.from_settings(settings)
        self.launcher = launcher or default_launcher(settings, jailer)
        self.kvm_path = kvm_path
        self.start_timeout_s = start_timeout_s
        self.reboot_grace_s = reboot_grace_s
        self._vms: dict[str, _Vm] = {}
        self._on_exit_cb: ExitCallback | None = None
        self._adopt_errors: dict[str, str] = {}  # vm_id -> why the last adopt() said no
        self.log_capper = LogCapper(settings.console_log_max_bytes, self._capped_files)

    def _capped_files(self) -> list[VmFiles]:
        return [
            VmFiles(vm_id, [p for p in (vm.console_path, vm.stderr_path) if p is not None], vm.metrics)
            for vm_id, vm in self._vms.items()
            if vm.watch.alive
        ]

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._on_exit_cb = callback

    @property
    def tap_owner(self) -> tuple[int, int] | None:
        """uid/gid the VM's TAP must belong to: the jailed VMM opens it without root."""
        if isinstance(self.launcher, JailerLauncher | OwnJailerLauncher):
            return self.settings.jailer_uid, self.settings.jailer_gid
        return None

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        """Jails (and cgroups) of VMs metald does not know, e.g. after a crash."""
        return await self.launcher.sweep_leftovers(known_vm_ids)

    def jail_exists(self, vm_id: str) -> bool:
        """Does the VM have a jail (it keeps one while SHUTDOWN, with Firecracker's log)?"""
        return self.launcher.has_jail(vm_id)

    async def remove_jail(self, vm_id: str) -> None:
        """Remove the VM's jail (and cgroup, killing what is left in it)."""
        await self.launcher.teardown(vm_id)

    async def restore_jail(self, spec: BootSpec) -> None:
        """Make the VM's jail again (a failed DeleteVm's undo). Firecracker's jail
        is built fresh at every boot, so this makes an empty one: the log of the
        VM's last run, which lived in it, is not brought back."""
        self.launcher.prepare(spec)
        await self.launcher.setup(spec)

    def run_dir_entries(self) -> frozenset[str]:
        return frozenset()

    def identity_adopter(self) -> None:
        """None: each Firecracker is adopted on its own (``adopt`` asks its API)."""
        return None

    def warmer(self) -> None:
        """None: Firecracker needs KVM from the start, nothing to probe in the background."""

    def snapshotter(self) -> None:
        """None: the client has the snapshot calls (client.py) but the test double
        does not serve them yet; the snapshot RPCs answer unimplemented."""
        return None

    def adopt_error(self, vm_id: str) -> str | None:
        return self._adopt_errors.get(vm_id)

    async def vmm_status(self, vm_id: str) -> RunState:
        """The instance's state from Firecracker's API (``Running`` or ``Paused``)."""
        state = (await self._running(vm_id).client.describe_instance()).get("state")
        return "running" if state == "Running" else "paused" if state == "Paused" else "other"

    async def discard(self, vm_id: str, kill_strays: bool = True) -> list[int]:
        """Stop the VM's Firecracker if one runs, forget it, and (``kill_strays``)
        kill an untracked one of this VM; the logs and the jail stay."""
        vm = self._vms.get(vm_id)
        if vm is not None:
            if vm.watch.alive:
                await self._stop(vm, force=True, timeout_s=0)
            await self._forget(vm_id)
        if kill_strays:
            run_dir = self.layout.run_dir(vm_id)
            self._kill_strays(vm_id, self.launcher.api_sock_arg(vm_id, run_dir))
        return []

    # --- host check -----------------------------------------------------------------
    async def ping(self) -> tuple[bool, str]:
        binary = executable(self.settings.firecracker_binary)
        if binary is None:
            return False, (
                f"Firecracker binary {self.settings.firecracker_binary!r} is missing or not "
                f"executable: {INSTALL_HINT}, or point UNKEY_METALD_FIRECRACKER_BINARY at it "
                "(or use UNKEY_METALD_BACKEND=qemu)"
            )
        if isinstance(self.launcher, JailerLauncher | OwnJailerLauncher):
            why = not_static(binary)
            if why is not None:
                return False, (
                    f"{binary} {why}: the jailer runs Firecracker inside a chroot that holds no "
                    f"libraries or interpreters, so it needs a static executable: {INSTALL_HINT}"
                )
        if isinstance(self.launcher, OwnJailerLauncher):
            if executable(self.settings.firecracker_jailer_binary) is None:
                return False, (
                    f"Firecracker's jailer {self.settings.firecracker_jailer_binary!r} is missing "
                    "or not executable: install jailer-v1.16.1-x86_64 from the same release, set "
                    "UNKEY_METALD_FIRECRACKER_JAILER_BINARY, or unset "
                    "UNKEY_METALD_FIRECRACKER_USE_OWN_JAILER"
                )
        kvm_problem = kvm_unusable(self.kvm_path)
        if kvm_problem is not None:
            return False, (
                f"{kvm_problem}: Firecracker needs KVM: enable virtualization (in the firmware, "
                "or nested virtualization for a VM host), load the KVM module (modprobe kvm_intel "
                "or kvm_amd) and run metald as root; or use UNKEY_METALD_BACKEND=qemu"
            )
        version = await binary_version(binary)
        if version is None:
            return False, f"{binary} --version did not print a Firecracker version"
        return True, f"firecracker {version} at {binary} ({self.launcher.name}); {self.kvm_path} usable"

    def limits(self) -> BackendLimits:
        return BackendLimits(max_vcpus=MAX_VCPUS)

    async def validate(self, spec: BootSpec) -> None:
        check_spec(spec)
        if isinstance(self.launcher, JailerLauncher | OwnJailerLauncher):
            self.launcher.validate(spec)

    # --- start ------------------------------------------------------------------------
    async def boot(self, spec: BootSpec) -> dict[str, Any]:
        check_spec(spec)
        old = self._vms.get(spec.vm_id)
        if old is not None and old.watch.alive:
            raise FailedPrecondition(f"firecracker for {spec.vm_id} already runs (pid {old.watch.pid})")
        if old is not None:
            await self._forget(spec.vm_id)
        spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        launch = self.launcher.prepare(spec)
        await self.launcher.setup(spec)  # the jail; nothing is left of it if this fails
        try:
            handle = await self._start(spec, launch)
        except BaseException:
            await self.launcher.teardown(spec.vm_id)
            raise
        log.info(
            "firecracker for %s started (pid %d, %s)", spec.vm_id, handle.vmm_pid or handle.pid, self.launcher.name
        )
        return handle.to_dict()

    async def _start(self, spec: BootSpec, launch: Launch) -> FcHandle:
        launch.files_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        for stale in (launch.socket_path, launch.pid_file):
            if stale is not None:  # Firecracker refuses to start on an existing socket
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        log_path = launch.files_dir / LOG_NAME
        metrics_path = launch.files_dir / METRICS_NAME
        for path in (log_path, metrics_path):  # Firecracker opens them, never creates them
            path.write_bytes(b"")
            launch.own(path)
        stderr_path = spec.run_dir / STDERR_NAME
        stderr_path.write_bytes(b"")
        try:
            popen = spawn(launch.argv, stderr_path, spec.console_log if spec.console_enabled else None)
        except OSError as exc:
            raise BackendError(f"cannot start {launch.argv[0]}: {exc}") from exc
        stat = procfs.read_stat(popen.pid)
        handle = FcHandle(
            vm_id=spec.vm_id,
            pid=popen.pid,
            start_time=stat.start_time if stat else 0,
            api_sock_arg=launch.api_sock_arg,
            socket_path=str(launch.socket_path),
            files_dir=str(launch.files_dir),
            metrics_path=str(metrics_path),
            chroot=str(launch.chroot) if launch.chroot else None,
        )
        vm = self._track(handle, popen, stderr_path)
        vm.console_path = spec.console_log if spec.console_enabled else None
        try:
            await self._wait_for_api(vm)
            if launch.pid_file is not None:
                vmm_pid = await self._read_pid_file(vm, launch.pid_file)
                vm.handle = handle = replace(handle, vmm_pid=vmm_pid)
                vm.watch_vmm(vmm_pid)
                vm.cpu = CpuSampler(vmm_pid)
            await self._configure(vm.client, spec, launch, log_path, metrics_path)
            await vm.client.instance_start()
        except BaseException:
            await self._stop(vm, force=True, timeout_s=0)
            await self._forget(spec.vm_id)
            raise
        vm.expected_exit = False
        return handle

    def _track(self, handle: FcHandle, popen: subprocess.Popen[bytes] | None, stderr_path: Path | None) -> _Vm:
        vm_id = handle.vm_id
        watch = ProcessWatch(handle.pid, popen, lambda rc: self._exited(vm_id, rc))
        vm = _Vm(
            handle=handle,
            watch=watch,
            client=FirecrackerClient(Path(handle.socket_path)),
            metrics=MetricsFile(Path(handle.metrics_path)),
            cpu=CpuSampler(handle.vmm_pid or handle.pid),
            stderr_path=stderr_path,
        )
        self._vms[vm_id] = vm
        watch.start()
        self.log_capper.ensure_running()
        return vm

    async def _wait_for_api(self, vm: _Vm) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        socket_path = Path(vm.handle.socket_path)
        last_error = "socket not created"
        while loop.time() < deadline:
            if not vm.watch.alive:
                raise BackendError(f"firecracker exited while starting ({vm.exit_reason}): {_tail(vm.stderr_path)}")
            if socket_path.exists():
                try:
                    await vm.client.describe_instance()
                    return
                except BackendError as exc:
                    last_error = str(exc)
            await asyncio.sleep(0.02)
        raise BackendError(
            f"firecracker API socket {socket_path} not ready after {self.start_timeout_s:g}s "
            f"({last_error}): {_tail(vm.stderr_path)}"
        )

    async def _read_pid_file(self, vm: _Vm, pid_file: Path) -> int:
        """The VMM's host pid, written by the jailer's launcher right after it forks."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PID_FILE_WAIT_S
        while True:
            with contextlib.suppress(OSError, ValueError):
                return int(pid_file.read_text().strip())
            if not vm.watch.alive or loop.time() >= deadline:
                raise BackendError(f"the jailer did not write {pid_file}: {_tail(vm.stderr_path)}")
            await asyncio.sleep(0.02)

    async def _configure(
        self,
        client: FirecrackerClient,
        spec: BootSpec,
        launch: Launch,
        log_path: Path,
        metrics_path: Path,
    ) -> None:
        await client.put_logger(launch.vmm_path(log_path))
        await client.put_metrics(launch.vmm_path(metrics_path))
        await client.put_machine_config(spec.vcpu_count, spec.memory_bytes // MIB)
        kernel = launch.expose(spec.kernel_path, "vmlinux")
        initrd = launch.expose(spec.initrd_path, "initrd") if spec.initrd_path else None
        await client.put_boot_source(kernel, initrd, boot_args(spec))
        for drive in spec.drives:
            path = launch.expose(drive.path, f"drive-{drive.drive_id}")
            await client.put_drive(drive.drive_id, path, drive.is_root, drive.read_only)
        net = spec.network
        if net is not None:
            await client.put_network_interface(IFACE_ID, net.tap, net.mac or None, net.rx_rate_limit, net.tx_rate_limit)

    def _exited(self, vm_id: str, returncode: int | None) -> None:
        vm = self._vms.get(vm_id)
        if vm is None:
            return
        vm.exit_reason = describe_exit(returncode)  # the launcher passes the VMM's status on unchanged
        task = asyncio.get_running_loop().create_task(vm.client.close())
        vm.tasks.add(task)
        task.add_done_callback(vm.tasks.discard)
        if vm.expected_exit:
            return
        log.warning("firecracker for %s ended on its own: %s", vm_id, vm.exit_reason)
        if self._on_exit_cb is not None:
            try:
                self._on_exit_cb(vm_id, vm.exit_reason)
            except Exception:
                log.exception("exit callback for %s failed", vm_id)

    # --- re-attach --------------------------------------------------------------------
    async def adopt(self, spec: BootSpec, handle: dict[str, Any]) -> bool:
        self._adopt_errors.pop(spec.vm_id, None)
        parsed = FcHandle.from_dict(handle)
        if parsed is None or parsed.vm_id != spec.vm_id:
            self._adopt_errors[spec.vm_id] = "no usable VMM handle"
            return False
        why = mismatch(parsed)
        if why is not None:
            self._adopt_errors[spec.vm_id] = why
            log.info("not adopting firecracker for %s: %s", spec.vm_id, why)
            return False
        vm = self._track(parsed, None, spec.run_dir / STDERR_NAME)
        vm.console_path = spec.console_log if spec.console_enabled else None
        if parsed.vmm_pid:
            vm.watch_vmm(parsed.vmm_pid)
        try:
            await vm.client.describe_instance()
        except BackendError as exc:
            self._adopt_errors[spec.vm_id] = f"API of pid {parsed.pid} did not answer: {exc}"
            log.info("not adopting firecracker for %s: API does not answer: %s", spec.vm_id, exc)
            await self._forget(spec.vm_id)
            return False
        vm.expected_exit = False
        return True

    # --- runtime ------------------------------------------------------------------------
    def _running(self, vm_id: str) -> _Vm:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.watch.alive:
            raise FailedPrecondition(f"no running firecracker for {vm_id}")
        return vm

    async def pause(self, vm_id: str) -> None:
        await self._running(vm_id).client.pause()

    async def resume(self, vm_id: str) -> None:
        await self._running(vm_id).client.resume()

    def is_running(self, vm_id: str) -> bool:
        vm = self._vms.get(vm_id)
        return vm is not None and vm.watch.alive

    # --- stop ---------------------------------------------------------------------------
    async def shutdown(self, vm_id: str, force: bool, timeout_s: float) -> str:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.watch.alive:
            return "not running"
        return await self._stop(vm, force, timeout_s)  # the jail stays (logs) until boot or delete

    async def _stop(self, vm: _Vm, force: bool, timeout_s: float) -> str:
        vm.expected_exit = True
        if not vm.watch.alive:
            return vm.exit_reason or "not running"
        how = "killed"
        if not force:
            try:
                if (await vm.client.describe_instance()).get("state") == "Paused":
                    await vm.client.resume()  # a paused guest cannot act on Ctrl+Alt+Del
                await vm.client.send_ctrl_alt_del()
            except BackendError as exc:
                how = f"killed (SendCtrlAltDel failed: {exc})"
            else:
                if await vm.watch.wait(timeout_s):
                    return _poweroff_reason(vm.watch.returncode, vm.exit_reason)
                how = f"killed after {timeout_s:g}s (the guest did not power off)"
        vm.kill()
        if not await vm.watch.wait(5):
            vm.watch.kill(signal.SIGKILL, group=False)
            if not await vm.watch.wait(5):
                raise BackendError(f"firecracker pid {vm.watch.pid} survived SIGKILL")
        with contextlib.suppress(OSError):
            Path(vm.handle.socket_path).unlink()
        return how

    async def reboot(self, spec: BootSpec, force: bool) -> dict[str, Any]:
        vm = self._vms.get(spec.vm_id)
        if vm is not None and vm.watch.alive:
            how = await self._stop(vm, force, self.reboot_grace_s)
            log.info("reboot of %s: old firecracker %s", spec.vm_id, how)
        return await self.boot(spec)

    async def cleanup(self, vm_id: str) -> None:
        vm = self._vms.get(vm_id)
        if vm is not None:
            if vm.watch.alive:
                await self._stop(vm, force=True, timeout_s=0)
            files_dir = Path(vm.handle.files_dir)
            await self._forget(vm_id)
        else:
            files_dir = self.layout.run_dir(vm_id)
            self._kill_strays(vm_id, self.launcher.api_sock_arg(vm_id, files_dir))
        run_dir = self.layout.run_dir(vm_id)
        for directory in {files_dir, run_dir}:
            for name in (LOG_NAME, METRICS_NAME, STDERR_NAME, "firecracker.sock"):
                with contextlib.suppress(OSError):
                    (directory / name).unlink()
        await self.launcher.teardown(vm_id)

    def _kill_strays(self, vm_id: str, api_sock_arg: str) -> None:
        """SIGKILL a Firecracker of this VM that metald does not track (e.g. after a crash)."""
        for pid in procfs.pids():
            argv = procfs.read_cmdline(pid)
            if not argv or not is_vmm_of(argv, vm_id, api_sock_arg):
                continue
            log.warning("killing untracked firecracker pid %d of %s", pid, vm_id)
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(pid)
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                finally:
                    os.close(fd)

    async def _forget(self, vm_id: str) -> None:
        vm = self._vms.pop(vm_id, None)
        if vm is None:
            return
        vm.watch.close()
        vm.close_fds()
        await vm.client.close()
        if vm.tasks:
            await asyncio.gather(*vm.tasks, return_exceptions=True)

    # --- reporting ----------------------------------------------------------------------
    async def info(self, vm_id: str) -> dict[str, str]:
        out = {"backend": self.name}
        vm = self._vms.get(vm_id)
        if vm is None:
            out["state"] = "not tracked"
            return out
        h = vm.handle
        out.update(
            pid=str(h.pid),
            socket=h.socket_path,
            metrics_file=h.metrics_path,
            log_file=str(Path(h.files_dir) / LOG_NAME),
            launcher=self.launcher.name,
        )
        if h.vmm_pid:
            out["vmm_pid"] = str(h.vmm_pid)
        if h.chroot:
            out["chroot"] = h.chroot
        if not vm.watch.alive:
            out["state"] = "exited"
            out["exit_reason"] = vm.exit_reason or "unknown"
            return out
        try:
            instance = await vm.client.describe_instance()
            out["state"] = str(instance.get("state", "unknown"))
        except BackendError as exc:
            out["state"] = f"unknown ({exc})"
        if vm.version is None:
            try:
                vm.version = await vm.client.version()
            except BackendError:
                binary = executable(self.settings.firecracker_binary)
                vm.version = (await binary_version(binary) if binary else None) or "unknown"
        out["firecracker_version"] = vm.version
        return out

    async def metrics(self, vm_id: str) -> VmMetrics:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.watch.alive:
            return VmMetrics(measured=False, notes={"reason": "firecracker is not running"})
        notes: dict[str, str] = {}
        try:
            await vm.client.flush_metrics()
        except BackendError as exc:
            notes["flush"] = str(exc)
        vm.metrics.read_new()
        totals = vm.metrics.totals
        if totals.lines == 0:
            notes["metrics_file"] = "no metrics written yet"
        result = VmMetrics(measured=True, notes=notes, **totals.counters())
        pid = vm.handle.vmm_pid or vm.handle.pid
        stat = procfs.read_stat(pid)
        if stat is not None:
            result.cpu_usage_percent = vm.cpu.sample(stat)
            result.uptime_seconds = int(procfs.process_age_seconds(stat.start_time))
        result.memory_usage_bytes = procfs.read_rss_bytes(pid) or 0
        return result

    async def close(self) -> None:
        await self.log_capper.close()
        for vm_id in list(self._vms):
            await self._forget(vm_id)


def _poweroff_reason(returncode: int | None, reason: str | None) -> str:
    if returncode == 0:
        return "guest poweroff"
    if returncode is None:
        return "exited after Ctrl+Alt+Del"
    return f"exited after Ctrl+Alt+Del ({reason})"


def _tail(path: Path | None, limit: int = 2000) -> str:
    if path is None:
        return "(no stderr captured)"
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return "(no stderr captured)"
    text = data.decode(errors="replace").strip()
    return text or "(stderr empty)"
