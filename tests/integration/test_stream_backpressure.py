"""A gRPC stream reads at most max_stream_inflight requests ahead of the answers it has written
(issue: safe to expose): a client that floods a stream waits on flow control instead of the
server queueing everything it sends."""

from __future__ import annotations

import threading
import time

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
