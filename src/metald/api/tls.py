"""Transport security of the API: mutual TLS with SPIFFE identities.

``UNKEY_METALD_TLS_MODE``: ``disabled`` (plaintext, see ``daemon.bind_address``),
``file`` (PEM files, watched and reloaded) or ``spiffe`` (SVIDs from the SPIRE
agent, see :mod:`metald.api.spiffe`). With TLS on, every connection needs a
client certificate that chains to the trusted CA: the health endpoints too.

How this fits hypercorn:

* Rotation. Hypercorn asks its Config for an ``SSLContext`` once, at start.
  :class:`TlsConfig` hands it the *front* context, which :class:`ServerTls` owns
  for the life of the process. Its ``sni_callback`` (run by OpenSSL on every
  ClientHello, with or without SNI) moves the connection onto the *current*
  context, built fresh from the newest certificate, key and trust bundle.
  Rotating is building a context and swapping one reference: open connections
  keep what they shook hands with, new ones get the new material. (Reloading one
  context in place is not enough: ``load_verify_locations`` only ever adds CAs,
  so a CA removed from the bundle would stay trusted.)
* Peer identity. Hypercorn does not put the client certificate into the ASGI
  scope. :func:`install_peer_hook` wraps ``hypercorn.asyncio.tcp_server.TCPServer.run``:
  for a server run with a :class:`TlsConfig` it records the connection's verified
  peer certificate under ``(scope["client"], scope["server"])`` until the
  connection closes; :meth:`ServerTls.peer_identity` reads it back for a request.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import parse_socket_addr

from metald.config import Settings
from metald.core.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

ALPN = ["h2", "http/1.1"]  # gRPC needs h2
_SPIFFE_ID = re.compile(r"^spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)+)$")

Address = tuple[str, int] | None
ConnectionKey = tuple[Address, Address]


class TlsError(Exception):
    """TLS cannot be set up: metald refuses to start (it never falls back to plaintext)."""


# --- certificates -------------------------------------------------------------
def spiffe_id_of(cert: x509.Certificate) -> str | None:
    """The certificate's SPIFFE ID: its one URI SAN, if that is a valid ``spiffe://`` ID."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:  # an X509-SVID has exactly one URI SAN
        return None
    match = _SPIFFE_ID.match(uris[0])
    if match is None or any(seg in (".", "..") for seg in match.group(2).split("/")):
        return None
    return uris[0]


def trust_domain_of(spiffe_id: str) -> str:
    return spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


def server_context(chain_pem: bytes, key_pem: bytes, ca_pem: str) -> ssl.SSLContext:
    """A server context: this certificate and key, client certificates required and checked against ca_pem."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2 suites HTTP/2 accepts; 1.3 suites are separate
    # no session tickets: a resumed session would skip the client certificate check against today's bundle
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(ALPN)
    # ssl loads a certificate chain only from a file: use an anonymous in-memory one, never the disk
    fd = os.memfd_create("metald-tls", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            f.write(chain_pem.rstrip() + b"\n" + key_pem)
        path = f"/proc/self/fd/{fd}"
        ctx.load_cert_chain(path, path)
    finally:
        os.close(fd)
    if "-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise ssl.SSLError("the CA bundle holds no PEM certificate")
    ctx.load_verify_locations(cadata=ca_pem)
    return ctx


def serial_of(chain_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(chain_pem).serial_number


# --- peers --------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Peer:
    """The verified client certificate of one live connection."""

    spiffe_id: str | None
    not_after: datetime.datetime

    @classmethod
    def from_der(cls, der: bytes) -> Peer:
        cert = x509.load_der_x509_certificate(der)
        return cls(spiffe_id_of(cert), cert.not_valid_after_utc)


@dataclass
class PeerRegistry:
    """Peer certificates of live TLS connections, keyed as hypercorn's scope names the connection."""

    peers: dict[ConnectionKey, Peer] = field(default_factory=dict)

    def lookup(self, scope: dict[str, Any]) -> Peer | None:
        client, server = scope.get("client"), scope.get("server")
        key = (tuple(client) if client else None, tuple(server) if server else None)
        return self.peers.get(key)  # type: ignore[arg-type]

    def add(self, key: ConnectionKey, peer: Peer) -> None:
        self.peers[key] = peer

    def discard(self, key: ConnectionKey, peer: Peer) -> None:
        """Forget peer, unless its address now belongs to a newer connection."""
        if self.peers.get(key) is peer:
            del self.peers[key]

    def __len__(self) -> int:
        return len(self.peers)


def install_peer_hook() -> None:
    """Wrap hypercorn's asyncio ``TCPServer.run`` (once per process) to record peer certificates.

    Only servers whose Config is a :class:`TlsConfig` are affected: before hypercorn
    starts the connection, the wrapper reads ``ssl_object.getpeercert(binary_form=True)``
    (verified: the handshake with ``CERT_REQUIRED`` is complete by then) and stores it
    in that config's :class:`PeerRegistry` under ``(client, server)`` computed exactly as
    hypercorn computes ``scope["client"]``/``scope["server"]``; the entry is removed when
    the connection ends.
    """
    if getattr(TCPServer.run, "_metald_peer_hook", False):
        return
    original: Callable[[TCPServer], Awaitable[None]] = TCPServer.run

    @functools.wraps(original)
    async def run(self: TCPServer) -> None:
        tls = getattr(self.config, "metald_tls", None)
        ssl_object = self.writer.get_extra_info("ssl_object")
        if not isinstance(tls, ServerTls) or ssl_object is None:
            return await original(self)
        try:
            sock = self.writer.get_extra_info("socket")
            client = parse_socket_addr(sock.family, sock.getpeername())
            key = (client, parse_socket_addr(sock.family, sock.getsockname()))
            der = ssl_object.getpeercert(binary_form=True)
            peer = Peer.from_der(der) if der else None
        except (OSError, ValueError):
            return await original(self)  # peer gone (hypercorn handles it) or unreadable cert (no identity)
        if peer is None:
            return await original(self)
        tls.peers.add(key, peer)
        try:
            await original(self)
        finally:
            tls.peers.discard(key, peer)

    run._metald_peer_hook = True  # type: ignore[attr-defined]
    TCPServer.run = run  # type: ignore[method-assign]


# --- policy -------------------------------------------------------------------
class IdentityPolicy:
    """Which SPIFFE IDs may call: one trust domain (if set) and an optional allow-list."""

    def __init__(self, trust_domain: str | None, allowed: list[str]) -> None:
        self.trust_domain = trust_domain or None
        self.exact = {a for a in allowed if not a.endswith("/*")}
        self.prefixes = tuple(a[:-1] for a in allowed if a.endswith("/*"))

    def check(self, peer: Peer | None) -> str:
        """The caller's SPIFFE ID; Unauthenticated or PermissionDenied otherwise."""
        if peer is None or peer.spiffe_id is None:
            raise Unauthenticated("a client certificate with a SPIFFE ID is required")
        if peer.not_after < datetime.datetime.now(datetime.UTC):
            raise Unauthenticated("the client certificate has expired: reconnect with a current one")
        spiffe_id = peer.spiffe_id
        if self.trust_domain is not None and trust_domain_of(spiffe_id) != self.trust_domain:
            raise Unauthenticated(f"SPIFFE ID {spiffe_id} is not in trust domain {self.trust_domain}")
        if (self.exact or self.prefixes) and spiffe_id not in self.exact and not spiffe_id.startswith(self.prefixes):
            raise PermissionDenied(f"SPIFFE ID {spiffe_id} is not allowed to call metald")
        return spiffe_id


# --- server TLS ---------------------------------------------------------------
class ServerTls:
    """A long-lived front SSLContext for hypercorn, the current material behind it, and connection peers."""

    mode = "tls"

    def __init__(self, policy: IdentityPolicy) -> None:
        self.policy = policy
        self.peers = PeerRegistry()
        self._front: ssl.SSLContext | None = None
        self._current: ssl.SSLContext | None = None
        self.serial: int | None = None  # of the server certificate now served

    @property
    def front(self) -> ssl.SSLContext:
        if self._front is None:
            raise TlsError("no server certificate loaded")
        return self._front

    def install(self, ctx: ssl.SSLContext, serial: int) -> None:
        """Serve ctx to every new connection from now on (the first one becomes the front context)."""
        if self._front is None:
            ctx.sni_callback = self._on_client_hello
            self._front = ctx
        self._current = ctx
        self.serial = serial

    def _on_client_hello(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, ctx: ssl.SSLContext) -> None:
        current = self._current
        if current is not None and current is not ctx:
            conn.context = current

    def peer_identity(self, scope: dict[str, Any]) -> str | None:
        """The request's caller: the SPIFFE ID of its connection's client certificate (see IdentityPolicy)."""
        return self.policy.check(self.peers.lookup(scope))

    def hypercorn_config(self) -> TlsConfig:
        return TlsConfig(self)

    async def start(self) -> None:
        """Begin watching for new material."""

    async def close(self) -> None:
        """Stop watching."""


class TlsConfig(HypercornConfig):
    """Hypercorn settings serving TLS from a ServerTls's front context (no certfile/keyfile needed)."""

    def __init__(self, tls: ServerTls) -> None:
        super().__init__()
        self.metald_tls = tls
        self.ssl_handshake_timeout = 10

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self.metald_tls.front


class FileTls(ServerTls):
    """``file`` mode: server certificate, key and CA bundle from PEM files, polled and reloaded on change."""

    mode = "file"

    def __init__(self, cert: Path, key: Path, ca: Path, interval: float, policy: IdentityPolicy) -> None:
        super().__init__(policy)
        self.files = (cert, key, ca)
        self.interval = interval
        self._stamp: tuple[tuple[int, ...], ...] | None = None
        self._failed: tuple[tuple[int, ...], ...] | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> FileTls:
        assert settings.tls_cert_file and settings.tls_key_file and settings.tls_ca_file  # checked by Settings
        policy = IdentityPolicy(settings.spiffe_trust_domain, settings.allowed_spiffe_ids)
        files = (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)
        tls = cls(*files, settings.tls_reload_seconds, policy)
        try:
            tls.load()
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load the TLS files (UNKEY_METALD_TLS_*_FILE): {exc}") from None
        return tls

    def _stat(self) -> tuple[tuple[int, ...], ...]:
        out = []
        for path in self.files:
            st = path.stat()  # follows symlinks: an atomically swapped link target counts as a change
            out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
        return tuple(out)

    def load(self) -> None:
        """Read the three files and serve them to new connections."""
        stamp = self._stat()
        cert, key, ca = (p.read_bytes() for p in self.files)
        ctx = server_context(cert, key, ca.decode("ascii", "replace"))
        self.install(ctx, serial_of(cert))
        self._stamp = stamp

    def reload_if_changed(self) -> bool:
        """Reload when a file changed; a broken set (e.g. half-written) keeps the old material."""
        stamp = None
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            self.load()
        except (OSError, ValueError, ssl.SSLError) as exc:
            if stamp is None or stamp != self._failed:
                log.warning("TLS files changed but cannot be loaded, still serving the previous ones: %s", exc)
                self._failed = stamp
            return False
        log.info("TLS files reloaded", extra={"serial": f"{self.serial:x}"})
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.reload_if_changed()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="metald-tls-files")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def open_tls(settings: Settings) -> ServerTls | None:
    """The API's TLS per settings.tls_mode (None: disabled); raises TlsError when it cannot be set up."""
    if settings.tls_mode == "disabled":
        return None
    tls: ServerTls
    if settings.tls_mode == "file":
        tls = FileTls.from_settings(settings)
    else:
        from metald.api.spiffe import SpiffeTls

        tls = await asyncio.to_thread(SpiffeTls.from_settings, settings)
    install_peer_hook()
    await tls.start()
    log.info("API TLS ready", extra={"mode": tls.mode, "serial": f"{tls.serial:x}"})
    return tls
