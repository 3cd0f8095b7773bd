"""Limits on HTTP connections, enforced in the protocol before any request reaches the app.

uvicorn's httptools protocol reads a request head of any size, waits for it (and for a body)
for ever, and accepts any number of connections. :func:`guarded_protocol` makes a subclass
that bounds all of these:

- the request head (URL and headers together) is at most ``max_header_bytes``: more is
  answered 431 and the connection closed;
- the head must arrive within ``header_timeout_s`` of the connection (or of the first byte of a
  keep-alive connection's next request), the body within ``body_timeout_s`` of the head:
  otherwise 408 and close
  (a slow client cannot hold a connection, and its file descriptor, by trickling bytes);
- at most ``max_connections`` connections at once: one more is closed as soon as it is made.

Each refusal is counted by ``refused(reason)``. Keep-alive idle time is uvicorn's own
``timeout_keep_alive``.


On a TLS connection each request's scope also carries the ASGI TLS extension
(``scope["extensions"]["tls"]``, with the client certificate's subject as ``client_cert_name``;
see ``security/tls.py``), made once per connection after its handshake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..security.tls import tls_extension

HEAD_TOO_LARGE = "header_bytes"
HEAD_TIMEOUT = "header_timeout"
BODY_TIMEOUT = "body_timeout"
TOO_MANY_CONNECTIONS = "connections"
OVERLOAD_HOLD = "overload_hold"  # an overload refusal answered only after its Retry-After (http_app.py)

LINGER_S = 1.0  # how long a refused connection's further input is read and dropped
_STATUS = {431: b"431 Request Header Fields Too Large", 408: b"408 Request Timeout", 503: b"503 Service Unavailable"}


def guarded_protocol(
    max_header_bytes: int,
    header_timeout_s: float,
    body_timeout_s: float,
    max_connections: int,
    refused: Callable[[str], None],
) -> type[HttpToolsProtocol]:
    """An httptools protocol class with the limits above (one class per gateway)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0
        _timer: asyncio.TimerHandle | None = None
        _refused = False  # answered and closing: what is still parsed from the buffer is ignored
        _behind = False  # this request was pipelined behind an answer still in progress
        _tls: dict[Any, Any] | None = None  # the ASGI TLS extension of this connection; None = plaintext

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                refused(TOO_MANY_CONNECTIONS)
                self._refuse(503, f"more than {max_connections} connections (max_connections)")
                return
            if self.scheme == "https":
                self._tls = tls_extension(transport)
            self._arm(header_timeout_s, HEAD_TIMEOUT)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            self._behind = self.cycle is not None and not self.cycle.response_complete
            super().on_message_begin()
            if self._tls is not None:
                self.scope["extensions"] = {"tls": self._tls}
            self._head_bytes = 0
            if self._timer is None and not self._behind:  # a keep-alive connection's next request
                self._arm(header_timeout_s, HEAD_TIMEOUT)

        def on_url(self, url: bytes) -> None:
            if self._count(len(url)):
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._count(len(name) + len(value) + 4):
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if not self._refused:
                # A pipelined request waits behind the answer in progress (uvicorn stops reading
                # for it): its time starts only when that answer is done.
                if self._behind:
                    self._disarm()
                else:
                    self._arm(body_timeout_s, BODY_TIMEOUT)
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                self._disarm()
                super().on_message_complete()

        # ------------------------------------------------------------------ helpers
        def _count(self, n: int) -> bool:
            """Add to the head's size; False once the connection has been refused."""
            if self._refused:
                return False
            self._head_bytes += n
            if self._head_bytes > max_header_bytes:
                refused(HEAD_TOO_LARGE)
                self._refuse(431, f"the request head exceeds {max_header_bytes} bytes (max_header_bytes)")
                return False
            return True

        def _arm(self, seconds: float, reason: str) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._expired, reason)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self, reason: str) -> None:
            self._timer = None
            if self._refused or self.transport.is_closing():
                return
            refused(reason)
            setting = "http_header_timeout_s" if reason == HEAD_TIMEOUT else "http_body_timeout_s"
            self._refuse(408, f"the request was not received in time ({setting})")

        def _refuse(self, status: int, message: str) -> None:
            self._refused = True
            self._disarm()
            if self._behind:  # our words must not come before the earlier answer: just close
                self.transport.close()
                return
            body = message.encode()
            self.transport.write(
                b"HTTP/1.1 " + _STATUS[status] + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )
            # A lingering close: the answer and a FIN go out now, and what the client still sends
            # is read and dropped for a moment, so the close does not reset the connection (a
            # reset can make the client lose the answer it has not read yet).
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()

    return GuardedHttpToolsProtocol
