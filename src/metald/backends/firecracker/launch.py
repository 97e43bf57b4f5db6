"""How a Firecracker process is started: its command line, socket and file paths.

Two launchers:

* :class:`DirectLauncher` runs ``firecracker --api-sock <run_dir>/firecracker.sock
  --id <vm_id>``, inside the VM's network namespace through a replaceable
  prefix (``nsenter --net=/run/netns/<ns> --`` by default; metald's integrated
  jailer can supply its own).
* :class:`OwnJailerLauncher` runs Firecracker through Firecracker's own jailer
  (``--id --exec-file --uid --gid --chroot-base-dir [--netns] --daemonize --
  <firecracker args>``); the VMM then sees only its chroot, so assets are
  linked into it and API paths are chroot-relative.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from metald.core.models import BootSpec

API_SOCK_NAME = "firecracker.sock"
JAILED_API_SOCK = "/run/firecracker.socket"

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

    def vmm_path(self, host_path: Path) -> str:
        """The name the VMM uses for a file of ``files_dir``."""
        if self.chroot is None:
            return str(host_path)
        return "/" + str(host_path.relative_to(self.chroot))

    def expose(self, source: Path, name: str) -> str:
        """Make an asset (kernel, initrd, drive) reachable by the VMM; return its VMM path."""
        if self.chroot is None:
            return str(source)
        target = self.chroot / name
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)  # another filesystem: copy
        self.own(target)
        return "/" + name

    def own(self, path: Path) -> None:
        """Give a file to the jailed VMM's uid/gid (no-op when not jailed)."""
        if self.owner is not None:
            os.chown(path, *self.owner)


class Launcher(Protocol):
    def prepare(self, spec: BootSpec) -> Launch:
        """Create what the start needs (directories) and return the command and paths."""
        ...

    def api_sock_arg(self, vm_id: str, run_dir: Path) -> str:
        """The --api-sock value a VMM of this VM was started with."""
        ...

    def discard(self, vm_id: str) -> None:
        """Remove what ``prepare`` created outside the VM's run dir."""
        ...


class DirectLauncher:
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

    def discard(self, vm_id: str) -> None:
        pass  # everything lives in the run dir


class OwnJailerLauncher:
    """Firecracker's jailer: chroot <base>/<exec-name>/<vm_id>/root, uid/gid drop, netns."""

    def __init__(self, jailer: str, firecracker: str, uid: int, gid: int, chroot_base: Path) -> None:
        self.jailer = jailer
        self.firecracker = firecracker
        self.uid = uid
        self.gid = gid
        self.chroot_base = chroot_base

    def chroot_of(self, vm_id: str) -> Path:
        return self.chroot_base / Path(self.firecracker).name / vm_id / "root"

    def api_sock_arg(self, vm_id: str, run_dir: Path) -> str:
        return JAILED_API_SOCK

    def discard(self, vm_id: str) -> None:
        shutil.rmtree(self.chroot_of(vm_id).parent, ignore_errors=True)

    def prepare(self, spec: BootSpec) -> Launch:
        root = self.chroot_of(spec.vm_id)
        (root / "run").mkdir(parents=True, exist_ok=True)
        argv = [
            self.jailer,
            "--id", spec.vm_id,
            "--exec-file", self.firecracker,
            "--uid", str(self.uid),
            "--gid", str(self.gid),
            "--chroot-base-dir", str(self.chroot_base),
        ]  # fmt: skip
        if spec.network is not None:
            argv += ["--netns", f"/run/netns/{spec.network.namespace}"]
        # The jailer adds --id itself; no --new-pid-ns, so the pid we start is the VMM's.
        argv += ["--daemonize", "--", "--api-sock", JAILED_API_SOCK]
        return Launch(
            argv=argv,
            api_sock_arg=JAILED_API_SOCK,
            socket_path=root / JAILED_API_SOCK.lstrip("/"),
            files_dir=root,
            chroot=root,
            owner=(self.uid, self.gid),
        )
