"""Figures 2-6 against a real ``metald serve`` (QEMU backend, jailer on,
network on; VMs are created, never booted):

2. CreateVm latency with 0 and with N VMs present (sequential, one client);
3. C concurrent clients creating and deleting VMs: errors, duplicate IPs, rate;
4. GetVmInfo and a 100-VM ListVms page with N VMs stored under C concurrent
   clients (open loop at a fixed total rate, plus a closed-loop saturation run);
5. the daemon's RSS with N VMs;
6. restart with N VMs stored and their networks present: reconcile time and
   spawn-to-healthy.

Sizes: METALD_BENCH_VMS (1000), METALD_BENCH_CREATE_SAMPLES (20),
METALD_BENCH_CHURN_CLIENTS (100), METALD_BENCH_CHURN_VMS (3 per client),
METALD_BENCH_READ_CLIENTS (200), METALD_BENCH_READ_SECONDS (15),
METALD_BENCH_READ_RATE (total GetVmInfo requests/s of the open-loop run, 500),
METALD_BENCH_LIST_RATE (total ListVms pages/s of the open-loop run, 100).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.client import Connection, RpcError
from bench.common import (
    Dist,
    Figure,
    command_line,
    env_int,
    load_average,
    require_isolated,
    rss_kib,
    start_daemon,
    write_figure,
)
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb

HOST = "127.0.0.1"


def config(i: int = 0) -> pb.VmConfig:
    cfg = pb.VmConfig(cpu=pb.CpuConfig(vcpu_count=1), memory=pb.MemoryConfig(size_bytes=32 << 20))
    cfg.metadata["bench"] = "api"
    cfg.metadata["index"] = str(i)
    return cfg


async def create(conn: Connection, vm_id: str, i: int = 0) -> None:
    await conn.call("CreateVm", pb.CreateVmRequest(vm_id=vm_id, config=config(i), customer_id="bench"),
                    pb.CreateVmResponse)


async def delete(conn: Connection, vm_id: str) -> None:
    await conn.call("DeleteVm", pb.DeleteVmRequest(vm_id=vm_id, force=True), pb.DeleteVmResponse)


async def info(conn: Connection, vm_id: str) -> pb.GetVmInfoResponse:
    return await conn.call("GetVmInfo", pb.GetVmInfoRequest(vm_id=vm_id), pb.GetVmInfoResponse)


async def many(port: int, fn: Any, items: list[Any], concurrency: int) -> tuple[float, list[BaseException]]:
    """Run ``fn(conn, item)`` over items with ``concurrency`` connections; (seconds, errors)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    errors: list[BaseException] = []

    async def worker() -> None:
        conn = await Connection(HOST, port).open()
        try:
            while not queue.empty():
                item = queue.get_nowait()
                try:
                    await fn(conn, item)
                except (RpcError, OSError, asyncio.IncompleteReadError) as exc:
                    errors.append(exc)
        finally:
            await conn.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t, errors


async def sequential_creates(port: int, prefix: str, count: int) -> tuple[list[float], list[float]]:
    conn = await Connection(HOST, port).open()
    created, deleted = [], []
    try:
        for i in range(count):
            t = time.perf_counter()
            await create(conn, f"{prefix}-{i}")
            created.append(time.perf_counter() - t)
        for i in range(count):
            t = time.perf_counter()
            await delete(conn, f"{prefix}-{i}")
            deleted.append(time.perf_counter() - t)
    finally:
        await conn.close()
    return created, deleted


# --- figure 3 ---------------------------------------------------------------------------


async def churn(port: int, clients: int, per_client: int) -> dict[str, Any]:
    """Phase A: every client creates its VMs; all held at once, the IPs must be
    distinct. Phase B: every client deletes and re-creates them one by one;
    an IP seen for two VMs whose lifetimes overlap is a duplicate."""
    errors: Counter[str] = Counter()
    ips: dict[str, str] = {}
    barrier = asyncio.Barrier(clients)
    lifetimes: list[tuple[str, float, float, str]] = []  # (ip, alive_from, alive_to, vm_id)
    t_create = {"start": 0.0, "end": 0.0}
    t_delete = {"start": 0.0, "end": 0.0}

    async def client(c: int) -> None:
        conn = await Connection(HOST, port).open()
        mine = [f"churn-{c}-{k}" for k in range(per_client)]
        try:
            await barrier.wait()
            t_create["start"] = t_create["start"] or time.perf_counter()
            for vm_id in mine:
                try:
                    await create(conn, vm_id)
                except RpcError as exc:
                    errors[f"create {exc.code}"] += 1
            t_create["end"] = max(t_create["end"], time.perf_counter())
            await barrier.wait()
            for vm_id in mine:
                try:
                    ips[vm_id] = (await info(conn, vm_id)).network_info.ip_address
                except RpcError as exc:
                    errors[f"info {exc.code}"] += 1
            await barrier.wait()
            # phase B: replace each VM with a new one, interleaved across clients
            # (a VM is alive from its CreateVm answer until its DeleteVm is sent)
            for k, vm_id in enumerate(mine):
                try:
                    lifetimes.append((ips.get(vm_id, ""), 0.0, time.perf_counter(), vm_id))
                    await delete(conn, vm_id)
                    new = f"churn2-{c}-{k}"
                    await create(conn, new)
                    born = time.perf_counter()
                    ip = (await info(conn, new)).network_info.ip_address
                    lifetimes.append((ip, born, time.perf_counter(), new))
                    await delete(conn, new)
                except RpcError as exc:
                    errors[f"churn {exc.code}"] += 1
            t_delete["start"] = t_delete["start"] or time.perf_counter()
        finally:
            await conn.close()

    await asyncio.gather(*(client(c) for c in range(clients)))
    held = list(ips.values())
    dup_held = [ip for ip, n in Counter(held).items() if n > 1]
    dup_overlap = _overlapping_duplicates(lifetimes)
    created = clients * per_client
    return {
        "created": created,
        "create_seconds": t_create["end"] - t_create["start"],
        "create_rate": created / max(1e-9, t_create["end"] - t_create["start"]),
        "errors": dict(errors),
        "distinct_ips_held": len(set(held)),
        "dup_held": dup_held,
        "dup_overlap": dup_overlap,
        "churn_vms": len(lifetimes) // 2,
    }


def _overlapping_duplicates(lifetimes: list[tuple[str, float, float, str]]) -> list[str]:
    by_ip: dict[str, list[tuple[float, float, str]]] = {}
    for ip, start, end, vm_id in lifetimes:
        if ip:
            by_ip.setdefault(ip, []).append((start, end, vm_id))
    dups = []
    for ip, spans in by_ip.items():
        spans.sort()
        holder_end, holder = spans[0][1], spans[0][2]
        for start, end, vm_id in spans[1:]:
            if start < holder_end:
                dups.append(f"{ip}: {holder} and {vm_id}")
            if end > holder_end:
                holder_end, holder = end, vm_id
    return dups


# --- figure 4 ---------------------------------------------------------------------------


async def read_load(port: int, clients: int, seconds: float, rate: float | None,
                    make: Any) -> tuple[list[float], int, float]:
    """``clients`` connections; each sends ``make()`` -> (method, request, response
    type) in a loop (closed loop when rate is None, else ``rate`` total req/s
    spread evenly over the clients, on a fixed schedule). Latency counts from
    the scheduled send time, so a slow daemon cannot hide queueing (no
    coordinated omission). Returns (latencies, errors, achieved req/s)."""
    latencies: list[float] = []
    errors = 0
    conns = [await Connection(HOST, port).open() for _ in range(clients)]
    interval = clients / rate if rate else 0.0
    start = time.perf_counter() + 0.2
    end = start + seconds

    async def client(i: int, conn: Connection) -> None:
        nonlocal errors
        due = start + (interval * i / clients if interval else 0.0)
        while True:
            if interval:
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
            else:
                due = time.perf_counter()
            if due >= end:
                return
            method, request, response = make()
            try:
                await conn.call(method, request, response)
                latencies.append(time.perf_counter() - due)
            except (RpcError, OSError, asyncio.IncompleteReadError):
                errors += 1
            due += interval

    await asyncio.gather(*(client(i, c) for i, c in enumerate(conns)))
    for c in conns:
        await c.close()
    return latencies, errors, len(latencies) / seconds


async def page_tokens(port: int) -> list[str]:
    conn = await Connection(HOST, port).open()
    tokens, token = [""], ""
    while True:
        page = await conn.call("ListVms", pb.ListVmsRequest(page_size=100, page_token=token), pb.ListVmsResponse)
        token = page.next_page_token
        if not token:
            break
        tokens.append(token)
    await conn.close()
    return tokens


# --- the run ----------------------------------------------------------------------------


def daemon_rss(daemon: Any) -> tuple[float, float]:
    rss, hwm = rss_kib(daemon.proc.pid)
    return rss / 1024, hwm / 1024


def reconcile_seconds(daemon: Any) -> float | None:
    found = [r for r in daemon.log_records() if r.get("message") == "reconciled" or r.get("msg") == "reconciled"]
    if not found:
        return None
    value = found[-1].get("seconds")
    return float(value) if value is not None else None


async def run(daemon: Any, n: int, samples: int, churn_clients: int, churn_vms: int,
              read_clients: int, read_seconds: float, rates: tuple[float, float], figs: dict[str, Figure]) -> None:
    port = daemon.port
    f2, f3, f4, f5, f6 = (figs[k] for k in ("create", "churn", "reads", "rss", "reconcile"))

    # 2a: creates with no VM present (after a few unmeasured ones: the first
    # calls of a fresh daemon import code and probe QEMU)
    await sequential_creates(port, "warmup", 5)
    up0, down0 = await sequential_creates(port, "empty", samples)

    # 3: concurrent clients creating and deleting
    result = await churn(port, churn_clients, churn_vms)
    ok = not result["errors"] and not result["dup_held"] and not result["dup_overlap"]
    ok_ips = result["distinct_ips_held"] == result["created"]
    f3.rows.append([
        str(churn_clients), str(result["created"]), f"{result['create_rate']:.0f}",
        str(sum(result["errors"].values())), f"{result['distinct_ips_held']} of {result['created']}",
        str(len(result["dup_held"]) + len(result["dup_overlap"])), str(result["churn_vms"]),
    ])
    f3.target("errors", "0", str(sum(result["errors"].values())), not result["errors"])
    f3.target("IP handed out twice", "never", str(len(result["dup_held"]) + len(result["dup_overlap"])),
              ok and ok_ips)
    if result["errors"]:
        f3.notes.append(f"errors: {result['errors']}")
    f3.extra["result"] = result

    # populate N VMs (16 clients)
    populate_s, errs = await many(port, lambda c, i: create(c, f"vm-{i:05d}", i), list(range(n)), 16)
    f2.notes.append(f"populating {n} VMs through the API, 16 clients: {n / populate_s:.0f} creates/s"
                    + (f", {len(errs)} errors: {errs[:3]}" if errs else ""))

    # 2b: creates with N present (2c, with none again, comes after the clean-up below)
    upn, downn = await sequential_creates(port, "full", samples)
    f2.rows.append(["0 (before)", Dist.of_seconds(up0).short(), Dist.of_seconds(down0).short(), str(len(up0))])
    f2.rows.append([str(n), Dist.of_seconds(upn).short(), Dist.of_seconds(downn).short(), str(len(upn))])

    # 5: memory with N VMs
    rss, hwm = daemon_rss(daemon)
    f5.rows.append([str(n), f"{rss:.1f}", f"{hwm:.1f}", "after creating them"])

    # 4: reads
    ids = [f"vm-{i:05d}" for i in range(n)]
    tokens = await page_tokens(port)

    def get_req() -> tuple[str, Any, Any]:
        return "GetVmInfo", pb.GetVmInfoRequest(vm_id=random.choice(ids)), pb.GetVmInfoResponse

    def list_req() -> tuple[str, Any, Any]:
        return ("ListVms", pb.ListVmsRequest(page_size=100, page_token=random.choice(tokens)),
                pb.ListVmsResponse)

    targets = {"GetVmInfo": 10.0, "ListVms (100 per page)": 20.0}
    for (label, make), open_rate in zip((("GetVmInfo", get_req), ("ListVms (100 per page)", list_req)), rates,
                                        strict=True):
        for mode, rate in (("open loop", open_rate), ("closed loop (saturation)", None)):
            lat, errors, achieved = await read_load(port, read_clients, read_seconds, rate, make)
            d = Dist.of_seconds(lat)
            f4.rows.append([label, mode, str(read_clients), f"{rate:.0f}" if rate else "max",
                            f"{achieved:.0f}", f"{d.median:.2f}", f"{d.p95:.2f}", f"{d.p99:.2f}", str(errors)])
            if rate:
                f4.target(f"{label} p99 with {n} VMs, {read_clients} clients at {rate:.0f} req/s",
                          f"< {targets[label]:.0f} ms", f"{d.p99:.2f} ms (errors {errors})",
                          d.p99 < targets[label] and errors == 0)
    rss, hwm = daemon_rss(daemon)
    f5.rows.append([str(n), f"{rss:.1f}", f"{hwm:.1f}", "after the read load (HWM: peak)"])
    f5.target(f"daemon RSS with {n} VMs", "< 100 MiB", f"{rss:.1f} MiB (peak {hwm:.1f})", hwm < 100)

    # 6: restart with N VMs stored and their networks present
    daemon.stop_gracefully()
    daemon.start(300)
    seconds = reconcile_seconds(daemon)
    listed = await Connection(HOST, daemon.port).open()
    total = (await listed.call("ListVms", pb.ListVmsRequest(page_size=1), pb.ListVmsResponse)).total_count
    await listed.close()
    f6.rows.append([str(n), f"{seconds:.2f}" if seconds is not None else "n/a", f"{daemon.start_seconds:.2f}",
                    str(total)])
    f6.target(f"reconcile at start with {n} VMs", "< 3 s",
              f"{seconds:.2f} s" if seconds is not None else "not logged",
              seconds is not None and seconds < 3)
    rss, hwm = daemon_rss(daemon)
    f5.rows.append([str(n), f"{rss:.1f}", f"{hwm:.1f}", "after a restart (reconciled)"])

    # clean up: delete everything
    del_s, errs = await many(daemon.port, lambda c, v: delete(c, v), ids, 16)
    f2.notes.append(f"deleting the {n} VMs, 16 clients: {n / del_s:.0f} deletes/s"
                    + (f", {len(errs)} errors: {errs[:3]}" if errs else ""))

    # 2c: creates with none present again; the ratio is against both runs with none,
    # so that a busy moment in either does not decide it
    await asyncio.sleep(2)
    up0b, down0b = await sequential_creates(daemon.port, "again", samples)
    f2.rows.append(["0 (after)", Dist.of_seconds(up0b).short(), Dist.of_seconds(down0b).short(), str(len(up0b))])
    d0, dn = Dist.of_seconds(up0 + up0b), Dist.of_seconds(upn)
    ratio = dn.median / d0.median
    f2.target(f"CreateVm median with {n} present / with 0", "<= 1.5x", f"{ratio:.2f}x", ratio <= 1.5)
    f2.notes.append(f"ratio: median with {n} present ({dn.median:.2f} ms) / median of both runs with none "
                    f"({d0.median:.2f} ms)")


def main() -> None:
    require_isolated()
    n = env_int("METALD_BENCH_VMS", 1000)
    samples = env_int("METALD_BENCH_CREATE_SAMPLES", 20)
    churn_clients = env_int("METALD_BENCH_CHURN_CLIENTS", 100)
    churn_vms = env_int("METALD_BENCH_CHURN_VMS", 3)
    read_clients = env_int("METALD_BENCH_READ_CLIENTS", 200)
    read_seconds = float(env_int("METALD_BENCH_READ_SECONDS", 15))
    read_rate = float(env_int("METALD_BENCH_READ_RATE", 500))
    list_rate = float(env_int("METALD_BENCH_LIST_RATE", 100))
    cmd = command_line(*(f"METALD_BENCH_{k}" for k in (
        "VMS", "CREATE_SAMPLES", "CHURN_CLIENTS", "CHURN_VMS", "READ_CLIENTS", "READ_SECONDS", "READ_RATE",
        "LIST_RATE")))
    figs = {
        "create": Figure("create", "2. CreateVm through the API (network, store; no boot), sequential", cmd,
                         ["VMs present", "CreateVm ms (median / p95 / p99)", "DeleteVm ms", "samples"]),
        "churn": Figure("churn", "3. Concurrent clients creating and deleting VMs", cmd,
                        ["clients", "VMs created at once", "creates/s", "errors", "distinct IPs held",
                         "IPs handed out twice", "create-delete cycles after"]),
        "reads": Figure("reads", "4. Reads with many VMs stored, many concurrent clients", cmd,
                        ["request", "load", "clients", "offered req/s", "achieved req/s", "median ms",
                         "p95 ms", "p99 ms", "errors"]),
        "rss": Figure("rss", "5. Daemon memory (RSS) with many VMs managed", cmd,
                      ["VMs", "RSS MiB", "peak (VmHWM) MiB", "when"]),
        "reconcile": Figure("reconcile", "6. Restart with many VMs stored (networks present)", cmd,
                            ["VMs", "reconcile s (daemon log)", "spawn to healthy s", "VMs listed after"]),
    }
    load = list(load_average())
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="metald-bench-api-"))
    daemon = start_daemon(tmp)
    try:
        asyncio.run(run(daemon, n, samples, churn_clients, churn_vms, read_clients, read_seconds,
                        (read_rate, list_rate), figs))
    finally:
        daemon.kill()
        log_tail = daemon.log.read_text()[-3000:] if daemon.log.exists() else ""
        shutil.rmtree(tmp, ignore_errors=True)
    figs["reads"].notes.append(
        "Open loop: every client sends on a fixed schedule (total rate as offered) and latency counts from the "
        "scheduled time, so queueing in the daemon is included. Closed loop: every client sends its next request "
        "when the previous answer arrives; with all clients busy the latency is clients / throughput "
        "(Little's law), whatever the daemon does per request."
    )
    for fig in figs.values():
        fig.load_before = load
        fig.load_after = list(load_average())
        fig.seconds = time.monotonic() - started
        fig.extra["daemon_log_tail"] = log_tail[-1500:]
        print(write_figure(fig))


if __name__ == "__main__":
    main()
