"""A gRPC stream reads at most max_stream_inflight requests ahead of the answers it has written
(issue: safe to expose): a client that floods a stream waits on flow control instead of the
server queueing everything it sends."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
from protocol_support import QUICK
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchgate.demo import _save, slow_model

CONFIG = """max_batch_size: 8
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""
SENT = 40


def request(i: int) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="slow", id=f"s{i}")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 256])
    req.raw_input_contents.append(np.ones((1, 256), np.float32).tobytes())
    return req


def test_a_flooding_stream_is_read_no_further_ahead_than_the_bound(tmp_path, serve):
    _save(slow_model(width=256, layers=400), str(tmp_path), "slow", config=CONFIG)
    # (no shedding for the queue's expected wait, which a slow model's answers on a busy machine
    # can trigger: in a run beside heavy load a few of the 40 came back with errors; this test
    # looks at reading alone)
    running = serve(str(tmp_path), max_stream_inflight=4, queue_target_ms=0, max_queue_wait_ms=0, **QUICK)
    served = running.gateway.repository.resolve("slow", "")
    most = 0
    done = threading.Event()

    def watch():
        nonlocal most
        while not done.is_set():
            most = max(most, served.in_flight)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with grpc.insecure_channel(running.grpc_url) as channel:
        answers = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            (request(i) for i in range(SENT)), timeout=120
        )
        answered = list(answers)
    ids = [a.infer_response.id for a in answered if not a.error_message]
    errors = [a.error_message for a in answered if a.error_message]
    done.set()
    watcher.join()
    assert sorted(ids) == sorted(f"s{i}" for i in range(SENT)), errors  # every request answered
    assert 1 <= most <= 4, f"{most} requests of one stream were queued at once"
    assert served.stats.as_dict()["inference_count"] == SENT


def _stream(running, requests, timeout: float = 120):
    with grpc.insecure_channel(running.grpc_url) as channel:
        return list(
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=timeout)
        )


def test_a_lone_stream_faster_than_its_model_is_slowed_not_refused(tmp_path, serve):
    """One client streaming faster than its model answers overloads only itself: its requests
    wait for its own earlier ones and are all answered, in order, none refused or counted as
    refused. Until 2026-12-06 the stream's read-ahead (max_stream_inflight) queued more work
    than queue_target_ms allows and the stream refused its own requests (found by a re-check:
    5% of 2,000 tiny requests, a third of 1 MB ones, with no other client)."""
    _save(slow_model(width=256, layers=200), str(tmp_path), "slow", config=CONFIG)
    # a tight standing-queue rule (1 ms, judged over 10 ms) that 16 requests read ahead pass at once
    running = serve(str(tmp_path), max_stream_inflight=16, queue_target_ms=1, queue_interval_ms=10)
    sent = 120
    answered = _stream(running, (request(i) for i in range(sent)))
    assert [a.error_message for a in answered if a.error_message] == []
    assert [a.infer_response.id for a in answered] == [f"s{i}" for i in range(sent)]
    text = urllib.request.urlopen(running.metrics_url).read().decode()
    refused = [
        line for line in text.splitlines() if line.startswith("batchgate_refusals_total{") and not line.endswith(" 0.0")
    ]
    assert refused == []
    served = running.gateway.repository.resolve("slow", "")
    assert served.stats.as_dict()["inference_count"] == sent


def test_a_stream_request_with_nothing_ahead_of_it_is_still_refused_at_once(tmp_path, serve):
    """The wait is only for the stream's own earlier requests: with none in flight, a request
    past an admission limit is refused at once and counted, as a unary call is."""
    _save(slow_model(width=256, layers=200), str(tmp_path), "slow", config=CONFIG)
    running = serve(str(tmp_path), max_inflight_requests=1)
    dp = running.gateway.dataplane
    served = dp.admit("slow")  # the process's one slot, taken
    try:
        answered = _stream(running, [request(0), request(1)], timeout=30)
    finally:
        dp.release(served)
    assert [a.error_message.endswith("(max_inflight_requests)") for a in answered] == [True, True]
    text = urllib.request.urlopen(running.metrics_url).read().decode()
    assert 'batchgate_refusals_total{model="slow",reason="inflight_limit",version="1"} 2.0' in text
