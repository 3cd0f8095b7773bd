"""The server side of HTTP/2 as gRPC uses it, for batchgate's own gRPC engine (``grpc_h2.py``).

A general HTTP/2 library (h2) turns every frame into event objects and runs each stream through a
state machine; in Python that was most of what a call cost the engine (about 45 of the 60 µs of a
ModelReady call). This module does only what a gRPC server needs, straight from the bytes: frames
are cut with one ``struct`` call, handed to the connection as method calls, and answers are framed
into one buffer written once a loop turn. HPACK stays with ``hpack`` (``hpack_cache``'s coders).

It enforces RFC 9113 for a server: the preface, odd and growing stream ids, CONTINUATION right
after its HEADERS, frame and header-block sizes, flow control both ways, SETTINGS, PING,
WINDOW_UPDATE, RST_STREAM and GOAWAY. A stream past ``max_concurrent_streams`` is refused
(REFUSED_STREAM). A connection error writes a GOAWAY and raises :class:`Http2Error`; the caller
closes the connection. Priorities are read and ignored; a server never pushes.
"""

from __future__ import annotations

import struct
from typing import NoReturn

import hpack.exceptions

from .hpack_cache import MAX_FIELDS, CachingDecoder, CachingEncoder, OversizedList, TooManyFields
from .http2_handler import Handler

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# error codes (RFC 9113 section 7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB

# Frames that cost us a parse and move nothing on (empty DATA without END_STREAM, empty
# CONTINUATION, PRIORITY, unknown types, SETTINGS and their ACKs, PING ACKs, and PINGs while no
# DATA moved since the last one) are allowed this many between two requests; a header
# block may come in at most this many CONTINUATION frames. Past either the connection is closed
# (reason ``flood``): a client could otherwise keep the loop busy for free.
MAX_EMPTY_FRAMES = 1000
MAX_CONTINUATIONS = 32
# Entries in one SETTINGS frame (a client sends a handful; nghttp2 allows 32): each is a step in
# Python, and a 1 MiB frame of them held the loop ~50 ms. More close the connection (``flood``).
MAX_SETTINGS = 32

# settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 0x1, 0x2, 0x3, 0x4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x5, 0x6

MAX_WINDOW = (1 << 31) - 1
ENCODER_TABLE_MAX = 4096  # bytes of our HPACK encoder's dynamic table, whatever the peer allows
MAX_STREAM_ID = (1 << 31) - 1
DEFAULT_WINDOW = 65535
_HEADER = struct.Struct(">BHBBL")  # length (24 bits, as 8 + 16), type, flags, stream id
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")


class Http2Error(Exception):
    """The connection broke the protocol; a GOAWAY is already queued. ``reason``: ``protocol``,
    ``header_bytes`` (a header block past the size limit) or ``flood`` (see ``MAX_EMPTY_FRAMES``)."""

    def __init__(self, message: str, reason: str = "protocol"):
        super().__init__(message)
        self.reason = reason


class _Stream:
    __slots__ = ("send_window", "recv_window", "remote_open", "local_open")

    def __init__(self, send_window: int, recv_window: int, remote_open: bool):
        self.send_window = send_window
        self.recv_window = recv_window
        self.remote_open = remote_open  # the peer may still send on it
        self.local_open = True  # we may still send on it


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, sid) + payload


class Http2:
    """One server connection's HTTP/2 state: read with :meth:`receive`, answer with the
    ``send_*`` methods, and write :meth:`data_to_send` to the socket."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_concurrent_streams: int,
        max_header_bytes: int,
        stream_window: int,
        connection_window: int,
        max_frame: int,
        max_header_fields: int = MAX_FIELDS,
    ):
        self.handler: Handler = handler  # (the connection, which holds this; GONE once it is lost)
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_bytes = max_header_bytes
        # A header block up to twice that is decoded whole and only its stream refused (HPACK's
        # table must follow every block); past it the connection is closed.
        self.hard_header_bytes = 2 * max_header_bytes
        self.max_frame = max_frame  # the largest frame we take (announced in our SETTINGS)
        self.stream_window = stream_window
        self.decoder = CachingDecoder(self.hard_header_bytes, max_header_bytes, max_header_fields)
        self.encoder = CachingEncoder()
        self.streams: dict[int, _Stream] = {}
        self.highest_inbound_stream_id = 0
        self.max_outbound_frame_size = 16384  # the peer's MAX_FRAME_SIZE
        self.peer_max_streams = 1 << 31  # the peer's MAX_CONCURRENT_STREAMS (a client must keep within it)
        self._peer_window = DEFAULT_WINDOW  # the client's INITIAL_WINDOW_SIZE: new streams' send window
        self._send_window = DEFAULT_WINDOW  # what the connection may still send
        self._recv_window = connection_window  # what the client may still send on the connection
        self._unacked = 0  # bytes taken and not yet credited to the connection's window
        self._credit_at = max(1, connection_window // 4)
        self._buf = bytearray()
        self._preface = False
        self.started = False  # the preface and the first SETTINGS are read
        self._block: tuple[int, bool, bytearray] | None = None  # a header block waiting for CONTINUATION
        self._continuations = 0  # CONTINUATION frames of that block so far
        self._empty = 0  # frames that carried nothing since the last request (see MAX_EMPTY_FRAMES)
        self._moved = False  # DATA went either way since the last PING (which is then free)
        # WINDOW_UPDATEs that may still come free: two for each DATA frame we sent (its stream's
        # credit and the connection's), at most MAX_EMPTY_FRAMES banked; others carry nothing
        self._credits = 0
        self._goaway_seen = False  # the peer sent a GOAWAY
        self._closed = False
        settings = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (MAX_CONCURRENT_STREAMS, max_concurrent_streams),
                (INITIAL_WINDOW_SIZE, stream_window),
                (MAX_FRAME_SIZE, max_frame),
                (MAX_HEADER_LIST_SIZE, max_header_bytes),
                (ENABLE_PUSH, 0),
            )
        )
        self._out = bytearray(frame(SETTINGS, 0, 0, settings))
        if connection_window > DEFAULT_WINDOW:
            self._out += frame(WINDOW_UPDATE, 0, 0, _U32.pack(connection_window - DEFAULT_WINDOW))

    # ------------------------------------------------------------------ writing
    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    def connection_window(self) -> int:
        """How many bytes of DATA the connection may send now, all streams together."""
        return self._send_window

    def local_flow_control_window(self, sid: int) -> int:
        """How many bytes of DATA ``sid`` may send now."""
        stream = self.streams.get(sid)
        return 0 if stream is None else min(stream.send_window, self._send_window)

    def send_headers(self, sid: int, fields, end_stream: bool = False, huffman: bool = True) -> None:
        block = self.encoder.encode(fields, huffman)
        flags = END_STREAM if end_stream else 0
        limit = self.max_outbound_frame_size
        out = self._out
        if len(block) <= limit:
            n = len(block)
            out += _HEADER.pack(n >> 16, n & 0xFFFF, HEADERS, flags | END_HEADERS, sid)
            out += block
        else:  # (only a very large status message or metadata)
            out += frame(HEADERS, flags, sid, block[:limit])
            rest = block[limit:]
            while rest:
                part, rest = rest[:limit], rest[limit:]
                out += frame(CONTINUATION, 0 if rest else END_HEADERS, sid, part)
        if end_stream:
            self._local_end(sid)

    def send_data(self, sid: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """``data`` must fit the window and the client's frame size (see
        :meth:`local_flow_control_window` and ``max_outbound_frame_size``)."""
        n = len(data)
        stream = self.streams.get(sid)
        if stream is not None:
            stream.send_window -= n
        self._send_window -= n
        self._moved = True
        if self._credits < MAX_EMPTY_FRAMES:
            self._credits += 2
        out = self._out
        out += _HEADER.pack(n >> 16, n & 0xFFFF, DATA, END_STREAM if end_stream else 0, sid)
        out += data
        if end_stream:
            self._local_end(sid)

    def _local_end(self, sid: int) -> None:
        """Our side of ``sid`` is finished: the stream is gone once the peer's is too."""
        stream = self.streams.get(sid)
        if stream is not None:
            stream.local_open = False
            if not stream.remote_open:
                del self.streams[sid]

    def end_reading(self, sid: int, code: int = NO_ERROR) -> None:
        """We are done with ``sid``: a client still sending is told to stop (RST_STREAM; NO_ERROR
        once our answer is complete, as the spec allows); with another ``code`` the stream is
        reset whatever its state (an answer given up on)."""
        stream = self.streams.pop(sid, None)
        if stream is not None and (stream.remote_open or code != NO_ERROR):
            self._out += frame(RST_STREAM, 0, sid, _U32.pack(code))

    def reset_stream(self, sid: int, code: int) -> None:
        self.streams.pop(sid, None)
        self._out += frame(RST_STREAM, 0, sid, _U32.pack(code))

    def acknowledge_received_data(self, n: int, sid: int) -> None:
        """``n`` bytes of ``sid``'s DATA are taken: the client may send that many more."""
        if n <= 0:
            return
        out = self._out
        stream = self.streams.get(sid)
        if stream is not None and stream.remote_open:  # (a stream the client has ended needs none)
            stream.recv_window += n
            out += _HEADER.pack(0, 4, WINDOW_UPDATE, 0, sid)
            out += _U32.pack(n)
        # the connection's window is credited a quarter of it at a time, not per message
        self._unacked += n
        if self._unacked >= self._credit_at:
            self._recv_window += self._unacked
            out += _HEADER.pack(0, 4, WINDOW_UPDATE, 0, 0)
            out += _U32.pack(self._unacked)
            self._unacked = 0

    def stop(self) -> None:
        """Read nothing more (the connection is closing), not even the rest of this read."""
        self._closed = True

    def goaway(self, last_stream_id: int, code: int = NO_ERROR) -> None:
        self._out += frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code))

    # ------------------------------------------------------------------ reading
    def receive(self, data: bytes) -> None:
        """Read ``data``; the handler hears of each request, message, reset and window as its
        frame is read. Raises :class:`Http2Error` (a GOAWAY queued) on a connection error."""
        if self._closed:
            return
        buf = self._buf
        if buf:
            buf += data
            if self._preface and len(buf) >= 9:  # a large frame comes in many reads: wait for all of it
                need = 9 + ((buf[0] << 16) | (buf[1] << 8) | buf[2])
                if len(buf) < need <= 9 + self.max_frame:
                    return
            data = bytes(buf)
            buf.clear()
        pos, n = 0, len(data)
        if not self._preface:
            if n < len(PREFACE):
                if not PREFACE.startswith(data):
                    self._fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._buf += data
                return
            if not data.startswith(PREFACE):
                self._fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self._preface = True
            pos = len(PREFACE)
        unpack = _HEADER.unpack_from
        while n - pos >= 9:
            hi, lo, kind, flags, sid = unpack(data, pos)
            length = (hi << 16) | lo
            if length > self.max_frame:
                self._fail(FRAME_SIZE_ERROR, f"a frame of {length} bytes is over the {self.max_frame} announced")
            end = pos + 9 + length
            if end > n:
                break
            payload = data[pos + 9 : end]
            pos = end
            sid &= 0x7FFFFFFF
            if not self.started:
                if kind != SETTINGS or flags & ACK:
                    self._fail(PROTOCOL_ERROR, "the first frame must be SETTINGS")
                self.started = True
            if self._block is not None and kind != CONTINUATION:
                self._fail(PROTOCOL_ERROR, "a header block was interrupted before END_HEADERS")
            if kind == DATA:
                self._data(sid, flags, payload)
            elif kind == HEADERS:
                self._headers(sid, flags, payload)
            elif kind == WINDOW_UPDATE:
                self._window_update(sid, payload)
            elif kind == RST_STREAM:
                self._rst(sid, payload)
            elif kind == SETTINGS:
                self._settings(sid, flags, payload)
            elif kind == PING:
                if sid or length != 8:
                    self._fail(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "a malformed PING")
                # (a client may ping as answers stream in: grpc-go measures bandwidth so; a PING
                # flood, answered as fast as it came, held every other call: gRPC core closes
                # a client pinging twice without data in five minutes)
                if self._moved:
                    self._moved = False
                else:
                    self._nothing()
                if not flags & ACK:
                    self._out += frame(PING, ACK, 0, payload)
                else:
                    self._ping_acked(payload)
            elif kind == CONTINUATION:
                self._continuation(sid, flags, payload)
            elif kind == PRIORITY:
                if not sid or length != 5:
                    self._fail(PROTOCOL_ERROR, "a malformed PRIORITY")
                self._nothing()
            elif kind == GOAWAY:
                if sid or length < 8:
                    self._fail(PROTOCOL_ERROR, "a malformed GOAWAY")
                if self._goaway_seen:  # (the first ends the peer's side; more change nothing)
                    self._nothing()
                self._goaway_seen = True
                self._goaway_frame(payload)
            elif kind == PUSH_PROMISE:
                self._fail(PROTOCOL_ERROR, "a client may not push")
            else:  # frames of unknown types are ignored, as the spec requires (and counted)
                self._nothing()
            if self._closed:
                return
        if pos < n:
            self._buf += data[pos:]

    def _ping_acked(self, payload: bytes) -> None:
        """The peer answered one of our PINGs (a server sends none)."""

    def _goaway_frame(self, payload: bytes) -> None:
        """The client's GOAWAY: it opens no more streams; those open go on (RFC 9113 6.8)."""
        self.handler.on_goaway()

    def calm(self, message: str) -> NoReturn:
        """Close the connection as a flood its handler found (counted ``flood``)."""
        self._fail(ENHANCE_YOUR_CALM, message, "flood")

    def _nothing(self) -> None:
        """One more frame that moved nothing on (see ``MAX_EMPTY_FRAMES``)."""
        self._empty += 1
        if self._empty > MAX_EMPTY_FRAMES:
            self._fail(ENHANCE_YOUR_CALM, f"more than {MAX_EMPTY_FRAMES} frames that carry nothing", "flood")

    def _fail(self, code: int, message: str, reason: str = "protocol") -> NoReturn:
        self._closed = True
        self.goaway(self.highest_inbound_stream_id, code)
        raise Http2Error(message, reason)

    def _unpad(self, flags: int, payload: bytes, what: str) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            self._fail(PROTOCOL_ERROR, f"{what}'s padding is longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _data(self, sid: int, flags: int, payload: bytes) -> None:
        flow = len(payload)
        if not sid:
            self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        self._recv_window -= flow
        if self._recv_window < 0:
            self._fail(FLOW_CONTROL_ERROR, "DATA past the connection's window")
        stream = self.streams.get(sid)
        if stream is None or not stream.remote_open:
            if sid > self.highest_inbound_stream_id:
                self._fail(PROTOCOL_ERROR, "DATA on a stream never opened")
            # a stream we are done with (answered or reset): its bytes are credited back at once
            self.acknowledge_received_data(flow, 0)
            if not self._unpad(flags, payload, "DATA"):  # (an empty one moves nothing: counted, as on an open stream)
                self._nothing()
            if stream is not None:  # half-closed by the client already: a stream error
                self.reset_stream(sid, STREAM_CLOSED)
                self.handler.on_reset(sid)  # (its call is over too)
            return
        stream.recv_window -= flow
        if stream.recv_window < 0:
            self._fail(FLOW_CONTROL_ERROR, "DATA past a stream's window")
        data = self._unpad(flags, payload, "DATA")
        end = bool(flags & END_STREAM)
        # Judged by what it carries, not by its flow: a padded DATA frame with no data (its pad
        # length byte alone) moves nothing either (until 2026-12-06 it was free, and made the
        # next PING free too: one connection sent 100,000 of them, each answered with a
        # WINDOW_UPDATE, and was never closed).
        if data:
            self._moved = True
        elif not end:
            self._nothing()
        if end:
            stream.remote_open = False
        self.handler.on_data(sid, data, flow, end)
        if end and not stream.local_open:  # both sides done: the stream is gone
            self.streams.pop(sid, None)

    def _headers(self, sid: int, flags: int, payload: bytes) -> None:
        if not sid or not sid & 1:
            self._fail(PROTOCOL_ERROR, "HEADERS on stream 0 or on a server's (even) stream id")
        payload = self._unpad(flags, payload, "HEADERS")
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                self._fail(PROTOCOL_ERROR, "a HEADERS frame too short for its priority")
            payload = payload[5:]
        if len(payload) > self.hard_header_bytes:
            self._fail(PROTOCOL_ERROR, "a header block over twice max_header_bytes", "header_bytes")
        if flags & END_HEADERS:
            self._block_done(sid, bool(flags & END_STREAM), payload)
        else:
            self._block = (sid, bool(flags & END_STREAM), bytearray(payload))
            self._continuations = 0

    def _continuation(self, sid: int, flags: int, payload: bytes) -> None:
        block = self._block
        if block is None or block[0] != sid:
            self._fail(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            return
        block[2].extend(payload)
        self._continuations += 1
        if self._continuations > MAX_CONTINUATIONS:
            self._fail(ENHANCE_YOUR_CALM, f"a header block in over {MAX_CONTINUATIONS} CONTINUATIONs", "flood")
        if not payload and not flags & END_HEADERS:
            self._nothing()
        if len(block[2]) > self.hard_header_bytes:
            self._fail(PROTOCOL_ERROR, "a header block over twice max_header_bytes", "header_bytes")
        if flags & END_HEADERS:
            self._block = None
            self._block_done(sid, block[1], bytes(block[2]))

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]] | None:
        """A header block's fields, whatever becomes of its stream: the HPACK table must stay in
        step. None: decoded, and over max_header_bytes (its stream alone is refused)."""
        try:
            return self.decoder.decode(block, raw=True)
        except OversizedList:
            return None
        except TooManyFields:
            limit = f"a header block of more than {self.decoder.max_fields} fields (max_header_fields)"
            self._fail(ENHANCE_YOUR_CALM, limit, "header_bytes")
        except hpack.exceptions.OversizedHeaderListError:
            self._fail(COMPRESSION_ERROR, "a header list over twice max_header_bytes", "header_bytes")
        except hpack.exceptions.HPACKError as e:
            self._fail(COMPRESSION_ERROR, f"a header block could not be decoded: {e}")

    def _block_done(self, sid: int, end_stream: bool, block: bytes) -> None:
        headers = self._decode(block)
        stream = self.streams.get(sid)
        if sid <= self.highest_inbound_stream_id:
            if stream is None or not stream.remote_open:
                if not end_stream:  # not trailers (they end their stream): a stream id gone backwards
                    self._fail(PROTOCOL_ERROR, f"HEADERS opening stream {sid}, below the highest opened")
                # trailers of a stream we are done with, in flight; or sent again and again: told
                # once more that it is closed, and counted among the frames that carry nothing
                self._out += frame(RST_STREAM, 0, sid, _U32.pack(STREAM_CLOSED))
                self._nothing()
                return
            if not end_stream:  # trailers must end the stream
                self._fail(PROTOCOL_ERROR, "trailers without END_STREAM")
            stream.remote_open = False
            self.handler.on_data(sid, b"", 0, True)
            if not stream.local_open:  # both sides done: the stream is gone
                self.streams.pop(sid, None)
            return
        self.highest_inbound_stream_id = sid
        if len(self.streams) >= self.max_concurrent_streams:
            # Past the limit we announced: refused, and not a request (the count of frames that
            # carry nothing goes on). The handler counts it as a stream gone at once, as a reset:
            # a client opening stream after stream past the limit is a rapid reset the server
            # does for it (until 2026-12-06, 50,000 in two seconds were refused, uncounted).
            self._out += frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM))
            self.handler.on_refused(sid)
            return
        self._empty = 0
        self.streams[sid] = _Stream(self._peer_window, self.stream_window, not end_stream)
        if headers is None:
            self.handler.on_oversized(sid)
        else:
            self.handler.on_request(sid, headers, end_stream)

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "a WINDOW_UPDATE of the wrong size")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid or sid in self.streams:
            # free while it credits DATA we sent; else a frame that carries nothing (5 million
            # WINDOW_UPDATEs of 1 went uncounted until 2026-12-06, holding other clients 38 ms)
            if self._credits:
                self._credits -= 1
            else:
                self._nothing()
        if not sid:
            if not inc:
                self._fail(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self._send_window += inc
            if self._send_window > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "the connection's window past 2^31-1")
            self.handler.on_window(0)
            return
        if sid > self.highest_inbound_stream_id:
            self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE on a stream never opened")
        stream = self.streams.get(sid)
        if stream is None:  # a stream we are done with: nothing to do, and counted so
            self._nothing()
            return
        if not inc or stream.send_window + inc > MAX_WINDOW:
            self.reset_stream(sid, PROTOCOL_ERROR if not inc else FLOW_CONTROL_ERROR)
            self.handler.on_reset(sid)
            return
        stream.send_window += inc
        self.handler.on_window(sid)

    def _rst(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "an RST_STREAM of the wrong size")
        if not sid or sid > self.highest_inbound_stream_id:
            self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0 or on one never opened")
        self._reset_by_peer(sid, self.streams.pop(sid, None) is not None, _U32.unpack(payload)[0])

    def _reset_by_peer(self, sid: int, known: bool, code: int) -> None:
        self.handler.on_reset(sid)  # (a stream already done here too: the reset-flood guard counts it)

    def _settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                self._fail(FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            self._nothing()  # (a client owes one, for our SETTINGS: more of them cost a parse each)
            return
        if len(payload) % 6:
            self._fail(FRAME_SIZE_ERROR, "a SETTINGS frame of the wrong size")
        if len(payload) > 6 * MAX_SETTINGS:
            self._fail(ENHANCE_YOUR_CALM, f"a SETTINGS frame of more than {MAX_SETTINGS} entries", "flood")
        self._nothing()  # (each costs an ACK; a client sends a few)
        window = None  # the frame's last INITIAL_WINDOW_SIZE, applied once (each pass visits every stream)
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE past 2^31-1")
                window = value
            elif key == MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    self._fail(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.max_outbound_frame_size = value
            elif key == HEADER_TABLE_SIZE:
                # The peer's decoder may hold this much; our encoder need not use it all (RFC
                # 7541 4.2): a table past the default grew with every distinct error message
                # (grpc-message echoes client input), and each lookup walks it.
                self.encoder.header_table_size = min(value, ENCODER_TABLE_MAX)
            elif key == MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif key == ENABLE_PUSH and value > 1:
                self._fail(PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
        delta = 0 if window is None else window - self._peer_window
        if delta:
            self._peer_window += delta
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "a stream's window past 2^31-1")
        self._out += frame(SETTINGS, ACK, 0)
        if delta > 0:
            self.handler.on_window(-1)  # (every stream's window grew)
