"""Daemon memory (RSS) around rounds of many concurrent API connections: is it a leak?

Each round opens METALD_BENCH_CONNS (19000) connections to a real ``metald serve``
at once (METALD_BENCH_CONN_OPENING at a time), each makes one ListVms over
HTTP/1.1 and stays open until all are open, then all close. RSS is read before,
with all open, and METALD_BENCH_CONN_SETTLE seconds after they closed, for
METALD_BENCH_CONN_ROUNDS rounds. A leak grows the after-close RSS every round;
memory the allocators keep for reuse shows as one step after the first round
and a plateau after.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from bench.client import Connection
from bench.common import (
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


async def one_round(port: int, count: int, opening: int) -> tuple[list[Connection], int]:
    """Open count connections (one ListVms each) and hold them: (the open ones, errors)."""
    gate = asyncio.Semaphore(opening)
    conns: list[Connection] = []
    errors = 0

    async def open_one() -> None:
        nonlocal errors
        async with gate:
            conn = Connection(HOST, port)
            try:
                await conn.call("ListVms", pb.ListVmsRequest(page_size=1), pb.ListVmsResponse)
                conns.append(conn)
            except Exception:
                errors += 1
                await conn.close()

    await asyncio.gather(*(open_one() for _ in range(count)))
    return conns, errors


async def peak_fds(pid: int, stop: asyncio.Event) -> int:
    """The most file descriptors the daemon held at once until stop is set (sampled every 0.5 s)."""
    peak = 0
    while not stop.is_set():
        peak = max(peak, len(os.listdir(f"/proc/{pid}/fd")))
        await asyncio.sleep(0.5)
    return peak


async def run(daemon: object, count: int, opening: int, rounds: int, settle: float, fig: Figure) -> None:
    pid = daemon.proc.pid  # type: ignore[attr-defined]
    port = daemon.port  # type: ignore[attr-defined]
    await asyncio.sleep(settle)
    fig.rows.append(["0", "-", "-", "-", f"{rss_kib(pid)[0] / 1024:.0f}", "before any", "-"])
    for r in range(1, rounds + 1):
        stop = asyncio.Event()
        sampler = asyncio.create_task(peak_fds(pid, stop))
        conns, errors = await one_round(port, count, opening)
        held = rss_kib(pid)[0] / 1024
        stop.set()
        fds = await sampler
        for conn in conns:
            await conn.close()
        await asyncio.sleep(settle)
        rss, hwm = rss_kib(pid)
        fig.rows.append([str(r), str(len(conns)), str(fds), str(errors), f"{rss / 1024:.0f}",
                         f"{held:.0f} with all open; peak {hwm / 1024:.0f}", f"{settle:.0f}"])


def main() -> None:
    require_isolated()
    count = env_int("METALD_BENCH_CONNS", 19000)
    opening = env_int("METALD_BENCH_CONN_OPENING", 500)
    rounds = env_int("METALD_BENCH_CONN_ROUNDS", 4)
    settle = float(env_int("METALD_BENCH_CONN_SETTLE", 10))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 1000), max(hard, count + 1000)))
    cmd = command_line("METALD_BENCH_CONNS", "METALD_BENCH_CONN_OPENING", "METALD_BENCH_CONN_ROUNDS",
                       "METALD_BENCH_CONN_SETTLE")
    fig = Figure("connections", "9. Daemon RSS around rounds of many concurrent connections", cmd,
                 ["round", "connections made (one ListVms each)", "daemon's peak open fds", "errors",
                  "RSS MiB after they closed", "RSS MiB at the end of the round", "settle s"])
    load = list(load_average())
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="metald-bench-conns-"))
    daemon = start_daemon(tmp, UNKEY_METALD_NETWORK_ENABLED="false")
    try:
        asyncio.run(run(daemon, count, opening, rounds, settle, fig))
    finally:
        daemon.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    fig.load_before, fig.load_after = load, list(load_average())
    fig.seconds = time.monotonic() - started
    print(write_figure(fig))
    for row in fig.rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main()
