"""The real `metald serve` process driven by the `metald vm` CLI.

No guest is booted here (tests/e2e does that); this checks the daemon's
start-up, the CLI's output and exit codes, SIGTERM handling, a restart with
state intact, and that an invalid setting stops metald naming the variable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.server import free_port

METALD = [sys.executable, "-m", "metald.cli.main"]


def _env(tmp: Path, port: int, **extra: str) -> dict[str, str]:
    image = tmp / "image"
    image.mkdir(exist_ok=True)
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        (image / name).write_bytes(b"placeholder")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_METALD_")}
    env.update(
        METALD_ENV_FILE=str(tmp / "none.env"),
        UNKEY_METALD_PORT=str(port),
        UNKEY_METALD_DATA_DIR=str(tmp / "data"),
        UNKEY_METALD_RUN_DIR=str(tmp / "run"),
        UNKEY_METALD_IMAGE_DIR=str(image),
        UNKEY_METALD_BACKEND="qemu",
        UNKEY_METALD_NETWORK_ENABLED="false",
        UNKEY_METALD_JAILER_ENABLED="false",
        UNKEY_METALD_OTEL_ENABLED="false",
        METALD_SERVER=f"http://127.0.0.1:{port}",
    )
    env.update(extra)
    return env


class Daemon:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.env = _env(tmp, self.port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "metald.log"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*METALD, "serve"], env=self.env, stdout=subprocess.DEVNULL, stderr=self.log.open("ab")
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/_/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError("metald did not become healthy:\n" + self.log.read_text())

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*METALD, "vm", *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    d.start()
    yield d
    if d.proc and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def test_cli_against_real_daemon(daemon: Daemon) -> None:
    out = daemon.cli("create", "--id", "cli-1", "--memory", "128M", "--meta", "team=edge", "--customer", "c-9")
    assert out.stdout.split() == ["cli-1", "CREATED"]
    created = json.loads(daemon.cli("--json", "create", "--memory", "128M").stdout)
    assert created["vmId"].startswith("vm-") and created["state"] == "VM_STATE_CREATED"

    listed = daemon.cli("list").stdout
    assert "cli-1" in listed and created["vmId"] in listed and "2 of 2" in listed
    data = json.loads(daemon.cli("--json", "list", "--state", "created").stdout)
    assert data["totalCount"] == 2

    info = json.loads(daemon.cli("--json", "info", "cli-1").stdout)
    assert info["config"]["metadata"] == {"team": "edge"} and info["state"] == "VM_STATE_CREATED"
    table = daemon.cli("info", "cli-1").stdout
    assert "state" in table and "CREATED" in table and "backend.metrics_measured" in table

    bad = daemon.cli("pause", "cli-1", check=False)
    assert bad.returncode == 1 and "failed_precondition" in bad.stderr and "CREATED" in bad.stderr
    bad = daemon.cli("create", "--id", "bad id", check=False)
    assert bad.returncode == 1 and "invalid_argument: vm_id" in bad.stderr
    missing = daemon.cli("info", "nope", check=False)
    assert missing.returncode == 1 and "not_found" in missing.stderr

    assert daemon.cli("delete", "cli-1").stdout.split() == ["cli-1", "deleted"]
    assert "1 of 1" in daemon.cli("list").stdout


def test_restart_keeps_state_and_sigterm_is_clean(daemon: Daemon) -> None:
    daemon.cli("create", "--id", "keep-me", "--memory", "128M")
    assert daemon.stop() == 0
    log = daemon.log.read_text().splitlines()
    parsed = [json.loads(line) for line in log if line.startswith("{")]
    records = [r for r in parsed if "msg" in r]  # metald's; the HTTP server's own lines carry "event" (docs/api.md)
    assert all({"level", "event"} <= r.keys() for r in parsed if "msg" not in r)
    assert any(r["msg"] == "stopping: VMs keep running" for r in records)
    assert all({"vm_id", "operation", "level", "ts"} <= r.keys() for r in records)
    created = [r for r in records if r["msg"] == "operation done" and r["operation"] == "create"]
    assert created and created[0]["vm_id"] == "keep-me"
    daemon.start()
    assert "keep-me" in daemon.cli("list").stdout


def test_unreachable_server() -> None:
    result = subprocess.run(
        [*METALD, "vm", "--server", f"http://127.0.0.1:{free_port()}", "list"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and "error" in result.stderr


def test_invalid_setting_stops_metald(tmp_path: Path) -> None:
    env = _env(tmp_path, free_port(), UNKEY_METALD_PORT="99999")
    result = subprocess.run([*METALD, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "UNKEY_METALD_PORT" in result.stderr
