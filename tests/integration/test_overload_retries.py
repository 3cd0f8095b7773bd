"""Retries held at their own rate (``overload_retries_per_s``, issue 12's overload point): a client
that sends again as soon as it is refused, as a closed loop does, takes a turn at that rate as
well as at the refusals' rate, and its connection is left unread until the later; one that comes
back at its own pace, or a gRPC connection that carries several calls at once, is not held as a
retry. 5,000 such HTTP clients took half the core in refusals (bench/overload.py); 5,000 gRPC
ones took all of it (goodput 0.01)."""

from __future__ import annotations

import queue
import socket
import time

import pytest
import tritonclient.grpc as grpcclient
from test_admission import GOOD, finish, head, hold, metrics, refusal_times, response, simple_inputs, wait_for
from tritonclient.utils import InferenceServerException

from batchgate.demo import build_demo_repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return build_demo_repository(str(tmp_path_factory.mktemp("models")))


def retry_holds(running) -> float:
    """``overload_retry_hold`` so far (0 before the first)."""
    line = 'batchgate_http_connections_refused_total{reason="overload_retry_hold"} '
    found = [row for row in metrics(running).splitlines() if row.startswith(line)]
    return float(found[0][len(line) :]) if found else 0.0


def test_a_client_that_retries_at_once_is_held_at_the_retries_rate(repo, serve):
    """A client that sends again as soon as it is refused is held for its turns at
    overload_retries_per_s (here 2 a second), though overload_refusals_per_s (1,000) would answer
    it at once; each such hold counted as overload_retry_hold. A client that comes back at its
    own pace (0.35 s later: more often than the retries' turns come) is answered as it comes."""
    running = serve(repo, max_inflight_requests=1, overload_refusals_per_s=1000, overload_retries_per_s=2)
    held = hold(running)
    times = refusal_times(running, 6)  # 5 retries: the first in the bucket, then turns 0.5 s apart
    assert sum(times) >= 1.2, times
    assert max(times) < 1.5, times  # its turns only
    assert retry_holds(running) >= 3
    before = retry_holds(running)
    host, port = running.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        for _ in range(4):
            s.sendall(head("simple", len(GOOD)) + GOOD)
            assert response(s).startswith(b"HTTP/1.1 429")
            time.sleep(0.35)  # past the retry window (0.25 s) after its refusal
    assert retry_holds(running) == before
    assert finish(held).startswith(b"HTTP/1.1 200")


def grpc_refusal_times(client, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        with pytest.raises(InferenceServerException) as e:
            client.infer("simple", simple_inputs(grpcclient))
        assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", e.value
        times.append(time.monotonic() - t0)
    return times


def test_a_grpc_client_that_retries_at_once_is_held_at_the_retries_rate(repo, serve):
    """The same on the h2 gRPC engine: a channel calling again as soon as it is refused, one call
    at a time, is held at overload_retries_per_s under a grpc_overload_refusals_per_s that would
    answer it at once (5,000 such clients refused at 8,500 a second and answered 1% of capacity).
    A connection that carries two calls at once (here a stream beside the calls) is never taken
    for a retrier: its calls need not follow its answers."""
    running = serve(
        repo, grpc_engine="h2", max_inflight_requests=1, grpc_overload_refusals_per_s=1000, overload_retries_per_s=2
    )
    held = hold(running)
    wait_for(lambda: running.gateway.dataplane.admission.inflight == 1)
    client = grpcclient.InferenceServerClient(running.grpc_url)
    try:
        times = grpc_refusal_times(client, 6)
    finally:
        client.close()
    assert sum(times) >= 1.2, times
    assert max(times) < 1.5, times
    assert retry_holds(running) >= 3
    before = retry_holds(running)
    streamed: queue.Queue = queue.Queue()
    multiplexed = grpcclient.InferenceServerClient(running.grpc_url)
    try:
        multiplexed.start_stream(callback=lambda result, error: streamed.put(error or result))
        multiplexed.async_stream_infer("simple", simple_inputs(grpcclient))  # (its stream stays open)
        streamed.get(timeout=10)
        times = grpc_refusal_times(multiplexed, 6)
    finally:
        multiplexed.stop_stream()
        multiplexed.close()
    assert retry_holds(running) == before, times
    assert finish(held).startswith(b"HTTP/1.1 200")
