#!/usr/bin/env python3
# THIS IS A TEST DOUBLE of Firecracker's jailer (v1.16.1), not the jailer. Never
# install it. It models what metald depends on, from src/jailer/src/{main,env,
# cgroup,chroot}.rs:
#
# * arguments: --id, --exec-file, --uid, --gid required; --chroot-base-dir
#   (default /srv/jailer), --netns, --cgroup (repeatable FILE=VALUE),
#   --cgroup-version (default 1), --parent-cgroup (default: the exec file's
#   name), --resource-limit (repeatable fsize=N / no-file=N), --daemonize,
#   --new-pid-ns, --version, --help; everything after "--" goes to the VMM.
#   Anything else, a missing or repeated value: "Failed to parse arguments".
# * --id: 1-64 ASCII letters, digits or '-'.
# * the jail: <canonical chroot-base>/<file name of the canonicalized exec
#   file>/<id>/root, created if missing; the exec file is copied in (refused if
#   the copy has other hard links) and owned by uid:gid.
# * cgroups: the hierarchy from /proc/mounts (v1 per controller or the v2
#   unified one), the controller must be available (v2: cgroup.controllers),
#   <hierarchy>/<parent-cgroup>/<id> is created, on v2 the controller enabled
#   in every parent's cgroup.subtree_control, the values written and the
#   jailer's pid attached.
# * a private mount namespace, / made recursively slave, the chroot
#   bind-mounted onto itself recursively (so mounts already inside it stay
#   visible), then the chroot (the real one pivots root; the effect for the
#   VMM is the same).
# * inside: /, /dev, /dev/net, /run at 0700 owned by uid:gid; mknod of
#   /dev/net/tun and /dev/kvm, which FAILS if they exist ("File exists"), and of
#   /dev/urandom (a warning only) and /dev/userfaultfd where /proc/misc has it;
#   /<exec-file-name>.pid created exclusively (O_EXCL) with the pid; then exec of
#   the copy as uid:gid (no supplementary groups), with "--id <id>
#   --start-time-us .. --start-time-cpu-us .. --parent-cpu-time-us .." before
#   the arguments after "--", and an empty environment.
# Any error: its message on stderr and exit status 1, like the jailer.
#
# Not modelled (metald uses neither): --daemonize and --new-pid-ns are refused.
#
# Test-double-only option, first if given: --double-runtime WORKSPACE. The
# Firecracker double is a Python script: with it, the interpreter's directories,
# the double and WORKSPACE (its knobs and record) are bind-mounted into the jail
# before the chroot, in the jail's private mount namespace only
# (jail_runtime.bind_runtime). A real Firecracker is static and needs none of it.
"""A test double of Firecracker's jailer (see the header comment)."""

from __future__ import annotations

import os
import re
import resource
import stat
import sys
import time
from pathlib import Path

JAILER_VERSION = "1.16.1"
VALUE_ARGS = {"id", "exec-file", "uid", "gid", "chroot-base-dir", "netns", "cgroup-version", "parent-cgroup"}
MULTI_ARGS = {"cgroup", "resource-limit"}
FLAG_ARGS = {"daemonize", "new-pid-ns", "version", "help"}
REQUIRED = ("id", "exec-file", "uid", "gid")
DEFAULTS = {"chroot-base-dir": "/srv/jailer", "cgroup-version": "1"}
PARSE = "Failed to parse arguments: "
ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
FOLDERS = ("/", "/dev", "/dev/net", "/run")
DEV_NET_TUN = ("/dev/net/tun", 10, 200)
DEV_KVM = ("/dev/kvm", 10, 232)
DEV_URANDOM = ("/dev/urandom", 1, 9)
PROC_MOUNTS = "/proc/mounts"
MOUNT_RE = re.compile(r"^([a-z2]*)\s(?P<dir>.*)\scgroup(?P<ver>2?)\s(?P<options>.*)\s0\s0$")


class JailerError(Exception):
    """One of the jailer's errors: printed on stderr, exit status 1."""


def io_error(exc: OSError) -> str:
    return f"{exc.strerror} (os error {exc.errno})"


def parse(argv: list[str]) -> tuple[dict[str, str], dict[str, list[str]], set[str], list[str]]:
    values: dict[str, str] = {}
    multi: dict[str, list[str]] = {name: [] for name in MULTI_ARGS}
    flags: set[str] = set()
    extra: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            extra = argv[i + 1 :]
            break
        name = arg[2:] if arg.startswith("--") else ""
        if name in FLAG_ARGS:
            flags.add(name)
        elif name in VALUE_ARGS or name in MULTI_ARGS:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise JailerError(f"{PARSE}The argument '{arg}' requires a value, but none was supplied")
            if name in VALUE_ARGS:
                if name in values:
                    raise JailerError(f"Failed to parse arguments: The argument '{arg}' was provided more than once.")
                values[name] = argv[i + 1]
            else:
                multi[name].append(argv[i + 1])
            i += 1
        else:
            raise JailerError(f"{PARSE}Found argument '{arg}' which wasn't expected, or isn't valid in this context.")
        i += 1
    if not flags & {"version", "help"}:
        for name in REQUIRED:
            if name not in values:
                raise JailerError(f"Failed to parse arguments: Argument '--{name}' required, but not found.")
    for name, default in DEFAULTS.items():
        values.setdefault(name, default)
    return values, multi, flags, extra


def canonicalize(path: str) -> Path:
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        raise JailerError(f"Failed to canonicalize path {path}: {io_error(exc)}") from None


def check_components(value: str, error: str) -> None:
    parts = Path(value).parts
    if value.startswith("/") or any(p in (".", "..") for p in parts) or "/./" in f"/{value}/":
        raise JailerError(error)


def hierarchies(version: int) -> list[tuple[str, str]]:
    """(mount dir, options) of the cgroup mounts of that version, as CgroupHierarchies reads them."""
    found = []
    with open(PROC_MOUNTS) as fh:
        for line in fh:
            m = MOUNT_RE.match(line.rstrip("\n"))
            if m is None:
                continue
            if version == 2 and m["ver"] == "2":
                return [(m["dir"], m["options"])]
            if version == 1 and m["ver"] == "":
                found.append((m["dir"], m["options"]))
    if not found:
        raise JailerError("Hierarchy not found: No hierarchy found for this cgroup version.")
    return found


def cgroup_plan(version: int, props: list[str], vm_id: str, parent: str) -> list[tuple[Path, str, str]]:
    """(cgroup dir, file, value) for each --cgroup, with the jailer's checks."""
    if version not in (1, 2):
        raise JailerError(f"{version} is an invalid cgroup version specifier")
    mounts = hierarchies(version)
    plan = []
    for prop in props:
        parts = prop.split("=")
        if len(parts) != 2 or not parts[1]:
            raise JailerError(f"Invalid format for cgroups: {prop}")
        name, value = parts
        check_components(name, f"Cgroup invalid file: {prop}")
        controller = name.split(".", 1)[0]
        if version == 2:
            base = Path(mounts[0][0])
            try:
                available = (base / "cgroup.controllers").read_text().split()
            except OSError:
                available = []
            if controller not in available:
                raise JailerError(f"Controller {controller} is unavailable")
        else:
            matching = [d for d, opts in mounts if controller in opts.split(",")]
            if not matching:
                raise JailerError(f"Controller {controller} is unavailable")
            base = Path(matching[0])
        plan.append((base / parent / vm_id, name, value))
    return plan


def setup_cgroups(version: int, plan: list[tuple[Path, str, str]]) -> None:
    for location, name, value in plan:
        try:
            location.mkdir(parents=True, exist_ok=True)
            if version == 2:
                enable_up(location.parent, name.split(".", 1)[0])
            (location / name).write_text(f"{value}\n")
        except OSError as exc:
            raise JailerError(f"Failed to write to {location / name}: {io_error(exc)}") from None
    for location in dict.fromkeys(loc for loc, _, _ in plan):
        (location / "cgroup.procs").write_text(f"{os.getpid()}\n")


def enable_up(path: Path, controller: str) -> None:
    control = path / "cgroup.subtree_control"
    if not control.exists():
        return
    enable_up(path.parent, controller)
    control.write_text(f"+{controller}\n")


def copy_exec(source: Path, chroot_dir: Path, uid: int, gid: int) -> str:
    target = chroot_dir / source.name
    mode = os.stat(source).st_mode
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, stat.S_IMODE(mode))
    except OSError as exc:
        raise JailerError(f"Failed to open {target}: {io_error(exc)}") from None
    try:
        if os.fstat(fd).st_nlink > 1:
            raise JailerError(f"Detected hard link at: {target}")
        os.fchown(fd, uid, gid)
        os.write(fd, source.read_bytes())
    finally:
        os.close(fd)
    return source.name


def mknod(path: str, major: int, minor: int, uid: int, gid: int) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | stat.S_IRUSR | stat.S_IWUSR, os.makedev(major, minor))
    except OSError as exc:
        raise JailerError(f"Failed to create {path} via mknod inside the jail: {io_error(exc)}") from None
    os.chown(path, uid, gid)


def userfaultfd_minor() -> int | None:
    try:
        for line in Path("/proc/misc").read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == "userfaultfd":
                return int(parts[0])
    except (OSError, ValueError):
        pass
    return None


def enter_chroot(chroot_dir: Path, runtime: Path | None) -> None:
    from metald.jailer import syscalls

    ms_slave = 0x80000
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, ms_slave | syscalls.MS_REC)
    syscalls.mount(chroot_dir, chroot_dir, None, syscalls.MS_BIND | syscalls.MS_REC)
    if runtime is not None:  # test only: the interpreter the Firecracker double needs
        from tests.firecracker_double.jail_runtime import bind_runtime

        bind_runtime(chroot_dir, runtime)
    os.chdir(chroot_dir)
    os.chroot(".")
    os.chdir("/")


def run(argv: list[str]) -> None:
    runtime = None
    if argv[:1] == ["--double-runtime"]:
        runtime, argv = Path(argv[1]), argv[2:]
    start_us = time.monotonic_ns() // 1000
    values, multi, flags, extra = parse(argv)
    if "help" in flags or "version" in flags:
        print(f"Jailer v{JAILER_VERSION}\n")
        return
    vm_id = values["id"]
    if not ID_RE.match(vm_id):
        raise JailerError("Invalid instance ID: Invalid len or characters for instance ID (1-64 of [A-Za-z0-9-])")
    exec_file = canonicalize(values["exec-file"])
    if not exec_file.is_file():
        raise JailerError(f"{exec_file} is not a file")
    base = canonicalize(values["chroot-base-dir"])
    if not base.is_dir():
        raise JailerError(f"{base} is not a directory")
    chroot_dir = base / exec_file.name / vm_id / "root"
    try:
        uid = int(values["uid"])
        gid = int(values["gid"])
    except ValueError:
        raise JailerError("Invalid uid or gid") from None
    parent = values.get("parent-cgroup", exec_file.name)
    check_components(parent, "Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'")
    try:
        version = int(values["cgroup-version"])
    except ValueError:
        raise JailerError(f"{values['cgroup-version']} is an invalid cgroup version specifier") from None
    plan = cgroup_plan(version, multi["cgroup"], vm_id, parent) if multi["cgroup"] else []
    limits: list[tuple[int, int]] = []
    for item in multi["resource-limit"]:
        name, sep, value = item.partition("=")
        if not sep:
            raise JailerError(f"Invalid format for resources limits: {item}")
        if not value.isdigit():
            raise JailerError(f"Invalid limit value for resource: {value}")
        if name not in ("fsize", "no-file"):
            raise JailerError(f"Invalid resource argument: {name}")
        limits.append((resource.RLIMIT_FSIZE if name == "fsize" else resource.RLIMIT_NOFILE, int(value)))
    if flags & {"daemonize", "new-pid-ns"}:
        raise JailerError("THIS JAILER TEST DOUBLE does not model --daemonize or --new-pid-ns")

    try:
        chroot_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JailerError(f"Failed to create directory {chroot_dir}: {io_error(exc)}") from None
    exec_name = copy_exec(exec_file, chroot_dir, uid, gid)
    if "netns" in values:
        try:
            fd = os.open(values["netns"], os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise JailerError(f"Failed to open file {values['netns']}: {io_error(exc)}") from None
        from metald.jailer import syscalls

        syscalls.setns(fd, syscalls.CLONE_NEWNET)
        os.close(fd)
    nofile = 2048  # the jailer's default
    for which, value in limits:
        if which == resource.RLIMIT_NOFILE:
            nofile = value
        else:
            resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    setup_cgroups(version, plan)
    enter_chroot(chroot_dir, runtime)
    for folder in FOLDERS:
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o700)
        os.chown(folder, uid, gid)
    mknod(*DEV_NET_TUN, uid, gid)
    mknod(*DEV_KVM, uid, gid)
    try:
        mknod(*DEV_URANDOM, uid, gid)
    except JailerError as exc:
        print(f"Warning! Could not create /dev/urandom device inside jailer: {exc}.", flush=True)
        print("MMDS version 2 will not be available to use.", flush=True)
    minor = userfaultfd_minor()
    if minor is not None:
        mknod("/dev/userfaultfd", 10, minor, uid, gid)
    pid_file = f"/{exec_name}.pid"
    try:
        fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise JailerError(f"Failed to open file {pid_file}: {io_error(exc)}") from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    cpu_us = time.process_time_ns() // 1000
    args = [f"/{exec_name}", "--id", vm_id, "--start-time-us", str(start_us), "--start-time-cpu-us", str(cpu_us),
            "--parent-cpu-time-us", "0", *extra]  # fmt: skip
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.execve(args[0], args, {})
    except OSError as exc:
        raise JailerError(f"Failed to exec into Firecracker: {io_error(exc)}") from None


def main(argv: list[str]) -> int:
    try:
        run(argv)
    except JailerError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
