"""Overload admission (issue: safe to expose, point 8): admitted work is bounded per process
(``max_inflight_requests``), per model (``max_queue_size``, counting requests still being
read) and by the wait a model's queue is expected to impose (``max_queue_wait_ms``). A
refusal is decided before the body is read (HTTP) or any tensor decoded (gRPC), answered
RESOURCE_EXHAUSTED / 429 with Retry-After and the setting named, and counted."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.demo import _save, build_demo_repository, slow_model

GOOD = json.dumps(
    {
        "inputs": [
            {"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))} for n in ("INPUT0", "INPUT1")
        ]
    }
).encode()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return build_demo_repository(str(tmp_path_factory.mktemp("models")))


def head(model: str, length: int) -> bytes:
    return (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def hold(running, model: str = "simple") -> socket.socket:
    """A request admitted and left half-sent: its head and part of its body, no more."""
    host, port = running.http_url.split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(head(model, len(GOOD)) + GOOD[:10])
    return s


def finish(s: socket.socket) -> bytes:
    s.sendall(GOOD[10:])
    with s:
        return response(s)


def response(s: socket.socket) -> bytes:
    """One whole HTTP response (its body as long as its Content-Length)."""
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def metrics(running) -> str:
    return urllib.request.urlopen(running.metrics_url).read().decode()


def simple_inputs(mod):
    inputs = []
    for n in ("INPUT0", "INPUT1"):
        i = mod.InferInput(n, [1, 16], "INT32")
        i.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
        inputs.append(i)
    return inputs


def test_inflight_limit_refuses_at_once_before_the_body_is_read(repo, serve):
    running = serve(repo, max_inflight_requests=2)
    dp = running.gateway.dataplane
    held = [hold(running), hold(running)]
    wait_for(lambda: dp.admission.inflight == 2)
    # Admitted requests whose bodies are still arriving count in the model's queue depth.
    text = metrics(running)
    assert 'batchgate_queue_depth{model="simple",version="1"} 2.0' in text

    # gRPC: refused before any tensor is decoded.
    with pytest.raises(InferenceServerException) as ei:
        grpcclient.InferenceServerClient(running.grpc_url).infer("simple", simple_inputs(grpcclient))
    assert ei.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "(max_inflight_requests)" in ei.value.message()

    # HTTP: a head announcing 50 MB and no body at all is answered 429 at once: the body is
    # never waited for.
    host, port = running.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head("simple", 50_000_000))
        reply = response(s)
    assert reply.startswith(b"HTTP/1.1 429"), reply[:200]
    assert b"retry-after:" in reply.lower() and b"(max_inflight_requests)" in reply

    # The held requests are answered in full once their bodies arrive; then there is room.
    for s in held:
        assert finish(s).startswith(b"HTTP/1.1 200")
    wait_for(lambda: dp.admission.inflight == 0)
    r = httpclient.InferenceServerClient(running.http_url).infer("simple", simple_inputs(httpclient))
    assert r.as_numpy("OUTPUT0") is not None
    text = metrics(running)
    assert 'batchgate_refusals_total{model="simple",reason="inflight_limit",version="1"} 2.0' in text
    for proto in ("grpc", "http"):
        assert (
            f'batchgate_request_errors_total{{code="RESOURCE_EXHAUSTED",protocol="{proto}",'
            f'reason="max_inflight_requests"}} 1.0' in text
        )


def test_queue_size_counts_requests_still_being_read(repo, serve, tmp_path):
    """A model's max_queue_size bounds its admitted requests not yet executing, including
    those whose bodies are on their way: a third is refused while two are half-sent."""
    _save(slow_model(width=64, layers=2), str(tmp_path), "slow", config="max_batch_size: 0\n")
    running = serve(str(tmp_path), max_queue_size=2, default_max_batch_size=0)  # (one request at a time)
    dp = running.gateway.dataplane
    held = [hold(running, "slow"), hold(running, "slow")]
    wait_for(lambda: dp.admission.inflight == 2)
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.ones((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as ei:
        grpcclient.InferenceServerClient(running.grpc_url).infer("slow", [inp])
    assert ei.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "queue is full: 2 requests waiting (max_queue_size)" in ei.value.message()
    for s in held:
        s.close()  # abandoned mid-body: released, nothing left counted
    wait_for(lambda: dp.admission.inflight == 0)
    assert grpcclient.InferenceServerClient(running.grpc_url).infer("slow", [inp]).as_numpy("output") is not None
    assert 'batchgate_queue_depth{model="slow",version="1"} 0.0' in metrics(running)


def test_expected_queue_wait_refuses_at_once_with_retry_after(tmp_path, serve):
    """Callers far beyond what one slow instance drains within max_queue_wait_ms: once the
    drain rate under load is known, the excess is refused at once (not queued for seconds),
    with a Retry-After, while the admitted ones are served."""
    _save(slow_model(width=1024, layers=64), str(tmp_path), "slow", config="max_batch_size: 0\n")
    running = serve(
        str(tmp_path), max_queue_wait_ms=30, queue_target_ms=0, inline_execution_max_us=0, default_max_batch_size=0
    )
    x = np.ones((1, 1024), np.float32)
    outcomes: list[tuple[str, float, str]] = []
    lock = threading.Lock()

    def call(i):
        mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
        inp = mod.InferInput("input", [1, 1024], "FP32")
        inp.set_data_from_numpy(x)
        t0 = time.monotonic()
        client = mod.InferenceServerClient(url)
        try:
            client.infer("slow", [inp])
            r, msg = "ok", ""
        except InferenceServerException as e:
            r, msg = str(e.status()), e.message() or ""
        finally:
            client.close()  # in this thread: tritonclient's HTTP pool cannot be joined from another
        with lock:
            outcomes.append((r, time.monotonic() - t0, msg))

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(call, range(240)))
    ok = [o for o in outcomes if o[0] == "ok"]
    refused = [o for o in outcomes if "(max_queue_wait_ms)" in o[2]]
    assert ok and refused, sorted({o[0] for o in outcomes})
    assert {o[0] for o in refused} <= {"429", "StatusCode.RESOURCE_EXHAUSTED"}
    assert len(ok) + len(refused) == len(outcomes), {o[0] for o in outcomes}
    text = metrics(running)
    assert 'batchgate_refusals_total{model="slow",reason="queue_wait",version="1"}' in text
    assert 'reason="max_queue_wait_ms"' in text


def refusal_times(running, n: int) -> list[float]:
    """Seconds each of ``n`` infer requests sent one after another on one connection took to be
    refused (429), once the request ``hold`` made fills the one place in flight."""
    wait_for(lambda: running.gateway.dataplane.admission.inflight == 1)
    host, port = running.http_url.split(":")
    times = []
    with socket.create_connection((host, int(port)), timeout=10) as s:
        for _ in range(n):
            t0 = time.monotonic()
            s.sendall(head("simple", len(GOOD)) + GOOD)
            reply = response(s)
            assert reply.startswith(b"HTTP/1.1 429"), reply[:100]
            times.append(time.monotonic() - t0)
    return times


def test_past_the_refusals_rate_the_connection_is_not_read_until_its_turn(repo, serve):
    """Not refusing at full speed: past overload_refusals_per_s (here 1 a second), a refusal is
    still answered at once, but its connection is then not read until its turn (the next
    second's), so a client that retries at once waits in its own socket; each such pause is
    counted."""
    running = serve(repo, max_inflight_requests=1, overload_refusals_per_s=1)
    held = hold(running)
    times = refusal_times(running, 3)
    assert times[0] < 0.5 and times[1] < 0.5, times  # answered at once, within the budget and past it
    assert times[2] >= 0.45, times  # read only at the second refusal's turn (about 0.9 s later)
    assert finish(held).startswith(b"HTTP/1.1 200")
    assert 'batchgate_http_connections_refused_total{reason="overload_hold"}' in metrics(running)


def test_held_connections_come_back_one_turn_after_another(repo, serve):
    """Past the rate, a connection refused again and again is held for its turn only (turns
    1/rate apart), not for a Retry-After: a client retrying at once gets about the rate's
    refusals a second, each soon after it asked (before: the first second's budget at full
    speed, then a whole second of silence)."""
    running = serve(repo, max_inflight_requests=1, overload_refusals_per_s=20)
    held = hold(running)
    times = refusal_times(running, 16)
    later = times[4:]  # past the first turns (the bucket's burst)
    assert sum(later) / len(later) >= 0.03, times  # held: about 1/20 s each, not at full speed
    assert max(later) < 0.4, times  # and only for its turn
    assert finish(held).startswith(b"HTTP/1.1 200")


def test_grpc_connections_past_the_refusals_rate_are_held_for_their_turn(repo, serve):
    """The same on the h2 gRPC engine (grpc_overload_refusals_per_s; grpcio reads its sockets
    itself and holds nothing): one channel retrying at once gets RESOURCE_EXHAUSTED about the
    rate's times a second, each soon after it asked."""
    running = serve(repo, grpc_engine="h2", max_inflight_requests=1, grpc_overload_refusals_per_s=20)
    held = hold(running)
    wait_for(lambda: running.gateway.dataplane.admission.inflight == 1)
    client = grpcclient.InferenceServerClient(running.grpc_url)
    times = []
    for _ in range(16):
        t0 = time.monotonic()
        with pytest.raises(InferenceServerException) as e:
            client.infer("simple", simple_inputs(grpcclient))
        assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", e.value
        times.append(time.monotonic() - t0)
    client.close()
    later = times[4:]
    assert sum(later) / len(later) >= 0.03, times
    assert max(later) < 0.4, times
    assert finish(held).startswith(b"HTTP/1.1 200")
    assert 'batchgate_http_connections_refused_total{reason="overload_hold"}' in metrics(running)


def test_a_turn_ending_during_a_pipelined_answer_keeps_the_answers_in_order(tmp_path, serve):
    """A client pipelines, in one write, a request refused past the refusals' rate (its
    connection held for its turn), one that waits 1.5 s in a batcher, and a quick one. The turn
    comes while the second is still in progress; the third is still answered after it (before:
    the turn's end started the third beside the second, and its answer came first)."""
    build_demo_repository(str(tmp_path))
    _save(slow_model(width=64, layers=2), str(tmp_path), "full", config="max_batch_size: 0\n")
    _save(
        slow_model(width=64, layers=2),
        str(tmp_path),
        "batched",
        config="max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 1500000 }\n",
    )
    running = serve(str(tmp_path), max_queue_size=2, overload_refusals_per_s=1)
    held = [hold(running, "full"), hold(running, "full")]  # "full" has its 2 waiting: refused
    wait_for(lambda: running.gateway.dataplane.admission.inflight == 2)
    host, port = running.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as first:  # takes the one free turn
        first.sendall(head("full", len(GOOD)) + GOOD)
        assert response(first).startswith(b"HTTP/1.1 429")
    row = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head("full", len(GOOD)) + GOOD + head("batched", len(row)) + row + head("simple", len(GOOD)) + GOOD)
        answers = responses(s, 3)
    assert answers[0].startswith(b"HTTP/1.1 429"), answers[0][:100]
    assert answers[1].startswith(b"HTTP/1.1 200") and b'"model_name":"batched"' in answers[1], answers[1][:300]
    assert answers[2].startswith(b"HTTP/1.1 200") and b'"model_name":"simple"' in answers[2], answers[2][:300]
    for h in held:
        h.close()


def responses(s: socket.socket, n: int) -> list[bytes]:
    """The next ``n`` whole HTTP responses on ``s``, in the order they came."""
    s.settimeout(10)
    data, out = b"", []
    while len(out) < n:
        end = data.find(b"\r\n\r\n")
        if end >= 0 and len(data) >= end + 4 + _length(data):
            size = end + 4 + _length(data)
            out.append(data[:size])
            data = data[size:]
            continue
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return out


def test_a_refusal_is_answered_from_the_head_and_the_connection_goes_on(repo, serve):
    """The protocol admits an infer request as soon as its head is parsed: a refusal is
    written before the body arrives, the body is then read and dropped, and the same
    keep-alive connection serves the next request (refused, then answered once there is
    room). A client that asked to close gets its connection closed after the refusal."""
    running = serve(repo, max_inflight_requests=1)
    dp = running.gateway.dataplane
    held = hold(running)
    wait_for(lambda: dp.admission.inflight == 1)
    host, port = running.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head("simple", len(GOOD)))
        reply = response(s)  # before any of the body was sent
        assert reply.startswith(b"HTTP/1.1 429") and b"(max_inflight_requests)" in reply, reply[:200]
        s.sendall(GOOD)  # dropped: it belongs to the refused request
        s.sendall(head("simple", len(GOOD)) + GOOD)
        assert response(s).startswith(b"HTTP/1.1 429")
        assert finish(held).startswith(b"HTTP/1.1 200")
        wait_for(lambda: dp.admission.inflight == 0)
        s.sendall(head("simple", len(GOOD)) + GOOD)
        reply = response(s)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    held = hold(running)
    wait_for(lambda: dp.admission.inflight == 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head("simple", len(GOOD)).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n") + GOOD)
        reply = response(s)
        assert reply.startswith(b"HTTP/1.1 429") and b"connection: close" in reply.lower(), reply[:300]
        s.settimeout(5)
        assert s.recv(100) == b""  # closed after the answer
    # A client that expects 100-continue may not send its body after a final answer: closed.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head("simple", len(GOOD)).replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n"))
        reply = response(s)
        assert reply.startswith(b"HTTP/1.1 429") and b"connection: close" in reply.lower(), reply[:300]
        s.settimeout(5)
        assert s.recv(100) == b""
    held.close()
    wait_for(lambda: dp.admission.inflight == 0)


def test_a_refused_request_whose_body_is_past_max_request_bytes_closes_its_connection(repo, serve):
    """A request refused from its head (here 404, an unknown model) whose body is past
    max_request_bytes is not read on behind the answer: its connection closes after it. Before,
    the body was read and dropped for up to http_body_timeout_s (a 100 MiB body at line rate,
    for a request that could never be served). A chunked body is closed once that much of it
    came; a body within the limit is still dropped and the connection goes on."""
    running = serve(repo, max_request_bytes=4096, http_body_timeout_s=60)
    host, port = running.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head("nosuch", 100 << 20) + b"x" * 8192)
        reply = response(s)
        assert reply.startswith(b"HTTP/1.1 404") and b"connection: close" in reply.lower(), reply[:300]
        s.settimeout(5)
        assert s.recv(100) == b""  # closed after the answer (before: open for http_body_timeout_s)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        chunked = head("nosuch", 0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        s.sendall(chunked + b"1000\r\n" + b"x" * 4096 + b"\r\n")
        assert response(s).startswith(b"HTTP/1.1 404")
        s.sendall(b"1000\r\n" + b"x" * 4096 + b"\r\n")  # 8 KiB of it: past the limit
        s.settimeout(5)
        assert s.recv(100) == b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head("nosuch", 4096) + b"x" * 4096)  # within the limit: dropped, and served on
        assert response(s).startswith(b"HTTP/1.1 404")
        s.sendall(head("simple", len(GOOD)) + GOOD)
        assert response(s).startswith(b"HTTP/1.1 200")


def test_whole_plain_requests_are_refused_from_the_request_line(repo, serve):
    """A plain infer request whose bytes are all at hand is refused for overload from its request
    line and Content-Length, before httptools parses its head: a head httptools would reject
    still gets the overload answer, requests pipelined in one packet are answered in order
    (those behind, which are not refusals, by the usual way), and the connection goes on."""
    running = serve(repo, max_inflight_requests=1)
    dp = running.gateway.dataplane
    held = hold(running)
    wait_for(lambda: dp.admission.inflight == 1)
    host, port = running.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        # the first refusal takes the usual way; while refusals go on, the quick one is tried first
        s.sendall(head("simple", len(GOOD)) + GOOD)
        assert response(s).startswith(b"HTTP/1.1 429")
        unparsable = head("simple", len(GOOD)).replace(b"Host: x\r\n", b"Host: x\r\nno colon here\r\n")
        s.sendall(unparsable + GOOD)
        reply = response(s)
        assert reply.startswith(b"HTTP/1.1 429") and b"(max_inflight_requests)" in reply, reply[:200]
        assert b"retry-after: 1" in reply.lower()
        health = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        s.sendall((head("simple", len(GOOD)) + GOOD) * 2 + health)
        replies = b""
        while replies.count(b"HTTP/1.1 ") < 3:
            chunk = s.recv(65536)
            assert chunk, replies
            replies += chunk
        statuses = [part.split(b"\r\n", 1)[0] for part in replies.split(b"HTTP/1.1 ")[1:]]
        assert statuses == [b"429 Too Many Requests", b"429 Too Many Requests", b"200 OK"], replies[:600]
    # Not strictly framed (a bare LF, a folded line, a framing header's name spelt so that one
    # parser may take it and another not, a second Content-Length so spelt): never judged from
    # the request line, for a proxy in front could cut such bytes into requests otherwise
    # (smuggling); httptools reads the head, and rejects it. (Until 2026-12-06 a
    # "Transfer-Encoding : chunked" line beside a Content-Length was answered 429 here, its
    # body taken by Content-Length, and 400 by httptools once the model was not shedding.)
    # (Each twice: the second time the head is known, and still not judged from its line.)
    framing = (
        b"Host: x\r\nTransfer-Encoding : chunked\r\n",
        b"Host: x\r\nTransfer-Encoding\t: chunked\r\n",
        b"Host: x\r\nX: y\r\nTransfer-encoding\x0b: chunked\r\n",
        b"Host: x\r\nContent-Length : 3\r\n",
    )
    for sneaky in (b"Host: x\nno colon here\r\n", b"Host: x\r\n folded\r\nno colon here\r\n", *framing) * 2:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head("simple", len(GOOD)).replace(b"Host: x\r\n", sneaky) + GOOD)
            reply = response(s)
            assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    # A Content-Length of more digits than Python reads into an int (4,300): judged by httptools
    # (400), not a failure of the protocol that dropped the connection without an answer.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        huge = head("simple", len(GOOD)).replace(b"Content-Length: %d" % len(GOOD), b"Content-Length: " + b"9" * 5000)
        s.sendall(huge + GOOD)
        reply = response(s)
        assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    # Heads are remembered by their bytes, a bounded number of them: past that bound every
    # head is still judged, and the same head with another Content-Length is another head.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        many = b"".join(
            head("simple", len(GOOD)).replace(b"Host: x\r\n", f"Host: x\r\nX-N: {i}\r\n".encode()) + GOOD
            for i in range(100)
        )
        s.sendall(many + head("simple", len(GOOD) - 1) + GOOD[:-1])
        replies = responses(s, 101)
        assert len(replies) == 101 and all(
            r.startswith(b"HTTP/1.1 429") and b"(max_inflight_requests)" in r for r in replies
        )
    finish(held)
    wait_for(lambda: dp.admission.inflight == 0)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(unparsable + GOOD)  # with room, the same head is parsed, and rejected
        assert response(s).startswith(b"HTTP/1.1 400")
    text = metrics(running)
    assert (
        'batchgate_request_errors_total{code="RESOURCE_EXHAUSTED",protocol="http",'
        'reason="max_inflight_requests"} 105.0' in text
    )


def test_upgrade_requests_are_not_admitted_early_and_leak_nothing(repo, serve):
    """Regression: an infer request asking to upgrade the connection (WebSocket) goes the
    ordinary way and releases its admission like any other; repeating it cannot fill the
    in-flight bound."""
    running = serve(repo, max_inflight_requests=2)
    dp = running.gateway.dataplane
    host, port = running.http_url.split(":")
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                head("simple", len(GOOD)).replace(
                    b"Host: x\r\n", b"Host: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                )
                + GOOD
            )
            s.settimeout(5)
            with contextlib.suppress(OSError):
                s.recv(65536)
    wait_for(lambda: dp.admission.inflight == 0)
    r = httpclient.InferenceServerClient(running.http_url).infer("simple", simple_inputs(httpclient))
    assert r.as_numpy("OUTPUT0") is not None


def test_a_standing_queue_is_cut_to_the_target_and_the_model_recovers(tmp_path, serve):
    """queue_target_ms: callers that keep one slow instance's queue above the target for a
    whole interval are refused beyond the target (counted as queue_target, the setting named),
    while admitted ones are served; without the rule the same load is all queued; once the
    load stops, the next request is admitted."""
    _save(slow_model(width=1024, layers=32), str(tmp_path), "slow", config="max_batch_size: 0\n")
    x = np.ones((1, 1024), np.float32)

    def hammer(running) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        lock = threading.Lock()

        def call(i):
            mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
            inp = mod.InferInput("input", [1, 1024], "FP32")
            inp.set_data_from_numpy(x)
            client = mod.InferenceServerClient(url)
            try:
                client.infer("slow", [inp])
                r = ("ok", "")
            except InferenceServerException as e:
                r = (str(e.status()), e.message() or "")
            finally:
                client.close()
            with lock:
                out.append(r)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(call, range(200)))
        return out

    # (default_max_batch_size 0: the config's max_batch_size 0 stays 0, one request at a time; else it
    # is completed to 4 with the dynamic batcher, as Triton completes it)
    common = dict(max_queue_wait_ms=10_000, inline_execution_max_us=0, queue_interval_ms=20, default_max_batch_size=0)
    plain = hammer(serve(str(tmp_path), queue_target_ms=0, **common))
    assert {r for r, _ in plain} == {"ok"}, sorted({m for _, m in plain})[:3]

    running = serve(str(tmp_path), queue_target_ms=1, **common)
    outcomes = hammer(running)
    ok = [o for o in outcomes if o[0] == "ok"]
    refused = [o for o in outcomes if o[1].endswith("(queue_target_ms)")]
    assert ok and refused, sorted({o[0] for o in outcomes})
    assert {r for r, _ in refused} == {"429", "StatusCode.RESOURCE_EXHAUSTED"}
    assert len(ok) + len(refused) == len(outcomes), sorted({o[1] for o in outcomes})[:3]
    text = metrics(running)
    assert 'batchgate_refusals_total{model="slow",reason="queue_target",version="1"}' in text
    assert 'reason="queue_target_ms"' in text
    time.sleep(0.2)  # quiet for longer than the interval: recovered
    inp = grpcclient.InferInput("input", [1, 1024], "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(3):
        assert grpcclient.InferenceServerClient(running.grpc_url).infer("slow", [inp]).as_numpy("output") is not None


def test_grpc_connections_past_max_connections_are_refused(repo, serve):
    """max_connections bounds gRPC connections too (gRPC core refuses the one past it; the
    client sees UNAVAILABLE); a closed connection makes room again."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    running = serve(repo, max_connections=2)

    def live(channel) -> str:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        try:
            return "live" if call(pb.ServerLiveRequest(), timeout=5).live else "not live"
        except grpc.RpcError as e:
            return e.code().name

    # A local subchannel pool: one TCP connection per channel (grpc shares them otherwise).
    channels = [
        grpc.insecure_channel(running.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(3)
    ]
    try:
        assert [live(c) for c in channels] == ["live", "live", "UNAVAILABLE"]
        channels[0].close()

        def room_again() -> bool:  # (gRPC core hears of the close a moment later)
            fresh = grpc.insecure_channel(running.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(fresh)
            return live(fresh) == "live"

        wait_for(room_again)
    finally:
        for c in channels:
            c.close()
