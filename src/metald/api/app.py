"""The ASGI application: health routes, a request-size cap, then ConnectRPC
(Connect JSON/binary and gRPC) for VmService."""

from __future__ import annotations

import json
from typing import Any

from metald.api.health import Health
from metald.api.service import VmServiceImpl
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


class MetaldApp:
    def __init__(self, service: VmServiceImpl, health: Health, max_request_bytes: int) -> None:
        self.connect = VmServiceASGIApplication(service, read_max_bytes=max_request_bytes)
        self.health = health
        self.max_request_bytes = max_request_bytes

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
        await self.connect(scope, receive, send)

    async def _too_large(self, scope: Scope, send: Any) -> bool:
        """Refuse a declared body over the cap before reading it (invalid_argument)."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is None or not length.isdigit() or int(length) <= self.max_request_bytes:
            return False
        message = f"request body: {int(length)} bytes exceeds the limit of {self.max_request_bytes}"
        content_type = headers.get(b"content-type", b"")
        if content_type.startswith(b"application/grpc"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", content_type),
                        (b"grpc-status", b"3"),
                        (b"grpc-message", message.replace(" ", "%20").encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        else:
            await _send_json(send, 400, {"code": "invalid_argument", "message": message})
        return True
