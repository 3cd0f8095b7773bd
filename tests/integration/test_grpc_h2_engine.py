"""batchgate's own gRPC engine (``grpc_engine: h2``) at the HTTP/2 level: what a raw client
can send that tritonclient never would, and the engine's own limits. The V2 service itself runs
on this engine through the whole suite (it is the default; ``make test-grpcio`` runs the gRPC
protocol tests again on grpcio)."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import struct
import threading
import time
import urllib.request

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchgate.demo import _save, identity_model, slow_model
from gateway_support import eventually

INFER = b"/inference.GRPCInferenceService/ModelInfer"
LIVE = b"/inference.GRPCInferenceService/ServerLive"
SLOW_CONFIG = """max_batch_size: 8
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


class RawH2:
    """A bare HTTP/2 client over a socket (the h2 library, client side)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.results: dict[int, dict] = {}
        self.closed = False
        try:
            self.sock.sendall(self.h2.data_to_send())
            # the server's SETTINGS and window first, as a real client would wait for them
            while self.h2.remote_settings.initial_window_size == 65535:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionResetError
                self.h2.receive_data(data)
                self.sock.sendall(self.h2.data_to_send())
        except OSError:  # the server closed it at once
            self.closed = True

    def request(self, path: bytes, body: bytes = b"", headers=(), end: bool = True, method: bytes = b"POST") -> int:
        sid = self.h2.get_next_available_stream_id()
        fields = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", path),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ]
        self.h2.send_headers(sid, fields, end_stream=end and not body)
        if body:
            self.h2.send_data(sid, body, end_stream=end)
        self.sock.sendall(self.h2.data_to_send())
        self.results[sid] = {"headers": [], "data": b"", "reset": None, "ended": False}
        return sid

    def reset(self, sid: int) -> None:
        self.h2.reset_stream(sid)
        self.sock.sendall(self.h2.data_to_send())

    def wait(self, sid: int, timeout: float = 10.0) -> dict:
        end = time.monotonic() + timeout
        r = self.results[sid]
        while not (r["ended"] or r["reset"] is not None or self.closed):
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                break
            for ev in self.h2.receive_data(data):
                got = self.results.get(getattr(ev, "stream_id", 0))
                if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    got["headers"] += ev.headers
                elif isinstance(ev, h2.events.DataReceived):
                    got["data"] += ev.data
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    got["ended"] = True
                elif isinstance(ev, h2.events.StreamReset):
                    got["reset"] = ev.error_code
            out = self.h2.data_to_send()
            if out:
                self.sock.sendall(out)
        return r

    def close(self) -> None:
        self.sock.close()


def status(result: dict) -> tuple[int, str]:
    h = dict(result["headers"])
    return int(h[b"grpc-status"]), urllib.request.unquote(h.get(b"grpc-message", b"").decode())


def framed(message: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(message)) + message


def open_and_reset(raw: RawH2) -> None:
    """Open a ModelInfer call and reset it in the same write."""
    sid = raw.h2.get_next_available_stream_id()
    raw.h2.send_headers(
        sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", INFER),
              (b"content-type", b"application/grpc")],
    )  # fmt: skip
    raw.h2.reset_stream(sid)
    raw.sock.sendall(raw.h2.data_to_send())


def _frames_until_closed(raw: RawH2) -> list[tuple[int, bytes]]:
    got = b""
    raw.sock.settimeout(10)
    with contextlib.suppress(OSError):
        while chunk := raw.sock.recv(65536):
            got += chunk
    kinds = []
    while len(got) >= 9:
        hi, lo, kind, _, _ = struct.unpack(">BHBBL", got[:9])
        n = (hi << 16) | lo
        kinds.append((kind, got[9 : 9 + n]))
        got = got[9 + n :]
    return kinds


def infer_request(model="mlp") -> bytes:
    req = service_pb2.ModelInferRequest(model_name=model, id="raw")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 256])
    req.raw_input_contents.append(np.ones((1, 256), np.float32).tobytes())
    return req.SerializeToString()


@pytest.fixture(scope="module")
def h2_server(demo_repo):
    from gateway_support import start_gateway

    running = start_gateway(demo_repo, grpc_engine="h2", max_request_bytes=1 << 20)
    yield running
    running.stop()


@pytest.fixture
def raw(h2_server):
    c = RawH2(h2_server.gateway.grpc_port)
    yield c
    c.close()


def test_a_raw_infer_is_answered_with_headers_message_and_trailers(raw):
    r = raw.wait(raw.request(INFER, framed(infer_request())))
    assert status(r) == (0, "")
    flag, length = struct.unpack(">BI", r["data"][:5])
    answer = service_pb2.ModelInferResponse.FromString(r["data"][5:])
    assert flag == 0 and length == len(r["data"]) - 5 and answer.model_name == "mlp" and answer.id == "raw"


def test_a_request_that_is_not_grpc_gets_415(raw):
    r = raw.wait(raw.request(b"/", method=b"GET"))
    assert dict(r["headers"])[b":status"] == b"415"


def test_an_unknown_method_is_unimplemented(raw):
    assert status(raw.wait(raw.request(b"/no.Such/Method", framed(b""))))[0] == grpc.StatusCode.UNIMPLEMENTED.value[0]


START = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", INFER)]
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


@pytest.mark.parametrize(
    "fields",
    [
        START + GRPC + [(b"x-ctl", b"a\r\nInjected: 1")],  # CR LF in a value
        START + GRPC + [(b"x-ctl", b"a\x00b")],  # NUL in a value
        START + GRPC + [(b"X-Upper", b"1")],  # an upper-case name
        START + GRPC + [(b"x bad", b"1")],  # a space in a name
        START + GRPC + [(b"connection", b"keep-alive")],  # connection-specific
        START + [(b"content-type", b"application/grpc"), (b"te", b"gzip")],  # te other than trailers
        [*START[:3], *GRPC, START[3]],  # a pseudo-header after a regular field
        START + [(b":path", b"/x")] + GRPC,  # :path twice
        START + [(b":status", b"200")] + GRPC,  # a response's pseudo-header
        [START[0], START[2], START[3], *GRPC],  # no :scheme
    ],
    ids=["crlf", "nul", "upper", "space", "connection", "te", "late_pseudo", "two_paths", "status", "no_scheme"],
)
def test_malformed_request_headers_reset_the_stream_and_keep_the_connection(h2_server, fields):
    """RFC 9113 section 8.2.1 / 8.3: such a request is malformed, a stream error PROTOCOL_ERROR.
    These were served (a CR LF value would reach the caller's headers, which may be written
    again elsewhere; of two :path the last won)."""
    raw = RawH2(h2_server.gateway.grpc_port)
    raw.h2.config.validate_outbound_headers = False  # (the client library refuses to send them)
    raw.h2.config.normalize_outbound_headers = False
    try:
        before = _refused(h2_server, "grpc_malformed")
        sid = raw.h2.get_next_available_stream_id()
        raw.h2.send_headers(sid, fields)
        raw.h2.send_data(sid, framed(infer_request()), end_stream=True)
        raw.sock.sendall(raw.h2.data_to_send())
        raw.results[sid] = {"headers": [], "data": b"", "reset": None, "ended": False}
        assert raw.wait(sid)["reset"] == h2.errors.ErrorCodes.PROTOCOL_ERROR
        assert _refused(h2_server, "grpc_malformed") == before + 1
        assert status(raw.wait(raw.request(INFER, framed(infer_request())))) == (0, "")  # the connection serves on
    finally:
        raw.close()


def test_the_answers_hpack_table_stays_small_whatever_the_client_allows(h2_server):
    """A client may allow a 4 GiB header table: ours grew with every distinct grpc-message (the
    unknown model's name echoed), held for the connection's life, each lookup walking it."""
    import h2.settings

    raw = RawH2(h2_server.gateway.grpc_port)
    try:
        raw.h2.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**32 - 1})
        raw.sock.sendall(raw.h2.data_to_send())
        for i in range(120):
            req = service_pb2.ModelInferRequest(model_name=f"no_such_model_{i:04d}_" + "x" * 100)
            code, message = status(raw.wait(raw.request(INFER, framed(req.SerializeToString()))))
            assert code == grpc.StatusCode.NOT_FOUND.value[0] and f"{i:04d}" in message
        # the client's decoder mirrors the server's encoder table
        assert raw.h2.decoder.header_table._current_size <= 4096, raw.h2.decoder.header_table._current_size
    finally:
        raw.close()


def _refused(running, reason: str) -> float:
    for line in urllib.request.urlopen(running.metrics_url).read().decode().splitlines():
        if line.startswith(f'batchgate_http_connections_refused_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_message_over_the_limit_is_refused_from_its_prefix(raw):
    # Claims 100 MB and sends 10 bytes: refused at once, nothing buffered, the stream told to stop.
    sid = raw.request(INFER, struct.pack(">BI", 0, 100 << 20) + b"x" * 10, end=False)
    code, message = status(raw.wait(sid))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "104857600 vs. 1048576" in message
    # the connection still serves
    assert status(raw.wait(raw.request(INFER, framed(infer_request()))))[0] == 0


def test_a_connection_cannot_hold_unbounded_unfinished_requests(raw, h2_server):
    # max_request_bytes is 1 MiB: five streams each holding 0.9 MiB of an unfinished request;
    # past four times the limit on one connection, the next is refused (and counted)
    chunk = struct.pack(">BI", 0, 1000_000) + b"x" * 900_000
    sids = [raw.request(INFER, chunk, end=False) for _ in range(5)]
    code, message = status(raw.wait(sids[-1]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "requests still arriving" in message
    for sid in sids[:-1]:
        assert not raw.results[sid]["ended"]  # the others still wait for their bytes
    metrics = urllib.request.urlopen(h2_server.metrics_url).read().decode()
    assert 'batchgate_http_connections_refused_total{reason="grpc_buffered_bytes"}' in metrics


def test_an_unknown_compression_is_named(raw):
    code, message = status(raw.wait(raw.request(INFER, framed(b"x", True), headers=[(b"grpc-encoding", b"snappy")])))
    assert code == grpc.StatusCode.UNIMPLEMENTED.value[0] and "snappy" in message


def test_a_gzip_message_is_served_and_a_gzip_bomb_refused(raw):
    body = framed(gzip.compress(infer_request()), compressed=True)
    assert status(raw.wait(raw.request(INFER, body, headers=[(b"grpc-encoding", b"gzip")])))[0] == 0
    bomb = framed(gzip.compress(b"\0" * (8 << 20)), compressed=True)  # ~8 KB inflating to 8 MB
    code, message = status(raw.wait(raw.request(INFER, bomb, headers=[(b"grpc-encoding", b"gzip")])))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "inflates past" in message


def test_two_messages_on_a_unary_call_are_refused(raw):
    code, message = status(raw.wait(raw.request(INFER, framed(infer_request()) * 2)))
    assert code == grpc.StatusCode.UNIMPLEMENTED.value[0] and "sent 2" in message


def test_a_malformed_timeout_is_an_error_and_an_unfinished_call_times_out(raw):
    code, _ = status(raw.wait(raw.request(LIVE, framed(b""), headers=[(b"grpc-timeout", b"soon")])))
    assert code == grpc.StatusCode.INTERNAL.value[0]
    sid = raw.request(INFER, framed(infer_request())[:20], headers=[(b"grpc-timeout", b"200m")], end=False)
    code, message = status(raw.wait(sid))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def test_a_request_ending_inside_a_message_is_an_error(raw):
    code, message = status(raw.wait(raw.request(INFER, framed(infer_request())[:-3])))
    assert code == grpc.StatusCode.INTERNAL.value[0] and "inside a message" in message


def test_binary_metadata_reaches_the_service_decoded(h2_server):
    # the V2 request id falls back to x-request-id; a -bin entry beside it must not disturb it
    c = grpcclient.InferenceServerClient(h2_server.grpc_url)
    inp = grpcclient.InferInput("input", [1, 256], "FP32")
    inp.set_data_from_numpy(np.ones((1, 256), np.float32))
    res = c.infer("mlp", [inp], headers={"x-request-id": "abc", "blob-bin": b"\x00\x01"})
    assert res.as_numpy("output").shape[0] == 1


def test_connections_past_max_connections_are_closed_and_counted(demo_repo, serve):
    running = serve(demo_repo, grpc_engine="h2", max_connections=2)
    keep = [RawH2(running.gateway.grpc_port) for _ in range(2)]
    for c in keep:
        assert status(c.wait(c.request(LIVE, framed(b""))))[0] == 0
    extra = RawH2(running.gateway.grpc_port)
    assert extra.closed  # closed before a byte of HTTP/2 was answered
    metrics = urllib.request.urlopen(running.metrics_url).read().decode()
    assert 'batchgate_http_connections_refused_total{reason="grpc_connections"} 1.0' in metrics
    for c in keep + [extra]:
        c.close()


def test_headers_past_max_header_bytes_refuse_the_call_and_past_twice_close_the_connection(demo_repo, serve):
    """Within twice max_header_bytes only the call is refused (RESOURCE_EXHAUSTED; before, the
    connection was closed and every call on it lost); past twice, the connection is closed."""
    running = serve(demo_repo, grpc_engine="h2", max_header_bytes=4096)
    raw = RawH2(running.gateway.grpc_port)
    assert status(raw.wait(raw.request(LIVE, framed(b""), headers=[(b"x-small", b"v" * 1000)])))[0] == 0
    code, message = status(raw.wait(raw.request(LIVE, framed(b""), headers=[(b"x-big", b"v" * 6000)])))[:2]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "max_header_bytes" in message
    assert not raw.closed
    assert status(raw.wait(raw.request(LIVE, framed(b""))))[0] == 0  # the connection goes on
    raw.wait(raw.request(LIVE, framed(b""), headers=[(b"x-huge", b"v" * 9000)]))
    assert raw.closed  # the connection was closed, without an answer
    metrics = urllib.request.urlopen(running.metrics_url).read().decode()
    assert 'batchgate_http_connections_refused_total{reason="grpc_header_bytes"} 2.0' in metrics
    raw.close()


def test_a_header_block_past_max_header_fields_closes_the_connection(demo_repo, serve):
    """max_header_fields bounds one header block's fields (decoding costs Python time a field, a
    one-byte one as much as any): past it the connection is closed and counted; at its minimum a
    real tritonclient call, with a deadline and caller headers, is still served."""
    running = serve(demo_repo, grpc_engine="h2", max_header_fields=16)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("input", [1, 256], "FP32")
    inp.set_data_from_numpy(np.ones((1, 256), np.float32))
    res = c.infer("mlp", [inp], headers={"x-request-id": "abc", "x-a": "1"}, client_timeout=10)
    assert res.as_numpy("output").shape[0] == 1
    raw = RawH2(running.gateway.grpc_port)
    many = [(b"x-%d" % i, b"v") for i in range(10)]  # with the 6 of the call: 16, the most allowed
    assert status(raw.wait(raw.request(LIVE, framed(b""), headers=many)))[0] == 0
    raw.wait(raw.request(LIVE, framed(b""), headers=[*many, (b"x-one-more", b"v")]))
    assert raw.closed  # closed, without an answer: the fields were not decoded, HPACK's table is lost
    metrics = urllib.request.urlopen(running.metrics_url).read().decode()
    assert 'batchgate_http_connections_refused_total{reason="grpc_header_bytes"} 1.0' in metrics
    raw.close()
    c.close()


def test_a_rapid_reset_flood_closes_the_connection_and_is_counted(demo_repo, serve):
    running = serve(demo_repo, grpc_engine="h2", grpc_max_resets_per_s=50)
    raw = RawH2(running.gateway.grpc_port)
    with contextlib.suppress(OSError):
        for _ in range(200):  # open a call and reset it at once, as fast as the socket takes it
            open_and_reset(raw)
    end = time.monotonic() + 5
    goaway = []
    while not raw.closed and time.monotonic() < end:
        try:
            raw.sock.settimeout(0.5)
            data = raw.sock.recv(65536)
            if not data:
                raw.closed = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                goaway += [e for e in raw.h2.receive_data(data) if isinstance(e, h2.events.ConnectionTerminated)]
        except TimeoutError:
            continue
        except OSError:
            raw.closed = True
    assert raw.closed
    # as for every other flood (it was NO_ERROR, as for a graceful close)
    assert [e.error_code for e in goaway] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
    metrics = urllib.request.urlopen(running.metrics_url).read().decode()
    assert 'batchgate_http_connections_refused_total{reason="grpc_resets"} 1.0' in metrics
    other = RawH2(running.gateway.grpc_port)  # the server goes on
    assert status(other.wait(other.request(LIVE, framed(b""))))[0] == 0
    other.close()


def test_streams_opened_past_the_limit_are_counted_and_a_flood_of_them_closes_the_connection(demo_repo, serve):
    """A client that ignores MAX_CONCURRENT_STREAMS has each stream past it refused at once
    (REFUSED_STREAM): a rapid reset the server does for it. Each is counted, and past
    ``grpc_max_resets_per_s`` the connection is closed, as for client resets (50,000 were
    refused in two seconds, none counted, the connection never closed)."""
    running = serve(demo_repo, grpc_engine="h2", grpc_max_concurrent_streams=1, grpc_max_resets_per_s=50)
    raw = RawH2(running.gateway.grpc_port)
    held = raw.request(b"/inference.GRPCInferenceService/ModelStreamInfer", end=False)  # the one slot, kept
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", LIVE),
              (b"content-type", b"application/grpc"), (b"te", b"trailers")]  # fmt: skip
    block = raw.h2.encoder.encode(fields)  # (the same block each time: the client's table is unchanged by it)
    frames = b"".join(
        struct.pack(">BHBBL", 0, len(block), 1, 0x5, sid) + block for sid in range(held + 2, held + 402, 2)
    )
    with contextlib.suppress(OSError):
        raw.sock.sendall(frames)
    kinds = _frames_until_closed(raw)
    refused = [p for k, p in kinds if k == 3 and p == struct.pack(">L", h2.errors.ErrorCodes.REFUSED_STREAM)]
    assert 50 <= len(refused) < 200
    goaway = [p for k, p in kinds if k == 7]
    assert goaway and struct.unpack(">L", goaway[-1][4:8])[0] == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    metrics = urllib.request.urlopen(running.metrics_url).read().decode()
    assert f'batchgate_http_connections_refused_total{{reason="grpc_concurrent_streams"}} {len(refused)}.0' in metrics
    assert 'batchgate_http_connections_refused_total{reason="grpc_resets"} 1.0' in metrics
    other = RawH2(running.gateway.grpc_port)  # the server goes on
    assert status(other.wait(other.request(LIVE, framed(b""))))[0] == 0
    other.close()
    raw.close()


def test_a_client_whose_calls_mostly_complete_may_reset_past_the_limit(demo_repo, serve):
    """Resets a connection's answered calls pay for are no flood: a client with tight deadlines
    cancels many calls a second, yet most of its calls complete."""
    running = serve(demo_repo, grpc_engine="h2", grpc_max_resets_per_s=20)
    raw = RawH2(running.gateway.grpc_port)
    for _ in range(200):  # (20 a second would take 10 s: every second holds far more than 20)
        open_and_reset(raw)
        assert status(raw.wait(raw.request(LIVE, framed(b""))))[0] == 0
    assert not raw.closed
    metrics = urllib.request.urlopen(running.metrics_url).read().decode()
    assert 'reason="grpc_resets"' not in metrics
    raw.close()


def test_a_call_the_client_resets_is_cancelled_and_the_server_goes_on(tmp_path, serve):
    _save(slow_model(width=256, layers=400), str(tmp_path), "slow", config=SLOW_CONFIG)
    running = serve(str(tmp_path), grpc_engine="h2")
    raw = RawH2(running.gateway.grpc_port)
    sid = raw.request(INFER, framed(infer_request("slow")))
    time.sleep(0.05)
    raw.reset(sid)
    end = time.monotonic() + 10
    while running.gateway.dataplane.in_flight and time.monotonic() < end:
        time.sleep(0.02)
    assert running.gateway.dataplane.in_flight == 0
    assert status(raw.wait(raw.request(INFER, framed(infer_request("slow")))))[0] == 0
    raw.close()


def test_a_call_reset_in_the_packet_that_opened_it_is_counted_cancelled(tmp_path, serve):
    """HEADERS, DATA and RST_STREAM in one write: the call takes its first step (it is queued)
    and is abandoned before its task ever ran. The handler must still hear a cancellation: the
    request counted failed, not lost and not counted as a success."""
    _save(slow_model(width=256, layers=400), str(tmp_path), "slow", config=SLOW_CONFIG)
    running = serve(str(tmp_path), grpc_engine="h2")
    raw = RawH2(running.gateway.grpc_port)
    for _ in range(3):
        sid = raw.h2.get_next_available_stream_id()
        raw.h2.send_headers(
            sid,
            [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", INFER),
             (b"content-type", b"application/grpc")],
        )  # fmt: skip
        raw.h2.send_data(sid, framed(infer_request("slow")), end_stream=True)
        raw.h2.reset_stream(sid)
        raw.sock.sendall(raw.h2.data_to_send())
    url = f"http://127.0.0.1:{running.gateway.http_port}/v2/models/slow/stats"

    def counts() -> tuple[int, int]:
        stats = json.loads(urllib.request.urlopen(url, timeout=10).read())["model_stats"][0]["inference_stats"]
        return stats["success"]["count"], stats["fail"]["count"]

    end = time.monotonic() + 10
    while sum(counts()) < 3 and time.monotonic() < end:  # (the frames may not have been read yet)
        time.sleep(0.02)
    assert counts() == (0, 3)
    assert running.gateway.dataplane.in_flight == 0
    assert status(raw.wait(raw.request(INFER, framed(infer_request("slow")))))[0] == 0
    raw.close()


def _ask_for_4_mb(raw: RawH2, *headers: tuple[bytes, bytes]) -> int:
    """Open a call for a 4 MB answer on ``raw`` (which gives no window for it)."""
    req = service_pb2.ModelInferRequest(model_name="big")
    req.inputs.add(name="INPUT", datatype="FP32", shape=[1, 1_000_000])
    req.raw_input_contents.append(np.ones(1_000_000, np.float32).tobytes())
    body = framed(req.SerializeToString())
    sid = raw.h2.get_next_available_stream_id()
    raw.h2.send_headers(
        sid,
        [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", INFER),
         (b"content-type", b"application/grpc"), *headers],
    )  # fmt: skip
    for i in range(0, len(body), 1 << 20):  # within the server's frame size
        raw.h2.send_data(sid, body[i : i + (1 << 20)], end_stream=i + (1 << 20) >= len(body))
    raw.sock.sendall(raw.h2.data_to_send())
    raw.results[sid] = {"headers": [], "data": b"", "reset": None, "ended": False}
    return sid


def test_an_answer_the_client_never_takes_is_dropped_at_the_deadline(tmp_path, serve):
    """A client that asks for a large answer and gives no window for it: once the call's deadline
    passes, the engine resets the stream and lets the answer go (nothing held for ever)."""
    _save(identity_model("big", TensorProto.FLOAT), str(tmp_path), "big", config="max_batch_size: 4\n")
    running = serve(str(tmp_path), grpc_engine="h2")
    raw = RawH2(running.gateway.grpc_port)
    sid = _ask_for_4_mb(raw, (b"grpc-timeout", b"1S"))
    # read without ever crediting the server: at most one window (64 KiB) of the 4 MB comes
    end = time.monotonic() + 10
    while raw.results[sid]["reset"] is None and time.monotonic() < end:
        raw.sock.settimeout(0.5)
        try:
            data = raw.sock.recv(1 << 20)
        except TimeoutError:
            continue
        for ev in raw.h2.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                raw.results[sid]["data"] += ev.data
            elif isinstance(ev, h2.events.StreamReset):
                raw.results[sid]["reset"] = ev.error_code
    assert raw.results[sid]["reset"] == h2.errors.ErrorCodes.CANCEL
    assert len(raw.results[sid]["data"]) <= 65535
    end = time.monotonic() + 5
    while running.gateway._grpc.connections and any(c.calls for c in running.gateway._grpc.connections):
        assert time.monotonic() < end
        time.sleep(0.05)
    raw.close()


def test_calls_started_at_once_run_in_tasks_that_python_3_12_takes(demo_repo, serve):
    """An infer's first step runs before its task exists; the task then drives the rest. Since
    Python 3.12 asyncio takes only coroutines for tasks, no generator: this loop refuses one as
    3.12 does, on any Python (every infer failed on 3.12 with "a coroutine was expected")."""
    import asyncio
    import collections.abc
    import types

    def strict(loop, coro, **kw):
        if not isinstance(coro, (types.CoroutineType, collections.abc.Coroutine)):
            raise TypeError(f"a coroutine was expected, got {coro!r}")
        return asyncio.Task(coro, loop=loop, **kw)

    async def install():
        asyncio.get_running_loop().set_task_factory(strict)

    running = serve(demo_repo, grpc_engine="h2")
    running.call(install())
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        inputs.append(grpcclient.InferInput(name, [2, 16], "INT32"))
        inputs[-1].set_data_from_numpy(np.full((2, 16), 3, np.int32))
    for _ in range(3):
        assert (c.infer("simple", inputs).as_numpy("OUTPUT0") == 6).all()


def test_a_stream_answers_and_ends_with_ok(h2_server):
    channel = grpc.insecure_channel(h2_server.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    requests = [service_pb2.ModelInferRequest.FromString(infer_request()) for _ in range(20)]
    answers = list(stub.ModelStreamInfer(iter(requests)))
    assert len(answers) == 20 and all(not a.error_message for a in answers)
    channel.close()


def _from_threads(call, threads: int) -> tuple[list, list[BaseException]]:
    """``call(results)`` from several threads at once; what they appended, and what they raised."""
    results: list = []
    errors: list[BaseException] = []

    def go():
        try:
            call(results)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    started = [threading.Thread(target=go) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join(60)
    return results, errors


def test_many_concurrent_calls_on_one_connection(h2_server):
    c = grpcclient.InferenceServerClient(h2_server.grpc_url)
    inp = grpcclient.InferInput("input", [1, 256], "FP32")
    inp.set_data_from_numpy(np.ones((1, 256), np.float32))

    def twenty(done: list) -> None:
        for _ in range(20):
            done.append(c.infer("mlp", [inp]).as_numpy("output").shape)

    done, errors = _from_threads(twenty, 8)
    assert not errors and len(done) == 160


def test_aged_connections_close_gracefully_and_clients_carry_on(tmp_path, serve):
    """grpc_max_connection_age_s: a connection that reaches its age sends GOAWAY at once (the
    client opens its next calls on a new connection), lets its calls in progress finish, then
    closes: the client sees only successes. (Refusing new calls with REFUSED_STREAM instead
    failed them: gRPC clients do not retry those here.)"""
    _save(slow_model(width=256, layers=400), str(tmp_path), "slow", config=SLOW_CONFIG)
    running = serve(str(tmp_path), grpc_engine="h2", grpc_max_connection_age_s=0.2)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("input", [1, 256], "FP32")
    inp.set_data_from_numpy(np.ones((1, 256), np.float32))

    def for_two_seconds(answered: list) -> None:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            answered.append(c.infer("slow", [inp]).as_numpy("output").shape)

    answered, errors = _from_threads(for_two_seconds, 4)
    assert not errors and len(answered) >= 8, [str(e) for e in errors]


@pytest.mark.parametrize("streaming", [False, True])
def test_large_tensors_cross_the_windows_both_ways(tmp_path, serve, streaming):
    """A 24 MB request and its 24 MB answer: many times the HTTP/2 windows on either side, so
    both directions wait on flow control and go on as the other side credits them."""
    _save(identity_model("big", TensorProto.FLOAT), str(tmp_path), "big", config="max_batch_size: 0\n")
    running = serve(str(tmp_path), grpc_engine="h2")
    x = np.random.default_rng(0).random((4, 1_500_000), dtype=np.float32)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    if not streaming:
        np.testing.assert_array_equal(c.infer("big", [inp]).as_numpy("OUTPUT"), x)
        return
    got: list = []
    done = threading.Event()

    def back(result, error):
        got.append(error if error is not None else result.as_numpy("OUTPUT"))
        if len(got) == 3:
            done.set()

    c.start_stream(back)
    for _ in range(3):
        c.async_stream_infer("big", [inp])
    assert done.wait(60)
    c.stop_stream()
    for g in got:
        np.testing.assert_array_equal(g, x)


def test_a_finished_call_is_not_kept_until_its_deadline(tmp_path, serve):
    """An answer larger than the client's window is sent as the window opens, and the call was then
    finished without its deadline's timer cancelled: each such call (and one failed by the engine)
    stayed in memory until its deadline, minutes for clients that set long ones."""
    import gc

    from batchgate.transport.grpc_h2_call import _Call

    _save(identity_model("big", TensorProto.FLOAT), str(tmp_path), "big", config="max_batch_size: 0\n")
    running = serve(str(tmp_path), grpc_engine="h2")
    x = np.ones((1, 2_000_000), np.float32)  # 8 MB: past any window a client opens at first
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(3):
        assert c.infer("big", [inp], client_timeout=600).as_numpy("OUTPUT").shape == x.shape
    raw = RawH2(int(running.grpc_url.rsplit(":", 1)[1]))
    # a request that ends inside its message: failed by the engine
    sid = raw.request(INFER, framed(infer_request())[:-3], headers=[(b"grpc-timeout", b"600S")])
    assert status(raw.wait(sid))[0] == grpc.StatusCode.INTERNAL.value[0]
    gc.collect()
    assert [o for o in gc.get_objects() if type(o) is _Call] == []


def test_an_overload_refusal_is_answered_before_the_request_is_parsed(demo_repo, serve):
    """Past an admission limit, a ModelInfer is refused from the model name at the front of its
    bytes (RESOURCE_EXHAUSTED, retry-after, counted as the full path counts it) before the rest
    is parsed: bytes past the name that would not parse are not even looked at. What the full
    path must judge still goes the full way: an unknown model, a version named."""
    running = serve(demo_repo, grpc_engine="h2", max_inflight_requests=1)
    dp = running.gateway.dataplane
    host, port = running.http_url.split(":")
    body = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 256], "data": [' + b"0," * 255 + b"0]}]}"
    held = socket.create_connection((host, int(port)), timeout=10)  # admitted, its body still on its way
    held.sendall(
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:10]
    )
    end = time.monotonic() + 10
    while dp.admission.inflight != 1:
        assert time.monotonic() < end
        time.sleep(0.01)
    garbage_tail = infer_request()[: 2 + len("mlp")] + b"\xff\xff\xff\xff"  # the name, then nonsense
    c = RawH2(running.gateway.grpc_port)
    try:
        for payload in (infer_request(), garbage_tail):
            r = c.wait(c.request(INFER, framed(payload)))
            code, message = status(r)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message
            assert "(max_inflight_requests)" in message
            assert dict(r["headers"])[b"retry-after"] == b"1"
        versioned = service_pb2.ModelInferRequest.FromString(infer_request())
        versioned.model_version = "1"
        assert status(c.wait(c.request(INFER, framed(versioned.SerializeToString()))))[0] == 8  # the full path
        unknown = status(c.wait(c.request(INFER, framed(infer_request("no-such-model")))))
        assert unknown[0] == grpc.StatusCode.NOT_FOUND.value[0]
        text = urllib.request.urlopen(running.metrics_url).read().decode()
        assert (
            'batchgate_request_errors_total{code="RESOURCE_EXHAUSTED",protocol="grpc",'
            'reason="max_inflight_requests"} 3.0' in text
        )
        assert 'batchgate_refusals_total{model="mlp",reason="inflight_limit",version="1"} 3.0' in text
        assert "no-such-model" not in text
        # the held request answered, the same nonsense is judged in full: a bad request
        held.sendall(body[10:])
        assert held.recv(65536).startswith(b"HTTP/1.1 200")
        while dp.admission.inflight:
            assert time.monotonic() < end + 10
            time.sleep(0.01)
        code, message = status(c.wait(c.request(INFER, framed(garbage_tail))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0], message
    finally:
        c.close()
        held.close()


def test_the_engines_timeouts_come_from_the_settings_and_are_counted(demo_repo, serve):
    # a connection that never sends its preface, and a call whose message stalls part-way
    running = serve(demo_repo, grpc_engine="h2", http_header_timeout_s=0.3, http_body_timeout_s=0.3)
    silent = socket.create_connection(("127.0.0.1", running.gateway.grpc_port), timeout=5)
    raw = RawH2(running.gateway.grpc_port)
    sid = raw.request(INFER, framed(infer_request())[:20], end=False)
    code, message = status(raw.wait(sid))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "http_body_timeout_s" in message
    silent.settimeout(3)
    while silent.recv(1 << 16):  # (our SETTINGS, then the close)
        pass
    metrics = urllib.request.urlopen(running.metrics_url).read().decode()
    assert 'batchgate_http_connections_refused_total{reason="grpc_handshake_timeout"} 1.0' in metrics
    assert 'batchgate_http_connections_refused_total{reason="grpc_body_timeout"} 1.0' in metrics
    silent.close()
    raw.close()


def test_the_grpcio_engine_takes_max_header_bytes_for_a_calls_metadata(demo_repo, serve):
    """gRPC core's own metadata limits applied on grpcio (20 KB refused, 'value length 20000 vs.
    16384'), whatever max_header_bytes said; the h2 engine took it."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    running = serve(demo_repo, grpc_engine="grpcio")  # max_header_bytes 64 KiB
    client = grpcclient.InferenceServerClient(running.grpc_url)
    assert client.is_server_live(headers={"x-note": "v" * 20_000})
    client.close()
    small = serve(demo_repo, grpc_engine="grpcio", max_header_bytes=4096)
    client = grpcclient.InferenceServerClient(small.grpc_url)
    assert client.is_server_live(headers={"x-note": "v" * 1000})
    with pytest.raises(InferenceServerException) as e:
        client.is_server_live(headers={"x-note": "v" * 8000})
    assert "RESOURCE_EXHAUSTED" in str(e.value.status())
    client.close()


def test_a_message_sent_in_slivers_closes_the_connection_as_a_flood(demo_repo, serve):
    """Each DATA frame is a step through Python whatever it carries: a 60 MB message sent a byte a
    frame took other clients' median answer from 0.75 to 100 ms. A message that comes in more than
    64 frames of under 1 KiB is a flood; a client that sends each message's 5-byte prefix in a
    frame of its own, message after message on one stream, is not."""
    running = serve(demo_repo, grpc_engine="h2")
    msg = framed(infer_request())
    raw = RawH2(running.gateway.grpc_port)
    sid = raw.request(b"/inference.GRPCInferenceService/ModelStreamInfer", end=False)
    for i in range(100):  # (100 prefixes apart: more than 64 slivers in all, never 2 in one message)
        raw.h2.send_data(sid, msg[:5])
        raw.h2.send_data(sid, msg[5:], end_stream=i == 99)
        raw.sock.sendall(raw.h2.data_to_send())
    answered = raw.wait(sid)
    assert status(answered)[0] == 0 and answered["data"].count(b"raw") == 100  # (each answer echoes the id)
    sid = raw.request(b"/inference.GRPCInferenceService/ModelStreamInfer", end=False)
    slivers = b"".join(struct.pack(">BHBBL", 0, 1, 0, 0, sid) + msg[i : i + 1] for i in range(200))
    with contextlib.suppress(OSError):
        raw.sock.sendall(slivers)
    goaway = [p for k, p in _frames_until_closed(raw) if k == 7]
    assert goaway and struct.unpack(">L", goaway[-1][4:8])[0] == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    metrics = urllib.request.urlopen(running.metrics_url).read().decode()
    assert 'batchgate_http_connections_refused_total{reason="grpc_flood"} 1.0' in metrics
    other = RawH2(running.gateway.grpc_port)  # the server goes on
    assert status(other.wait(other.request(LIVE, framed(b""))))[0] == 0
    other.close()
    raw.close()


def test_a_large_request_refused_on_its_decode_thread_is_not_kept_in_a_cycle(tmp_path, serve):
    """A request past PRECHECK_BYTES is decoded on a thread; its error came back through the
    thread's future, thrown into the call by the task (Python 3.11, batchgate's own first step,
    transport/eager.py), and that frame kept the future, whose exception's traceback held the
    call's frame and its request: ~3 copies of each refused message (180 MB for a 60 MB one)
    held until a full collection, so a few large bad requests took gigabytes. The cyclic
    collector is off here: plain reference counting must free them."""
    import gc
    import types

    _save(identity_model("big", TensorProto.FLOAT), str(tmp_path), "big", config="max_batch_size: 0\n")
    running = serve(str(tmp_path), grpc_engine="h2")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(running.grpc_url))
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="not_an_input", datatype="FP32", shape=[1, 1 << 19])
    request = service_pb2.ModelInferRequest(model_name="big", inputs=[tensor], raw_input_contents=[bytes(2 << 20)])

    def calls_alive() -> list:
        return [o for o in gc.get_objects() if isinstance(o, types.FrameType) and o.f_code.co_name == "_model_infer"]

    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(request, timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        deadline = time.monotonic() + 10
        while calls_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls_alive() == []
    finally:
        gc.enable()


def _unsent(running) -> float:
    for line in urllib.request.urlopen(running.metrics_url).read().decode().splitlines():
        if line.startswith("batchgate_unsent_answer_bytes "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no batchgate_unsent_answer_bytes")


def test_answers_waiting_for_windows_are_bounded_by_max_unsent_answer_bytes(tmp_path, serve):
    """A client that opens calls for large answers and never gives a window for them held each
    answer until the send timeout, as many as its streams. Past max_unsent_answer_bytes the
    connection holding the most is aborted (counted grpc_unsent_answers); another client's answer
    waits on, and is whole once that client opens its window."""
    _save(identity_model("big", TensorProto.FLOAT), str(tmp_path), "big", config="max_batch_size: 4\n")
    running = serve(str(tmp_path), grpc_engine="h2", max_unsent_answer_bytes=10 << 20)
    patient, greedy = RawH2(running.gateway.grpc_port), RawH2(running.gateway.grpc_port)
    try:
        kept = _ask_for_4_mb(patient)
        eventually(lambda: _unsent(running) > 3 << 20, "the first answer held")
        _ask_for_4_mb(greedy)
        eventually(lambda: _unsent(running) > 7 << 20, "the second answer held")
        assert _refused(running, "grpc_unsent_answers") == 0
        _ask_for_4_mb(greedy)  # 12 MB: past the bound, and greedy holds 8 of them
        eventually(lambda: _refused(running, "grpc_unsent_answers") == 1, "the connection holding most aborted")
        greedy.sock.settimeout(5)
        with contextlib.suppress(OSError):
            while greedy.sock.recv(1 << 16):
                pass  # (what was sent before the abort, then the end)
        assert 3 << 20 < _unsent(running) <= 10 << 20
        r = patient.wait(kept)  # (it credits each DATA frame it reads: the window opens)
        assert status(r)[0] == 0
        assert len(r["data"]) > 4_000_000
        eventually(lambda: _unsent(running) == 0, "nothing held once taken")
        assert [c.out_bytes for c in running.gateway._grpc.connections] == [0]  # (patient's, counted down)
    finally:
        patient.close()
        greedy.close()
