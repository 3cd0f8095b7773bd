"""Converters: scikit-learn models besides classifiers and regressors, converted and served or
refused with a reason that names the estimator."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.multioutput import MultiOutputClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from batchgate.converters import ConversionError, convert_sklearn

X = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)


def test_a_transformer_answers_what_transform_gives(tmp_path, serve):
    """A pipeline ending in a transformer has no predict: its conversion stopped on an
    AttributeError and asked for --samples."""
    model = make_pipeline(StandardScaler(), PCA(2)).fit(X)
    r = convert_sklearn(model, ["x:FP32:-1,4"], str(tmp_path), "pca")
    assert r.written and [(o["name"], o["dims"]) for o in r.outputs] == [("variable", [2])]
    x = X[:3]
    feed = grpcclient.InferInput("x", list(x.shape), "FP32")
    feed.set_data_from_numpy(x)
    got = grpcclient.InferenceServerClient(serve(str(tmp_path)).grpc_url).infer("pca", [feed]).as_numpy("variable")
    np.testing.assert_allclose(got, model.transform(x), rtol=1e-3, atol=1e-4)


def test_an_output_that_is_not_a_tensor_is_refused_naming_the_estimator(tmp_path):
    """MultiOutputClassifier's probabilities come as a sequence of tensors: the converter blamed
    a batch dimension and advised --no-batch, which does not help."""
    y = np.stack([X[:, 0] > 0, X[:, 1] > 0], 1).astype(int)
    model = MultiOutputClassifier(LogisticRegression()).fit(X, y)
    with pytest.raises(ConversionError, match="MultiOutputClassifier's output 'probabilities' as a sequence"):
        convert_sklearn(model, ["x:FP32:-1,4"], str(tmp_path), "moc")
    assert not (tmp_path / "moc").exists()


def test_a_dataframe_pipeline_takes_one_input_per_column_numbers_and_strings(tmp_path, serve):
    """A ColumnTransformer picking numeric and string columns by name was refused (one input
    tensor only): each column is an input now, named after it, and served as such."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"amount": rng.standard_normal(60), "age": rng.standard_normal(60)})
    frame["kind"] = rng.choice(["card", "cash", "wire"], 60)
    columns = ColumnTransformer([("num", StandardScaler(), ["amount", "age"]), ("cat", OneHotEncoder(), ["kind"])])
    model = make_pipeline(columns, LogisticRegression()).fit(frame, np.where(frame.amount > 0, "high", "low"))
    specs = ["amount:FP32:-1,1", "age:FP32:-1,1", "kind:BYTES:-1,1"]
    with pytest.raises(ConversionError, match="fit on the DataFrame columns amount, age, kind: give one --input per"):
        convert_sklearn(model, ["amount:FP32:-1,1", "age:FP32:-1,1", "type:BYTES:-1,1"], str(tmp_path), "bad")
    rows = frame[:8]
    samples = tmp_path / "rows.npz"  # (the categories the encoder knows: generated strings are drawn from them)
    np.savez(samples, **{c: rows[[c]].to_numpy().astype(np.float32 if c != "kind" else str) for c in rows})
    r = convert_sklearn(model, specs, str(tmp_path / "models"), "fraud", samples=str(samples))
    assert r.written and all(c.ok and c.cases == 4 for c in r.checks)
    assert [(i["name"], i["datatype"], i["dims"]) for i in r.inputs] == [
        ("amount", "FP32", [1]),
        ("age", "FP32", [1]),
        ("kind", "BYTES", [1]),
    ]
    rows = frame[20:25]
    inputs = []
    for c, dt in (("amount", "FP32"), ("age", "FP32"), ("kind", "BYTES")):
        feed = grpcclient.InferInput(c, [5, 1], dt)
        feed.set_data_from_numpy(rows[[c]].to_numpy().astype(np.float32 if c != "kind" else object))
        inputs.append(feed)
    res = grpcclient.InferenceServerClient(serve(str(tmp_path / "models")).grpc_url).infer("fraud", inputs)
    assert [v.decode() for v in res.as_numpy("label").reshape(-1)] == list(model.predict(rows))
    np.testing.assert_allclose(res.as_numpy("probabilities"), model.predict_proba(rows), rtol=1e-4, atol=1e-5)


def test_an_input_set_left_out_prints_no_onnx_runtime_error(tmp_path):
    """The generated sets an encoder refuses are left out, said in one line: ONNX Runtime also
    printed its own "[E:onnxruntime...] Non-zero status code" line for each, on a conversion that
    succeeds."""
    import pickle
    import subprocess
    import sys

    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder

    x = np.c_[np.arange(40) % 4, X[:, :2]].astype(np.float32)
    columns = ColumnTransformer([("code", OneHotEncoder(), [0]), ("num", StandardScaler(), [1, 2])])
    model = make_pipeline(columns, LogisticRegression()).fit(x, (x[:, 0] > 1).astype(int))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(model))
    np.savez(tmp_path / "rows.npz", x=x[:8])
    done = subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "convert", "sklearn", "--model", str(tmp_path / "m.pkl"),
         "--input", "x:FP32:-1,3", "--repository", str(tmp_path / "models"), "--name", "coded",
         "--samples", str(tmp_path / "rows.npz")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "left out of the parity check" in done.stderr and "onnxruntime" not in done.stderr.lower(), done.stderr
