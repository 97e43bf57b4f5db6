"""Event stream: delivery latency and metald's memory with many followers.

A real ``metald serve`` (QEMU backend, no boot, network and jailer off: the
events are what is measured). N followers read WatchEvents over Connect JSON on
HTTP/1.1 (one asyncio client process, one connection each) while VMs are
created and deleted through the API; plus one follower that stops reading.
Latency per delivered event = the time the client parsed it minus the event's
timestamp (taken by metald when it appended the event, same host clock).
Memory is metald's RSS (VmRSS, and VmHWM for the peak).

Writes its section of bench/RESULTS.md (between the events markers) and
bench/out/events.json. Sizes: METALD_BENCH_EVENT_FOLLOWERS (100),
METALD_BENCH_EVENT_VMS (100).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import OUT_DIR, ROOT, command_line, machine, require_isolated, start_daemon

FOLLOWERS = int(os.environ.get("METALD_BENCH_EVENT_FOLLOWERS", "100"))
VMS = int(os.environ.get("METALD_BENCH_EVENT_VMS", "100"))
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- events:begin -->", "<!-- events:end -->"
PATH = "/metal.vmprovisioner.v1.EventService/WatchEvents"


def rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def follow(http: httpx.AsyncClient, url: str, latencies: list[float], counts: list[int], i: int,
                 live: asyncio.Event, ready: list[int]) -> None:
    body = json.dumps({"follow": True}).encode()
    async with http.stream("POST", url + PATH, content=struct.pack(">BI", 0, len(body)) + body,
                           headers={"content-type": "application/connect+json"}) as r:
        buf = b""
        async for chunk in r.aiter_raw():
            buf += chunk
            while len(buf) >= 5:
                flags, length = struct.unpack(">BI", buf[:5])
                if len(buf) < 5 + length:
                    break
                msg = json.loads(buf[5 : 5 + length])
                buf = buf[5 + length :]
                if flags & 2:
                    return
                if "event" in msg:
                    latencies.append(time.time() - int(msg["event"]["timestampMs"]) / 1000)
                    counts[i] += 1
                elif not ready[i]:
                    ready[i] = 1
                    if all(ready):
                        live.set()


async def run_case(url: str, pid: int, followers: int, vms: int, stuck: bool) -> dict[str, Any]:
    latencies: list[float] = []
    counts = [0] * followers
    ready = [0] * followers
    live = asyncio.Event()
    limits = httpx.Limits(max_connections=followers + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        base_rss = rss(pid)[0]
        tasks = [asyncio.create_task(follow(http, url, latencies, counts, i, live, ready)) for i in range(followers)]
        stuck_stream = None
        if stuck:
            body = json.dumps({"follow": True}).encode()
            stuck_stream = http.stream("POST", url + PATH, content=struct.pack(">BI", 0, len(body)) + body,
                                       headers={"content-type": "application/connect+json"})
            await stuck_stream.__aenter__()  # headers read, body never
        await asyncio.wait_for(live.wait(), 120)
        idle_rss = rss(pid)[0]
        api: list[float] = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as rpc:
            started = time.monotonic()
            for i in range(vms):
                calls = (("CreateVm", {"vmId": f"b-{i}", "config": CONFIG}), ("DeleteVm", {"vmId": f"b-{i}"}))
                for method, body_ in calls:
                    t = time.monotonic()
                    r = await rpc.post(f"/metal.vmprovisioner.v1.VmService/{method}", json=body_)
                    api.append(time.monotonic() - t)
                    assert r.status_code == 200, r.text
            churn_s = time.monotonic() - started
        expected = 6 * vms
        deadline = time.monotonic() + 300
        while min(counts) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        busy_rss, peak_rss = rss(pid)
        for t_ in tasks:
            t_.cancel()
        if stuck_stream is not None:
            await stuck_stream.__aexit__(None, None, None)
    return {
        "followers": followers,
        "stuck": stuck,
        "events": expected,
        "delivered_all": min(counts) == expected and max(counts) == expected,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000 if latencies else float("nan"),
        "api_p50_ms": pct(api, 0.5) * 1000,
        "api_p99_ms": pct(api, 0.99) * 1000,
        "churn_s": churn_s,
        "rss_before_mib": base_rss,
        "rss_idle_mib": idle_rss,
        "rss_after_mib": busy_rss,
        "rss_peak_mib": peak_rss,
    }


def render(rows: list[dict[str, Any]], cmd: str, info: dict[str, Any]) -> str:
    out = [
        BEGIN,
        "## Event stream: delivery latency and memory with many followers",
        "",
        f"Command: `{cmd}` ({info['when']}; load average at start {info['load']}).",
        "",
        f"{VMS} VMs created and deleted one after another through the API (6 events each) while the",
        "followers read WatchEvents (Connect JSON over HTTP/1.1, one client process). Latency: the",
        "event's timestamp (metald appends it) to the client having parsed it.",
        "",
        "| followers | + one that stops reading | every event to every follower once | latency p50 / p99 / max ms "
        "| API call p50 / p99 ms | metald RSS before / idle followers / after / peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['followers']} | {'yes' if r['stuck'] else 'no'} | {'yes' if r['delivered_all'] else 'NO'} "
            f"| {r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.1f} "
            f"| {r['api_p50_ms']:.1f} / {r['api_p99_ms']:.1f} "
            f"| {r['rss_before_mib']:.1f} / {r['rss_idle_mib']:.1f} / {r['rss_after_mib']:.1f} "
            f"/ {r['rss_peak_mib']:.1f} |"
        )
    out += ["", END]
    return "\n".join(out)


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# metald benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    require_isolated()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    info = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": load, "machine": machine()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image"
        image.mkdir()
        for name in ("vmlinuz", "initramfs.cpio.gz"):
            (image / name).write_bytes(b"placeholder")
        for followers, stuck in ((1, False), (FOLLOWERS, False), (FOLLOWERS, True)):
            home = Path(tmp) / f"d{followers}{stuck}"
            home.mkdir()
            d = start_daemon(home, UNKEY_METALD_NETWORK_ENABLED="false",
                             UNKEY_METALD_JAILER_ENABLED="false", UNKEY_METALD_IMAGE_DIR=str(image))
            try:
                assert d.proc is not None
                row = asyncio.run(run_case(d.url, d.proc.pid, followers, VMS, stuck))
                rows.append(row)
                print(json.dumps(row))
            finally:
                d.kill()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "events.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    write_results(render(rows, command_line("METALD_BENCH_EVENT_FOLLOWERS", "METALD_BENCH_EVENT_VMS"), info))


if __name__ == "__main__":
    main()
