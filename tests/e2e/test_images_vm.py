"""A container image as a microVM, end to end: a real registry on loopback, a
real `metald serve` with the QEMU backend and the jailer, real guests."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.audit import assert_no_leaks, snapshot
from tests.support.daemon import DaemonProcess, RpcError
from tests.support.images import Registry, build_web

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(256 << 20)}}


@pytest.fixture
def env(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[tuple[DaemonProcess, Registry, str]]:
    registry = Registry(tmp_path)
    ref = registry.push(build_web(tmp_path / "web"), "web", "team/web:1")
    d = DaemonProcess(
        tmp_path,
        require_image,
        UNKEY_METALD_JAILER_UID="61000",
        UNKEY_METALD_JAILER_GID="61000",
        UNKEY_METALD_IMAGE_CACHE_DIR=str(tmp_path / "cache"),
        UNKEY_METALD_INSECURE_REGISTRIES=registry.host,
    )
    try:
        d.start(timeout=180)  # a loaded machine starts metald slowly
        yield d, registry, ref
    finally:
        d.kill_with_vmms()
        registry.stop()


def _get(ip: str, path: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"http://{ip}:8080/{path}", timeout=5).text
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_image_runs_as_a_vm(env: tuple[DaemonProcess, Registry, str]) -> None:
    daemon, _, ref = env
    before = snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir, vmm_marker="img-")
    config = {
        **CONFIG,
        "storage": [{"id": "root", "isRootDevice": True, "options": {"docker_image": ref}}],
        "metadata": {"env.GREETING": "override", "env.EXTRA": "1"},
    }
    daemon.rpc("CreateVm", {"vmId": "img-web", "config": config})
    run_dir = daemon.run_dir / "img-web"
    assert (run_dir / "rootfs.qcow2").is_file()
    cached = (run_dir / "rootfs-base.ext4").resolve()
    image_sum = _digest(cached)
    daemon.rpc("BootVm", {"vmId": "img-web"})
    ip = daemon.rpc("GetVmInfo", {"vmId": "img-web"})["networkInfo"]["ipAddress"]
    environment = _get(ip, "env")
    assert "GREETING=override" in environment and "EXTRA=1" in environment and "FOO=bar" in environment
    assert "HOSTNAME=img-web" in environment
    assert _get(ip, "id").startswith("uid=1000(app) gid=1000(app)")
    assert _get(ip, "pwd").strip() == "/app"
    assert _get(ip, "boots").count("boot") == 1
    console = daemon.console("img-web")
    assert "METALD_IMAGE_START vm_id=img-web" in console and "workload serving as 1000" in console

    # the guest's writes live in its overlay: they survive a reboot, the cache never sees them
    daemon.rpc("RebootVm", {"vmId": "img-web"})
    daemon.wait_console("img-web", "METALD_IMAGE_START", count=2)
    assert _get(ip, "boots").count("boot") == 2
    assert _digest(cached) == image_sum

    # a graceful shutdown reaches the workload as SIGTERM; the VM powers off
    daemon.rpc("ShutdownVm", {"vmId": "img-web", "timeoutSeconds": 60})
    assert daemon.state("img-web") == "VM_STATE_SHUTDOWN"
    assert "METALD_WORKLOAD_EXIT signal=15" in daemon.console("img-web")

    images = {i["digest"]: i for i in _images(daemon)}
    assert any(i["in_use_by"] == ["img-web"] for i in images.values())
    daemon.rpc("DeleteVm", {"vmId": "img-web"})
    assert not run_dir.exists()
    assert _digest(cached) == image_sum
    assert_no_leaks(before, snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir, vmm_marker="img-"))


def test_workload_exit_code_reaches_metald(env: tuple[DaemonProcess, Registry, str]) -> None:
    daemon, _, ref = env
    config = {**CONFIG, "metadata": {"docker_image": ref, "cmd": "exit 3", "user": "0:0"}}
    daemon.rpc("CreateVm", {"vmId": "img-exit", "config": config})
    daemon.rpc("BootVm", {"vmId": "img-exit"})
    daemon.wait_state("img-exit", "VM_STATE_SHUTDOWN", timeout=180)
    info = daemon.rpc("GetVmInfo", {"vmId": "img-exit"})
    assert info["backendInfo"]["last_exit_reason"] == "workload exited with code 3"
    assert "exiting with 3" in daemon.console("img-exit")
    daemon.rpc("DeleteVm", {"vmId": "img-exit"})


def test_bad_image_requests(env: tuple[DaemonProcess, Registry, str]) -> None:
    daemon, registry, _ = env
    before = snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir)
    cases = [
        (f"{registry.host}/team/web:missing", "not_found"),
        (f"{registry.host}/team/nothing:1", "not_found"),
        ("127.0.0.1:9/team/web:1", "unavailable"),
        ("Not A Reference", "invalid_argument"),
    ]
    for ref, code in cases:
        with pytest.raises(RpcError) as err:
            daemon.rpc("CreateVm", {"vmId": "img-bad", "config": {**CONFIG, "metadata": {"docker_image": ref}}})
        assert err.value.code == code, err.value
    assert_no_leaks(before, snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir))


def _images(daemon: DaemonProcess) -> list[dict[str, object]]:
    import json
    import subprocess

    out = subprocess.run(
        [*__import__("tests.support.daemon", fromlist=["METALD"]).METALD, "image", "list", "--json"],
        env=daemon.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return list(json.loads(out))


def test_image_on_firecracker_through_the_double(tmp_path: Path, require_isolated: None, require_image: Path) -> None:
    """Firecracker takes raw drives: the VM's disk is a (reflink or sparse) copy of
    the cached image; the double boots it under QEMU from what metald sent."""
    from metald.backends.qemu.clock import cached_host_tsc_khz
    from tests.firecracker_double import harness

    registry = Registry(tmp_path)
    ref = registry.push(build_web(tmp_path / "web"), "web", "team/web:1")
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    record = tmp_path / "requests.jsonl"
    knobs = {"FC_DOUBLE_BOOT_QEMU": "1", "FC_DOUBLE_CHECK_TAP": "1"}
    khz = cached_host_tsc_khz()
    if khz:
        knobs["FC_DOUBLE_TSC_KHZ"] = str(khz)
    d = DaemonProcess(
        tmp_path,
        require_image,
        UNKEY_METALD_BACKEND="firecracker",
        UNKEY_METALD_FIRECRACKER_BINARY=str(harness.make_shim(shim_dir, record, **knobs)),
        UNKEY_METALD_JAILER_ENABLED="false",
        UNKEY_METALD_IMAGE_CACHE_DIR=str(tmp_path / "cache"),
        UNKEY_METALD_INSECURE_REGISTRIES=registry.host,
    )
    try:
        d.start(timeout=180)  # a loaded machine starts metald slowly
        vm = "img-fc"
        before = snapshot(d.data_dir / "metald.db", d.run_dir, d.jail_dir, vmm_marker=vm)
        d.rpc("CreateVm", {"vmId": vm, "config": {**CONFIG, "metadata": {"docker_image": ref, "env.WHERE": "fc"}}})
        disk = d.run_dir / vm / "rootfs.ext4"
        cached = (d.run_dir / vm / "rootfs-base.ext4").resolve()
        assert disk.stat().st_ino != cached.stat().st_ino and disk.stat().st_size == cached.stat().st_size
        d.rpc("BootVm", {"vmId": vm})
        ip = d.rpc("GetVmInfo", {"vmId": vm})["networkInfo"]["ipAddress"]
        assert "WHERE=fc" in _get(ip, "env")
        bodies = {r["path"]: r["body"] for r in harness.read_record(record) if r["method"] == "PUT"}
        assert bodies["/drives/rootfs"]["path_on_host"] == str(disk)
        assert not bodies["/drives/rootfs"]["is_read_only"]
        assert "initramfs-image-" in bodies["/boot-source"]["initrd_path"]
        assert "metald.overrides=" in bodies["/boot-source"]["boot_args"]
        d.rpc("DeleteVm", {"vmId": vm, "force": True})
        assert not disk.exists() and cached.is_file()
        assert_no_leaks(before, snapshot(d.data_dir / "metald.db", d.run_dir, d.jail_dir, vmm_marker=vm))
    finally:
        d.kill_with_vmms()
        registry.stop()
