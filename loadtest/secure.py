"""Reaching a server that asks for an API key, TLS or a client certificate (mTLS).

The key is read from a file (``--token-file``), never given on the command line, where any
local user's ``ps`` shows it; it travels as ``authorization: Bearer <key>`` (HTTP header, gRPC
metadata), as tritonclient's ``headers=`` sends it. ``--tls`` trusts the system's CAs unless
``--tls-ca`` names one; ``--tls-cert`` and ``--tls-key`` go together, for a server that asks
for client certificates. The files are checked before the run, and each worker reads them
once as it connects.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any


class SecureError(ValueError):
    """A key or certificate file that cannot be used (the message names the flag)."""


@dataclass(frozen=True)
class Secure:
    token: str = ""
    tls: bool = False
    ca: str = ""  # PEM file paths
    cert: str = ""
    key: str = ""

    @classmethod
    def of(cls, token_file: str | None, tls: bool, ca: str | None, cert: str | None, key: str | None) -> Secure:
        """Checked: the key read (a file of one line), the TLS files readable, the client
        certificate and its key given together; any TLS file turns TLS on."""
        token = ""
        if token_file:
            token = _read(token_file, "token-file").decode("utf-8", "replace").strip()
            if not token:
                raise SecureError(f"token-file {token_file} is empty")
            if any(c in token for c in "\r\n") or not token.isprintable():
                raise SecureError(f"token-file {token_file} must hold one API key on one line")
        if bool(cert) != bool(key):
            raise SecureError("tls-cert and tls-key go together: a client certificate and its private key")
        for path, name in ((ca, "tls-ca"), (cert, "tls-cert"), (key, "tls-key")):
            if path:
                _read(path, name)
        s = cls(token, bool(tls or ca or cert), ca or "", cert or "", key or "")
        if s.tls:
            s.ssl_context()  # (a file that is not PEM, or a key that is not the certificate's: said now)
        return s

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def ssl_context(self) -> ssl.SSLContext:
        """An HTTPS client's context: the server's certificate checked against ``ca`` (else the
        system's CAs), and the client certificate when one is given."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca or None)
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise SecureError(f"the TLS files cannot be used: {e}") from None
        return ctx

    def grpc_credentials(self) -> Any:
        import grpc

        files = [
            _read(p, n) if p else None for p, n in ((self.ca, "tls-ca"), (self.key, "tls-key"), (self.cert, "tls-cert"))
        ]
        return grpc.ssl_channel_credentials(*files)

    def tritonclient_options(self, protocol: str) -> dict[str, Any]:
        """Keyword arguments for tritonclient's InferenceServerClient (metadata is read with it)."""
        if not self.tls:
            return {}
        if protocol == "grpc":
            return {"ssl": True, "root_certificates": self.ca or None, "private_key": self.key or None,
                    "certificate_chain": self.cert or None}  # fmt: skip
        return {"ssl": True, "ssl_context_factory": self.ssl_context}


def _read(path: str, name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise SecureError(f"{name} {path} cannot be read: {e.strerror}") from None
