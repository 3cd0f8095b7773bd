"""Cross-origin calls (CORS) on the V2 HTTP port, so that a web app served from another origin
can call batchgate from a browser (``cors_allowed_origins``; off by default).

A browser asks first (a preflight: ``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) before a call it may not make on its own (a JSON POST, one
with an ``Authorization`` header); it then reads an answer only when the answer names its origin
(``Access-Control-Allow-Origin``), and only the response headers listed in
``Access-Control-Expose-Headers``. Every answer of that port to an allowed origin carries these
headers: errors too (a refusal made before the body is read included), else the app could not
read why it was refused. An origin not allowed gets none of them (the browser blocks the call)
and its preflight no work. The admin and metrics ports never answer cross-origin.

Every header list is made once, when the server starts: a request's origin is looked up among
the allowed ones and never written back unless it is one of them (a wildcard answers ``*``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from ..core.errors import ConfigError
from ..core.routing import PIN_HEADER
from ..core.types import REQUEST_ID_HEADER

if TYPE_CHECKING:
    from ..settings_sections import ServerSettings

# An origin is scheme://host[:port]: a DNS name is at most 253 bytes, so a longer Origin header is
# not one that can be allowed (under the wildcard too), and is not looked up.
ORIGIN_MAX_BYTES = 300
ALLOW_METHODS = b"GET, POST"
# request headers a browser app may send: those the V2 endpoints read (the binary extension's,
# compression, API keys, request ids, trace context, a route's pin)
ALLOW_HEADERS = (
    "content-type",
    "authorization",
    "inference-header-content-length",
    "content-encoding",
    "accept-encoding",
    REQUEST_ID_HEADER,
    "traceparent",
    "tracestate",
    PIN_HEADER,
)
# response headers it may read besides the safelisted ones (Content-Type, Content-Length...):
# the binary extension's framing, the variant that answered, when to retry, which scheme a 401 wants
EXPOSE_HEADERS = ("inference-header-content-length", PIN_HEADER, "retry-after", "www-authenticate")
_DEFAULT_PORT = {"http": 80, "https": 443}  # (a browser leaves them out of Origin)
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ORIGIN = re.compile(
    rf"(?P<scheme>https?)://(?P<host>(?:{_LABEL}\.)*{_LABEL}|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{{1,5}}))?"
)
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,128}")
_ORIGIN_HEADER = b"origin"
_REQUEST_METHOD = b"access-control-request-method"

Headers = tuple[tuple[bytes, bytes], ...]
_REFUSED = orjson.dumps({"error": "cross-origin calls from this origin are not allowed (cors_allowed_origins)"})
_REFUSED_HEADERS = ((b"content-type", b"application/json"), (b"content-length", str(len(_REFUSED)).encode()))
_CLOSE = ((b"connection", b"close"),)  # (while draining, as every answer)


def origin_value(text: str) -> str:
    """One allowed origin as a browser writes it in its Origin header (lower case, no default
    port); ConfigError naming what is wrong with any other value."""
    low = text.strip().lower()
    m = _ORIGIN.fullmatch(low)
    shown = repr(text[:ORIGIN_MAX_BYTES])
    if m is None or len(m["host"]) > 253 or (m["host"][0] == "[" and not _ipv6(m["host"][1:-1])):
        if re.match(r"https?://[^/?#]+[/?#]", low):
            hint = low.split("/", 3)
            raise ConfigError(
                f"cors_allowed_origins: {shown} has a path, query or fragment; an origin is "
                f"scheme://host[:port] and nothing after it (such as '{hint[0]}//{hint[2]}')"
            )
        raise ConfigError(
            f"cors_allowed_origins: {shown} is not an origin: write scheme://host[:port] with the scheme "
            f"http or https and the host in ASCII (a name, or an IP address; IPv6 in brackets), or * for any"
        )
    scheme, host, port = m["scheme"], m["host"], m["port"]
    if port is not None:
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"cors_allowed_origins: the port of {shown} must be between 1 and 65535")
        if int(port) == _DEFAULT_PORT[scheme]:
            port = None  # browsers leave the scheme's own port out of Origin
    return f"{scheme}://{host}" + (f":{int(port)}" if port is not None else "")


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def cors_policy(s: ServerSettings) -> CorsPolicy | None:
    """The CORS policy the settings ask for (None: off); ConfigError for settings that make none."""
    if not s.cors_allowed_origins:
        return None
    given = [o.strip() for o in s.cors_allowed_origins]
    if "*" in given:
        if len(given) > 1:
            raise ConfigError("cors_allowed_origins: '*' allows every origin; give it alone, or list the origins")
        if s.cors_allow_credentials:
            raise ConfigError(
                "cors_allow_credentials cannot go with cors_allowed_origins '*' (browsers refuse the wildcard "
                "on calls with credentials): list the origins instead"
            )
        origins: tuple[str, ...] = ("*",)
    else:
        origins = tuple(dict.fromkeys(origin_value(o) for o in given))
    extra = []
    for name in s.cors_allow_headers:
        low = name.strip().lower()
        if _HEADER_NAME.fullmatch(low) is None:
            raise ConfigError(f"cors_allow_headers: {name[:64]!r} is not an HTTP header name")
        extra.append(low)
    return CorsPolicy(origins, s.cors_allow_credentials, s.cors_max_age_s, extra)


class CorsPolicy:
    """The CORS headers of the V2 HTTP port's answers, by the request's origin."""

    def __init__(self, origins: Sequence[str], credentials: bool, max_age_s: int, extra_headers: Sequence[str] = ()):
        common: Headers = ((b"vary", b"origin"),)
        if credentials:
            common += ((b"access-control-allow-credentials", b"true"),)
        allow = b", ".join(h.encode() for h in dict.fromkeys((*ALLOW_HEADERS, *extra_headers)))
        asked = (
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", allow),
            (b"access-control-max-age", str(max_age_s).encode()),
        )
        exposed = ((b"access-control-expose-headers", b", ".join(h.encode() for h in EXPOSE_HEADERS)),)

        def answers(value: bytes) -> tuple[Headers, Headers]:
            named = ((b"access-control-allow-origin", value), *common)
            return named + exposed, named + asked

        self.wildcard = answers(b"*") if "*" in origins else None
        self._by_origin = {o.encode(): answers(o.encode()) for o in origins if o != "*"}

    async def sending(self, method: str, request_headers, send, closing: bool):
        """The ASGI ``send`` of a request, adding the CORS headers of its origin to its answer
        (``send`` itself when there are none); None when it was a preflight, answered here: 204
        with the policy's headers, or for an origin not allowed 403 without them (the browser
        blocks the call it asked about)."""
        if method == "OPTIONS":
            preflight = self.preflight(request_headers)
            if preflight is not None:
                if preflight:
                    headers = [*preflight, *_CLOSE] if closing else [*preflight]
                    await send({"type": "http.response.start", "status": 204, "headers": headers})
                    await send({"type": "http.response.body", "body": b""})
                else:
                    headers = [*_REFUSED_HEADERS, *_CLOSE] if closing else [*_REFUSED_HEADERS]
                    await send({"type": "http.response.start", "status": 403, "headers": headers})
                    await send({"type": "http.response.body", "body": _REFUSED})
                return None
        extra = self.answer_headers(request_headers)
        if not extra:
            return send

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], *extra]
            await send(message)

        return sending

    def _answers(self, origin: bytes | None) -> tuple[Headers, Headers] | None:
        if origin is None or len(origin) > ORIGIN_MAX_BYTES:
            return None
        return self._by_origin.get(origin) or self.wildcard

    def answer_headers(self, request_headers) -> Headers:
        """The headers an answer to a request with these (ASGI) headers gets: ``Vary: Origin``
        alone unless its origin is allowed. (Every answer varies by origin while CORS is on: a
        shared cache must not hand one without the CORS headers to an allowed origin.)"""
        found = self._answers(_origin_of(request_headers))
        return found[0] if found is not None else _VARY

    def preflight(self, request_headers) -> Headers | None:
        """None when the request is not a preflight (no Origin, or no
        Access-Control-Request-Method: an ordinary OPTIONS); else the headers of its 204, empty
        when its origin is not allowed."""
        origin = asked = None
        for k, v in request_headers:
            if k == _ORIGIN_HEADER:
                origin = v if origin is None else origin
            elif k == _REQUEST_METHOD:
                asked = v
        if origin is None or asked is None:
            return None
        found = self._answers(origin)
        return found[1] if found is not None else ()


_VARY: Headers = ((b"vary", b"origin"),)


def _origin_of(request_headers) -> bytes | None:
    for k, v in request_headers:
        if k == _ORIGIN_HEADER:
            return v
    return None
