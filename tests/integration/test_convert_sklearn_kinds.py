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
