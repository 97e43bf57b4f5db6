"""OpenTelemetry traces over OTLP/HTTP (when ``UNKEY_METALD_OTEL_ENABLED=true``).

One SERVER span per RPC, made by :class:`TracingMiddleware` around the ASGI
app (a ``traceparent`` header from the caller is honoured); one child span per
plan step, made from the engine's step observers with the step's real start and
end times. While an RPC runs, its trace id is in ``trace_id_var`` so every JSON
log line carries it. Only ``metald.daemon`` imports this module, and only when
OTel is enabled.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from metald.config import Settings
from metald.observability.logging import trace_id_var, vm_id_var

if TYPE_CHECKING:
    from metald.core.engine import VmEngine

Scope = dict[str, Any]
_PEEK_LIMIT = 64 << 10  # request bytes kept to find the vm_id of a traced RPC
_ERROR_BODY_LIMIT = 4096
_PROPAGATOR = TraceContextTextMapPropagator()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL from ``host:port`` or a URL (``/v1/traces`` added if it has no path)."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + "/v1/traces"
    return url


class Tracing:
    """The tracer provider plus the hooks that make spans: ``attach``, ``wrap``, ``span``."""

    def __init__(self, settings: Settings, exporter: SpanExporter | None = None) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: settings.otel_service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.otel_sampling_rate)),
        )
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=traces_url(settings.otel_endpoint), timeout=10)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("metald")

    def attach(self, engine: VmEngine) -> None:
        """Annotate RPC spans with operation results and add a span per plan step."""
        engine.operation_observers.append(self.on_operation)
        engine.step_observers.append(self.on_step)

    def wrap(self, app: Any) -> TracingMiddleware:
        return TracingMiddleware(app, self.tracer)

    @contextlib.contextmanager
    def span(self, name: str, **attributes: str | int | float | bool) -> Iterator[trace.Span]:
        """A span around internal work (e.g. start-up reconcile) so its steps have a parent."""
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            token = trace_id_var.set(_trace_id(span))
            try:
                yield span
            finally:
                trace_id_var.reset(token)

    def on_operation(self, operation: str, outcome: str, seconds: float, exc: BaseException | None) -> None:
        span = trace.get_current_span()
        if operation == "vmm-exit" or not span.is_recording():
            return
        span.set_attribute("metald.operation", operation)
        span.set_attribute("metald.outcome", outcome)
        vm_id = vm_id_var.get()
        if vm_id:
            span.set_attribute("vm_id", vm_id)
        if exc is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))

    def on_step(self, step: str, outcome: str, seconds: float, exc: BaseException | None) -> None:
        parent = trace.get_current_span()
        if not parent.is_recording():
            return  # no RPC or reconcile span to hang it on (or not sampled)
        end = time.time_ns()
        span = self.tracer.start_span(
            step,
            start_time=end - int(seconds * 1e9),
            attributes={"metald.step": step, "metald.step.outcome": outcome},
        )
        if exc is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
        span.end(end_time=end)

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Export the spans still queued, then stop (blocking: call it from a thread in async code)."""
        self.provider.shutdown()


def _trace_id(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else ""


def _rpc_paths() -> dict[str, tuple[str, str]]:
    """``/pkg.Service/Method`` -> (service, method) for every RPC metald serves."""
    from metald.gen.metal.vmprovisioner.v1 import vm_pb2

    return {
        f"/{service.full_name}/{method.name}": (service.full_name, method.name)
        for service in vm_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def _int(value: bytes) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _gunzip(data: bytes) -> bytes:
    """Inflate a gzip body, at most 1 MiB of it."""
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data, 1 << 20)


def _request_vm_id(method: str, headers: dict[str, str], body: bytes) -> str:
    """The ``vm_id`` field of a unary request body, or "" (best effort, any protocol, gzip or none)."""
    from google.protobuf import json_format

    from metald.gen.metal.vmprovisioner.v1 import vm_pb2

    cls = getattr(vm_pb2, f"{method}Request", None)
    if cls is None or "vm_id" not in cls.DESCRIPTOR.fields_by_name:
        return ""
    message = cls()
    content_type = headers.get("content-type", "")
    try:
        if content_type.startswith("application/grpc"):
            if len(body) < 5:
                return ""
            (length,) = struct.unpack(">I", body[1:5])
            body, compressed = body[5 : 5 + length], body[0] == 1
            if compressed and headers.get("grpc-encoding") != "gzip":
                return ""
            message.ParseFromString(_gunzip(body) if compressed else body)
            return str(message.vm_id)
        encoding = headers.get("content-encoding", "identity")
        if encoding not in ("identity", "gzip"):
            return ""
        body = _gunzip(body) if encoding == "gzip" else body
        if "json" in content_type:
            json_format.Parse(body, message, ignore_unknown_fields=True)
        else:
            message.ParseFromString(body)
    except Exception:
        return ""
    return str(message.vm_id)


class TracingMiddleware:
    """ASGI middleware: a SERVER span per RPC with ``trace_id_var`` set for its duration."""

    def __init__(self, app: Any, tracer: trace.Tracer) -> None:
        self.app = app
        self.tracer = tracer
        self.rpcs = _rpc_paths()  # other paths (health, unknown) get no span: bounded span names

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        rpc = self.rpcs.get(scope.get("path", "")) if scope["type"] == "http" else None
        if rpc is None:
            await self.app(scope, receive, send)
            return
        service, method = rpc
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        parent = _PROPAGATOR.extract(headers)
        attributes = {"rpc.system": "connect_rpc", "rpc.service": service, "rpc.method": method}
        span = self.tracer.start_span(
            f"{service}/{method}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        trace_token = trace_id_var.set(_trace_id(span))
        recording = span.is_recording()
        request = bytearray()
        result: dict[str, Any] = {"status": 0, "grpc": None, "error_body": bytearray()}

        async def peek_receive() -> Any:
            message = await receive()
            if message.get("type") == "http.request" and len(request) < _PEEK_LIMIT:
                request.extend(message.get("body", b"")[: _PEEK_LIMIT - len(request)])
            return message

        async def watch_send(message: Any) -> None:
            kind = message.get("type")
            if kind == "http.response.start":
                result["status"] = int(message.get("status", 0))
                for key, value in message.get("headers") or []:
                    if key.lower() == b"grpc-status":
                        result["grpc"] = _int(value)
            elif kind == "http.response.trailers":
                for key, value in message.get("headers") or []:
                    if key.lower() == b"grpc-status":
                        result["grpc"] = _int(value)
            elif kind == "http.response.body" and result["status"] >= 400:
                body = result["error_body"]
                body.extend(message.get("body", b"")[: _ERROR_BODY_LIMIT - len(body)])
            await send(message)

        try:
            await self.app(scope, peek_receive if recording else receive, watch_send if recording else send)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
            raise
        finally:
            trace_id_var.reset(trace_token)
            otel_context.detach(token)
            if recording:
                self._finish(span, method, headers, bytes(request), result)
            span.end()

    @staticmethod
    def _finish(
        span: trace.Span, method: str, headers: dict[str, str], request: bytes, result: dict[str, Any]
    ) -> None:
        """Set vm_id (if the engine did not) and the RPC's outcome on its span."""
        attributes = getattr(span, "attributes", None) or {}
        if "vm_id" not in attributes:
            vm_id = _request_vm_id(method, headers, request)
            if vm_id:
                span.set_attribute("vm_id", vm_id)
        status, grpc_status = result["status"], result["grpc"]
        if status:
            span.set_attribute("http.response.status_code", status)
        code = ""
        if grpc_status is not None:
            span.set_attribute("rpc.grpc.status_code", grpc_status)
            code = str(grpc_status) if grpc_status else ""
        elif status >= 400:
            try:
                code = str(json.loads(bytes(result["error_body"])).get("code", "")) or str(status)
            except (ValueError, AttributeError):
                code = str(status)
            span.set_attribute("rpc.connect_rpc.error_code", code)
        current = getattr(span, "status", None)
        if code and (current is None or current.status_code is StatusCode.UNSET):
            span.set_status(Status(StatusCode.ERROR, f"rpc failed: {code}"))
