"""Certificates for the TLS tests, made with ``cryptography``: a CA, a server certificate for
127.0.0.1 and localhost, a client certificate, and a second CA with a client certificate of its
own that a gateway asking for mTLS must refuse."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def subject(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


@dataclass
class Cert:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def write(self, directory: Path, stem: str) -> tuple[str, str]:
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.pem)
        key.write_bytes(self.key_pem)
        return str(cert), str(key)


def make_cert(
    subject: x509.Name, issuer: Cert | None = None, *, ca: bool = False, server: bool = False, days: float = 2
) -> Cert:
    key = new_key()
    now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=min(0, 2 * days))  # days < 0: expired
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=abs(days)))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # (key identifiers, as real CAs write them: Python 3.13 verifies strictly and refuses a
        # certificate without the Authority Key Identifier)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key((issuer.key if issuer else key).public_key()),
            critical=False,
        )
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return Cert(b.sign(issuer.key if issuer else key, hashes.SHA256()), key)


@dataclass
class Pki:
    dir: Path
    ca: Cert
    server: Cert
    client: Cert
    other_ca: Cert
    rogue_client: Cert  # signed by other_ca

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def new_server(self) -> Cert:
        return make_cert(subject("gateway", "Acme"), self.ca, server=True)


def make_pki(d: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a second
    CA with a client certificate of its own, written into ``d``."""
    ca = make_cert(subject("batchgate test CA"), ca=True)
    other = make_cert(subject("other CA"), ca=True)
    p = Pki(
        d,
        ca,
        make_cert(subject("gateway", "Acme"), ca, server=True),
        make_cert(subject("client", "Acme"), ca),
        other,
        make_cert(subject("client", "Acme"), other),
    )
    (d / "ca.crt").write_bytes(ca.pem)
    (d / "other-ca.crt").write_bytes(other.pem)
    p.server.write(d, "server")
    p.client.write(d, "client")
    p.rogue_client.write(d, "rogue")
    return p
