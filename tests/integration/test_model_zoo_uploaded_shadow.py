"""A model uploaded with its load (tritonclient's ``load_model(config=, files=)``) as a route's
shadow. The files live in a private directory only while the load reads them; the shadow's own
session (a second one, on one thread) was opened from the file's path afterwards, which was
gone: the route's shadows failed to build (a task's unretrieved exception in the log) and the
shadow got no more copies. The backend now keeps the file it opened, so the shadow runs on
exactly the model the primary session serves."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto as T
from onnx import helper

from route_support import metric, write_config


def _scale(k: float) -> bytes:
    """y = x * k over [N, 2]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", T.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["N", 2])],
        initializer=[helper.make_tensor("k", T.FLOAT, [], [k])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m.SerializeToString()


def _compared(running, want: float, wait_s: float = 10) -> float:
    end = time.monotonic() + wait_s
    while True:
        with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
            got = metric(r.read().decode(), "batchgate_shadow_requests_total", outcome="compared", route="r")
        if got >= want or time.monotonic() > end:
            return got
        time.sleep(0.05)


def _route_with_a_shadow(tmp_path, serve):
    """A gateway with route 'r': variant 'main' (y = x), shadow 'next' (y = 2x), both loaded."""
    repo = tmp_path / "models"
    for name, k in (("main", 1.0), ("next", 2.0)):
        os.makedirs(repo / name / "1")
        (repo / name / "1" / "model.onnx").write_bytes(_scale(k))
    routes = [
        {
            "name": "r",
            "variants": [{"name": "main", "model": "main", "weight": 100}],
            "shadows": [{"name": "next", "model": "next", "percent": 100, "max_inflight": 8}],
            "compare": {"output": "y", "kind": "regression", "atol": 1e-3},
        }
    ]
    config = write_config(str(tmp_path / "c.yaml"), routes)
    running = serve(str(repo), config_file=config, model_control_mode="explicit", load_model=["main", "next"])
    return running


def test_a_shadow_uploaded_with_its_load_gets_its_copies(tmp_path, serve):
    running = _route_with_a_shadow(tmp_path, serve)
    x = np.ones((1, 2), np.float32)

    def infer(model):
        i = grpcclient.InferInput("x", [1, 2], "FP32")
        i.set_data_from_numpy(x)
        return grpcclient.InferenceServerClient(running.grpc_url).infer(model, [i]).as_numpy("y")

    infer("r")
    before = _compared(running, 1)
    assert before >= 1
    # a new shadow model, sent with the load (over HTTP): the route builds its shadow again
    c = httpclient.InferenceServerClient(running.http_url)
    c.load_model("next", config=json.dumps({"max_batch_size": 4}), files={"file:1/model.onnx": _scale(3.0)})
    np.testing.assert_array_equal(infer("next"), x * 3)
    # Copies picked while the shadow is being built again are skipped, and counted so; once it
    # is built, the new shadow gets its copies (the bug: it never did again).
    sent, end = 1, time.monotonic() + 30
    while _compared(running, before + 4, wait_s=0.2) < before + 4:
        assert time.monotonic() < end, _shadow_lines(running)
        np.testing.assert_array_equal(infer("r"), x)
        sent += 1
    # Every copy has exactly one outcome: none is lost uncounted.
    end = time.monotonic() + 10
    while (counted := _outcomes(running)) != sent:
        assert time.monotonic() < end and counted < sent, (sent, _shadow_lines(running))
        time.sleep(0.05)


def _outcomes(running) -> float:
    """Route 'r''s copies counted under any outcome."""
    with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("batchgate_shadow_requests_total{") and 'route="r"' in line
    )


def _shadow_lines(running) -> str:
    """Every outcome the shadows counted (what a copy that was not compared became instead)."""
    with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return "\n".join(line for line in text.splitlines() if line.startswith("batchgate_shadow_"))


def test_a_shadow_whose_session_does_not_open_is_left_out_and_the_route_serves_on(tmp_path, serve, monkeypatch, caplog):
    """Fault injection (the backend keeps its file now, so the real failure cannot be made here):
    a shadow's second session that fails to open ended the route's rebuild in a task's
    unretrieved exception; now that shadow is left out with a warning and the route serves on."""
    import logging

    from batchgate.backends.onnx import OnnxBackend

    running = _route_with_a_shadow(tmp_path, serve)

    def no_twin(self):
        raise OSError("the second session did not open")

    monkeypatch.setattr(OnnxBackend, "twin", no_twin)
    caplog.set_level(logging.WARNING)
    c = httpclient.InferenceServerClient(running.http_url)
    c.load_model("next", config=json.dumps({"max_batch_size": 4}), files={"file:1/model.onnx": _scale(3.0)})
    x = np.ones((1, 2), np.float32)
    for _ in range(3):
        i = httpclient.InferInput("x", [1, 2], "FP32")
        i.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("r", [i]).as_numpy("y"), x)
    end = time.monotonic() + 10
    while not any("shadow of model 'next' left out" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < end, [r.getMessage() for r in caplog.records]
        time.sleep(0.05)


def test_copies_picked_while_the_shadow_is_built_again_are_counted_as_skipped(tmp_path, serve, monkeypatch):
    """Between a load of the shadow's model and its new session opening, the route's shadow is
    closed; the copies picked then were neither sent nor counted (the flake of the test above:
    3 compared of 5 and no other outcome). They are counted as skipped, and the shadow gets
    its copies again once its session is open."""
    import threading

    from batchgate.backends.onnx import OnnxBackend

    running = _route_with_a_shadow(tmp_path, serve)
    opening, release = threading.Event(), threading.Event()
    twin = OnnxBackend.twin

    def slow_twin(self):
        opening.set()
        release.wait(30)
        return twin(self)

    monkeypatch.setattr(OnnxBackend, "twin", slow_twin)
    c = httpclient.InferenceServerClient(running.http_url)
    c.load_model("next", config=json.dumps({"max_batch_size": 4}), files={"file:1/model.onnx": _scale(3.0)})
    assert opening.wait(30)
    x = np.ones((1, 2), np.float32)

    def infer() -> None:
        i = httpclient.InferInput("x", [1, 2], "FP32")
        i.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("r", [i]).as_numpy("y"), x)

    try:
        for _ in range(3):
            infer()
        with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
            text = r.read().decode()
        skipped = metric(text, "batchgate_shadow_requests_total", outcome="skipped", route="r")
        assert skipped == 3, _shadow_lines(running)
    finally:
        release.set()
    sent, end = 3, time.monotonic() + 30
    while _compared(running, 1, wait_s=0.2) < 1:
        assert time.monotonic() < end, _shadow_lines(running)
        infer()
        sent += 1
    end = time.monotonic() + 10
    while (counted := _outcomes(running)) != sent:
        assert time.monotonic() < end and counted < sent, (sent, _shadow_lines(running))
        time.sleep(0.05)
