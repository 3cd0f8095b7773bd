"""batchgate's own gRPC server engine: gRPC over HTTP/2 on the event loop.

grpc.aio runs every call through gRPC core's threads, a completion queue and a hand-over to the
loop; this engine parses HTTP/2 in the loop's ``data_received`` (``http2.py``: the frames,
windows and streams a gRPC server needs; HPACK with the ``hpack`` library) and runs the same
handlers there. It serves the method handlers grpc.aio
takes (``grpc.RpcMethodHandler``: registered or generic, unary or streaming, coroutines or async
generators), so the V2 inference service, health and reflection are registered on it unchanged,
and it hands them a context with the part of grpc.aio's ``ServicerContext`` they use.

What it adds over grpc.aio (``server.grpc_engine: h2``):

- every refusal is one of ours and counted: a connection past ``max_connections`` is closed at
  once, a stream past ``max_concurrent_streams`` is refused by HTTP/2 itself (the client waits
  for a slot: backpressure, not an error), and nothing is ever CANCELLED by a pending-call limit
  we cannot see;
- a call answered without waiting (a refusal, a bad request) is written in the same loop turn
  that read it, without a thread hand-over;
- streaming requests are read only as the handler takes them: HTTP/2 flow control holds a client
  that sends faster than the server reads.

Flow control: the request windows are credited as messages are taken (unary: at once, up to the
message limit); answers are written within the client's windows, and a streaming handler waits
while its answers are not yet on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable

import grpc

from ..core.rate import Turns
from . import grpc_wire
from .accept import Listener, listen
from .byte_budget import ByteBudget, UnsentAnswers
from .grpc_h2_connection import (  # noqa: F401  (the engine's figures, read by tests)
    BUFFERED_REQUESTS,
    CONNECTION_WINDOW,
    MAX_WRITE_BACKLOG,
    Refused,
    _Connection,
)
from .grpc_h2_sweep import sweep
from .hpack_cache import MAX_FIELDS
from .sockets import PeerShare, tcp_socket
from .tls_accept import TlsAccept

log = logging.getLogger("batchgate.grpc")
_monotonic = time.monotonic


class H2GrpcServer:
    """A gRPC server with grpc.aio.Server's registration, port and lifecycle methods."""

    def __init__(
        self,
        *,
        max_receive_bytes: int,
        max_connections: int,
        max_concurrent_streams: int = 1024,
        max_streaming_calls: int = 8192,
        reuse_port: bool = False,
        refused: Refused | None = None,
        max_connection_age_s: float = 0.0,
        refusals_per_s: int = 8000,
        retries_per_s: float = float("inf"),
        max_header_bytes: int = 64 << 10,
        max_header_fields: int = MAX_FIELDS,
        max_resets_per_s: int = 1000,
        eager: frozenset[str] = frozenset(),
        max_buffered_bytes: int = 1 << 30,
        budget: ByteBudget | None = None,
        unsent: UnsentAnswers | None = None,
        handshake_timeout_s: float = 10.0,
        body_timeout_s: float = 60.0,
        idle_timeout_s: float = 0.0,
        max_per_peer: int = 0,
    ):
        self.max_receive_bytes = max_receive_bytes
        self.max_connections = max_connections
        # connections one peer (sockets.peer_of) may hold at once, 0 = any number: for an
        # operations listener, where one client must not keep the others out
        self.peers = PeerShare(max_per_peer)
        self.max_concurrent_streams = max_concurrent_streams
        # Streaming calls open, all connections together: one may stay open and idle for as long
        # as its client likes (a gRPC stream), so their number, not a timeout, bounds them; each
        # method's apart (registered methods only), so that one open to every caller (health's
        # Watch needs no API key) never takes the places of another's (ModelStreamInfer).
        self.max_streaming_calls = max_streaming_calls
        self.streaming: dict[str, set] = {}
        self.reuse_port = reuse_port
        self.refused = refused or (lambda reason: None)
        self.max_connection_age_s = max_connection_age_s
        # overload refusals' turns: grpc_overload_refusals_per_s, a retry's overload_retries_per_s too
        self.turns = Turns(refusals_per_s, retries_per_s)
        self.rounds = 0  # turns of the loop that wrote something (see core/rate.RETRY_ROUNDS)
        self.max_resets_per_s = max_resets_per_s
        self.max_header_bytes = max_header_bytes
        self.max_header_fields = max_header_fields  # of one header block; more closes the connection
        # bytes of unfinished request messages held across all connections (see _Connection.hold):
        # max_buffered_bytes, or a budget shared with the process's HTTP bodies (byte_budget.py)
        self.budget = budget or ByteBudget(max_buffered_bytes)
        # answer bytes held for clients that do not take them (max_unsent_answer_bytes): the
        # process's bound, shared with its HTTP connections (None: unbounded, as on an ops port)
        self.unsent = unsent
        self.handshake_timeout_s = handshake_timeout_s  # the preface and SETTINGS must come within it
        self.body_timeout_s = body_timeout_s  # a request message must be whole within it of its start
        self.idle_timeout_s = idle_timeout_s  # a connection without calls this long is closed (0 = never)
        self._sweeper: asyncio.TimerHandle | None = None
        self._methods: dict[bytes, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._binds: list[tuple[socket.socket, Callable[[], ssl.SSLContext] | None]] = []
        self._listeners: list[Listener] = []
        self._tls_accepts: list[TlsAccept] = []
        self.connections: set[_Connection] = set()
        self._stopped: asyncio.Event | None = None
        self._dirty: list[_Connection] = []  # connections with bytes to write at the end of this turn
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in start (asyncio's lookup costs a getpid call)
        # methods whose handlers may take their first step in the turn that read the request,
        # outside any task (they use nothing that needs a current task before they first wait):
        # a call answered at once, such as a refusal, then costs no task at all
        self.eager = eager
        # per method path: a check of a whole unary request's bytes that may refuse it at once
        # (status, message, trailing metadata) before any handler runs; None lets it through
        self.refusers: dict[str, Callable[[bytes, str], tuple[grpc.StatusCode, str, tuple] | None]] = {}

    def dirty(self, conn: _Connection) -> None:
        if not self._dirty:
            self.loop.call_soon(self._flush_dirty)
        self._dirty.append(conn)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        self.rounds += 1
        for conn in dirty:
            conn._flush_soon = False
            conn.flush()

    # ------------------------------------------------------------------ registration
    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}".encode()] = handler

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._generic.extend(handlers)

    def handler(self, path: bytes, md) -> grpc.RpcMethodHandler | None:
        found = self._methods.get(path)
        if found is None and self._generic:
            details = grpc_wire.CallDetails(path.decode("latin-1"), md)
            for g in self._generic:
                found = g.service(details)
                if found is not None:
                    self._methods[path] = found  # generic handlers here map a name to one handler
                    break
        return found

    # ------------------------------------------------------------------ ports
    def add_insecure_port(self, address: str) -> int:
        return self._bind(address, None)

    def add_secure_port(self, address: str, context: Callable[[], ssl.SSLContext]) -> int:
        """``context`` gives the context each handshake starts on (``ServerTls.newest``)."""
        return self._bind(address, context)

    def _bind(self, address: str, context: Callable[[], ssl.SSLContext] | None) -> int:
        """Bind now (the port is known at once, as with grpc.aio); listen in ``start``."""
        if address.startswith("unix:"):
            path = address[5:]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock.bind(path)
            port = 1
        else:
            host, _, port_text = address.rpartition(":")
            try:
                sock = tcp_socket(host.strip("[]"), int(port_text), self.reuse_port)
            except OSError:
                return 0
            port = sock.getsockname()[1]
        sock.setblocking(False)
        self._binds.append((sock, context))
        return port

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for sock, context in self._binds:
            factory: Callable[[], asyncio.Protocol] = lambda: _Connection(self)  # noqa: E731
            if context is not None:
                # counted against max_connections from its accept, the handshake bounded as the
                # HTTP/2 preface is (asyncio's own bound is 60 s): tls_accept.py
                accept = TlsAccept(
                    context,
                    factory,
                    self.handshake_timeout_s,
                    self.max_connections,
                    lambda: len(self.connections),
                    lambda: self.refused("grpc_connections"),
                )
                self._tls_accepts.append(accept)
                factory = accept.factory
            self._listeners.append(await listen(loop, factory, sock))  # accept.py: many connections a turn
        self._sweep()

    def _sweep(self) -> None:
        """Close what overstayed a timeout: connections that never finished the handshake or sat
        without calls, and calls whose request message stalled part-way (a slow client holds
        a connection slot, and buffered bytes, only so long)."""
        now = _monotonic()
        for conn in list(self.connections):
            sweep(conn, now)  # (grpc_h2_sweep.py)
        limits = [t for t in (self.handshake_timeout_s, self.body_timeout_s, self.idle_timeout_s) if t > 0]
        every = min(1.0, max(0.05, min(limits, default=1.0) / 4))
        self._sweeper = self.loop.call_later(every, self._sweep)

    async def stop(self, grace: float | None) -> None:
        """Stop listening, tell every connection to go away (calls in progress finish), and after
        ``grace`` seconds cancel what is left."""
        for server in self._listeners:
            server.close()
        self._listeners.clear()
        for accept in self._tls_accepts:
            accept.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.go_away()
        if grace:
            end = _monotonic() + grace
            while any(c.calls for c in self.connections) and _monotonic() < end:
                await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()
        if self._stopped is not None:
            self._stopped.set()

    async def wait_for_termination(self) -> None:
        if self._stopped is not None:
            await self._stopped.wait()


# grpc_reflection (and others) pick their asyncio servicers for a grpc.aio.Server: this is one.
grpc.aio.Server.register(H2GrpcServer)
