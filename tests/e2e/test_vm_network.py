"""The VM network with real guests: reachability, isolation, port forwards and
rate limits, inside the private network namespace of tests/isolated.sh.

The guest's /cgi-bin/probe?host=IP&port=N tells whether the guest can open a
TCP connection there; every target is an address of this test's own
namespaces (the bridge, the other VM).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.audit import assert_no_leaks, snapshot
from tests.support.daemon import DaemonProcess

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("net")]

MIB = 1 << 20
RATE = 1 * MIB  # bytes/s the limited guest may transmit


@pytest.fixture
def daemon(tmp_path: Path, require_isolated: None, require_image: Path) -> Iterator[DaemonProcess]:
    # Bind the API on every address so the test can show a guest cannot reach it.
    d = DaemonProcess(
        tmp_path,
        require_image,
        UNKEY_METALD_ADDRESS="0.0.0.0",
        UNKEY_METALD_ALLOW_INSECURE_BIND="true",
        UNKEY_METALD_JAILER_UID="61000",
        UNKEY_METALD_JAILER_GID="61000",
    )
    d.start()
    yield d
    d.kill_with_vmms()


def _listener(host: str) -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(8)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return srv, srv.getsockname()[1]


def _probe(ip: str, host: str, port: int) -> str:
    return httpx.get(f"http://{ip}:8080/cgi-bin/probe?host={host}&port={port}", timeout=20).text.strip()


def _throughput(url: str, seconds: float) -> float:
    received = 0
    started = time.monotonic()
    with httpx.stream("GET", url, timeout=30) as response:
        for chunk in response.iter_bytes(65536):
            received += len(chunk)
            if time.monotonic() - started > seconds:
                break
    return received / (time.monotonic() - started)


def test_network_with_real_guests(daemon: DaemonProcess) -> None:
    before = snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir)
    config = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(192 << 20)}}
    limited = {
        **config,
        "network": [
            {
                "id": "eth0",
                "txRateLimit": {"bandwidth": str(RATE), "burst": str(64 << 10)},
                "options": {"port_forwards": "8080/tcp"},
            }
        ],
    }
    daemon.rpc("CreateVm", {"vmId": "net-a", "config": limited})
    daemon.rpc("CreateVm", {"vmId": "net-b", "config": config})
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda vm: daemon.rpc("BootVm", {"vmId": vm}), ["net-a", "net-b"]))
    for vm in ("net-a", "net-b"):
        daemon.wait_console(vm, "METALD_GUEST_READY")
    a = daemon.rpc("GetVmInfo", {"vmId": "net-a"})["networkInfo"]
    b = daemon.rpc("GetVmInfo", {"vmId": "net-b"})["networkInfo"]
    assert a["ipAddress"] != b["ipAddress"] and a["gateway"] == b["gateway"] == "10.100.0.1"

    # the host reaches each guest's HTTP server at its IP
    assert httpx.get(f"http://{a['ipAddress']}:8080/", timeout=20).text.strip() == "net-a"
    assert httpx.get(f"http://{b['ipAddress']}:8080/", timeout=20).text.strip() == "net-b"

    # the guest reaches the gateway (a service the host runs on the bridge address)
    srv, port = _listener("10.100.0.1")
    try:
        assert _probe(a["ipAddress"], "10.100.0.1", port) == "open"
    finally:
        srv.close()

    # two VMs cannot reach each other
    assert _probe(a["ipAddress"], b["ipAddress"], 8080) == "closed"
    assert _probe(b["ipAddress"], a["ipAddress"], 8080) == "closed"

    # a guest cannot reach metald's API on the bridge address, though the host can
    with socket.create_connection(("10.100.0.1", daemon.port), timeout=5):
        pass
    assert _probe(a["ipAddress"], "10.100.0.1", daemon.port) == "closed"

    # a forwarded host port reaches the guest
    mappings = a["portMappings"]
    assert len(mappings) == 1 and mappings[0]["containerPort"] == 8080 and mappings[0]["protocol"] == "tcp"
    host_port = mappings[0]["hostPort"]
    assert httpx.get(f"http://127.0.0.1:{host_port}/", timeout=20).text.strip() == "net-a"
    assert httpx.get(f"http://10.100.0.1:{host_port}/", timeout=20).text.strip() == "net-a"

    # the rate-limited guest transmits near its limit; the other one is not limited
    limited_rate = _throughput(f"http://{a['ipAddress']}:8080/blob", 3.0)
    free_rate = _throughput(f"http://{b['ipAddress']}:8080/blob", 3.0)
    assert 0.5 * RATE < limited_rate < 1.3 * RATE, limited_rate
    assert free_rate > 2 * limited_rate, (free_rate, limited_rate)

    # counters in GetVmInfo come from the TAP
    stats = daemon.rpc("GetVmInfo", {"vmId": "net-a"})["metrics"]["networkStats"]
    assert int(stats["bytesTransmitted"]) > 1 * MIB

    for vm in ("net-a", "net-b"):
        daemon.rpc("DeleteVm", {"vmId": vm, "force": True})
    assert_no_leaks(before, snapshot(daemon.data_dir / "metald.db", daemon.run_dir, daemon.jail_dir))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{host_port}/", timeout=3)


def test_restart_changes_no_rule_and_no_device(daemon: DaemonProcess) -> None:
    """A restart of metald with a VM running leaves rules and devices as they were."""
    import subprocess

    daemon.rpc("CreateVm", {"vmId": "keep-net", "config": {"cpu": {"vcpuCount": 1},
                                                            "memory": {"sizeBytes": str(128 << 20)}}})
    daemon.rpc("BootVm", {"vmId": "keep-net"})
    daemon.wait_console("keep-net", "METALD_GUEST_READY")
    tap = daemon.rpc("GetVmInfo", {"vmId": "keep-net"})["networkInfo"]["tapDevice"]

    def state() -> tuple[str, str, str]:
        def run(*argv: str) -> str:
            return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

        # this VM's veth and the bridges (an earlier test's namespaces may still be going away)
        mine = ("vh_" + tap.removeprefix("tap_"), "br-vms", "lo")
        links = "\n".join(sorted(line.split(":", 2)[1] + line.split(":", 2)[2].split("link/")[0]
                                 for line in run("ip", "-o", "link").splitlines()
                                 if line.split(":", 2)[1].strip().split("@")[0].startswith(mine)))
        return links, run("nft", "-s", "list", "ruleset"), run("ip", "netns", "exec", "fc-keep-net", "ip", "-d", "link")

    before = state()
    assert "vh_" in before[0] and "br-vms" in before[0], before[0]
    assert daemon.stop() == 0
    daemon.start()
    assert daemon.state("keep-net") == "VM_STATE_RUNNING"
    assert state() == before
    ip = daemon.rpc("GetVmInfo", {"vmId": "keep-net"})["networkInfo"]["ipAddress"]
    assert httpx.get(f"http://{ip}:8080/", timeout=20).text.strip() == "keep-net"
    daemon.rpc("DeleteVm", {"vmId": "keep-net", "force": True})
