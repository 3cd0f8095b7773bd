"""TLS and a bearer token on the calls to a remote model's upstreams (``tls``, ``tls_ca_file``,
``tls_cert_file``, ``tls_key_file``, ``tls_server_name`` and ``token_file`` of its entry).

The files are read when the server starts (:func:`check_remote_files`: a ConfigError naming the
key and the file) and by each load of the model (:class:`UpstreamSecurity`), then watched at each
probe round: a cheap ``os.stat`` on a thread, as the server's own TLS files are watched
(``security/tls.py``, whose file helpers this reuses), and only once a change has stood still
for a round are they read and checked again. A good new set is used from then on: the token by
the next call, a certificate or CA bundle by the next connection (the open ones are let go once
their calls are answered). A bad set is logged and the previous one stays in use. The token is
never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass

import grpc

from ..core.errors import ConfigError
from ..remote_models import RemoteModel
from ..security.tls import (
    MIN_VERSION,
    TlsFileError,
    _EncryptedKey,
    _no_password,
    _pem_paths,
    _read_file,
    _reason,
    read_bounded,
)
from ..security.tls import _stat as stat_files

log = logging.getLogger("batchgate.remote")

MAX_TOKEN_BYTES = 16 << 10


@dataclass(frozen=True)
class Credentials:
    """One consistent set of what the files hold (PEM bytes; the token as sent)."""

    ca: bytes | None
    cert: bytes | None
    key: bytes | None
    token: str


def _read_token(path: str) -> str:
    token = read_bounded("token_file", path, MAX_TOKEN_BYTES, "a token").strip()
    if not token:
        raise TlsFileError(f"token_file {path}: holds no token (it is empty)")
    if not all(0x21 <= b <= 0x7E for b in token):  # (what a header value may carry; the token is not quoted)
        raise TlsFileError(f"token_file {path}: the token must be one word of printable ASCII")
    return token.decode("ascii")


def _read(spec: RemoteModel) -> Credentials:
    ca = _read_file("tls_ca_file", spec.tls_ca_file) if spec.tls_ca_file else None
    cert = _read_file("tls_cert_file", spec.tls_cert_file) if spec.tls_cert_file else None
    key = _read_file("tls_key_file", spec.tls_key_file) if spec.tls_key_file else None
    if ca is not None and b"CERTIFICATE-----" not in ca:
        raise TlsFileError(f"tls_ca_file {spec.tls_ca_file}: holds no PEM certificate")
    if cert is not None and b"CERTIFICATE-----" not in cert:
        raise TlsFileError(f"tls_cert_file {spec.tls_cert_file}: holds no PEM certificate")
    if key is not None and b"PRIVATE KEY-----" not in key:
        raise TlsFileError(f"tls_key_file {spec.tls_key_file}: holds no PEM private key")
    token = _read_token(spec.token_file) if spec.token_file else ""
    return Credentials(ca, cert, key, token)


def _context(spec: RemoteModel, creds: Credentials) -> ssl.SSLContext:
    """The h2 client's context (ALPN h2), built from ``creds``: a TlsFileError when they cannot
    be used (so this is also their check, before anything live is touched)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # (verifies the chain and the name)
    ctx.minimum_version = MIN_VERSION
    ctx.set_alpn_protocols(["h2"])
    if creds.ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        try:
            ctx.load_verify_locations(cadata=creds.ca.decode("ascii"))
        except (ssl.SSLError, ValueError) as e:
            raise TlsFileError(f"tls_ca_file {spec.tls_ca_file}: not a usable PEM CA bundle: {_reason(e)}") from None
    if creds.cert is not None and creds.key is not None:
        try:
            with _pem_paths(creds.cert, creds.key) as (cert_path, key_path):
                ctx.load_cert_chain(cert_path, key_path, password=_no_password)
        except _EncryptedKey:
            raise TlsFileError(
                f"tls_key_file {spec.tls_key_file}: the private key is encrypted; give an unencrypted key"
            ) from None
        except (ssl.SSLError, OSError) as e:
            raise TlsFileError(
                f"tls_cert_file {spec.tls_cert_file} and tls_key_file {spec.tls_key_file} cannot be used "
                f"together (the key must be the certificate's, both in PEM): {_reason(e)}"
            ) from None
    return ctx


def _system_roots() -> bytes | None:
    """The system's CA bundle, for gRPC (which otherwise trusts a bundle of its own)."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                continue
    return None


class UpstreamSecurity:
    """What one remote model's calls carry: TLS credentials for both clients and the token."""

    def __init__(self, spec: RemoteModel):
        self.spec = spec
        self._paths = tuple(p for p in (spec.tls_ca_file, spec.tls_cert_file, spec.tls_key_file, spec.token_file) if p)
        self._signature = self._polled = stat_files(self._paths)  # (that of the files in use; the last poll's)
        try:
            creds = _read(spec)
            context = _context(spec, creds) if spec.tls else None
        except TlsFileError as e:
            raise ConfigError(f"remote model '{spec.name}': {e}") from None
        self._apply(creds, context)
        self.reloads = 0
        self.reload_failures = 0

    def _apply(self, creds: Credentials, context: ssl.SSLContext | None) -> None:
        self.creds = creds
        self.ssl_context = context
        bearer = f"Bearer {creds.token}"
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", bearer),) if creds.token else ()
        self.header = f"Bearer {creds.token}".encode("ascii") if creds.token else b""

    def server_name(self, host: str) -> str:
        return self.spec.tls_server_name or host

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        c = self.creds
        roots = c.ca if c.ca is not None else _system_roots()
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=c.key, certificate_chain=c.cert)

    def authority(self, address: str) -> str:
        """The :authority of calls to ``address``: the name checked in the certificate, if one is
        given (so a proxy that routes by it sees what TLS was told), with the address's port."""
        name = self.spec.tls_server_name
        return f"{name}:{address.rpartition(':')[2]}" if name else address

    def grpc_options(self, address: str) -> list[tuple[str, str]]:
        name = self.spec.tls_server_name
        return (
            [("grpc.ssl_target_name_override", name), ("grpc.default_authority", self.authority(address))]
            if name
            else []
        )

    async def reload_if_changed(self) -> bool:
        """One check of the files: True when new TLS material is to be used (new connections);
        a new token alone is used by the next call, and answers False."""
        signature = await asyncio.to_thread(stat_files, self._paths)
        polled, self._polled = self._polled, signature
        # Read once a change has stood still for a poll, as the keys file is (security/auth.py):
        # a token file rewritten in place may be caught half-written, and a token cut short
        # would be sent, refused, until the next poll (a PEM file cut short fails its check).
        if signature == self._signature or signature != polled:
            return False
        self._signature = signature
        spec = self.spec
        try:
            creds = await asyncio.to_thread(_read, spec)
            context = _context(spec, creds) if spec.tls else None
        except TlsFileError as e:
            self.reload_failures += 1
            log.error(
                "remote model '%s': its files changed but cannot be used; the previous ones stay: %s", spec.name, e
            )
            return False
        old = self.creds
        if creds == old:
            return False
        tls_changed = (creds.ca, creds.cert, creds.key) != (old.ca, old.cert, old.key)
        self._apply(creds, context if tls_changed else self.ssl_context)
        self.reloads += 1
        what = [w for w, changed in (("TLS files", tls_changed), ("token", creds.token != old.token)) if changed]
        log.info("remote model '%s': upstream %s reloaded", spec.name, " and ".join(what))
        return tls_changed


def check_remote_files(specs: tuple[RemoteModel, ...]) -> None:
    """Read every remote model's TLS and token files once: a ConfigError names the first bad one."""
    for spec in specs:
        if spec.tls or spec.token_file:
            UpstreamSecurity(spec)


class TokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the current token to every call of a grpc.aio channel (probes, metadata, inference)."""

    def __init__(self, security: UpstreamSecurity):
        self.security = security

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        given = client_call_details.metadata
        metadata = grpc.aio.Metadata(*(given or ()), *self.security.metadata)
        return await continuation(client_call_details._replace(metadata=metadata), request)
