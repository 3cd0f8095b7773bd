"""What the HTTP app reads from an ASGI request besides its body: the caller (key, client
certificate, peer), one header, a ``file:`` load parameter; and the pieces of a request's life the
app keeps apart (the disconnect watch of a waiting infer, the 405 refusal)."""

from __future__ import annotations

import asyncio
import base64
import re

from ..core.errors import ErrorCode, GatewayError, invalid
from ..dataplane import FILE_PARAM_PREFIX
from ..monitoring.trace_context import trace_context
from ..security.access import Caller, credentials
from ..security.tls import http_peer_subject
from .http_codec import parse_json
from .sockets import host_port


def caller_of(scope) -> Caller:
    """Who is calling: the Authorization header, the client certificate's subject (mTLS) and
    the peer address."""
    client = scope.get("client")
    return Caller(
        credentials(scope["headers"], b"authorization"),
        http_peer_subject(scope),
        host_port(client[0], client[1]) if client else "",  # (an IPv6 address in brackets)
    )


def header(scope, name: str) -> str | None:
    """One request header's value by lower-case name (a route's pin and sticky headers)."""
    key = name.encode("latin-1")
    for k, v in scope["headers"]:
        if k == key:
            return v.decode("latin-1")
    return None


def trace_headers(scope) -> tuple[str | None, str | None]:
    """The request's ``traceparent`` and ``tracestate`` (None when absent), in one pass (see
    :func:`trace_context.trace_context`)."""
    return trace_context(scope["headers"], b"traceparent", b"tracestate")


def file_bytes(key: str, value) -> bytes:
    """A ``file:`` load parameter travels base64-encoded in JSON."""
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise invalid(f"parameter '{key[:128]}' must be base64 text") from None


def json_object(body: bytes) -> dict:
    """A repository request's body: a JSON object, or none at all."""
    obj = parse_json(body) if body.strip() else {}
    if not isinstance(obj, dict):
        raise invalid("request body must be a JSON object")
    return obj


def index_ready(body: bytes) -> bool:
    """The ``ready`` of a repository index request's body (false when not given)."""
    ready = json_object(body).get("ready", False)
    if type(ready) is not bool:  # (as Triton: bool("false") is true)
        raise invalid("'ready' must be true or false")
    return ready


def repository_parameters(body: bytes) -> dict:
    """The ``parameters`` of a repository load / unload body, ``file:`` values decoded."""
    params = json_object(body).get("parameters", {})
    if not isinstance(params, dict):
        raise invalid("'parameters' must be an object")
    return {k: file_bytes(k, v) if k.startswith(FILE_PARAM_PREFIX) else v for k, v in params.items()}


def settings_object(body: bytes, what: str) -> dict:
    """The body of a log or trace settings change: a JSON object."""
    obj = parse_json(body)
    if not isinstance(obj, dict):
        raise invalid(f"the {what} settings must be a JSON object")
    if what == "log":  # Triton skips a log setting given as null (a trace setting's null clears it)
        return {k: v for k, v in obj.items() if v is not None}
    return obj


def shm_registration(body: bytes) -> tuple[str, int, int]:
    """A system shared-memory registration's key, offset and byte size."""
    obj = parse_json(body)
    if not isinstance(obj, dict) or type(obj.get("key")) is not str:
        raise invalid("the registration must be a JSON object with 'key', 'offset' and 'byte_size'")
    offset, size = obj.get("offset", 0), obj.get("byte_size")
    if type(offset) is not int or type(size) is not int:
        raise invalid("'offset' and 'byte_size' must be whole numbers")
    return obj["key"], offset, size


WAITERS = "batchgate.waiters"  # scope key: the connection's requests awaiting an answer (Waiters)


class Waiters:
    """The requests of one connection awaiting their answers. Its protocol (``http_limits.py``)
    puts it in each request's scope and, when the connection is lost, cancels them: a request
    whose client went away leaves its model's queue at once (not executed if it had not started).

    It refers to neither the protocol nor a scope, and a task is in it only while it waits, so
    it makes no reference cycle. (The watch it replaced, a task per request that waited over
    20 ms, listening for the disconnect and cancelled once answered, left each such request as
    cyclic garbage, its cancellation's traceback holding the task: under overload, where every
    answered request waits that long, thousands a second for the collector.)"""

    __slots__ = ("tasks", "lost")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.lost = False  # the connection is gone: nobody to answer

    def lose(self) -> None:
        self.lost = True
        for task in self.tasks:
            task.cancel()


class MethodNotAllowed(GatewayError):
    def __init__(self, message: str, allow: str):
        super().__init__(ErrorCode.INVALID_ARGUMENT, message)
        self.allow = allow


def check_method(method: str, want: str) -> None:
    """A 405 unless ``method`` is ``want``. HEAD is a GET without its body (RFC 9110 9.3.2;
    uvicorn leaves the body out, the headers, Content-Length included, are the GET's): load
    balancers probe health so."""
    if method != want and not (method == "HEAD" and want == "GET"):
        raise MethodNotAllowed(f"method {method} is not allowed here; use {want}", want)


# A "/" or "\\" written as %2F / %5C inside a path segment: decoded, it would route as a
# separator (so /v2%2Frepository/... slipped past a proxy rule on /v2/repository), and no model
# name holds either. Nor may a character of a route or a model name, [A-Za-z0-9_.-], be written
# as %XX: decoded, /v2/%72epository/... passed the same rule. Triton matches the raw path, and
# no client encodes those (tritonclient's quote() leaves them as they are).
_ENCODED_SEPARATOR = re.compile(rb"%(?:2[fFdDeE]|5[cCfF]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA])")


def encoded_separator(raw: bytes) -> bool:
    """Whether a raw request path holds an encoded separator or name character (see above)."""
    return b"%" in raw and _ENCODED_SEPARATOR.search(raw) is not None


def check_raw_path(scope) -> None:
    """INVALID_ARGUMENT for a request path with an encoded separator or name character (see above)."""
    raw = scope.get("raw_path")
    if raw is not None and encoded_separator(raw):
        raise invalid(
            "the request path has a percent-encoded '/', '\\' or name character (%2F, %5C, %41 for A...): "
            "routes and names are matched as sent, never decoded into those"
        )


async def lifespan(receive, send) -> None:
    """The ASGI lifespan protocol, answered (nothing to start or stop)."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
