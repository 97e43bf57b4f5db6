"""QEMU under the jailer: the launcher outside, -chroot/-runas/-sandbox inside.

Boots the bundled guest (skipped without ``make image``) on a TAP in its own
network namespace and checks from /proc that the running QEMU is confined.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from metald.backends.qemu.clock import cached_host_tsc_khz, tcg_extra_args
from metald.backends.qemu.command import CommandOptions, build_argv, pid_file_path, qmp_socket_path
from metald.config import Settings
from metald.core.models import BootSpec, Drive, NetworkAllocation
from metald.core.plan import Plan
from metald.jailer import Jail, Jailer
from metald.jailer import cgroup as cg
from metald.jailer.chroot import remove_tree
from metald.jailer.qemu import qemu_confinement_args, qemu_launch_argv

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.usefixtures("require_isolated")]

UID, GID = 61000, 61001
_ids = itertools.count()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def qmp(path: Path, command: str) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        f = sock.makefile("rw")
        json.loads(f.readline())  # greeting
        for execute in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": execute}) + "\n")
            f.flush()
            while "return" not in (reply := json.loads(f.readline())) and "error" not in reply:
                pass  # skip events
        return reply


@pytest.fixture
def jailer(tmp_path: Path) -> Iterator[Jailer]:
    fs = replace(cg.detect(), parent=f"metald/test-{os.getpid()}-q{next(_ids)}")
    shared = [p.parent for p in fs.parents() if not p.parent.exists()]
    settings = Settings(jailer_chroot_dir=tmp_path / "jails", jailer_uid=UID, jailer_gid=GID)
    j = Jailer(settings, cgroup_fs=fs)
    j.check_settings()
    yield j
    for vm in cg.vm_ids(fs):
        cg.remove(fs.paths_for(vm))
    for parent in fs.parents():
        if parent.exists():
            parent.rmdir()
    for parent in shared:
        try:
            parent.rmdir()
        except OSError:
            pass


async def test_qemu_confines_itself(jailer: Jailer, require_image: Path, tmp_path: Path) -> None:
    image = require_image
    vm_id = f"jq{os.getpid() % 100000}-{next(_ids)}"
    jail: Jail = jailer.jail_for("qemu", vm_id)
    short = f"{os.getpid() % 100000:05d}{next(_ids) % 1000:03d}"
    net = NetworkAllocation(
        short_id=short,
        namespace=f"fc-{vm_id}",
        host_veth=f"vh_{short}",
        ns_veth=f"vn_{short}",
        tap=f"tap_{short}",
        ip="10.100.0.2",
        prefix_len=16,
        gateway="10.100.0.1",
        mac="02:00:0a:64:00:02",
    )
    run_dir = tmp_path / "run" / vm_id
    run_dir.mkdir(parents=True)
    cmdline = (image / "cmdline").read_text().strip() if (image / "cmdline").is_file() else "console=ttyS0"
    drives: tuple[Drive, ...] = ()
    if (image / "rootfs.ext4").is_file():
        drives = (Drive("rootfs", image / "rootfs.ext4", True, True),)
    spec = BootSpec(
        vm_id=vm_id,
        vcpu_count=1,
        memory_bytes=128 << 20,
        kernel_path=image / "vmlinuz",
        initrd_path=image / "initramfs.cpio.gz",
        kernel_args=f"{cmdline} metald.vm_id={vm_id}",
        drives=drives,
        network=net,
        run_dir=run_dir,
        console_log=run_dir / "console.log",
    )
    subprocess.run(["ip", "netns", "add", net.namespace], check=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(["ip", "-n", net.namespace, "tuntap", "add", net.tap, "mode", "tap"], check=True)
        subprocess.run(["ip", "-n", net.namespace, "link", "set", net.tap, "up"], check=True)
        await Plan("jail", jailer.prepare_steps(jail, spec)).run()
        options = CommandOptions(
            accel="tcg",
            sandbox=False,  # qemu_confinement_args brings the one that allows -runas
            extra_kernel_args=tuple(tcg_extra_args(spec.kernel_args, cached_host_tsc_khz())),
        )
        argv = build_argv(spec, options) + qemu_confinement_args(jail)
        with open(run_dir / "vmm.log", "wb") as log:
            proc = subprocess.Popen(
                qemu_launch_argv(jailer, jail, argv, net.namespace),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SECRET": "leak"},
            )
        pid = proc.pid

        def confined() -> bool:
            assert proc is not None and proc.poll() is None, (run_dir / "vmm.log").read_text()
            return status(pid).get("Uid", "").split()[:1] == [str(UID)]

        wait_for(confined, 60, "QEMU to drop root")
        st = status(pid)
        assert st["Name"].startswith("qemu-system")
        assert st["Uid"].split() == [str(UID)] * 4
        assert st["Gid"].split() == [str(GID)] * 4
        assert st["Groups"] == str(GID)  # numeric -runas: setgroups([gid]), nothing else
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert os.readlink(f"/proc/{pid}/root") == str(jail.root)
        assert os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(f'/run/netns/{net.namespace}').st_ino}]"
        for directory in jail.cgroup.dirs:
            assert pid in cg.procs(directory)
        line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if "open files" in x)
        assert line.split()[3:5] == [str(jailer.settings.jailer_fd_limit)] * 2
        assert Path(f"/proc/{pid}/environ").read_bytes() == b""
        assert sorted(os.listdir(jail.root)) == ["dev", "run"]  # QEMU opened its files outside
        assert int(pid_file_path(run_dir).read_text()) == pid  # host pid: no PID namespace
        assert qmp(qmp_socket_path(run_dir), "query-status")["return"]["status"] == "running"  # type: ignore[index]

        # The guest boots to userspace inside the cgroup limits.
        wait_for(
            lambda: "METALD_GUEST_READY" in spec.console_log.read_text(errors="replace"),
            240,
            "the guest to boot",
        )
        assert proc.poll() is None
    finally:
        if proc is not None and proc.poll() is None:
            await jailer.cleanup(jail)
            assert proc.wait(timeout=10) == -9
        await jailer.cleanup(jail)
        subprocess.run(["ip", "netns", "del", net.namespace], check=False)
        remove_tree(jail.dir)
    assert not jail.dir.exists() and not any(d.exists() for d in jail.cgroup.dirs)
