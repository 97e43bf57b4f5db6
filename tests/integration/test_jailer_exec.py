"""The jailer for real: jails, the launcher, cgroups, cleanup and rollback.

Root inside tests/isolated.sh only. Every cgroup is created under a ``metald``
parent and removed again; chroots live in tmp_path.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from metald.config import Settings
from metald.core.errors import StepFailed
from metald.core.models import BootSpec, Drive
from metald.core.plan import Plan
from metald.jailer import Jail, Jailer, devices
from metald.jailer import cgroup as cg
from metald.jailer.chroot import mounts_under, remove_tree
from metald.jailer.resource_limits import Limits

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_isolated")]

UID, GID = 61000, 61001
BUSYBOX = Path("/bin/busybox")
MIB = 1 << 20
_ids = itertools.count()


@dataclass
class Env:
    tmp: Path
    jailer: Jailer
    jails: list[Jail] = field(default_factory=list)
    netns_names: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def new_jail(self, vmm: str = "firecracker") -> Jail:
        jail = self.jailer.jail_for(vmm, f"jt{os.getpid()}-{next(_ids)}")
        self.jails.append(jail)
        return jail

    def asset(self, name: str, mode: int = 0o644, size: int = 4096, where: str = "img") -> Path:
        path = self.tmp / where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xab" * size)
        os.chmod(path, mode)
        return path

    def spec(self, jail: Jail, drives: tuple[Drive, ...] = (), vcpus: int = 1, **kw: Path | None) -> BootSpec:
        kernel = kw.get("kernel") or self.asset("vmlinuz")
        return BootSpec(
            vm_id=jail.vm_id,
            vcpu_count=vcpus,
            memory_bytes=64 * MIB,
            kernel_path=kernel,
            initrd_path=kw.get("initrd"),
            kernel_args="console=ttyS0",
            drives=drives,
            network=None,
            run_dir=self.tmp / "run",
            console_log=self.tmp / "run" / "console.log",
        )

    def netns(self) -> str:
        name = f"fc-jt{os.getpid()}-{len(self.netns_names)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.netns_names.append(name)
        return name

    def spawn(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    # Cgroups are not namespaced: this test's VMs live under metald/<scope>/ so
    # that nothing here (the sweep above all) touches anyone else's.
    scope = f"metald/test-{os.getpid()}-{next(_ids)}"
    fs = replace(cg.detect(), parent=scope)
    shared = [p.parent for p in fs.parents() if not p.parent.exists()]
    settings = Settings(jailer_chroot_dir=tmp_path / "jails", jailer_uid=UID, jailer_gid=GID)
    e = Env(tmp_path, Jailer(settings, cgroup_fs=fs))
    e.jailer.check_settings()
    yield e
    for proc in e.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for jail in e.jails:
        cg.remove(jail.cgroup)
        remove_tree(jail.dir)
    for name in e.netns_names:
        subprocess.run(["ip", "netns", "del", name], check=False)
    for parent in fs.parents():
        if parent.exists():
            parent.rmdir()
    for parent in shared:  # the common metald/ parent, if this test made it and it is empty
        try:
            parent.rmdir()
        except OSError:
            pass


def wait_for(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def netns_inode(name: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"


def assert_limits(jail: Jail, limits: Limits) -> None:
    c = jail.cgroup
    if c.version == 2:
        d = c.dirs[0]
        assert int((d / "memory.max").read_text()) == limits.memory_max
        assert (d / "cpu.max").read_text().split() == [str(limits.cpu_quota_us), str(limits.cpu_period_us)]
        assert int((d / "pids.max").read_text()) == limits.pids_max
    else:
        assert int((c.dir_for("memory") / "memory.limit_in_bytes").read_text()) == limits.memory_max
        assert int((c.dir_for("cpu") / "cpu.cfs_quota_us").read_text()) == limits.cpu_quota_us
        assert int((c.dir_for("cpu") / "cpu.cfs_period_us").read_text()) == limits.cpu_period_us
        assert int((c.dir_for("pids") / "pids.max").read_text()) == limits.pids_max


def assert_gone(jail: Jail) -> None:
    assert not jail.dir.exists(), f"{jail.dir} left behind"
    assert not any(d.exists() for d in jail.cgroup.dirs), "cgroup left behind"
    assert not mounts_under(jail.dir)


@pytest.fixture
def busybox() -> Path:
    if not BUSYBOX.is_file():
        pytest.skip("needs busybox-static at /bin/busybox (apt-get install -y busybox-static)")
    return BUSYBOX


async def prepare(env: Env, jail: Jail, spec: BootSpec) -> None:
    await Plan("jail", env.jailer.prepare_steps(jail, spec)).run()


async def test_launcher_confines_the_process(env: Env, busybox: Path) -> None:
    jail = env.new_jail()
    spec = env.spec(jail, vcpus=2)
    await prepare(env, jail, spec)
    limits = env.jailer.limits_for(spec)
    assert_limits(jail, limits)
    shutil.copy2(busybox, jail.root / "busybox")  # a static binary inside the chroot
    netns = env.netns()
    inherited_r, inherited_w = os.pipe()
    argv = env.jailer.launch_argv(jail, [str(jail.root / "busybox"), "sleep", "30"], netns, True, False)
    proc = env.spawn(argv, pass_fds=(inherited_w,), env={**os.environ, "SECRET": "leak"})
    os.close(inherited_w)
    pid = proc.pid
    wait_for(lambda: status(pid).get("Name") == "busybox", what="exec")

    st = status(pid)
    assert st["Uid"].split() == [str(UID)] * 4
    assert st["Gid"].split() == [str(GID)] * 4
    assert st["Groups"] == ""
    assert st["NoNewPrivs"] == "1"
    assert os.readlink(f"/proc/{pid}/root") == str(jail.root)
    assert os.readlink(f"/proc/{pid}/ns/net") == netns_inode(netns)
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    for directory in jail.cgroup.dirs:
        assert pid in cg.procs(directory)
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if "open files" in x)
    assert line.split()[3:5] == [str(limits.nofile)] * 2
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2"]
    os.close(inherited_r)

    # What the jailed uid sees: only the jail.
    out = subprocess.run(
        env.jailer.launch_argv(jail, [str(jail.root / "busybox"), "ls", "-a", "/"], netns, True, False),
        capture_output=True,
        check=True,
    )
    assert set(out.stdout.decode().split()) == {".", "..", "busybox", "dev", "run", "vmlinuz"}
    out = subprocess.run(
        env.jailer.launch_argv(jail, [str(jail.root / "busybox"), "id"], None, True, False),
        capture_output=True,
        check=True,
    )
    assert out.stdout.decode().strip() == f"uid={UID} gid={GID}"  # no supplementary groups

    await env.jailer.cleanup(jail)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert_gone(jail)
    await env.jailer.cleanup(jail)  # idempotent


async def test_new_pid_namespace(env: Env, busybox: Path) -> None:
    jail = env.new_jail()
    await prepare(env, jail, env.spec(jail))
    argv = env.jailer.launch_argv(jail, [str(busybox), "sleep", "30"], None, True, True)
    proc = env.spawn(argv)
    wait_for(lambda: jail.pid_file.is_file() and jail.pid_file.read_text().strip() != "", what="pid file")
    child = int(jail.pid_file.read_text())
    wait_for(lambda: status(child).get("Name") == "busybox", what="exec")
    assert status(child)["NSpid"].split() == [str(child), "1"]  # pid 1 of its own namespace
    assert status(child)["Uid"].split() == [str(UID)] * 4
    assert status(proc.pid)["Uid"].split()[0] == "0"  # the waiting parent
    assert child in cg.procs(jail.cgroup.dirs[0]) and proc.pid not in cg.procs(jail.cgroup.dirs[0])
    await env.jailer.cleanup(jail)
    assert proc.wait(timeout=10) == -signal.SIGKILL  # the launcher dies by the VMM's signal
    assert_gone(jail)


async def test_parent_forwards_exit_status(env: Env, busybox: Path) -> None:
    jail = env.new_jail()
    await prepare(env, jail, env.spec(jail))
    argv = env.jailer.launch_argv(jail, [str(busybox), "sh", "-c", "exit 7"], None, True, True)
    assert env.spawn(argv).wait(timeout=20) == 7
    # Firecracker's own codes (148: seccomp violation) are not confused with a signal ...
    argv = env.jailer.launch_argv(jail, [str(busybox), "sh", "-c", "exit 148"], None, True, True)
    assert env.spawn(argv).wait(timeout=20) == 148  # a VMM killed by a signal: test_new_pid_namespace


async def test_setup_failure_is_one_line_and_127(env: Env, busybox: Path) -> None:
    jail = env.new_jail()
    await prepare(env, jail, env.spec(jail))
    argv = env.jailer.launch_argv(jail, [str(busybox), "true"], "no-such-netns", True, False)
    out = subprocess.run(argv, capture_output=True, timeout=30)
    assert out.returncode == 127
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metald-jailer: netns:")


async def test_devices_and_tree(env: Env) -> None:
    jail = env.new_jail()
    await prepare(env, jail, env.spec(jail))
    nodes = [("dev/kvm", (10, 232)), ("dev/net/tun", (10, 200)), ("dev/urandom", (1, 9))]
    uffd = devices.userfaultfd_minor()
    if uffd is not None:  # as Firecracker's jailer: only where the host has the device
        nodes.append(("dev/userfaultfd", (10, uffd)))
    for rel, rdev in nodes:
        st = os.lstat(jail.root / rel)
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == rdev
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, GID, 0o600)
    st = os.stat(jail.run_dir)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, GID, 0o700)
    assert os.stat(jail.root).st_uid == 0 and stat.S_IMODE(os.stat(jail.dir).st_mode) == 0o700
    # preparing again is harmless
    await prepare(env, jail, env.spec(jail))


async def test_asset_placement(env: Env) -> None:
    jail = env.new_jail()
    kernel = env.asset("vmlinuz", 0o644)
    initrd = env.asset("initrd.img", 0o600)  # the jailed uid could not read it: copied
    rw = env.asset("data.ext4", 0o644)
    other = env.tmp / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "jt-other", str(other)], check=True)
    try:
        ro_far = env.asset("ro-far.ext4", 0o644, where="other")
        rw_far = env.asset("rw-far.ext4", 0o644, where="other")
        drives = (
            Drive("rw", rw, False, True),
            Drive("ro_far", ro_far, True, False),
            Drive("rw_far", rw_far, False, False),
        )
        spec = env.spec(jail, drives, kernel=kernel, initrd=initrd)
        await prepare(env, jail, spec)
        r = jail.root
        assert os.stat(r / "vmlinuz").st_ino == os.stat(kernel).st_ino  # hard link
        assert os.stat(kernel).st_uid == 0  # shared read-only file not given away
        st = os.stat(r / "initrd.img")
        assert st.st_ino != os.stat(initrd).st_ino and (st.st_uid, stat.S_IMODE(st.st_mode)) == (UID, 0o400)
        assert os.stat(r / "data.ext4").st_ino == os.stat(rw).st_ino
        assert (os.stat(rw).st_uid, os.stat(rw).st_gid) == (UID, GID)
        assert set(mounts_under(jail.root)) == {r / "ro-far.ext4", r / "rw-far.ext4"}  # EXDEV: bind
        with pytest.raises(OSError):
            (r / "ro-far.ext4").write_bytes(b"x")  # read-only bind, even for root
        (r / "rw-far.ext4").write_bytes(b"written")
        assert rw_far.read_bytes() == b"written"
        await env.jailer.cleanup(jail)
        assert_gone(jail)
        assert kernel.is_file() and initrd.is_file() and rw.is_file() and ro_far.is_file()
        assert os.stat(kernel).st_nlink == 1
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)


async def test_cleanup_never_leaves_the_jail(env: Env) -> None:
    jail = env.new_jail()
    await prepare(env, jail, env.spec(jail))
    outside = env.tmp / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "precious").write_text("keep")
    os.symlink(outside, jail.run_dir / "escape")  # e.g. planted by a compromised VMM
    mnt = jail.root / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(outside), str(mnt)], check=True)
    await env.jailer.cleanup(jail)
    assert_gone(jail)
    assert (outside / "sub" / "precious").read_text() == "keep"


@pytest.mark.parametrize("step", ["chroot", "assets", "devices", "cgroup"])
async def test_injected_failure_leaves_nothing(env: Env, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    jail = env.new_jail()
    drive = Drive("root", env.asset("rootfs.ext4"), False, True)
    spec = env.spec(jail, (drive,), initrd=env.asset("initrd.img", 0o600))
    monkeypatch.setenv("METALD_FAULTS", f"fail:jail.{step}")
    with pytest.raises(StepFailed) as info:
        await prepare(env, jail, spec)
    assert info.value.step == step
    assert_gone(jail)


async def test_failure_inside_a_step_leaves_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    jail = env.new_jail()
    bad = env.tmp / "img" / "notafile"
    bad.mkdir(parents=True)
    spec = env.spec(jail, (Drive("ok", env.asset("ok.ext4"), True, False), Drive("bad", bad, True, False)))
    with pytest.raises(StepFailed) as info:
        await prepare(env, jail, spec)
    assert info.value.step == "assets"
    assert_gone(jail)

    real_write = cg._write

    def failing_write(path: Path, value: str) -> None:
        if path.name == "pids.max":
            raise OSError("pids.max refused")
        real_write(path, value)

    monkeypatch.setattr(cg, "_write", failing_write)
    jail2 = env.new_jail()
    with pytest.raises(StepFailed) as info:
        await prepare(env, jail2, env.spec(jail2))
    assert info.value.step == "cgroup"
    assert_gone(jail2)


async def test_sweep_leftovers(env: Env, busybox: Path) -> None:
    keep, stale = env.new_jail(), env.new_jail("qemu")
    for jail in (keep, stale):
        await prepare(env, jail, env.spec(jail))
    proc = env.spawn(env.jailer.launch_argv(stale, [str(busybox), "sleep", "30"], None, True, False))
    wait_for(lambda: proc.pid in cg.procs(stale.cgroup.dirs[0]), what="stale VMM in cgroup")
    removed = await env.jailer.sweep_leftovers({keep.vm_id})
    assert stale.vm_id in removed and keep.vm_id not in removed
    assert_gone(stale)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert keep.root.is_dir() and all(d.is_dir() for d in keep.cgroup.dirs)


def _join(proc: subprocess.Popen[bytes], jail: Jail) -> None:
    for directory in jail.cgroup.dirs:
        (directory / "cgroup.procs").write_text(str(proc.pid))


async def test_foreign_process_in_a_vm_cgroup_is_never_killed(env: Env, busybox: Path) -> None:
    """A process that is not this VM's VMM (e.g. another daemon's QEMU put in the same
    cgroup) survives cleanup and the sweep; the cgroup stays and the error says why."""
    jail = env.new_jail("qemu")
    await prepare(env, jail, env.spec(jail))
    foreign = env.spawn([str(busybox), "sleep", "60"])
    _join(foreign, jail)
    # and a VMM of this VM, launched into its jail: that one may be killed
    own = env.spawn(env.jailer.launch_argv(jail, [str(busybox), "sleep", "60"], None, True, False))
    wait_for(lambda: own.pid in cg.procs(jail.cgroup.dirs[0]), what="own VMM in cgroup")
    with pytest.raises(cg.ForeignProcesses, match=rf"\[{foreign.pid}\] that are not this VM's VMM"):
        await env.jailer.cleanup(jail)
    assert own.wait(timeout=10) == -signal.SIGKILL
    assert foreign.poll() is None and all(d.is_dir() for d in jail.cgroup.dirs)
    assert jail.vm_id not in await env.jailer.sweep_leftovers(set())
    assert foreign.poll() is None and all(d.is_dir() for d in jail.cgroup.dirs)
    foreign.kill()
    foreign.wait()
    await env.jailer.cleanup(jail)
    assert_gone(jail)


async def test_check_settings_keeps_a_given_hierarchy(env: Env) -> None:
    """A Jailer given its cgroup hierarchy keeps it (and its parent) after check_settings()."""
    fs = env.jailer.cgroup_fs
    assert fs.parent.startswith("metald/test-")
    env.jailer.check_settings()
    assert env.jailer.cgroup_fs is fs
    detected = Jailer(Settings(jailer_cgroup_parent="metald-x", jailer_uid=UID, jailer_gid=GID))
    detected.check_settings()
    assert detected.cgroup_fs.parent == "metald-x"
    assert detected.jail_for("qemu", "v1").cgroup.dirs[0].parent.name == "metald-x"
