"""The HTTP listeners: uvicorn on a socket the gateway made, serving one ``HttpApp``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvicorn

from ..core.rate import LineBudget
from .accept import listen
from .tls_accept import TlsAccept

if TYPE_CHECKING:
    from .http_app import HttpApp

# uvicorn's log lines about the requests of its protocol (http_limits.py counts what it refuses)
_PARSER_WARNING = "Invalid HTTP request received."  # uvicorn's line for each: counted instead
_APP_EXCEPTION = "Exception in ASGI application\n"  # uvicorn's, with a traceback of ~40 lines


class _NoLineEach(logging.Filter):
    """uvicorn's line per unparsable request is dropped (counted instead); its traceback per
    request the app failed (a bug: answered 500) is kept to 5 a second, so a client that finds
    one cannot flood the log with it."""

    def __init__(self) -> None:
        super().__init__()
        self._tracebacks = LineBudget(5)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _APP_EXCEPTION:
            left_out = self._tracebacks.take()
            if left_out is None:
                return False
            if left_out:
                record.msg = f"Exception in ASGI application ({left_out} more left out)\n"
            return True
        return record.msg != _PARSER_WARNING


logging.getLogger("uvicorn.error").addFilter(_NoLineEach())


class QuietUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway drains on SIGTERM itself; with TLS,
    a TLS handshake must end within ``handshake_timeout_s`` (uvicorn leaves asyncio's 60 s: a
    client that connects and never says hello held a socket for a minute, beyond the reach of
    ``http_header_timeout_s``, whose clock starts once the handshake is done), and a connection
    counts against ``max_connections`` from its accept (``tls_accept.py``; ``refused()`` counts
    one refused there)."""

    def __init__(
        self,
        config: uvicorn.Config,
        handshake_timeout_s: float = 60.0,
        max_connections: int = 0,
        refused: Callable[[], None] = lambda: None,
        tls_context: Callable[[], ssl.SSLContext] | None = None,
    ):
        super().__init__(config)
        self.tls_context = tls_context  # each handshake's (ServerTls.newest); else config.ssl
        self.handshake_timeout_s = handshake_timeout_s
        self.max_connections = max_connections
        self.refused = refused
        self._tls_accept: TlsAccept | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config
        if sockets is None:
            await super().startup(sockets)
            return
        # uvicorn's start on given sockets (no lifespan here), each accepting many connections a
        # turn (accept.py), and with TLS the handshake bounded
        loop = asyncio.get_running_loop()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=_loop
            )

        factory: Callable[[], asyncio.Protocol] = create_protocol
        if config.ssl is not None:
            given: ssl.SSLContext = config.ssl
            self._tls_accept = accept = TlsAccept(
                self.tls_context or (lambda: given),
                create_protocol,
                self.handshake_timeout_s,
                self.max_connections,
                lambda: len(self.server_state.connections),
                self.refused,
            )
            factory = accept.factory
        self.servers = [await listen(loop, factory, sock, config.backlog) for sock in sockets]  # type: ignore[misc]
        self.started = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._tls_accept is not None:
            self._tls_accept.close()
        await super().shutdown(sockets)


class HttpListener:
    """One uvicorn server on one socket, serving one HttpApp."""

    def __init__(self, app: HttpApp, server: QuietUvicorn, port: int):
        self.app, self.server, self.port = app, server, port
        self._task: asyncio.Future | None = None

    async def start(self, sock: socket.socket) -> None:
        self._task = task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            if self._task is not None:
                await asyncio.wait_for(self._task, 5)
