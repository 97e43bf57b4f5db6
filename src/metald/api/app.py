"""The ASGI application: health routes, a request-size cap, then ConnectRPC
(Connect JSON/binary and gRPC) for VmService and SnapshotService."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from metald.api.auth import DEV_HEADER, Authorizer, caller_var
from metald.api.health import Health
from metald.api.service import VmServiceImpl
from metald.api.snapshots import SnapshotServiceImpl
from metald.gen.metal.vmprovisioner.v1.snapshots_connect import SnapshotServiceASGIApplication
from metald.gen.metal.vmprovisioner.v1.vm_connect import VmServiceASGIApplication

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


# After an early answer (a body over the cap), up to this many times the cap is
# read and dropped so that the client, still sending, gets the answer rather
# than a reset stream.
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


class MetaldApp:
    def __init__(
        self,
        service: VmServiceImpl,
        health: Health,
        max_request_bytes: int,
        authorizer: Authorizer | None = None,
        peer_identity: PeerIdentity | None = None,
    ) -> None:
        self.connect = VmServiceASGIApplication(service, read_max_bytes=max_request_bytes)
        self.snapshots = SnapshotServiceASGIApplication(SnapshotServiceImpl(service), read_max_bytes=max_request_bytes)
        self.health = health
        self.max_request_bytes = max_request_bytes
        self.authorizer = authorizer or Authorizer(service.settings)
        self.peer_identity = peer_identity
        self.dev_header = service.settings.dev_caller_header and peer_identity is None

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
        path = scope.get("path", "")
        if path in ("/_/health", "/health"):
            if scope["method"] not in ("GET", "HEAD"):
                await _send_json(send, 405, {"error": "use GET"})
                return
            status, body = await self.health.report()
            await _send_json(send, status, body)
            return
        if await self._too_large(scope, send):
            return
        try:
            caller = self._caller(scope)
        except Exception as exc:
            await self._refuse(scope, send, exc)
            return
        token = caller_var.set(caller)
        tracker = _BodyTracker(receive)
        try:
            app = self.snapshots if path.startswith(self.snapshots.path + "/") else self.connect
            await app(scope, tracker.receive, send)
        finally:
            caller_var.reset(token)
        await tracker.drain(DRAIN_FACTOR * self.max_request_bytes)

    def _caller(self, scope: Scope) -> Any:
        if self.peer_identity is not None:
            return self.authorizer.caller_for(self.peer_identity(scope), from_tls=True)
        identity = None
        if self.dev_header:
            raw = dict(scope.get("headers") or []).get(DEV_HEADER)
            identity = raw.decode("utf-8", "replace").strip() if raw else None
        return self.authorizer.caller_for(identity or None, from_tls=False)

    async def _refuse(self, scope: Scope, send: Any, exc: Exception) -> None:
        from metald.api.errors import to_connect

        err = to_connect(exc)
        await self._error(scope, send, err.code.value, _GRPC_STATUS.get(err.code.value, 2), err.message)

    async def _too_large(self, scope: Scope, send: Any) -> bool:
        """Refuse a declared body over the cap before reading it (invalid_argument)."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is None or not length.isdigit() or int(length) <= self.max_request_bytes:
            return False
        message = f"request body: {int(length)} bytes exceeds the limit of {self.max_request_bytes}"
        await self._error(scope, send, "invalid_argument", 3, message)
        return True

    async def _error(self, scope: Scope, send: Any, code: str, grpc_status: int, message: str) -> None:
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"")
        if content_type.startswith(b"application/grpc"):
            # gRPC carries the status in trailers after an (empty) body.
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", content_type)],
                    "trailers": True,
                }
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            await send(
                {
                    "type": "http.response.trailers",
                    "headers": [
                        (b"grpc-status", str(grpc_status).encode()),
                        (b"grpc-message", message.replace("%", "%25").replace(" ", "%20").encode()),
                    ],
                    "more_trailers": False,
                }
            )
        else:
            status = _HTTP_STATUS.get(code, 500)
            await _send_json(send, status, {"code": code, "message": message})


_GRPC_STATUS = {"invalid_argument": 3, "unauthenticated": 16, "permission_denied": 7}
_HTTP_STATUS = {"invalid_argument": 400, "unauthenticated": 401, "permission_denied": 403}
