"""Converters: what the parity check alone cannot see, and how it is told."""

from __future__ import annotations

import json

import pytest

import convert_models  # tests/convert_models.py
from batchgate.converters import ConversionError, convert_torch


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
