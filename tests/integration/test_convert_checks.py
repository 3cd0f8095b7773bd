"""Converters: what the parity check alone cannot see, and how it is told."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

import convert_models  # tests/convert_models.py
from batchgate.converters import ConversionError, Tolerance, convert_torch


def infer(url: str, model: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    inputs = []
    for name, arr in feeds.items():
        i = grpcclient.InferInput(name, list(arr.shape), "FP32")
        i.set_data_from_numpy(arr)
        inputs.append(i)
    return grpcclient.InferenceServerClient(url).infer(model, inputs).as_numpy("output")


def test_a_model_mixing_the_rows_of_its_batch_is_refused_for_batching(tmp_path):
    """The original and the ONNX model agree on every batch, yet with dynamic batching a caller's
    answer would depend on the requests batched with it: refused unless converted with --no-batch."""
    repo = tmp_path / "models"
    with pytest.raises(ConversionError, match="'output' is not computed row by row.*--no-batch"):
        convert_torch(convert_models.CentredOnTheBatch(), ["x:FP32:-1,4"], str(repo), "c", exporter="legacy")
    assert not (repo / "c").exists()
    r = convert_torch(
        convert_models.CentredOnTheBatch(), ["x:FP32:5,4"], str(repo), "c", batched=False, exporter="legacy"
    )
    assert r.written
    # a model computed row by row passes, and the figures are recorded
    r = convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", exporter="legacy")
    record = json.loads((repo / "m" / "1" / "conversion.json").read_text())
    assert record["batch_rows_alone"]["rows"] == 5 and record["batch_rows_alone"]["max_abs"]["output"] < 1e-4


def test_inputs_named_after_forward_parameters_reach_them_whatever_their_order(tmp_path, serve):
    """Inputs went to forward() by position: `--input b --input a` for forward(a, b) was served
    computing b - a, and the parity check, calling the model the same way, agreed."""
    repo = tmp_path / "models"
    r = convert_torch(convert_models.Difference(), ["b:FP32:-1,3", "a:FP32:-1,3"], str(repo), "d", exporter="legacy")
    assert [i["name"] for i in r.inputs] == ["b", "a"]  # the config keeps the order given
    a, b = np.full((2, 3), 5.0, np.float32), np.full((2, 3), 2.0, np.float32)
    assert infer(serve(str(repo)).grpc_url, "d", {"a": a, "b": b}).tolist() == (a - b).tolist()
    # a parameter left out and a keyword-only one: passed by keyword (the dynamo exporter here)
    other = tmp_path / "other"
    convert_torch(convert_models.Scaled(), ["scale:FP32:-1,3", "x:FP32:-1,3"], str(other), "s", exporter="dynamo")
    assert infer(serve(str(other)).grpc_url, "s", {"scale": a, "x": b}).tolist() == (a * b).tolist()
    # some inputs named after parameters, one of them at another's place: refused, naming both
    with pytest.raises(
        ConversionError, match=r"input 'b' would be passed to forward\(\) as its argument 1 \(parameter 'a'\)"
    ):
        convert_torch(convert_models.Difference(), ["b:FP32:-1,3", "c:FP32:-1,3"], str(repo), "bad", exporter="legacy")
    assert not (repo / "bad").exists()


def test_an_embedding_of_few_rows_is_converted_with_samples_of_its_indices(tmp_path, serve):
    """Generated integer inputs were 0-9 whatever --samples held: a model embedding 3 kinds failed
    on them before any check, and could not be converted at all."""
    repo, samples = tmp_path / "models", tmp_path / "rows.npz"
    specs = ["kind:INT64:-1,1", "x:FP32:-1,2"]
    with pytest.raises(ConversionError, match="if kind take.s. some values only.*--samples"):
        convert_torch(convert_models.KindEmbedding(), specs, str(repo), "k", exporter="legacy")
    kind = np.array([[0], [2], [1], [2]])
    np.savez(samples, kind=kind, x=np.ones((4, 2), np.float32))
    r = convert_torch(convert_models.KindEmbedding(), specs, str(repo), "k", samples=str(samples), exporter="legacy")
    assert r.written and r.checks[0].cases == 4  # three generated sets (of kinds 0-2) and the samples
    x = np.full((4, 2), 0.5, np.float32)
    inputs = [grpcclient.InferInput("kind", [4, 1], "INT64"), grpcclient.InferInput("x", [4, 2], "FP32")]
    inputs[0].set_data_from_numpy(kind)
    inputs[1].set_data_from_numpy(x)
    got = grpcclient.InferenceServerClient(serve(str(repo)).grpc_url).infer("k", inputs).as_numpy("output")
    with torch.no_grad():
        want = convert_models.KindEmbedding()(torch.from_numpy(kind), torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_optimize_and_fp16_of_a_model_in_fp16_already(tmp_path, serve):
    """--optimize saved ONNX Runtime's CPU casts around FP16 kernels it lacks, and --fp16 then
    made a model that could not load ("ONNX Runtime cannot run the model"): nothing to convert,
    the model is checked as it is."""
    repo = tmp_path / "models"
    tol = Tolerance(1e-2, 1e-2)
    r = convert_torch(
        convert_models.half_mlp(), ["x:FP16:-1,4"], str(repo), "h", exporter="legacy", optimize=tol, fp16=tol
    )
    assert r.written and r.stages == ["onnx", "optimized", "fp16"] and all(c.ok for c in r.checks)
    assert [(t["name"], t["datatype"]) for t in r.inputs + r.outputs] == [("x", "FP16"), ("output", "FP16")]
    record = json.loads((repo / "h" / "1" / "conversion.json").read_text())
    assert record["fp16_conversion"].startswith("none")
    x = np.linspace(-1, 1, 8, dtype=np.float16).reshape(2, 4)
    feed = grpcclient.InferInput("x", [2, 4], "FP16")
    feed.set_data_from_numpy(x)
    got = grpcclient.InferenceServerClient(serve(str(repo)).grpc_url).infer("h", [feed]).as_numpy("output")
    with torch.no_grad():
        want = convert_models.half_mlp()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-2, atol=1e-2)
