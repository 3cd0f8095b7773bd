"""The h2 gRPC engine's streams and windows over a call's whole life, with handlers made for the
purpose (an in-process ``H2GrpcServer`` on a loop of its own) and a client that writes raw
frames, or grpcio where a real client shows the fault. Each test is a defect once found: the
connection's window lost to calls that ended with bytes unread, a call stranded by DATA after
its END_STREAM, stream slots leaked by non-gRPC requests, calls cut off by a client's graceful
GOAWAY, memory taken by a client that writes and never reads, and a streaming call that outlived
its deadline while its answer waited for the client's window."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import socket
import struct
import threading
import time

import grpc
import hpack
import pytest

from batchgate.transport import grpc_h2, grpc_h2_call, grpc_h2_sweep, grpc_wire
from batchgate.transport.grpc_h2 import H2GrpcServer

DATA, HEADERS, RST, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, kind, flags, sid) + payload


def message(b: bytes) -> bytes:
    return struct.pack(">BI", 0, len(b)) + b


async def _echo(request: bytes, context) -> bytes:
    await asyncio.sleep(float(dict(context.invocation_metadata()).get("sleep", "0")))
    return request


async def _stream(requests, context):
    async for m in requests:
        yield m


async def _stuck(requests, context):
    """Answers the first message, then reads no more (as ModelStreamInfer once its client has
    ``max_stream_inflight`` requests waiting)."""
    async for m in requests:
        yield m
        await asyncio.sleep(3600)


async def _slow(requests, context):
    """Takes each message half a second after the last: its backlog waits, uncredited."""
    async for m in requests:
        await asyncio.sleep(0.5)
        yield m[:8]


def _same(x):
    return x


class _Handlers(grpc.GenericRpcHandler):
    def service(self, details):
        return {
            "/t.T/Echo": grpc.unary_unary_rpc_method_handler(_echo, _same, _same),
            "/t.T/Stream": grpc.stream_stream_rpc_method_handler(_stream, _same, _same),
            "/t.T/Stuck": grpc.stream_stream_rpc_method_handler(_stuck, _same, _same),
            "/t.T/Slow": grpc.stream_stream_rpc_method_handler(_slow, _same, _same),
        }.get(details.method)


class Engine:
    """An H2GrpcServer serving the handlers above on a loop in a thread."""

    def __init__(self, **settings):
        self.loop = asyncio.new_event_loop()
        settings.setdefault("max_receive_bytes", 64 << 20)
        self.server = H2GrpcServer(max_connections=100, **settings)
        self.server.add_generic_rpc_handlers([_Handlers()])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def read(self, fn):
        """``fn()`` evaluated on the server's loop."""

        async def on_loop():
            return fn()

        return self.run(on_loop())

    def connections(self) -> list[tuple[int, int]]:
        """(calls, HTTP/2 streams) of each connection."""
        return self.read(lambda: [(len(c.calls), len(c.h2.streams)) for c in self.server.connections])

    def windows(self) -> list[int]:
        """What each connection's client may still send, counting bytes taken but not yet credited."""
        return self.read(lambda: [c.h2._recv_window + c.h2._unacked for c in self.server.connections])

    def stop(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def engine():
    made: list[Engine] = []

    def start(**settings) -> Engine:
        made.append(Engine(**settings))
        return made[-1]

    yield start
    for e in made:
        e.stop()


class Raw:
    """A client that writes frames as given and reads frames back."""

    def __init__(self, port: int, settings: bytes = b""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.sock.sendall(
            PREFACE + frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 30))
        )
        self.buf = b""
        self.last = -1

    def headers(self, path: bytes = b"/t.T/Echo", extra=(), content_type: bytes = b"application/grpc") -> int:
        self.last += 2
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", path),
                  (b"content-type", content_type), (b"te", b"trailers"), *extra]  # fmt: skip
        self.sock.sendall(frame(HEADERS, 0x4, self.last, self.encoder.encode(fields)))
        return self.last

    def data(self, sid: int, payload: bytes, end: bool = False) -> None:
        self.sock.sendall(frame(DATA, int(end), sid, payload))

    def frames(self, seconds: float) -> list[tuple]:
        """The frames read within ``seconds`` ((kind, flags, sid, payload); ``("EOF",)`` at the end,
        ``("RESET",)`` when the server closed with bytes of ours unread: the kernel then resets
        the connection, and what it had sent before may be lost with it)."""
        out: list[tuple] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                got = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except ConnectionResetError:
                out.append(("RESET",))
                break
            if not got:
                out.append(("EOF",))
                break
            self.buf += got
            while len(self.buf) >= 9:
                hi, lo, kind, flags, sid = struct.unpack(">BHBBL", self.buf[:9])
                n = (hi << 16) | lo
                if len(self.buf) < 9 + n:
                    break
                payload, self.buf = self.buf[9 : 9 + n], self.buf[9 + n :]
                out.append((kind, flags, sid, self.decoder.decode(payload, raw=True) if kind == HEADERS else payload))
        return out


def _grpc_status(frames: list[tuple], sid: int) -> int | None:
    for f in frames:
        if len(f) == 4 and f[0] == HEADERS and f[2] == sid and f[1] & 1:
            return int(dict(f[3])[b"grpc-status"])
    return None


def _answer(raw: Raw, sid: int, seconds: float = 5.0) -> tuple[int | None, list[tuple]]:
    """Frames read until ``sid``'s call ends (its grpc-status and every frame read so far)."""
    got: list[tuple] = []
    end = time.monotonic() + seconds
    while _grpc_status(got, sid) is None and time.monotonic() < end:
        got += raw.frames(0.05)
    return _grpc_status(got, sid), got


def _wait(cond, what: str, seconds: float = 5.0) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def test_calls_refused_for_size_give_the_connection_its_window_back(engine):
    # 2 MiB messages against a 1 MiB limit: each is refused from its prefix while its bytes still
    # come; 24 of them are three times the connection's 16 MiB window
    e = engine(max_receive_bytes=1 << 20)
    with grpc.insecure_channel(f"127.0.0.1:{e.port}") as channel:
        echo = channel.unary_unary("/t.T/Echo")
        for _ in range(24):
            with pytest.raises(grpc.RpcError) as refused:
                echo(b"x" * (2 << 20), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert echo(b"still served", timeout=5) == b"still served"
    assert e.windows() in ([], [grpc_h2.CONNECTION_WINDOW])


def test_calls_refused_early_are_asked_once_and_give_the_connection_its_window_back(engine):
    """A method's early refusal (``H2GrpcServer.refusers``, ModelInfer's under overload) judges a
    unary request whose one message comes whole in the frame that ends it before the message is
    buffered: each such call is asked once, refused calls credit their bytes back (24 refused
    messages of 900 KiB are past the connection's 16 MiB window), and calls let through, or whose
    message came in two frames, take the usual way."""
    e = engine()
    asked: list[bytes] = []

    def refuse(raw: bytes, peer: str):
        asked.append(raw[:4])
        if raw.startswith(b"busy"):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after", "1"),)
        return None

    e.server.refusers["/t.T/Echo"] = refuse
    raw = Raw(e.port)
    for _ in range(24):
        sid = raw.headers()
        raw.data(sid, message(b"busy" + b"x" * (900 << 10)), end=True)
        status, got = _answer(raw, sid)
        assert status == 8, got[-2:]
    assert asked == [b"busy"] * 24
    sid = raw.headers()  # let through: answered by the handler, the refusal asked once
    raw.data(sid, message(b"fine"), end=True)
    status, got = _answer(raw, sid)
    assert status == 0 and any(f[0] == DATA and f[2] == sid and f[3].endswith(b"fine") for f in got)
    assert asked[24:] == [b"fine"]
    sid = raw.headers()  # a message in two frames: judged once it is whole
    whole = message(b"busy, in two parts")
    raw.data(sid, whole[:7])
    raw.data(sid, whole[7:], end=True)
    assert _answer(raw, sid)[0] == 8
    assert asked[25:] == [b"busy"]
    _wait(lambda: e.connections() == [(0, 0)], "every call is over")
    assert e.windows() == [grpc_h2.CONNECTION_WINDOW]


def test_a_cancelled_stream_with_requests_unread_gives_the_connection_its_window_back(engine):
    e = engine()
    with grpc.insecure_channel(f"127.0.0.1:{e.port}") as channel:
        stuck = channel.stream_stream("/t.T/Stuck")
        go_on = threading.Event()

        def requests():
            for _ in range(4):
                yield b"x" * (1 << 20)
            go_on.wait(30)

        for _ in range(10):  # about 2 MiB left unread each time: 20 MiB, past the 16 MiB window
            call = stuck(requests(), timeout=30)
            assert next(call) == b"x" * (1 << 20)
            _wait(lambda: e.windows()[0] < grpc_h2.CONNECTION_WINDOW - (1 << 20), "a backlog waits unread")
            call.cancel()
            _wait(lambda: e.connections() == [(0, 0)], "the cancelled call is gone")
        go_on.set()
        assert e.windows() == [grpc_h2.CONNECTION_WINDOW]
        assert channel.unary_unary("/t.T/Echo")(b"y" * (1 << 20), timeout=5) == b"y" * (1 << 20)


def test_data_after_the_clients_end_of_stream_ends_the_call(engine):
    e = engine()
    raw = Raw(e.port)
    for _ in range(50):
        sid = raw.headers(extra=[(b"sleep", b"0.2")])
        raw.data(sid, message(b"hi"), end=True)
        raw.data(sid, b"late")  # DATA on a stream the client has ended: a stream error
    frames = raw.frames(1.0)
    assert sum(1 for f in frames if f[0] == RST and struct.unpack(">L", f[3])[0] == 0x5) == 50  # STREAM_CLOSED
    _wait(lambda: e.connections() == [(0, 0)], "no call left behind")
    t0 = time.monotonic()
    e.run(e.server.stop(3))
    assert time.monotonic() - t0 < 2  # (nothing in flight to wait for)


def test_requests_that_are_not_grpc_leave_no_stream_behind(engine):
    e = engine(max_concurrent_streams=16)
    raw = Raw(e.port)
    for _ in range(20):  # past max_concurrent_streams: each must be gone once answered
        sid = raw.headers(b"/", content_type=b"application/json")
        raw.data(sid, b'{"inputs": []}', end=True)
    frames = raw.frames(0.5)
    assert sum(1 for f in frames if f[0] == HEADERS and dict(f[3]).get(b":status") == b"415") == 20
    sid = raw.headers()
    raw.data(sid, message(b"hello"), end=True)
    assert _grpc_status(raw.frames(1.0), sid) == 0
    assert e.connections() == [(0, 0)]


def test_a_clients_goaway_lets_its_calls_in_progress_finish(engine):
    e = engine()
    raw = Raw(e.port)
    raw.frames(0.2)
    sid = raw.headers(extra=[(b"sleep", b"0.3")])
    raw.data(sid, message(b"hi"), end=True)
    time.sleep(0.05)
    raw.sock.sendall(frame(GOAWAY, 0, 0, struct.pack(">LL", 0, 0)))  # a graceful close, as grpc-java's
    frames = raw.frames(2.0)
    assert _grpc_status(frames, sid) == 0
    assert any(f[0] == DATA and f[2] == sid and f[3] == message(b"hi") for f in frames if len(f) == 4)
    assert frames[-1] == ("EOF",)  # closed once its call was answered


def test_a_client_that_writes_and_never_reads_is_no_longer_read(engine):
    e = engine()
    raw = Raw(e.port)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sock.settimeout(3)
    run = frame(PING, 0, 0, b"12345678") * 500  # PINGs, each to be answered
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/t.T/Echo"),
              (b"content-type", b"application/grpc"), (b"te", b"trailers")]  # fmt: skip
    sent = 0
    with pytest.raises(TimeoutError):  # the server stops reading: our sends block
        for _ in range(200):
            pings = bytearray()  # ~1 MB: a call opened every 500 PINGs (PINGs alone are a flood)
            for _ in range(120):
                raw.last += 2
                pings += frame(HEADERS, 0x5, raw.last, raw.encoder.encode(fields)) + run
            raw.sock.sendall(pings)
            sent += 1
    assert sent < 100
    backlog = e.read(lambda: [(c._backlogged, c.transport.get_write_buffer_size()) for c in e.server.connections])
    assert len(backlog) == 1 and backlog[0][0] and backlog[0][1] < grpc_h2.MAX_WRITE_BACKLOG + (4 << 20)


def test_a_streaming_call_whose_answer_waits_for_the_window_ends_at_its_deadline(engine):
    e = engine()
    raw = Raw(e.port, settings=struct.pack(">HL", 4, 0))  # INITIAL_WINDOW_SIZE 0: no answer may go
    sid = raw.headers(b"/t.T/Stream", extra=[(b"grpc-timeout", b"300m")])
    raw.data(sid, message(b"x" * 100))  # the stream stays open
    frames = raw.frames(1.0)
    assert any(f[0] == RST and f[2] == sid and struct.unpack(">L", f[3])[0] == 0x8 for f in frames if len(f) == 4)
    _wait(lambda: e.connections() == [(0, 0)], "the call ended at its deadline")


def _held(e: Engine) -> tuple[int, list[int]]:
    """Bytes of unfinished request messages the server holds: in all, and per connection."""
    return e.read(lambda: (e.server.budget.held, [c.buffered for c in e.server.connections]))


def test_a_streams_unfinished_messages_count_against_the_connections_buffer(engine):
    # each stream sends 0.9 MiB of a 1 MB message and stops: the part read is held like an
    # unfinished unary request's bytes, so the fifth stream on the connection is refused
    e = engine(max_receive_bytes=1 << 20)
    raw = Raw(e.port)
    partial = struct.pack(">BI", 0, 1_000_000) + b"x" * 900_000
    sids = []
    for _ in range(5):
        sids.append(raw.headers(b"/t.T/Stream"))
        raw.data(sids[-1], partial)
    frames = raw.frames(1.0)
    assert _grpc_status(frames, sids[-1]) == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert all(_grpc_status(frames, sid) is None for sid in sids[:-1])
    total, per_connection = _held(e)
    assert total == sum(per_connection) <= grpc_h2.BUFFERED_REQUESTS * (1 << 20)
    raw.sock.close()  # gone: nothing of theirs is held any more
    _wait(lambda: _held(e) == (0, []), "the closed connection's bytes are let go")


def test_unfinished_requests_of_all_connections_together_are_bounded(engine):
    e = engine(max_receive_bytes=1 << 20, max_buffered_bytes=2 << 20)
    clients = [Raw(e.port) for _ in range(3)]
    partial = struct.pack(">BI", 0, 1_000_000) + b"x" * 900_000
    sids = []
    for raw in clients:
        sids.append(raw.headers())
        raw.data(sids[-1], partial)
        time.sleep(0.2)
    assert _grpc_status(clients[0].frames(0.3), sids[0]) is None
    assert _grpc_status(clients[1].frames(0.3), sids[1]) is None
    assert _grpc_status(clients[2].frames(1.0), sids[2]) == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert _held(e)[0] <= 2 << 20


@pytest.mark.parametrize("path", [b"/t.T/Echo", b"/t.T/Stream"])
def test_a_request_message_that_stalls_part_way_fails_at_the_body_timeout(engine, path):
    e = engine(body_timeout_s=0.3)
    raw = Raw(e.port)
    sid = raw.headers(path)
    if path == b"/t.T/Stream":  # one whole message is answered; the next one stalls
        raw.data(sid, message(b"whole"))
    raw.data(sid, struct.pack(">BI", 0, 100) + b"x" * 10)
    frames = raw.frames(2.0)
    assert _grpc_status(frames, sid) == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert e.connections() == [(0, 0)] and _held(e) == (0, [0])


def test_a_connection_that_never_sends_the_preface_is_closed(engine):
    e = engine(handshake_timeout_s=0.3)
    sock = socket.create_connection(("127.0.0.1", e.port), timeout=5)
    sock.sendall(PREFACE[:10])
    _wait(lambda: e.connections() == [], "the silent connection is closed")
    sock.settimeout(2)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    assert data.startswith(b"\x00\x00")  # (our SETTINGS, then the close)


def test_a_connection_without_calls_is_closed_gracefully_after_the_idle_timeout(engine):
    e = engine(idle_timeout_s=0.5)
    with grpc.insecure_channel(f"127.0.0.1:{e.port}") as channel:
        echo = channel.unary_unary("/t.T/Echo")
        assert echo(b"one", timeout=5) == b"one"
        time.sleep(0.3)
        assert echo(b"two", timeout=5) == b"two"  # (a call resets the idle time)
        _wait(lambda: e.connections() == [], "the idle connection is closed")
        assert echo(b"three", timeout=5) == b"three"  # the channel reconnects
    raw = Raw(e.port)  # a connection with a call in progress is not idle
    sid = raw.headers(b"/t.T/Stream")
    frames = raw.frames(1.2)
    assert ("EOF",) not in frames and not any(f[0] == GOAWAY for f in frames if len(f) == 4)
    raw.data(sid, b"", end=True)
    frames = raw.frames(2.0)
    assert _grpc_status(frames, sid) == 0 and any(f[0] == GOAWAY for f in frames if len(f) == 4)


def test_a_compressed_message_that_fails_to_inflate_leaves_nothing_counted(engine):
    e = engine(max_receive_bytes=1 << 20)
    raw = Raw(e.port)
    for _ in range(3):
        sid = raw.headers(extra=[(b"grpc-encoding", b"gzip")])
        raw.data(sid, struct.pack(">BI", 1, 900_000) + b"not gzip" * 112_500, end=True)
        assert _grpc_status(raw.frames(1.0), sid) not in (None, 0)
    assert _held(e) == (0, [0])


def test_inflated_messages_count_against_the_buffers(engine):
    # gzip bombs of ~1 KB inflating to 1,000,000 bytes each, on a stream whose handler takes none
    # of them: counted inflated, the connection's 4 MiB stop them; a unary call's second message
    # is refused before it is inflated
    e = engine(max_receive_bytes=1 << 20)
    bomb = gzip.compress(b"\0" * 1_000_000)
    raw = Raw(e.port, settings=struct.pack(">HL", 4, 1 << 24))  # (room for its one answer)
    sid = raw.headers(b"/t.T/Stuck", extra=[(b"grpc-encoding", b"gzip")])
    raw.data(sid, struct.pack(">BI", 1, len(bomb)) + bomb)  # the first is answered; then stuck
    raw.frames(0.3)
    raw.data(sid, (struct.pack(">BI", 1, len(bomb)) + bomb) * 20)
    assert _grpc_status(raw.frames(1.0), sid) == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert _held(e)[0] == 0
    sid = raw.headers(extra=[(b"grpc-encoding", b"gzip")])
    raw.data(sid, (struct.pack(">BI", 1, len(bomb)) + bomb) * 2, end=True)
    assert _grpc_status(raw.frames(1.0), sid) == grpc.StatusCode.UNIMPLEMENTED.value[0]


def _gzipped(payload: bytes) -> bytes:
    z = gzip.compress(payload)
    return struct.pack(">BI", 1, len(z)) + z


def _body(frames: list[tuple], sid: int) -> bytes:
    return b"".join(f[3] for f in frames if len(f) == 4 and f[0] == DATA and f[2] == sid)


def _where_inflated(monkeypatch, e: Engine, delay: float = 0.0) -> list[bool]:
    """Spies on the engine's inflation (the real one runs): True for each message inflated on the
    server's loop, False for one inflated on another thread (held ``delay`` seconds first)."""
    where: list[bool] = []
    real = grpc_wire.decompress

    def spy(payload, encoding, limit):
        where.append(threading.current_thread() is e.thread)
        if not where[-1]:
            time.sleep(delay)
        return real(payload, encoding, limit)

    monkeypatch.setattr(grpc_wire, "decompress", spy)
    return where


def test_a_large_compressed_message_is_inflated_off_the_loop(engine, monkeypatch):
    # Before, every message was inflated on the event loop as it arrived: one of a few KB that
    # inflates to max_receive_bytes held the loop, and every other call on it, while zlib worked.
    e = engine(max_receive_bytes=1 << 20)
    where = _where_inflated(monkeypatch, e)
    big, small = os.urandom(20_000) + bytes(700_000), b"small " * 100  # ~20 KB and ~30 bytes sent
    raw = Raw(e.port, settings=struct.pack(">HL", 4, 1 << 24))  # (room for the answers)
    for payload in (big, small):
        sid = raw.headers(extra=[(b"grpc-encoding", b"gzip")])
        raw.data(sid, _gzipped(payload), end=True)
        code, got = _answer(raw, sid)
        assert code == 0 and _body(got, sid) == message(payload)
    assert where == [False, True]
    parts = [big, small, big[::-1], small * 2]  # a stream's messages keep their order either way
    sid = raw.headers(b"/t.T/Stream", extra=[(b"grpc-encoding", b"gzip")])
    raw.data(sid, b"".join(_gzipped(p) for p in parts), end=True)
    code, got = _answer(raw, sid)
    assert code == 0 and _body(got, sid) == b"".join(message(p) for p in parts)
    assert sorted(where[2:]) == [False, False, True, True]
    for path in (b"/t.T/Echo", b"/t.T/Stream"):  # one that fails to inflate fails its call
        sid = raw.headers(path, extra=[(b"grpc-encoding", b"gzip")])
        raw.data(sid, struct.pack(">BI", 1, 9000) + b"not gzip" * 1125, end=True)
        code, got = _answer(raw, sid)
        assert code == grpc.StatusCode.INTERNAL.value[0], path
    _wait(lambda: e.connections() == [(0, 0)], "the calls are let go")
    assert _held(e) == (0, [0])


def test_a_call_whose_message_is_still_inflating_ends_at_its_deadline_or_reset(engine, monkeypatch):
    e = engine(max_receive_bytes=1 << 20)
    _where_inflated(monkeypatch, e, delay=3.0)
    raw = Raw(e.port)
    sent = _gzipped(os.urandom(20_000))
    sid = raw.headers(extra=[(b"grpc-encoding", b"gzip"), (b"grpc-timeout", b"200m")])
    raw.data(sid, sent, end=True)
    code, _ = _answer(raw, sid, 2.5)  # (the inflation takes 3 s)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    sid = raw.headers(b"/t.T/Stream", extra=[(b"grpc-encoding", b"gzip")])
    raw.data(sid, sent)
    time.sleep(0.3)
    raw.sock.sendall(frame(RST, 0, sid, struct.pack(">L", 8)))  # CANCEL
    _wait(lambda: e.connections() == [(0, 0)], "the calls are let go while their messages inflate", 2.0)
    assert _held(e) == (0, [0])


def test_an_answer_its_client_takes_none_of_is_dropped_at_the_body_timeout(engine):
    e = engine(body_timeout_s=0.3)
    raw = Raw(e.port, settings=struct.pack(">HL", 4, 0))  # INITIAL_WINDOW_SIZE 0, and no grpc-timeout
    sid = raw.headers()
    raw.data(sid, message(b"x" * 100_000), end=True)
    frames = raw.frames(1.5)
    assert any(f[0] == RST and f[2] == sid and struct.unpack(">L", f[3])[0] == 0x8 for f in frames if len(f) == 4)
    _wait(lambda: e.connections() == [(0, 0)], "the answer is let go")


def test_an_answer_its_client_takes_a_byte_at_a_time_is_dropped(engine):
    """A window opened one byte at a time no longer holds an answer for ever: the time it may
    wait grows only with what its client takes (16 KiB a second; before, every byte taken
    started the body timeout again)."""
    e = engine(body_timeout_s=0.5)
    raw = Raw(e.port, settings=struct.pack(">HL", 4, 0))  # INITIAL_WINDOW_SIZE 0
    sid = raw.headers()
    raw.data(sid, message(b"x" * 100_000), end=True)
    frames: list[tuple] = []
    for _ in range(30):  # 3 s: six body timeouts
        raw.sock.sendall(frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", 1)))
        frames += raw.frames(0.1)
        if any(f[0] == RST and f[2] == sid for f in frames if len(f) == 4):
            break
    assert any(f[0] == RST and f[2] == sid and struct.unpack(">L", f[3])[0] == 0x8 for f in frames if len(f) == 4)
    _wait(lambda: e.connections() == [(0, 0)], "the answer is let go")


def test_a_call_sent_as_our_goaway_crosses_it_is_still_answered(engine):
    """Our first GOAWAY names the largest stream id: a call the client sent before it read the
    GOAWAY is taken and answered; the GOAWAY naming the last call taken, and the close, come a
    grace period later. (Closing at once lost such calls: UNAVAILABLE "Stream removed" for
    clients of aged connections, under load.)"""
    e = engine(idle_timeout_s=0.3)
    raw = Raw(e.port)
    time.sleep(0.6)  # idle past the timeout: the sweep sends its GOAWAY, unread here
    sid = raw.headers()
    raw.data(sid, message(b"x"), end=True)
    frames = raw.frames(1.5)
    assert _grpc_status(frames, sid) == 0, frames
    goaways = [struct.unpack(">L", f[3][:4])[0] & 0x7FFFFFFF for f in frames if f[0] == GOAWAY]
    assert goaways[-1] == sid, goaways  # the last one names the last call taken


def test_streaming_calls_open_at_once_are_bounded(engine):
    """A stream may stay open and idle as long as its client likes, so their number bounds them:
    past grpc_max_streaming_calls one more is refused RESOURCE_EXHAUSTED (before, 20 connections
    of 1,024 streams that sent nothing held 200 MB for as long as they stayed)."""
    e = engine(max_streaming_calls=3)
    raw = Raw(e.port)
    held = [raw.headers(b"/t.T/Stream") for _ in range(3)]
    extra = raw.headers(b"/t.T/Stream")
    assert _grpc_status(raw.frames(1.0), extra) == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    unary = raw.headers()  # (unary calls are not streams: not counted)
    raw.data(unary, message(b"x"), end=True)
    assert _grpc_status(raw.frames(1.0), unary) == 0
    raw.sock.sendall(frame(RST, 0, held[0], struct.pack(">L", 8)))  # one ends: its place is free
    _wait(lambda: e.read(lambda: len(e.server.streaming["/t.T/Stream"])) == 2, "the ended stream is let go")
    again = raw.headers(b"/t.T/Stream")
    raw.data(again, message(b"y"), end=True)
    assert _grpc_status(raw.frames(1.0), again) == 0


def test_each_streaming_method_is_bounded_apart(engine):
    """One method's streams at the limit leave another's places free: health's Watch needs no
    API key, and strangers holding grpc_max_streaming_calls Watch streams kept every caller with
    a key from opening a ModelStreamInfer stream (RESOURCE_EXHAUSTED)."""
    e = engine(max_streaming_calls=3)
    raw = Raw(e.port)
    for _ in range(3):
        raw.headers(b"/t.T/Stream")
    other = raw.headers(b"/t.T/Slow")
    raw.data(other, message(b"12345678"), end=True)
    frames = raw.frames(1.5)
    assert _grpc_status(frames, other) == 0, frames
    extra = raw.headers(b"/t.T/Stream")  # (the full method's limit still holds)
    assert _grpc_status(raw.frames(1.0), extra) == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def test_a_closed_connection_whose_client_reads_nothing_is_aborted(engine, monkeypatch):
    monkeypatch.setattr(grpc_h2_sweep, "CLOSE_GRACE_S", 0.3)
    e = engine(idle_timeout_s=0.3)
    raw = Raw(e.port)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sock.settimeout(3)
    pings = frame(PING, 0, 0, b"12345678") * 60_000
    with pytest.raises((TimeoutError, ConnectionResetError, BrokenPipeError)):  # not read, then let go
        for _ in range(200):
            raw.sock.sendall(pings)
    _wait(lambda: e.connections() == [], "the connection is let go", seconds=5)


def test_window_floods_cost_no_pass_over_every_stream(engine, monkeypatch):
    pumps = []
    original = grpc_h2_call._Call.pump
    monkeypatch.setattr(grpc_h2_call._Call, "pump", lambda call: (pumps.append(1), original(call))[1])
    e = engine()
    raw = Raw(e.port)  # (each stream's window is the 64 KiB default: the 100 KB answers wait)
    for _ in range(40):
        raw.data(raw.headers(), message(b"y" * 100_000), end=True)
    raw.frames(1.0)
    pumps.clear()
    raw.sock.sendall(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1)) * 200)
    raw.frames(0.5)
    assert len(pumps) <= 40  # a pass over every waiting call for each would be 200 x 40
    # a SETTINGS frame of many INITIAL_WINDOW_SIZE entries moves the windows once
    before = len(pumps)
    raw.sock.sendall(frame(SETTINGS, 0, 0, struct.pack(">HL", 4, 70_000) * 5_000))
    raw.frames(0.5)
    assert len(pumps) - before <= 40


def test_the_body_timeout_does_not_count_time_the_server_withholds_credit(engine):
    # a handler slower than the body timeout: its backlog waits uncredited, the client cannot send
    # the rest of its next message, and that is not the client's stall
    e = engine(body_timeout_s=0.3)
    with grpc.insecure_channel(f"127.0.0.1:{e.port}") as channel:
        answers = list(channel.stream_stream("/t.T/Slow")(iter([b"z" * 1_500_000] * 5), timeout=30))
    assert answers == [b"z" * 8] * 5


def test_streams_opened_after_our_last_goaway_count_against_the_reset_bound(engine):
    """A stream opened after the GOAWAY naming the last call taken is refused (REFUSED_STREAM)
    at once, a reset the server does for it. Such refusals were not counted: while one call
    kept the connection open, a client could open thousands a second until the age timer's
    close. Now they meet ``max_resets_per_s`` as streams past the concurrency limit do."""
    e = engine(max_connection_age_s=0.3, max_resets_per_s=20)
    raw = Raw(e.port)
    raw.headers(b"/t.T/Stuck")  # open, keeps the connection from closing after the GOAWAYs
    frames: list[tuple] = []
    end = time.monotonic() + 10
    while len([f for f in frames if f[0] == GOAWAY]) < 2:  # the first, and the one naming the last call
        assert time.monotonic() < end, frames
        frames += raw.frames(0.1)
    block = raw.encoder.encode(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"x"),
            (b":path", b"/t.T/Echo"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]  # fmt: skip
    )
    with contextlib.suppress(OSError):
        raw.sock.sendall(b"".join(frame(HEADERS, 0x5, raw.last + 2 * i, block) for i in range(1, 201)))
    after = raw.frames(2.0)
    refused = [f for f in after if len(f) == 4 and f[0] == RST]
    calm = [f for f in after if f[0] == GOAWAY and struct.unpack(">L", f[3][4:8])[0] == 0xB]  # ENHANCE_YOUR_CALM
    assert calm and len(refused) < 200, (len(refused), after[-3:])
