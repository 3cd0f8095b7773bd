"""The client side of batchgate's HTTP/2 (``http2.py``), for the remote models' gRPC client
(``backends/h2_client.py``): the same framing, windows and checks, with streams we open."""

from __future__ import annotations

from typing import Protocol

from .http2 import (
    _SETTING,
    _U32,
    CANCEL,
    DEFAULT_WINDOW,
    ENABLE_PUSH,
    INITIAL_WINDOW_SIZE,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_STREAM_ID,
    NO_ERROR,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    SETTINGS,
    WINDOW_UPDATE,
    Http2,
    _Stream,
    frame,
)


class ClientHandler(Protocol):
    """What a client connection is told (see :class:`Http2Client`)."""

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None: ...
    def on_data(self, sid: int, data: bytes, flow: int, end_stream: bool) -> None: ...
    def on_reset(self, sid: int, code: int) -> None: ...
    def on_window(self, sid: int) -> None: ...
    def on_goaway(self, last_stream_id: int) -> None: ...
    def on_ping_ack(self, payload: bytes) -> None: ...
    def on_oversized(self, sid: int) -> None: ...  # its answer's header list is over max_header_bytes


class Http2Client(Http2):
    """The client side, for unary gRPC calls to an upstream (``backends/h2_client.py``): the same
    framing, windows and checks, with streams we open (:meth:`open_stream`) and a GOAWAY that
    lets the calls at or below its last stream id finish."""

    def __init__(self, handler: ClientHandler, *, stream_window: int, connection_window: int, max_frame: int):
        super().__init__(
            handler,  # type: ignore[arg-type]
            max_concurrent_streams=0,  # the server opens none
            max_header_bytes=64 << 10,
            stream_window=stream_window,
            connection_window=connection_window,
            max_frame=max_frame,
        )
        self.client_handler = handler
        self._preface = True  # (a server sends none: its SETTINGS come first)
        settings = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (ENABLE_PUSH, 0),
                (INITIAL_WINDOW_SIZE, stream_window),
                (MAX_FRAME_SIZE, max_frame),
                (MAX_HEADER_LIST_SIZE, self.max_header_bytes),  # a larger header list fails its call
            )
        )
        self._out = bytearray(PREFACE + frame(SETTINGS, 0, 0, settings))
        if connection_window > DEFAULT_WINDOW:
            self._out += frame(WINDOW_UPDATE, 0, 0, _U32.pack(connection_window - DEFAULT_WINDOW))

    def open_stream(self, fields, end_stream: bool = False) -> int:
        """Start a call: its HEADERS on a new stream; the stream's id. A connection has 2^30
        of them (see :attr:`exhausted`)."""
        sid = self.highest_inbound_stream_id + 2 if self.highest_inbound_stream_id else 1
        if sid > MAX_STREAM_ID:
            raise ValueError("this connection has used every stream id")
        self.highest_inbound_stream_id = sid  # (here: the highest stream id in use)
        self._empty = 0  # (frames that carry nothing are counted between two calls, as on a server)
        self.streams[sid] = _Stream(self._peer_window, self.stream_window, True)
        self.send_headers(sid, fields, end_stream)
        return sid

    def _block_done(self, sid: int, end_stream: bool, block: bytes) -> None:
        headers = self._decode(block)
        stream = self.streams.get(sid)
        if stream is None or not stream.remote_open:
            if sid > self.highest_inbound_stream_id:
                self._fail(PROTOCOL_ERROR, "HEADERS on a stream never opened")
            return  # a call we gave up on: ignored
        if headers is None:
            # Decoded (the HPACK table is in step) but over max_header_bytes: that call is given
            # up, as gRPC core gives up a call whose metadata is over its limit; the connection
            # and its other calls go on. (A block past twice the limit fails the connection.)
            if end_stream:
                self._remote_end(sid, stream)
            else:
                self.reset_stream(sid, CANCEL)
            self.client_handler.on_oversized(sid)
            return
        if end_stream:
            self._remote_end(sid, stream)
        self.client_handler.on_headers(sid, headers, end_stream)

    def _data(self, sid: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(sid)
        super()._data(sid, flags, payload)
        if stream is not None and not stream.remote_open:
            self._remote_end(sid, stream)

    @property
    def exhausted(self) -> bool:
        """No stream id is left for another call: the connection must be replaced."""
        return self.highest_inbound_stream_id + 2 > MAX_STREAM_ID

    def send_ping(self, payload: bytes) -> None:
        self._out += frame(PING, 0, 0, payload)

    def _ping_acked(self, payload: bytes) -> None:
        self.client_handler.on_ping_ack(payload)

    def _remote_end(self, sid: int, stream: _Stream) -> None:
        stream.remote_open = False
        if stream.local_open:  # answered before our request was all sent: we stop (RFC 9113 8.1)
            self.reset_stream(sid, NO_ERROR)
        else:
            self.streams.pop(sid, None)

    def _reset_by_peer(self, sid: int, known: bool, code: int) -> None:
        if known:  # (a call given up on already needs no word)
            self.client_handler.on_reset(sid, code)

    def _goaway_frame(self, payload: bytes) -> None:
        """The server's GOAWAY: calls above its last stream id never started there; the rest
        still get their answers, so reading goes on."""
        last = _U32.unpack(payload[:4])[0] & 0x7FFFFFFF
        self.client_handler.on_goaway(last)
