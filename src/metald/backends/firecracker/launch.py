"""How a Firecracker process is started: its command line, socket and file paths.

Three launchers:

* :class:`JailerLauncher` (the production path, ``UNKEY_METALD_JAILER_ENABLED``):
  metald's integrated jailer. Per VM a jail ``<chroot_dir>/firecracker/<vm_id>/root``
  holding the kernel, initrd and drives (hard links, copies or bind mounts owned
  by the jailed uid/gid), ``dev/kvm``, ``dev/net/tun`` and ``run/``; a cgroup with
  the VM's limits. ``python -m metald.jailer.exec`` joins the VM's network
  namespace, a private mount namespace and a new PID namespace, the cgroup,
  sets RLIMIT_NOFILE, closes inherited fds, chroots, drops to the jailed uid/gid
  and execs Firecracker (a static binary) with an empty environment and
  ``--api-sock /run/firecracker.socket``. Every path in the API bodies is the
  in-jail path.

  PID namespace: on. All VMMs share one unprivileged uid, so without it a
  compromised Firecracker could signal (or, where Yama allows, ptrace) the other
  VMs' VMMs;
  inside its own PID namespace it sees and reaches only itself. The cost: the
  pid metald starts is the launcher (which waits and forwards signals, and whose
  death kills the VMM), and the VMM's host pid is read from the jail's
  ``vmm.pid`` for CPU and memory figures. Firecracker handles being pid 1
  (metald stops it with SendCtrlAltDel or SIGKILL, never SIGTERM).
* ``OwnJailerLauncher`` (``own_jailer.py``, ``UNKEY_METALD_FIRECRACKER_USE_OWN_JAILER``):
  Firecracker's own jailer binary (``--id --exec-file --uid --gid
  --chroot-base-dir [--netns] --cgroup-version --parent-cgroup --cgroup ...
  --resource-limit no-file=N -- <firecracker args>``); a fresh jail per start
  with the assets placed before it runs. No ``--daemonize``: metald already
  starts it in a new session (the jailer's own setsid() would fail), and its
  stdio must stay on the per-VM logs.
* :class:`DirectLauncher` (jailer off; development only): ``firecracker
  --api-sock <run_dir>/firecracker.sock --id <vm_id>`` as root, inside the VM's
  network namespace through ``nsenter --net=/run/netns/<ns> --``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from metald.core.errors import BackendError, MetaldError, StepFailed
from metald.core.models import BootSpec
from metald.core.plan import Plan
from metald.jailer.assets import assets_of

if TYPE_CHECKING:
    from metald.jailer.jailer import Jailer
    from metald.jailer.layout import Jail

log = logging.getLogger(__name__)

API_SOCK_NAME = "firecracker.sock"
JAILED_API_SOCK = "/run/firecracker.socket"
VMM_NAME = "firecracker"  # the jail directory: <chroot_dir>/firecracker/<vm_id>
# metald.jailer.exec's launcher with --new-pid-ns (see the module docstring).
NEW_PID_NS = True
VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")

# Turns a namespace name into the argv prefix that runs a command inside it.
NetnsPrefix = Callable[[str], list[str]]


def nsenter_prefix(namespace: str) -> list[str]:
    """Run the VMM inside /run/netns/<namespace> (where its TAP lives)."""
    return ["nsenter", f"--net=/run/netns/{namespace}", "--"]


@dataclass(frozen=True)
class Launch:
    """One prepared start of Firecracker for one VM."""

    argv: list[str]
    api_sock_arg: str  # the --api-sock value Firecracker itself sees
    socket_path: Path  # that socket, as seen from the host
    files_dir: Path  # where the VMM's log and metrics files are kept on the host
    chroot: Path | None = None  # the jail's root on the host; None when not jailed
    owner: tuple[int, int] | None = None  # uid/gid the jailed VMM runs as
    # Where an asset already placed in the jail is seen by the VMM (integrated
    # jailer); None: ``expose`` links it into the chroot itself (own jailer).
    placed: Callable[[Path], str] | None = None
    # With a PID namespace: the file where the VMM's host pid appears.
    pid_file: Path | None = None

    def vmm_path(self, host_path: Path) -> str:
        """The name the VMM uses for a file of ``files_dir``."""
        if self.chroot is None:
            return str(host_path)
        return "/" + str(host_path.relative_to(self.chroot))

    def expose(self, source: Path, name: str) -> str:
        """Make an asset (kernel, initrd, drive) reachable by the VMM; return its VMM path."""
        if self.chroot is None:
            return str(source)
        if self.placed is not None:
            return self.placed(source)
        raise BackendError(f"{source}: the jail has no place for {name} (jailed launches place assets in setup)")

    def own(self, path: Path) -> None:
        """Give a file to the jailed VMM's uid/gid (no-op when not jailed)."""
        if self.owner is not None:
            os.chown(path, *self.owner)


class Launcher(Protocol):
    name: str

    def prepare(self, spec: BootSpec) -> Launch:
        """The command and paths of one start."""
        ...

    async def setup(self, spec: BootSpec) -> None:
        """Create what the start needs outside the VM's run dir (the jail)."""
        ...

    def api_sock_arg(self, vm_id: str, run_dir: Path) -> str:
        """The --api-sock value a VMM of this VM was started with."""
        ...

    async def teardown(self, vm_id: str) -> None:
        """Remove what ``setup`` created; idempotent, also for unknown VMs."""
        ...

    def has_jail(self, vm_id: str) -> bool:
        """Does ``setup`` (or an earlier run) have a jail of this VM on disk?"""
        ...

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        """Remove what ``setup`` left for VMs metald does not know; return their ids."""
        ...


class DirectLauncher:
    """No jail: Firecracker runs as root. For development only."""

    name = "direct"

    def __init__(self, binary: str, netns_prefix: NetnsPrefix = nsenter_prefix) -> None:
        self.binary = binary
        self.netns_prefix = netns_prefix

    def api_sock_arg(self, vm_id: str, run_dir: Path) -> str:
        return str(run_dir / API_SOCK_NAME)

    def prepare(self, spec: BootSpec) -> Launch:
        sock = spec.run_dir / API_SOCK_NAME
        argv = [self.binary, "--api-sock", str(sock), "--id", spec.vm_id]
        if spec.network is not None:
            argv = self.netns_prefix(spec.network.namespace) + argv
        return Launch(argv=argv, api_sock_arg=str(sock), socket_path=sock, files_dir=spec.run_dir)

    async def setup(self, spec: BootSpec) -> None:
        pass  # everything lives in the run dir

    def discard(self, vm_id: str) -> None:
        pass

    async def teardown(self, vm_id: str) -> None:
        pass

    def has_jail(self, vm_id: str) -> bool:
        return False

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        return []


class JailerLauncher:
    """metald's integrated jailer (see the module docstring)."""

    name = "metald-jailer"

    def __init__(self, jailer: Jailer, binary: str) -> None:
        self.jailer = jailer
        self.binary = binary

    def jail(self, vm_id: str) -> Jail:
        return self.jailer.jail_for(VMM_NAME, vm_id)

    def api_sock_arg(self, vm_id: str, run_dir: Path) -> str:
        return JAILED_API_SOCK

    def prepare(self, spec: BootSpec) -> Launch:
        jail = self.jail(spec.vm_id)
        netns = spec.network.namespace if spec.network is not None else None
        vmm = [self.binary, "--api-sock", JAILED_API_SOCK, "--id", spec.vm_id]
        argv = self.jailer.launch_argv(jail, vmm, netns, chroot=True, new_pid_ns=NEW_PID_NS)
        return Launch(
            argv=argv,
            api_sock_arg=JAILED_API_SOCK,
            socket_path=jail.root / JAILED_API_SOCK.lstrip("/"),
            files_dir=jail.run_dir,
            chroot=jail.root,
            owner=(jail.uid, jail.gid),
            placed=lambda source: self.jailer.path_in_jail(jail, source),
            pid_file=jail.pid_file if NEW_PID_NS else None,
        )

    def validate(self, spec: BootSpec) -> None:
        """Reject at create what the jail could not hold: clashing asset names, too many vCPUs for the fd limit."""
        self.jailer.limits_for(spec)
        assets_of(spec)

    async def setup(self, spec: BootSpec) -> None:
        """A fresh jail: what an earlier run left is removed first."""
        jail = self.jail(spec.vm_id)
        await self.jailer.cleanup(jail)
        steps = self.jailer.prepare_steps(jail, spec)  # rejects bad input before any step
        try:
            await Plan("jail", steps).run()
        except StepFailed as exc:
            cause: BaseException | None = exc.cause
            while isinstance(cause, StepFailed):
                cause = cause.cause
            if isinstance(cause, MetaldError):
                raise cause from exc
            raise BackendError(f"cannot prepare the jail of {spec.vm_id}: {exc}") from exc

    async def teardown(self, vm_id: str) -> None:
        """Kill what is left in the VM's cgroup; remove the cgroup and the jail."""
        await self.jailer.cleanup(self.jail(vm_id))

    def has_jail(self, vm_id: str) -> bool:
        return self.jail(vm_id).dir.exists()

    async def sweep_leftovers(self, known_vm_ids: set[str]) -> list[str]:
        return await self.jailer.sweep_leftovers(known_vm_ids)
