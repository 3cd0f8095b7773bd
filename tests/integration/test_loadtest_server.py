"""The load-test harness's scripted test server (batchgate.loadtest.testserver), driven by
real tritonclient clients over real sockets: both protocols answer the echo, the workers
rule and the one stall hold, errors map right, and the CLI starts and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from batchgate.loadtest.testserver import TestServer

pytestmark = pytest.mark.timeout(30)


@contextlib.contextmanager
def running(**kwargs):
    """A TestServer on its own loop in a thread, so blocking clients can call it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = TestServer(**kwargs)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(20)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def infer_input(mod, arr: np.ndarray, binary: bool = True):
    t = mod.InferInput("INPUT0", list(arr.shape), "FP32")
    if mod in (httpclient, httpclient_aio):
        t.set_data_from_numpy(arr, binary_data=binary)
    else:
        t.set_data_from_numpy(arr)
    return t


def test_grpc_metadata_infer_and_errors():
    with running(model="echo") as s:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{s.grpc_port}")
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("echo")
        assert not c.is_model_ready("nope")
        meta = c.get_model_metadata("echo", as_json=True)
        assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "4"]}]
        config = c.get_model_config("echo").config
        assert config.max_batch_size == 8 and list(config.input[0].dims) == [4]
        assert c.get_server_metadata().name

        x = batch(3)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT0")]
        r = c.infer("echo", [infer_input(grpcclient, x)], outputs=outputs, request_id="a1")
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
        assert r.get_response().id == "a1"

        with pytest.raises(InferenceServerException) as e:
            c.infer("nope", [infer_input(grpcclient, x)])
        assert e.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as e:
            c.get_model_metadata("nope")
        assert e.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as e:
            c.infer("echo", [infer_input(grpcclient, np.zeros((1, 3), np.float32))])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "shape" in e.value.message()
        c.close()

        # typed contents instead of raw_input_contents, straight through the generated stub
        with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            req = pb.ModelInferRequest(
                model_name="echo",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="INPUT0",
                        datatype="FP32",
                        shape=[2, 4],
                        contents=pb.InferTensorContents(fp32_contents=[float(i) for i in range(8)]),
                    )
                ],
            )
            resp = stub.ModelInfer(req)
            assert list(resp.outputs[0].shape) == [2, 4]
            got = np.frombuffer(resp.raw_output_contents[0], "<f4")
            np.testing.assert_array_equal(got, np.arange(8, dtype=np.float32))
            del req.inputs[0].contents.fp32_contents[-1]  # 7 values for a [2, 4] tensor
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        assert s.answered == 2 and s.received == 5 and s.rejected == 3


def test_http_json_binary_and_errors():
    with running(model="m1") as s:
        url = f"127.0.0.1:{s.http_port}"
        c = httpclient.InferenceServerClient(url)
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("m1")
        assert not c.is_model_ready("echo")
        assert c.get_model_metadata("m1")["outputs"][0]["shape"] == [-1, 4]
        assert c.get_model_config("m1")["max_batch_size"] == 8
        x = batch(4, seed=1)
        cases = [  # (binary input, binary output asked: True / False / None for no outputs named)
            (True, True),
            (True, False),
            (False, False),
            (False, None),
            (True, None),  # no outputs named: the client asks binary_data_output
        ]
        for binary_in, binary_out in cases:
            outputs = None if binary_out is None else [httpclient.InferRequestedOutput("OUTPUT0", binary_out)]
            r = c.infer("m1", [infer_input(httpclient, x, binary_in)], outputs=outputs)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
            out = r.get_response()["outputs"][0]
            assert ("binary_data_size" in out.get("parameters", {})) == (binary_out is not False)
            assert ("data" in out) == (binary_out is False)
        r = c.infer("m1", [infer_input(httpclient, x)], request_compression_algorithm="gzip", request_id="z")
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
        assert r.get_response()["id"] == "z"

        with pytest.raises(InferenceServerException) as e:
            c.infer("echo", [infer_input(httpclient, x)])
        assert e.value.status() == "404"
        with pytest.raises(InferenceServerException) as e:
            c.infer("m1", [infer_input(httpclient, np.zeros((9, 4), np.float32))])
        assert e.value.status() == "400"
        c.close()

        # a hand-written JSON request with nested data
        conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=10)
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}]}
        conn.request("POST", "/v2/models/m1/infer", json.dumps(body))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Inference-Header-Content-Length") is None
        assert json.loads(resp.read())["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
        conn.request("POST", "/v2/models/m1/infer", b"{not json")
        resp = conn.getresponse()
        assert resp.status == 400 and "error" in json.loads(resp.read())
        conn.request("GET", "/v2/models/m1/infer")
        resp = conn.getresponse()
        assert resp.status == 405 and "error" in json.loads(resp.read())
        conn.close()
        assert s.answered == 7 and s.rejected == 3


def test_grpc_stream_answers_in_order():
    with running(service_ms=5, workers=2) as s:
        answers: queue.Queue = queue.Queue()
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{s.grpc_port}")
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        sent = {}
        for i in range(8):
            if i == 3:
                c.async_stream_infer("echo", [infer_input(grpcclient, np.zeros((1, 2), np.float32))], request_id="bad")
                continue
            sent[f"r{i}"] = batch(1 + i % 8, seed=i)
            c.async_stream_infer("echo", [infer_input(grpcclient, sent[f"r{i}"])], request_id=f"r{i}")
        got = [answers.get(timeout=10) for _ in range(8)]
        c.stop_stream()
        c.close()
        errors = [e for r, e in got if e is not None]
        assert len(errors) == 1 and "shape" in errors[0].message()
        ids = [r.get_response().id for r, e in got if e is None]
        assert ids == list(sent)  # answered in the order sent
        for r, e in got:
            if e is None:
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), sent[r.get_response().id])


@pytest.mark.parametrize("workers", [1, 2])
def test_service_time_and_workers(workers):
    with running(service_ms=50, workers=workers) as s:

        async def burst():
            g = grpcclient_aio.InferenceServerClient(f"127.0.0.1:{s.grpc_port}")
            h = httpclient_aio.InferenceServerClient(f"127.0.0.1:{s.http_port}")
            try:
                x = batch(2)
                t0 = time.monotonic()
                calls = [g.infer("echo", [infer_input(grpcclient_aio, x)]) for _ in range(2)]
                calls += [h.infer("echo", [infer_input(httpclient_aio, x)]) for _ in range(2)]
                results = await asyncio.gather(*calls)
                for r in results:
                    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
                return time.monotonic() - t0
            finally:
                await g.close()
                await h.close()

        elapsed = asyncio.run(burst())
        assert s.answered == 4
        services = sorted(s.services, key=lambda v: v.started)
        assert all(v.ended - v.started >= 0.045 for v in services)
        # never more than `workers` in service at once
        for v in services:
            assert sum(1 for w in services if w.started <= v.started < w.ended) <= workers
        assert elapsed >= 4 / workers * 0.05 - 0.01, elapsed
        assert elapsed < 4 / workers * 0.05 + 1.5, elapsed


def test_stall_holds_everything_once():
    # First request at t0: served [t0, t0 + 0.2] plus the stall [t0 + 0.1, t0 + 0.5] -> ends ~t0 + 0.6.
    with running(service_ms=200, stall_at_s=0.1, stall_s=0.4) as s:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{s.grpc_port}")
        h = httpclient.InferenceServerClient(f"127.0.0.1:{s.http_port}")
        x = batch(1)
        done = {}

        def first():
            c.infer("echo", [infer_input(grpcclient, x)])
            done["first"] = time.monotonic()

        t = threading.Thread(target=first)
        t.start()
        while s.first_request_at is None:
            time.sleep(0.005)
        t0 = s.first_request_at
        stall_begin, stall_end = s.stall_window
        assert stall_begin == pytest.approx(t0 + 0.1) and stall_end == pytest.approx(t0 + 0.5)

        time.sleep(max(0.0, t0 + 0.25 - time.monotonic()))  # inside the stall
        r = h.infer("echo", [infer_input(httpclient, x)])  # queued behind the frozen first one
        second = time.monotonic()
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
        t.join(10)
        assert done["first"] >= t0 + 0.6 - 0.01  # 0.2 s of service plus the 0.4 s stall
        assert second >= done["first"] and second >= t0 + 0.8 - 0.01
        assert all(v.ended >= stall_end for v in s.services)

        # only once: afterwards a request takes just its service time
        t1 = time.monotonic()
        c.infer("echo", [infer_input(grpcclient, x)])
        assert time.monotonic() - t1 < 0.2 + 0.3
        assert s.answered == 3
        c.close()
        h.close()


def test_cli_ready_line_serves_and_exits_on_sigterm():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "batchgate.loadtest.testserver", "--service-ms", "1", "--model", "cli"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        m = re.fullmatch(r"testserver ready: HTTP on 127\.0\.0\.1:(\d+), gRPC on 127\.0\.0\.1:(\d+)\n", line)
        assert m, (line, p.stderr.read() if p.poll() is not None else "")
        http_port, grpc_port = int(m[1]), int(m[2])
        x = batch(2)
        with httpclient.InferenceServerClient(f"127.0.0.1:{http_port}") as h:
            np.testing.assert_array_equal(h.infer("cli", [infer_input(httpclient, x)]).as_numpy("OUTPUT0"), x)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as g:
            np.testing.assert_array_equal(g.infer("cli", [infer_input(grpcclient, x)]).as_numpy("OUTPUT0"), x)
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert p.stdout.read() == ""  # exactly one line on stdout
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
