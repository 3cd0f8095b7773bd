"""Models and helpers for the route tests: classifiers that share one signature (features FP32
[-1, 4] -> probabilities FP32 [-1, 3]), one that fails on purpose, and one that does not fit."""

from __future__ import annotations

import os

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from onnx import TensorProto, helper, numpy_helper

from batchgate.demo import _model, _save, classifier_model, identity_model, mlp_model

# The route of the example: the unit, fuzz and chart tests start from it.
EXAMPLE_ROUTE = {
    "name": "fraud",
    "variants": [
        {"name": "stable", "model": "fraud_v1", "version": "3", "weight": 90},
        {"name": "canary", "model": "fraud_v2", "weight": 10},
    ],
    "sticky_key": "header:x-user-id",
    "shadows": [{"name": "next", "model": "fraud_v3", "percent": 20, "max_inflight": 8}],
    "compare": {"output": "probabilities", "kind": "classification", "atol": 1.0e-3},
    "rollout": {
        "canary": "canary",
        "baseline": "stable",
        "steps": [10, 25, 50, 100],
        "interval_s": 300,
        "min_requests": 500,
        "gates": {"max_error_rate": 0.01, "max_p99_ratio": 1.25, "max_disagreement": 0.05},
        "on_fail": "rollback",
    },
}
FEATURES = np.full((1, 4), 0.1, np.float32)  # the failing model answers these
POISON = np.ones((1, 4), np.float32)  # and fails on these


def failing_classifier(seed: int = 0):
    """The classifier's signature; fails (ONNX Runtime error: INTERNAL) on any row whose largest
    feature is 1 or more: the logits are reshaped to a width of 3 + floor(max(features)), which
    does not divide them. Zeros (the warm-up) and small features answer."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([1], np.int64), "one_shape"),
        numpy_helper.from_array(np.array([3], np.int64), "three"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["z"]),
        helper.make_node("Add", ["z", "B"], ["logits"]),
        helper.make_node("ReduceMax", ["features"], ["m"], keepdims=0),
        helper.make_node("Floor", ["m"], ["f"]),
        helper.make_node("Cast", ["f"], ["fi"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["fi", "one_shape"], ["fi1"]),
        helper.make_node("Add", ["fi1", "three"], ["width"]),
        helper.make_node("Concat", ["minus_one", "width"], ["shape"], axis=0),
        helper.make_node("Reshape", ["logits", "shape"], ["r"]),
        helper.make_node("Softmax", ["r"], ["probabilities"], axis=-1),
    ]
    g = helper.make_graph(
        nodes,
        "failing_classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    return _model(g)


def route_repository(root: str) -> str:
    """clf_a and clf_same answer alike; clf_other differs; clf_bad fails on POISON; mlp and
    strings take other inputs; sq_nan and sq_abs (features -> y) differ only where sq_nan
    answers NaN; emb_100, emb_100b and emb_10 (ids -> y) refuse ids past their table."""
    os.makedirs(root, exist_ok=True)
    cfg = "max_batch_size: 8\n"
    _save(classifier_model(seed=0), root, "clf_a", config=cfg)
    _save(classifier_model(seed=0), root, "clf_same", config=cfg)
    _save(classifier_model(seed=7), root, "clf_other", config=cfg)
    _save(failing_classifier(seed=0), root, "clf_bad", config=cfg)
    _save(mlp_model(sizes=(4, 8, 3)), root, "mlp", config=cfg)
    _save(identity_model("strings"), root, "strings", config=cfg)
    _save(identity_model("strings_b"), root, "strings_b", config=cfg)
    _save(slow_classifier(), root, "clf_slow", config=cfg)
    _save(sqrt_model(), root, "sq_nan", config=cfg)
    _save(sqrt_model(absolute=True), root, "sq_abs", config=cfg)
    for name, vocab in (("emb_100", 100), ("emb_100b", 100), ("emb_10", 10)):
        _save(embedding_model(vocab), root, name, config=cfg)
    return root


def write_config(path: str, routes: list[dict], **sections) -> str:
    with open(path, "w") as f:
        yaml.safe_dump({"routes": routes, **sections}, f)
    return path


def infer_http(url: str, model: str, features=FEATURES, headers=None, parameters=None):
    """(result, the response's HTTP headers) of one HTTP infer."""
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("features", list(features.shape), "FP32")
    inp.set_data_from_numpy(features)
    result = client.infer(model, [inp], headers=headers, parameters=parameters)
    return result, result._result.get("parameters", {})


def infer_grpc(url: str, model: str, features=FEATURES, headers=None, parameters=None):
    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("features", list(features.shape), "FP32")
    inp.set_data_from_numpy(features)
    result = client.infer(model, [inp], headers=headers, parameters=parameters)
    resp = result.get_response()
    return result, {k: v.string_param for k, v in resp.parameters.items()}


def slow_classifier(width: int = 2048, layers: int = 6, seed: int = 0):
    """The classifier's signature, tens of milliseconds a call on one thread: a shadow that
    cannot keep up with its primary."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, width)) / 2).astype(np.float32), "W_in"),
        numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal((width, 3)) / np.sqrt(width)).astype(np.float32), "W_out"),
    ]
    nodes = [helper.make_node("MatMul", ["features", "W_in"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "W"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("MatMul", [f"h{layers}", "W_out"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    g = helper.make_graph(
        nodes,
        "slow_classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    return _model(g)


def sqrt_model(absolute: bool = False):
    """features FP32 [-1, 4] -> y = sqrt(features) (NaN where a feature is negative), or with
    ``absolute`` sqrt(|features|) (a number there): a regression answered with NaN."""
    nodes = [helper.make_node("Sqrt", ["a" if absolute else "features"], ["y"])]
    if absolute:
        nodes.insert(0, helper.make_node("Abs", ["features"], ["a"]))
    g = helper.make_graph(
        nodes,
        "sqrt",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return _model(g)


def embedding_model(vocab: int):
    """ids INT64 [-1, 3] -> y FP32 [-1, 2]: the sum of the ids' rows of a [vocab, 2] table; ONNX
    Runtime refuses an id past the table (INVALID_ARGUMENT: the caller's 400)."""
    table = numpy_helper.from_array(np.arange(vocab * 2, dtype=np.float32).reshape(vocab, 2), "T")
    axis = numpy_helper.from_array(np.array([1], np.int64), "axis")
    g = helper.make_graph(
        [
            helper.make_node("Gather", ["T", "ids"], ["rows"], axis=0),
            helper.make_node("ReduceSum", ["rows", "axis"], ["y"], keepdims=0),
        ],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [table, axis],
    )
    return _model(g)


def metric(text: str, name: str, **labels) -> float:
    """The value of one series in a /metrics page (0 when absent)."""
    for line in text.splitlines():
        if not labels and line.startswith(name + " "):  # a series without labels
            return float(line.rsplit(" ", 1)[1])
        if not line.startswith(name + "{"):
            continue
        got = dict(kv.split("=", 1) for kv in line[len(name) + 1 : line.index("}")].split(","))
        if all(got.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def labeller_model(classes: tuple[str, ...] = ("cat", "dog", "eel")):
    """features FP32 [-1, 4] -> label BYTES [-1]: the name of each row's largest of the first
    three features (a classifier that answers its class as text, as skl2onnx's string labels)."""
    inits = [
        numpy_helper.from_array(np.array(list(classes), dtype=object), "classes"),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([3], np.int64), "end"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
    ]
    nodes = [
        helper.make_node("Slice", ["features", "start", "end", "axis"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["index"], axis=1, keepdims=0),
        helper.make_node("Gather", ["classes", "index"], ["label"], axis=0),
    ]
    g = helper.make_graph(
        nodes,
        "labeller",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("label", TensorProto.STRING, ["batch"])],
        inits,
    )
    return _model(g)


def two_output_classifier(seed: int = 0):
    """The classifier (features -> probabilities) that also answers its logits: a client may ask
    for either output alone."""
    model = classifier_model(seed=seed)
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]))
    return model
