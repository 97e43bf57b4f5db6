"""Traces over real OTLP/HTTP to a local receiver: RPC spans, plan-step children, trace ids in logs."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from metald.core.engine import VmEngine
from metald.core.lifecycle import ReconcileReport
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.observability.logging import JsonFormatter
from metald.observability.tracing import Tracing, traces_url
from tests.support.clients import ConnectBinaryClient, ConnectJsonClient, GrpcClient, RpcFailed, small_config
from tests.support.fakes import FakeBackend, FakeNetwork
from tests.support.server import make_settings, serve_in_thread

SERVICE = "metal.vmprovisioner.v1.VmService"


class Receiver:
    """A minimal OTLP/HTTP trace receiver on a free loopback port."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.paths.append(self.path)
                if self.path != "/v1/traces" or self.headers["Content-Type"] != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                owner.requests.append(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[tuple[dict[str, Any], Span]]:
        """(resource attributes, span) for every span received."""
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = attrs(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    out += [(resource, span) for span in scope_spans.spans]
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attrs(values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in values:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """JSON log lines of metald.core while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("metald.core")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def rpc_span(spans: list[Span], method: str, vm_id: str) -> Span:
    found = [
        s for s in spans if s.name == f"{SERVICE}/{method}" and attrs(s.attributes).get("vm_id") == vm_id
    ]
    assert len(found) == 1, (method, vm_id, [s.name for s in spans])
    return found[0]


def children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: s.start_time_unix_nano)


def test_rpc_and_step_spans_reach_the_collector(
    tmp_path: Path, receiver: Receiver, log_lines: io.StringIO
) -> None:
    settings = make_settings(
        tmp_path, network_enabled=True, otel_enabled=True, otel_service_name="metald-test",
        otel_endpoint=f"127.0.0.1:{receiver.port}",
    )
    tracing = Tracing(settings)

    async def on_start(engine: VmEngine, report: ReconcileReport) -> None:
        tracing.attach(engine)

    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with serve_in_thread(settings, FakeBackend(), FakeNetwork(), wrap_app=tracing.wrap, on_start=on_start) as srv:
        json_client, binary, grpc_client = ConnectJsonClient(srv.url), ConnectBinaryClient(srv.url), GrpcClient(srv.url)
        try:
            json_client.call("CreateVm", pb.CreateVmRequest(vm_id="vm-t1", config=small_config()))
            grpc_client.call("BootVm", pb.BootVmRequest(vm_id="vm-t1"))
            binary.call("GetVmInfo", pb.GetVmInfoRequest(vm_id="vm-t1"))
            binary.call("CreateVm", pb.CreateVmRequest(vm_id="vm-t2", config=small_config()))
            with pytest.raises(RpcFailed):
                grpc_client.call("PauseVm", pb.PauseVmRequest(vm_id="vm-t2"))
            with pytest.raises(RpcFailed):
                json_client.call("ResumeVm", pb.ResumeVmRequest(vm_id="vm-t2"))
            # a caller's W3C trace context is continued
            body = json.dumps({"vmId": "vm-t1"})
            headers = {"content-type": "application/json", "traceparent": f"00-{caller_trace}-{caller_span}-01"}
            r = httpx.post(f"{srv.url}/{SERVICE}/PauseVm", content=body, headers=headers)
            assert r.status_code == 200, r.text
            assert httpx.get(f"{srv.url}/_/health").status_code == 200  # not an RPC: no span
            json_only = {"content-type": "application/json"}
            unknown = httpx.post(f"{srv.url}/{SERVICE}/Nope", content="{}", headers=json_only)
            assert unknown.status_code == 404  # nor an unknown method (span names stay bounded)
            assert tracing.force_flush()
            flushed = len(receiver.spans())
            # this one is still queued when the server stops: shutdown must flush it
            json_client.call("ResumeVm", pb.ResumeVmRequest(vm_id="vm-t1"))
        finally:
            for c in (json_client, binary, grpc_client):
                c.close()
    tracing.shutdown()

    assert set(receiver.paths) == {"/v1/traces"}
    received = receiver.spans()
    assert {resource["service.name"] for resource, _ in received} == {"metald-test"}
    spans = [s for _, s in received]
    assert len(spans) > flushed
    assert not [s for s in spans if "health" in s.name or "Nope" in s.name]

    create = rpc_span(spans, "CreateVm", "vm-t1")
    a = attrs(create.attributes)
    assert create.kind == Span.SPAN_KIND_SERVER
    assert (a["rpc.method"], a["rpc.service"], a["rpc.system"]) == ("CreateVm", SERVICE, "connect_rpc")
    assert a["metald.operation"] == "create" and a["metald.outcome"] == "ok"
    assert create.status.code != Status.STATUS_CODE_ERROR
    steps = children(spans, create)
    assert [s.name for s in steps] == ["create.record", "create.allocate", "create.validate", "create.rundir",
                                       "create.network"]
    for step in steps:
        assert step.trace_id == create.trace_id
        assert create.start_time_unix_nano <= step.start_time_unix_nano <= step.end_time_unix_nano
        assert step.end_time_unix_nano <= create.end_time_unix_nano
        assert attrs(step.attributes)["metald.step.outcome"] == "done"

    boot = rpc_span(spans, "BootVm", "vm-t1")  # over gRPC
    assert [s.name for s in children(spans, boot)] == ["boot.network", "boot.vmm", "boot.record"]
    assert attrs(boot.attributes)["rpc.grpc.status_code"] == 0
    assert boot.trace_id != create.trace_id

    info = rpc_span(spans, "GetVmInfo", "vm-t1")  # vm_id from the (binary) request body
    assert "metald.operation" not in attrs(info.attributes)

    failed = rpc_span(spans, "PauseVm", "vm-t2")  # gRPC FAILED_PRECONDITION
    assert failed.status.code == Status.STATUS_CODE_ERROR
    assert "FailedPrecondition" in failed.status.message
    assert attrs(failed.attributes)["rpc.grpc.status_code"] == 9
    assert attrs(failed.attributes)["metald.outcome"] == "failed"
    assert [e.name for e in failed.events] == ["exception"]
    resumed = rpc_span(spans, "ResumeVm", "vm-t2")  # Connect JSON error
    assert resumed.status.code == Status.STATUS_CODE_ERROR
    assert attrs(resumed.attributes)["rpc.connect_rpc.error_code"] == "failed_precondition"

    continued = rpc_span(spans, "PauseVm", "vm-t1")
    assert (continued.trace_id.hex(), continued.parent_span_id.hex()) == (caller_trace, caller_span)

    rpc_span(spans, "ResumeVm", "vm-t1")  # exported by shutdown()

    # JSON log lines written during an RPC carry its trace id
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    done = [e for e in lines if e["msg"] == "operation done" and e["operation"] == "create" and e["vm_id"] == "vm-t1"]
    assert len(done) == 1 and done[0]["trace_id"] == create.trace_id.hex()
    failure = [e for e in lines if e["msg"].startswith("operation failed") and e["vm_id"] == "vm-t2"]
    assert {e["trace_id"] for e in failure} == {failed.trace_id.hex(), resumed.trace_id.hex()}


def test_sampling_rate_zero_exports_nothing_but_logs_keep_trace_ids(
    tmp_path: Path, receiver: Receiver, log_lines: io.StringIO
) -> None:
    settings = make_settings(
        tmp_path, otel_enabled=True, otel_sampling_rate=0.0, otel_endpoint=f"http://127.0.0.1:{receiver.port}"
    )
    tracing = Tracing(settings)

    async def on_start(engine: VmEngine, report: ReconcileReport) -> None:
        tracing.attach(engine)

    with serve_in_thread(settings, FakeBackend(), wrap_app=tracing.wrap, on_start=on_start) as srv:
        client = ConnectJsonClient(srv.url)
        try:
            client.call("CreateVm", pb.CreateVmRequest(vm_id="vm-s", config=small_config()))
        finally:
            client.close()
    tracing.shutdown()
    assert receiver.spans() == []
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    done = [e for e in lines if e["msg"] == "operation done"]
    assert len(done) == 1 and len(done[0]["trace_id"]) == 32


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("localhost:4318", "http://localhost:4318/v1/traces"),
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("https://collector:4318/", "https://collector:4318/v1/traces"),
        ("http://collector:4318/custom/traces", "http://collector:4318/custom/traces"),
    ],
)
def test_traces_url(endpoint: str, url: str) -> None:
    assert traces_url(endpoint) == url


def test_otel_off_imports_nothing_of_it(tmp_path: Path) -> None:
    """With OTel disabled the daemon builds without loading the SDK or metald's OTel modules."""
    code = f"""
import asyncio, sys
import metald.daemon as daemon
from tests.support.fakes import FakeBackend
from tests.support.server import make_settings

async def fake_backend(settings):
    return FakeBackend()

daemon.make_backend = fake_backend
built = asyncio.run(daemon.build(make_settings(__import__("pathlib").Path({str(tmp_path)!r}))))
assert built.metrics is None and built.tracing is None
assert built.engine.step_observers == [] and built.engine.operation_observers == []
loaded = [m for m in sys.modules if m.startswith(("opentelemetry.sdk", "metald.observability.tracing",
                                                   "metald.observability.metrics"))]
assert not loaded, loaded
"""
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)


async def test_otel_on_wires_metrics_and_tracing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import metald.daemon as daemon
    from metald.observability.metrics import Metrics

    async def fake_backend(settings: Any) -> FakeBackend:
        return FakeBackend()

    monkeypatch.setattr(daemon, "make_backend", fake_backend)
    built = await daemon.build(make_settings(tmp_path, otel_enabled=True))
    try:
        assert isinstance(built.metrics, Metrics) and isinstance(built.tracing, Tracing)
        assert built.metrics.on_operation in built.engine.operation_observers
        assert built.tracing.on_step in built.engine.step_observers
    finally:
        built.store.close()
        built.tracing.shutdown()  # type: ignore[union-attr]
