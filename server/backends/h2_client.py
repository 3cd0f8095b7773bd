"""gRPC unary calls to an upstream over one HTTP/2 connection on the event loop (the h2 library,
client side): what a remote model with ``client=h2`` forwards with, instead of grpc.aio's
channel, whose Python layer and hand-overs to gRPC core's threads cost most of the gateway's CPU
for a forwarded request.

One connection per upstream, made on first use and again after it is lost (a call made while
no connection can be had fails UNAVAILABLE with gRPC's own "failed to connect to all addresses"
wording, so the backend retries it elsewhere, as a call never delivered). A call's errors are
``grpc.aio.AioRpcError``s, so the backend counts, ejects and translates them as it does
grpc.aio's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from typing import Any

import grpc
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from grpc.aio import Metadata

from ..transport import grpc_wire
from ..transport.hpack_cache import CachingDecoder, CachingEncoder, fast_config

_CONFIG = fast_config(client_side=True)
WINDOW = 16 << 20
_CODES = {c.value[0]: c for c in grpc.StatusCode}

# h2 formats every frame it receives for a trace log line (``repr(frame)``) before asking whether
# anyone logs at that level: a tenth of its receiving time. Its module is given a repr that does
# nothing; h2.connection uses repr for nothing else (h2 is pinned below 5).
h2.connection.repr = lambda obj: ""  # type: ignore[attr-defined]


class H2RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, Metadata(), Metadata(), details)


class _Connection(h2.connection.H2Connection):
    """h2's client connection, but one that a GOAWAY does not end at once: h2 would refuse to
    read the answers of calls the server still finishes (those at or below its last stream id)."""

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


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
        self.h2 = _Connection(_CONFIG)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.going_away = False  # the server said GOAWAY: no new calls here
        self.lost = False
        self._flush = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        h = self.h2
        h.encoder, h.decoder = CachingEncoder(), CachingDecoder(64 << 10)
        h.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20,
            },
        )
        h.initiate_connection()
        h.local_settings.acknowledge()  # (as the server engine does: in force at once)
        h.max_inbound_frame_size = 1 << 20
        h.increment_flow_control_window(WINDOW)
        transport.write(h.data_to_send())

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
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush = False
        self.flush()

    # ------------------------------------------------------------------ calls
    def start(self, path: bytes, authority: bytes, body: bytes, timeout: float, md) -> tuple[int, asyncio.Future]:
        h = self.h2
        sid = h.get_next_available_stream_id()
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
        h.send_headers(sid, fields)
        call = _Call(asyncio.get_running_loop().create_future())
        self.calls[sid] = call
        call.out = grpc_wire.frame(body)
        call.end_out = True
        self._pump(sid, call)
        self.flush_soon()
        return sid, call.future

    def cancel(self, sid: int) -> None:
        if self.calls.pop(sid, None) is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
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
            events: list[Any] = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            why = f"HTTP/2 error from upstream: {e}"
            self._fail_all(lambda sid: H2RpcError(grpc.StatusCode.UNAVAILABLE, why))
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            kind = type(ev)
            if kind is h2.events.DataReceived:
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    call.data += ev.data
                with contextlib.suppress(h2.exceptions.StreamClosedError, KeyError):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if call is not None and len(call.data) > self.channel.max_message_bytes + 5:
                    self.cancel(ev.stream_id)
                    call.future.set_exception(
                        H2RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the upstream's answer is larger than allowed")
                    )
            elif kind is h2.events.ResponseReceived or kind is h2.events.TrailersReceived:
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    call.headers += ev.headers
            elif kind is h2.events.StreamEnded:
                call = self.calls.pop(ev.stream_id, None)
                if call is not None and not call.future.done():
                    self._finish(call)
            elif kind is h2.events.StreamReset:
                call = self.calls.pop(ev.stream_id, None)
                if call is not None and not call.future.done():
                    refused = ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    call.future.set_exception(
                        H2RpcError(
                            grpc.StatusCode.UNAVAILABLE,
                            ("failed to connect to all addresses; " if refused else "")
                            + f"the upstream reset the call ({ev.error_code!s})",
                        )
                    )
            elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
                for sid, call in list(self.calls.items()):
                    if call.out:
                        self._pump(sid, call)
            elif kind is h2.events.ConnectionTerminated:
                self.going_away = True
                last = ev.last_stream_id or 0
                for sid in [s for s in self.calls if s > last]:  # never started there: safe to send again
                    call = self.calls.pop(sid)
                    call.future.set_exception(
                        H2RpcError(
                            grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; upstream going away"
                        )
                    )
                if not self.calls and self.transport is not None:
                    self.transport.close()
        self.flush()
        if self.going_away and not self.calls and self.transport is not None:
            self.transport.close()

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
        self.address = address
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
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self._host, self._port), 5.0
            )
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
            try:
                sid, future = p.start(raw_path, self._authority, request, left, metadata)
            except h2.exceptions.TooManyStreamsError:
                raise H2RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "the upstream's limit on concurrent calls is reached"
                ) from None
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
