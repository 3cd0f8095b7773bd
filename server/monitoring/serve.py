"""The Prometheus listener (``metrics_port``): a small WSGI app on a thread, behind an API-key
check when ``metrics_requires_key`` is set.

It answers ``GET`` and ``HEAD`` of exactly ``/metrics`` (Prometheus text format 0.0.4, gzip when
the scraper accepts it); any other path is 404 and any other method 405, whatever the key.
The text is always format 0.0.4, never OpenMetrics: Triton's counters (``triton.py``) have no
``_total`` suffix, which OpenMetrics would require.
"""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..core.errors import ErrorCode, GatewayError
from ..security.auth import KeyStore

PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TEXT = ("Content-Type", "text/plain; charset=utf-8")


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def get_environ(self) -> dict[str, Any]:
        # The path as the client sent it: PATH_INFO has its %xx decoded, and the HTTP server
        # has already made a leading "//" one "/" (so "//metrics" and "/%6Detrics" read "/metrics").
        env = super().get_environ()
        parts = self.requestline.split(" ")
        env["batchgate.raw_path"] = parts[1].split("?", 1)[0] if len(parts) == 3 else ""
        return env


class _Threading(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(exposition: Callable[[], bytes], host: str, port: int, keys: KeyStore | None) -> WSGIServer:
    """Serve what ``exposition()`` returns on ``host:port`` (0: a free port) until ``shutdown()``;
    with ``keys``, a scrape needs ``Authorization: Bearer <token>`` of a key with scope ``read``
    for every model (models ``["*"]``; else 401 / 403)."""

    def app(environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        head = method == "HEAD"
        if environ.get("PATH_INFO") != PATH or environ.get("batchgate.raw_path", PATH) != PATH:
            return _answer(start_response, head, "404 Not Found", b"not found: this port serves /metrics only\n")
        if method not in ("GET", "HEAD"):
            allow = ("Allow", "GET, HEAD")
            return _answer(start_response, head, "405 Method Not Allowed", b"/metrics answers GET and HEAD\n", allow)
        if keys is not None:
            try:
                key = keys.authenticate(environ.get("HTTP_AUTHORIZATION"))
                keys.authorize(key, "read")
                if not key.every_model:  # the figures name every model: not for a key that sees only some
                    raise GatewayError(
                        ErrorCode.PERMISSION_DENIED,
                        f"API key '{key.id}' may read only some models, and the metrics cover every model: "
                        'scrape with a key whose models are ["*"]',
                    )
            except GatewayError as e:
                unauthenticated = e.code is ErrorCode.UNAUTHENTICATED
                return _answer(
                    start_response,
                    head,
                    "401 Unauthorized" if unauthenticated else "403 Forbidden",
                    e.message.encode(),
                    ("WWW-Authenticate", "Bearer"),
                )
        body = exposition()
        headers = [("Content-Type", CONTENT_TYPE)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip.compress(body, compresslevel=1)  # the text is repetitive: level 1 does well, cheaply
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [] if head else [body]

    server_class = type(
        "MetricsServer", (_Threading,), {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET}
    )
    httpd: WSGIServer = make_server(host, port, app, server_class, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="batchgate-metrics", daemon=True).start()
    return httpd


def _answer(start_response, head: bool, status: str, body: bytes, *extra: tuple[str, str]) -> list[bytes]:
    """A short plain-text answer (its headers only to a HEAD)."""
    start_response(status, [_TEXT, ("Content-Length", str(len(body))), *extra])
    return [] if head else [body]
