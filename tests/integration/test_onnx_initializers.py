"""ONNX initializers that the graph also lists as inputs (ONNX Runtime's overridable
initializers): a config may serve one as an optional input, as Triton's ONNX Runtime backend
does; a request that sends it runs with its value, one that leaves it out with the model's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from batchgate.demo import _model, _save

BIAS = np.array([1.0, 2.0, 3.0], np.float32)


def bias_model(bias_dims=(3,), bias=BIAS) -> onnx.ModelProto:
    """y = x + bias, with ``bias`` an initializer that is a graph input too (declared ``bias_dims``)."""
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "bias",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, list(bias_dims)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(bias, "bias")],
    )
    return _model(g)


UNBATCHED = """max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 3 ] },
        { name: "bias" data_type: TYPE_FP32 dims: [ 3 ] %s } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
"""
BATCHED = """max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 300000 }
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] },
        { name: "bias" data_type: TYPE_FP32 dims: [ 3 ] optional: true } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


def _call(mod, url, model, x, bias=None):
    c = mod.InferenceServerClient(url)
    inputs = [mod.InferInput("x", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    if bias is not None:
        inputs.append(mod.InferInput("bias", list(bias.shape), "FP32"))
        inputs[1].set_data_from_numpy(bias)
    return c.infer(model, inputs).as_numpy("y")


def _direct(path, x, bias=None):
    feeds = {"x": x} if bias is None else {"x": x, "bias": bias}
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gateway_support import start_gateway

    repo = str(tmp_path_factory.mktemp("repo"))
    paths = {
        "ovr": _save(bias_model(), repo, "ovr", config=UNBATCHED % "optional: true"),
        "ovr_required": _save(bias_model(), repo, "ovr_required", config=UNBATCHED % ""),
        "ovr_auto": _save(bias_model(), repo, "ovr_auto"),
        # a batch dimension on the declared input, so that each request's rows carry their own bias
        "ovr_batched": _save(bias_model(("N", 3), BIAS[None, :]), repo, "ovr_batched", config=BATCHED),
        "ovr_fixed": _save(bias_model(), repo, "ovr_fixed", config=BATCHED),
    }
    running = start_gateway(repo, inline_execution_max_us=0)
    yield running, paths
    running.stop()


@pytest.mark.parametrize("mod", [grpcclient, httpclient])
def test_a_config_may_serve_an_overridable_initializer_as_an_optional_input(served, mod):
    running, paths = served
    url = running.grpc_url if mod is grpcclient else running.http_url
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    mine = np.array([10.0, 20.0, 30.0], np.float32)
    kept = _call(mod, url, "ovr", x)
    overridden = _call(mod, url, "ovr", x, mine)
    np.testing.assert_array_equal(kept, _direct(paths["ovr"], x))
    np.testing.assert_array_equal(kept, x + BIAS)
    np.testing.assert_array_equal(overridden, _direct(paths["ovr"], x, mine))
    np.testing.assert_array_equal(overridden, x + mine)
    meta = httpclient.InferenceServerClient(running.http_url).get_model_metadata("ovr")
    assert [(i["name"], i["shape"]) for i in meta["inputs"]] == [("x", [-1, 3]), ("bias", [3])]


def test_listed_without_optional_the_load_fails_saying_so_as_on_triton(served):
    running, _ = served
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["ovr_required"]["state"] == "UNAVAILABLE"
    assert "'bias' is an initializer of the model that a request may override" in rows["ovr_required"]["reason"]
    assert "optional: true" in rows["ovr_required"]["reason"]


def test_without_a_config_the_initializer_is_not_an_input(served):
    """As Triton completes a config: the model's inputs only; the initializer keeps its value."""
    running, paths = served
    c = httpclient.InferenceServerClient(running.http_url)
    assert [i["name"] for i in c.get_model_metadata("ovr_auto")["inputs"]] == ["x"]
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(_call(grpcclient, running.grpc_url, "ovr_auto", x), _direct(paths["ovr_auto"], x))
    with pytest.raises(InferenceServerException, match="bias"):
        _call(grpcclient, running.grpc_url, "ovr_auto", x, BIAS)


def test_batched_requests_with_and_without_the_override_never_share_a_batch(served):
    running, paths = served
    rng = np.random.default_rng(0)
    cases = []
    for i in range(8):
        x = rng.standard_normal((1 + i % 2, 3)).astype(np.float32)
        bias = rng.standard_normal((len(x), 3)).astype(np.float32) if i % 2 else None
        cases.append((x, bias))

    def call(case):
        return _call(grpcclient, running.grpc_url, "ovr_batched", *case)

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(call, cases))
    for (x, bias), out in zip(cases, outs):
        np.testing.assert_allclose(out, _direct(paths["ovr_batched"], x, bias), rtol=1e-6)
        np.testing.assert_allclose(out, x + (BIAS if bias is None else bias), rtol=1e-6)
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("ovr_batched")
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 8


def test_an_initializer_without_a_batch_dimension_cannot_be_batched(served):
    running, _ = served
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["ovr_fixed"]["state"] == "UNAVAILABLE"
    assert "first dimension of 'bias' is fixed" in rows["ovr_fixed"]["reason"]
