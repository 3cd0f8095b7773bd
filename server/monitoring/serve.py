"""The Prometheus listener (``metrics_port``): a small WSGI app on a thread, behind an API-key
check when ``metrics_requires_key`` is set.

Its limits, as the V2 listeners have theirs: at most ``max_connections`` connections at once (a
thread each; one more is closed at once, counted ``metrics_connections``), of which one peer
holds at most ``max_per_peer`` (an IPv4 address, an IPv6 /64; one more is closed at once,
counted ``metrics_peer``: one client holding every slot kept Prometheus out), a request head of
at most ``max_header_bytes`` (what follows is not read) that must arrive whole, as every later
read and write must, within ``timeout_s`` (else closed, counted ``metrics_timeout``). Until 2026-12-05 a
client that connected and sent nothing held a thread for ever, and any number of them could.

It answers ``GET`` and ``HEAD`` of exactly ``/metrics`` (Prometheus text format 0.0.4, gzip when
the scraper accepts it: Accept-Encoding with gzip's q above 0, preferred to identity); any other
path is 404 and any other method 405, whatever the key.
The text is always format 0.0.4, never OpenMetrics: Triton's counters (``triton.py``) have no
``_total`` suffix, which OpenMetrics would require.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import sys
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..core.errors import ErrorCode, GatewayError
from ..security.auth import KeyStore
from ..transport.http_codec import pick_encoding
from ..transport.sockets import ListenError, PeerShare, dual_stack, host_port, peer_of

PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TEXT = ("Content-Type", "text/plain; charset=utf-8")


class _Quiet(WSGIRequestHandler):
    server: _Threading

    def setup(self) -> None:
        super().setup()  # (the socket's timeout: the class's, set per server in serve_metrics)
        self.rfile = _Capped(self.rfile, self.server.max_header_bytes)  # type: ignore[assignment]
        # The whole head within the timeout, not only each read (a byte every 0.9 s held the
        # connection and its thread for as long as the client liked): past it the socket is
        # shut, which ends the read in progress.
        self._head_read = False
        assert self.timeout is not None  # (serve_metrics sets it)
        self.connection.settimeout(self.timeout + 1)  # (the timer ends the head's reads first, counted once)
        self._head_timer = threading.Timer(self.timeout, self._head_late)
        self._head_timer.daemon = True
        self._head_timer.start()

    def _head_late(self) -> None:
        if not self._head_read:
            self.server.refused("metrics_timeout")
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def parse_request(self) -> bool:
        ok = super().parse_request()  # (reads the headers)
        self._head_read = True
        self._head_timer.cancel()
        self.connection.settimeout(self.timeout)  # each later read and write
        return ok

    def finish(self) -> None:
        self._head_read = True
        self._head_timer.cancel()
        # The timer holds this handler (its function is a bound method) and the handler the
        # timer: without this, each connection left that cycle, its socket and buffers with it,
        # for the garbage collector to find.
        self._head_timer = None  # type: ignore[assignment]
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def get_environ(self) -> dict[str, Any]:
        # The path as the client sent it: PATH_INFO has its %xx decoded, and the HTTP server
        # has already made a leading "//" one "/" (so "//metrics" and "/%6Detrics" read "/metrics").
        env = super().get_environ()
        parts = self.requestline.split(" ")
        env["batchgate.raw_path"] = parts[1].split("?", 1)[0] if len(parts) == 3 else ""
        return env


class _Capped:
    """A request's reader that ends (reads as EOF) after ``left`` bytes: a scrape's head is
    small, and http.server would read 100 header lines of 64 KiB each."""

    __slots__ = ("_f", "_left")

    def __init__(self, f, left: int):
        self._f, self._left = f, left

    def readline(self, size: int = -1) -> bytes:
        n = self._left if size < 0 else min(size, self._left)
        line = self._f.readline(n) if n > 0 else b""
        self._left -= len(line)
        return line

    def read(self, size: int = -1) -> bytes:
        n = self._left if size < 0 else min(size, self._left)
        data = self._f.read(n) if n > 0 else b""
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


class _Threading(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False  # (shutdown does not wait for a slow client's thread)
    max_header_bytes = 16384
    slots: threading.BoundedSemaphore
    peers: PeerShare
    refused: Callable[[str], None]

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused("metrics_connections")
            self.shutdown_request(request)
            return
        peer = peer_of(client_address)
        if not self.peers.enter(peer):
            self.slots.release()
            self.refused("metrics_peer")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # (no thread to give the slots back)
            self._leave(peer)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._leave(peer_of(client_address))

    def _leave(self, peer: str) -> None:
        self.peers.leave(peer)
        self.slots.release()

    def server_bind(self) -> None:
        host = self.server_address[0]
        dual_stack(self.socket, host if isinstance(host, str) else "")  # (``::``: IPv4 scrapes too)
        try:
            super().server_bind()
        except OSError as e:  # (which address: said)
            raise ListenError(e.errno, e.strerror, host_port(str(host), self.server_address[1])) from None

    def handle_error(self, request, client_address) -> None:
        """A request that failed on its connection (socketserver prints a traceback to stderr)."""
        if isinstance(sys.exc_info()[1], TimeoutError):
            self.refused("metrics_timeout")


def serve_metrics(
    exposition: Callable[[], bytes],
    host: str,
    port: int,
    keys: KeyStore | None,
    *,
    max_connections: int = 64,
    max_per_peer: int = 8,
    max_header_bytes: int = 16384,
    timeout_s: float = 10.0,
    refused: Callable[[str], None] = lambda reason: None,
) -> WSGIServer:
    """Serve what ``exposition()`` returns on ``host:port`` (0: a free port) until ``shutdown()``;
    with ``keys``, a scrape needs ``Authorization: Bearer <token>`` of a key with scope ``read``
    for every model (models ``["*"]``; else 401 / 403). The limits are the module text's;
    ``refused(reason)`` counts a connection closed by one."""

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
        # (Accept-Encoding read as the V2 answers read it: "gzip;q=0" refuses gzip, it does not ask for it)
        if pick_encoding(environ.get("HTTP_ACCEPT_ENCODING")) == "gzip":
            body = gzip.compress(body, compresslevel=1)  # the text is repetitive: level 1 does well, cheaply
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [] if head else [body]

    server_class = type(
        "MetricsServer",
        (_Threading,),
        {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
            "max_header_bytes": max_header_bytes,
            "slots": threading.BoundedSemaphore(max_connections),
            "peers": PeerShare(max_per_peer),
            "refused": staticmethod(refused),
            "request_queue_size": 128,  # (socketserver's 5 turns a burst of scrapers away in the kernel)
        },
    )
    httpd: WSGIServer = make_server(
        host, port, app, server_class, handler_class=type("MetricsHandler", (_Quiet,), {"timeout": timeout_s})
    )
    threading.Thread(target=httpd.serve_forever, name="batchgate-metrics", daemon=True).start()
    return httpd


def _answer(start_response, head: bool, status: str, body: bytes, *extra: tuple[str, str]) -> list[bytes]:
    """A short plain-text answer (its headers only to a HEAD)."""
    start_response(status, [_TEXT, ("Content-Length", str(len(body))), *extra])
    return [] if head else [body]


def metrics_limits(settings: Any, refused: Callable[[str], None]) -> dict[str, Any]:
    """:func:`serve_metrics`' limits from the settings."""
    return {
        "max_connections": settings.limits.ops_max_connections,
        "max_per_peer": settings.limits.ops_max_connections_per_peer,
        "max_header_bytes": settings.limits.max_header_bytes,
        "timeout_s": settings.server.http_header_timeout_s,
        "refused": refused,
    }
