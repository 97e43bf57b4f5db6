"""The transport under grpcio (a client metald did not write), on shared HTTP/2 connections.

Early answers (unknown method, body over the cap), expired deadlines and client
cancellations on one channel must not disturb the other calls on it; a health
probe must not break the next call; reflection lists the services; broken
connections leave no socket in CLOSE-WAIT and SIGTERM still stops metald.
"""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from metald.gen.grpc.health.v1 import health_pb2
from metald.gen.grpc.reflection.v1 import reflection_pb2 as refl_v1
from metald.gen.grpc.reflection.v1alpha import reflection_pb2 as refl_v1alpha
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.gen.metal.vmprovisioner.v1 import vm_pb2_grpc
from tests.support.clients import small_config
from tests.support.daemon import DaemonProcess
from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import RunningServer, make_settings, serve_in_thread

SVC = "/metal.vmprovisioner.v1.VmService/"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with serve_in_thread(make_settings(tmp_path, network_enabled=True), FakeBackend(), FakeNetwork()) as srv:
        yield srv


def _unary(channel: grpc.Channel, path: str, response: type) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response.FromString)


def _close_wait(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "close-wait", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def test_neighbours_of_early_answers_complete(server: RunningServer) -> None:
    """20 ListVms share a channel with an unknown method, an oversize body, an expired deadline and a cancel."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = vm_pb2_grpc.VmServiceStub(channel)
        unknown = _unary(channel, SVC + "NoSuchMethod", pb.ListVmsResponse)
        unknown_service = _unary(channel, "/metal.nothing.v1.Nope/Call", pb.ListVmsResponse)
        big = pb.CreateVmRequest(vm_id="big", config=small_config())
        big.config.metadata["blob"] = "x" * (3 << 20)
        for _ in range(5):
            calls = [stub.ListVms.future(pb.ListVmsRequest(), timeout=60) for _ in range(10)]
            odd = [
                unknown.future(pb.ListVmsRequest(), timeout=60),
                unknown_service.future(pb.ListVmsRequest(), timeout=60),
                stub.CreateVm.future(big, timeout=60),
                stub.ListVms.future(pb.ListVmsRequest(), timeout=0.0001),
            ]
            cancelled = stub.CreateVm.future(big, timeout=60)
            cancelled.cancel()
            calls += [stub.ListVms.future(pb.ListVmsRequest(), timeout=60) for _ in range(10)]
            for call in calls:
                assert call.result().total_count == 0
            codes = [c.exception().code() if c.exception() else grpc.StatusCode.OK for c in odd]  # type: ignore[union-attr]
            assert codes[:3] == [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNIMPLEMENTED,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert codes[3] in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK)  # a fast server may win
        assert stub.ListVms(pb.ListVmsRequest(), timeout=60).total_count == 0  # the channel still works
    assert server.store.get_vm("big") is None


def test_health_probe_then_next_call(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        check = _unary(channel, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckResponse)
        stub = vm_pb2_grpc.VmServiceStub(channel)
        for _ in range(20):
            assert check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
            assert stub.ListVms(pb.ListVmsRequest(), timeout=30).total_count == 0
        named = health_pb2.HealthCheckRequest(service="metal.vmprovisioner.v1.VmService")
        assert check(named, timeout=30).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        stream = watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(iter(stream)).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()


def test_health_follows_readiness(tmp_path: Path) -> None:
    backend = FakeBackend()
    healthy = {"ok": True}

    async def ping() -> tuple[bool, str]:
        return healthy["ok"], "fake"

    backend.ping = ping  # type: ignore[method-assign]
    with serve_in_thread(make_settings(tmp_path), backend) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        check = _unary(channel, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckResponse)
        assert check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
        healthy["ok"] = False
        assert check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("refl", [refl_v1, refl_v1alpha], ids=["v1", "v1alpha"])
def test_reflection_lists_and_describes(server: RunningServer, refl: object) -> None:
    from google.protobuf import descriptor_pb2

    package = refl.DESCRIPTOR.package  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = channel.stream_stream(f"/{package}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=refl.ServerReflectionResponse.FromString)  # type: ignore[attr-defined]
        requests = [
            refl.ServerReflectionRequest(list_services=""),  # type: ignore[attr-defined]
            refl.ServerReflectionRequest(file_containing_symbol="metal.vmprovisioner.v1.VmService"),  # type: ignore[attr-defined]
            refl.ServerReflectionRequest(file_containing_symbol="no.such.Thing"),  # type: ignore[attr-defined]
        ]
        listed, described, missing = list(info(iter(requests), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {"metal.vmprovisioner.v1.VmService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    first = descriptor_pb2.FileDescriptorProto.FromString(described.file_descriptor_response.file_descriptor_proto[0])
    assert first.name == "metal/vmprovisioner/v1/vm.proto" and first.service[0].name == "VmService"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_grpc_over_http1_is_a_clean_error(server: RunningServer) -> None:
    import httpx

    r = httpx.post(server.url + SVC + "ListVms", content=b"\x00\x00\x00\x00\x00",
                   headers={"content-type": "application/grpc"})
    assert r.headers["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert "HTTP/2" in r.headers["grpc-message"].replace("%20", " ")


def _break_connections(port: int) -> list[socket.socket]:
    """Connections left in every odd state: half an HTTP/2 preface, a request without its body,
    a client FIN mid-request, an abrupt reset."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    held = []
    for i in range(24):
        s = socket.create_connection(("127.0.0.1", port))
        kind = i % 4
        if kind == 0:
            s.sendall(preface[:10])
        elif kind == 1:
            s.sendall(b"POST " + SVC.encode() + b"ListVms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
        elif kind == 2:
            s.sendall(preface + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            s.shutdown(socket.SHUT_WR)
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.sendall(preface)
            s.close()
            continue
        held.append(s)
    return held


def test_broken_connections_leave_no_close_wait(server: RunningServer) -> None:
    held = _break_connections(server.port)
    for s in held:
        s.close()  # the client is gone: the server must close its side too
    deadline = time.monotonic() + 30
    while _close_wait(server.port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _close_wait(server.port) == 0


def test_sigterm_after_broken_connections(tmp_path: Path) -> None:
    image = make_settings(tmp_path).image_dir
    daemon = DaemonProcess(tmp_path, image, UNKEY_METALD_NETWORK_ENABLED="false",
                           UNKEY_METALD_JAILER_ENABLED="false", UNKEY_METALD_SHUTDOWN_GRACE_SECONDS="5")
    daemon.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
            stub = vm_pb2_grpc.VmServiceStub(channel)
            unknown = _unary(channel, SVC + "NoSuchMethod", pb.ListVmsResponse)
            with pytest.raises(grpc.RpcError):
                unknown(pb.ListVmsRequest(), timeout=30)
            assert stub.ListVms(pb.ListVmsRequest(), timeout=30).total_count == 0
            held = _break_connections(daemon.port)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                started = time.monotonic()
                code = pool.submit(daemon.stop).result(timeout=60)
            elapsed = time.monotonic() - started
            for s in held:
                s.close()
        assert code == 0, daemon.log.read_text()[-3000:]
        assert elapsed < 30, f"SIGTERM took {elapsed:.1f}s"
        log = daemon.log.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        daemon.kill()


@pytest.mark.parametrize("path", [SVC + "NoSuchMethod", "/no.such.v1.Service/Call"])
def test_http1_early_404_without_epipe(server: RunningServer, path: str) -> None:
    """An unknown method answered before its body was read: every client gets the 404, none EPIPE/reset."""
    body = b"{" + b" " * (512 << 10) + b"}"
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    def one() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
            s.sendall(head + body)
            return s.recv(64)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: one(), range(20)))
    assert all(a.startswith(b"HTTP/1.1 404") for a in answers), answers
