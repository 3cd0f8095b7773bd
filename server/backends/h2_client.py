"""gRPC unary calls to an upstream over one HTTP/2 connection on the event loop (batchgate's own
HTTP/2 framing, ``transport/http2.py``, client side): what a remote model with ``client=h2``
forwards with, instead of grpc.aio's channel, whose Python layer and hand-overs to gRPC core's
threads cost most of the gateway's CPU for a forwarded request.

One connection per upstream, made on first use and again after it is lost (a call made while
no connection can be had fails UNAVAILABLE with gRPC's own "failed to connect to all addresses"
wording, so the backend retries it elsewhere, as a call never delivered). A call's errors are
``grpc.aio.AioRpcError``s, so the backend counts, ejects and translates them as it does
grpc.aio's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections import deque
from typing import TYPE_CHECKING

import grpc
from grpc.aio import Metadata

from ..transport import grpc_wire, http2
from ..transport.http2_client import Http2Client

if TYPE_CHECKING:
    from .upstream_tls import UpstreamSecurity

log = logging.getLogger("batchgate.remote")
WINDOW = 16 << 20
MAX_FRAME = 1 << 20
CONNECT_TIMEOUT_S = 5.0
# A TLS connection closed waits this long for the upstream's close_notify, then is dropped
# (asyncio's default, 30 s, kept a retired connection's socket that long: gRPC core sends none)
TLS_SHUTDOWN_S = 1.0
# Keepalive, as the grpc.aio channel's options: with calls in flight and nothing read for
# KEEPALIVE_S, a PING; no answer within KEEPALIVE_TIMEOUT_S and the connection is given up
# (an upstream host gone without a FIN or RST). At most PINGS_WITHOUT_CALLS pings until a
# new call starts, as gRPC core's clients, so servers that police pings do not refuse ours.
KEEPALIVE_S = 10.0
KEEPALIVE_TIMEOUT_S = 5.0
PINGS_WITHOUT_CALLS = 2
RESUBMITS = 2  # times a call never sent (GOAWAY, ids used up) is tried again on a new connection
_CODES = {c.value[0]: c for c in grpc.StatusCode}
# gRPC's mapping of an HTTP status that came without a grpc-status (a proxy's answer, say)
_HTTP_CODES = {
    b"400": grpc.StatusCode.INTERNAL,
    b"401": grpc.StatusCode.UNAUTHENTICATED,
    b"403": grpc.StatusCode.PERMISSION_DENIED,
    b"404": grpc.StatusCode.UNIMPLEMENTED,
    b"429": grpc.StatusCode.UNAVAILABLE,
    b"502": grpc.StatusCode.UNAVAILABLE,
    b"503": grpc.StatusCode.UNAVAILABLE,
    b"504": grpc.StatusCode.UNAVAILABLE,
}
_NOT_SENT = "failed to connect to all addresses; "  # (remote.not_delivered: safe to send again)
# gRPC's mapping of the error code of an upstream's RST_STREAM (PROTOCOL-HTTP2.md, as grpc.aio
# reads it); any other code is INTERNAL. REFUSED_STREAM before any answer is a call never sent.
_RESET_CODES = {
    http2.REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE,
    http2.CANCEL: grpc.StatusCode.CANCELLED,
    http2.ENHANCE_YOUR_CALM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    0xC: grpc.StatusCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}


class H2RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str, unsent: bool = False, refused: bool = False):
        super().__init__(code, Metadata(), Metadata(), details)
        self.unsent = unsent  # the upstream never saw the call: it may go again on a new connection
        self.refused = refused  # its stream was refused (REFUSED_STREAM): it may go again on this one


def _unsent(why: str, refused: bool = False) -> H2RpcError:
    return H2RpcError(grpc.StatusCode.UNAVAILABLE, _NOT_SENT + why, unsent=True, refused=refused)


class _Call:
    __slots__ = ("future", "headers", "data", "out", "sent", "sid", "path", "md", "end")

    def __init__(self, future: asyncio.Future, path: bytes, body: bytes, md, end: float):
        self.future = future
        self.headers: list[tuple[bytes, bytes]] = []
        self.data = bytearray()
        self.out = memoryview(grpc_wire.frame(body))  # the request; ``sent`` bytes of it are out
        self.sent = 0
        self.sid = 0  # its stream, once opened (it may wait for one: the upstream's stream limit)
        self.path = path
        self.md = md
        self.end = end  # monotonic deadline


class _Protocol(asyncio.Protocol):
    def __init__(self, channel: H2Channel):
        self.channel = channel
        self.h2 = Http2Client(self, stream_window=WINDOW, connection_window=WINDOW, max_frame=MAX_FRAME)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.waiting: deque[_Call] = deque()  # calls past the upstream's MAX_CONCURRENT_STREAMS
        self.going_away = False  # the server said GOAWAY (or our stream ids ran out): no new calls here
        self.lost = False
        self._flush = False
        self._loop = asyncio.get_running_loop()
        self._last_read = time.monotonic()
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_out = False  # a keepalive PING waits for its ACK
        self._pings = 0  # keepalive PINGs since a call last started

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.h2.data_to_send())

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        why = f"connection to {self.channel.address} lost"
        self._fail_all(lambda: H2RpcError(grpc.StatusCode.UNAVAILABLE, why))

    def _fail_all(self, error) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            if not call.future.done():
                call.future.set_exception(error())
        self._fail_waiting("connection closed")

    def _fail_waiting(self, why: str) -> None:
        waiting, self.waiting = self.waiting, deque()
        for call in waiting:
            if not call.future.done():
                call.future.set_exception(_unsent(why))

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def flush_soon(self) -> None:
        if not self._flush:
            self._flush = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush = False
        self.flush()

    # ------------------------------------------------------------------ calls
    def submit(self, call: _Call) -> None:
        """Start ``call`` now, or once the upstream's limit on concurrent streams allows."""
        if self.lost:  # (lost while its caller waited to be handed it: nothing would fail the call later)
            call.future.set_exception(_unsent(f"connection to {self.channel.address} lost"))
            return
        h = self.h2
        if self.waiting or len(h.streams) >= h.peer_max_streams:
            self.waiting.append(call)  # (its deadline's timer fails it if no slot comes in time)
            return
        self._open(call)

    def _open(self, call: _Call) -> None:
        h = self.h2
        left = call.end - time.monotonic()
        if left <= 0:
            call.future.set_exception(H2RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            return
        if h.exhausted or self.going_away:
            self.going_away = True
            call.future.set_exception(_unsent("the connection can open no more streams"))
            return
        fields = [
            (b":method", b"POST"),
            (b":scheme", self.channel.scheme),
            (b":path", call.path),
            (b":authority", self.channel.authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", grpc_wire.encode_timeout(left)),
        ]
        security = self.channel.security
        if security is not None and security.header:  # (the token as it is now: rotation needs no reconnect)
            fields.append((b"authorization", security.header))
        if call.md:
            fields += grpc_wire.encode_metadata(call.md)
        call.sid = sid = h.open_stream(fields)
        self.calls[sid] = call
        self._pings = 0
        self._pump(sid, call)
        self.flush_soon()
        if self._keepalive is None:
            self._keepalive = self._loop.call_later(KEEPALIVE_S, self._keep_alive)

    def _admit_waiting(self) -> None:
        h, waiting = self.h2, self.waiting
        while waiting and len(h.streams) < h.peer_max_streams:
            call = waiting.popleft()
            if not call.future.done():  # (else it expired or was cancelled while it waited)
                self._open(call)

    def cancel(self, call: _Call) -> None:
        if not call.sid:  # still waiting for a stream
            with contextlib.suppress(ValueError):  # (not there: it was admitted or failed already)
                self.waiting.remove(call)
        elif self.calls.pop(call.sid, None) is not None:
            self.h2.reset_stream(call.sid, http2.CANCEL)
            self._admit_waiting()
            self.flush_soon()

    def retire(self) -> None:
        """No new calls here; the connection closes once its calls are answered."""
        self.going_away = True
        if not self.calls and self.transport is not None:
            self._fail_waiting("connection retired")
            # (nothing left to say on it: over TLS no close_notify exchange, which held the socket
            # for TLS_SHUTDOWN_S, and past a loop stopped meanwhile)
            self.transport.abort() if self.channel.tls else self.transport.close()

    def _pump(self, sid: int, call: _Call) -> None:
        h, out = self.h2, call.out
        total = len(out)
        while call.sent < total:
            n = min(total - call.sent, h.local_flow_control_window(sid), h.max_outbound_frame_size)
            if n <= 0:
                return
            start, call.sent = call.sent, call.sent + n
            h.send_data(sid, out[start : call.sent], end_stream=call.sent == total)

    # ------------------------------------------------------------------ keepalive
    def _keep_alive(self) -> None:
        self._keepalive = None
        if self.lost or not (self.calls or self.waiting):
            return  # started again by the next call
        idle = time.monotonic() - self._last_read
        if idle >= KEEPALIVE_S and not self._ping_out and self._pings < PINGS_WITHOUT_CALLS:
            self._ping_out = True
            self._pings += 1
            self.h2.send_ping(b"bgkalive")
            self.flush()
            self._keepalive = self._loop.call_later(KEEPALIVE_TIMEOUT_S, self._ping_timeout)
            return
        self._keepalive = self._loop.call_later(max(0.1, KEEPALIVE_S - idle), self._keep_alive)

    def _ping_timeout(self) -> None:
        self._keepalive = None
        if not self._ping_out or self.lost:
            self._keep_alive()
            return
        log.warning("upstream %s did not answer a keepalive ping: its connection is given up", self.channel.address)
        self.going_away = True
        self._fail_all(lambda: H2RpcError(grpc.StatusCode.UNAVAILABLE, "keepalive ping not answered: connection lost"))
        if self.transport is not None:
            self.transport.abort()

    def on_ping_ack(self, payload: bytes) -> None:
        self._ping_out = False

    # ------------------------------------------------------------------ reading
    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        try:
            self.h2.receive(data)
        except Exception as e:  # an HTTP/2 error, or a bug: this connection's calls fail, the next call reconnects
            why = f"HTTP/2 error from upstream: {e}" if isinstance(e, http2.Http2Error) else f"unreadable answer: {e!r}"
            if not isinstance(e, http2.Http2Error):
                log.exception("closing the connection to upstream %s", self.channel.address)
            self.going_away = True
            self._fail_all(lambda: H2RpcError(grpc.StatusCode.UNAVAILABLE, why))
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        if self.waiting:
            self._admit_waiting()
        self.flush()
        if self.going_away and not self.calls:
            self.retire()

    # what the HTTP/2 layer reads (http2_client.ClientHandler)
    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        call.headers += headers
        if end_stream:
            del self.calls[sid]
            if not call.future.done():
                self._finish(call)

    def on_data(self, sid: int, data: bytes, flow: int, end_stream: bool) -> None:
        self.h2.acknowledge_received_data(flow, sid)
        call = self.calls.get(sid)
        if call is None:
            return
        call.data += data
        # (a message says its length first: one past the limit is refused then, not once held)
        size = int.from_bytes(call.data[1:5], "big") if len(call.data) >= 5 else 0
        if len(call.data) > self.channel.max_message_bytes + 5 or size > self.channel.max_message_bytes:
            self.cancel(call)
            call.future.set_exception(
                H2RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the upstream's answer is larger than allowed")
            )
            return
        if end_stream:  # (an answer that ends without trailers: no gRPC status)
            del self.calls[sid]
            if not call.future.done():
                self._finish(call)

    def on_reset(self, sid: int, code: int = http2.INTERNAL_ERROR) -> None:
        call = self.calls.pop(sid, None)
        if call is not None and not call.future.done():
            if code == http2.REFUSED_STREAM and not call.headers and not call.data:
                # not processed there (RFC 9113 8.7): safe to send again
                call.future.set_exception(_unsent(f"the upstream refused the stream (error code {code})", True))
            else:  # (until 2026-12-06 every code was UNAVAILABLE, where grpc.aio reads most as INTERNAL)
                status = _RESET_CODES.get(code, grpc.StatusCode.INTERNAL)
                call.future.set_exception(H2RpcError(status, f"the upstream reset the call (error code {code})"))

    def on_oversized(self, sid: int) -> None:
        call = self.calls.pop(sid, None)
        if call is not None and not call.future.done():
            limit = self.h2.max_header_bytes
            call.future.set_exception(
                H2RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the upstream's answer has a header list over {limit} bytes (received metadata size "
                    "exceeds the limit); the call was given up",
                )
            )

    def on_window(self, sid: int) -> None:
        for s, call in list(self.calls.items()):
            if call.sent < len(call.out) and (sid <= 0 or s == sid):
                self._pump(s, call)

    def on_goaway(self, last_stream_id: int) -> None:
        self.going_away = True
        for sid in [s for s in self.calls if s > last_stream_id]:  # never started there: safe to send again
            self.calls.pop(sid).future.set_exception(_unsent("upstream going away"))
        self._fail_waiting("upstream going away")

    def _finish(self, call: _Call) -> None:
        fields = dict(call.headers)
        status = fields.get(b":status")
        code_text = fields.get(b"grpc-status")
        if status != b"200":  # (a proxy's answer, say: mapped as gRPC maps it)
            code = _HTTP_CODES.get(status or b"", grpc.StatusCode.UNKNOWN)
            call.future.set_exception(H2RpcError(code, f"the upstream answered HTTP {status!r} without a gRPC status"))
            return
        if code_text is None or not code_text.isdigit():
            what = "no gRPC status" if code_text is None else f"a malformed grpc-status {code_text[:16]!r}"
            call.future.set_exception(H2RpcError(grpc.StatusCode.UNKNOWN, f"the upstream answered with {what}"))
            return
        code = _CODES.get(int(code_text), grpc.StatusCode.UNKNOWN)
        if code is not grpc.StatusCode.OK:
            message = urllib.parse.unquote(fields.get(b"grpc-message", b"").decode("latin-1"))
            call.future.set_exception(H2RpcError(code, message))
            return
        try:
            messages, used = grpc_wire.split_messages(call.data, self.channel.max_message_bytes)
        except grpc_wire.WireError as e:
            call.future.set_exception(H2RpcError(grpc.StatusCode.INTERNAL, e.message))
            return
        if len(messages) != 1 or used != len(call.data) or messages[0][0]:
            call.future.set_exception(
                H2RpcError(grpc.StatusCode.INTERNAL, "the upstream's answer is not one uncompressed message")
            )
            return
        call.future.set_result(messages[0][1])


def _expire(p: _Protocol, call: _Call) -> None:
    if not call.future.done():
        p.cancel(call)
        call.future.set_exception(H2RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


class H2Channel:
    """Unary gRPC calls to one upstream over one HTTP/2 connection."""

    def __init__(self, address: str, max_message_bytes: int, security: UpstreamSecurity | None = None):
        """``address``: ``host:port``, ``[v6]:port``, or gRPC's ``unix:path`` / ``unix:///path``
        (a Unix socket: how front workers reach the process that owns the models); ``security``:
        the remote model's TLS (ALPN h2) and token, if it has either."""
        self.address = address
        self.security = security
        self.tls = security is not None and security.spec.tls
        self.scheme = b"https" if self.tls else b"http"
        self._unix: str | None = None
        if address.startswith("unix:"):
            self._unix = address[len("unix://") :] if address.startswith("unix://") else address[len("unix:") :]
            self._host, self._port = "", 0
            self.authority = b"localhost"
        else:
            host, _, port = address.rpartition(":")
            self._host, self._port = host.strip("[]"), int(port)
            self.authority = (address if security is None else security.authority(address)).encode("ascii")
        self.max_message_bytes = max_message_bytes
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self._closed = False

    async def _connection(self, end: float) -> _Protocol:
        """The connection to send on (made now if there is none), within the deadline ``end``."""
        p = self._protocol
        if p is not None and not p.lost and not p.going_away:
            if not p.h2.exhausted:
                return p
            p.retire()  # its stream ids are spent: its calls finish there, new ones go on a new connection
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:  # (shielded: other callers may share the attempt after this one's deadline)
            return await asyncio.wait_for(asyncio.shield(connecting), max(0.0, end - time.monotonic()))
        except TimeoutError:
            if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
                return connecting.result()
            raise H2RpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"Deadline Exceeded while connecting to {self.address}"
            ) from None
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            opening = (
                loop.create_unix_connection(lambda: _Protocol(self), self._unix)
                if self._unix is not None
                else loop.create_connection(lambda: _Protocol(self), self._host, self._port, **self._tls_arguments())
            )
            _, protocol = await asyncio.wait_for(opening, CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise _unsent(f"{self.address}: connect timed out after {CONNECT_TIMEOUT_S:g} s") from None
        except OSError as e:  # (ssl.SSLError among them: a certificate refused, say)
            raise _unsent(f"{self.address}: {e}") from None
        if self.tls:
            transport = protocol.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                if transport is not None:
                    transport.close()
                raise _unsent(f"{self.address}: the upstream's TLS does not offer HTTP/2 (ALPN h2)")
        self._protocol = protocol
        return protocol

    def _tls_arguments(self) -> dict:
        """create_connection's TLS arguments: the model's newest context, the name to verify."""
        if not self.tls or self.security is None or self.security.ssl_context is None:
            return {}
        return {
            "ssl": self.security.ssl_context,
            "server_hostname": self.security.server_name(self._host),
            "ssl_shutdown_timeout": TLS_SHUTDOWN_S,
        }

    def renew(self) -> None:
        """New TLS files: the next call connects with them; the open connection's calls finish there."""
        if self._protocol is not None and not self._protocol.lost:
            self._protocol.retire()

    def unary(self, path: str):
        """A callable like grpc.aio's ``channel.unary_unary(path)`` for bytes in and out:
        ``await call(request, timeout=..., metadata=...)``. A call the upstream never saw (its
        GOAWAY came first, or the connection ran out of stream ids) goes again on a new
        connection, and one whose stream it refused (REFUSED_STREAM) on the same one, at most
        ``RESUBMITS`` times, as gRPC's transparent retry does."""
        raw_path = path.encode("ascii")
        loop = asyncio.get_running_loop

        async def call(request: bytes, timeout: float | None = None, metadata=None) -> bytes:
            end = time.monotonic() + (timeout if timeout is not None else 3600.0)
            for attempt in range(RESUBMITS + 1):
                if self._closed:
                    raise _unsent("channel closed")
                p = await self._connection(end)
                left = end - time.monotonic()
                if left <= 0:
                    raise H2RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                c = _Call(loop().create_future(), raw_path, request, metadata, end)
                p.submit(c)
                timer = loop().call_later(left, _expire, p, c)
                try:
                    return await c.future
                except H2RpcError as e:
                    # A refused stream goes again on the same connection: a server refuses streams
                    # past its MAX_CONCURRENT_STREAMS, which a burst on a new connection opens before
                    # the server's SETTINGS arrive (a round trip later); by the time its refusal is
                    # read the limit is known, and the call waits for a slot (gRPC core retries
                    # such a stream as transparently).
                    replaced = p.going_away or p.lost or p is not self._protocol or e.refused
                    if not e.unsent or attempt == RESUBMITS or not replaced:  # (else: a new connection)
                        raise
                except asyncio.CancelledError:  # the caller went away: so does the call upstream
                    p.cancel(c)
                    raise
                finally:
                    timer.cancel()
            raise AssertionError("unreachable")

        return call

    async def close(self) -> None:
        self._closed = True
        if self._protocol is not None and self._protocol.transport is not None:
            # (over TLS, close() waits for the upstream's close_notify: a loop stopped meanwhile
            # left the socket open; the channel is done with it, so it goes at once)
            transport = self._protocol.transport
            transport.abort() if self.tls else transport.close()
