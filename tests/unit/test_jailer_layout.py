"""Jail paths, asset names, the launcher command line and QEMU's confinement args."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from metald.config import Settings
from metald.core.errors import BackendError, InvalidArgument
from metald.core.models import BootSpec, Drive
from metald.jailer import Jailer
from metald.jailer.assets import assets_of
from metald.jailer.cgroup import CgroupFs
from metald.jailer.exec import SetupError, parse_args
from metald.jailer.qemu import qemu_confinement_args, qemu_launch_argv

V1 = CgroupFs(
    1,
    (
        ("memory", Path("/sys/fs/cgroup/memory")),
        ("cpu", Path("/sys/fs/cgroup/cpu,cpuacct")),
        ("pids", Path("/sys/fs/cgroup/pids")),
    ),
)
V2 = CgroupFs(2, tuple((c, Path("/sys/fs/cgroup")) for c in ("memory", "cpu", "pids")))


def make(fs: CgroupFs = V2, **kw: object) -> Jailer:
    return Jailer(Settings(jailer_chroot_dir=Path("/srv/jailer"), **kw), cgroup_fs=fs)  # type: ignore[arg-type]


def spec(kernel: str = "/img/vmlinuz", initrd: str | None = "/img/initramfs.cpio.gz", drives=()) -> BootSpec:  # type: ignore[no-untyped-def]
    return BootSpec(
        vm_id="vm1",
        vcpu_count=1,
        memory_bytes=1 << 27,
        kernel_path=Path(kernel),
        initrd_path=Path(initrd) if initrd else None,
        kernel_args="",
        drives=tuple(drives),
        network=None,
        run_dir=Path("/run/metald/vm1"),
        console_log=Path("/run/metald/vm1/console.log"),
    )


def test_jail_paths_v2() -> None:
    jail = make(jailer_uid=1234, jailer_gid=4321).jail_for("firecracker", "vm-1")
    assert jail.root == Path("/srv/jailer/firecracker/vm-1/root")
    assert jail.dir == Path("/srv/jailer/firecracker/vm-1")
    assert jail.run_dir == jail.root / "run"
    assert (jail.uid, jail.gid) == (1234, 4321)
    assert jail.cgroup.version == 2
    assert jail.cgroup.dirs == (Path("/sys/fs/cgroup/metald/vm-1"),)
    assert jail.cgroup.dir_for("pids") == Path("/sys/fs/cgroup/metald/vm-1")


def test_jail_paths_v1() -> None:
    jail = make(V1).jail_for("qemu", "vm-1")
    assert jail.root == Path("/srv/jailer/qemu/vm-1/root")
    assert jail.cgroup.version == 1
    assert jail.cgroup.dirs == (
        Path("/sys/fs/cgroup/memory/metald/vm-1"),
        Path("/sys/fs/cgroup/cpu,cpuacct/metald/vm-1"),
        Path("/sys/fs/cgroup/pids/metald/vm-1"),
    )


@pytest.mark.parametrize("bad", ["", "..", ".", "a/b", "../x", "-x", "x" * 65, "a b", "vm_1", "ä"])
def test_unsafe_vm_ids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        make().jail_for("qemu", bad)
    assert info.value.field == "vm_id"


def test_unknown_vmm_is_rejected() -> None:
    with pytest.raises(ValueError):
        make().jail_for("cloud-hypervisor", "vm1")


def test_path_in_jail() -> None:
    j = make()
    jail = j.jail_for("firecracker", "vm1")
    assert j.path_in_jail(jail, Path("/opt/metald/images/vmlinuz")) == "/vmlinuz"
    assert j.path_in_jail(jail, Path("/data/vm1/rootfs.ext4")) == "/rootfs.ext4"
    for reserved in ("/x/dev", "/x/run", "/"):
        with pytest.raises(InvalidArgument):
            j.path_in_jail(jail, Path(reserved))


def test_assets_dedupe_and_clash() -> None:
    same = Drive("a", Path("/img/rootfs.ext4"), True, True)
    rw = Drive("b", Path("/img/rootfs.ext4"), False, False)
    got = assets_of(spec(drives=[same, rw]))
    assert [(a.host_path.name, a.writable) for a in got] == [
        ("vmlinuz", False),
        ("initramfs.cpio.gz", False),
        ("rootfs.ext4", True),  # the same file twice: writable wins
    ]
    clash = Drive("c", Path("/other/vmlinuz"), True, False)
    with pytest.raises(InvalidArgument) as info:
        assets_of(spec(drives=[clash]))
    assert info.value.field == "config.storage[0].path"
    with pytest.raises(InvalidArgument):
        make().prepare_steps(make().jail_for("qemu", "vm1"), spec(drives=[clash]))


def test_launch_argv_full() -> None:
    j = make(V1, jailer_fd_limit=2048)
    jail = j.jail_for("firecracker", "vm1")
    argv = j.launch_argv(jail, ["/usr/bin/firecracker", "--api-sock", "/run/fc.sock"], "fc-vm1", True, True)
    assert argv[:4] == [sys.executable, "-I", "-m", "metald.jailer.exec"]
    opts = parse_args(argv[4:])
    assert opts.netns == "fc-vm1"
    assert opts.cgroup == [str(d) for d in jail.cgroup.dirs]
    assert (opts.uid, opts.gid, opts.fd_limit) == (1000, 1000, 2048)
    assert opts.chroot == str(jail.root)
    assert opts.new_pid_ns and opts.pid_file == str(jail.pid_file)
    assert opts.command == ["/usr/bin/firecracker", "--api-sock", "/run/fc.sock"]


def test_launch_argv_minimal_and_path_lookup() -> None:
    j = make()
    jail = j.jail_for("qemu", "vm1")
    argv = j.launch_argv(jail, ["sleep", "1"], None, False, False)
    assert "--netns" not in argv and "--chroot" not in argv and "--new-pid-ns" not in argv
    assert argv[argv.index("--") + 1 :] == [shutil.which("sleep"), "1"]
    with pytest.raises(BackendError):
        j.launch_argv(jail, ["no-such-binary-xyz"], None, False, False)
    with pytest.raises(ValueError):
        j.launch_argv(jail, ["/bin/true"], None, True, False, drop_privileges=False)


def test_qemu_confinement() -> None:
    j = make(jailer_uid=5000, jailer_gid=5001)
    jail = j.jail_for("qemu", "vm1")
    args = qemu_confinement_args(jail)
    assert args == [
        "-chroot",
        str(jail.root),
        "-runas",
        "5000:5001",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
    ]
    assert "-sandbox" not in qemu_confinement_args(jail, sandbox=False)
    argv = qemu_launch_argv(j, jail, ["/usr/bin/qemu-system-x86_64", *args], "fc-vm1")
    opts = parse_args(argv[argv.index("metald.jailer.exec") + 1 :])
    assert opts.uid is None and opts.chroot is None and not opts.new_pid_ns
    assert opts.netns == "fc-vm1" and opts.cgroup == ["/sys/fs/cgroup/metald/vm1"]
    with pytest.raises(ValueError):
        qemu_launch_argv(j, jail, ["/usr/bin/qemu-system-x86_64"], None)


@pytest.mark.parametrize(
    "argv",
    [
        ["--fd-limit", "64", "/bin/true"],  # no --
        ["--fd-limit", "64", "--", "true"],  # relative
        ["--fd-limit", "64", "--"],
        ["--fd-limit", "64", "--chroot", "/x", "--", "/bin/true"],  # chroot keeping root
        ["--fd-limit", "64", "--uid", "0", "--gid", "5", "--", "/bin/true"],
        ["--fd-limit", "64", "--uid", "5", "--", "/bin/true"],
        ["--bogus", "--fd-limit", "64", "--", "/bin/true"],
        ["--", "/bin/true"],  # no fd limit
    ],
)
def test_launcher_rejects_bad_usage(argv: list[str]) -> None:
    with pytest.raises(SetupError):
        parse_args(argv)
