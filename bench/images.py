"""Figure 9: container images as VMs through the API.

A ~100 MB image (busybox, an HTTP workload, 100 MB of incompressible data) is
built from local parts and pushed to a docker-registry on loopback inside the
private namespace. Measured with a real `metald serve` (QEMU, jailer on):

* pull + convert: the first CreateVm of the image (skopeo copy, layer checks,
  umoci unpack, mkfs.ext4 -d, the VM's overlay), and `metald image pull` of
  the same image into an empty cache for the pull+convert alone;
* a VM from the cached image: CreateVm + BootVm until the workload's HTTP
  answers on the VM's IP, next to the same for the bundled image (its guest
  serves HTTP on the same port), alternating, each VM deleted before the next;
* the disk bytes the VM's qcow2 overlay takes right when its HTTP answers.

Sizes: METALD_BENCH_IMAGE_MB (100), METALD_BENCH_IMAGE_BOOTS (3).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import (
    IMAGE_DIR,
    ROOT,
    Dist,
    Figure,
    command_line,
    env_int,
    load_average,
    require_isolated,
    start_daemon,
    write_figure,
)

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(256 << 20)}}
HTTP_TIMEOUT_S = 240.0


def _wait_http(ip: str) -> None:
    deadline = time.monotonic() + HTTP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://{ip}:8080/", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.02)
    raise RuntimeError(f"no HTTP answer from {ip}")


def _boot_until_http(daemon: object, vm: str, config: dict[str, object]) -> tuple[float, Path]:
    d = daemon
    started = time.monotonic()
    d.rpc("CreateVm", {"vmId": vm, "config": config})  # type: ignore[attr-defined]
    d.rpc("BootVm", {"vmId": vm})  # type: ignore[attr-defined]
    ip = d.rpc("GetVmInfo", {"vmId": vm})["networkInfo"]["ipAddress"]  # type: ignore[attr-defined]
    _wait_http(ip)
    return time.monotonic() - started, d.run_dir / vm  # type: ignore[attr-defined]


def main() -> None:
    require_isolated()
    size_mb = env_int("METALD_BENCH_IMAGE_MB", 100)
    boots = env_int("METALD_BENCH_IMAGE_BOOTS", 3)
    fig = Figure(
        "images",
        f"9. Container images: a {size_mb} MB image pulled, converted and booted through the API (QEMU, TCG)",
        command_line("METALD_BENCH_IMAGE_MB", "METALD_BENCH_IMAGE_BOOTS"),
        ["what", "seconds (median of runs)", "runs", "notes"],
        load_before=list(load_average()),
    )
    if not (IMAGE_DIR / "vmlinuz").exists():
        fig.notes.append(f"skipped: no guest image in {IMAGE_DIR} (make image)")
        print(write_figure(fig))
        return
    sys.path.insert(0, str(ROOT))
    from tests.support.daemon import METALD
    from tests.support.images import Registry, build_web, manifest_of

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="metald-bench-images-"))
    registry = Registry(tmp)
    daemon = None
    try:
        layout = build_web(tmp / "web", extra_bytes=size_mb << 20)
        ref = registry.push(layout, "web", "bench/web:1")
        manifest = manifest_of(layout, "web")
        compressed = sum(int(layer["size"]) for layer in manifest["layers"])  # type: ignore[attr-defined]
        daemon = start_daemon(
            tmp,
            UNKEY_METALD_IMAGE_CACHE_DIR=str(tmp / "cache"),
            UNKEY_METALD_INSECURE_REGISTRIES=registry.host,
        )
        # pull + convert alone, into a separate empty cache
        env = dict(daemon.env, UNKEY_METALD_IMAGE_CACHE_DIR=str(tmp / "cache-cli"))
        t0 = time.monotonic()
        subprocess.run([*METALD, "image", "pull", ref], env=env, check=True, capture_output=True)
        cli_pull = time.monotonic() - t0
        shutil.rmtree(tmp / "cache-cli")
        # the first CreateVm: pull + convert + overlay
        t0 = time.monotonic()
        daemon.rpc("CreateVm", {"vmId": "img-cold", "config": {**CONFIG, "metadata": {"docker_image": ref}}})
        cold_create = time.monotonic() - t0
        daemon.rpc("DeleteVm", {"vmId": "img-cold"})
        image_rows = json.loads(
            subprocess.run([*METALD, "image", "list", "--json"], env=daemon.env, check=True,
                           capture_output=True, text=True).stdout
        )
        ext4_mib = image_rows[0]["size_bytes"] / (1 << 20)
        ext4_disk_mib = image_rows[0]["disk_bytes"] / (1 << 20)
        image_times, bundled_times, overlay_bytes = [], [], []
        for i in range(boots):
            seconds, run_dir = _boot_until_http(
                daemon, f"img-{i}", {**CONFIG, "metadata": {"docker_image": ref}}
            )
            image_times.append(seconds)
            overlay_bytes.append((run_dir / "rootfs.qcow2").stat().st_blocks * 512)
            daemon.rpc("DeleteVm", {"vmId": f"img-{i}", "force": True})
            seconds, _ = _boot_until_http(daemon, f"bundled-{i}", CONFIG)
            bundled_times.append(seconds)
            daemon.rpc("DeleteVm", {"vmId": f"bundled-{i}", "force": True})
        img, bun = Dist.of_seconds(image_times), Dist.of_seconds(bundled_times)
        ratio = img.median / bun.median
        overlay = max(overlay_bytes)
        fig.rows += [
            ["`metald image pull` into an empty cache (pull + checks + unpack + mkfs.ext4 -d)", f"{cli_pull:.2f}",
             "1", f"{compressed / 1e6:.0f} MB of layers; ext4 {ext4_mib:.0f} MiB ({ext4_disk_mib:.0f} MiB on disk)"],
            ["first CreateVm of the image (the same, plus the VM's overlay)", f"{cold_create:.2f}", "1", ""],
            ["CreateVm + BootVm until HTTP answers, cached image", f"{img.median / 1000:.2f}", str(boots),
             "all: " + ", ".join(f"{t:.2f}" for t in image_times)],
            ["CreateVm + BootVm until HTTP answers, bundled image", f"{bun.median / 1000:.2f}", str(boots),
             "all: " + ", ".join(f"{t:.2f}" for t in bundled_times)],
            ["overlay disk bytes right after the HTTP answer (max)", f"{overlay / 1024:.0f} KiB", str(boots),
             "qcow2 header and tables included"],
        ]
        fig.target("cached image VM until HTTP / bundled image", "<= 1.10x", f"{ratio:.2f}x", ratio <= 1.10)
        fig.target("overlay bytes right after boot", "< 1 MiB", f"{overlay / 1024:.0f} KiB", overlay < 1 << 20)
        fig.notes.append(
            "Boot times under TCG move with the machine's load (see the load average); the two kinds of VM "
            "alternate, so both see the same load, and the ratio is of their medians."
        )
        fig.notes.append(
            "Both guests run the bundled kernel under TCG; the image's guest loads the same modules from the "
            "bundled initramfs, then metald-init mounts the image's disk and starts the workload."
        )
    finally:
        if daemon is not None:
            daemon.kill_with_vmms()
        registry.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    fig.load_after = list(load_average())
    fig.seconds = time.monotonic() - started
    print(write_figure(fig))


if __name__ == "__main__":
    main()
