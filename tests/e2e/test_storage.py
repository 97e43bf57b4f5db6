"""A full, read-only or damaged data directory, on a real small file system.

The daemon's data directory is a 4 MiB tmpfs mounted inside the test's private
mount namespace (tests/isolated.sh) and filled up; Prometheus metrics are on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.audit import vmm_processes_of
from tests.support.daemon import METALD, DaemonProcess, RpcError
from tests.support.server import free_port

pytestmark = [pytest.mark.xdist_group("net")]

CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
JAIL_UID = "61000"


def _mount_small(path: Path, size: str = "4m", ro: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0750" + (",ro" if ro else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "metald-test-data", str(path)], check=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _fill(directory: Path) -> Path:
    """Fill the file system holding ``directory``; return the filler file."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(b"\xff" * 65536)
            f.flush()
    with contextlib.suppress(OSError), (directory / "filler-small").open("wb") as f:
        while True:  # the last few blocks
            f.write(b"\xff" * 512)
            f.flush()
    return filler


@pytest.fixture
def daemon(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, require_image, UNKEY_METALD_NETWORK_ENABLED="false",
                      UNKEY_METALD_JAILER_UID=JAIL_UID, UNKEY_METALD_JAILER_GID=JAIL_UID,
                      UNKEY_METALD_OTEL_ENABLED="true", UNKEY_METALD_OTEL_PROMETHEUS_PORT=str(free_port()),
                      UNKEY_METALD_OTEL_SAMPLING_RATE="0")
    _mount_small(d.data_dir)
    try:
        yield d
    finally:
        d.kill_with_vmms()
        for pid, _ in vmm_processes_of(d.run_dir):
            os.kill(pid, signal.SIGKILL)
        _umount(d.data_dir)


def _health(d: DaemonProcess) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = d.http.get(d.url + "/_/health")
    return r.status_code, r.json()


def _metric(d: DaemonProcess, name: str) -> float:
    port = d.env["UNKEY_METALD_OTEL_PROMETHEUS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.vm
def test_disk_full_is_unavailable_and_heals_by_itself(daemon: DaemonProcess) -> None:
    d = daemon
    d.start()
    d.rpc("CreateVm", {"vmId": "st-run", "config": CONFIG})
    d.rpc("BootVm", {"vmId": "st-run"})
    d.rpc("CreateVm", {"vmId": "st-created", "config": CONFIG})
    d.rpc("CreateVm", {"vmId": "st-shut", "config": CONFIG})
    assert _health(d)[0] == 200

    filler = _fill(d.data_dir)
    calls = [
        ("CreateVm", {"vmId": "st-new", "config": CONFIG}),
        ("BootVm", {"vmId": "st-created"}),
        ("PauseVm", {"vmId": "st-run"}),
        ("ShutdownVm", {"vmId": "st-run", "force": True}),
        ("DeleteVm", {"vmId": "st-shut"}),
    ]
    for method, body in calls:
        with pytest.raises(RpcError) as err:
            d.rpc(method, body)
        assert err.value.code == "unavailable", (method, str(err.value))
        assert "storage is full" in str(err.value) and "UNKEY_METALD_DATA_DIR" in str(err.value), str(err.value)
    status, body = _health(d)
    assert status == 503 and body["checks"]["store"]["ok"] is False
    assert "storage is full" in body["checks"]["store"]["detail"]
    assert _metric(d, 'metald_storage_errors_total{kind="full"}') >= len(calls)
    assert "Traceback" not in d.log.read_text()

    # space returns: service resumes with no restart
    filler.unlink()
    (d.data_dir / "filler-small").unlink()
    deadline = time.monotonic() + 30
    while _health(d)[0] != 200:
        assert time.monotonic() < deadline, _health(d)
        time.sleep(0.2)
    d.rpc("CreateVm", {"vmId": "st-new", "config": CONFIG})
    for vm in ("st-new", "st-created", "st-shut", "st-run"):
        d.rpc("DeleteVm", {"vmId": vm, "force": True})
    assert int(d.rpc("ListVms", {}).get("totalCount", 0)) == 0


def _serve_fails(d: DaemonProcess) -> str:
    out = subprocess.run([*METALD, "serve"], env=d.env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    return out.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_database_stops_metald_with_one_line(tmp_path: Path, require_isolated: None, damage: str) -> None:
    d = DaemonProcess(tmp_path, None, UNKEY_METALD_NETWORK_ENABLED="false", UNKEY_METALD_BACKEND="qemu")
    d.data_dir.mkdir(parents=True)
    db = d.data_dir / "metald.db"
    if damage == "garbage":
        db.write_bytes(os.urandom(20000))
    else:
        import sqlite3

        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE vms (x TEXT)")
            conn.executemany("INSERT INTO vms VALUES (?)", [("x" * 500,)] * 200)
        conn.close()
        db.write_bytes(db.read_bytes()[: 3 * 4096 + 100])
    err = _serve_fails(d)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(db) in lines[0] and "UNKEY_METALD_DATA_DIR" in lines[0] and "backup" in lines[0], err
    assert "Traceback" not in err


def test_unwritable_data_dir_stops_metald_with_one_line(tmp_path: Path, require_isolated: None) -> None:
    d = DaemonProcess(tmp_path, None, UNKEY_METALD_NETWORK_ENABLED="false", UNKEY_METALD_BACKEND="qemu")
    _mount_small(d.data_dir, ro=True)
    try:
        err = _serve_fails(d)
    finally:
        _umount(d.data_dir)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "read-only" in lines[0] and "UNKEY_METALD_DATA_DIR" in lines[0] and str(d.data_dir) in lines[0], err
    assert sys.executable  # (the CLI ran under this interpreter)
