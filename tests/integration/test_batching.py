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
from gateway_support import gather_model

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
    _save(
        slow_model(width=1024, layers=128),
        str(tmp_path),
        "slow",
        config="max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 2 } }\n",
    )
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
    _save(
        slow_model(width=1024, layers=384), str(tmp_path), "slow", config="max_batch_size: 64\ndynamic_batching { }\n"
    )
    running = serve(str(tmp_path), inline_execution_max_us=0)
    big = np.ones((64, 1024), np.float32)  # tens of milliseconds of work: the instance is busy
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(_infer, grpcclient, running.grpc_url, "slow", "input", big)
        end = time.monotonic() + 10
        while running.gateway.dataplane.in_flight == 0 and time.monotonic() < end:  # wait until it runs
            time.sleep(0.001)
        c = grpcclient.InferenceServerClient(running.grpc_url)
        inp = grpcclient.InferInput("input", [1, 1024], "FP32")
        inp.set_data_from_numpy(np.ones((1, 1024), np.float32))
        with pytest.raises(InferenceServerException) as e:
            c.infer("slow", [inp], client_timeout=0.04)
        assert "DEADLINE_EXCEEDED" in e.value.status()
        busy.result(30)
    time.sleep(0.1)
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("slow")["model_stats"][0]
    assert stats["execution_count"] == 1 and stats["inference_count"] == 64  # only the busy request ran
    assert stats["inference_stats"]["fail"]["count"] == 1


def test_a_failing_execution_fails_only_its_batch_and_the_model_serves_on(tmp_path, serve):
    _save(gather_model(), str(tmp_path), "gather", config="max_batch_size: 8\ndynamic_batching { }\n")
    _save(slow_model(width=1024, layers=192), str(tmp_path), "slow", config="max_batch_size: 64\n")
    running = serve(str(tmp_path), inline_execution_max_us=0)

    def call(i):
        c = grpcclient.InferenceServerClient(running.grpc_url)
        inp = grpcclient.InferInput("idx", [1, 1], "INT64")
        inp.set_data_from_numpy(np.array([[i]], np.int64))
        try:
            return float(c.infer("gather", [inp]).as_numpy("out")[0, 0])
        except InferenceServerException as e:
            return e.status()

    assert call(3) == 30.0
    # alone in its batch: only it fails, and as the caller's mistake (ONNX Runtime's
    # INVALID_ARGUMENT: the index is past the table), not as the server's (it was INTERNAL / 500)
    assert call(99) == "StatusCode.INVALID_ARGUMENT"
    inp = httpclient.InferInput("idx", [1, 1], "INT64")
    inp.set_data_from_numpy(np.array([[-11]], np.int64))
    with pytest.raises(InferenceServerException) as e:
        httpclient.InferenceServerClient(running.http_url).infer("gather", [inp])
    assert e.value.status() == "400" and "must be within the inclusive range [-10,9]" in e.value.message()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, [1, 2, 4, 5, 6, 7, 8, 9]))
    assert results == [10.0, 20.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("gather")["model_stats"][0]
    assert stats["inference_stats"]["fail"]["count"] == 2
    assert stats["inference_stats"]["success"]["count"] == 9


def test_a_cancelled_queued_request_is_never_executed(tmp_path, serve):
    _save(
        slow_model(width=1024, layers=192), str(tmp_path), "slow", config="max_batch_size: 64\ndynamic_batching { }\n"
    )
    running = serve(str(tmp_path), inline_execution_max_us=0)
    big = np.ones((64, 1024), np.float32)
    client = grpcclient.InferenceServerClient(running.grpc_url)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(_infer, grpcclient, running.grpc_url, "slow", "input", big)
        end = time.monotonic() + 10
        while running.gateway.dataplane.in_flight == 0 and time.monotonic() < end:
            time.sleep(0.001)
        inp = grpcclient.InferInput("input", [1, 1024], "FP32")
        inp.set_data_from_numpy(np.ones((1, 1024), np.float32))
        answers = []
        ctx = client.async_infer("slow", [inp], callback=lambda result, error: answers.append(error))
        end = time.monotonic() + 10
        served = running.gateway.repository.resolve("slow", "")
        while served.scheduler.queue_depth == 0 and time.monotonic() < end:
            time.sleep(0.001)
        assert served.scheduler.queue_depth == 1
        ctx.cancel()
        end = time.monotonic() + 10
        while served.scheduler.queue_depth and time.monotonic() < end:
            time.sleep(0.001)
        assert served.scheduler.queue_depth == 0  # it left the queue
        busy.result(30)
    time.sleep(0.1)
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("slow")["model_stats"][0]
    assert stats["execution_count"] == 1 and stats["inference_count"] == 64


def _raw_infer(http_url: str):
    """One JSON infer request of the 'slow' model written on a socket of its own (returned open)."""
    import json
    import socket

    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 1024], "datatype": "FP32", "data": [1.0] * 1024}]}
    ).encode()
    host, port = http_url.split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    return sock


def test_an_http_client_that_disconnects_while_queued_is_never_executed(tmp_path, serve):

    _save(
        slow_model(width=1024, layers=192), str(tmp_path), "slow", config="max_batch_size: 64\ndynamic_batching { }\n"
    )
    running = serve(str(tmp_path), inline_execution_max_us=0)
    big = np.ones((64, 1024), np.float32)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(_infer, grpcclient, running.grpc_url, "slow", "input", big)
        end = time.monotonic() + 10
        while running.gateway.dataplane.in_flight == 0 and time.monotonic() < end:
            time.sleep(0.001)
        sock = _raw_infer(running.http_url)
        served = running.gateway.repository.resolve("slow", "")
        end = time.monotonic() + 10
        while served.scheduler.queue_depth == 0 and time.monotonic() < end:
            time.sleep(0.001)
        assert served.scheduler.queue_depth == 1
        sock.close()  # the client goes away while its request waits
        end = time.monotonic() + 10
        while served.scheduler.queue_depth and time.monotonic() < end:
            time.sleep(0.005)
        assert served.scheduler.queue_depth == 0
        busy.result(30)
    time.sleep(0.1)
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("slow")["model_stats"][0]
    assert stats["execution_count"] == 1 and stats["inference_count"] == 64


def test_an_http_client_gone_while_its_body_decodes_is_never_executed(tmp_path, serve, monkeypatch):
    """A client that closes its connection while its (large) body is decoded on a thread: the
    request must not reach the model, even with an instance idle to run it at once. The real
    decoder runs, only later (so the close lands while it works)."""

    from batchgate.transport import http_codec

    _save(slow_model(width=1024, layers=8), str(tmp_path), "slow")
    running = serve(str(tmp_path), inline_execution_max_us=0)
    _infer(httpclient, running.http_url, "slow", "input", np.ones((1, 1024), np.float32))
    executions = lambda: httpclient.InferenceServerClient(running.http_url).get_inference_statistics("slow")[  # noqa: E731
        "model_stats"
    ][0]["execution_count"]
    before = executions()
    decoded = threading.Event()
    real = http_codec.decode_request

    def decode_later(*args, **kwargs):
        time.sleep(0.5)  # on its thread: the client goes away meanwhile
        try:
            return real(*args, **kwargs)
        finally:
            decoded.set()

    monkeypatch.setattr(http_codec, "DECODE_ON_LOOP_MAX_BYTES", 0)  # every body on a thread
    monkeypatch.setattr(http_codec, "decode_request", decode_later)
    sock = _raw_infer(running.http_url)
    time.sleep(0.1)  # read whole, decoding
    sock.close()
    assert decoded.wait(10)
    time.sleep(0.3)  # what the loop does with it after the decode
    monkeypatch.undo()
    assert executions() == before
    assert running.gateway.dataplane.in_flight == 0  # released all the same


def test_http_requests_that_wait_leave_no_cyclic_garbage(tmp_path, serve):
    """An HTTP request that waits for its answer, as every answered one does under overload,
    must be freed when answered, not left for the cyclic collector: the disconnect watch that
    each request waiting over 20 ms used to get left its task, its cancellation and its frames
    in a reference cycle (thousands a second under overload: gen-0 collections 9x gRPC's).
    Whatever an HTTP request leaves in a cycle shows here as a frame of the HTTP transport."""
    import gc

    _save(slow_model(width=1024, layers=192), str(tmp_path), "slow")
    running = serve(str(tmp_path), inline_execution_max_us=0)
    x = np.ones((1, 1024), np.float32)
    _infer(httpclient, running.http_url, "slow", "input", x)  # loaded, warmed
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, not freed
    try:
        with ThreadPoolExecutor(6) as pool:  # six at once: each waits behind the others
            list(pool.map(lambda _: _infer(httpclient, running.http_url, "slow", "input", x), range(12)))
        gc.collect()
        ours = [
            o.f_code.co_filename
            for o in gc.garbage
            if type(o).__name__ == "frame" and "/transport/http" in o.f_code.co_filename
        ]
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
    assert ours == []


def test_each_model_can_choose_its_policy(tmp_path, serve):
    for name in ("a", "b"):
        _save(classifier_model(), str(tmp_path), name, config=BATCHED)
    running = serve(str(tmp_path), model_batching_policy=("b=work_conserving",))
    repo = running.gateway.repository
    assert repo.resolve("a", "").scheduler.config.policy == "triton"
    assert repo.resolve("b", "").scheduler.config.policy == "work_conserving"


def _wait(cond, what, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _metric(url: str, name: str, model: str) -> float:
    import urllib.request

    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {model} not exported")


def test_a_stream_a_unary_call_and_http_share_one_queue_and_one_batch(tmp_path, serve):
    # The batch goes only when full (3 rows) or after 5 s: three callers over three transports
    # answered quickly in one execution can only have met in one queue.
    _save(
        classifier_model(),
        str(tmp_path),
        "clf",
        config="max_batch_size: 3\ndynamic_batching { max_queue_delay_microseconds: 5000000 }\n",
    )
    running = serve(str(tmp_path), inline_execution_max_us=0)
    served = running.gateway.repository.resolve("clf", "")
    ref = ort.InferenceSession(
        _save(classifier_model(), str(tmp_path / "ref"), "clf"), providers=["CPUExecutionProvider"]
    )
    xs = [np.full((1, 4), v, np.float32) for v in (1.0, 2.0, 3.0)]
    streamed = []
    stream_client = grpcclient.InferenceServerClient(running.grpc_url)
    stream_client.start_stream(callback=lambda result, error: streamed.append(error or result))
    inp = grpcclient.InferInput("features", [1, 4], "FP32")
    inp.set_data_from_numpy(xs[0])
    stream_client.async_stream_infer("clf", [inp])
    with ThreadPoolExecutor(2) as pool:
        unary = pool.submit(_infer, grpcclient, running.grpc_url, "clf", "features", xs[1])
        _wait(lambda: served.scheduler.queue_depth == 2, "two queued requests")
        time.sleep(0.05)
        assert _metric(running.metrics_url, "batchgate_queue_depth", "clf") == 2
        assert _metric(running.metrics_url, "batchgate_queue_oldest_age_seconds", "clf") >= 0.05
        http = pool.submit(_infer, httpclient, running.http_url, "clf", "features", xs[2])
        outs = [unary.result(4).as_numpy("probabilities"), http.result(4).as_numpy("probabilities")]
    _wait(lambda: streamed, "the streamed answer", 4)
    stream_client.stop_stream()
    assert not isinstance(streamed[0], InferenceServerException), streamed[0]
    outs.insert(0, streamed[0].as_numpy("probabilities"))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out, ref.run(None, {"features": x})[0], rtol=1e-5)
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("clf")["model_stats"][0]
    assert stats["execution_count"] == 1 and stats["inference_count"] == 3
    assert [b["batch_size"] for b in stats["batch_stats"]] == [3]
    queue = stats["inference_stats"]["queue"]
    assert queue["count"] == 3 and queue["ns"] >= 50_000_000  # the first two waited >= 50 ms
    assert _metric(running.metrics_url, "batchgate_queue_depth", "clf") == 0


def test_the_v2_priority_parameter_orders_the_queue(tmp_path, serve):
    _save(
        slow_model(width=1024, layers=192),
        str(tmp_path),
        "slow",
        config="max_batch_size: 64\ndynamic_batching { priority_levels: 2 default_priority_level: 2 "
        "preferred_batch_size: 1 }\n",
    )
    running = serve(str(tmp_path), inline_execution_max_us=0)
    served = running.gateway.repository.resolve("slow", "")
    x = np.ones((1, 1024), np.float32)
    finished = []

    def call(tag, priority, rows=1):
        c = grpcclient.InferenceServerClient(running.grpc_url)
        inp = grpcclient.InferInput("input", [rows, 1024], "FP32")
        inp.set_data_from_numpy(np.ones((rows, 1024), np.float32))
        c.infer("slow", [inp], priority=priority)
        finished.append(tag)

    with ThreadPoolExecutor(3) as pool:
        busy = pool.submit(call, "busy", 0, 64)  # keeps the one instance busy for a while
        _wait(lambda: running.gateway.dataplane.in_flight == 1 and served.scheduler.queue_depth == 0, "the busy batch")
        low = pool.submit(call, "low", 0)  # 0: the default level, 2 (the lower)
        _wait(lambda: served.scheduler.queue_depth == 1, "the low-priority request queued")
        high = pool.submit(call, "high", 1)
        _wait(lambda: served.scheduler.queue_depth == 2, "both queued")
        for f in (busy, low, high):
            f.result(30)
    assert finished == ["busy", "high", "low"]  # each went alone (preferred size 1), highest first
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("input", [1, 1024], "FP32")
    inp.set_data_from_numpy(x)
    c.infer("slow", [inp], priority=3)  # a level the model does not have: its default, as on Triton


def test_a_request_whose_values_fail_the_batch_fails_alone(tmp_path, serve):
    """Text that is not UTF-8 cannot go into the ONNX string tensor: the batch it was merged into
    fails, and then each request runs again alone, so only that caller gets the error (which
    names its own element, not one of the merged batch)."""
    from batchgate.demo import identity_model

    _save(
        identity_model(),
        str(tmp_path),
        "strid",
        config="max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 300000 }\n",
    )
    running = serve(str(tmp_path), inline_execution_max_us=0)

    def call(value: bytes):
        c = grpcclient.InferenceServerClient(running.grpc_url)
        inp = grpcclient.InferInput("INPUT", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[value]], dtype=object))
        try:
            return c.infer("strid", [inp]).as_numpy("OUTPUT")
        except InferenceServerException as e:
            return e

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, v) for v in (b"hello", b"\xff", b"world", b"ok")]
        results = [f.result() for f in futures]
    assert [r.tolist() for r in (results[0], results[2], results[3])] == [[[b"hello"]], [[b"world"]], [[b"ok"]]]
    bad = results[1]
    assert isinstance(bad, InferenceServerException) and "element 0 is not UTF-8" in bad.message()


PREFERRED_4 = (
    "max_batch_size: 16\ndynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 5000000 }\n"
)


def test_a_batch_at_or_past_the_largest_preferred_size_goes_without_waiting_the_delay(tmp_path, serve):
    """As Triton forms batches: with preferred_batch_size [4] and a 5 s delay, one request of 5 or
    8 rows goes at once; of two 3-row requests, 3 + 3 would pass 4, so the first goes at once and
    the second waits its own delay (nothing preferred can be formed with it), as a lone 3-row
    request does. (Before, only a batch of exactly 4 or 16 rows went before the delay.)"""
    for name in ("pref", "lone"):
        _save(classifier_model(), str(tmp_path), name, config=PREFERRED_4)
    running = serve(str(tmp_path), inline_execution_max_us=0)

    def timed(model, rows):
        start = time.monotonic()
        _infer(grpcclient, running.grpc_url, model, "features", np.ones((rows, 4), np.float32))
        return time.monotonic() - start

    assert timed("pref", 5) < 2.5
    assert timed("pref", 8) < 2.5
    with ThreadPoolExecutor(3) as pool:
        pair = [pool.submit(timed, "pref", 3) for _ in range(2)]
        lone = pool.submit(timed, "lone", 3)
        first, second = sorted(f.result(30) for f in pair)
        alone = lone.result(30)
    assert first < 2.5  # cut before the request that would pass 4 rows
    assert second >= 4.0 and alone >= 4.0  # 3 rows: nothing preferred can be formed; the delay


def test_a_queue_that_fills_max_batch_size_is_still_cut_at_the_largest_preferred_size(tmp_path, serve):
    """As Triton's batcher walks its queue: with preferred_batch_size [4] and max_batch_size 8,
    requests of 3, 3 and 2 rows queued behind a busy instance are not sent as one batch of 8 (a
    size no preferred size names) because they happen to fill max_batch_size: the batch is cut
    before the request that would take it past 4 rows, so 3, then 3, then 2."""
    _save(
        slow_model(width=1024, layers=384),
        str(tmp_path),
        "slow",
        config="max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4 ] }\n",
    )
    running = serve(str(tmp_path), inline_execution_max_us=0)
    served = running.gateway.repository.resolve("slow", "")
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(_infer, grpcclient, running.grpc_url, "slow", "input", np.ones((8, 1024), np.float32))
        _wait(lambda: running.gateway.dataplane.in_flight == 1 and served.scheduler.queue_depth == 0, "the busy batch")
        queued = []
        for depth, rows in enumerate((3, 3, 2), 1):
            x = np.ones((rows, 1024), np.float32)
            queued.append(pool.submit(_infer, grpcclient, running.grpc_url, "slow", "input", x))
            _wait(lambda d=depth: served.scheduler.queue_depth == d, f"{depth} queued")
        for f in [busy, *queued]:
            f.result(30)
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("slow")["model_stats"][0]
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert sizes == {8: 1, 3: 2, 2: 1}, sizes


def test_a_config_with_more_priority_levels_than_are_kept_is_refused_at_load(tmp_path, serve):
    """The queue keeps a list per priority level and walks them all for each request: a config
    asking for a million levels (or 2^40: the memory of the whole server) fails its load with
    the reason, instead of loading a model whose every request walks a million empty lists."""
    _save(
        classifier_model(),
        str(tmp_path),
        "many",
        config="max_batch_size: 4\ndynamic_batching { priority_levels: 1000000 default_priority_level: 1 }\n",
    )
    few = BATCHED.replace("{ ", "{ priority_levels: 3 default_priority_level: 2 ")
    _save(classifier_model(), str(tmp_path), "few", config=few)
    running = serve(str(tmp_path))
    index = {m["name"]: m for m in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert index["few"]["state"] == "READY"
    assert index["many"]["state"] == "UNAVAILABLE"
    assert "priority_levels" in index["many"]["reason"] and "1000000" in index["many"]["reason"]


def test_each_priority_level_takes_its_own_queue_policy(tmp_path, serve):
    """priority_queue_policy: a level's own max_queue_size and queue timeout, as on Triton (until
    2026-12-06 the load logged that it was not acted on and every level took
    default_queue_policy). Level 2 holds one waiting request; level 1 waits at most 1 ms."""
    _save(
        slow_model(width=1024, layers=192),
        str(tmp_path),
        "slow",
        config="max_batch_size: 64\ndynamic_batching { priority_levels: 2 default_priority_level: 2 "
        "preferred_batch_size: 1 priority_queue_policy { key: 2 value { max_queue_size: 1 } } "
        "priority_queue_policy { key: 1 value { default_timeout_microseconds: 1000 } } }\n",
    )
    _save(
        slow_model(width=8, layers=1),
        str(tmp_path),
        "odd",
        config="max_batch_size: 4\ndynamic_batching { priority_levels: 2 default_priority_level: 1 "
        "priority_queue_policy { key: 3 value { max_queue_size: 1 } } }\n",
    )
    running = serve(str(tmp_path), inline_execution_max_us=0)
    index = {m["name"]: m for m in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert index["odd"]["state"] == "UNAVAILABLE" and "level 3" in index["odd"]["reason"], index["odd"]
    served = running.gateway.repository.resolve("slow", "")

    def call(priority, rows=1):
        c = grpcclient.InferenceServerClient(running.grpc_url)
        inp = grpcclient.InferInput("input", [rows, 1024], "FP32")
        inp.set_data_from_numpy(np.ones((rows, 1024), np.float32))
        return c.infer("slow", [inp], priority=priority).as_numpy("output").shape[0]

    with ThreadPoolExecutor(3) as pool:
        # keeps the one instance busy for a while; at level 2 (level 1's 1 ms queue timeout could
        # refuse it on a loaded machine before it was dispatched)
        busy = pool.submit(call, 2, 64)
        _wait(lambda: running.gateway.dataplane.in_flight == 1 and served.scheduler.queue_depth == 0, "the busy batch")
        low = pool.submit(call, 0)  # the default level, 2
        _wait(lambda: served.scheduler.queue_depth == 1, "one level-2 request queued")
        with pytest.raises(InferenceServerException) as full:
            call(2)
        assert full.value.status() == "StatusCode.RESOURCE_EXHAUSTED", full.value
        assert "priority level 2 is full" in full.value.message()
        with pytest.raises(InferenceServerException) as late:
            call(1)  # its level is not full, but it waits past its 1 ms behind the busy batch
        assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED", late.value
        assert "queue timeout" in late.value.message()
        assert busy.result(30) == 64 and low.result(30) == 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_lone_request_given_less_time_than_the_delay_is_answered(tmp_path, serve, protocol):
    """With max_queue_delay 2 s, a lone request whose V2 timeout is 1 s had waited the delay
    out and expired (504 / DEADLINE_EXCEEDED every time): its batch now leaves in time."""
    _save(
        classifier_model(),
        str(tmp_path),
        "clf",
        config="max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 2000000 }\n",
    )
    running = serve(str(tmp_path))
    mod, url = (grpcclient, running.grpc_url) if protocol == "grpc" else (httpclient, running.http_url)
    c = mod.InferenceServerClient(url)
    x = np.ones((1, 4), np.float32)
    inp = mod.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = c.infer("clf", [inp], timeout=1_000_000)  # microseconds: the V2 timeout parameter
    assert out.as_numpy("probabilities").shape == (1, 3)


def test_requests_still_queued_when_an_unload_gives_up_waiting_are_refused_not_run_on_the_closed_model(tmp_path, serve):
    """Three requests wait out a 20 s delay; an unload waits exit_timeout_s for them, then closes
    the model. They stayed queued, went to the closed session when the delay ended, and were
    answered INTERNAL "'NoneType' object is not callable". They are now answered UNAVAILABLE."""
    config = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 20000000 }\n"
    _save(classifier_model(), str(tmp_path), "clf", config=config)
    running = serve(str(tmp_path), model_control_mode="explicit", load_model=("*",), exit_timeout_s=0.05)
    served = running.gateway.repository.resolve("clf", "")
    answers: list = []

    def call(i):
        try:
            mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
            _infer(mod, url, "clf", "features", np.ones((1, 4), np.float32))
            answers.append("ok")
        except InferenceServerException as e:
            answers.append((e.status(), e.message()))

    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(call, i) for i in range(3)]
        _wait(lambda: served.scheduler.queue_depth == 3, "three requests queued")
        httpclient.InferenceServerClient(running.http_url).unload_model("clf")
        for c in calls:
            c.result(timeout=10)  # (before the fix: answered only when the 20 s delay ended)
    assert sorted(a[0] for a in answers) == ["503", "503", "StatusCode.UNAVAILABLE"], answers
    assert all("unloaded or replaced while this request was queued" in a[1] for a in answers), answers
    assert served.scheduler.queue_depth == 0 and served.stats.execution_count == 0
