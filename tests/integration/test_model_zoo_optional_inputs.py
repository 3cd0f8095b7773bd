"""Optional inputs of ONNX models: a config may mark optional only what the model can run
without (an initializer it also lists as an input). A graph input with no value of its own,
marked ``optional: true``, loaded and then failed every request that left it out with a 500
quoting ONNX Runtime's internals; now its load fails saying which input and why, as Triton
refuses that config."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto as T
from onnx import helper
from tritonclient.utils import InferenceServerException


def _save(repo, name, config):
    """y = a + b over [N, 2]; b is also an initializer (1, 1) when ``name`` says so."""
    initializers = [helper.make_tensor("b", T.FLOAT, [1, 2], [10.0, 20.0])] if name == "with_default" else []
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", T.FLOAT, ["N", 2]), helper.make_tensor_value_info("b", T.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["N", 2])],
        initializer=initializers,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    os.makedirs(os.path.join(repo, name, "1"))
    onnx.save(m, os.path.join(repo, name, "1", "model.onnx"))
    with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
        f.write(config)


CONFIG = """max_batch_size: 0
input [ { name: "a" data_type: TYPE_FP32 dims: [ -1, 2 ] },
        { name: "b" data_type: TYPE_FP32 dims: [ -1, 2 ] optional: true } ]
"""


def _infer(mod, url, model, **feeds):
    inputs = []
    for name, x in feeds.items():
        i = mod.InferInput(name, list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        inputs.append(i)
    return mod.InferenceServerClient(url).infer(model, inputs).as_numpy("y")


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_an_input_the_model_needs_cannot_be_optional(tmp_path, serve, mod):
    _save(str(tmp_path), "needs_b", CONFIG)
    _save(str(tmp_path), "with_default", CONFIG)
    running = serve(str(tmp_path), model_control_mode="explicit")
    url = running.grpc_url if mod is grpcclient else running.http_url
    c = mod.InferenceServerClient(url)
    with pytest.raises(InferenceServerException) as e:
        c.load_model("needs_b")
    assert "config input 'b' is optional: true, but the model needs it" in e.value.message()
    assert "remove optional: true" in e.value.message()
    assert not c.is_model_ready("needs_b")

    # an initializer the graph lists as an input: optional, the model's value when left out
    c.load_model("with_default")
    a = np.array([[1, 2], [3, 4]], np.float32)
    np.testing.assert_array_equal(_infer(mod, url, "with_default", a=a), a + [10, 20])
    np.testing.assert_array_equal(_infer(mod, url, "with_default", a=a, b=a), a + a)
