"""``file`` mode mTLS against the real server on loopback: client certificates
required and checked, SPIFFE IDs as callers (Connect and gRPC), tenancy by
certificate, and certificate files reloaded without a restart."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509

from metald.api.tls import TlsError, open_tls
from metald.config import Settings
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.gen.metal.vmprovisioner.v1 import vm_pb2_grpc
from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import RunningServer, make_settings, serve_in_thread
from tests.unit.test_tls_identity import Ca, Leaf

TD = "spiffe://metald.test"
ACME = f"{TD}/customer/acme"
GLOBEX = f"{TD}/customer/globex"
OPERATOR = f"{TD}/ops/console"
SVC = "/metal.vmprovisioner.v1.VmService/"
CONFIG = {"cpu": {"vcpuCount": 1}, "memory": {"sizeBytes": str(128 << 20)}}


@dataclass
class Pki:
    dir: Path
    ca: Ca
    evil_ca: Ca
    server: Leaf
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client(self, leaf: Leaf | None, ca_pem: bytes | None = None, tls12: bool = False) -> ssl.SSLContext:
        """A client context presenting leaf (None: no certificate) and trusting the server's CA."""
        ctx = ssl.create_default_context(cadata=(ca_pem or self.ca.pem).decode())
        if tls12:  # client certificate checked inside the handshake (TLS 1.3 reports it on first read)
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if leaf is not None:
            ctx.load_cert_chain(*leaf.write(self.dir, f"client-{leaf.serial:x}"))
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, evil = Ca("metald.test CA"), Ca("evil.test CA")
    server = ca.issue(f"{TD}/metald", server=True)
    crt, key = server.write(d, "server")
    ca_file = d / "ca.pem"
    ca_file.write_bytes(ca.pem)
    return Pki(d, ca, evil, server, ca_file, crt, key)


def tls_settings(tmp: Path, pki: Pki, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "tls_mode": "file",
        "tls_cert_file": pki.cert_file,
        "tls_key_file": pki.key_file,
        "tls_ca_file": pki.ca_file,
        "tls_reload_seconds": 0.05,
        "spiffe_trust_domain": "metald.test",
        "spiffe_allowed_ids": f"{TD}/customer/*,{OPERATOR}",
        "operator_ids": OPERATOR,
        "network_enabled": True,
    }
    values.update(overrides)
    return make_settings(tmp, **values)


@pytest.fixture
def server(tmp_path: Path, pki: Pki) -> Iterator[RunningServer]:
    with serve_in_thread(tls_settings(tmp_path, pki), FakeBackend(), FakeNetwork(), tls=True) as srv:
        yield srv


def connect(srv: RunningServer, ctx: ssl.SSLContext, method: str, body: dict[str, object]) -> httpx.Response:
    with httpx.Client(verify=ctx, timeout=10) as http:
        return http.post(srv.url + SVC + method, json=body)


def grpc_stub(srv: RunningServer, pki: Pki, leaf: Leaf) -> tuple[grpc.Channel, vm_pb2_grpc.VmServiceStub]:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.pem, private_key=leaf.key_pem,
                                         certificate_chain=leaf.cert_pem)
    channel = grpc.secure_channel(f"127.0.0.1:{srv.port}", creds)
    return channel, vm_pb2_grpc.VmServiceStub(channel)


def handshake(port: int, ctx: ssl.SSLContext) -> tuple[x509.Certificate, str | None]:
    """TLS handshake, then one HTTP/1.1 request: (the server's certificate, ALPN)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        alpn = tls.selected_alpn_protocol()
        tls.sendall(b"GET /_/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert tls.recv(12).startswith(b"HTTP/1.1"), "server dropped the connection"
    assert der is not None
    return x509.load_der_x509_certificate(der), alpn


def refused(srv: RunningServer, pki: Pki, leaf: Leaf | None, ca_pem: bytes | None = None) -> None:
    """The handshake fails (TLS 1.2), and so does a request (TLS 1.3), health check included."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(srv.port, pki.client(leaf, ca_pem, tls12=True))
    with pytest.raises(httpx.TransportError):
        with httpx.Client(verify=pki.client(leaf, ca_pem), timeout=10) as http:
            http.get(srv.url + "/_/health")


def test_valid_svid_over_connect_and_grpc(server: RunningServer, pki: Pki) -> None:
    acme = pki.ca.issue(ACME)
    r = connect(server, pki.client(acme), "CreateVm", {"vmId": "acme-1", "config": CONFIG})
    assert r.status_code == 200, r.text
    assert server.store.get_vm("acme-1").customer_id == "acme"  # the certificate's identity owns it

    channel, stub = grpc_stub(server, pki, acme)
    with channel:
        listed = stub.ListVms(pb.ListVmsRequest(), timeout=10)
        assert [v.vm_id for v in listed.vms] == ["acme-1"]
        stub.CreateVm(pb.CreateVmRequest(vm_id="acme-2", config=pb.VmConfig(
            cpu=pb.CpuConfig(vcpu_count=1), memory=pb.MemoryConfig(size_bytes=128 << 20))), timeout=10)
    assert server.store.get_vm("acme-2").customer_id == "acme"

    cert, alpn = handshake(server.port, pki.client(acme))
    assert cert.serial_number == pki.server.serial and alpn is None  # no ALPN offered: HTTP/1.1
    with httpx.Client(verify=pki.client(acme), http2=True, timeout=10) as http:
        r = http.get(server.url + "/_/health")  # health needs a client certificate too, any valid one
        assert r.status_code == 200 and r.http_version == "HTTP/2"


def test_handshake_fails_without_a_valid_client_certificate(server: RunningServer, pki: Pki) -> None:
    refused(server, pki, None)
    refused(server, pki, pki.ca.issue(ACME, expired=True))
    refused(server, pki, pki.evil_ca.issue(ACME))  # right ID, other CA
    refused(server, pki, pki.evil_ca.issue("spiffe://evil.test/customer/acme"))
    # gRPC as well
    channel, stub = grpc_stub(server, pki, pki.evil_ca.issue(ACME))
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.ListVms(pb.ListVmsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_identity_checks(server: RunningServer, pki: Pki, capfd: pytest.CaptureFixture[str],
                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cases = [
        (pki.ca.issue("spiffe://other.test/customer/acme"), "unauthenticated", grpc.StatusCode.UNAUTHENTICATED),
        (pki.ca.issue(), "unauthenticated", grpc.StatusCode.UNAUTHENTICATED),  # no SPIFFE ID at all
        (pki.ca.issue(f"{TD}/intruder"), "permission_denied", grpc.StatusCode.PERMISSION_DENIED),
        (pki.ca.issue(f"{TD}/ops/console2"), "permission_denied", grpc.StatusCode.PERMISSION_DENIED),
    ]
    for leaf, code, grpc_code in cases:
        r = connect(server, pki.client(leaf), "ListVms", {})
        assert r.json()["code"] == code, r.text
        channel, stub = grpc_stub(server, pki, leaf)
        with channel, pytest.raises(grpc.RpcError) as info:
            stub.ListVms(pb.ListVmsRequest(), timeout=10)
        assert info.value.code() == grpc_code
    # the development header means nothing under TLS
    with httpx.Client(verify=pki.client(pki.ca.issue(f"{TD}/intruder")), timeout=10) as http:
        r = http.post(server.url + SVC + "ListVms", json={}, headers={"x-metald-caller": OPERATOR})
    assert r.json()["code"] == "permission_denied"
    # each refusal is one warning line: no traceback, nothing at error level (issue: "refusals log tracebacks")
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    refused = [r for r in caplog.records if r.getMessage().startswith("refused: ")]
    assert len(refused) == 9 and {r.levelno for r in refused} == {logging.WARNING}


def test_tenancy_by_certificate(server: RunningServer, pki: Pki) -> None:
    acme, globex, operator = (pki.client(pki.ca.issue(i)) for i in (ACME, GLOBEX, OPERATOR))
    assert connect(server, acme, "CreateVm", {"vmId": "a-1", "config": CONFIG}).status_code == 200
    assert connect(server, globex, "CreateVm", {"vmId": "g-1", "config": CONFIG}).status_code == 200
    r = connect(server, globex, "GetVmInfo", {"vmId": "a-1"})
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert [v["vmId"] for v in connect(server, globex, "ListVms", {}).json()["vms"]] == ["g-1"]
    assert [v["vmId"] for v in connect(server, acme, "ListVms", {}).json()["vms"]] == ["a-1"]
    assert {v["vmId"] for v in connect(server, operator, "ListVms", {}).json()["vms"]} == {"a-1", "g-1"}
    # under TLS the certificate decides: development tokens and the caller header are ignored
    with httpx.Client(verify=globex, timeout=10) as http:
        for headers in ({"authorization": "Bearer dev_user_acme"}, {"authorization": "junk"},
                        {"x-metald-caller": OPERATOR}):
            r = http.post(server.url + SVC + "ListVms", json={}, headers=headers)
            assert [v["vmId"] for v in r.json()["vms"]] == ["g-1"], headers


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _wait_for(predicate: object, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_rotation_without_restart(tmp_path: Path, pki: Pki) -> None:
    d = tmp_path / "tls"
    d.mkdir()
    crt, key = pki.server.write(d, "server")
    ca_file = d / "ca.pem"
    ca_file.write_bytes(pki.ca.pem)
    settings = tls_settings(tmp_path, pki, tls_cert_file=crt, tls_key_file=key, tls_ca_file=ca_file)
    acme = pki.client(pki.ca.issue(ACME))
    with serve_in_thread(settings, FakeBackend(), FakeNetwork(), tls=True) as srv:
        assert handshake(srv.port, acme)[0].serial_number == pki.server.serial
        open_conn = httpx.Client(verify=acme, timeout=10)
        assert open_conn.post(srv.url + SVC + "ListVms", json={}).status_code == 200

        # a new server certificate (same CA): new connections get it
        rotated = pki.ca.issue(f"{TD}/metald", server=True)
        _replace(key, rotated.key_pem)  # a half-done rotation (key without its certificate) is not loaded
        time.sleep(0.3)
        assert handshake(srv.port, acme)[0].serial_number == pki.server.serial
        _replace(crt, rotated.cert_pem)
        _wait_for(lambda: handshake(srv.port, acme)[0].serial_number == rotated.serial)
        assert srv.tls.serial == rotated.serial
        assert open_conn.post(srv.url + SVC + "ListVms", json={}).status_code == 200  # kept working
        open_conn.close()

        # a new CA: clients of the old one are refused from now on, the new one's accepted
        new_ca = Ca("metald.test CA 2")
        new_server = new_ca.issue(f"{TD}/metald", server=True)
        _replace(crt, new_server.cert_pem)
        _replace(key, new_server.key_pem)
        _replace(ca_file, new_ca.pem)
        _wait_for(lambda: srv.tls.serial == new_server.serial)
        assert handshake(srv.port, pki.client(new_ca.issue(ACME), new_ca.pem))[0].serial_number == new_server.serial
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(srv.port, pki.client(pki.ca.issue(ACME), new_ca.pem, tls12=True))


def test_unloadable_files_stop_startup(tmp_path: Path, pki: Pki) -> None:
    settings = tls_settings(tmp_path, pki, tls_cert_file=tmp_path / "missing.crt")
    with pytest.raises(TlsError, match="cannot load the TLS files"):
        asyncio.run(open_tls(settings))
    settings = tls_settings(tmp_path, pki, tls_key_file=pki.ca_file)  # not the certificate's key
    with pytest.raises(TlsError):
        asyncio.run(open_tls(settings))
