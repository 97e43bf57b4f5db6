"""``spiffe`` mode: the server's X.509 SVID and trust bundle from the SPIRE agent.

py-spiffe's ``X509Source`` holds a ``FetchX509SVID`` stream open to the Workload
API socket; each update (a rotated SVID or bundle) calls :meth:`SpiffeTls._on_update`
in the source's thread, which builds a fresh server context and installs it for
new connections (see :mod:`metald.api.tls`). Only the bundle of the SVID's own
trust domain is trusted, and client IDs must be in that trust domain: a federated
CA could otherwise sign IDs that look like ours. Startup fails (TlsError) when the
socket is missing or no SVID arrives in time; metald never falls back to plaintext.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from metald.api.tls import IdentityPolicy, ServerTls, TlsError, trust_domain_of
from metald.config import Settings

if TYPE_CHECKING:
    from spiffe import X509Source
    from spiffe.workloadapi.x509_context import X509Context

log = logging.getLogger(__name__)

_PEM = serialization.Encoding.PEM


def socket_url(value: str) -> str:
    """``unix:///path`` for a path or a unix URL."""
    return "unix://" + value.removeprefix("unix://")


def open_source(url: str, timeout: float) -> X509Source:
    """Connect to the Workload API and wait up to timeout for the first SVID (blocking)."""
    from spiffe import X509Source
    from spiffe.errors import PySpiffeError

    path = Path(url.removeprefix("unix://"))
    if not path.is_socket():
        raise TlsError(
            f"the SPIRE agent's Workload API socket {path} does not exist (UNKEY_METALD_SPIFFE_SOCKET): "
            "start spire-agent, or pick another UNKEY_METALD_TLS_MODE; metald does not serve without TLS"
        )
    try:
        return X509Source(socket_path=url, timeout_in_seconds=timeout)
    except PySpiffeError as exc:
        raise TlsError(
            f"no X.509 SVID from the SPIRE agent at {path} within {timeout:g}s ({exc}): is this workload "
            "registered (spire-server entry create)? metald does not serve without TLS"
        ) from None


class SpiffeTls(ServerTls):
    """Server TLS from an X509Source, reloaded on every Workload API update."""

    mode = "spiffe"

    def __init__(self, source: X509Source, url: str, timeout: float, interval: float, allowed: list[str]) -> None:
        super().__init__(IdentityPolicy(None, allowed))
        self.url = url
        self.timeout = timeout
        self.interval = interval
        self.spiffe_id = ""
        self._source = source
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._apply(source.get_x509_context())
        self.policy.trust_domain = self.trust_domain
        source.subscribe_for_updates(self._on_update)

    @classmethod
    def from_settings(cls, settings: Settings) -> SpiffeTls:
        """Wait for the first SVID (blocking); raises TlsError."""
        url = socket_url(settings.spiffe_socket)
        source = open_source(url, settings.spiffe_timeout_seconds)
        try:
            tls = cls(source, url, settings.spiffe_timeout_seconds, settings.tls_reload_seconds,
                      settings.allowed_spiffe_ids)
        except Exception as exc:
            source.close()
            raise TlsError(f"the SVID from the SPIRE agent is unusable: {exc}") from None
        if settings.spiffe_trust_domain and settings.spiffe_trust_domain != tls.trust_domain:
            source.close()
            raise TlsError(
                f"the SVID {tls.spiffe_id} is in trust domain {tls.trust_domain}, "
                f"not UNKEY_METALD_SPIFFE_TRUST_DOMAIN={settings.spiffe_trust_domain}"
            )
        return tls

    @property
    def trust_domain(self) -> str:
        return trust_domain_of(self.spiffe_id)

    def _apply(self, context: X509Context) -> None:
        svid = context.default_svid
        spiffe_id = str(svid.spiffe_id)
        if self.spiffe_id and trust_domain_of(spiffe_id) != self.trust_domain:
            raise TlsError(f"the new SVID {spiffe_id} left trust domain {self.trust_domain}")
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        if bundle is None or not bundle.x509_authorities:
            raise TlsError(f"the Workload API sent no X.509 bundle for {svid.spiffe_id.trust_domain}")
        chain = b"".join(cert.public_bytes(_PEM) for cert in svid.cert_chain)
        key = svid.private_key.private_bytes(
            _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        ca = "".join(cert.public_bytes(_PEM).decode() for cert in bundle.x509_authorities)
        self.install(chain, key, ca, svid.leaf.serial_number)
        self.spiffe_id = spiffe_id

    def _on_update(self) -> None:
        """X509Source callback (its thread): serve the rotated SVID/bundle to new connections."""
        try:
            self._apply(self._source.get_x509_context())
        except Exception as exc:
            log.error("cannot use the SVID update from the SPIRE agent, keeping the previous one: %s", exc)
            return
        log.info("SVID rotated", extra={"spiffe_id": self.spiffe_id, "serial": f"{self.serial:x}"})

    async def _watch(self) -> None:
        """Reopen the source if its stream ended for good (it retries transient errors itself)."""
        while True:
            await asyncio.sleep(self.interval)
            if not self._source.is_closed() or self._closing:
                continue
            log.error("the Workload API stream stopped; reconnecting (serving the last SVID meanwhile)")
            try:
                source = await asyncio.to_thread(open_source, self.url, self.timeout)
            except TlsError as exc:
                log.error("%s", exc)
                continue
            self._source = source
            source.subscribe_for_updates(self._on_update)
            self._on_update()

    async def start(self) -> None:
        await super().start()
        self._task = asyncio.create_task(self._watch(), name="metald-tls-spiffe")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self._source.close)
