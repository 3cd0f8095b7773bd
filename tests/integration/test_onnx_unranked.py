"""ONNX models whose input types carry no shape at all (the rank is not declared: the graph takes
a tensor of any rank). ONNX Runtime reports such a tensor's shape as [], as for a true scalar;
served so, every request but a scalar was refused, and a config that gave the dims and batched
failed its load (the run on zeros was fed a scalar, and its output had no rows)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from batchgate.demo import _model

BATCHED = """max_batch_size: 4
input [{ name: "X" data_type: TYPE_FP32 dims: [ 3 ] }]
output [{ name: "Y" data_type: TYPE_FP32 dims: [ 3 ] }]
"""
WHOLE = """max_batch_size: 0
input [{ name: "X" data_type: TYPE_FP32 dims: [ -1, -1 ] }]
"""


def _relu(shape) -> onnx.ModelProto:
    """Y = Relu(X); ``shape`` None: the types have no shape (checker refuses that on a graph input,
    ONNX Runtime takes it)."""
    return _model(
        helper.make_graph(
            [helper.make_node("Relu", ["X"], ["Y"])],
            "unranked",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)],
        )
    )


def _put(repo: str, name: str, model: onnx.ModelProto, config: str | None) -> str:
    os.makedirs(os.path.join(repo, name, "1"))
    path = os.path.join(repo, name, "1", "model.onnx")
    onnx.save(model, path)
    if config is not None:
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(config)
    return path


def _both(running, model: str, x: np.ndarray) -> list[np.ndarray]:
    got = []
    for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
        inp = mod.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got.append(mod.InferenceServerClient(url).infer(model, [inp]).as_numpy("Y"))
    return got


def test_an_input_of_undeclared_rank_takes_the_configs_dims(tmp_path, serve):
    repo = str(tmp_path)
    path = _put(repo, "batched", _relu(None), BATCHED)
    _put(repo, "whole", _relu(None), WHOLE)
    running = serve(repo)
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["batched"]["state"] == "READY", rows["batched"]
    assert rows["whole"]["state"] == "READY", rows["whole"]
    meta = httpclient.InferenceServerClient(running.http_url).get_model_metadata("batched")
    assert meta["inputs"][0]["shape"] == [-1, 3]
    direct = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    want = direct.run(None, {"X": x})[0]
    for got in _both(running, "batched", x):
        np.testing.assert_array_equal(got, want)
    wide = np.linspace(-2, 2, 10, dtype=np.float32).reshape(2, 5)
    for got in _both(running, "whole", wide):
        np.testing.assert_array_equal(got, direct.run(None, {"X": wide})[0])


def test_an_input_of_undeclared_rank_without_dims_fails_the_load_saying_so(tmp_path, serve):
    """Without a config there is nothing to serve it by: the load says to give its dims, rather than
    serving a scalar the model never asked for. A true scalar (a declared shape of []) serves."""
    repo = str(tmp_path)
    _put(repo, "unranked", _relu(None), None)
    _put(repo, "scalar", _relu([]), None)
    running = serve(repo)
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["unranked"]["state"] == "UNAVAILABLE"
    assert "input 'X' has no shape in the ONNX file" in rows["unranked"]["reason"]
    assert "config.pbtxt" in rows["unranked"]["reason"]
    assert rows["scalar"]["state"] == "READY"
    for got in _both(running, "scalar", np.array(-2.5, np.float32)):
        assert got.shape == () and got == 0
