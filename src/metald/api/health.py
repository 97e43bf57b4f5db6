"""``GET /_/health`` and ``GET /health``: JSON status with per-component checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from metald import __version__

Check = Callable[[], Awaitable[tuple[bool, str]]]
CHECK_TIMEOUT_S = 2.0


class Health:
    def __init__(self, checks: dict[str, Check], backend_name: str, advisory: frozenset[str] = frozenset()) -> None:
        self.checks = checks
        # checks whose failure makes the status "degraded" (HTTP 200) rather than "unhealthy" (503)
        self.advisory = advisory
        self.backend_name = backend_name
        self.started = time.monotonic()

    async def report(self) -> tuple[int, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}

        async def run(name: str, check: Check) -> None:
            try:
                ok, detail = await asyncio.wait_for(check(), timeout=CHECK_TIMEOUT_S)
            except TimeoutError:
                ok, detail = False, f"no answer within {CHECK_TIMEOUT_S:g}s"
            except Exception as exc:  # a failing check is a finding, not a crash
                ok, detail = False, f"{type(exc).__name__}: {exc}" if str(exc).strip() else type(exc).__name__
            results[name] = {"ok": ok, "detail": detail}

        await asyncio.gather(*(run(n, c) for n, c in self.checks.items()))
        healthy = all(r["ok"] for n, r in results.items() if n not in self.advisory)
        degraded = healthy and not all(r["ok"] for r in results.values())
        body = {
            "status": "degraded" if degraded else "ok" if healthy else "unhealthy",
            "service": "metald",
            "version": __version__,
            "uptime_seconds": int(time.monotonic() - self.started),
            "backend": self.backend_name,
            "checks": dict(sorted(results.items())),
        }
        return (200 if healthy else 503), body
