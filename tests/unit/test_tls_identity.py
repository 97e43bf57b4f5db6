"""A small test PKI issuing SPIFFE-style certificates (used by the TLS tests), and
unit tests of how a certificate becomes a caller identity."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from metald.api.tls import IdentityPolicy, Peer, spiffe_id_of, trust_domain_of
from metald.core.errors import PermissionDenied, Unauthenticated

PEM = serialization.Encoding.PEM
NOW = datetime.datetime.now(datetime.UTC)


@dataclass
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """(certificate file, key file) in directory."""
        crt, key = directory / f"{name}.crt", directory / f"{name}.key"
        crt.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return crt, key


class Ca:
    """A self-signed root that issues X509-SVID-shaped leaves."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(PEM)

    def issue(self, *uris: str, server: bool = False, expired: bool = False) -> Leaf:
        """A leaf with these URI SANs (server: also 127.0.0.1/localhost for hostname checks)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = (NOW - datetime.timedelta(days=3), NOW - datetime.timedelta(days=1)) if expired else (
            NOW - datetime.timedelta(hours=1),
            NOW + datetime.timedelta(days=1),
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        if server:
            names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, True, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Leaf(builder.sign(self.key, hashes.SHA256()), key)


# --- unit tests ---------------------------------------------------------------
@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca("metald.test CA")


def test_spiffe_id_is_the_single_spiffe_uri_san(ca: Ca) -> None:
    assert spiffe_id_of(ca.issue("spiffe://metald.test/customer/acme").cert) == "spiffe://metald.test/customer/acme"
    assert spiffe_id_of(ca.issue().cert) is None
    assert spiffe_id_of(ca.issue("https://metald.test/x").cert) is None
    assert spiffe_id_of(ca.issue("spiffe://a.test/x", "spiffe://a.test/y").cert) is None  # exactly one URI SAN
    assert spiffe_id_of(ca.issue("spiffe://metald.test").cert) is None  # a trust domain is not a workload
    assert spiffe_id_of(ca.issue("spiffe://metald.test/a/../ops").cert) is None
    assert spiffe_id_of(ca.issue("spiffe://Metald.test/x").cert) is None
    assert trust_domain_of("spiffe://metald.test/customer/acme") == "metald.test"


def _peer(spiffe_id: str | None, expired: bool = False) -> Peer:
    delta = datetime.timedelta(hours=-1 if expired else 1)
    return Peer(spiffe_id, NOW + delta)


def test_policy() -> None:
    policy = IdentityPolicy("metald.test", ["spiffe://metald.test/customer/*", "spiffe://metald.test/ops/console"])
    assert policy.check(_peer("spiffe://metald.test/customer/acme")) == "spiffe://metald.test/customer/acme"
    assert policy.check(_peer("spiffe://metald.test/ops/console")) == "spiffe://metald.test/ops/console"
    for denied in ("spiffe://metald.test/ops/console2", "spiffe://metald.test/customer", "spiffe://metald.test/x"):
        with pytest.raises(PermissionDenied):
            policy.check(_peer(denied))
    for unauthenticated in (None, _peer(None), _peer("spiffe://evil.test/customer/acme"),
                            _peer("spiffe://metald.test/customer/acme", expired=True)):
        with pytest.raises(Unauthenticated):
            policy.check(unauthenticated)
    open_policy = IdentityPolicy(None, [])
    assert open_policy.check(_peer("spiffe://any.test/whatever")) == "spiffe://any.test/whatever"
