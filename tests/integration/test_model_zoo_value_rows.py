"""Models whose outputs' rows follow the input VALUES, not the batch, though every input's first
dimension is dynamic: a detector's NonMaxSuppression ([num_selected, 3] box indices), the
indices of a NonZero, the rows a Compress keeps. The run on zeros at load could not tell them
(zeros keep every row, or select one box an image), so completion batched them: every caller
whose answer had another row count got a 500, and callers that shared a batch got indices into
the merged batch (another caller's image). Now completion serves them whole, one request at a
time, and each caller gets what ONNX Runtime gives for its own request."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto as T
from onnx import helper

BATCHED = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n"


def _model(nodes, inputs, outputs, initializers=(), opset=13):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, d) for n, t, d in inputs],
        [helper.make_tensor_value_info(n, t, d) for n, t, d in outputs],
        initializer=list(initializers),
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _zero(name="zero"):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, T.FLOAT, [], [0.0]))


def _models() -> dict[str, onnx.ModelProto]:
    # a detector's tail: boxes [N, B, 4] and scores [N, 1, B] -> [num_selected, 3] (image, class, box)
    nms = _model(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "keep", "iou"], ["selected"])],
        [("boxes", T.FLOAT, ["N", "B", 4]), ("scores", T.FLOAT, ["N", 1, "B"])],
        [("selected", T.INT64, [None, 3])],
        [helper.make_tensor("keep", T.INT64, [1], [10]), helper.make_tensor("iou", T.FLOAT, [1], [0.5])],
        opset=11,
    )
    # where x >= 0, as [count, 2] (row, column) pairs: zeros keep every row
    positive = _model(
        [
            _zero(),
            helper.make_node("GreaterOrEqual", ["x", "zero"], ["mask"]),
            helper.make_node("NonZero", ["mask"], ["at"]),
            helper.make_node("Transpose", ["at"], ["where"]),
        ],
        [("x", T.FLOAT, ["N", 2])],
        [("where", T.INT64, [None, 2])],
    )
    # the rows whose first value is >= 0, the Compress inside an If's branch (a subgraph)
    keep = helper.make_graph(
        [
            helper.make_node("Gather", ["x", "col"], ["first"], axis=1),
            _zero("z"),
            helper.make_node("GreaterOrEqual", ["first", "z"], ["mask"]),
            helper.make_node("Compress", ["x", "mask"], ["kept"], axis=0),
        ],
        "keep",
        [],
        [helper.make_tensor_value_info("kept", T.FLOAT, None)],
        initializer=[helper.make_tensor("col", T.INT64, [], [0])],
    )
    every = helper.make_tensor_value_info("all", T.FLOAT, None)
    same = helper.make_graph([helper.make_node("Identity", ["x"], ["all"])], "same", [], [every])
    rows = _model(
        [
            helper.make_node("Constant", [], ["on"], value=helper.make_tensor("on", T.BOOL, [], [True])),
            helper.make_node("If", ["on"], ["y"], then_branch=keep, else_branch=same),
        ],
        [("x", T.FLOAT, ["N", 2])],
        [("y", T.FLOAT, [None, 2])],
    )
    # a NonZero that only counts, its output named as the batch: still batched
    counted = _model(
        [
            _zero(),
            helper.make_node("Greater", ["x", "zero"], ["mask"]),
            helper.make_node("NonZero", ["mask"], ["at"]),
            helper.make_node("Shape", ["at"], ["shape"]),
            helper.make_node("Cast", ["shape"], ["n"], to=T.FLOAT),
            helper.make_node("ReduceMax", ["n"], ["most"], keepdims=0),
            helper.make_node("Mul", ["x", "most"], ["y"]),
        ],
        [("x", T.FLOAT, ["N", 2])],
        [("y", T.FLOAT, ["N", 2])],
    )
    return {"nms": nms, "positive": positive, "rows": rows, "counted": counted}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    repo = str(tmp_path_factory.mktemp("value_rows"))
    sessions = {}
    for name, m in _models().items():
        os.makedirs(os.path.join(repo, name, "1"))
        path = os.path.join(repo, name, "1", "model.onnx")
        onnx.save(m, path)
        sessions[name] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return repo, sessions


def _infer(protocol, url, model, feeds):
    mod = grpcclient if protocol == "grpc" else httpclient
    inputs = []
    for name, x in feeds.items():
        i = mod.InferInput(name, list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        inputs.append(i)
    out = mod.InferRequestedOutput(_OUTPUT[model])
    return mod.InferenceServerClient(url).infer(model, inputs, outputs=[out]).as_numpy(_OUTPUT[model])


_OUTPUT = {"nms": "selected", "positive": "where", "rows": "y", "counted": "y"}


def _requests(rng, n):
    """(model, feeds) pairs, one image or a few rows each, their answers' row counts all different."""
    out = []
    for i in range(n):
        model = ("nms", "positive", "rows")[i % 3]
        if model == "nms":
            b = int(rng.integers(1, 5))
            corner = rng.uniform(0, 10, (1, b, 2)).astype(np.float32)
            boxes = np.concatenate([corner, corner + rng.uniform(0.5, 3, (1, b, 2)).astype(np.float32)], axis=2)
            out.append((model, {"boxes": boxes, "scores": rng.random((1, 1, b)).astype(np.float32)}))
        else:
            out.append((model, {"x": rng.standard_normal((int(rng.integers(1, 4)), 2)).astype(np.float32)}))
    return out


def test_value_shaped_outputs_are_not_batched_and_each_caller_gets_its_own_answer(zoo, serve, caplog):
    repo, sessions = zoo
    with caplog.at_level(logging.INFO, logger="batchgate.repository"):
        running = serve(repo, default_max_batch_size=8)
    c = httpclient.InferenceServerClient(running.http_url)
    batches = {name: c.get_model_config(name).get("max_batch_size", 0) for name in sessions}
    assert batches == {"nms": 0, "positive": 0, "rows": 0, "counted": 8}
    said = caplog.text
    assert "output 'selected' may follow the input values (it comes from a NonMaxSuppression)" in said
    assert "(it comes from a NonZero)" in said and "(it comes from a Compress)" in said
    assert c.get_model_metadata("nms")["inputs"][0]["shape"] == [-1, -1, 4]  # the full dims

    requests = _requests(np.random.default_rng(3), 36)

    def call(i):
        model, feeds = requests[i]
        return _infer("grpc" if i % 2 else "http", running.grpc_url if i % 2 else running.http_url, model, feeds)

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(call, range(len(requests))))
    for (model, feeds), answer in zip(requests, got):
        np.testing.assert_array_equal(answer, sessions[model].run(None, feeds)[0])
    x = np.array([[1, -2], [3, 0.5]], np.float32)
    np.testing.assert_array_equal(_infer("grpc", running.grpc_url, "counted", {"x": x}), x * 3)


def test_a_config_that_batches_a_value_shaped_output_loads_with_a_warning(zoo, serve, caplog, tmp_path):
    """The user said the first dimension is the batch, and zeros keep every row: served so (as
    Triton does), with a line saying why callers may fail."""
    repo, _ = zoo
    os.makedirs(tmp_path / "rows" / "1")
    os.link(os.path.join(repo, "rows", "1", "model.onnx"), tmp_path / "rows" / "1" / "model.onnx")
    (tmp_path / "rows" / "config.pbtxt").write_text(BATCHED)
    with caplog.at_level(logging.WARNING, logger="batchgate.repository"):
        running = serve(str(tmp_path))
    assert grpcclient.InferenceServerClient(running.grpc_url).get_model_config("rows").config.max_batch_size == 8
    assert "max_batch_size is 8 but the rows of output 'y' may follow the input values" in caplog.text
