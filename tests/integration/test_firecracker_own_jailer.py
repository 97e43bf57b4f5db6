"""UNKEY_METALD_FIRECRACKER_USE_OWN_JAILER end to end: FirecrackerBackend starts the
jailer test double (tests/firecracker_double/jailer_double.py, a model of
Firecracker v1.16.1's jailer), which builds the jail, joins the cgroup, chroots,
drops to the jailed uid/gid and execs the Firecracker double (through the static
stub) inside the jail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.backends.firecracker.backend import FirecrackerBackend
from metald.backends.firecracker.own_jailer import OwnJailerLauncher
from metald.config import Settings
from metald.core.models import BootSpec, Drive
from metald.jailer.jailer import Jailer
from tests.firecracker_double import harness

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_isolated")]

UID = 61000
MIB = 1 << 20
REAL_NAME = "firecracker-v1.16.1-x86_64"


class Own:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.workspace = tmp / "double"
        self.workspace.mkdir()
        os.chown(self.workspace, UID, UID)
        self.record = self.workspace / "requests.jsonl"
        self.knobs = harness.write_knobs(self.workspace / "knobs", self.record, FC_DOUBLE_CHECK_TAP="0")
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        built = harness.build_jail_stub(bin_dir, self.knobs)
        self.real = built.rename(bin_dir / REAL_NAME)  # installed as a versioned file ...
        self.link = bin_dir / "firecracker"  # ... behind a symlink, as operators do
        self.link.symlink_to(REAL_NAME)
        self.jailer_shim = harness.make_jailer_shim(tmp, self.workspace)
        self.assets = tmp / "assets"
        self.assets.mkdir()
        for name in ("vmlinux", "initrd", "data.img"):
            (self.assets / name).write_bytes(b"\0" * 4096)
            (self.assets / name).chmod(0o644)
        self.other_fs = tmp / "otherfs"  # another file system for the writable drive
        self.other_fs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(self.other_fs)], check=True)
        (self.other_fs / "rootfs.ext4").write_bytes(b"\0" * 65536)
        self.backends: list[FirecrackerBackend] = []

    def backend(self, binary: Path) -> FirecrackerBackend:
        settings = Settings(
            run_dir=self.tmp / "run",
            data_dir=self.tmp / "data",
            jailer_chroot_dir=self.tmp / "jail",
            jailer_uid=UID,
            jailer_gid=UID,
            jailer_cgroup_parent=f"metald-own-{os.getpid()}",
            firecracker_binary=str(binary),
            firecracker_jailer_binary=str(self.jailer_shim),
            firecracker_use_own_jailer=True,
        )
        (self.tmp / "jail").mkdir(exist_ok=True)
        backend = FirecrackerBackend(settings, jailer=Jailer(settings), kvm_path=Path("/dev/kvm"), reboot_grace_s=5)
        self.backends.append(backend)
        return backend

    def spec(self, vm_id: str = "vm-own-1") -> BootSpec:
        run_dir = self.tmp / "run" / vm_id
        return BootSpec(
            vm_id=vm_id,
            vcpu_count=1,
            memory_bytes=128 * MIB,
            kernel_path=self.assets / "vmlinux",
            initrd_path=self.assets / "initrd",
            kernel_args="console=ttyS0",
            drives=(
                Drive("rootfs", self.other_fs / "rootfs.ext4", read_only=False, is_root=True),
                Drive("data", self.assets / "data.img", read_only=True, is_root=False),
            ),
            network=None,
            run_dir=run_dir,
            console_log=run_dir / "console.log",
        )

    def requests(self) -> list[dict]:
        return harness.read_record(self.record)


@pytest.fixture
async def own(tmp_path: Path) -> AsyncIterator[Own]:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("a C compiler is needed to build the jailed double's static stub")
    env = Own(tmp_path)
    yield env
    for backend in env.backends:
        for vm_id in list(backend._vms):
            with contextlib.suppress(Exception):
                await backend.cleanup(vm_id)
        await backend.close()
    subprocess.run(["umount", "-l", str(env.other_fs)], check=False)


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def started(env: Own) -> int:
    return sum(1 for r in env.requests() if r["path"] == "/actions" and r["body"] == {"action_type": "InstanceStart"}
               and r["status"] == 204)  # fmt: skip


async def test_own_jailer_boots_reboots_and_boots_again_from_shutdown(own: Own) -> None:
    backend = own.backend(own.real)
    spec = own.spec()
    jail = own.tmp / "jail" / REAL_NAME / spec.vm_id / "root"
    first = await backend.boot(spec)
    assert first["chroot"] == str(jail) and (jail / "dev" / "kvm").exists()
    assert started(own) == 1

    # The jailer mknods /dev/net/tun and /dev/kvm and creates /<exec>.pid exclusively on every
    # run: a kept jail would make it fail with "File exists".
    second = await backend.reboot(spec, force=False)
    assert second["pid"] != first["pid"] and started(own) == 2

    assert await backend.shutdown(spec.vm_id, force=False, timeout_s=10) == "guest poweroff"
    assert backend.jail_exists(spec.vm_id)  # kept while SHUTDOWN (Firecracker's log is in it)
    third = await backend.boot(spec)  # boot from SHUTDOWN
    assert third["pid"] not in (first["pid"], second["pid"]) and started(own) == 3
    assert proc_status(third["pid"])["Uid"].split() == [str(UID)] * 4

    await backend.cleanup(spec.vm_id)
    assert not jail.parent.exists()


async def test_own_jailer_symlinked_binary_assets_and_limits(own: Own) -> None:
    backend = own.backend(own.link)  # /.../firecracker -> firecracker-v1.16.1-x86_64
    assert isinstance(backend.launcher, OwnJailerLauncher)
    spec = own.spec("vm-own-2")
    kernel_before = os.stat(spec.kernel_path)
    handle = await backend.boot(spec)

    # The jail is where the jailer puts it: under the canonicalized binary's name.
    jail = own.tmp / "jail" / REAL_NAME / spec.vm_id / "root"
    assert handle["chroot"] == str(jail)
    pid = handle["pid"]
    assert os.readlink(f"/proc/{pid}/root") == str(jail)
    assert (jail / f"{REAL_NAME}.pid").read_text() == str(pid)

    # The writable drive on another file system is the original (bind mount), never a copy ...
    source = os.stat(own.other_fs / "rootfs.ext4")
    inside = os.stat(jail / "rootfs.ext4")
    assert (inside.st_dev, inside.st_ino) == (source.st_dev, source.st_ino)
    # ... and the shared read-only kernel and data image keep their owner.
    for path in (spec.kernel_path, own.assets / "data.img"):
        after = os.stat(path)
        assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (0, 0, 0o644)
    assert os.stat(spec.kernel_path).st_ino == kernel_before.st_ino

    # Limits: the VMM sits in <hierarchy>/<parent>/<vm_id> with memory, CPU and pids capped.
    fs = backend.launcher.jailer.cgroup_fs
    paths = fs.paths_for(spec.vm_id)
    cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    assert f"/{fs.parent}/{spec.vm_id}" in cgroups
    limits = backend.launcher.jailer.limits_for(spec)
    if fs.version == 2:
        d = paths.dirs[0]
        assert (d / "memory.max").read_text().strip() == str(limits.memory_max)
        assert (d / "pids.max").read_text().strip() == str(limits.pids_max)
        assert (d / "cpu.max").read_text().split() == [str(limits.cpu_quota_us), str(limits.cpu_period_us)]
    else:
        assert int((paths.dir_for("memory") / "memory.limit_in_bytes").read_text()) == limits.memory_max
        assert (paths.dir_for("pids") / "pids.max").read_text().strip() == str(limits.pids_max)
        assert int((paths.dir_for("cpu") / "cpu.cfs_quota_us").read_text()) == limits.cpu_quota_us
    nofile = [line for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if "open files" in line]
    assert nofile[0].split()[3:5] == [str(limits.nofile)] * 2

    await backend.cleanup(spec.vm_id)
    assert not jail.parent.exists() and not any(d.exists() for d in paths.dirs)
    assert (own.other_fs / "rootfs.ext4").exists()  # unmounted from the jail, not deleted


async def test_jailer_double_refuses_a_second_run_into_the_same_jail(own: Own) -> None:
    base = own.tmp / "jail"
    base.mkdir()
    argv = [str(own.jailer_shim), "--id", "vm-x", "--exec-file", str(own.real), "--uid", str(UID), "--gid",
            str(UID), "--chroot-base-dir", str(base), "--", "--version"]  # fmt: skip
    first = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=60)
    assert first.returncode == 0, first.stderr
    second = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=60)
    assert second.returncode == 1
    assert b"Failed to create /dev/net/tun via mknod inside the jail: File exists" in second.stderr
    bad = [str(own.jailer_shim), "--id", "bad_id", "--exec-file", str(own.real), "--uid", "1", "--gid", "1"]
    out = await asyncio.to_thread(subprocess.run, bad, capture_output=True, timeout=60)
    assert out.returncode == 1 and b"Invalid instance ID" in out.stderr
    missing = [str(own.jailer_shim), "--exec-file", str(own.real), "--uid", "1", "--gid", "1"]
    out = await asyncio.to_thread(subprocess.run, missing, capture_output=True, timeout=60)
    assert out.returncode == 1 and b"Argument '--id' required" in out.stderr
