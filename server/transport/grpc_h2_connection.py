"""One connection of the h2 gRPC engine (``grpc_h2.py``): its HTTP/2 state, its calls, its
windows, its writes, and its overload holds (see ``grpc_h2.py`` for the engine as a whole)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from ..core.rate import NEVER, PerSecond
from . import grpc_wire, http2
from .grpc_h2_call import OK_HEADERS, _Call
from .http2_handler import GONE
from .sockets import grpc_peer, peer_of

if TYPE_CHECKING:
    from .grpc_h2 import H2GrpcServer

log = logging.getLogger("batchgate.grpc")

STREAM_WINDOW = 4 << 20  # bytes a client may send on one stream before we credit them
CONNECTION_WINDOW = 16 << 20
BUFFERED_REQUESTS = 4  # unfinished unary requests one connection may hold, in max_request_bytes
MAX_FRAME = 1 << 20  # the largest frame we accept (fewer frames to parse for large tensors)
MAX_WRITE_BACKLOG = 4 << 20  # bytes waiting to be written past which a connection is not read
RAPID_RESET_S = 0.02  # a reset sooner than this after the call opened always counts toward a flood
PARSED_MAX_BYTES = 4096  # header blocks larger than this are parsed each time, not kept per connection
GOAWAY_GRACE_S = 1.0  # between our two GOAWAYs: calls a client sent before it saw the first are taken
_monotonic = time.monotonic

Refused = Callable[[str], None]
_NOT_GRPC = object()  # a request that is not gRPC (answered 415)
_MALFORMED = object()  # a request whose headers break HTTP/2's rules (reset, PROTOCOL_ERROR)
# trailers-only answers' status and fields, by their words and metadata
_TRAILERS_ONLY: dict[tuple, tuple[grpc.StatusCode, list[tuple[bytes, bytes]]]] = {}


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: its calls, its writes and its windows."""

    def __init__(self, server: H2GrpcServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.h2 = http2.Http2(
            self,
            max_concurrent_streams=server.max_concurrent_streams,
            max_header_bytes=server.max_header_bytes,
            max_header_fields=server.max_header_fields,
            stream_window=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW,
            max_frame=MAX_FRAME,
        )
        self.calls: dict[int, _Call] = {}
        self.peer = ""
        self.auth: dict[str, list[bytes]] = {}
        self._flush_soon = False
        self._paused = False  # the transport's write buffer is full
        self._drained: list[asyncio.Future] = []
        self._closing = False
        self._last_stream = 0  # the last call accepted before a GOAWAY of ours
        self._final = False  # the GOAWAY naming the last call taken is sent: close once calls end
        self.buffered = 0  # bytes of unfinished unary requests held (see hold)
        self._resets = PerSecond(server.max_resets_per_s)  # streams the client reset
        self._held = False  # not read for a while after an overload refusal past the budget
        self._last_refusal = NEVER  # (server.rounds, loop time) of its last overload refusal or hold's end
        # it carried two calls at once: its calls need not follow its answers, so none is a retry
        self.multiplexed = False
        self._backlogged = False  # not read until the client takes what waits to be written
        self._evicting = False  # aborted for max_unsent_answer_bytes (at the end of this turn)
        self.out_bytes = 0  # answer bytes its calls hold for the client's windows (their ``out``)
        self._age_timer: asyncio.TimerHandle | None = None
        self._parsed: dict[tuple, Any] = {}  # what _parse made of a request's headers
        self.opened = self.idle_since = _monotonic()  # (idle_since: when its last call ended)
        self.closed_at: float | None = None
        self.starved: set[_Call] = set()  # calls whose answers wait for the connection's window
        self._peer_key: str | None = None  # counted in server.peers (max_per_peer) under this

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport) -> None:
        self.transport = transport
        server = self.server
        if len(server.connections) >= server.max_connections:
            server.refused("grpc_connections")
            transport.abort()
            return
        if server.peers.limit:
            key = peer_of(transport.get_extra_info("peername"))
            if not server.peers.enter(key):
                server.refused("grpc_peer")
                transport.abort()
                return
            self._peer_key = key
        server.connections.add(self)
        self.peer = grpc_peer(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.auth = {"transport_security_type": [b"ssl"]}
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                self.auth["x509_pem_cert"] = [ssl.DER_cert_to_PEM_cert(der).encode("ascii")]
        # (our settings are in force from the start: gRPC core sends a 1 MiB frame before its
        # ACK of them reaches us)
        transport.write(self.h2.data_to_send())
        if server.max_connection_age_s > 0:
            self._age_timer = server.loop.call_later(server.max_connection_age_s, self._aged)

    @property
    def paused(self) -> bool:
        """Not read now: an overload hold, or its client not taking our writes."""
        return self._held or self._backlogged

    @property
    def closing(self) -> bool:
        return self._closing

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        if self.server.unsent is not None:
            self.server.unsent.release(self)
        if self._peer_key is not None:
            self.server.peers.leave(self._peer_key)
            self._peer_key = None
        if self._age_timer is not None:
            self._age_timer.cancel()
        for call in list(self.calls.values()):
            call.abandon()
        self.calls.clear()
        self._parsed.clear()
        # Its Http2 holds it as its handler, and it its Http2: without this, every connection
        # left that cycle (~60 objects, its transport with them) for the garbage collector.
        self.h2.handler = GONE
        for f in self._drained:
            if not f.done():
                f.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.unsent_changed(grew=False)
        if self._backlogged:
            self._backlogged = False
            if not self._held and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
                self._reading_again()
        drained, self._drained = self._drained, []
        for f in drained:
            if not f.done():
                f.set_result(None)

    def writable(self) -> asyncio.Future | None:
        """A future that resolves once the transport takes writes again, or None if it does."""
        if not self._paused:
            return None
        f = self.server.loop.create_future()
        self._drained.append(f)
        return f

    def _aged(self) -> None:
        """``max_connection_age_s`` passed: ask the client to reconnect; close once idle."""
        self.go_away()
        self._age_timer = self.server.loop.call_later(max(self.server.max_connection_age_s / 10, 5.0), self.close)

    def go_away(self) -> None:
        """Close gracefully, in two steps (RFC 9113 6.8): a GOAWAY naming the largest stream id
        tells the client to open no more calls here (gRPC clients then start new calls on a
        new connection) while the calls it sent meanwhile are still taken; ``GOAWAY_GRACE_S``
        later, a GOAWAY naming the last call taken, and the connection closes once its calls
        are done (``_goodbye``). Closing at once lost the calls a client had in flight when the
        GOAWAY reached it (UNAVAILABLE "Stream removed", seen under load)."""
        if self._closing or self.transport is None or self.transport.is_closing():
            return
        self._closing = True
        self._last_stream = http2.MAX_STREAM_ID
        self.h2.goaway(self._last_stream)
        self.flush()
        self.server.loop.call_later(GOAWAY_GRACE_S, self._last_goaway)

    def _last_goaway(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._last_stream = self.h2.highest_inbound_stream_id
        self._final = True
        if not self.calls:
            self._goodbye()
        else:
            self.h2.goaway(self._last_stream)
            self.flush()

    def _goodbye(self, code: int = http2.NO_ERROR) -> None:
        self.h2.goaway(self._last_stream if self._final else self.h2.highest_inbound_stream_id, code)
        self.flush()
        self.close()

    def close(self) -> None:
        self.h2.stop()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # (after what waits to be written; the sweep aborts it past CLOSE_GRACE_S)
            self.closed_at = _monotonic()

    def flush(self) -> None:
        out = self.h2.data_to_send()
        t = self.transport
        if out and t is not None and not t.is_closing():
            t.write(out)
            if self._paused:
                if not self._backlogged and t.get_write_buffer_size() > MAX_WRITE_BACKLOG:
                    # a client that sends and does not read (a PING flood, requests whose answers
                    # it never takes): nothing more is read until it takes what waits (RFC 9113 10.5)
                    self._backlogged = True
                    t.pause_reading()
                self.unsent_changed()

    def unsent_changed(self, grew: bool = True) -> None:
        """Tell the process's bound (``max_unsent_answer_bytes``) what this connection holds for
        its client: answers waiting for its flow-control windows, and its transport's buffer
        while paused. ``grew`` False: only if it held some (most connections never do)."""
        unsent = self.server.unsent
        if unsent is None or self._evicting or (not grew and self not in unsent.held):
            return
        n = self.out_bytes
        t = self.transport
        if self._paused and t is not None and not t.is_closing():
            n += t.get_write_buffer_size()
        unsent.hold(self, n)

    def evict_unsent(self) -> None:
        """Its bytes are the process's largest past ``max_unsent_answer_bytes``: aborted, once the
        write that may be running (another connection's, which passed the bound) is done."""
        if not self._evicting:
            self._evicting = True
            self.server.loop.call_soon(self._evict)

    def _evict(self) -> None:
        if self in self.server.connections and self.transport is not None:
            self.server.refused("grpc_unsent_answers")
            self.abandon_all()
            self.transport.abort()

    def flush_soon(self) -> None:
        """Write what the h2 connection holds at the end of this loop turn (answers finished in
        one turn go out in one write per connection)."""
        if not self._flush_soon:
            self._flush_soon = True
            self.server.dirty(self)

    # ------------------------------------------------------------------ reading
    def data_received(self, data: bytes) -> None:
        try:
            self.h2.receive(data)
        except http2.Http2Error as e:
            log.debug("closing a gRPC connection from %s on an HTTP/2 error: %s", self.peer, e)
            self.server.refused(f"grpc_{e.reason}" if e.reason in ("header_bytes", "flood") else "grpc_protocol")
            self.abandon_all()
            self.flush()
            self.close()
            return
        except Exception:  # a bug here must cost one connection, never wedge it
            log.exception("closing a gRPC connection from %s: its bytes could not be read", self.peer)
            self.abandon_all()
            self.close()
            return
        self._flush_soon = False  # (a turn's later flush finds nothing to write)
        self.flush()

    # what the HTTP/2 layer reads, frame by frame (http2.Handler)
    def on_request(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self._request(sid, headers)
        if end_stream:
            call = self.calls.get(sid)
            if call is not None:
                call.request_ended()

    def on_data(self, sid: int, data: bytes, flow: int, end_stream: bool) -> None:
        call = self.calls.get(sid)
        if call is None:
            self.credit(flow, sid)
            return
        if end_stream and flow == len(data) and call.whole_unary(data):
            # The usual unary call: its one message whole in the frame that ends it. Under
            # overload most of these are refused: judged here, before the message is buffered,
            # split and counted (see _Call.received), which a refusal would only undo.
            refuse = self.server.refusers.get(call.method)
            if refuse is not None:
                refused = refuse(data[5:], self.peer)
                if refused is not None:
                    self.credit(flow, sid)
                    call.request_done = True
                    call._refuse(*refused)
                    return
            call.received(data, flow)
            if self.calls.get(sid) is call:  # (still there unless the message failed it)
                call.request_ended(may_refuse=False)
            return
        if data or flow:
            call.received(data, flow)
        if end_stream:
            call = self.calls.get(sid)  # (still there unless the message failed it)
            if call is not None:
                call.request_ended()

    def on_reset(self, sid: int) -> None:
        call = self.calls.pop(sid, None)
        if call is not None:
            call.abandon()
            if not self.calls:
                self.idle_since = _monotonic()
            # A call reset at least halfway to its deadline (and not at once) is a client giving up
            # on an answer that is late (an overloaded server's lot), not a rapid reset.
            if call.deadline is not None:
                age = _monotonic() - call.opened
                if age >= max(RAPID_RESET_S, (call.deadline - call.opened) / 2):
                    return
        self._reset_flood()

    def on_oversized(self, sid: int) -> None:
        """A call whose headers and metadata decode past max_header_bytes (within twice that):
        refused alone; the connection's other calls go on (before, it was closed with them)."""
        self.server.refused("grpc_header_bytes")
        limit = self.h2.max_header_bytes
        self.trailers_only(sid, grpc.StatusCode.RESOURCE_EXHAUSTED, f"headers over max_header_bytes ({limit})")

    def on_refused(self, sid: int) -> None:
        """A stream opened past max_concurrent_streams, refused (REFUSED_STREAM, safe to retry):
        counted, and a stream gone at once as a reset is, so a client that keeps opening streams
        past the limit meets the reset-flood bound."""
        self.server.refused("grpc_concurrent_streams")
        self._reset_flood()

    def on_window(self, sid: int) -> None:
        if sid > 0:  # (-1: SETTINGS_INITIAL_WINDOW_SIZE grew every stream's window)
            call = self.calls.get(sid)
            if call is not None:
                call.pump()
            return
        if sid < 0:  # every stream's window grew
            waiting = [c for c in self.calls.values() if c.out]
        else:  # the connection's: only calls it held back (a flood of 1-byte credits costs no pass over all)
            waiting, self.starved = list(self.starved), set()
        h2 = self.h2
        for i, call in enumerate(waiting):
            if h2.connection_window() <= 0:
                self.starved.update(waiting[i:])
                break
            call.pump()

    def on_goaway(self) -> None:
        """The client's GOAWAY: it opens no more calls here; those in progress are answered (as
        grpc-java's graceful close expects), then the connection closes."""
        if not self._closing:
            self._closing = True
            self._last_stream = self.h2.highest_inbound_stream_id
        self._final = True
        if not self.calls:
            self._goodbye()

    def abandon_all(self) -> None:
        for call in list(self.calls.values()):
            call.abandon()
        self.calls.clear()

    def _reset_flood(self) -> bool:
        """Count a stream the client reset; past ``max_resets_per_s`` in a second, close the
        connection (each reset call costs us its set-up, the client nothing). Each call the
        connection saw answered in that second takes one reset back, so a client with tight
        deadlines whose calls mostly complete keeps its connection."""
        if not self._resets.over():
            return False
        log.debug("closing a gRPC connection from %s: a flood of stream resets", self.peer)
        self.server.refused("grpc_resets")
        self.abandon_all()
        self._goodbye(http2.ENHANCE_YOUR_CALM)
        return True

    def credit(self, n: int, sid: int) -> None:
        self.h2.acknowledge_received_data(n, sid)

    def _request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self._closing and sid > self._last_stream:  # opened after our last GOAWAY: never started
            self.h2.reset_stream(sid, http2.REFUSED_STREAM)
            self._reset_flood()  # (a client that goes on opening them meets the reset bound)
            return
        key = tuple(headers)
        parsed = self._parsed.get(key)
        if parsed is None:  # (a client sends the same headers call after call: read once)
            parsed = self._parse(headers)
            if sum(len(k) + len(v) for k, v in headers) <= PARSED_MAX_BYTES:  # (64 large ones held 7.7 MB)
                if len(self._parsed) >= 64:
                    self._parsed.clear()
                self._parsed[key] = parsed
        if type(parsed) is tuple:
            handler, md, seconds, encoding, path = parsed
            deadline = None if seconds is None else _monotonic() + seconds
            streams = handler.request_streaming or handler.response_streaming  # (Health.Watch: answers only)
            if streams:
                streaming = self.server.streaming.setdefault(path, set())
                if len(streaming) >= self.server.max_streaming_calls:
                    self.server.refused("grpc_streams")
                    self.trailers_only(
                        sid,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{self.server.max_streaming_calls} calls of this streaming method are open on this "
                        "server, its limit (grpc_max_streaming_calls); retry later or on another replica",
                    )
                    return
            if self.calls:
                self.multiplexed = True
            call = self.calls[sid] = _Call(self, sid, handler, md, deadline, encoding, path)
            if streams:
                streaming.add(call)
        elif parsed is _MALFORMED:
            self.server.refused("grpc_malformed")
            self.h2.reset_stream(sid, http2.PROTOCOL_ERROR)
        elif parsed is _NOT_GRPC:
            self._plain(sid, b"415", b"only gRPC (POST, content-type application/grpc) is served on this port")
        else:
            self.trailers_only(sid, *parsed)

    def _parse(self, headers: list[tuple[bytes, bytes]]) -> Any:
        """What a request's headers ask for: (handler, metadata, timeout in seconds or None,
        encoding, path) for a call to start; ``_MALFORMED``; ``_NOT_GRPC``; or a list of the
        status and message to answer at once."""
        why = grpc_wire.malformed(headers)
        if why is not None:
            log.debug("resetting a gRPC call from %s: malformed headers (%s)", self.peer, why)
            return _MALFORMED
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
            return _NOT_GRPC
        md = grpc_wire.metadata(headers)
        handler = self.server.handler(path or b"", md)
        if handler is None:
            return [grpc.StatusCode.UNIMPLEMENTED, "Method not found!"]
        if encoding is not None and encoding not in grpc_wire.ENCODINGS:
            return [
                grpc.StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {encoding[:64].decode('latin-1')!r} is not supported (identity, deflate, gzip)",
            ]
        seconds = None
        if timeout is not None:
            seconds = grpc_wire.parse_timeout(timeout)
            if seconds is None:
                return [grpc.StatusCode.INTERNAL, "the grpc-timeout header is malformed"]
        return handler, md, seconds, encoding, (path or b"").decode("latin-1")

    # ------------------------------------------------------------------ writing
    def _plain(self, sid: int, status: bytes, text: bytes) -> None:
        self.h2.send_headers(sid, [(b":status", status), (b"content-type", b"text/plain")])
        self.h2.send_data(sid, text, end_stream=True)
        self.stop_reading(sid)

    def trailers_only(self, sid: int, code: grpc.StatusCode, message: str, md=()) -> None:
        """An answer with no message: status and metadata in the one HEADERS frame."""
        key = (message, md)  # (the status is checked apart: an enum's hash is Python code, slow here)
        known = _TRAILERS_ONLY.get(key)
        if known is not None and known[0] is code:
            fields = known[1]
        else:  # (refusals repeat the same few: their fields are made once)
            fields = OK_HEADERS + grpc_wire.status_fields(code.value[0], message) + grpc_wire.encode_metadata(md)
            if len(_TRAILERS_ONLY) >= 256:
                _TRAILERS_ONLY.clear()
            _TRAILERS_ONLY[key] = (code, fields)
        # (no Huffman coding: hpack's, in Python, was a tenth of the loop in a storm of refusals
        # on 5,000 connections, each coding its own copy of a message once; a few bytes more)
        self.h2.send_headers(sid, fields, end_stream=True, huffman=False)
        self.stop_reading(sid)

    def stop_reading(self, sid: int, code: int = http2.NO_ERROR) -> None:
        """Our side of ``sid`` is done (see ``Http2.end_reading``)."""
        self.h2.end_reading(sid, code)

    def overload_refusal(self) -> None:
        """A call on this connection was refused for overload: past the refusals' rate, the
        connection is not read until its turn (``core/rate.Pacer``; TCP backpressure, as for
        HTTP: its client's next requests wait in its socket instead of taking the core from
        admitted work). Answers to its admitted calls are still written. A retry (a call on a
        connection that never carried two at once, read soon after its last refusal: see
        ``core/rate.RETRY_ROUNDS``) takes a turn at ``overload_retries_per_s`` as well."""
        if self._held or self.transport is None:
            return
        server = self.server
        last, self._last_refusal = self._last_refusal, (server.rounds, server.loop.time())
        pause, retry = server.turns.take(*self._last_refusal, NEVER if self.multiplexed else last)
        if pause <= 0:
            return
        self._held = True
        server.refused("overload_retry_hold" if retry else "overload_hold")
        self.transport.pause_reading()
        server.loop.call_later(pause, self._release)

    def _release(self) -> None:
        self._held = False
        self._last_refusal = (self.server.rounds, self.server.loop.time())  # (what waited is read now)
        if not self._backlogged and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._reading_again()

    def _reading_again(self) -> None:
        """Read again after a pause of ours: the time a request message waited then is not its client's."""
        now = _monotonic()
        for call in self.calls.values():
            if call.partial_since is not None:
                call.partial_since = now

    def hold(self, call: _Call, n: int) -> bool:
        """Count ``n`` more bytes of ``call``'s unfinished request message (a unary request, or
        the part of a stream's next message read so far); False (the call is to be refused) once
        the connection would hold more than ``BUFFERED_REQUESTS`` times ``max_request_bytes`` of
        them, or all connections more than ``max_buffered_bytes``. Withholding credit instead
        could deadlock a client that interleaves many large requests, since they share the
        connection's window."""
        server = self.server
        if self.buffered + n > BUFFERED_REQUESTS * server.max_receive_bytes or not server.budget.take(n):
            server.refused("grpc_buffered_bytes")
            return False
        call.held += n
        self.buffered += n
        return True

    def release(self, call: _Call, keep: int = 0) -> None:
        """``call``'s buffered request bytes are no longer held, but for ``keep`` of them."""
        n = call.held - keep
        self.buffered -= n
        self.server.budget.give(n)
        call.held = keep

    def finished(self, call: _Call) -> None:
        call.credit()  # bytes it read and never took (a stream ended with a backlog) go back to the window
        if not call.gone:  # a call answered pays for one reset: only a client that mostly resets is a flood
            self._resets.credit()
        self.release(call)
        self.calls.pop(call.sid, None)
        if call.method in self.server.streaming:
            self.server.streaming[call.method].discard(call)
        self.starved.discard(call)
        if not self.calls:
            self.idle_since = _monotonic()
            if self._closing and self._final:
                self._goodbye()
