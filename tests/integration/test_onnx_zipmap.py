"""Classifiers converted by skl2onnx with its default ZipMap: the probabilities come out as a
list of {label: probability} maps, which no V2 datatype carries. Until 2026-12-06 such a model
(every scikit-learn classifier converted without ``zipmap: False``) failed its load; now its
probabilities are served as FP32 [batch, classes], one column per class in ``classes_`` order."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from skl2onnx import to_onnx
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    three = np.digitize(x[:, 0] + 0.3 * x[:, 1], [-0.5, 0.5])  # int labels 0, 1, 2
    words = np.array(["cat", "dog"])[(x[:, 2] > 0).astype(int)]  # string labels
    models = {
        "logreg": LogisticRegression(max_iter=500).fit(x, three),
        "forest": RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(x, words),
    }
    repo = str(tmp_path_factory.mktemp("zipmap_models"))
    for name, model in models.items():
        os.makedirs(os.path.join(repo, name, "1"))
        with open(os.path.join(repo, name, "1", "model.onnx"), "wb") as f:
            f.write(to_onnx(model, x[:1]).SerializeToString())  # (skl2onnx's default: a ZipMap)
        if name == "logreg":  # batched by the gateway too
            with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
                f.write("max_batch_size: 16\ndynamic_batching { }\n")
    return repo, models, x


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_zipmap_classifier_serves_its_probabilities_as_a_tensor(classifiers, serve, protocol):
    repo, models, x = classifiers
    running = serve(repo)
    mod, url = (grpcclient, running.grpc_url) if protocol == "grpc" else (httpclient, running.http_url)
    c = mod.InferenceServerClient(url)
    rows = x[:4]  # (the forest has no config: a completed one batches up to 4, as Triton's default)
    for name, model in models.items():
        meta = c.get_model_metadata(name)
        outputs = (
            meta["outputs"]
            if protocol == "http"
            else [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in meta.outputs]
        )
        prob = next(o for o in outputs if o["name"] == "output_probability")
        assert (prob["datatype"], list(prob["shape"])) == ("FP32", [-1, len(model.classes_)])
        inp = mod.InferInput("X", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        res = c.infer(name, [inp])
        np.testing.assert_allclose(res.as_numpy("output_probability"), model.predict_proba(rows), rtol=1e-4, atol=1e-5)
        labels = res.as_numpy("output_label")
        want = model.predict(rows)
        assert [v.decode() if isinstance(v, bytes) else int(v) for v in labels] == list(want)


def test_a_drift_profile_reads_the_probabilities_as_served(classifiers, tmp_path):
    """``batchgate drift profile`` runs the model itself: it took each row's map as one category
    (its text), so the profile could never match what the served tensor's monitor sees."""
    import json
    import subprocess
    import sys

    repo, models, x = classifiers
    data = tmp_path / "d.csv"
    data.write_text("a,b,c,d,e\n" + "".join(",".join(f"{v:.6g}" for v in row) + "\n" for row in x))
    out = tmp_path / "p.json"
    done = subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "drift", "profile", "--model", "logreg", "--input", "X",
         "--data", str(data), "--model-repository", repo, "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    features = json.loads(out.read_text())["outputs"]["output_probability"]
    assert [(f["name"], f["kind"]) for f in features] == [(f"output_probability[{i}]", "numeric") for i in range(3)]
    means = [f["mean"] for f in features]
    np.testing.assert_allclose(means, models["logreg"].predict_proba(x).mean(axis=0), rtol=1e-3)
