"""Images through a real `metald serve` without booting: concurrent creates of
one new image, the per-VM disks, and the `metald image` commands."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.audit import assert_no_leaks, snapshot
from tests.support.daemon import METALD, DaemonProcess
from tests.support.images import Registry, build_web

pytestmark = pytest.mark.xdist_group("images")
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}


@pytest.fixture
def env(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[tuple[DaemonProcess, Registry, str]]:
    registry = Registry(tmp_path)
    ref = registry.push(build_web(tmp_path / "web"), "web", "team/web:1")
    d = DaemonProcess(
        tmp_path,
        require_image,
        UNKEY_METALD_NETWORK_ENABLED="false",
        UNKEY_METALD_JAILER_ENABLED="false",
        UNKEY_METALD_IMAGE_CACHE_DIR=str(tmp_path / "cache"),
        UNKEY_METALD_INSECURE_REGISTRIES=registry.host,
    )
    try:
        d.start(timeout=180)  # a loaded machine starts metald slowly
        yield d, registry, ref
    finally:
        d.kill_with_vmms()
        registry.stop()


def _cli(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*METALD, *args], env=d.env, capture_output=True, text=True, timeout=120, check=False)


def test_twenty_creates_pull_once(env: tuple[DaemonProcess, Registry, str]) -> None:
    d, registry, ref = env
    before = snapshot(d.data_dir / "metald.db", d.run_dir, d.jail_dir)
    vms = [f"many-{i}" for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        list(
            pool.map(
                lambda vm: d.rpc("CreateVm", {"vmId": vm, "config": {**CONFIG, "metadata": {"docker_image": ref}}}), vms
            )
        )
    converted = [r for r in d.log_records() if r.get("msg", r.get("message", "")).startswith("image ")]
    assert len(converted) == 1, converted
    listed = json.loads(_cli(d, "image", "list", "--json").stdout)
    assert len(listed) == 1 and sorted(listed[0]["in_use_by"]) == sorted(vms) and listed[0]["refs"] == [ref]
    bases = {(d.run_dir / vm / "rootfs-base.ext4").resolve() for vm in vms}
    assert bases == {Path(listed[0]["path"])}
    overlays = {(d.run_dir / vm / "rootfs.qcow2").stat().st_ino for vm in vms}
    assert len(overlays) == 20
    # an image in use is not removed
    refused = _cli(d, "image", "rm", ref)
    assert refused.returncode == 1 and "used by VMs" in refused.stderr
    for vm in vms:
        d.rpc("DeleteVm", {"vmId": vm})
    assert_no_leaks(before, snapshot(d.data_dir / "metald.db", d.run_dir, d.jail_dir))
    assert _cli(d, "image", "rm", ref).returncode == 0
    assert json.loads(_cli(d, "image", "list", "--json").stdout) == []
    # pull fills the cache again; a bad reference is a one-line error
    assert _cli(d, "image", "pull", ref).stdout.startswith("sha256:")
    bad = _cli(d, "image", "pull", f"{registry.host}/team/web:nope")
    assert bad.returncode == 1 and bad.stderr.startswith("error: image ") and "Traceback" not in bad.stderr


def test_create_with_the_cli(env: tuple[DaemonProcess, Registry, str]) -> None:
    d, _, ref = env
    out = _cli(d, "vm", "create", "--id", "cli-img", "--image", ref, "--env", "A=1", "--env", "B=two")
    assert out.returncode == 0, out.stderr
    row = d.rpc("GetVmInfo", {"vmId": "cli-img"})
    assert row["config"]["metadata"] == {"env.A": "1", "env.B": "two"}
    assert row["config"]["storage"][0]["options"] == {"docker_image": ref}
    assert (d.run_dir / "cli-img" / "rootfs.qcow2").is_file()
    d.rpc("DeleteVm", {"vmId": "cli-img"})
