"""The Prometheus listener (``metrics_port``): prometheus_client's WSGI app on a thread, behind
an API-key check when ``metrics_requires_key`` is set."""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from ..core.errors import ErrorCode, GatewayError
from ..security.auth import KeyStore


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _Threading(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(registry: CollectorRegistry, host: str, port: int, keys: KeyStore | None) -> WSGIServer:
    """Serve ``registry`` on ``host:port`` (0: a free port) until ``shutdown()``; with ``keys``,
    a scrape needs ``Authorization: Bearer <token>`` of a key with scope ``read`` (401 / 403)."""
    app = make_wsgi_app(registry)
    if keys is not None:
        inner = app

        def app(environ, start_response):
            try:
                keys.authorize(keys.authenticate(environ.get("HTTP_AUTHORIZATION")), "read")
            except GatewayError as e:
                unauthenticated = e.code is ErrorCode.UNAUTHENTICATED
                start_response(
                    "401 Unauthorized" if unauthenticated else "403 Forbidden",
                    [("Content-Type", "text/plain; charset=utf-8"), ("WWW-Authenticate", "Bearer")],
                )
                return [e.message.encode()]
            return inner(environ, start_response)

    server_class = type(
        "MetricsServer", (_Threading,), {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET}
    )
    httpd: WSGIServer = make_server(host, port, app, server_class, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="batchgate-metrics", daemon=True).start()
    return httpd
