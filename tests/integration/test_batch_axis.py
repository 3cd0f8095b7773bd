"""Dynamic batching only where every output's first dimension is the batch.

A model whose output's first dimension is another one (a transpose, a sum over the rows, a
scalar) cannot share executions: cutting the merged output by rows would give one caller
another's data whenever the lengths happen to agree. Auto-completion serves such a model
whole, one request at a time; a config that batches it fails its load saying why. The ONNX
dimension names tell most cases; a run on zeros at load tells the rest.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

BATCHED = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n"


def _graph(nodes, inputs, outputs, opset=13, initializer=()):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, *(t or (TensorProto.FLOAT,)), dims) for n, dims, *t in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n, dims in outputs],
        initializer=list(initializer),
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _transpose(out_dims):
    return _graph([helper.make_node("Transpose", ["x"], ["y"])], [("x", ["N", "M"])], [("y", out_dims)])


def _relu(out_dims):
    return _graph([helper.make_node("Relu", ["x"], ["y"])], [("x", ["N", "M"])], [("y", out_dims)])


def _sum(axes, out_dims):
    node = helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0, **({"axes": axes} if axes else {}))
    return _graph([node], [("x", ["N", "M"])], [("y", out_dims)], opset=11)


MODELS = {
    "transpose": _transpose(["M", "N"]),  # output dims named as the input's: [M, N]
    "colsum": _sum([0], ["M"]),  # a sum over the rows
    # a transpose whose output dims have names of their own (as torch.onnx.export writes with
    # dynamic_axes on the output): only a run tells
    "fresh": _transpose(["a", "b"]),
    "rowwise_fresh": _relu(["a", "M"]),  # rows keep their place, output newly named: a run tells
    "rowwise": _relu(["N", "M"]),
    # two inputs whose first dimensions are named apart: y = a @ b^T, [N, M]
    "pair": _graph(
        [helper.make_node("Transpose", ["b"], ["bt"]), helper.make_node("MatMul", ["a", "bt"], ["y"])],
        [("a", ["N", 3]), ("b", ["M", 3])],
        [("y", ["N", "M"])],
    ),
    "total": _sum(None, []),  # a scalar: no dimension to batch on
    # exported with its batch of one fixed inside (a Reshape to [1, 4], overridable so that no
    # shape inference sees it) though its dims say N
    "one_row": _graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [("x", ["N", 4]), ("shape", [2], TensorProto.INT64)],
        [("y", ["N", 4])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])],
    ),
}


def _save(repo: str, name: str, config: str | None = None) -> None:
    os.makedirs(os.path.join(repo, name, "1"))
    onnx.save(MODELS[name], os.path.join(repo, name, "1", "model.onnx"))
    if config is not None:
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(config)


def _call(mod, url, model, feeds):
    c = mod.InferenceServerClient(url)
    inputs = []
    for name, x in feeds.items():
        i = mod.InferInput(name, list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        inputs.append(i)
    return c.infer(model, inputs).as_numpy("y")


def test_completion_batches_only_models_whose_outputs_follow_the_batch(tmp_path, serve):
    repo = str(tmp_path)
    for name in MODELS:
        _save(repo, name)
    # (bursts of 16 callers: beside heavy load the queue-wait shedding refused one with 429; this
    # test looks at whose rows come back, not at admission)
    running = serve(repo, default_max_batch_size=8, queue_target_ms=0, max_queue_wait_ms=0)
    c = httpclient.InferenceServerClient(running.http_url)
    batches = {name: c.get_model_config(name).get("max_batch_size", 0) for name in MODELS}
    assert batches == {
        "transpose": 0,
        "colsum": 0,
        "fresh": 0,
        "rowwise_fresh": 8,
        "rowwise": 8,
        "pair": 8,  # (inputs named apart, as exporters often write them: a request's share their batch size)
        "total": 0,
        "one_row": 0,
    }
    assert c.get_model_metadata("transpose")["outputs"][0]["shape"] == [-1, -1]

    # Many callers at once, each with its own data, where a batch of two [2, 4] requests would
    # have as many rows as the transposed output: everyone gets exactly their own answer.
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(48)]

    def call(i):
        mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
        model = ("transpose", "fresh", "colsum")[i % 3]
        return model, _call(mod, url, model, {"x": xs[i]})

    with ThreadPoolExecutor(16) as pool:
        for (model, got), x in zip(pool.map(call, range(48)), xs):
            np.testing.assert_array_equal(got, x.sum(axis=0) if model == "colsum" else x.T)
    a, b = np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)
    assert _call(grpcclient, running.grpc_url, "pair", {"a": a, "b": b}).shape == (2, 2)
    # and a model that batches still shares executions, its callers their own rows
    with ThreadPoolExecutor(16) as pool:
        outs = list(
            pool.map(lambda i: _call(httpclient, running.http_url, "rowwise_fresh", {"x": xs[i] - 0.5}), range(48))
        )
    for x, got in zip(xs, outs):
        np.testing.assert_array_equal(got, np.maximum(x - 0.5, 0))


@pytest.mark.parametrize(
    "name,words",
    [
        ("transpose", ["output 'y' has first dimension 'M', dimension 1 of input 'x'", "not the batch"]),
        ("colsum", ["output 'y' has first dimension 'M', dimension 1 of input 'x'"]),
        ("fresh", ["output 'y' has shape [1, 2] for a batch of 2 rows", "not the batch"]),
        ("total", ["output 'y' has shape [] for a batch of 2 rows"]),
    ],
)
@pytest.mark.parametrize("warm_up", [True, False])
def test_a_config_that_batches_a_model_whose_output_is_not_the_batch_fails_its_load(
    tmp_path, serve, name, words, warm_up
):
    _save(str(tmp_path), name, BATCHED)
    _save(str(tmp_path), "rowwise_fresh", BATCHED)
    running = serve(str(tmp_path), model_control_mode="explicit", warm_up=warm_up)
    for mod, url in ((httpclient, running.http_url), (grpcclient, running.grpc_url)):
        c = mod.InferenceServerClient(url)
        with pytest.raises(InferenceServerException) as e:
            c.load_model(name)
        for w in [*words, "max_batch_size is 8", "Set max_batch_size: 0"]:
            assert w in e.value.message(), e.value.message()
        assert not c.is_model_ready(name)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    c.load_model("rowwise_fresh")  # its output follows the batch: loads and batches
    assert c.get_model_config("rowwise_fresh").config.max_batch_size == 8


def test_a_fixed_empty_dimension_keeps_the_run_on_zeros_that_tells_the_batch(tmp_path, serve):
    """An input with a dimension fixed at 0 (an empty state, say) is given 0 there in the run at
    load, not 1: given 1, ONNX Runtime refused the run, and a model whose output the names
    cannot tell was served batched without the check (its callers given each other's rows)."""
    model = _graph(
        [helper.make_node("Transpose", ["x"], ["y"]), helper.make_node("Identity", ["e"], ["eo"])],
        [("x", ["N", "M"]), ("e", ["N", 0])],
        [("y", ["a", "b"]), ("eo", ["N", 0])],
    )
    os.makedirs(os.path.join(tmp_path, "fresh_with_empty", "1"))
    onnx.save(model, os.path.join(tmp_path, "fresh_with_empty", "1", "model.onnx"))
    running = serve(str(tmp_path), default_max_batch_size=8)
    config = httpclient.InferenceServerClient(running.http_url).get_model_config("fresh_with_empty")
    assert config["max_batch_size"] == 0
    xs = [np.arange(8, dtype=np.float32).reshape(2, 4) + 10 * i for i in range(16)]

    def call(i):
        mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
        return _call(mod, url, "fresh_with_empty", {"x": xs[i], "e": np.zeros((2, 0), np.float32)})

    with ThreadPoolExecutor(8) as pool:
        for x, got in zip(xs, pool.map(call, range(16))):
            np.testing.assert_array_equal(got, x.T)
