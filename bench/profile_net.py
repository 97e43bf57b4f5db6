"""Where one VM's network set-up and teardown spend their time: py-spy
samples a loop of set-ups and teardowns with metald's NetworkManager (all
threads: the event loop, the namespace pool, the nft and reaper threads) and
this module summarises the samples by function.

Sizes: METALD_BENCH_PROFILE_CYCLES (300). Skipped when py-spy is missing
(``pip install py-spy``; it is in the dev extras).
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Figure, command_line, env_int, load_average, require_isolated, write_figure

IDLE_LEAVES = ("_worker (concurrent/futures/thread.py", "select (selectors.py", "wait (threading.py")


async def _loop(cycles: int) -> None:
    from bench.network import Metald, reset_host

    tmp = Path(tempfile.mkdtemp(prefix="metald-bench-prof-"))
    reset_host()
    metald = Metald(tmp)
    await metald.manager.setup_host()
    for i in range(cycles):
        vm_id = f"prof-{i}"
        alloc = await metald.up(vm_id)
        await metald.down(vm_id, alloc)
    reset_host()
    shutil.rmtree(tmp, ignore_errors=True)


def _name(frame: str) -> str:
    """'func (path/file.py:12)' -> 'func (file.py)'"""
    if " (" not in frame:
        return frame
    func, where = frame.split(" (", 1)
    path = where.rsplit(":", 1)[0].rstrip(")")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if parts[-2:-1] in (["network"], ["core"], ["store"]) else parts[-1]
    return f"{func} ({short})"


def _idle(frame: str) -> bool:
    """A leaf frame where a thread waits (``select``, ``Condition.wait``, a pool
    worker's queue): with or without the class name py-spy may print."""
    function, _, where = frame.partition(" (")
    for idle in IDLE_LEAVES:
        name, _, place = idle.partition(" (")
        if function.rsplit(".", 1)[-1] == name and where.startswith(place):
            return True
    return False


def summarise(raw: Path, top: int = 14) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if _idle(frames[-1]):
            continue
        n = int(count)
        busy += n
        leaf[_name(frames[-1])] += n
        seen = set()
        for frame in frames:
            name = _name(frame)
            if name not in seen and ("metald" in frame or "bench/" in frame):
                inclusive[name] += n
                seen.add(name)
    skip = ("_loop", "main", "<module>", "run")
    inc = [(k, v) for k, v in inclusive.most_common(top + 8) if k.split(" (")[0] not in skip][:top]
    return busy, inc, leaf.most_common(top)


def main() -> None:
    require_isolated()
    cycles = env_int("METALD_BENCH_PROFILE_CYCLES", 300)
    if "--loop" in sys.argv:
        asyncio.run(_loop(cycles))
        return
    fig = Figure("profile", "Profile of one VM's network set-up + teardown (py-spy, all threads)",
                 command_line("METALD_BENCH_PROFILE_CYCLES"),
                 ["function (inclusive, metald code)", "share of busy samples"], load_before=list(load_average()))
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        fig.notes.append("skipped: py-spy is not installed (pip install py-spy)")
        print(write_figure(fig))
        return
    started = time.monotonic()
    raw = Path(tempfile.mkdtemp(prefix="metald-bench-spy-")) / "samples.txt"
    proc = subprocess.run(
        [spy, "record", "-r", "400", "-f", "raw", "-o", str(raw), "--", sys.executable, "-m", "bench.profile_net",
         "--loop"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0 or not raw.exists():
        fig.notes.append(f"py-spy failed: {proc.stderr.strip()[-500:]}")
        print(write_figure(fig))
        return
    busy, inclusive, leaves = summarise(raw)
    for name, n in inclusive:
        fig.rows.append([name, f"{100 * n / busy:.1f}%"])
    lines = ["| leaf function (self time) | share |", "|---|---|"]
    lines += [f"| {name} | {100 * n / busy:.1f}% |" for name, n in leaves]
    fig.extra["self_markdown"] = "\n".join(lines)
    fig.notes.append(f"{cycles} set-up + teardown cycles, {busy} busy samples at 400 Hz (idle waits excluded); "
                     "interpreter start-up and imports are in the samples too.")
    fig.load_after = list(load_average())
    fig.seconds = time.monotonic() - started
    print(write_figure(fig))


if __name__ == "__main__":
    main()
