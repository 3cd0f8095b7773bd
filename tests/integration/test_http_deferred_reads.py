"""On one core, while a model sheds load, an HTTP infer request admitted from its request line
alone is parsed in a turn of the event loop (transport/http_defer.py): it is answered as any
other, each request of a burst gets exactly one answer (its answer or a 429), and an admission
taken for a request that never reaches the app (its client gone first) is given back."""

from __future__ import annotations

import json
import socket
import time

import pytest

from batchgate.demo import build_demo_repository
from batchgate.transport import http_defer

BODY = {
    "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    ]
}


def _request(k: int) -> bytes:
    """An infer request for ``simple`` whose INPUT1 is all ``k``: OUTPUT0 = range(16) + k."""
    body = json.loads(json.dumps(BODY))
    body["inputs"][1]["data"] = [k] * 16
    data = json.dumps(body).encode()
    head = (
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(data)
    )
    return head + data


def _answers(s: socket.socket, n: int) -> list[tuple[int, bytes]]:
    """``n`` answers read from ``s``: (status, body)."""
    s.settimeout(10)
    got, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in got:
            more = s.recv(65536)
            assert more, (out, got[:200])
            got += more
        head, _, rest = got.partition(b"\r\n\r\n")
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
        while len(rest) < length:
            more = s.recv(65536)
            assert more, (out, head)
            rest += more
        out.append((int(head.split()[1]), rest[:length]))
        got = rest[length:]
    return out


def _output0(body: bytes) -> list[int]:
    return next(o["data"] for o in json.loads(body)["outputs"] if o["name"] == "OUTPUT0")


@pytest.fixture
def one_core(tmp_path, serve, monkeypatch):
    """Start a gateway that takes its host for one core (loop turns on), admitting two requests
    at most: it, and a count of the requests parsed in a turn."""
    from batchgate import cores

    parsed: list[int] = []
    real = http_defer.DeferredRead._parse_deferred

    def counted(self):
        parsed.append(1)
        real(self)

    monkeypatch.setattr(http_defer.DeferredRead, "_parse_deferred", counted)
    monkeypatch.setattr(cores, "share", lambda: 1)

    def start(**settings):
        running = serve(build_demo_repository(str(tmp_path / "models")), max_inflight_requests=2, **settings)
        assert running.gateway.threads.turns is not None
        return running, parsed

    return start


def _connections(running, n: int) -> list[socket.socket]:
    host, port = running.http_url.split(":")
    return [socket.create_connection((host, int(port)), timeout=10) for _ in range(n)]


def test_requests_admitted_from_their_request_line_are_parsed_in_a_turn_and_answered(one_core):
    running, parsed = one_core()
    socks = _connections(running, 24)
    try:
        end = time.monotonic() + 20
        statuses: list[int] = []
        while not parsed:  # bursts, until one came while the model was shedding
            assert time.monotonic() < end, statuses
            for k, s in enumerate(socks):
                s.sendall(_request(k))
            for k, s in enumerate(socks):
                ((status, body),) = _answers(s, 1)  # exactly one answer each
                statuses.append(status)
                assert status in (200, 429), (status, body)
                if status == 200:
                    assert _output0(body) == [i + k for i in range(16)]
        assert 429 in statuses and 200 in statuses
        # Two requests in one write: the first admitted from its request line, the second read
        # with it; both answered, in order.
        s = socks[0]
        for _ in range(50):
            before = len(parsed)
            s.sendall(_request(3) + _request(4))
            (a, b) = _answers(s, 2)
            assert a[0] == 200 and _output0(a[1]) == [i + 3 for i in range(16)], a
            assert b[0] in (200, 429), b
            if b[0] == 200:
                assert _output0(b[1]) == [i + 4 for i in range(16)]
            if len(parsed) > before:
                break
            for t in socks[1:]:  # (shedding again: the next pair's first is judged from its line)
                t.sendall(_request(0))
            for t in socks[1:]:
                _answers(t, 1)
    finally:
        for s in socks:
            s.close()
    _serves_two_at_a_time(running)


def test_an_admission_taken_for_a_request_whose_client_left_is_given_back(one_core):
    """The loop is held while clients send a request and leave (FIN). It then reads the
    requests, admits two from their lines and parses one a turn (turns of 1 us here); their
    answers find the clients gone. Each admission is given back, whichever way it ends."""
    running, parsed = one_core(one_core_turn_us=1)
    end = time.monotonic() + 20
    left = 0
    while left < 6:
        assert time.monotonic() < end, (left, len(parsed))
        _shed(running)
        socks = _connections(running, 4)
        running.loop.call_soon_threadsafe(time.sleep, 0.3)  # (the loop held: nothing read)
        time.sleep(0.05)
        before = len(parsed)
        for k, s in enumerate(socks):
            s.sendall(_request(k))
            s.shutdown(socket.SHUT_WR)  # gone before the loop reads anything
        for s in socks:
            s.settimeout(10)
            if s.recv(65536) == b"":  # (no answer: it waited for its turn, found the client gone)
                left += 1
            s.close()
        assert len(parsed) > before
    _serves_two_at_a_time(running)


def _shed(running) -> None:
    """Refusals now, so that the next requests are judged from their request lines."""
    socks = _connections(running, 12)
    try:
        for k, s in enumerate(socks):
            s.sendall(_request(k))
        statuses = [_answers(s, 1)[0][0] for s in socks]
        assert set(statuses) <= {200, 429}, statuses
    finally:
        for s in socks:
            s.close()


def _serves_two_at_a_time(running) -> None:
    """Nothing stays admitted: with two admissions at most, one request after another is served
    every time (a leaked admission would refuse them, two would refuse all)."""
    time.sleep(1.1)  # (past the shedding: each request is judged the usual way)
    (s,) = _connections(running, 1)
    try:
        for k in range(20):
            s.sendall(_request(k))
            ((status, body),) = _answers(s, 1)
            assert status == 200, body
        assert running.gateway.dataplane.admission.inflight == 0
    finally:
        s.close()


def test_a_request_admitted_from_its_line_leaves_the_queue_when_its_client_goes(tmp_path, serve, monkeypatch):
    """Its client gone while it waits in the model's queue, it leaves the queue and is never
    run, as a request parsed the usual way does."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import tritonclient.grpc as grpcclient

    from batchgate import cores
    from batchgate.demo import _save, slow_model

    monkeypatch.setattr(cores, "share", lambda: 1)
    parsed: list[int] = []
    real = http_defer.DeferredRead._parse_deferred
    monkeypatch.setattr(http_defer.DeferredRead, "_parse_deferred", lambda self: (parsed.append(1), real(self)))
    config = "max_batch_size: 64\ndynamic_batching { }\n"
    _save(slow_model(width=1024, layers=192), str(tmp_path), "slow", config=config)
    running = serve(str(tmp_path), inline_execution_max_us=0, max_inflight_requests=2)
    served = running.gateway.repository.resolve("slow", "")
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1024], "datatype": "FP32", "data": [1.0] * 1024}]})
    request = (
        b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
    )

    def until(cond, what) -> None:
        end = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < end, what
            time.sleep(0.002)

    def infer_big():
        i = grpcclient.InferInput("input", [64, 1024], "FP32")
        i.set_data_from_numpy(np.ones((64, 1024), np.float32))
        return grpcclient.InferenceServerClient(running.grpc_url).infer("slow", [i], client_timeout=60)

    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(infer_big)  # (runs for a second or more: the others queue behind it)
        until(lambda: running.gateway.dataplane.admission.inflight == 1, "the big request admitted")
        first, second = _connections(running, 2)
        first.sendall(request)  # admitted: the second of two
        until(lambda: served.scheduler.queue_depth == 1, "the first queued")
        second.sendall(request)  # refused: the model sheds, and requests are judged from their line
        assert _answers(second, 1)[0][0] == 429
        first.close()  # (leaves the queue: admitted the usual way, registered with its connection)
        until(lambda: served.scheduler.queue_depth == 0, "the first gone from the queue")
        (third,) = _connections(running, 1)
        third.sendall(request)  # admitted from its request line, parsed in a turn, queued
        until(lambda: served.scheduler.queue_depth == 1, "the third queued")
        assert parsed
        third.close()
        until(lambda: served.scheduler.queue_depth == 0, "the third gone from the queue")
        assert not busy.done()  # (it left the queue, not ended its wait behind the big one)
        busy.result(60)
        second.close()
    until(lambda: running.gateway.dataplane.admission.inflight == 0, "every admission released")
    import tritonclient.http as httpclient

    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("slow")["model_stats"][0]
    assert (stats["execution_count"], stats["inference_count"]) == (1, 64), stats  # the big one alone ran
