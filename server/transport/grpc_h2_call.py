"""One call of batchgate's own gRPC engine (``grpc_h2.py``): its request messages, its
handler's task, its answer within the client's windows, and the grpc.aio-like context its
handler is given."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import grpc

from . import grpc_wire, http2
from .eager import start_eagerly
from .grpc_h2_context import Abort as _Abort
from .grpc_h2_context import CallContext
from .grpc_wire import WireError

if TYPE_CHECKING:
    from .grpc_h2_connection import _Connection

log = logging.getLogger("batchgate.grpc")

OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_OK_TRAILER = (b"grpc-status", b"0")
_STATUS_OF = {c.name: c for c in grpc.StatusCode}
# A request message in frames this small, many of them, is a flood (``_Call.received``): a client
# splits a message where its window or frame size makes it, 16 KiB at least, and may send the
# 5-byte prefix apart; none sends a message in dozens of slivers.
SLIVER_BYTES = 1024
MAX_SLIVERS = 64
_monotonic = time.monotonic


class _Requests:
    """A streaming call's request messages, read as the handler takes them."""

    __slots__ = ("call", "_waiter")

    def __init__(self, call: _Call):
        self.call: _Call | None = call
        self._waiter: asyncio.Future | None = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        call = self.call
        if call is None:  # the call is over (see _Call._finish)
            raise StopAsyncIteration
        while not call.inbox:
            if call.request_done or call.gone or self.call is None:
                if call.wire_error is not None:
                    raise call.wire_error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        raw = call.inbox.popleft()
        call.inbox_bytes -= len(raw)
        call.account()
        if not call.inbox:  # caught up: credit what was read, so the client sends on
            call.credit()
            if call.buf:  # (the client may only now send the rest of its next message)
                call.partial_since = _monotonic()
        if type(raw) is _Packed:
            raw = await call.inflate(raw)
        return call.deserialize(raw)

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Call(CallContext):
    """One call: its request bytes, its handler's task and its answer; also the handler's
    ``context`` (grpc.aio ServicerContext's methods that the services here use)."""

    __slots__ = (
        "conn",
        "sid",
        "handler",
        "md",
        "deadline",
        "encoding",
        "method",
        "buf",
        "inbox",
        "unacked",
        "held",
        "inbox_bytes",
        "partial_since",
        "out_since",
        "out_taken",
        "ran",
        "request_done",
        "gone",
        "done",
        "task",
        "timer",
        "requests",
        "headers_sent",
        "out",
        "end_after_out",
        "out_waiter",
        "wire_error",
        "opened",
        "slivers",
    )

    def __init__(self, conn: _Connection, sid: int, handler, md, deadline, encoding, method: str):
        self.conn = conn
        self.sid = sid
        self.opened = _monotonic()
        self.handler = handler
        self.md = md
        self.deadline = deadline
        self.encoding = encoding
        self.method = method
        self.buf = bytearray()
        self.inbox: deque[bytes] = deque()
        self.unacked = 0
        self.slivers = 0  # DATA frames under SLIVER_BYTES since a message last came whole
        # bytes of request messages this call holds (the part of one read so far, and whole ones not
        # yet taken by the handler: inflated, or as sent for a large one still _Packed), counted
        # in the connection's ``buffered``
        self.held = 0
        self.inbox_bytes = 0
        # since when a request message has been waiting for its rest (None: none is); a stall
        # past the server's body_timeout_s fails the call
        self.partial_since: float | None = None if handler.request_streaming else _monotonic()
        self.out_since: float | None = None  # since when answer bytes wait for the client's window, unsent
        self.out_taken = 0  # bytes the client took since then (each buys it time: grpc_h2_sweep.py)
        self.ran = False  # the handler has returned (the answer may still wait for the client's window)
        self.request_done = False
        self.gone = False  # the client reset the stream or the connection went away
        self.done = False  # our answer is complete (or abandoned)
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.requests: _Requests | None = None
        self.headers_sent = False
        self.out = bytearray()  # answer bytes waiting for the client's window
        self.end_after_out: list[tuple[bytes, bytes]] | None = None  # trailers to send once ``out`` is empty
        self.out_waiter: asyncio.Future | None = None
        self.wire_error: BaseException | None = None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple = ()
        if deadline is not None:
            self.timer = conn.server.loop.call_later(max(0.0, deadline - _monotonic()), self._expired)
        if handler.request_streaming:
            self.requests = _Requests(self)
            self._start(self.requests)

    # ------------------------------------------------------------------ request side
    def received(self, data: bytes, flow: int) -> None:
        if self.done:
            self.conn.credit(flow, self.sid)
            return
        self.buf += data
        self.unacked += flow
        limit = self.conn.server.max_receive_bytes
        try:
            messages, used = grpc_wire.split_messages(self.buf, limit)
        except WireError as e:
            self.fail(_STATUS_OF[e.code], e.message)
            return
        if used:
            del self.buf[:used]
        if messages:
            self.slivers = 0
            self._take(messages)
            if self.done:  # (failed: its bytes are let go)
                return
        elif len(data) < SLIVER_BYTES:
            # A message sent a byte a frame costs the loop a frame's work per byte (6 million
            # 1-byte frames of a 60 MB message took other clients' median from 0.75 to 100 ms):
            # past MAX_SLIVERS such frames without a message coming whole, a flood.
            self.slivers += 1
            if self.slivers > MAX_SLIVERS:
                self.conn.h2.calm(
                    f"a request message came in more than {MAX_SLIVERS} DATA frames of under {SLIVER_BYTES} bytes"
                )
        if not self._held():
            return
        if self.requests is None:  # unary: buffered until the request ends; credited at once
            self.credit()
            return
        if messages:
            self.requests.wake()
        partial = len(self.buf)
        if used or not partial:
            self.partial_since = _monotonic() if partial else None
        elif self.partial_since is None:
            self.partial_since = _monotonic()
        if not self.inbox:  # the handler keeps up: let the client send on
            self.credit()

    def whole_unary(self, data: bytes) -> bool:
        """Whether ``data`` is, on its own, this unary call's whole request: nothing of it read
        before, one uncompressed message exactly (see ``_Connection.on_data``)."""
        n = len(data) - 5
        return (
            self.requests is None
            and not self.done
            and not self.buf
            and not self.inbox
            and 0 <= n <= self.conn.server.max_receive_bytes
            and data[0] == 0
            and int.from_bytes(data[1:5], "big") == n
        )

    def account(self) -> bool:
        """Bring the connection's count of this call's bytes up to date (see ``held``); False if
        that would pass a limit (``_Connection.hold``)."""
        if self.done:
            return True
        now = len(self.buf) + self.inbox_bytes
        if now > self.held:
            return self.conn.hold(self, now - self.held)
        if now < self.held:
            self.conn.release(self, now)
        return True

    def _held(self) -> bool:
        """``account``, failing the call past a limit."""
        if self.account():
            return True
        self.fail(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "this connection, or the server, holds too many bytes of requests still arriving "
            "(max_buffered_request_bytes); retry, or send fewer large requests at once",
        )
        return False

    def _take(self, messages) -> None:
        for compressed, raw in messages:
            if self.requests is None and self.inbox:  # (before a second one is inflated)
                self.fail(grpc.StatusCode.UNIMPLEMENTED, "a unary call takes one request message; this one sent 2")
                return
            if compressed and len(raw) > grpc_wire.INFLATE_ON_LOOP_MAX_BYTES:
                raw = _Packed(raw)  # inflated on a thread as its handler takes it
            elif compressed:
                try:
                    raw = grpc_wire.decompress(raw, self.encoding or b"", self.conn.server.max_receive_bytes)
                except WireError as e:
                    self.fail(_STATUS_OF[e.code], e.message)
                    return
            self.inbox.append(raw)
            self.inbox_bytes += len(raw)
            if not self._held():  # each one as it is inflated: a few small bombs cannot add up unseen
                return

    def credit(self) -> None:
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.conn.credit(n, self.sid)
            self.conn.flush_soon()

    def request_ended(self, may_refuse: bool = True) -> None:
        """The client has sent all of its request; ``may_refuse`` False: the method's early
        refusal (``H2GrpcServer.refusers``) was asked already and let it through."""
        self.request_done = True
        self.partial_since = None
        if self.done:
            self.conn.release(self)
            return
        if self.buf:
            self.fail(grpc.StatusCode.INTERNAL, "the request ended inside a message")
            return
        if self.requests is not None:  # (its messages stay counted until the handler takes them)
            self.requests.wake()
            return
        self.conn.release(self)  # a unary request goes to its handler now
        if len(self.inbox) != 1:
            self.fail(
                grpc.StatusCode.UNIMPLEMENTED if self.inbox else grpc.StatusCode.INTERNAL,
                f"a unary call takes one request message; this one sent {len(self.inbox)}",
            )
            return
        raw = self.inbox.popleft()
        self.inbox_bytes = 0
        if type(raw) is _Packed:
            self.task = self.conn.server.loop.create_task(self._inflate_then_begin(raw, may_refuse))
            return
        self._begin(raw, may_refuse)

    def _begin(self, raw: bytes, may_refuse: bool) -> None:
        """A unary call's request message, whole and inflated: refused early, or to its handler."""
        refuse = self.conn.server.refusers.get(self.method) if may_refuse else None
        if refuse is not None:
            refused = refuse(raw, self.conn.peer)
            if refused is not None:
                self._refuse(*refused)
                return
        try:
            request = self.deserialize(raw)
        except _Abort:
            return
        self._start(request)

    async def inflate(self, packed: bytes) -> bytes:
        """A large compressed message inflated on a thread: up to ``max_receive_bytes`` from a
        few KB would hold the loop, and every other call with it, for tens of milliseconds
        (zlib lets go of the GIL while it works). A failure fails the call, as ``deserialize``."""
        try:
            return await asyncio.to_thread(
                grpc_wire.decompress, packed, self.encoding or b"", self.conn.server.max_receive_bytes
            )
        except WireError as e:
            self.wire_error = _Abort()
            self.fail(_STATUS_OF[e.code], e.message)
            raise self.wire_error from None

    async def _inflate_then_begin(self, packed: bytes, may_refuse: bool) -> None:
        """A unary call's task while its one message is inflated (``_begin`` starts the handler's
        own task): a failure or a cancel here ends the call, as ``_run``'s would."""
        try:
            raw = await self.inflate(packed)
        except _Abort:
            raw = None
        except asyncio.CancelledError:
            if not self.done:
                self._end(grpc.StatusCode.CANCELLED, "Cancelled")
            raise
        finally:
            self.task = None
            if self.done:
                self._finish()
        if raw is not None:
            self._begin(raw, may_refuse)

    def _finish(self) -> None:
        """The call is over: the connection lets it go, and so does its deadline's timer (which
        held it, its buffers and metadata, until the deadline; minutes for some clients)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.conn.finished(self)
        requests = self.requests
        if requests is not None:  # (it holds the call, the call it: a cycle per streaming call otherwise)
            requests.wake()
            requests.call = None

    def _refuse(self, code: grpc.StatusCode, message: str, trailing: tuple) -> None:
        """Answer with an error before any handler runs (see ``H2GrpcServer.refusers``)."""
        self._trailing = trailing
        self._end(code, message)
        self._finish()

    def deserialize(self, raw: bytes):
        d = self.handler.request_deserializer
        if d is None:
            return raw
        try:
            return d(raw)
        except Exception:
            # Bad input, answered as such (grpcio says INTERNAL "Exception deserializing request!")
            self.wire_error = _Abort()
            kind = getattr(getattr(getattr(d, "__self__", None), "DESCRIPTOR", None), "full_name", "request message")
            self.fail(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {kind} (protobuf)")
            raise self.wire_error from None

    # ------------------------------------------------------------------ running the handler
    def _start(self, request) -> None:
        if self.done:
            return
        h = self.handler
        if h.request_streaming:
            impl = h.stream_stream if h.response_streaming else h.stream_unary
        else:
            impl = h.unary_stream if h.response_streaming else h.unary_unary
        run = self._run(impl, request)
        if self.method not in self.conn.server.eager:
            self.task = self.conn.server.loop.create_task(run)
            return
        self.task = start_eagerly(self.conn.server.loop, run)

    async def _run(self, impl, request) -> None:
        try:
            result = impl(request, self)
            if inspect.isasyncgen(result):
                async for item in result:
                    await self.write(item)
                if not self.done:
                    self._end(self._code or grpc.StatusCode.OK, self._details)
                return
            result = await result
            if self.done:
                return
            if self._code is not None and self._code != grpc.StatusCode.OK:
                self._end(self._code, self._details)  # set_code without abort: the status, no message
            elif self.handler.response_streaming:  # its answers were sent with write()
                self._end(grpc.StatusCode.OK, self._details)
            elif result is None:
                self._end(grpc.StatusCode.INTERNAL, "the method returned no response message")
            else:
                self._answer(self._serialize(result))
        except _Abort:
            if not self.done:
                self._end(self._code or grpc.StatusCode.UNKNOWN, self._details)
        except asyncio.CancelledError:
            if not self.done:
                self._end(grpc.StatusCode.CANCELLED, "Cancelled")
            raise
        except Exception as e:
            if not self.done:
                log.exception("gRPC method %s failed", self.method[:128])
                self._end(grpc.StatusCode.UNKNOWN, f"Unexpected {type(e).__name__}: {e}")
        finally:
            self.done = True
            self.ran = True
            # (a cancelled task keeps its CancelledError, whose traceback holds this frame, which
            # holds the call: without this, a cycle kept the call's request, and any
            # shared-memory region it named, until a full collection)
            self.task = None
            # (else ``pump`` finishes the call once it is sent: the deadline still bounds that wait)
            if self.end_after_out is None or self.gone:
                self._finish()

    def _serialize(self, message) -> bytes:
        s = self.handler.response_serializer
        return s(message) if s is not None else message

    def _answer(self, payload: bytes) -> None:
        """One message and the OK status, in one go when the client's windows allow."""
        if self.gone:
            return
        conn = self.conn
        h = conn.h2
        body = grpc_wire.frame(payload)
        trailers = [_OK_TRAILER] + grpc_wire.encode_metadata(self._trailing)
        h.send_headers(self.sid, OK_HEADERS)
        self.headers_sent = True
        if len(body) <= min(h.local_flow_control_window(self.sid), h.max_outbound_frame_size):
            h.send_data(self.sid, body)
            h.send_headers(self.sid, trailers, end_stream=True)
            conn.stop_reading(self.sid)
        else:
            self.out += body
            conn.out_bytes += len(body)
            self.end_after_out = trailers
            self.pump()
            if self.out:  # (counted in max_unsent_answer_bytes while it waits)
                conn.unsent_changed()
        self.done = True
        conn.flush_soon()

    async def write(self, message) -> None:
        """Send one answer of a streaming call (grpc.aio's ``context.write``); returns once it
        is within the client's window and the transport takes writes."""
        if self.done:
            raise asyncio.CancelledError
        if not self.headers_sent:
            self.conn.h2.send_headers(self.sid, OK_HEADERS)
            self.headers_sent = True
        framed = grpc_wire.frame(self._serialize(message))
        self.out += framed
        self.conn.out_bytes += len(framed)
        self.pump()
        if self.out:
            self.conn.unsent_changed()
        self.conn.flush_soon()
        while self.out and not self.done:
            self.out_waiter = asyncio.get_running_loop().create_future()
            await self.out_waiter
        wait = self.conn.writable()
        if wait is not None:
            await wait
        if self.gone:
            raise asyncio.CancelledError

    def pump(self) -> None:
        """Send what the windows allow of the waiting answer bytes (then the trailers)."""
        if self.gone:
            return
        h = self.conn.h2
        out = self.out
        while out:
            n = min(len(out), h.local_flow_control_window(self.sid), h.max_outbound_frame_size)
            if n <= 0:  # waits for the client's window: since when the answer has waited
                if self.out_since is None:
                    self.out_since = _monotonic()
                    self.out_taken = 0
                if h.connection_window() <= 0:  # (the connection's: woken by its WINDOW_UPDATE)
                    self.conn.starved.add(self)
                self.conn.unsent_changed(grew=False)
                return
            h.send_data(self.sid, bytes(out[:n]))
            del out[:n]
            self.conn.out_bytes -= n
            self.out_taken += n
        self.out_since = None
        self.conn.unsent_changed(grew=False)
        if self.end_after_out is not None:
            h.send_headers(self.sid, self.end_after_out, end_stream=True)
            self.end_after_out = None
            self.conn.stop_reading(self.sid)
            self.conn.flush_soon()
            if self.ran:
                self._finish()
        w = self.out_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _end(self, code: grpc.StatusCode, message: str) -> None:
        """Close the call with ``code`` (trailers-only when nothing was sent yet)."""
        self.done = True
        if self.gone:
            return
        conn = self.conn
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            conn.overload_refusal()
        if not self.headers_sent:
            conn.trailers_only(self.sid, code, message, self._trailing)
        else:
            fields = grpc_wire.status_fields(code.value[0], message) + grpc_wire.encode_metadata(self._trailing)
            if self.out:
                self.end_after_out = fields
                self.pump()
            else:
                conn.h2.send_headers(self.sid, fields, end_stream=True)
                conn.stop_reading(self.sid)
        conn.flush_soon()

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """End the call now with an error found by the engine (framing, size, deadline)."""
        if self.done:
            return
        self._end(code, message)
        self.credit()  # (what it read and will never take is the connection's again)
        self.conn.release(self)
        self.buf.clear()
        self.inbox.clear()
        self.inbox_bytes = 0
        if self.task is not None:
            self.task.cancel()
        else:
            self._finish()
        if self.requests is not None:
            self.requests.wake()

    def _expired(self) -> None:
        self.timer = None
        if self.out or self.end_after_out is not None:  # an answer the client did not take in time
            self.drop_answer()
            return
        self.fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def drop_answer(self) -> None:
        """The client does not take the answer (its window stays shut): reset the stream."""
        self.conn.out_bytes -= len(self.out)
        self.out.clear()
        self.out_since = None
        self.end_after_out = None
        self.conn.unsent_changed(grew=False)
        self.conn.stop_reading(self.sid, http2.CANCEL)
        self.conn.flush_soon()
        if self.ran:
            self._finish()
        else:  # a streaming handler waiting to write: stopped; its task's end finishes the call
            self.abandon()

    def abandon(self) -> None:
        """The client is gone (reset stream, closed connection): stop the handler."""
        self.gone = True
        self.done = True
        self.credit()
        self.conn.release(self)
        if self.method in self.conn.server.streaming:
            self.conn.server.streaming[self.method].discard(self)
        self.partial_since = self.out_since = None
        self.buf.clear()  # (the handler's task may hold the call a while yet: not its bytes)
        self.inbox.clear()
        self.inbox_bytes = 0
        self.conn.out_bytes -= len(self.out)
        self.out.clear()
        self.conn.unsent_changed(grew=False)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.requests is not None:
            self.requests.wake()
        w = self.out_waiter
        if w is not None and not w.done():
            w.set_result(None)


class _Packed(bytes):
    """A request message still compressed, larger than ``INFLATE_ON_LOOP_MAX_BYTES``: held as
    sent and inflated on a thread when the handler takes it (``_Call.inflate``)."""

    __slots__ = ()
