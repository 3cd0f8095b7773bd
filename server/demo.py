"""Small ONNX models made in code: the demo repository behind ``make serve``,
and the models the tests serve.

- ``simple``: Triton's classic example. INPUT0, INPUT1: INT32 [-1, 16];
  OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1. Has a config.pbtxt.
- ``classifier``: FP32 [-1, 4] -> ``probabilities`` FP32 [-1, 3] (a dense layer and
  softmax, fixed weights). No config.pbtxt: batchgate completes it from the model.
- ``identity_bytes``: BYTES [-1, -1] passed through (strings).
- ``mlp``: FP32 [-1, 256] -> 1024 -> 1024 -> FP32 [-1, 16]; heavy enough that
  batching pays (used by benchmarks, which rely on it not batching: leave its config alone).
- ``mlp_batched``: the same network and weights as ``mlp``, with ``dynamic_batching``: concurrent
  requests wait up to 2 ms to be run together (the README's quick start shows it).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(model: onnx.ModelProto, repo: str, name: str, version: int = 1, config: str | None = None) -> str:
    d = os.path.join(repo, name, str(version))
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.onnx")
    onnx.checker.check_model(model)
    onnx.save(model, path)
    if config is not None:
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(config)
    return path


def _model(graph) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="batchgate")
    m.ir_version = 8
    return m


def simple_model(dtype=TensorProto.INT32, dims=(16,)) -> onnx.ModelProto:
    shape = ["batch", *dims]
    ins = [helper.make_tensor_value_info(n, dtype, shape) for n in ("INPUT0", "INPUT1")]
    outs = [helper.make_tensor_value_info(n, dtype, shape) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return _model(helper.make_graph(nodes, "simple", ins, outs))


SIMPLE_CONFIG = """name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


def classifier_model(seed: int = 0, bias_shift: float = 0.0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = (rng.standard_normal(3) + bias_shift).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["z"]),
        helper.make_node("Add", ["z", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    g = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    return _model(g)


def identity_model(name: str = "identity", dtype=TensorProto.STRING, shape=("batch", "n")) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("Identity", ["INPUT"], ["OUTPUT"])],
        name,
        [helper.make_tensor_value_info("INPUT", dtype, list(shape))],
        [helper.make_tensor_value_info("OUTPUT", dtype, list(shape))],
    )
    return _model(g)


def mlp_model(sizes=(256, 1024, 1024, 16), seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(np.zeros(b, np.float32), f"B{i}")]
        nodes += [
            helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"]),
        ]
        prev = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["output"]))
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    return _model(g)


def slow_model(width: int = 1024, layers: int = 24, seed: int = 0) -> onnx.ModelProto:
    """FP32 [-1, width] -> [-1, width] through ``layers`` dense layers: a model that takes
    milliseconds per call, for tests of queueing and draining."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    nodes, prev = [], "input"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["output"]))
    g = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    return _model(g)


MLP_BATCHED_CONFIG = """max_batch_size: 64
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 16, 32 ]
  max_queue_delay_microseconds: 2000
}
"""


DEMO_MODELS = ("simple", "classifier", "identity_bytes", "mlp", "mlp_batched")


def build_demo_repository(repo: str) -> str:
    os.makedirs(repo, exist_ok=True)
    _save(simple_model(), repo, "simple", config=SIMPLE_CONFIG)
    _save(classifier_model(), repo, "classifier")
    _save(identity_model("identity_bytes"), repo, "identity_bytes", config="max_batch_size: 8\n")
    _save(mlp_model(), repo, "mlp", config="max_batch_size: 64\ninstance_group [ { count: 1 kind: KIND_CPU } ]\n")
    _save(mlp_model(), repo, "mlp_batched", config=MLP_BATCHED_CONFIG)
    return repo
