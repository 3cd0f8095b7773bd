"""The gRPC engine's HTTP/2 layer (server/transport/http2.py) against h2's client as the peer,
and against frames made by hand where a client breaks the protocol."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from batchgate.transport import hpack_cache, http2
from batchgate.transport.http2 import Http2, Http2Error
from batchgate.transport.http2_client import Http2Client

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"x"),
    (b":path", b"/svc/M"),
    (b"content-type", b"application/grpc"),
]


class Recorder:
    def __init__(self):
        self.seen: list[tuple] = []

    def on_request(self, sid, headers, end_stream):
        self.seen.append(("request", sid, dict(headers)[b":path"], end_stream))

    def on_data(self, sid, data, flow, end_stream):
        self.seen.append(("data", sid, bytes(data), flow, end_stream))

    def on_reset(self, sid):
        self.seen.append(("reset", sid))

    def on_window(self, sid):
        self.seen.append(("window", sid))

    def on_goaway(self):
        self.seen.append(("goaway",))

    def on_oversized(self, sid):
        self.seen.append(("oversized", sid))

    def on_refused(self, sid):
        self.seen.append(("refused", sid))


def server(**kw) -> tuple[Http2, Recorder]:
    rec = Recorder()
    args = dict(max_concurrent_streams=8, max_header_bytes=4096, stream_window=1 << 16, connection_window=1 << 20)
    args.update(kw)
    return Http2(rec, max_frame=1 << 16, **args), rec


def client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    return c


def exchange(srv: Http2, cli: h2.connection.H2Connection) -> list:
    """Bytes both ways until neither side has more; the client's events."""
    events = []
    for _ in range(10):
        out = cli.data_to_send()
        if out:
            srv.receive(out)
        back = srv.data_to_send()
        if back:
            events += cli.receive_data(back)
        if not out and not back:
            break
    return events


def raw(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return http2.frame(kind, flags, sid, payload)


def opened() -> tuple[Http2, Recorder]:
    """A server past the preface and the client's SETTINGS."""
    srv, rec = server()
    srv.receive(http2.PREFACE + raw(http2.SETTINGS, 0, 0))
    srv.data_to_send()
    return srv, rec


def test_a_call_round_trip_with_h2_as_the_client():
    srv, rec = server()
    cli = client()
    exchange(srv, cli)
    cli.send_headers(1, REQUEST)
    cli.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    exchange(srv, cli)
    calls = [s for s in rec.seen if s[0] != "window"]  # (h2's SETTINGS move the windows)
    assert calls == [("request", 1, b"/svc/M", False), ("data", 1, b"\x00\x00\x00\x00\x02hi", 7, True)]
    srv.acknowledge_received_data(7, 1)
    srv.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    srv.send_data(1, b"\x00\x00\x00\x00\x02ok")
    srv.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    events = exchange(srv, cli)
    kinds = [type(e) for e in events]
    assert h2.events.ResponseReceived in kinds and h2.events.TrailersReceived in kinds
    assert h2.events.StreamEnded in kinds
    data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert data == b"\x00\x00\x00\x00\x02ok"
    assert 1 not in srv.streams  # both sides done: forgotten


def test_many_requests_in_one_read_and_across_split_reads():
    srv, rec = server()
    cli = client()
    exchange(srv, cli)
    for sid in (1, 3, 5):
        cli.send_headers(sid, REQUEST, end_stream=True)
    wire = cli.data_to_send()
    for i in range(len(wire)):  # one byte at a time: frames cut anywhere
        srv.receive(wire[i : i + 1])
    assert [s[1] for s in rec.seen if s[0] == "request"] == [1, 3, 5]


def test_the_preface_and_a_first_settings_are_required():
    srv, _ = server()
    with pytest.raises(Http2Error):
        srv.receive(b"GET / HTTP/1.1\r\n\r\n")
    srv, _ = server()
    with pytest.raises(Http2Error, match="first frame"):
        srv.receive(http2.PREFACE + raw(http2.PING, 0, 0, b"12345678"))
    assert raw(http2.GOAWAY, 0, 0, struct.pack(">LL", 0, http2.PROTOCOL_ERROR)) in srv.data_to_send()


def test_stream_ids_must_be_odd_and_grow():
    srv, rec = opened()
    cli = client()
    block = cli.encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 5, block))
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 3, cli.encoder.encode(REQUEST)))
    assert [s[1] for s in rec.seen] == [5]  # an old id is a closed stream: ignored
    with pytest.raises(Http2Error, match="even"):
        srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 8, cli.encoder.encode(REQUEST)))


def test_padding_priority_and_continuation_are_read():
    srv, rec = opened()
    cli = client()
    block = cli.encoder.encode(REQUEST)
    padded = bytes([3]) + b"\x00\x00\x00\x00\x10" + block[:10] + b"\x00\x00\x00"
    srv.receive(raw(http2.HEADERS, http2.PADDED | http2.PRIORITY_FLAG, 1, padded))
    srv.receive(raw(http2.CONTINUATION, http2.END_HEADERS, 1, block[10:]))
    srv.receive(raw(http2.DATA, http2.PADDED | http2.END_STREAM, 1, bytes([2]) + b"abc" + b"\x00\x00"))
    assert rec.seen == [("request", 1, b"/svc/M", False), ("data", 1, b"abc", 6, True)]


def test_an_interrupted_header_block_and_padding_past_the_frame_are_errors():
    srv, _ = opened()
    block = client().encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, 0, 1, block[:5]))
    with pytest.raises(Http2Error, match="interrupted"):
        srv.receive(raw(http2.PING, 0, 0, b"12345678"))
    srv, _ = opened()
    with pytest.raises(Http2Error, match="padding"):
        srv.receive(raw(http2.HEADERS, http2.PADDED | http2.END_HEADERS, 1, bytes([200]) + block))


def test_a_header_block_over_twice_the_limit_closes_the_connection():
    srv, _ = opened()
    with pytest.raises(Http2Error) as e:
        srv.receive(raw(http2.HEADERS, 0, 1, b"\x00" * 3000))
        srv.receive(raw(http2.CONTINUATION, 0, 1, b"\x00" * 3000))
        srv.receive(raw(http2.CONTINUATION, 0, 1, b"\x00" * 3000))
    assert e.value.reason == "header_bytes"
    srv, _ = opened()  # small on the wire, large once decoded
    cli = client()
    block = cli.encoder.encode([*REQUEST, *((f"k{i}".encode(), b"v" * 100) for i in range(100))])
    with pytest.raises(Http2Error) as e:
        srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, block))
    assert e.value.reason == "header_bytes"


def test_a_header_list_over_the_limit_within_twice_it_refuses_its_stream_alone():
    """Before, any call whose headers passed max_header_bytes closed the connection, and every
    other call on it with it. A list up to twice the limit is decoded whole (the HPACK table
    stays in step) and only its stream is refused; the connection's next call is read."""
    srv, rec = opened()
    cli = client()
    big = cli.encoder.encode([*REQUEST, *((f"k{i}".encode(), b"v" * 100) for i in range(40))])
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1, big))
    small = cli.encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 3, small))
    assert [e for e in rec.seen if e[0] in ("oversized", "request")] == [
        ("oversized", 1),
        ("request", 3, dict(REQUEST)[b":path"], True),
    ]


def _goaway_code(srv: Http2) -> int:
    out = srv.data_to_send()
    assert out[3] == http2.GOAWAY
    return struct.unpack(">LL", out[9:17])[1]


def test_a_header_block_in_endless_empty_continuations_closes_the_connection():
    srv, _ = opened()
    block = client().encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, 0, 1, block))
    with pytest.raises(Http2Error) as e:
        for _ in range(http2.MAX_CONTINUATIONS + 1):
            srv.receive(raw(http2.CONTINUATION, 0, 1))
    assert e.value.reason == "flood"
    assert _goaway_code(srv) == http2.ENHANCE_YOUR_CALM
    srv, rec = opened()  # a block in a few pieces is still read
    srv.receive(raw(http2.HEADERS, 0, 1, block[:4]) + raw(http2.CONTINUATION, 0, 1, block[4:8]))
    srv.receive(raw(http2.CONTINUATION, http2.END_HEADERS, 1, block[8:]))
    assert rec.seen == [("request", 1, b"/svc/M", False)]


@pytest.mark.parametrize(
    "empty",
    [
        raw(http2.DATA, 0, 1),
        raw(http2.DATA, http2.PADDED, 1, b"\x00"),
        raw(http2.DATA, http2.PADDED, 1, b"\x03pad"),
        raw(http2.PRIORITY, 0, 1, b"\x00" * 5),
        raw(0x42, 0, 0, b"??"),
    ],
    ids=["empty-data", "padded-empty-data", "padding-only-data", "priority", "unknown-type"],
)
def test_a_flood_of_frames_that_carry_nothing_closes_the_connection(empty):
    """A padded DATA frame whose data is empty carries nothing either, whatever its padding costs
    the window (it was free: 100,000 of them were read, each credited with a WINDOW_UPDATE)."""
    srv, rec = opened()
    block = client().encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, block))
    srv.receive(empty * http2.MAX_EMPTY_FRAMES)  # up to the limit: read on
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 3, block))  # a request starts the count again
    srv.receive(empty * http2.MAX_EMPTY_FRAMES)
    with pytest.raises(Http2Error) as e:
        srv.receive(empty)
    assert e.value.reason == "flood"
    assert [s[:2] for s in rec.seen if s[0] == "request"] == [("request", 1), ("request", 3)]


@pytest.mark.parametrize(
    "free",
    [raw(http2.PING, 0, 0, b"12345678"), raw(http2.SETTINGS, http2.ACK, 0), raw(http2.PING, http2.ACK, 0, b"12345678")],
    ids=["ping", "settings-ack", "ping-ack"],
)
def test_a_flood_of_pings_or_settings_acks_closes_the_connection(free):
    """A PING costs a parse and an answer, an unasked SETTINGS or PING ACK a parse: a client that
    sent them without end (and read what came back) held every other call on the loop; one
    connection took the median of other clients' answers from 0.4 to 160 ms. They count as frames
    that carry nothing (gRPC core closes a client pinging more often still: two pings without
    data inside five minutes)."""
    srv, rec = opened()
    block = client().encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, block))
    srv.receive(free * http2.MAX_EMPTY_FRAMES)  # up to the limit: read on (PINGs answered)
    if free[4] == http2.PING and not free[4 + 1] & http2.ACK:
        assert srv.data_to_send().count(raw(http2.PING, http2.ACK, 0, b"12345678")) == http2.MAX_EMPTY_FRAMES
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 3, block))  # a request starts the count again
    srv.receive(free * http2.MAX_EMPTY_FRAMES)
    srv.data_to_send()
    with pytest.raises(Http2Error) as e:
        srv.receive(free)
    assert e.value.reason == "flood"
    assert _goaway_code(srv) == http2.ENHANCE_YOUR_CALM


def test_pings_while_data_moves_are_not_a_flood():
    """Clients ping as answers stream in (grpc-go measures the bandwidth so, a PING per round
    trip while DATA comes): a PING after DATA moved either way since the last one is free."""
    srv, rec = opened()
    block = client().encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, block))
    ping = raw(http2.PING, 0, 0, b"12345678")
    for _ in range(3 * http2.MAX_EMPTY_FRAMES):
        srv.send_data(1, b"x")
        srv.receive(ping)
        srv.data_to_send()
    for _ in range(3 * http2.MAX_EMPTY_FRAMES):
        srv.receive(raw(http2.DATA, 0, 1, b"y") + ping)
    assert not [s for s in rec.seen if s[0] == "reset"]


@pytest.mark.parametrize("sid", [0, 1], ids=["connection", "stream"])
def test_window_updates_that_credit_no_data_sent_are_a_flood(sid):
    """A WINDOW_UPDATE is free while it credits DATA we sent (a client acknowledges each DATA
    frame at most once on its stream and once on the connection); past that it carries nothing.
    Before, one connection sent 5 million WINDOW_UPDATEs of 1 in a few seconds, never closed, and
    took other clients' median ServerLive from 0.8 to 38 ms."""
    srv, rec = opened()
    block = client().encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, block))
    one = raw(http2.WINDOW_UPDATE, 0, sid, struct.pack(">L", 1))
    for _ in range(3 * http2.MAX_EMPTY_FRAMES):  # an answer streaming: each DATA frame credited
        srv.send_data(1, b"x")
        srv.receive(
            raw(http2.WINDOW_UPDATE, 0, 1, struct.pack(">L", 1)) + raw(http2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 1))
        )
        srv.data_to_send()
    srv.receive(one * http2.MAX_EMPTY_FRAMES)
    with pytest.raises(Http2Error) as e:
        srv.receive(one)
    assert e.value.reason == "flood"


def test_goaways_after_the_first_are_frames_that_carry_nothing():
    """A client's GOAWAY ends its side once; more of them change nothing (they were free: one
    connection holding a call open sent 4.5 million and took other clients' median ServerLive
    from 0.6 to 8.8 ms)."""
    srv, rec = opened()
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, client().encoder.encode(REQUEST)))
    goaway = raw(http2.GOAWAY, 0, 0, struct.pack(">LL", 0, 0))
    srv.receive(goaway * (http2.MAX_EMPTY_FRAMES + 1))  # the first, and as many more as allowed
    with pytest.raises(Http2Error) as e:
        srv.receive(goaway)
    assert e.value.reason == "flood"


def test_padding_alone_does_not_make_a_ping_free():
    """DATA that is padding alone moves no data: the PING after it still counts (a padded empty
    DATA frame before each PING made a PING flood free, and never closed the connection)."""
    srv, rec = opened()
    block = client().encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, block))
    pair = raw(http2.DATA, http2.PADDED, 1, b"\x00") + raw(http2.PING, 0, 0, b"12345678")
    with pytest.raises(Http2Error) as e:
        srv.receive(pair * http2.MAX_EMPTY_FRAMES)
    assert e.value.reason == "flood"


def test_frames_over_the_announced_size_are_errors():
    srv, _ = opened()
    with pytest.raises(Http2Error, match="over the"):
        srv.receive(struct.pack(">BHBBL", 2, 0, http2.DATA, 0, 1))  # 128 KiB announced, 64 KiB allowed


def test_flow_control_both_ways():
    srv, rec = server(stream_window=100, connection_window=1000)
    cli = client()
    exchange(srv, cli)
    cli.send_headers(1, REQUEST)
    exchange(srv, cli)
    with pytest.raises(Http2Error, match="stream's window"):
        srv.receive(raw(http2.DATA, 0, 1, b"x" * 101))
    # sending: the client's initial window (65,535) bounds us; its WINDOW_UPDATE opens it
    srv, rec = opened()
    block = client().encoder.encode(REQUEST)
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1, block))
    assert srv.local_flow_control_window(1) == 65535
    srv.send_headers(1, [(b":status", b"200")])
    srv.send_data(1, b"x" * 16384)
    assert srv.local_flow_control_window(1) == 65535 - 16384
    srv.receive(raw(http2.WINDOW_UPDATE, 0, 1, struct.pack(">L", 1000)))
    assert srv.local_flow_control_window(1) == 65535 - 16384  # the connection's window is the lower
    srv.receive(raw(http2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 5000)))
    assert srv.local_flow_control_window(1) == 65535 - 16384 + 1000
    assert ("window", 1) in rec.seen and ("window", 0) in rec.seen
    # SETTINGS INITIAL_WINDOW_SIZE moves every open stream's window by the difference
    srv.receive(raw(http2.SETTINGS, 0, 0, struct.pack(">HL", http2.INITIAL_WINDOW_SIZE, 65535 + 10)))
    assert srv.local_flow_control_window(1) == 65535 - 16384 + 1010
    with pytest.raises(Http2Error, match="2\\^31"):
        srv.receive(raw(http2.WINDOW_UPDATE, 0, 0, struct.pack(">L", (1 << 31) - 1)))


def test_credited_data_lets_the_client_send_on():
    srv, rec = server(stream_window=100, connection_window=65535)
    cli = client()
    exchange(srv, cli)
    cli.send_headers(1, REQUEST)
    exchange(srv, cli)
    for _ in range(5):  # 500 bytes through a 100-byte window, credited as read
        srv.receive(raw(http2.DATA, 0, 1, b"y" * 100))
        srv.acknowledge_received_data(100, 1)
    assert sum(s[3] for s in rec.seen if s[0] == "data") == 500


def test_streams_past_the_concurrency_limit_are_refused_and_pings_answered():
    srv, rec = opened()
    srv.max_concurrent_streams = 2
    enc = client().encoder
    for sid in (1, 3, 5):
        srv.receive(raw(http2.HEADERS, http2.END_HEADERS, sid, enc.encode(REQUEST)))
    assert [s[:2] for s in rec.seen] == [("request", 1), ("request", 3), ("refused", 5)]
    out = srv.data_to_send()
    assert raw(http2.RST_STREAM, 0, 5, struct.pack(">L", http2.REFUSED_STREAM)) in out
    srv.receive(raw(http2.PING, 0, 0, b"abcdefgh"))
    assert srv.data_to_send() == raw(http2.PING, http2.ACK, 0, b"abcdefgh")


def test_a_refused_stream_does_not_start_the_count_of_frames_that_carry_nothing_again():
    """A stream refused past the concurrency limit is no request: frames that carry nothing
    before and after it add up (a refused HEADERS every 1,000 PRIORITY frames let a client send
    them without end)."""
    srv, rec = opened()
    srv.max_concurrent_streams = 1
    enc = client().encoder
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, enc.encode(REQUEST)))
    empty = raw(http2.PRIORITY, 0, 1, b"\x00" * 5)
    srv.receive(empty * (http2.MAX_EMPTY_FRAMES - 1))
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 3, enc.encode(REQUEST)))
    assert rec.seen[-1] == ("refused", 3)
    srv.receive(empty)  # the limit: read on
    with pytest.raises(Http2Error) as e:
        srv.receive(empty)
    assert e.value.reason == "flood"


def test_resets_trailers_and_frames_for_streams_already_done():
    srv, rec = opened()
    enc = client().encoder
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, enc.encode(REQUEST)))
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1, enc.encode([(b"x-trailer", b"1")])))
    assert rec.seen[-1] == ("data", 1, b"", 0, True)  # trailers end the request
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 3, enc.encode(REQUEST)))
    srv.end_reading(3)  # answered while the client still sends: RST_STREAM NO_ERROR
    assert raw(http2.RST_STREAM, 0, 3, struct.pack(">L", http2.NO_ERROR)) in srv.data_to_send()
    srv.receive(raw(http2.DATA, 0, 3, b"late"))  # in flight before the reset: ignored (and credited)
    assert not [s for s in rec.seen if s[0] == "data" and s[1] == 3]
    srv.receive(raw(http2.RST_STREAM, 0, 1, struct.pack(">L", http2.CANCEL)))
    assert rec.seen[-1] == ("reset", 1) and not srv.streams
    with pytest.raises(Http2Error, match="never opened"):
        srv.receive(raw(http2.DATA, 0, 9, b"x"))


def test_the_clients_goaway_is_told_and_reading_goes_on_and_a_push_is_an_error():
    srv, rec = opened()
    srv.receive(raw(http2.GOAWAY, 0, 0, struct.pack(">LL", 0, 0)) + raw(http2.PING, 0, 0, b"12345678"))
    assert rec.seen == [("goaway",)]
    # streams open go on after a client's GOAWAY (RFC 9113 6.8): what follows is still read
    assert srv.data_to_send() == raw(http2.PING, http2.ACK, 0, b"12345678")
    srv, _ = opened()
    with pytest.raises(Http2Error, match="push"):
        srv.receive(raw(http2.PUSH_PROMISE, http2.END_HEADERS, 1, b"\x00\x00\x00\x02"))


def test_a_settings_frame_with_more_entries_than_any_client_sends_closes_the_connection():
    """Each SETTINGS entry is a step in Python: one frame of 1 MiB (174,762 entries) held the
    event loop about 50 ms, and a thousand of them could come between two requests (nghttp2's
    CVE-2020-11080; it allows 32 entries a frame). Past MAX_SETTINGS the connection is closed as
    a flood, before any entry is read."""
    srv, _ = opened()
    entry = struct.pack(">HL", http2.MAX_CONCURRENT_STREAMS, 100)
    srv.receive(raw(http2.SETTINGS, 0, 0, entry * http2.MAX_SETTINGS))  # the most a client may send
    assert srv.data_to_send() == raw(http2.SETTINGS, http2.ACK, 0)
    with pytest.raises(Http2Error) as e:
        srv.receive(raw(http2.SETTINGS, 0, 0, entry * (http2.MAX_SETTINGS + 1)))
    assert e.value.reason == "flood"
    assert _goaway_code(srv) == http2.ENHANCE_YOUR_CALM


def test_a_header_block_of_too_many_fields_closes_the_connection():
    """Fields past hpack_cache.MAX_FIELDS in one block: refused before they are decoded (15 ms of
    the loop for 3,000 one-byte fields), and the connection closed, as the table is out of step."""
    srv, rec = server(max_header_bytes=1 << 16)
    srv.receive(http2.PREFACE + raw(http2.SETTINGS, 0, 0))
    block = client().encoder.encode(REQUEST) + b"\x86" * (hpack_cache.MAX_FIELDS - len(REQUEST))
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, block))  # the most allowed: decoded
    assert rec.seen and rec.seen[-1][:2] == ("request", 1)
    srv.data_to_send()
    with pytest.raises(Http2Error) as e:
        srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 3, block + b"\x86"))
    assert e.value.reason == "header_bytes"
    assert _goaway_code(srv) == http2.ENHANCE_YOUR_CALM


def test_settings_from_the_client_are_acknowledged_and_applied():
    srv, _ = server()
    srv.data_to_send()
    settings = struct.pack(">HLHL", http2.MAX_FRAME_SIZE, 32768, http2.HEADER_TABLE_SIZE, 0)
    srv.receive(http2.PREFACE + raw(http2.SETTINGS, 0, 0, settings))
    assert srv.data_to_send() == raw(http2.SETTINGS, http2.ACK, 0)
    assert srv.max_outbound_frame_size == 32768
    with pytest.raises(Http2Error, match="MAX_FRAME_SIZE"):
        srv.receive(raw(http2.SETTINGS, 0, 0, struct.pack(">HL", http2.MAX_FRAME_SIZE, 100)))


def test_the_connections_window_is_credited_a_quarter_at_a_time():
    srv, rec = server(stream_window=1 << 16, connection_window=4000)
    srv.receive(http2.PREFACE + raw(http2.SETTINGS, 0, 0))
    srv.data_to_send()
    enc = client().encoder
    for sid in (1, 3, 5):  # three unary requests of 400 bytes, each ended by its DATA
        srv.receive(raw(http2.HEADERS, http2.END_HEADERS, sid, enc.encode(REQUEST)))
        srv.receive(raw(http2.DATA, http2.END_STREAM, sid, b"z" * 400))
        srv.acknowledge_received_data(400, sid)
    out = srv.data_to_send()  # no stream credit (the streams are ended); one connection credit
    assert out == raw(http2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 1200))
    # the client never gets ahead of what it was credited
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 7, enc.encode(REQUEST)))
    srv.receive(raw(http2.DATA, 0, 7, b"z" * 4000))  # credited back to 4,000: that many, and not one more
    with pytest.raises(Http2Error, match="connection's window"):
        srv.receive(raw(http2.DATA, 0, 7, b"z"))


def test_a_large_frame_read_in_many_pieces_arrives_whole_once():
    srv, rec = server(stream_window=1 << 20, connection_window=1 << 20)
    srv.receive(http2.PREFACE + raw(http2.SETTINGS, 0, 0))
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 1, client().encoder.encode(REQUEST)))
    body = bytes(range(256)) * 200  # 51,200 bytes in one frame
    wire = raw(http2.DATA, http2.END_STREAM, 1, body) + raw(http2.PING, 0, 0, b"pingpong")
    for i in range(0, len(wire), 1000):
        srv.receive(wire[i : i + 1000])
    data = [s for s in rec.seen if s[0] == "data"]
    assert data == [("data", 1, body, len(body), True)]
    assert srv.data_to_send().endswith(raw(http2.PING, http2.ACK, 0, b"pingpong"))


# ------------------------------------------------------------------ the client side


class ClientRecorder:
    def __init__(self):
        self.seen: list[tuple] = []

    def on_headers(self, sid, headers, end_stream):
        self.seen.append(("headers", sid, dict(headers), end_stream))

    def on_data(self, sid, data, flow, end_stream):
        self.seen.append(("data", sid, bytes(data), end_stream))

    def on_reset(self, sid, code=http2.INTERNAL_ERROR):
        self.seen.append(("reset", sid, code))

    def on_window(self, sid):
        pass

    def on_goaway(self, last_stream_id):
        self.seen.append(("goaway", last_stream_id))


def h2_server(max_streams: int = 100) -> h2.connection.H2Connection:
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    s.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams}
    )
    s.initiate_connection()
    return s


def pair(max_streams: int = 100):
    rec = ClientRecorder()
    cli = Http2Client(rec, stream_window=1 << 20, connection_window=1 << 20, max_frame=1 << 16)
    srv = h2_server(max_streams)
    return cli, rec, srv


def flow(cli, srv) -> list:
    """Bytes both ways until both are quiet; the server's events."""
    events = []
    for _ in range(10):
        out = cli.data_to_send()
        if out:
            events += srv.receive_data(out)
        back = srv.data_to_send()
        if back:
            cli.receive(back)
        if not out and not back:
            break
    return events


def test_the_client_calls_h2s_server_and_reads_the_answer():
    cli, rec, srv = pair(max_streams=7)
    flow(cli, srv)
    assert cli.peer_max_streams == 7
    sid = cli.open_stream(REQUEST)
    cli.send_data(sid, b"\x00\x00\x00\x00\x01x", end_stream=True)
    events = flow(cli, srv)
    got = [e for e in events if isinstance(e, h2.events.RequestReceived | h2.events.DataReceived)]
    assert dict(got[0].headers)[b":path"] == b"/svc/M" and got[1].data == b"\x00\x00\x00\x00\x01x"
    srv.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    srv.send_data(sid, b"\x00\x00\x00\x00\x02ok")
    srv.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    flow(cli, srv)
    assert [s[0] for s in rec.seen] == ["headers", "data", "headers"]
    assert rec.seen[1][2] == b"\x00\x00\x00\x00\x02ok" and rec.seen[2][2] == {b"grpc-status": b"0"}
    assert rec.seen[2][3] is True and sid not in cli.streams  # both sides done: forgotten
    assert cli.open_stream(REQUEST) == sid + 2  # ids grow by two


def test_a_goaway_lets_calls_at_or_below_its_last_stream_finish():
    cli, rec, srv = pair()
    flow(cli, srv)
    first, second = cli.open_stream(REQUEST, end_stream=True), cli.open_stream(REQUEST, end_stream=True)
    flow(cli, srv)
    cli.receive(raw(http2.GOAWAY, 0, 0, struct.pack(">LL", first, 0)))  # (h2 sends nothing after its own)
    srv.send_headers(first, [(b":status", b"200"), (b"grpc-status", b"0")], end_stream=True)
    cli.receive(srv.data_to_send())
    assert ("goaway", first) in rec.seen
    assert ("headers", first, {b":status": b"200", b"grpc-status": b"0"}, True) in rec.seen
    assert second in cli.streams  # the caller fails it as never started (safe to send again)


def test_a_reset_reports_its_code_and_frames_after_it_are_ignored():
    cli, rec, srv = pair()
    flow(cli, srv)
    sid = cli.open_stream(REQUEST, end_stream=True)
    flow(cli, srv)
    srv.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
    cli.receive(srv.data_to_send())
    assert rec.seen == [("reset", sid, http2.REFUSED_STREAM)]
    with pytest.raises(Http2Error, match="never opened"):
        cli.receive(raw(http2.RST_STREAM, 0, sid + 2, struct.pack(">L", 0)))


def test_a_stream_id_gone_backwards_is_a_connection_error():
    """RFC 9113 5.1.1: a client's new stream id must be above every one it used; a call opened on
    stream 3 after stream 5 was ignored, and its client waited until its own deadline."""
    srv, rec = opened()
    enc = client().encoder
    srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 5, enc.encode(REQUEST)))
    with pytest.raises(Http2Error, match="stream 3, below the highest"):
        srv.receive(raw(http2.HEADERS, http2.END_HEADERS, 3, enc.encode(REQUEST)))


def test_frames_on_a_closed_stream_are_answered_and_count_as_carrying_nothing():
    """Trailers, empty DATA and WINDOW_UPDATE on a stream that is done passed the
    "frames that carry nothing" limit uncounted (5,000 of each were read)."""
    for kind, flags, payload, answer in (
        (http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, None, raw(http2.RST_STREAM, 0, 1, struct.pack(">L", 5))),
        (http2.DATA, 0, b"", b""),
        (http2.DATA, http2.PADDED, b"\x02pa", b""),  # (padding alone: its flow is credited, nothing more)
        (http2.WINDOW_UPDATE, 0, struct.pack(">L", 1), b""),
    ):
        srv, rec = opened()
        enc = client().encoder  # (the same block again below: indexed fields only, repeatable)
        srv.receive(raw(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1, enc.encode(REQUEST)))
        srv.reset_stream(1, http2.CANCEL)  # done with it
        srv.data_to_send()
        frame = raw(kind, flags, 1, enc.encode(REQUEST) if payload is None else payload)
        srv.receive(frame)
        assert srv.data_to_send() == answer  # trailers on a closed stream: told STREAM_CLOSED
        with pytest.raises(Http2Error, match="frames that carry nothing"):
            srv.receive(frame * http2.MAX_EMPTY_FRAMES)
