"""Where executions run: a model measured faster than inline_execution_max_us runs on the
event loop; a slower one, or any model with the threshold at 0, stays on worker threads.
Answers are the same either way."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto

from batchgate.demo import _save, identity_model, slow_model


def _call(running, model, x, n):
    c = grpcclient.InferenceServerClient(running.grpc_url)
    outs = []
    for _ in range(n):
        inp = grpcclient.InferInput("INPUT" if model == "tiny" else "input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        r = c.infer(model, [inp])
        outs.append(r.as_numpy("OUTPUT" if model == "tiny" else "output"))
    return outs


@pytest.fixture
def repo(tmp_path):
    _save(identity_model("tiny", TensorProto.FLOAT, ("batch", 4)), str(tmp_path), "tiny", config="max_batch_size: 8\n")
    # ~25 M multiply-adds a row: milliseconds, far past the threshold below even on many cores
    path = _save(slow_model(width=1024, layers=24), str(tmp_path), "slow", config="max_batch_size: 8\n")
    return str(tmp_path), path


def test_a_tiny_model_moves_onto_the_loop_and_a_slow_one_does_not(repo, serve):
    root, slow_path = repo
    # 300 µs, not the default 50: the identity runs in ~5 µs, but on a busy 2-core test machine
    # the fastest of 16 runs measured on a thread has come out past 50 µs (the runs stayed off).
    running = serve(root, inline_execution_max_us=300)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    outs = _call(running, "tiny", x, 100)
    assert all(np.array_equal(o, x) for o in outs)
    tiny = running.gateway.repository.resolve("tiny", "")
    # The first 16 executions are timed on worker threads; once the moving average settles
    # under the threshold, the rest run inline.
    assert tiny.execution.inline_runs >= 50
    y = np.ones((1, 1024), np.float32)
    got = _call(running, "slow", y, 20)
    want = ort.InferenceSession(slow_path, providers=["CPUExecutionProvider"]).run(None, {"input": y})[0]
    assert all(np.allclose(g, want, rtol=1e-5) for g in got)
    assert running.gateway.repository.resolve("slow", "").execution.inline_runs == 0


def test_threshold_zero_keeps_every_execution_on_worker_threads(repo, serve):
    running = serve(repo[0], inline_execution_max_us=0, one_core_turn_us=0)  # (no loop turns on one core)
    x = np.ones((1, 4), np.float32)
    _call(running, "tiny", x, 30)
    served = running.gateway.repository.resolve("tiny", "")
    assert served.execution.inline_runs == 0 and served.stats.execution_count == 30


def test_a_turn_with_many_requests_admitted_runs_them_on_threads_and_one_alone_runs_inline(repo, serve):
    """A tiny model runs inline while requests come one at a time; when a loop turn admits more
    than INLINE_MAX_ADMITTED at once (many connections sending together), its executions go to
    the inference threads, where they run together between the loop's turns. Answers are the
    same either way."""
    import json
    import socket

    from batchgate import execution

    running = serve(repo[0], inline_execution_max_us=300, one_core_turn_us=0)  # (threads even on one core)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    _call(running, "tiny", x, 40)  # timed, then inline
    tiny = running.gateway.repository.resolve("tiny", "")
    inline_before, runs_before = tiny.execution.inline_runs, tiny.stats.execution_count
    assert inline_before >= 20

    body = json.dumps({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 4], "data": x.ravel().tolist()}]})
    request = (
        f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    host, port = running.http_url.split(":")
    many = 8 * execution.INLINE_MAX_ADMITTED
    for _ in range(10):  # bursts: the requests of many connections read in one turn (most times)
        socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(many)]
        for s in socks:
            s.sendall(request)
        for s in socks:
            got = b""
            while b"\r\n\r\n" not in got or not got.endswith(b"]}]}"):
                more = s.recv(65536)
                assert more, got
                got += more
            assert (
                got.startswith(b"HTTP/1.1 200")
                and json.loads(got.partition(b"\r\n\r\n")[2])["outputs"][0]["data"] == x.ravel().tolist()
            )
            s.close()
    on_threads = (tiny.stats.execution_count - runs_before) - (tiny.execution.inline_runs - inline_before)
    assert on_threads > 0, "every execution of the bursts ran inline"
    inline_now = tiny.execution.inline_runs
    _call(running, "tiny", x, 10)  # one at a time again: inline
    assert tiny.execution.inline_runs == inline_now + 10


def test_a_shape_never_timed_runs_on_a_thread_even_where_others_run_inline(tmp_path, serve):
    """Executions are timed per batch size and input shapes: a model timed fast on short inputs
    ran a caller's long one on the loop too, while its batch size was the same (timed per batch
    size alone), holding every other caller for as long as that run took."""
    _save(identity_model("seq", TensorProto.FLOAT, ("batch", "n")), str(tmp_path), "seq", config="max_batch_size: 8\n")
    running = serve(str(tmp_path), inline_execution_max_us=300)
    short = np.arange(4, dtype=np.float32).reshape(1, 4)
    c = grpcclient.InferenceServerClient(running.grpc_url)

    def call(x):
        inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return c.infer("seq", [inp]).as_numpy("OUTPUT")

    for _ in range(40):
        call(short)
    seq = running.gateway.repository.resolve("seq", "")
    inline_before = seq.execution.inline_runs
    assert inline_before >= 20  # (timed on threads, then inline: as the first test here)
    long = np.linspace(-1, 1, 4_000_000, dtype=np.float32).reshape(1, -1)
    np.testing.assert_array_equal(call(long), long)
    assert seq.execution.inline_runs == inline_before  # its shape never timed: on a thread
    np.testing.assert_array_equal(call(short), short)
    assert seq.execution.inline_runs == inline_before + 1  # the short one still inline
