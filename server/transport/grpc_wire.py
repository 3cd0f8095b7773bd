"""gRPC's HTTP/2 conventions, without I/O: message framing, deadlines, status and metadata.

What ``grpc_h2.py`` (batchgate's own gRPC engine) needs from the gRPC-over-HTTP/2 spec
(https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md), kept pure so it is tested
on its own.
"""

from __future__ import annotations

import base64
import re
import struct
import urllib.parse
import zlib

from hpack import NeverIndexedHeaderTuple

# Request headers that are gRPC's own, not the caller's metadata.
RESERVED = frozenset(
    (b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding", b"content-length")
)
ENCODINGS = (b"identity", b"gzip", b"deflate")
ACCEPT_ENCODING = b"identity,deflate,gzip"

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_PREFIX = struct.Struct(">BI")
# grpc-message is percent-encoded; these bytes go as they are (the spec's "unreserved" set
# is wider, but every printable ASCII byte except '%' is allowed).
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)


class WireError(Exception):
    """A request that breaks gRPC's framing: answered with ``code`` (a grpc.StatusCode name)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def parse_timeout(value: bytes) -> float | None:
    """Seconds in a ``grpc-timeout`` header (``"100m"``, ``"5S"``), None when unparsable."""
    if not 2 <= len(value) <= 9:  # at most 8 digits and a unit
        return None
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def encode_timeout(seconds: float) -> bytes:
    """A ``grpc-timeout`` header value for ``seconds`` (at least 1 ms): milliseconds while they fit
    the spec's 8 digits, else the finest coarser unit that does (rounded up), at most 99999999 hours."""
    ms = max(1, int(seconds * 1000))
    if ms < 100_000_000:
        return b"%dm" % ms
    for unit, size in ((b"S", 1), (b"M", 60), (b"H", 3600)):
        n = -(-int(seconds) // size)
        if n < 100_000_000:
            return b"%d%s" % (n, unit)
    return b"99999999H"


def frame(message: bytes) -> bytes:
    """One length-prefixed, uncompressed message."""
    return _PREFIX.pack(0, len(message)) + message


def split_messages(buf: bytearray, limit: int) -> tuple[list[tuple[bool, bytes]], int]:
    """The whole messages at the front of ``buf`` as (compressed, payload) pairs, and how many
    bytes they took. A message declaring more than ``limit`` bytes is a WireError at once (before
    it is buffered)."""
    out = []
    pos = 0
    end = len(buf)
    while end - pos >= 5:
        flag, length = _PREFIX.unpack_from(buf, pos)
        if length > limit:
            raise WireError("RESOURCE_EXHAUSTED", f"Received message larger than max ({length} vs. {limit})")
        if flag > 1:
            raise WireError("INTERNAL", f"a message's compressed flag is {flag}; it must be 0 or 1")
        if end - pos - 5 < length:
            break
        out.append((flag == 1, bytes(buf[pos + 5 : pos + 5 + length])))
        pos += 5 + length
    return out, pos


# Compressed messages and HTTP bodies up to this size are inflated on the event loop (at most
# ~4 MB at gzip's largest ratio, a few milliseconds), larger ones on a thread (a gRPC message when
# its handler takes it: grpc_h2_call.py; an HTTP body as it is read: http_app.py).
INFLATE_ON_LOOP_MAX_BYTES = 4 * 1024


def decompress(payload: bytes, encoding: bytes, limit: int) -> bytes:
    """A compressed message's bytes, at most ``limit`` of them (a small message that inflates
    past the limit is refused, not inflated)."""
    if encoding == b"gzip":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == b"deflate":
        d = zlib.decompressobj()
    else:
        raise WireError("INTERNAL", "a message is marked compressed but the call declares no grpc-encoding")
    try:
        out = d.decompress(payload, limit + 1)
    except zlib.error as e:
        raise WireError("INTERNAL", f"a compressed message could not be decompressed: {e}") from None
    if len(out) > limit:
        raise WireError("RESOURCE_EXHAUSTED", f"a message inflates past the largest accepted ({limit} bytes)")
    # What was left out had passed silently: a stream cut short gave the part inflated so far, and
    # a second gzip member (or any bytes after the first) was dropped.
    if not d.eof:
        raise WireError("INTERNAL", "a compressed message ends before its compressed data does")
    if d.unused_data:
        raise WireError("INTERNAL", "a compressed message has bytes after the end of its compressed data")
    return out


# RFC 9113 section 8.2-8.3: what makes a request's header list malformed.
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
_NEEDED_PSEUDO = frozenset((b":method", b":scheme", b":path"))
_CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
_NOT_IN_FIELDS = re.compile(rb"[\x00\r\n]")
_NOT_IN_NAMES = re.compile(rb"[A-Z\x00-\x20\x7f-\xff]")


def malformed(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request's header list breaks HTTP/2's rules (the stream is then reset with
    PROTOCOL_ERROR), or None: pseudo-fields known, each once, before the others, the needed ones
    there; names lower-case with no control, space or non-ASCII byte; no connection-specific
    field; no NUL, CR or LF in a value (it could split a header line where the value is
    written again in HTTP/1.1)."""
    seen: set[bytes] = set()
    regular = False
    for k, v in headers:
        if k[:1] == b":":
            if regular:
                return f"pseudo-header {k[:32]!r} after a regular field"
            if k not in _REQUEST_PSEUDO or k in seen:
                return f"pseudo-header {k[:32]!r} unknown or repeated"
            seen.add(k)
        else:
            regular = True
            if not k or _NOT_IN_NAMES.search(k) is not None:
                return f"field name {k[:32]!r} is not a lower-case token"
            if k in _CONNECTION_SPECIFIC or (k == b"te" and v != b"trailers"):
                return f"connection-specific field {k[:32]!r}"
        if _NOT_IN_FIELDS.search(v) is not None:
            return f"NUL, CR or LF in the value of {k[:32]!r}"
    if not seen >= _NEEDED_PSEUDO:
        return f"no {b', '.join(sorted(_NEEDED_PSEUDO - seen)).decode()}"
    return None


def metadata(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata in a request's headers, as grpc.aio gives it: (key, value) pairs,
    binary (``-bin``) values base64-decoded to bytes, others as str."""
    out: list[tuple[str, str | bytes]] = []
    for k, v in headers:
        if k[:1] == b":" or k in RESERVED:
            continue
        if k.endswith(b"-bin"):
            try:
                out.append((k.decode("ascii"), base64.b64decode(v + b"=" * (-len(v) % 4))))
            except ValueError:
                continue  # not base64: dropped (gRPC core fails the call INTERNAL instead)
        else:
            out.append((k.decode("latin-1"), v.decode("latin-1")))
    return tuple(out)


def encode_metadata(pairs) -> list[tuple[bytes, bytes]]:
    """Metadata pairs as header fields (keys lower-case; ``-bin`` values base64, unpadded)."""
    out = []
    for k, v in pairs or ():
        key = k.lower().encode("ascii") if isinstance(k, str) else k.lower()
        if key.endswith(b"-bin"):
            raw = v if isinstance(v, bytes) else v.encode()
            out.append((key, base64.b64encode(raw).rstrip(b"=")))
        else:
            out.append((key, v.encode("latin-1") if isinstance(v, str) else bytes(v)))
    return out


def status_fields(code: int, message: str) -> list[tuple[bytes, bytes]]:
    """``grpc-status`` and, when there is one, the percent-encoded ``grpc-message``.

    The message goes as a literal the HPACK dynamic table does not take ("never indexed"):
    under overload the refusals' messages vary (the work queued, in ms), and each one indexed
    was inserted into the connection's table, evicting entries and changing the table, so
    every header block the encoder remembered (``hpack_cache``) had to be coded afresh, the OK
    answers' too."""
    fields = [(b"grpc-status", b"%d" % code)]
    if message:
        fields.append(NeverIndexedHeaderTuple(b"grpc-message", urllib.parse.quote(message, safe=_SAFE).encode("ascii")))
    return fields


class CallDetails:
    """What a generic handler is asked to serve (grpc.HandlerCallDetails' two fields)."""

    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, invocation_metadata):
        self.method = method
        self.invocation_metadata = invocation_metadata
