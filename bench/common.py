"""Shared helpers of the benchmarks: statistics, the machine, results files,
environment sizes, and a real ``metald serve`` for the API figures."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = Path(os.environ.get("METALD_BENCH_OUT", ROOT / "bench" / "out"))
IMAGE_DIR = Path(os.environ.get("UNKEY_METALD_IMAGE_DIR", ROOT / "build" / "image"))


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def env_ints(name: str, default: Sequence[int]) -> list[int]:
    value = os.environ.get(name, "")
    return [int(x) for x in value.split(",") if x.strip()] if value.strip() else list(default)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


def require_isolated() -> None:
    if os.environ.get("METALD_ISOLATED") != "1" or os.geteuid() != 0:
        sys.exit("benchmarks create namespaces, links and rules: run them as root inside tests/isolated.sh")


# --- statistics --------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of ``samples``."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Dist:
    """A latency distribution in milliseconds."""

    n: int
    median: float
    p95: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of_seconds(cls, samples: Sequence[float]) -> Dist:
        ms = [s * 1000 for s in samples]
        if not ms:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(len(ms), percentile(ms, 50), percentile(ms, 95), percentile(ms, 99), sum(ms) / len(ms), max(ms))

    def short(self) -> str:
        return f"{self.median:.2f} / {self.p95:.2f} / {self.p99:.2f}"


# --- the machine -------------------------------------------------------------------


def meminfo_mib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    return 0


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "memory_mib": meminfo_mib("MemTotal"),
        "load_average": [round(x, 2) for x in load_average()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


# --- results -----------------------------------------------------------------------


@dataclass
class Figure:
    """One figure of RESULTS.md: a table plus what produced it."""

    key: str
    title: str
    command: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)  # {"what", "target", "measured", "met"}
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def target(self, what: str, target: str, measured: str, met: bool) -> None:
        self.targets.append({"what": what, "target": target, "measured": measured, "met": met})


def command_line(*variables: str) -> str:
    """How this figure's process was started (for RESULTS.md), with the size
    variables given (those set in the environment) in front."""
    argv = [".venv/bin/python"]
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        argv += ["-m", spec.name]
    else:
        argv.append(sys.argv[0])
    argv += sys.argv[1:]
    names = variables or tuple(k for k in os.environ if k.startswith("METALD_BENCH_"))
    sizes = " ".join(f"{k}={os.environ[k]}" for k in sorted(names) if k in os.environ)
    return f"{sizes} tests/isolated.sh {shlex.join(argv)}".strip()


def write_figure(fig: Figure) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{fig.key}.json"
    path.write_text(json.dumps(asdict(fig), indent=2))
    return path


def fmt_ratio(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.1f}x"


# --- a real metald serve -------------------------------------------------------------



def start_daemon(tmp: Path, timeout: float = 120, **extra_env: str) -> Any:
    """A started ``metald serve`` (tests.support.daemon.DaemonProcess) with the
    QEMU backend and the jailer on; ``.start_seconds`` is spawn-to-healthy."""
    sys.path.insert(0, str(ROOT))
    from tests.support.daemon import METALD, DaemonProcess

    class BenchDaemon(DaemonProcess):
        start_seconds = 0.0

        def start(self, timeout: float = 120) -> None:
            import httpx

            started = time.monotonic()
            self.proc = subprocess.Popen(
                [*METALD, "serve"], env=self.env, stdout=subprocess.DEVNULL,
                stderr=self.log.open("ab"), start_new_session=True,
            )
            deadline = started + timeout
            while time.monotonic() < deadline:
                try:
                    if self.http.get(self.url + "/_/health", timeout=1).status_code == 200:
                        self.start_seconds = time.monotonic() - started
                        return
                except httpx.HTTPError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError("metald exited:\n" + self.log.read_text()[-4000:])
                time.sleep(0.02)
            raise RuntimeError("metald did not become healthy:\n" + self.log.read_text()[-4000:])

        def stop_gracefully(self) -> int:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(120)

    env = {
        "UNKEY_METALD_JAILER_UID": "61000",
        "UNKEY_METALD_JAILER_GID": "61000",
    }
    env.update(extra_env)
    daemon = BenchDaemon(tmp, IMAGE_DIR if (IMAGE_DIR / "vmlinuz").exists() else None, **env)
    daemon.start(timeout)
    return daemon
