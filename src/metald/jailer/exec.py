"""The launcher: ``python -m metald.jailer.exec [options] -- /abs/vmm args...``.

metald (root) starts this; it confines itself and then execs the VMM in place,
so the pid metald started is the VMM's pid (except with ``--new-pid-ns``). In
this order it:

1. joins the network namespace ``/run/netns/<name>`` (``--netns``; setns);
2. unshares a mount namespace and makes ``/`` recursively private, so mounts
   made by or for the VMM never propagate back to the host;
3. with ``--new-pid-ns``: unshares a PID namespace and forks; the child (pid 1
   there) goes on, the parent writes the child's host pid to ``--pid-file``,
   forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to it, waits, and
   exits with its status (killed by signal N: dies by signal N itself). The child gets
   SIGKILL if the parent dies (PR_SET_PDEATHSIG). Do not use it for QEMU:
   its ``-pidfile`` would say 1, ``-sandbox spawn=deny`` already forbids
   forking, and as pid 1 it ignores signals it has no handler for;
4. writes its pid to ``cgroup.procs`` of every ``--cgroup`` directory;
5. sets RLIMIT_NOFILE (soft and hard) to ``--fd-limit``;
6. closes every inherited fd except 0-2;
7. opens the executable (before the chroot, so it need not exist inside);
8. with ``--chroot``: chdir to it, ``chroot(".")``, chdir ``/``;
9. with ``--uid``/``--gid``: clears supplementary groups, setgid, setuid, and
   checks that real, effective and saved ids all changed and that root cannot
   be regained (``--chroot`` requires them: a root process escapes a chroot);
10. sets PR_SET_NO_NEW_PRIVS and umask 077, and execs the VMM (fexecve on the
    fd from step 7) with an empty environment.

Any failure before the exec prints one line ``metald-jailer: <stage>: <error>``
to stderr and exits with status 127. Only the standard library is used, to keep
this root-run step small and quick to start.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, ParamSpec, TypeVar

from metald.jailer import syscalls

P = ParamSpec("P")
R = TypeVar("R")

EXIT_SETUP = 127
NETNS_DIR = "/run/netns"
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class SetupError(Exception):
    def __init__(self, stage: str, cause: object) -> None:
        super().__init__(f"{stage}: {cause}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SetupError("usage", message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(prog="python -m metald.jailer.exec", add_help=False)
    parser.add_argument("--netns")
    parser.add_argument("--cgroup", action="append", default=[])
    parser.add_argument("--uid", type=int)
    parser.add_argument("--gid", type=int)
    parser.add_argument("--fd-limit", type=int, required=True)
    parser.add_argument("--chroot")
    parser.add_argument("--new-pid-ns", action="store_true")
    parser.add_argument("--pid-file")
    argv = list(argv)
    if "--" not in argv:
        raise SetupError("usage", "missing '--' before the command")
    split = argv.index("--")
    opts = parser.parse_args(argv[:split])
    opts.command = argv[split + 1 :]
    if not opts.command or not os.path.isabs(opts.command[0]):
        raise SetupError("usage", "the command after '--' must start with an absolute path")
    if (opts.uid is None) != (opts.gid is None):
        raise SetupError("usage", "--uid and --gid go together")
    if opts.chroot and opts.uid is None:
        raise SetupError("usage", "--chroot needs --uid/--gid (root can leave a chroot)")
    if opts.uid == 0 or opts.gid == 0:
        raise SetupError("usage", "--uid/--gid must not be 0")
    if opts.fd_limit < 3:
        raise SetupError("usage", "--fd-limit must be at least 3")
    return opts


def _stage(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator turning any exception of a stage into SetupError(name)."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except SetupError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported as one line
                raise SetupError(name, exc) from exc

        return run

    return wrap


@_stage("netns")
def enter_netns(name: str) -> None:
    if "/" in name or name in (".", ".."):
        raise ValueError(f"bad namespace name {name!r}")
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(fd, syscalls.CLONE_NEWNET)
    finally:
        os.close(fd)


@_stage("mount namespace")
def private_mount_ns() -> None:
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


def _exit_status(status: int) -> int:
    if os.WIFSIGNALED(status):
        _die_by(os.WTERMSIG(status))
        return 128 + os.WTERMSIG(status)  # only if that signal did not end this process
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else EXIT_SETUP


def _die_by(sig: int) -> None:
    """End this process by ``sig`` (no core file), so metald sees the VMM's own status.

    An exit code of 128+N would be ambiguous: Firecracker exits on purpose with
    codes 148-157 (148: seccomp violation).
    """
    for step in (
        lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
        lambda: signal.signal(sig, signal.SIG_DFL),  # fails for SIGKILL/SIGSTOP, which need none
        lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig]),
        lambda: os.kill(os.getpid(), sig),
    ):
        try:
            step()
        except (OSError, ValueError):
            pass


def new_pid_ns(pid_file: str | None) -> None:
    """Fork into a new PID namespace; only the child returns."""
    try:
        syscalls.unshare(syscalls.CLONE_NEWPID)
        child = os.fork()
    except OSError as exc:
        raise SetupError("pid namespace", exc) from exc
    if child == 0:
        _die_with_parent()
        return

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        close_inherited_fds()
    except SetupError as exc:
        print(f"metald-jailer: {exc}", file=sys.stderr, flush=True)
    if pid_file:
        try:
            with open(pid_file, "w") as f:
                f.write(f"{child}\n")
        except OSError as exc:
            print(f"metald-jailer: pid file: {exc}", file=sys.stderr, flush=True)
    _, status = os.waitpid(child, 0)
    os._exit(_exit_status(status))


@_stage("parent-death signal")
def _die_with_parent() -> None:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)


@_stage("cgroup")
def join_cgroups(dirs: Sequence[str]) -> None:
    pid = str(os.getpid())
    for directory in dirs:
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write(pid)


@_stage("rlimit")
def limit_fds(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@_stage("close fds")
def close_inherited_fds() -> None:
    """Close every fd above 2, including ones above a lowered RLIMIT_NOFILE."""
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    os.closerange(3, highest + 1)


@_stage("open executable")
def open_executable(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file")
    return fd


@_stage("chroot")
def enter_chroot(root: str) -> None:
    os.chdir(root)
    os.chroot(".")
    os.chdir("/")


@_stage("credentials")
def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise RuntimeError(f"ids did not stick: uid {os.getresuid()} gid {os.getresgid()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError("could regain root after dropping it")


def run(opts: argparse.Namespace) -> NoReturn:
    if opts.netns:
        enter_netns(opts.netns)
    private_mount_ns()
    if opts.new_pid_ns:
        new_pid_ns(opts.pid_file)
    join_cgroups(opts.cgroup)
    limit_fds(opts.fd_limit)
    close_inherited_fds()
    exe = open_executable(opts.command[0])
    if opts.chroot:
        enter_chroot(opts.chroot)
    if opts.uid is not None:
        drop_privileges(opts.uid, opts.gid)
        if opts.new_pid_ns:  # credential changes clear the parent-death signal
            _die_with_parent()
    try:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        os.umask(0o077)
        os.execve(exe, opts.command, {})
    except OSError as exc:
        raise SetupError("exec " + opts.command[0], exc) from exc


def main(argv: Sequence[str] | None = None) -> NoReturn:
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except SetupError as exc:
        print(f"metald-jailer: {exc}", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - a bug here still gets one line and 127
        print(f"metald-jailer: unexpected: {exc!r}", file=sys.stderr, flush=True)
    os._exit(EXIT_SETUP)


if __name__ == "__main__":
    main()
