"""Transport security of the API: mutual TLS with SPIFFE identities.

``UNKEY_METALD_TLS_MODE``: ``disabled`` (plaintext, see ``daemon.bind_address``),
``file`` (PEM files, watched and reloaded) or ``spiffe`` (SVIDs from the SPIRE
agent, see :mod:`metald.api.spiffe`). With TLS on, every connection needs a
client certificate that chains to the trusted CA: the health endpoints too.

How this fits the server (:mod:`metald.api.server`, h2corn):

* Rotation. :class:`ServerTls` holds the current certificate chain, key and trust
  bundle (:class:`TlsMaterial`) and sets ``changed`` when they are replaced; the
  server then starts a new generation on the same listening socket and lets the
  old one drain. Open connections keep what they shook hands with, new ones get
  the new material, and a CA removed from the bundle is no longer trusted.
* Peer identity. The server verifies the client certificate during the
  handshake and puts the chain into the ASGI scope
  (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, leaf first);
  :meth:`ServerTls.peer_identity` reads the leaf's SPIFFE ID from there.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import os
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from metald.config import Settings
from metald.core.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

ALPN = ["h2", "http/1.1"]  # gRPC needs h2
_SPIFFE_ID = re.compile(r"^spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)+)$")


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
    """The verified client certificate of one connection."""

    spiffe_id: str | None
    not_after: datetime.datetime

    @classmethod
    def from_der(cls, der: bytes) -> Peer:
        cert = x509.load_der_x509_certificate(der)
        return cls(spiffe_id_of(cert), cert.not_valid_after_utc)


@functools.lru_cache(maxsize=1024)
def peer_from_pem(pem: str) -> Peer | None:
    """The peer of a PEM leaf certificate (cached: one parse per client certificate, not per request)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except ValueError:
        return None
    return Peer(spiffe_id_of(cert), cert.not_valid_after_utc)


def peer_of(scope: dict[str, Any]) -> Peer | None:
    """The verified client certificate of the request's connection, from the server's ASGI TLS extension."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or ()
    return peer_from_pem(chain[0]) if chain else None


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
@dataclass(frozen=True)
class TlsMaterial:
    """What the server presents and trusts: PEM chain and key, and the PEM CA bundle for client certificates."""

    chain_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    serial: int


class ServerTls:
    """The current TLS material of the API server, and the policy for its clients."""

    mode = "tls"

    def __init__(self, policy: IdentityPolicy) -> None:
        self.policy = policy
        self._material: TlsMaterial | None = None
        self._lock = threading.Lock()  # install() may run in a SPIFFE source thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self.changed = asyncio.Event()  # set (on the server's loop) when new material is installed
        self.serial: int | None = None  # of the server certificate now served

    def material(self) -> TlsMaterial:
        with self._lock:
            if self._material is None:
                raise TlsError("no server certificate loaded")
            return self._material

    def install(self, chain_pem: bytes, key_pem: bytes, ca_pem: str, serial: int) -> None:
        """Serve this material to every new connection from now on (checked first: ssl.SSLError if unusable)."""
        server_context(chain_pem, key_pem, ca_pem)  # validates chain, key and bundle together
        with self._lock:
            self._material = TlsMaterial(chain_pem, key_pem, ca_pem.encode("ascii", "replace"), serial)
            self.serial = serial
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.changed.set)

    def peer_identity(self, scope: dict[str, Any]) -> str | None:
        """The request's caller: the SPIFFE ID of its connection's client certificate (see IdentityPolicy)."""
        return self.policy.check(peer_of(scope))

    async def start(self) -> None:
        """Begin watching for new material."""
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Stop watching."""


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
        self.install(cert, key, ca.decode("ascii", "replace"), serial_of(cert))
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
        await super().start()
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
    await tls.start()
    log.info("API TLS ready", extra={"mode": tls.mode, "serial": f"{tls.serial:x}"})
    return tls
