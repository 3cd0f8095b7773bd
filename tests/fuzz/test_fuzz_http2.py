"""Fuzz: the h2 gRPC engine's HTTP/2 layer (``transport/http2.py``) and the refusal's glance at
a request (``grpc_codec.peek_model_name``). Whatever bytes a client sends after a valid preface,
framed or not, cut anywhere, the layer either reads them or ends the connection with
``Http2Error`` (a GOAWAY queued); it never raises anything else, never reports a stream the
client did not open, and what it writes back stays a small multiple of what it read."""

from __future__ import annotations

import hpack
from fuzz_support import budget
from hypothesis import given
from hypothesis import strategies as st

from batchgate.transport import http2
from batchgate.transport.grpc_codec import peek_model_name
from batchgate.transport.http2 import Http2, Http2Error


class _Seen:
    def __init__(self):
        self.opened: set[int] = set()
        self.bad: list[str] = []

    def on_request(self, sid, headers, end_stream):
        if sid in self.opened or not sid % 2:
            self.bad.append(f"stream {sid} opened twice or even")
        self.opened.add(sid)

    def on_data(self, sid, data, flow, end_stream):
        if sid not in self.opened:
            self.bad.append(f"data on {sid}, never opened")
        if len(data) > flow:
            self.bad.append("more data than the frame carried")

    def on_reset(self, sid):
        pass

    def on_window(self, sid):
        pass

    def on_goaway(self):
        pass

    def on_oversized(self, sid):
        self.on_request(sid, [], False)  # (a stream opened, refused by the connection)

    def on_refused(self, sid):
        pass  # (refused here: never opened for the handler)


# frames as a client might send them: any type (known ones weighted up), flags, small stream
# ids, and payloads that are sometimes well formed for their type
_KINDS = st.one_of(st.sampled_from(range(10)), st.integers(0, 255))
_FRAMES = st.lists(
    st.tuples(_KINDS, st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]), st.binary(max_size=64)),
    max_size=12,
)


def _wire(frames) -> bytes:
    return b"".join(http2.frame(kind, flags, sid, payload) for kind, flags, sid, payload in frames)


@budget(1.0)
@given(frames=_FRAMES, cuts=st.lists(st.integers(1, 40), max_size=6), raw_tail=st.binary(max_size=32))
def test_any_frames_are_read_or_end_the_connection(frames, cuts, raw_tail):
    seen = _Seen()
    srv = Http2(
        seen, max_concurrent_streams=4, max_header_bytes=1024, stream_window=4096, connection_window=8192, max_frame=256
    )
    data = http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0) + _wire(frames) + raw_tail
    read = 0
    try:
        for n in [*cuts, len(data)]:
            chunk, data = data[:n], data[n:]
            read += len(chunk)
            srv.receive(chunk)
            if not data:
                break
    except Http2Error as e:
        assert e.reason in ("protocol", "header_bytes")
    assert not seen.bad, seen.bad
    written = len(srv.data_to_send())
    assert written <= 200 + 4 * read  # (PING echoes, RST_STREAMs and credits, never more)


@budget(0.5)
@given(raw=st.binary(max_size=300))
def test_the_glance_at_a_request_never_raises(raw):
    name = peek_model_name(raw)
    assert name is None or (len(name.encode()) < 128 and raw.startswith(b"\n"))


@budget(0.3)
@given(headers=st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=40)), max_size=8))
def test_header_blocks_the_hpack_decoder_accepts_open_streams(headers):
    seen = _Seen()
    srv = Http2(
        seen,
        max_concurrent_streams=4,
        max_header_bytes=1024,
        stream_window=4096,
        connection_window=8192,
        max_frame=4096,
    )
    block = hpack.Encoder().encode([(k.lower(), v) for k, v in headers])
    srv.receive(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))
    try:
        srv.receive(http2.frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1, block))
    except Http2Error as e:
        assert e.reason in ("protocol", "header_bytes")
        return
    assert seen.opened == {1}
