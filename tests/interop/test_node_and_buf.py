"""metald under clients written elsewhere: the official Connect client for Node
(@connectrpc/connect-node v2, code from @bufbuild/protoc-gen-es v2) over Connect
JSON/binary, gRPC and gRPC-Web on HTTP/1.1 and HTTP/2 with and without gzip, and
``buf curl`` with no schema (server reflection). The npm packages are installed
here, into build/interop-node, from tests/interop/node/package.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import RunningServer, make_settings, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "interop" / "node"
WORK = ROOT / "build" / "interop-node"


@pytest.fixture(scope="module")
def node_clients() -> Path:
    """npm install (once per package.json) and generate the code with buf + protoc-gen-es."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (make deps installs them)")
    WORK.mkdir(parents=True, exist_ok=True)
    manifest = (SOURCE / "package.json").read_bytes() + (SOURCE / "package-lock.json").read_bytes()
    stamp = WORK / ".installed"
    if not stamp.exists() or stamp.read_bytes() != manifest:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(SOURCE / name, WORK / name)
        command = ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        if os.environ.get("METALD_ISOLATED") == "1":
            # the registry is reached from the host's network namespace (see tests/isolated.sh); only this
            # command runs there, the clients themselves talk to loopback inside the private namespace
            command = ["nsenter", "--net=/run/metald/host-netns", *command]
        subprocess.run(command, cwd=WORK, check=True, timeout=600)
        stamp.write_bytes(manifest)
    for name in ("buf.gen.yaml", "client.mjs"):
        shutil.copy(SOURCE / name, WORK / name)
    shutil.rmtree(WORK / "gen", ignore_errors=True)
    subprocess.run([str(WORK / "node_modules/.bin/buf"), "generate", str(ROOT / "proto")], cwd=WORK, check=True,
                   timeout=300, env={**os.environ, "BUF_CACHE_DIR": str(WORK / ".buf-cache")})
    return WORK


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with serve_in_thread(make_settings(tmp_path, network_enabled=True), FakeBackend(), FakeNetwork()) as srv:
        yield srv


def test_connect_node_every_protocol(node_clients: Path, server: RunningServer) -> None:
    out = subprocess.run(["node", "client.mjs", server.url], cwd=node_clients, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert results[-1] == {"done": True}
    names = [r["name"] for r in results[:-1]]
    assert len(names) == 14 and "grpc h2 gzip" in names and "grpc-web h1.1" in names
    for r in results[:-1]:
        running, paused, shutdown = 2, 3, 4  # VmState numbers
        assert r["steps"] == [True, running, paused, running, True, True, True, shutdown, True], r
        assert (r["missing"], r["invalid"]) == ("NotFound", "InvalidArgument"), r
        assert r["neighbours"] == ["ok"] * 20, r
        assert r["oversize"] == "ResourceExhausted", r
        assert r["deadline"] in ("DeadlineExceeded", "ok"), r
        assert r["cancelled"] == "Canceled", r
        assert r["health"] == "SERVING", r
    assert server.store.all_vms() == []


def _buf(node_clients: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(node_clients / "node_modules/.bin/buf"), "curl", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "BUF_CACHE_DIR": str(node_clients / ".buf-cache")})


@pytest.mark.parametrize(
    "protocol,extra",
    [("connect", ["--http2-prior-knowledge"]), ("grpc", ["--http2-prior-knowledge"]),
     ("grpcweb", ["--http2-prior-knowledge"])],
)
def test_buf_curl_without_schema(  # reflection is a bidi stream: it needs HTTP/2
node_clients: Path, server: RunningServer, protocol: str, extra: list[str]) -> None:
    url = server.url + "/metal.vmprovisioner.v1.VmService/"
    listed = _buf(node_clients, "--protocol", protocol, *extra, "--list-methods", server.url)
    assert listed.returncode == 0, listed.stderr
    assert "metal.vmprovisioner.v1.VmService/CreateVm" in listed.stdout
    created = _buf(node_clients, "--protocol", protocol, *extra, "-d",
                   '{"vmId": "buf-1", "config": {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": "134217728"}}}',
                   url + "CreateVm")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["vmId"] == "buf-1"
    health = _buf(node_clients, "--protocol", protocol, *extra, server.url + "/grpc.health.v1.Health/Check")
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "SERVING", health.stderr
    missing = _buf(node_clients, "--protocol", protocol, *extra, "-d", '{"vmId": "nope"}', url + "GetVmInfo")
    assert missing.returncode != 0 and "not_found" in missing.stderr.replace("NotFound", "not_found")
