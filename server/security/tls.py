"""TLS on the V2 listeners: HTTPS and gRPC over TLS on the same ports, mTLS with a client CA,
certificates reloaded when their files change, and the caller's certificate subject.

:class:`ServerTls` reads ``tls_cert_file``, ``tls_key_file`` and ``tls_client_ca_file`` once at
start (a missing, unreadable or mismatched file is a :class:`ConfigError` naming the setting
and the file) and then watches them every ``tls_poll_s``: a cheap ``os.stat`` on a thread, and
only when a file changed (new inode, size, mtime or ctime; a swapped symlink counts) are the
files read, on a thread, and checked in a scratch context. A good new set is then handed to both
listeners; a bad or half-written one is logged and the previous certificate keeps serving.

- HTTP and gRPC on the h2 engine: the ``ssl.SSLContext`` each listener was given stays theirs;
  a reload builds a fresh context from the new bytes (on the loop thread, where connections are
  made), and the listener's SNI callback, which OpenSSL calls on every ClientHello, moves each
  new handshake onto it. New handshakes get the new certificate and trust exactly the new CA
  bundle (a CA *removed* from ``tls_client_ca_file`` is no longer trusted: a trust store can
  only grow, so reloading the old context could not take it out); open connections keep theirs.
  Each accepted connection starts its handshake on the newest context (:meth:`ServerTls.newest`),
  whose session cache and ticket keys are the reload's own: a session from before a reload is
  not resumed after it (resumption skips the client's chain verification).
- gRPC on grpcio: ``grpc.dynamic_ssl_server_credentials``. gRPC core calls the fetcher on its own thread
  before every handshake; it answers from memory under a lock (None while nothing changed), so a
  handshake never waits on the file system.

The subject of a verified client certificate is an RFC 4514 string, identical for both protocols
(``CN=client,O=Acme``, the format of ``cryptography``'s ``Name.rfc4514_string()``), read from the
certificate's DER: :func:`grpc_peer_subject` for a gRPC servicer context, :func:`http_peer_subject`
for an ASGI scope, whose ``extensions["tls"]`` (the ASGI TLS extension, with ``client_cert_name``)
the HTTP protocol fills in from :func:`tls_extension`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from ..config import TlsSettings
from ..core.errors import ConfigError

log = logging.getLogger("batchgate.tls")

MIN_VERSION = ssl.TLSVersion.TLSv1_2
MAX_FILE_BYTES = 4 << 20  # a PEM file larger than this is refused (a large CA bundle is ~200 KiB)
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}  # the ASGI TLS extension's tls_version


class TlsFileError(ValueError):
    """A certificate file cannot be used; the message names the setting and the file."""


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of one consistent set of files."""

    cert: bytes
    key: bytes
    ca: bytes | None


# ---------------------------------------------------------------------------- server side
class ServerTls:
    """The TLS state both listeners share, and its reloading (see the module's docstring)."""

    def __init__(self, settings: TlsSettings):
        self.settings = settings
        self.mtls = bool(settings.tls_client_ca_file)
        self._paths = tuple(
            p for p in (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) if p
        )
        self._signature = _stat(self._paths)
        try:
            material = _read(settings)
            _check(material, self.settings)
        except TlsFileError as e:
            raise ConfigError(str(e)) from None
        self._material = material
        # The listeners keep the context they were given; after a reload each handshake is moved
        # to a fresh context (``_serving``, by ALPN) from the SNI callback, which OpenSSL calls on
        # every ClientHello. A fresh context, not the old one reloaded: a trust store only grows,
        # so a CA taken out of tls_client_ca_file would stay trusted.
        self._serving: dict[str, ssl.SSLContext] = {}
        self.http_context = self._listener_context("http/1.1")
        self._lock = threading.Lock()  # the gRPC fetcher runs on gRPC core's threads
        self._grpc_config = _grpc_config(material)
        self._generation = 0  # bumped by each reload
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.reload_failures = 0  # changes of the files that could not be used (a metric)
        self._refused: object = None  # the signature of files just refused, until the next poll
        self.not_after = _log_loaded("TLS with client certificates (mTLS)" if self.mtls else "TLS", material.cert)

    # ------------------------------------------------------------------ listeners
    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``; they follow every reload. Each call's own: every
        gRPC server (the main port on the grpcio engine, the admin port) fetches for itself, and
        one generation mark shared by all let the first server to shake hands after a reload take
        the new files from the others, which served the old certificate and CA bundle on."""
        with self._lock:
            config, handed = self._grpc_config, self._generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC core before each handshake, on its thread: the new configuration
            # once after a reload, None (no change) otherwise.
            nonlocal handed
            with self._lock:
                if handed == self._generation:
                    return None
                handed = self._generation
                return self._grpc_config

        return grpc.dynamic_ssl_server_credentials(config, fetch, self.mtls)

    def newest(self, alpn: str) -> Callable[[], ssl.SSLContext]:
        """What a listener (``tls_accept.TlsAccept``) starts each handshake on: the newest
        context for ``alpn``. Its session cache and ticket keys are its own, made by the reload
        that made it, so a TLS session from before a reload (a client whose CA has since been
        taken out of the bundle) cannot be resumed after it: OpenSSL resumes from the context a
        handshake *started* on, without verifying the client's chain again, and the SNI
        callback's switch comes too late to stop that."""
        if alpn not in self._serving:  # (batchgate's own gRPC engine's: made when asked)
            self._listener_context(alpn)
        return functools.partial(self._serving.__getitem__, alpn)

    def _listener_context(self, alpn: str) -> ssl.SSLContext:
        ctx = _context(self.mtls, alpn)
        _load(ctx, self._material)
        self._serving[alpn] = ctx

        def serve_current(conn: ssl.SSLObject, _name: str | None, given: ssl.SSLContext) -> None:
            current = self._serving[alpn]
            if current is not given:
                conn.context = current

        ctx.sni_callback = serve_current
        return ctx

    # ------------------------------------------------------------------ reloading
    def start(self) -> None:
        """Watch the files every ``tls_poll_s`` (on the running loop)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tls_poll_s)
            try:
                await self.reload_if_changed()
            except Exception:  # never let the watch die: the next change gets its chance
                log.exception("checking the TLS files failed")

    async def reload_if_changed(self) -> bool:
        """One check: True if a changed, good set of files is now served."""
        signature = await asyncio.to_thread(_stat, self._paths)
        if signature == self._signature:
            if self._refused == signature:  # refused files that stood still for a poll: a failure
                self.reload_failures += 1  # (a writer between its certificate and its key is not)
                self._refused = None
            return False
        # Remembered before reading: a file still being written changes again, and is read again.
        self._signature = signature
        try:
            material = await asyncio.to_thread(self._read_checked)
        except TlsFileError as e:
            log.error("TLS files changed but cannot be used, the previous certificate is still served: %s", e)
            self._refused = signature
            return False
        self._refused = None
        if material == self._material:
            return False
        self._apply(material)
        return True

    def _read_checked(self) -> TlsMaterial:
        material = _read(self.settings)
        _check(material, self.settings)
        return material

    def _apply(self, material: TlsMaterial) -> None:
        """Serve ``material`` (checked) from the next handshake on; on the loop thread."""
        for alpn in self._serving:
            fresh = _context(self.mtls, alpn)
            _load(fresh, material)
            self._serving[alpn] = fresh
        config = _grpc_config(material)
        with self._lock:
            self._grpc_config = config
            self._generation += 1
        self._material = material
        self.reloads += 1
        self.not_after = _log_loaded("TLS files reloaded", material.cert)


def load_server_tls(settings: TlsSettings) -> ServerTls | None:
    """The TLS state for the listeners, or None when TLS is off; ConfigError on bad files."""
    if not settings.tls_cert_file:
        return None
    return ServerTls(settings)


def ops_grpc_options(max_connections: int, handshake_timeout_s: float) -> list[tuple[str, Any]]:
    """gRPC core's bounds for an operations listener (health, admin): connections at once (one
    more is refused by gRPC core, which does not tell Python: not counted) and the time a
    connection's handshake may take (gRPC core's default is two minutes)."""
    return [
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.server_handshake_timeout_ms", max(1, int(handshake_timeout_s * 1000))),
    ]


# ---------------------------------------------------------------------------- the caller
def grpc_peer_subject(context: Any) -> str | None:
    """The RFC 4514 subject of the client certificate of a gRPC call (mTLS), else None."""
    try:
        pem = context.auth_context().get("x509_pem_cert")
    except Exception:  # no auth context (plaintext) or an unexpected shape
        return None
    if not pem:
        return None
    return _subject_of_pem(bytes(pem[0]))


def http_peer_subject(scope: Mapping[str, Any]) -> str | None:
    """The RFC 4514 subject of the client certificate of an ASGI request (mTLS), else None."""
    tls = scope.get("extensions", {}).get("tls")
    return tls.get("client_cert_name") if tls else None


def tls_extension(transport: Any) -> dict[str, Any] | None:
    """The ASGI TLS extension of a connection (after its handshake), or None when plaintext."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    name = None
    if der:
        try:
            name = subject_of_der(der)
        except ValueError:  # verified by OpenSSL, so not expected; the subject is then unknown
            name = None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": name,
        "client_cert_error": None,  # a certificate that did not verify fails the handshake
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


@functools.lru_cache(maxsize=256)
def _subject_of_pem(pem: bytes) -> str | None:
    try:
        return subject_of_der(ssl.PEM_cert_to_DER_cert(pem.decode("ascii")))
    except ValueError:
        return None


# ---------------------------------------------------------------------------- files
def _stat(paths: tuple[str, ...]) -> tuple[tuple[int, ...] | None, ...]:
    """What changes when a file is rewritten or a symlink swapped (None: missing)."""
    out: list[tuple[int, ...] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def read_bounded(setting: str, path: str, limit: int, kind: str) -> bytes:
    """A file's bytes, refused (TlsFileError naming the setting and file) when it cannot be read
    or is larger than ``limit`` (then it is not a ``kind``)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise TlsFileError(f"{setting} {path}: cannot read it: {e.strerror}") from None
    if len(data) > limit:
        raise TlsFileError(f"{setting} {path}: larger than {limit} bytes, not {kind}")
    return data


def _read_file(setting: str, path: str) -> bytes:
    data = read_bounded(setting, path, MAX_FILE_BYTES, "a certificate file")
    if b"-----BEGIN" not in data:
        raise TlsFileError(f"{setting} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def _read(settings: TlsSettings) -> TlsMaterial:
    cert = _read_file("tls_cert_file", settings.tls_cert_file)
    key = _read_file("tls_key_file", settings.tls_key_file)
    ca = _read_file("tls_client_ca_file", settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    if b"CERTIFICATE-----" not in cert:
        raise TlsFileError(f"tls_cert_file {settings.tls_cert_file}: holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise TlsFileError(f"tls_key_file {settings.tls_key_file}: holds no PEM private key")
    if ca is not None and b"CERTIFICATE-----" not in ca:
        raise TlsFileError(f"tls_client_ca_file {settings.tls_client_ca_file}: holds no PEM certificate")
    return TlsMaterial(cert, key, ca)


def _check(material: TlsMaterial, settings: TlsSettings) -> None:
    """Load ``material`` into a scratch context: a bad key, a key that does not match the
    certificate or an unusable CA bundle is a TlsFileError, before anything live is touched."""
    cert_file, key_file, ca_file = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    ctx = _context(bool(ca_file))
    try:
        _load(ctx, TlsMaterial(material.cert, material.key, None))
    except _EncryptedKey:
        raise TlsFileError(f"tls_key_file {key_file}: the private key is encrypted; give an unencrypted key") from None
    except (ssl.SSLError, OSError) as e:
        raise TlsFileError(
            f"tls_cert_file {cert_file} and tls_key_file {key_file} cannot be used together "
            f"(the key must be the certificate's, both in PEM): {_reason(e)}"
        ) from None
    if material.ca is not None:
        try:
            ctx.load_verify_locations(cadata=material.ca.decode("ascii"))
        except (ssl.SSLError, ValueError) as e:
            raise TlsFileError(f"tls_client_ca_file {ca_file}: not a usable PEM CA bundle: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    return getattr(e, "reason", None) or str(e)


def _context(mtls: bool, alpn: str = "http/1.1") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols([alpn])
    if mtls:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Without a callback OpenSSL would ask for a pass phrase on the terminal.
    raise _EncryptedKey


def _load(ctx: ssl.SSLContext, material: TlsMaterial) -> None:
    """load_cert_chain from bytes (it takes only paths): the very bytes that were checked, never
    a file that may have changed since."""
    with _pem_paths(material.cert, material.key) as (cert_path, key_path):
        ctx.load_cert_chain(cert_path, key_path, password=_no_password)
    if material.ca is not None:
        ctx.load_verify_locations(cadata=material.ca.decode("ascii"))


@contextlib.contextmanager
def _pem_paths(*blobs: bytes) -> Iterator[list[str]]:
    """Paths that read as ``blobs``: anonymous memory files on Linux (the key never touches a
    disk), else files in a private temporary directory."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("batchgate-tls", os.MFD_CLOEXEC) for _ in blobs]
        try:
            for fd, blob in zip(fds, blobs):
                os.write(fd, blob)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="batchgate-tls-") as d:  # mode 0700
        paths = []
        for i, blob in enumerate(blobs):
            path = os.path.join(d, str(i))
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(blob)
            paths.append(path)
        yield paths


def _grpc_config(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], root_certificates=material.ca)


def _log_loaded(what: str, cert_pem: bytes) -> float | None:
    """Log the served certificate's subject, serial and expiry; an expired one as an error
    (clients will refuse it: the renewal has not happened). Its expiry (Unix time), if read."""
    try:
        der = next(iter(_first_cert(cert_pem)))
        info = certificate_info(der)
    except (ValueError, StopIteration):
        log.info("%s: certificate loaded", what)
        return None
    until = info.not_after.isoformat() if info.not_after else "(unknown)"
    log.info(
        "%s: certificate %s, serial %x, valid until %s", what, info.subject or "(empty subject)", info.serial, until
    )
    if info.not_after is not None and info.not_after < datetime.datetime.now(datetime.UTC):
        log.error("%s: the certificate expired at %s; clients will refuse it until it is renewed", what, until)
    return None if info.not_after is None else info.not_after.timestamp()


def _first_cert(pem: bytes) -> list[bytes]:
    start = pem.find(b"-----BEGIN CERTIFICATE-----")
    end = pem.find(b"-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        return []
    return [ssl.PEM_cert_to_DER_cert(pem[start : end + 25].decode("ascii"))]


# ---------------------------------------------------------------------------- DER, just enough
@dataclass(frozen=True)
class CertificateInfo:
    subject: str  # RFC 4514
    serial: int
    not_after: datetime.datetime | None  # UTC; None if unreadable


# RFC 4514's short names (the ones cryptography's rfc4514_string() uses); others as dotted OIDs.
_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}
_STRINGS = {
    0x0C: "utf-8",  # UTF8String
    0x12: "ascii",  # NumericString
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString (as OpenSSL and cryptography read it)
    0x16: "ascii",  # IA5String
    0x1A: "ascii",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at ``pos``."""
    if pos + 2 > end:
        raise ValueError("truncated DER")
    tag, n = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tag")
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4 or pos + k > end:
            raise ValueError("bad DER length")
        n = int.from_bytes(data[pos : pos + k], "big")
        pos += k
    if pos + n > end:
        raise ValueError("truncated DER")
    return tag, pos, pos + n


def _children(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(tag, value start, value end, element start) of each element in data[start:end]."""
    pos = start
    while pos < end:
        tag, vs, ve = _tlv(data, pos, end)
        yield tag, vs, ve, pos
        pos = ve


def _oid(value: bytes) -> str:
    if not value:
        raise ValueError("empty OID")
    arcs: list[int] = []
    n = 0
    for b in value:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(n)
            n = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _escape(value: str) -> str:
    """RFC 4514 section 2.4 (as cryptography escapes)."""
    if not value:
        return ""
    for c in ("\\", '"', "+", ",", ";", "<", ">"):
        value = value.replace(c, "\\" + c)
    value = value.replace("\0", "\\00")
    if value[0] in ("#", " "):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


def _name(data: bytes, start: int, end: int) -> str:
    """An X.501 Name as RFC 4514: RDNs last to first, '+' between a multi-valued RDN's parts."""
    rdns = []
    for tag, rs, re_, _ in _children(data, start, end):
        if tag != 0x31:
            raise ValueError("RDN is not a SET")
        parts = []
        for atag, a_s, a_e, _ in _children(data, rs, re_):
            if atag != 0x30:
                raise ValueError("attribute is not a SEQUENCE")
            (otag, os_, oe, _), (vtag, vs, ve, vpos) = list(_children(data, a_s, a_e))[:2]
            if otag != 0x06:
                raise ValueError("attribute type is not an OID")
            oid = _oid(data[os_:oe])
            encoding = _STRINGS.get(vtag)
            if encoding is None:
                text = "#" + data[vpos:ve].hex()
            else:
                text = _escape(data[vs:ve].decode(encoding, errors="replace"))
            parts.append(f"{_NAMES.get(oid, oid)}={text}")
        rdns.append("+".join(parts))
    return ",".join(reversed(rdns))


def certificate_info(der: bytes) -> CertificateInfo:
    """Subject (RFC 4514), serial number and notAfter of a DER certificate; ValueError if it
    is not one."""
    tag, cs, ce = _tlv(der, 0, len(der))
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, ts, te = _tlv(der, cs, ce)
    if tag != 0x30:
        raise ValueError("not a certificate")
    fields = [(t, s, e) for t, s, e, _ in _children(der, ts, te)]
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    if len(fields) < 5 or fields[0][0] != 0x02 or fields[4][0] != 0x30 or fields[3][0] != 0x30:
        raise ValueError("not a certificate")
    serial = int.from_bytes(der[fields[0][1] : fields[0][2]], "big", signed=True)
    validity = [(t, s, e) for t, s, e, _ in _children(der, fields[3][1], fields[3][2])]
    not_after = _time(validity[1][0], der[validity[1][1] : validity[1][2]]) if len(validity) == 2 else None
    return CertificateInfo(_name(der, fields[4][1], fields[4][2]), serial, not_after)


def _time(tag: int, value: bytes) -> datetime.datetime | None:
    """A UTCTime (0x17, YYMMDDHHMMSSZ) or GeneralizedTime (0x18, YYYYMMDDHHMMSSZ) in UTC."""
    text = value.decode("ascii", errors="replace")
    try:
        if tag == 0x17:
            t = datetime.datetime.strptime(text, "%y%m%d%H%M%SZ")
            if t.year >= 2050:  # RFC 5280: two-digit years 50-99 are 19xx
                t = t.replace(year=t.year - 100)
        elif tag == 0x18:
            t = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
        else:
            return None
    except ValueError:
        return None
    return t.replace(tzinfo=datetime.UTC)


def subject_of_der(der: bytes) -> str:
    """The RFC 4514 subject of a DER certificate; ValueError if it is not one."""
    return certificate_info(der).subject
