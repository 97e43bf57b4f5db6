"""The ASGI application: health routes, a request-size cap, caller identity, then
ConnectRPC (Connect JSON/binary, gRPC, gRPC-Web) for each mounted service:
VmService, SnapshotService, the streaming EventService (api/events.py), grpc.health.v1.Health and
gRPC server reflection (v1, v1alpha)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from metald.api.auth import Authorizer, Caller, caller_var
from metald.api.health import Health
from metald.api.service import VmServiceImpl
from metald.api.snapshots import SnapshotServiceImpl
from metald.api.standard import Services, standard_apps
from metald.gen.metal.vmprovisioner.v1.snapshots_connect import SnapshotServiceASGIApplication
from metald.gen.metal.vmprovisioner.v1.vm_connect import VmServiceASGIApplication

log = logging.getLogger(__name__)

Scope = dict[str, Any]


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# After an early answer (a body over the cap, an unknown path), up to this many
# times the cap is read and dropped so that the client, still sending, gets the
# answer rather than a reset stream or EPIPE.
DRAIN_FACTOR = 8


class _BodyTracker:
    """Notes whether the request body was read to its end."""

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self.finished = False

    async def receive(self) -> Any:
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.finished = True
        return message

    async def drain(self, limit: int) -> None:
        read = 0
        while not self.finished and read <= limit:
            read += len((await self.receive()).get("body", b""))


# Returns the SPIFFE ID of the connection's verified client certificate, if any.
PeerIdentity = Callable[[Scope], str | None]

# Paths answered without a caller identity (probes and schema discovery reveal no VM).
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1.", "/grpc.reflection.v1alpha.")


class MetaldApp:
    def __init__(
        self,
        service: VmServiceImpl,
        health: Health,
        max_request_bytes: int,
        authorizer: Authorizer | None = None,
        peer_identity: PeerIdentity | None = None,
        events: Any = None,
    ) -> None:
        self.health = health
        self.max_request_bytes = max_request_bytes
        self.authorizer = authorizer or Authorizer(service.settings)
        self.peer_identity = peer_identity
        self.dev_header = service.settings.dev_caller_header and peer_identity is None
        self.services = Services()
        self.routes: dict[str, Any] = {}
        self.mount(VmServiceASGIApplication(service, read_max_bytes=max_request_bytes))
        self.mount(SnapshotServiceASGIApplication(SnapshotServiceImpl(service), read_max_bytes=max_request_bytes))
        if events is not None:
            self.mount(events)
        for app in standard_apps(self._ready, self.services):
            self.mount(app)

    def mount(self, app: Any) -> None:
        """Serve a generated Connect ASGI application (its ``path`` is ``/<package>.<Service>``);
        health and reflection list it from then on."""
        self.routes[app.path + "/"] = app
        self.services.add(app.path.lstrip("/"))

    async def _ready(self) -> bool:
        status, _ = await self.health.report()
        return status == 200

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        scope.setdefault("root_path", "")  # optional in ASGI; connectrpc reads it
        path = scope.get("path", "")
        if path in ("/_/health", "/health"):
            if scope["method"] not in ("GET", "HEAD"):
                await _send_json(send, 405, {"error": "use GET"})
                return
            status, report = await self.health.report()
            await _send_json(send, status, report)
            return
        body = _BodyTracker(receive)
        try:
            await self._dispatch(scope, path, body, send)
        finally:
            await body.drain(DRAIN_FACTOR * self.max_request_bytes)

    async def _dispatch(self, scope: Scope, path: str, body: _BodyTracker, send: Any) -> None:
        if _is_grpc(scope) and scope.get("http_version") != "2":
            message = "gRPC needs HTTP/2: this request came over HTTP/" + str(scope.get("http_version"))
            log.info("refused: %s", message, extra={"path": path[:200]})
            await self._error(scope, send, "unimplemented", message)
            return
        prefix, _, _ = path.rpartition("/")
        app = self.routes.get(prefix + "/")
        if app is None:
            log.info("refused: unknown method %s", path[:200])
            await self._error(scope, send, "unimplemented", f"unknown method {path[:200]}")
            return
        if await self._too_large(scope, path, send):
            return
        caller: Caller | None = None
        if not path.startswith(_OPEN_PREFIXES) or self.peer_identity is None:
            try:
                caller = self._caller(scope)
            except Exception as exc:
                if path.startswith(_OPEN_PREFIXES):
                    caller = None
                else:
                    await self._refuse(scope, path, send, exc)
                    return
        token = caller_var.set(caller)
        try:
            await app(scope, body.receive, send)
        finally:
            caller_var.reset(token)

    def _caller(self, scope: Scope) -> Caller:
        if self.peer_identity is not None:  # TLS: the certificate decides, headers are ignored
            return self.authorizer.caller_for(self.peer_identity(scope), from_tls=True)
        return self.authorizer.caller_from_headers(list(scope.get("headers") or []), self.dev_header)

    async def _refuse(self, scope: Scope, path: str, send: Any, exc: Exception) -> None:
        from metald.api.errors import to_connect

        err = to_connect(exc)
        log.warning("refused: %s: %s", err.code.value, err.message, extra={"path": path[:200]})
        await self._error(scope, send, err.code.value, err.message)

    async def _too_large(self, scope: Scope, path: str, send: Any) -> bool:
        """Refuse a declared body over the cap before reading it (resource_exhausted, as a chunked one is)."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is None or not length.isdigit() or int(length) <= self.max_request_bytes:
            return False
        message = f"request body: {int(length)} bytes exceeds the limit of {self.max_request_bytes}"
        log.info("refused: %s", message, extra={"path": path[:200]})
        await self._error(scope, send, "resource_exhausted", message)
        return True

    async def _error(self, scope: Scope, send: Any, code: str, message: str) -> None:
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"")
        grpc_status = str(_GRPC_STATUS.get(code, 2)).encode()
        grpc_message = message.replace("%", "%25").replace(" ", "%20").encode()
        if content_type.startswith(b"application/grpc"):
            # Trailers-Only: the status in the headers of an empty response, valid for gRPC
            # over HTTP/2, gRPC-Web, and readable by a gRPC client that reached us over HTTP/1.1.
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", content_type.split(b";")[0]),
                        (b"grpc-status", grpc_status),
                        (b"grpc-message", grpc_message),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            status = _HTTP_STATUS.get(code, 500)
            await _send_json(send, status, {"code": code, "message": message})


def _is_grpc(scope: Scope) -> bool:
    """Native gRPC (not gRPC-Web, which works over HTTP/1.1)."""
    for name, value in scope.get("headers") or []:
        if name == b"content-type":
            return value.startswith(b"application/grpc") and not value.startswith(b"application/grpc-web")
    return False


_GRPC_STATUS = {
    "invalid_argument": 3,
    "unauthenticated": 16,
    "permission_denied": 7,
    "resource_exhausted": 8,
    "unimplemented": 12,
}
_HTTP_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "unimplemented": 404,
}
