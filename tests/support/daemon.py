"""A real `metald serve` process for integration and end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.server import free_port

METALD = [sys.executable, "-m", "metald.cli.main"]
SVC = "/metal.vmprovisioner.v1.VmService/"


class RpcError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class DaemonProcess:
    """metald with its state in ``tmp``; settings come from ``extra_env``."""

    def __init__(self, tmp: Path, image_dir: Path | None = None, **extra_env: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp / "data"
        self.run_dir = tmp / "run"
        self.jail_dir = tmp / "jail"
        self.log = tmp / "metald.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_METALD_")}
        env.update(
            METALD_ENV_FILE=str(tmp / "none.env"),
            UNKEY_METALD_PORT=str(self.port),
            UNKEY_METALD_DATA_DIR=str(self.data_dir),
            UNKEY_METALD_RUN_DIR=str(self.run_dir),
            UNKEY_METALD_JAILER_CHROOT_DIR=str(self.jail_dir),
            # each test daemon sweeps only its own cgroups (the tree is host-wide)
            UNKEY_METALD_JAILER_CGROUP_PARENT=f"metald-test-{os.getpid()}-{self.port}",
            UNKEY_METALD_BACKEND="qemu",
            UNKEY_METALD_OTEL_ENABLED="false",
            METALD_SERVER=self.url,
        )
        if image_dir is not None:
            env["UNKEY_METALD_IMAGE_DIR"] = str(image_dir)
        env.update(extra_env)
        self.env = env
        self.cgroup_parent = env["UNKEY_METALD_JAILER_CGROUP_PARENT"]
        (tmp / "cgroup-parent").write_text(self.cgroup_parent)  # read by tests.support.audit
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(timeout=180)

    def start(self, timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            [*METALD, "serve"], env=self.env, stdout=subprocess.DEVNULL, stderr=self.log.open("ab"),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.http.get(self.url + "/_/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError("metald exited:\n" + self.log.read_text()[-4000:])
            time.sleep(0.1)
        raise AssertionError("metald did not become healthy:\n" + self.log.read_text()[-4000:])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def kill_with_vmms(self) -> None:
        """Kill metald and every VMM it started (a test's last word, pass or fail)."""
        import os

        from tests.support.audit import vmm_processes_of

        self.kill()
        for pid, _ in vmm_processes_of(self.run_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def rpc(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(self.url + SVC + method, json=body)
        data = r.json()
        if r.status_code != 200:
            raise RpcError(data.get("code", str(r.status_code)), data.get("message", ""))
        return data

    def state(self, vm_id: str) -> str:
        return self.rpc("GetVmInfo", {"vmId": vm_id})["state"]

    def wait_state(self, vm_id: str, state: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(vm_id) == state:
                return
            time.sleep(0.1)
        raise AssertionError(f"{vm_id} not {state}: {self.rpc('GetVmInfo', {'vmId': vm_id})}")

    def console(self, vm_id: str) -> str:
        path = self.run_dir / vm_id / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_console(self, vm_id: str, marker: str, count: int = 1, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console(vm_id)
            if text.count(marker) >= count:
                return text
            time.sleep(0.2)
        raise AssertionError(f"{vm_id}: {marker!r} x{count} not seen; console tail:\n{self.console(vm_id)[-3000:]}")

    def all_log_records(self) -> list[dict[str, Any]]:
        """Every JSON line: metald's records ("msg") and the HTTP server's own ("event")."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def log_records(self) -> list[dict[str, Any]]:
        """metald's own records."""
        return [r for r in self.all_log_records() if "msg" in r]
