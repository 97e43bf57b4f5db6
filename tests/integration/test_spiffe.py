"""``spiffe`` mode against a local SPIFFE Workload API (a gRPC ``SpiffeWorkloadAPI``
on a unix socket, built from py-spiffe's generated stubs): the SVID and bundle
serve mTLS, rotations are picked up without a restart, and without an agent
metald refuses to start."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from metald.api.tls import TlsError, open_tls
from metald.config import Settings
from metald.daemon import run
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.gen.metal.vmprovisioner.v1 import vm_pb2_grpc
from tests.support.fakes import FakeBackend
from tests.support.server import RunningServer, make_settings, serve_in_thread
from tests.unit.test_tls import handshake
from tests.unit.test_tls_identity import Ca, Leaf

TD = "spiffe://metald.test"
ACME = f"{TD}/customer/acme"
SVC = "/metal.vmprovisioner.v1.VmService/"
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}
DER = serialization.Encoding.DER


class FakeAgent(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """FetchX509SVID: each stream gets the latest X509SVIDResponse, then every one pushed later."""

    def __init__(self, socket: Path) -> None:
        self.responses: list[workload_pb2.X509SVIDResponse] = []
        self.cond = threading.Condition()
        self.streams = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix:{socket}")
        self.server.start()

    def push(self, svid: Leaf, spiffe_id: str, *cas: Ca) -> None:
        key = svid.key.private_bytes(DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        response = workload_pb2.X509SVIDResponse(svids=[workload_pb2.X509SVID(
            spiffe_id=spiffe_id,
            x509_svid=svid.cert.public_bytes(DER),
            x509_svid_key=key,
            bundle=b"".join(ca.cert.public_bytes(DER) for ca in cas),
        )])
        with self.cond:
            self.responses.append(response)
            self.cond.notify_all()

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        if ("workload.spiffe.io", "true") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        self.streams += 1
        sent = max(len(self.responses) - 1, 0)
        while context.is_active():
            with self.cond:
                self.cond.wait(timeout=0.1)  # a push notifies; the timeout notices cancelled streams
                pending = self.responses[sent:]
            for response in pending:
                yield response
                sent += 1

    def stop(self) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    path = tmp_path / "agent.sock"
    assert len(str(path)) < 100, "unix socket path too long"
    return path


@pytest.fixture
def agent(socket_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(socket_path)
    yield fake
    fake.stop()


def spiffe_settings(tmp: Path, socket: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "tls_mode": "spiffe",
        "spiffe_socket": f"unix://{socket}",
        "spiffe_timeout_seconds": 5,
        "spiffe_allowed_ids": f"{TD}/customer/*",
        "tls_reload_seconds": 0.2,
    }
    values.update(overrides)
    return make_settings(tmp, **values)


def client(tmp: Path, ca: Ca, leaf: Leaf | None, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.pem.decode())
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if leaf is not None:
        ctx.load_cert_chain(*leaf.write(tmp, f"client-{leaf.serial:x}"))
    return ctx


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def list_over_grpc(srv: RunningServer, ca: Ca, leaf: Leaf) -> list[str]:
    creds = grpc.ssl_channel_credentials(ca.pem, leaf.key_pem, leaf.cert_pem)
    with grpc.secure_channel(f"127.0.0.1:{srv.port}", creds) as channel:
        return [v.vm_id for v in vm_pb2_grpc.VmServiceStub(channel).ListVms(pb.ListVmsRequest(), timeout=10).vms]


def test_svid_serves_mtls_and_rotates(tmp_path: Path, socket_path: Path, agent: FakeAgent) -> None:
    ca = Ca("metald.test SPIRE CA")
    svid = ca.issue(f"{TD}/metald", server=True)
    agent.push(svid, f"{TD}/metald", ca)
    settings = spiffe_settings(tmp_path, socket_path)
    acme_leaf = ca.issue(ACME)
    acme = client(tmp_path, ca, acme_leaf)
    with serve_in_thread(settings, FakeBackend(), tls=True) as srv:
        assert srv.tls.spiffe_id == f"{TD}/metald" and srv.tls.policy.trust_domain == "metald.test"
        r = httpx.post(srv.url + SVC + "CreateVm", json={"vmId": "acme-1", "config": CONFIG}, verify=acme, timeout=10)
        assert r.status_code == 200, r.text
        assert srv.store.get_vm("acme-1").customer_id == "acme"
        assert list_over_grpc(srv, ca, acme_leaf) == ["acme-1"]
        assert handshake(srv.port, acme)[0].serial_number == svid.serial

        other_td = client(tmp_path, ca, ca.issue("spiffe://other.test/customer/acme"))
        r = httpx.post(srv.url + SVC + "ListVms", json={}, verify=other_td, timeout=10)
        assert r.json()["code"] == "unauthenticated"
        not_allowed = client(tmp_path, ca, ca.issue(f"{TD}/ops/console"))
        r = httpx.post(srv.url + SVC + "ListVms", json={}, verify=not_allowed, timeout=10)
        assert r.json()["code"] == "permission_denied"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(srv.port, client(tmp_path, ca, None, tls12=True))

        # the agent rotates the SVID: new connections get it, no restart
        rotated = ca.issue(f"{TD}/metald", server=True)
        agent.push(rotated, f"{TD}/metald", ca)
        wait_for(lambda: handshake(srv.port, acme)[0].serial_number == rotated.serial)

        # and the trust bundle (a new CA): the old CA's clients are refused from now on
        new_ca = Ca("metald.test SPIRE CA 2")
        new_svid = new_ca.issue(f"{TD}/metald", server=True)
        agent.push(new_svid, f"{TD}/metald", new_ca)
        wait_for(lambda: srv.tls.serial == new_svid.serial)
        new_acme = new_ca.issue(ACME)
        assert handshake(srv.port, client(tmp_path, new_ca, new_acme))[0].serial_number == new_svid.serial
        assert list_over_grpc(srv, new_ca, new_acme) == ["acme-1"]
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(srv.port, client(tmp_path, new_ca, acme_leaf, tls12=True))


def test_missing_socket_stops_startup(tmp_path: Path) -> None:
    settings = spiffe_settings(tmp_path, tmp_path / "no-agent.sock")
    with pytest.raises(TlsError) as info:
        asyncio.run(run(settings))  # the daemon's own serve path
    message = str(info.value)
    assert "no-agent.sock does not exist" in message and "UNKEY_METALD_SPIFFE_SOCKET" in message
    assert "without TLS" in message
    assert not settings.db_path.exists()  # refused before touching state


def test_no_svid_in_time_stops_startup(tmp_path: Path, socket_path: Path, agent: FakeAgent) -> None:
    settings = spiffe_settings(tmp_path, socket_path, spiffe_timeout_seconds=1)
    started = time.monotonic()
    with pytest.raises(TlsError, match="no X.509 SVID from the SPIRE agent"):
        asyncio.run(open_tls(settings))
    assert time.monotonic() - started < 5 and agent.streams >= 1


def test_trust_domain_setting_must_match_the_svid(tmp_path: Path, socket_path: Path, agent: FakeAgent) -> None:
    ca = Ca("metald.test SPIRE CA")
    agent.push(ca.issue(f"{TD}/metald", server=True), f"{TD}/metald", ca)
    settings = spiffe_settings(tmp_path, socket_path, spiffe_trust_domain="prod.test")
    with pytest.raises(TlsError, match="not UNKEY_METALD_SPIFFE_TRUST_DOMAIN=prod.test"):
        asyncio.run(open_tls(settings))
