"""batchgate's own gRPC server engine: gRPC over HTTP/2 on the event loop, with the h2 library.

grpc.aio runs every call through gRPC core's threads, a completion queue and a hand-over to the
loop; this engine parses HTTP/2 in the loop's ``data_received`` (``h2`` for the protocol, state
machine and HPACK) and runs the same handlers there. It serves the method handlers grpc.aio
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
from typing import Any

import grpc
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from ..core.rate import PerSecond
from . import grpc_wire
from .grpc_h2_call import OK_HEADERS, _Call
from .hpack_cache import CachingDecoder, CachingEncoder, fast_config
from .sockets import tcp_socket

log = logging.getLogger("batchgate.grpc")

STREAM_WINDOW = 4 << 20  # bytes a client may send on one stream before we credit them
CONNECTION_WINDOW = 16 << 20
BUFFERED_REQUESTS = 4  # unfinished unary requests one connection may hold, in max_request_bytes
MAX_FRAME = 1 << 20  # the largest frame we accept (fewer frames to parse for large tensors)
_CONFIG = fast_config(client_side=False)
_monotonic = time.monotonic

Refused = Callable[[str], None]


class _Details:
    """What a generic handler is asked to serve (grpc.HandlerCallDetails' two fields)."""

    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, invocation_metadata):
        self.method = method
        self.invocation_metadata = invocation_metadata


class H2GrpcServer:
    """A gRPC server with grpc.aio.Server's registration, port and lifecycle methods."""

    def __init__(
        self,
        *,
        max_receive_bytes: int,
        max_connections: int,
        max_concurrent_streams: int = 1024,
        reuse_port: bool = False,
        refused: Refused | None = None,
        max_connection_age_s: float = 0.0,
        refusals_per_s: int = 8000,
        max_header_bytes: int = 64 << 10,
        max_resets_per_s: int = 1000,
    ):
        self.max_receive_bytes = max_receive_bytes
        self.max_connections = max_connections
        self.max_concurrent_streams = max_concurrent_streams
        self.reuse_port = reuse_port
        self.refused = refused or (lambda reason: None)
        self.max_connection_age_s = max_connection_age_s
        self.refusals = PerSecond(refusals_per_s)  # overload refusals, against overload_refusals_per_s
        self.max_resets_per_s = max_resets_per_s
        self.max_header_bytes = max_header_bytes
        self._methods: dict[bytes, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._binds: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._listeners: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()
        self._stopped: asyncio.Event | None = None
        self._dirty: list[_Connection] = []  # connections with bytes to write at the end of this turn

    def dirty(self, conn: _Connection) -> None:
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._flush_dirty)
        self._dirty.append(conn)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
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
            details = _Details(path.decode("latin-1"), md)
            for g in self._generic:
                found = g.service(details)
                if found is not None:
                    self._methods[path] = found  # generic handlers here map a name to one handler
                    break
        return found

    # ------------------------------------------------------------------ ports
    def add_insecure_port(self, address: str) -> int:
        return self._bind(address, None)

    def add_secure_port(self, address: str, context: ssl.SSLContext) -> int:
        return self._bind(address, context)

    def _bind(self, address: str, context: ssl.SSLContext | None) -> int:
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
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for sock, context in self._binds:
            server = await loop.create_server(lambda: _Connection(self), sock=sock, ssl=context, backlog=2048)
            self._listeners.append(server)

    async def stop(self, grace: float | None) -> None:
        """Stop listening, tell every connection to go away (calls in progress finish), and after
        ``grace`` seconds cancel what is left."""
        for server in self._listeners:
            server.close()
        self._listeners.clear()
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


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: its calls, its writes and its windows."""

    def __init__(self, server: H2GrpcServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.h2 = h2.connection.H2Connection(_CONFIG)
        self.calls: dict[int, _Call] = {}
        self.peer = ""
        self.auth: dict[str, list[bytes]] = {}
        self._flush_soon = False
        self._paused = False  # the transport's write buffer is full
        self._drained: list[asyncio.Future] = []
        self._closing = False
        self._last_stream = 0  # the last call accepted before a GOAWAY of ours
        self.buffered = 0  # bytes of unfinished unary requests held (see hold)
        self._resets = PerSecond(server.max_resets_per_s)  # streams the client reset
        self._held = False  # not read for a while after an overload refusal past the budget
        self._age_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport) -> None:
        self.transport = transport
        server = self.server
        if len(server.connections) >= server.max_connections:
            server.refused("grpc_connections")
            transport.abort()
            return
        server.connections.add(self)
        self.peer = _peer(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.auth = {"transport_security_type": [b"ssl"]}
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                self.auth["x509_pem_cert"] = [ssl.DER_cert_to_PEM_cert(der).encode("ascii")]
        h = self.h2
        h.encoder, h.decoder = CachingEncoder(), CachingDecoder(server.max_header_bytes)
        h.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: server.max_header_bytes,
            },
        )
        h.initiate_connection()
        # Take our own settings as in force now rather than when the client acknowledges them:
        # a client may use them as soon as it reads them (gRPC core sends a 1 MiB frame before
        # its ACK reaches us), and h2 would call that a protocol error. No stream exists yet, so
        # only the frame and header-list limits need setting by hand.
        h.local_settings.acknowledge()
        h.max_inbound_frame_size = MAX_FRAME
        h.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        transport.write(h.data_to_send())
        if server.max_connection_age_s > 0:
            loop = asyncio.get_running_loop()
            self._age_timer = loop.call_later(server.max_connection_age_s, self._aged)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        if self._age_timer is not None:
            self._age_timer.cancel()
        for call in list(self.calls.values()):
            call.abandon()
        self.calls.clear()
        for f in self._drained:
            if not f.done():
                f.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, []
        for f in drained:
            if not f.done():
                f.set_result(None)

    def writable(self) -> asyncio.Future | None:
        """A future that resolves once the transport takes writes again, or None if it does."""
        if not self._paused:
            return None
        f = asyncio.get_running_loop().create_future()
        self._drained.append(f)
        return f

    def _aged(self) -> None:
        """``max_connection_age_s`` passed: ask the client to reconnect; close once idle."""
        self.go_away()
        loop = asyncio.get_running_loop()
        self._age_timer = loop.call_later(max(self.server.max_connection_age_s / 10, 5.0), self.close)

    def go_away(self) -> None:
        """Close gracefully: tell the client with GOAWAY to open no more calls here (gRPC
        clients then start new calls on a new connection), let the calls in progress finish,
        then close. h2 can neither send nor receive once it has sent a GOAWAY, so this first
        one is written past it (h2 never learns of it); h2's own goes last, in ``_goodbye``."""
        if self._closing or self.transport is None or self.transport.is_closing():
            return
        self._closing = True
        self._last_stream = self.h2.highest_inbound_stream_id
        self.flush()  # what h2 holds goes first
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self._last_stream
        self.transport.write(frame.serialize())
        if not self.calls:
            self._goodbye()

    def _goodbye(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(last_stream_id=self.h2.highest_inbound_stream_id)
        self.flush()
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def flush_soon(self) -> None:
        """Write what the h2 connection holds at the end of this loop turn (answers finished in
        one turn go out in one write per connection)."""
        if not self._flush_soon:
            self._flush_soon = True
            self.server.dirty(self)

    # ------------------------------------------------------------------ reading
    def data_received(self, data: bytes) -> None:
        try:
            events: list[Any] = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.debug("closing a gRPC connection from %s on an HTTP/2 error: %s", self.peer, e)
            # (DenialOfServiceError: a header block past max_header_bytes, among others)
            dos = isinstance(e, h2.exceptions.DenialOfServiceError)
            self.server.refused("grpc_header_bytes" if dos else "grpc_protocol")
            self.flush()
            self.close()
            return
        except Exception:  # a bug here must cost one connection, never wedge it
            log.exception("closing a gRPC connection from %s: its bytes could not be read", self.peer)
            self.close()
            return
        for ev in events:
            kind = type(ev)
            if kind is h2.events.DataReceived:
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    call.received(ev.data, ev.flow_controlled_length)
                elif ev.flow_controlled_length:
                    self.credit(ev.flow_controlled_length, ev.stream_id)
            elif kind is h2.events.RequestReceived:
                self._request(ev.stream_id, ev.headers)  # (an END_STREAM here comes as StreamEnded too)
            elif kind is h2.events.StreamEnded:
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    call.request_ended()
            elif kind is h2.events.StreamReset:
                call = self.calls.pop(ev.stream_id, None)
                if call is not None:
                    call.abandon()
                if self._reset_flood():
                    return
            elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
                sid = getattr(ev, "stream_id", 0)
                if sid:
                    call = self.calls.get(sid)
                    if call is not None:
                        call.pump()
                else:
                    for call in list(self.calls.values()):
                        call.pump()
            elif kind is h2.events.ConnectionTerminated:  # the client's GOAWAY: h2 sends nothing more
                for call in list(self.calls.values()):
                    call.abandon()
                self.calls.clear()
                self.close()
        self._flush_soon = False  # (a turn's later flush finds nothing to write)
        self.flush()

    def _reset_flood(self) -> bool:
        """Count a stream the client reset; past ``max_resets_per_s`` in a second, close the
        connection (each reset call costs us its set-up, the client nothing)."""
        if not self._resets.over():
            return False
        log.debug("closing a gRPC connection from %s: a flood of stream resets", self.peer)
        self.server.refused("grpc_resets")
        for call in list(self.calls.values()):
            call.abandon()
        self.calls.clear()
        self._goodbye()
        return True

    def credit(self, n: int, sid: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, KeyError):
            self.h2.acknowledge_received_data(n, sid)

    def _request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self._closing and sid > self._last_stream:  # opened after our GOAWAY: never started
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        path = method = ctype = timeout = encoding = None
        for k, v in headers:
            if k == b":path":
                path = v
            elif k == b":method":
                method = v
            elif k == b"content-type":
                ctype = v
            elif k == b"grpc-timeout":
                timeout = v
            elif k == b"grpc-encoding":
                encoding = v
        if method != b"POST" or ctype is None or not ctype.startswith(b"application/grpc"):
            self._plain(sid, b"415", b"only gRPC (POST, content-type application/grpc) is served on this port")
            return
        md = grpc_wire.metadata(headers)
        handler = self.server.handler(path or b"", md)
        if handler is None:
            self.trailers_only(sid, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        if encoding is not None and encoding not in grpc_wire.ENCODINGS:
            self.trailers_only(
                sid,
                grpc.StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {encoding[:64].decode('latin-1')!r} is not supported (identity, deflate, gzip)",
            )
            return
        deadline = None
        if timeout is not None:
            seconds = grpc_wire.parse_timeout(timeout)
            if seconds is None:
                self.trailers_only(sid, grpc.StatusCode.INTERNAL, "the grpc-timeout header is malformed")
                return
            deadline = _monotonic() + seconds
        call = _Call(self, sid, handler, md, deadline, encoding, (path or b"").decode("latin-1"))
        self.calls[sid] = call

    # ------------------------------------------------------------------ writing
    def _plain(self, sid: int, status: bytes, text: bytes) -> None:
        self.h2.send_headers(sid, [(b":status", status), (b"content-type", b"text/plain")])
        self.h2.send_data(sid, text, end_stream=True)

    def trailers_only(self, sid: int, code: grpc.StatusCode, message: str, md=()) -> None:
        """An answer with no message: status and metadata in the one HEADERS frame."""
        fields = OK_HEADERS + grpc_wire.status_fields(code.value[0], message) + grpc_wire.encode_metadata(md)
        self.h2.send_headers(sid, fields, end_stream=True)
        self.stop_reading(sid)

    def stop_reading(self, sid: int, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Our side of ``sid`` is done: a client still sending is told to stop (RST_STREAM
        NO_ERROR, as the spec allows once the status is sent); with another ``code`` the stream
        is reset whatever its state (an answer given up on)."""
        stream = self.h2.streams.get(sid)
        if stream is not None and not stream.closed and (stream.open or code != h2.errors.ErrorCodes.NO_ERROR):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(sid, code)

    def overload_refusal(self, trailing) -> None:
        """A call on this connection was refused for overload: past the server's refusal budget,
        the connection is not read for the refusal's Retry-After (TCP backpressure, as for HTTP:
        its client's next requests wait in its socket instead of taking the core from admitted
        work). Answers to its admitted calls are still written."""
        if self._held or not self.server.refusals.over() or self.transport is None:
            return
        retry = next((v for k, v in trailing if k == "retry-after"), "1")
        try:
            pause = max(1.0, min(float(retry), 10.0))
        except ValueError:
            pause = 1.0
        self._held = True
        self.server.refused("overload_hold")
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(pause, self._release)

    def _release(self) -> None:
        self._held = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def hold(self, call: _Call, n: int) -> bool:
        """Count ``n`` more bytes of ``call``'s unfinished unary request; False (the call is to be
        refused) once the connection would hold more than ``BUFFERED_REQUESTS`` times
        ``max_request_bytes`` of unfinished requests. Withholding credit instead could deadlock
        a client that interleaves many large requests, since they share the connection's window."""
        if self.buffered + n > BUFFERED_REQUESTS * self.server.max_receive_bytes:
            self.server.refused("grpc_buffered_bytes")
            return False
        call.held += n
        self.buffered += n
        return True

    def release(self, call: _Call) -> None:
        """``call``'s buffered request bytes are no longer held."""
        self.buffered -= call.held
        call.held = 0

    def finished(self, call: _Call) -> None:
        self.release(call)
        self.calls.pop(call.sid, None)
        if self._closing and not self.calls:
            self._goodbye()


# h2 formats every frame it receives for a trace log line (``repr(frame)``) before asking whether
# anyone logs at that level: a tenth of the engine's receiving time. Its module is given a repr
# that does nothing; h2.connection uses repr for nothing else (h2 is pinned below 5).
h2.connection.repr = lambda obj: ""  # type: ignore[attr-defined]

# grpc_reflection (and others) pick their asyncio servicers for a grpc.aio.Server: this is one.
grpc.aio.Server.register(H2GrpcServer)


def _peer(transport) -> str:
    """The peer as gRPC names it: ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:path``."""
    addr: Any = transport.get_extra_info("peername")
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return f"unix:{addr or ''}"
