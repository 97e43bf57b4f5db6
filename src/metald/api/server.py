"""The API's HTTP server: h2corn, embedded in metald's event loop.

h2corn (Rust, hyper-based HTTP/1.1 and HTTP/2) was chosen over hypercorn for
what gRPC and Connect clients need from the transport (see docs/api.md,
"Transport"): a call on a shared HTTP/2 connection completes whatever its
neighbours do (an early answer, a reset, an expired deadline), ASGI response
trailers, cleartext HTTP/2 (h2c) next to HTTP/1.1, a bounded graceful drain on
shutdown, and the verified client certificate in the ASGI scope
(``scope["extensions"]["tls"]``), so nothing private is patched.

TLS material rotates without a restart: metald owns the listening socket and
serves it with one h2corn server per generation of certificates. A new
generation starts on the same socket before the old one stops accepting and
drains; open connections keep what they shook hands with.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

import h2corn

from metald.api.tls import ServerTls, TlsMaterial

log = logging.getLogger(__name__)

BACKLOG = 1024


@dataclass(frozen=True)
class ServerOptions:
    address: str
    port: int
    grace_seconds: float
    handshake_timeout: float = 10.0


def listen(address: str, port: int) -> socket.socket:
    """A listening TCP socket on address:port (IPv4 or IPv6)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    return socket.create_server((address, port), family=family, backlog=BACKLOG, reuse_port=False)


@contextlib.contextmanager
def _pem_paths(material: TlsMaterial) -> Iterator[tuple[str, str, str]]:
    """The three PEM blobs as /proc/self/fd paths of anonymous memory files (never on disk)."""
    fds: list[int] = []
    try:
        for blob in (material.chain_pem, material.key_pem, material.ca_pem):
            fd = os.memfd_create("metald-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, blob)
        yield tuple(f"/proc/self/fd/{fd}" for fd in fds)  # type: ignore[misc]
    finally:
        for fd in fds:
            os.close(fd)


def _config(sock: socket.socket, options: ServerOptions, paths: tuple[str, str, str] | None) -> h2corn.Config:
    tls: dict[str, Any] = {}
    if paths is not None:
        tls = {"certfile": paths[0], "keyfile": paths[1], "ca_certs": paths[2], "cert_reqs": "required"}
    return h2corn.Config(
        bind=(f"fd://{sock.fileno()}",),
        lifespan="off",
        grpc=True,  # native gRPC admitted; the app applies its own body cap to every protocol
        http1=True,
        access_log=False,
        log_format="json",
        max_request_body_size=0,  # the app answers an oversize body itself (resource_exhausted)
        timeout_graceful_shutdown=options.grace_seconds,
        timeout_handshake=options.handshake_timeout,
        **tls,
    )


@dataclass
class _Generation:
    server: h2corn.Server
    task: asyncio.Task[None]


class ApiServer:
    """Serve an ASGI app on options.address:port until stop resolves (plaintext or mTLS)."""

    def __init__(self, app: Any, options: ServerOptions, tls: ServerTls | None = None) -> None:
        self.app = app
        self.options = options
        self.tls = tls
        self.sock: socket.socket | None = None

    async def _start(self, sock: socket.socket) -> _Generation:
        if self.tls is None:
            server = h2corn.Server(self.app, _config(sock, self.options, None))
            task = asyncio.create_task(server.serve(), name="metald-api")
            await self._started(server, task)
            return _Generation(server, task)
        with _pem_paths(self.tls.material()) as paths:  # read by h2corn at start, then closed
            server = h2corn.Server(self.app, _config(sock, self.options, paths))
            task = asyncio.create_task(server.serve(), name="metald-api")
            await self._started(server, task)
        return _Generation(server, task)

    @staticmethod
    async def _started(server: h2corn.Server, task: asyncio.Task[None]) -> None:
        started = asyncio.ensure_future(server.wait_started())
        await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            await task  # raises the startup error
            raise RuntimeError("the API server stopped while starting")
        started.result()

    async def serve(self, stop: Awaitable[Any]) -> None:
        self.sock = sock = listen(self.options.address, self.options.port)
        stopped = asyncio.ensure_future(stop)
        draining: list[asyncio.Task[None]] = []
        try:
            current = await self._start(sock)
            while True:
                waiters: set[asyncio.Future[Any]] = {stopped, current.task}
                rotated: asyncio.Future[Any] | None = None
                if self.tls is not None:
                    rotated = asyncio.ensure_future(self.tls.changed.wait())
                    waiters.add(rotated)
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if rotated is not None and not rotated.done():
                    rotated.cancel()
                if stopped.done() or current.task.done():
                    break
                assert self.tls is not None
                self.tls.changed.clear()
                new = await self._start(sock)  # accepts on the same socket from now on
                current.server.shutdown()  # the old one stops accepting and drains
                draining.append(current.task)
                current = new
            current.server.shutdown()
            await asyncio.gather(current.task, *draining)
        finally:
            if not stopped.done():
                stopped.cancel()
            sock.close()
