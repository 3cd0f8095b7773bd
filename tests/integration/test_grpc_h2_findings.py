"""The h2 gRPC engine against what a probe of real clients found (2026-12-05): an answer stalled
by a SETTINGS window increase, resets of calls past half their deadline taken for a rapid-reset
flood, Health.Watch-style answer streams past grpc_max_streaming_calls, large header blocks kept
per connection. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from test_grpc_h2_lifecycle import DATA, GOAWAY, RST, SETTINGS, Raw, _answer, engine, frame, message  # noqa: F401

from batchgate.transport import grpc_h2_connection


def test_a_larger_initial_window_lets_a_waiting_answer_go_on(engine):  # noqa: F811
    """RFC 9113 6.9.2: a SETTINGS_INITIAL_WINDOW_SIZE increase grows every stream's window. The
    engine took it for one stream's (id -1) and the answer waiting on it stayed unsent."""
    e = engine()
    raw = Raw(e.port, settings=struct.pack(">HL", 4, 1000))  # INITIAL_WINDOW_SIZE 1000
    sid = raw.headers()
    raw.data(sid, message(b"x" * 40000), end=True)
    got = raw.frames(1.0)
    assert sum(len(f[3]) for f in got if len(f) == 4 and f[0] == DATA and f[2] == sid) <= 1000
    raw.sock.sendall(frame(SETTINGS, 0, 0, struct.pack(">HL", 4, 1 << 20)))  # no stream WINDOW_UPDATE
    status, rest = _answer(raw, sid)
    assert status == 0
    sent = sum(len(f[3]) for f in got + rest if len(f) == 4 and f[0] == DATA and f[2] == sid)
    assert sent == 40005  # the message and its 5-byte prefix


def test_resets_of_calls_halfway_to_their_deadline_are_not_a_flood(engine):  # noqa: F811
    """gRPC clients reset a call when their deadline passes; under overload every such call is
    reset unanswered. Before, 20 of them in a second closed the connection (ENHANCE_YOUR_CALM) as
    a rapid-reset attack, and the calls still running on it were lost."""
    e = engine(max_resets_per_s=20)
    raw = Raw(e.port)
    long_call = raw.headers(extra=[(b"sleep", b"1")])
    raw.data(long_call, message(b"kept"), end=True)
    late = []
    for _ in range(60):
        sid = raw.headers(extra=[(b"sleep", b"5"), (b"grpc-timeout", b"300m")])
        raw.data(sid, message(b"late"), end=True)
        late.append(sid)
    time.sleep(0.2)  # two thirds of the way to their deadline: their client gives up
    raw.sock.sendall(b"".join(frame(RST, 0, sid, struct.pack(">L", 8)) for sid in late))
    status, frames = _answer(raw, long_call)
    assert status == 0, frames[-3:]


def test_a_reset_right_after_the_call_opened_still_counts(engine):  # noqa: F811
    e = engine(max_resets_per_s=20)
    raw = Raw(e.port)
    try:
        for _ in range(60):  # (a deadline does not excuse a reset at once)
            sid = raw.headers(extra=[(b"sleep", b"5"), (b"grpc-timeout", b"300m")])
            raw.sock.sendall(frame(RST, 0, sid, struct.pack(">L", 8)))
    except (BrokenPipeError, ConnectionResetError):  # closed before the client was done: the flood was seen
        raw.sock.close()
        return
    got = raw.frames(2.0)
    raw.sock.close()
    # GOAWAY, closed; or reset, the client's resets still unread when the server closed
    assert any(len(f) == 4 and f[0] == GOAWAY for f in got) or ("EOF",) in got or ("RESET",) in got


async def _ticks(_request: bytes, _context):
    while True:
        yield b"tick"
        await asyncio.sleep(3600)


class _Ticks(grpc.GenericRpcHandler):
    def service(self, details):
        if details.method == "/t.T/Ticks":
            return grpc.unary_stream_rpc_method_handler(_ticks, lambda b: b, lambda b: b)
        return None


def test_answer_streams_count_against_max_streaming_calls(engine):  # noqa: F811
    """Health.Watch streams only its answers; such calls were not counted, and any number stayed
    open (3.4 KB each) past grpc_max_streaming_calls."""
    e = engine(max_streaming_calls=3)
    e.server.add_generic_rpc_handlers([_Ticks()])
    with grpc.insecure_channel(f"127.0.0.1:{e.port}") as channel:
        ticks = channel.unary_stream("/t.T/Ticks")
        open_ = [ticks(b"", timeout=10) for _ in range(3)]
        for s in open_:
            assert next(s) == b"tick"  # each is open and counted
        with pytest.raises(grpc.RpcError) as refused:
            next(ticks(b"", timeout=10))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for s in open_:
            s.cancel()


def test_large_header_blocks_are_not_kept_per_connection(engine):  # noqa: F811
    """Each connection remembered the parsed form of its last 64 header blocks, whatever their
    size (30 connections with 60 KB metadata held 400 MB), and kept it after closing until a full
    collection (the connection is in a cycle with its HTTP/2 state)."""
    e = engine()
    raw = Raw(e.port)
    for i in range(5):
        sid = raw.headers(extra=[(b"x-big", bytes([97 + i]) * 20000)])
        raw.data(sid, message(b"m"), end=True)
        assert _answer(raw, sid)[0] == 0
    sid = raw.headers(extra=[(b"x-small", b"s")])
    raw.data(sid, message(b"m"), end=True)
    assert _answer(raw, sid)[0] == 0
    kept = e.read(lambda: [sum(len(v) for k in c._parsed for _n, v in k) for c in e.server.connections])
    assert kept and all(n < grpc_h2_connection.PARSED_MAX_BYTES for n in kept), kept
    conns = e.read(lambda: list(e.server.connections))
    raw.sock.close()
    end = time.monotonic() + 5
    while e.read(lambda: len(e.server.connections)) and time.monotonic() < end:
        time.sleep(0.02)
    assert all(not c._parsed for c in conns)  # (a closed connection may wait for a full collection)


@pytest.mark.parametrize("engine_name", ["h2", "grpcio"])
def test_a_call_whose_deadline_passes_in_the_queue_is_counted_deadline_exceeded(tmp_path, serve, engine_name):
    """The h2 engine's deadline timer cancels the handler as a client that goes away does, and
    fired before the queue's own: every such call was counted CANCELLED (requests_total, Triton's
    failure counts, the access log), never DEADLINE_EXCEEDED. The one instance is kept busy by a
    long batch (sent over HTTP, so not among the gRPC counts), so the calls wait in the queue until
    their deadline passes: the batcher sends a batch early for a deadline only to an idle instance."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from batchgate.demo import _save, slow_model

    config = "max_batch_size: 256\ndynamic_batching { max_queue_delay_microseconds: 3000000 }\n"
    _save(slow_model(width=1024, layers=768), str(tmp_path), "slow", config=config)
    log = tmp_path / "access.jsonl"
    running = serve(
        str(tmp_path), grpc_engine=engine_name, access_log="all", access_log_file=str(log), inline_execution_max_us=0
    )
    busy_in = httpclient.InferInput("input", [256, 1024], "FP32")
    busy_in.set_data_from_numpy(np.ones((256, 1024), np.float32))
    # On a thread of its own: tritonclient's async_infer sends from a gevent greenlet, which runs
    # only when this thread yields to gevent (it does not until get_result), so on a loaded
    # machine the request's head could sit unsent past http_header_timeout_s and be answered 408
    # (seen once in a fresh-clone make test).
    pool = ThreadPoolExecutor(1)
    busy = pool.submit(
        lambda: httpclient.InferenceServerClient(running.http_url, network_timeout=120).infer("slow", [busy_in])
    )
    end = time.monotonic() + 10
    while running.gateway.dataplane.in_flight == 0 and time.monotonic() < end:  # until it runs
        time.sleep(0.001)
    inp = grpcclient.InferInput("input", [1, 1024], "FP32")
    inp.set_data_from_numpy(np.ones((1, 1024), np.float32))
    c = grpcclient.InferenceServerClient(running.grpc_url)
    for _ in range(3):
        with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
            c.infer("slow", [inp], client_timeout=0.05)
    c.close()

    def counted(family: str, label: str) -> dict:
        text = urllib.request.urlopen(running.metrics_url).read().decode()
        out: dict = {}
        for line in text.splitlines():
            if line.startswith(family + "{") and 'protocol="grpc"' in line:
                key = line.split(f'{label}="')[1].split('"')[0]
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    end = time.monotonic() + 10
    while sum(counted("batchgate_requests_total", "status").values()) < 3 and time.monotonic() < end:
        time.sleep(0.05)
    assert counted("batchgate_requests_total", "status") == {"DEADLINE_EXCEEDED": 3.0}
    assert counted("batchgate_request_errors_total", "code") == {"DEADLINE_EXCEEDED": 3.0}
    # a stream's deadline ends its request waiting in the queue: logged so too
    s = grpcclient.InferenceServerClient(running.grpc_url)
    s.start_stream(callback=lambda result, error: None, stream_timeout=0.05)
    s.async_stream_infer("slow", [inp])
    time.sleep(0.15)
    s.stop_stream()
    s.close()
    busy.result(timeout=120)
    pool.shutdown()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
        lines = [x for x in lines if "rpc.response.status_code" in x]  # (the busy batch's is HTTP's)
        if len(lines) >= 4:
            break
        time.sleep(0.05)
    seen = [
        (x["rpc.response.status_code"], x.get("rpc.method", "")[-9:], x.get("batchgate.duration_ms")) for x in lines
    ]
    if engine_name == "h2":  # (grpcio, under CPU load, now and then logs such a call OK: not diagnosed)
        assert [x[0] for x in seen] == ["DEADLINE_EXCEEDED"] * 4, " ".join(map(str, seen))
