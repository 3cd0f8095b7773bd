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
import time
import urllib.parse

import grpc
from grpc.aio import Metadata

from ..transport import grpc_wire, http2

WINDOW = 16 << 20
MAX_FRAME = 1 << 20
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class H2RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, Metadata(), Metadata(), details)


class _Call:
    __slots__ = ("future", "headers", "data", "out", "end_out")

    def __init__(self, future: asyncio.Future):
        self.future = future
        self.headers: list[tuple[bytes, bytes]] = []
        self.data = bytearray()
        self.out = b""  # request bytes waiting for the server's window
        self.end_out = False


class _Protocol(asyncio.Protocol):
    def __init__(self, channel: H2Channel):
        self.channel = channel
        self.h2 = http2.Http2Client(self, stream_window=WINDOW, connection_window=WINDOW, max_frame=MAX_FRAME)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.going_away = False  # the server said GOAWAY: no new calls here
        self.lost = False
        self._flush = False
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.h2.data_to_send())

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._fail_all(
            lambda sid: H2RpcError(grpc.StatusCode.UNAVAILABLE, f"connection to {self.channel.address} lost")
        )

    def _fail_all(self, error) -> None:
        calls, self.calls = self.calls, {}
        for sid, call in calls.items():
            if not call.future.done():
                call.future.set_exception(error(sid))

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
    def start(self, path: bytes, authority: bytes, body: bytes, timeout: float, md) -> tuple[int, asyncio.Future]:
        h = self.h2
        if len(h.streams) >= h.peer_max_streams:
            raise H2RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the upstream's limit on concurrent calls is reached")
        fields = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", b"%dm" % max(1, int(timeout * 1000))),
        ]
        if md:
            fields += grpc_wire.encode_metadata(md)
        sid = h.open_stream(fields)
        call = _Call(self._loop.create_future())
        self.calls[sid] = call
        call.out = grpc_wire.frame(body)
        call.end_out = True
        self._pump(sid, call)
        self.flush_soon()
        return sid, call.future

    def cancel(self, sid: int) -> None:
        if self.calls.pop(sid, None) is not None:
            self.h2.reset_stream(sid, http2.CANCEL)
            self.flush_soon()

    def _pump(self, sid: int, call: _Call) -> None:
        h = self.h2
        while call.out:
            n = min(len(call.out), h.local_flow_control_window(sid), h.max_outbound_frame_size)
            if n <= 0:
                return
            chunk, call.out = call.out[:n], call.out[n:]
            h.send_data(sid, chunk, end_stream=call.end_out and not call.out)
        if call.end_out and not call.out:
            call.end_out = False

    def data_received(self, data: bytes) -> None:
        try:
            self.h2.receive(data)
        except http2.Http2Error as e:
            why = f"HTTP/2 error from upstream: {e}"
            self._fail_all(lambda sid: H2RpcError(grpc.StatusCode.UNAVAILABLE, why))
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        self.flush()
        if self.going_away and not self.calls and self.transport is not None:
            self.transport.close()

    # what the HTTP/2 layer reads (http2.ClientHandler)
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
        if len(call.data) > self.channel.max_message_bytes + 5:
            self.cancel(sid)
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
            refused = code == http2.REFUSED_STREAM
            call.future.set_exception(
                H2RpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    ("failed to connect to all addresses; " if refused else "")
                    + f"the upstream reset the call (error code {code})",
                )
            )

    def on_window(self, sid: int) -> None:
        for s, call in list(self.calls.items()):
            if call.out and (not sid or s == sid):
                self._pump(s, call)

    def on_goaway(self, last_stream_id: int) -> None:
        self.going_away = True
        for sid in [s for s in self.calls if s > last_stream_id]:  # never started there: safe to send again
            call = self.calls.pop(sid)
            call.future.set_exception(
                H2RpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; upstream going away")
            )

    def _finish(self, call: _Call) -> None:
        fields = dict(call.headers)
        status = fields.get(b":status")
        code_text = fields.get(b"grpc-status")
        if status != b"200" or code_text is None:
            call.future.set_exception(
                H2RpcError(grpc.StatusCode.UNKNOWN, f"the upstream answered HTTP {status!r} without a gRPC status")
            )
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


def _expire(p: _Protocol, sid: int, future: asyncio.Future) -> None:
    if not future.done():
        p.cancel(sid)
        future.set_exception(H2RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


class H2Channel:
    """Unary gRPC calls to one upstream over one HTTP/2 connection."""

    def __init__(self, address: str, max_message_bytes: int):
        """``address``: ``host:port``, ``[v6]:port``, or gRPC's ``unix:path`` / ``unix:///path``
        (a Unix socket: how front workers reach the process that owns the models)."""
        self.address = address
        self._unix: str | None = None
        if address.startswith("unix:"):
            self._unix = address[len("unix://") :] if address.startswith("unix://") else address[len("unix:") :]
            self._host, self._port = "", 0
            self._authority = b"localhost"
        else:
            host, _, port = address.rpartition(":")
            self._host, self._port = host.strip("[]"), int(port)
            self._authority = address.encode("ascii")
        self.max_message_bytes = max_message_bytes
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self._closed = False

    async def _connection(self) -> _Protocol:
        p = self._protocol
        if p is not None and not p.lost and not p.going_away:
            return p
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            opening = (
                loop.create_unix_connection(lambda: _Protocol(self), self._unix)
                if self._unix is not None
                else loop.create_connection(lambda: _Protocol(self), self._host, self._port)
            )
            _, protocol = await asyncio.wait_for(opening, 5.0)
        except (OSError, TimeoutError) as e:
            raise H2RpcError(
                grpc.StatusCode.UNAVAILABLE, f"failed to connect to all addresses; {self.address}: {e}"
            ) from None
        self._protocol = protocol
        return protocol

    def unary(self, path: str):
        """A callable like grpc.aio's ``channel.unary_unary(path)`` for bytes in and out:
        ``await call(request, timeout=..., metadata=...)``."""
        raw_path = path.encode("ascii")

        async def call(request: bytes, timeout: float | None = None, metadata=None) -> bytes:
            if self._closed:
                raise H2RpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; channel closed")
            end = time.monotonic() + (timeout if timeout is not None else 3600.0)
            p = await self._connection()
            left = end - time.monotonic()
            if left <= 0:
                raise H2RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            sid, future = p.start(raw_path, self._authority, request, left, metadata)
            timer = asyncio.get_running_loop().call_later(left, _expire, p, sid, future)
            try:
                return await future
            except asyncio.CancelledError:  # the caller went away: so does the call upstream
                p.cancel(sid)
                raise
            finally:
                timer.cancel()

        return call

    async def close(self) -> None:
        self._closed = True
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
