"""Snapshots as a client sees them: each time runs from the RPC call to the
guest answering HTTP on its own IP, against a real ``metald serve`` (QEMU
under the jailer, each VM in its own namespace).

* cold: BootVm of a created VM
* resume: BootVm of a VM hibernated by SnapshotVm(stop)
* clone: CloneVm(boot) of a template snapshot

Writes its section of bench/RESULTS.md (between the ``snapshots-api`` markers).

    tests/isolated.sh .venv/bin/python -m bench.snapshots_api
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, Dist, command_line, env_int, load_average, require_isolated, start_daemon

RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- snapshots-api:begin -->", "<!-- snapshots-api:end -->"
VMS = "/metal.vmprovisioner.v1.VmService/"
SNAPS = "/metal.vmprovisioner.v1.SnapshotService/"
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}


def call(d: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = d.http.post(d.url + path, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{path}: {r.text}")
    return dict(r.json())


def ip_of(d: Any, vm_id: str) -> str:
    return str(call(d, VMS + "GetVmInfo", {"vmId": vm_id})["networkInfo"]["ipAddress"])


def answered(ip: str, expect: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            try:
                if client.get(f"http://{ip}:8080/").text.strip() == expect:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
    raise RuntimeError(f"{ip} did not answer {expect!r}")


def run(tmp: Path, runs: int) -> dict[str, Dist]:
    d = start_daemon(tmp, UNKEY_METALD_QEMU_ACCEL="tcg")
    cold: list[float] = []
    resume: list[float] = []
    clone: list[float] = []
    try:
        for i in range(runs):
            vm = f"b-{i}"
            call(d, VMS + "CreateVm", {"vmId": vm, "config": CONFIG})
            ip = ip_of(d, vm)
            t = time.monotonic()
            call(d, VMS + "BootVm", {"vmId": vm})
            answered(ip, vm)
            cold.append(time.monotonic() - t)
            time.sleep(2)  # let the guest settle as a long-running one would
            call(d, SNAPS + "SnapshotVm", {"vmId": vm, "stop": True})
            t = time.monotonic()
            call(d, VMS + "BootVm", {"vmId": vm})
            answered(ip, vm)
            resume.append(time.monotonic() - t)
            if i == 0:
                call(d, SNAPS + "SnapshotVm", {"vmId": vm, "snapshotId": "bench-tpl"})
        for i in range(runs):
            name = f"k-{i}"
            t = time.monotonic()
            call(d, SNAPS + "CloneVm", {"snapshotId": "bench-tpl", "vmId": name, "boot": True})
            answered(ip_of(d, name), name)
            clone.append(time.monotonic() - t)
            call(d, VMS + "DeleteVm", {"vmId": name, "force": True})
    finally:
        d.kill_with_vmms()
    return {"cold": Dist.of_seconds(cold), "resume": Dist.of_seconds(resume), "clone": Dist.of_seconds(clone)}


def render(out: dict[str, Dist], runs: int, load: list[float]) -> str:
    lines = [
        BEGIN,
        "## Snapshots through the API",
        "",
        f"`{command_line('METALD_BENCH_SNAP_API_RUNS')}` - {runs} runs each, 128 MiB guests under TCG,"
        f" load average at start {load[0]:.1f}. From the RPC call to the guest answering HTTP on its own IP"
        " (ms):",
        "",
        "| path | n | median | p95 | max |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("cold", "BootVm (cold)"), ("resume", "BootVm of a hibernated VM"),
                        ("clone", "CloneVm(boot=true)")):  # fmt: skip
        dist = out[name]
        lines.append(f"| {label} | {dist.n} | {dist.median:.0f} | {dist.p95:.0f} | {dist.max:.0f} |")
    lines += ["", END]
    return "\n".join(lines)


def write_section(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# metald benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    require_isolated()
    runs = env_int("METALD_BENCH_SNAP_API_RUNS", 3)
    load = list(load_average())
    with tempfile.TemporaryDirectory(prefix="metald-bench-snapapi-") as tmp:
        out = run(Path(tmp), runs)
    section = render(out, runs, load)
    print(section)
    write_section(section)
    print(f"bench: wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
