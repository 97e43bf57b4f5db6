"""The standard gRPC services next to metald's own: health checking and server reflection.

``grpc.health.v1.Health`` answers from metald's readiness (the same checks as
``/_/health``): ``SERVING`` when every check passes, ``NOT_SERVING`` otherwise,
for the empty service name (the server) and for each registered service.
``Watch`` sends the status at once and again whenever it changes.

``grpc.reflection.v1.ServerReflection`` and its ``v1alpha`` twin list every
registered service and serve their file descriptors from the process's
descriptor pool, so tools such as ``grpcurl`` and ``buf curl`` need no schema.
Both take the service list from :class:`Services`, so a service added there
later is listed and described without changes here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, cast

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from metald.gen.grpc.health.v1 import health_pb2
from metald.gen.grpc.health.v1.health_connect import HealthASGIApplication
from metald.gen.grpc.reflection.v1 import reflection_pb2 as reflection_v1
from metald.gen.grpc.reflection.v1.reflection_connect import ServerReflectionASGIApplication as ReflectionV1
from metald.gen.grpc.reflection.v1alpha import reflection_pb2 as reflection_v1alpha
from metald.gen.grpc.reflection.v1alpha.reflection_connect import ServerReflectionASGIApplication as ReflectionV1Alpha

Ready = Callable[[], Awaitable[bool]]
WATCH_INTERVAL_SECONDS = 5.0
_Status = health_pb2.HealthCheckResponse
_GRPC_NOT_FOUND, _GRPC_UNIMPLEMENTED = 5, 12  # numeric gRPC codes carried inside ErrorResponse


class Services:
    """The names of the gRPC services metald serves (filled in by the app as it mounts them)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)


class HealthService:
    def __init__(self, ready: Ready, services: Services, interval: float = WATCH_INTERVAL_SECONDS) -> None:
        self.ready = ready
        self.services = services
        self.interval = interval

    async def _status(self, service: str) -> int | None:
        if service and service not in self.services.names:
            return None
        return _Status.SERVING if await self.ready() else _Status.NOT_SERVING

    async def check(
        self, request: health_pb2.HealthCheckRequest, ctx: RequestContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = await self._status(request.service)
        if status is None:
            raise ConnectError(Code.NOT_FOUND, f"unknown service {request.service!r}")
        return _Status(status=cast(_Status.ServingStatus, status))

    async def list(
        self, request: health_pb2.HealthListRequest, ctx: RequestContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        status = _Status.SERVING if await self.ready() else _Status.NOT_SERVING
        names = ["", *self.services.names]
        return health_pb2.HealthListResponse(statuses={n: _Status(status=status) for n in names})

    async def watch(
        self, request: health_pb2.HealthCheckRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: int | None = -1
        while True:
            status = await self._status(request.service)
            current = _Status.SERVICE_UNKNOWN if status is None else status
            if current != last:
                yield _Status(status=cast(_Status.ServingStatus, current))
                last = current
            await asyncio.sleep(self.interval)


def _with_dependencies(root: FileDescriptor) -> list[bytes]:
    """root's FileDescriptorProto first, then every file it imports, transitively."""
    out: list[bytes] = []
    seen: set[str] = set()
    pending = [root]
    while pending:
        file = pending.pop(0)
        if file.name in seen:
            continue
        seen.add(file.name)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        out.append(proto.SerializeToString())
        pending.extend(file.dependencies)
    return out


class ReflectionService:
    """ServerReflectionInfo for one reflection package (v1 or v1alpha share the message shapes)."""

    def __init__(self, pb: Any, services: Services, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self.pb = pb
        self.services = services
        self.pool = pool or descriptor_pool.Default()

    async def server_reflection_info(
        self, requests: AsyncIterator[Any], ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: Any) -> Any:
        pb = self.pb
        response = pb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                names = self.services.names
                response.list_services_response.service.extend(pb.ServiceResponse(name=n) for n in names)
            elif kind == "file_by_filename":
                files = _with_dependencies(self.pool.FindFileByName(request.file_by_filename))
                response.file_descriptor_response.file_descriptor_proto.extend(files)
            elif kind == "file_containing_symbol":
                files = _with_dependencies(self.pool.FindFileContainingSymbol(request.file_containing_symbol))
                response.file_descriptor_response.file_descriptor_proto.extend(files)
            elif kind == "file_containing_extension":
                ext = request.file_containing_extension
                message = self.pool.FindMessageTypeByName(ext.containing_type)
                field = self.pool.FindExtensionByNumber(message, ext.extension_number)
                response.file_descriptor_response.file_descriptor_proto.extend(_with_dependencies(field.file))  # type: ignore[attr-defined]  # FieldDescriptor.file exists at run time; types-protobuf omits it
            elif kind == "all_extension_numbers_of_type":
                message = self.pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(f.number for f in self.pool.FindAllExtensions(message))
                response.all_extension_numbers_response.base_type_name = message.full_name
                response.all_extension_numbers_response.extension_number.extend(numbers)
            else:
                response.error_response.error_code = _GRPC_UNIMPLEMENTED
                response.error_response.error_message = "no request given"
        except KeyError as exc:
            response.error_response.error_code = _GRPC_NOT_FOUND
            response.error_response.error_message = str(exc).strip("'\"") or "not found"
        return response


def standard_apps(ready: Ready, services: Services) -> Iterable[Any]:
    """The Connect/gRPC applications of Health and both reflection versions."""
    return (
        HealthASGIApplication(HealthService(ready, services)),
        ReflectionV1(ReflectionService(reflection_v1, services)),
        ReflectionV1Alpha(ReflectionService(reflection_v1alpha, services)),
    )
