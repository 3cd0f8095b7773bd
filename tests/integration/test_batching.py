"""The dynamic batcher behind real clients: requests from gRPC and HTTP share batches,
each caller gets its own rows, a full queue is refused, an expired deadline never runs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.demo import _save, classifier_model, slow_model

BATCHED = "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n"


def _infer(mod, url, model, name, x):
    c = mod.InferenceServerClient(url)
    inp = mod.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return c.infer(model, [inp])


@pytest.mark.parametrize("policy", ["triton", "work_conserving"])
def test_concurrent_callers_share_executions_and_get_their_own_rows(tmp_path, serve, policy):
    path = _save(classifier_model(), str(tmp_path), "clf", config=BATCHED)
    running = serve(str(tmp_path), batching_policy=policy, inline_execution_max_us=0)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(64)]

    def call(i):
        mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
        return _infer(mod, url, "clf", "features", xs[i]).as_numpy("probabilities")

    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(call, range(64)))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out, ref.run(None, {"features": x})[0], rtol=1e-5)
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("clf")["model_stats"][0]
    assert stats["inference_count"] == sum(len(x) for x in xs)
    assert stats["inference_stats"]["success"]["count"] == 64
    assert stats["execution_count"] < 64  # requests shared executions
    assert any(b["batch_size"] > 3 for b in stats["batch_stats"])


def test_a_full_queue_is_refused_with_429_and_resource_exhausted(tmp_path, serve):
    _save(slow_model(width=1024, layers=128), str(tmp_path), "slow",
          config="max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 2 } }\n")
    running = serve(str(tmp_path))
    x = np.ones((1, 1024), np.float32)
    outcomes = []
    lock = threading.Lock()

    def call(i):
        mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
        try:
            _infer(mod, url, "slow", "input", x)
            r = "ok"
        except InferenceServerException as e:
            r = e.status()
        with lock:
            outcomes.append(r)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(16)))
    assert "ok" in outcomes
    assert {"429", "StatusCode.RESOURCE_EXHAUSTED"} <= set(outcomes), outcomes
    import urllib.request

    text = urllib.request.urlopen(running.metrics_url).read().decode()
    refused = outcomes.count("429") + outcomes.count("StatusCode.RESOURCE_EXHAUSTED")
    assert f'batchgate_refusals_total{{model="slow",reason="queue_full",version="1"}} {refused}.0' in text
    assert 'batchgate_batch_size_bucket{le="1",model="slow",version="1"}' in text


def test_a_request_whose_deadline_passes_in_the_queue_is_never_executed(tmp_path, serve):
    _save(slow_model(width=1024, layers=192), str(tmp_path), "slow",
          config="max_batch_size: 64\ndynamic_batching { }\n")
    running = serve(str(tmp_path), inline_execution_max_us=0)
    big = np.ones((64, 1024), np.float32)  # tens of milliseconds of work: the instance is busy
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(_infer, grpcclient, running.grpc_url, "slow", "input", big)
        end = time.monotonic() + 10
        while running.gateway.in_flight == 0 and time.monotonic() < end:  # wait until it runs
            time.sleep(0.001)
        c = grpcclient.InferenceServerClient(running.grpc_url)
        inp = grpcclient.InferInput("input", [1, 1024], "FP32")
        inp.set_data_from_numpy(np.ones((1, 1024), np.float32))
        with pytest.raises(InferenceServerException) as e:
            c.infer("slow", [inp], client_timeout=0.02)
        assert "DEADLINE_EXCEEDED" in e.value.status()
        busy.result(30)
    time.sleep(0.1)
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("slow")["model_stats"][0]
    assert stats["execution_count"] == 1 and stats["inference_count"] == 64  # only the busy request ran
    assert stats["inference_stats"]["fail"]["count"] == 1
