"""Converters: edge cases found by converting models the other tests do not use: a small
max_batch_size, versions and sizes past what a config holds, tensor names, files saved with
torch.save, a ScriptModule object, infinities, string samples, empty options."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from test_converters import cli

import convert_models  # tests/convert_models.py
from batchgate.converters import ConversionError, convert_sklearn, convert_torch

TESTS = Path(__file__).resolve().parents[1]


def leftovers(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir()) if repo.exists() else []


@pytest.mark.parametrize("exporter", ["auto", "legacy"])
def test_a_small_max_batch_size_still_checks_other_sizes_than_the_export(tmp_path, exporter):
    """With --max-batch-size 1 the check ran one generated set, of the sizes the model was exported
    with: a row length the exporter baked in passed, and the model was written and answered
    another length wrong. Three sets of sizes are checked whatever the limit."""
    repo = tmp_path / "models"
    with pytest.raises(ConversionError, match="parity check failed|cannot run the model"):
        convert_torch(
            convert_models.MeanBySize(), ["x:FP32:-1,-1"], str(repo), "mean", max_batch_size=1, exporter=exporter
        )
    assert leftovers(repo) == []
    r = convert_torch(
        convert_models.sequence_encoder(),
        ["ids:INT64:batch,seq", "mask:FP32:batch,seq"],
        str(repo),
        "enc",
        max_batch_size=1,
        exporter=exporter,
    )
    assert r.written and all(c.ok and c.cases == 3 for c in r.checks)
    assert r.max_batch_size == 1


def test_a_version_the_server_would_skip_is_refused(tmp_path, serve):
    """A version of 19 digits was written, and the server, which serves versions of at most 18
    (int64), left the model unavailable with no version. It is refused before anything loads;
    18 digits are served."""
    repo = tmp_path / "models"
    with pytest.raises(ConversionError, match="--version 1000000000000000000: .*at most 18 digits"):
        convert_torch("no_such_module:mlp", ["x:FP32:-1,16"], str(repo), "m", version=10**18)
    assert leftovers(repo) == []
    r = convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", version=10**18 - 1)
    assert r.written
    running = serve(str(repo))
    meta = grpcclient.InferenceServerClient(running.grpc_url).get_model_metadata("m")
    assert list(meta.versions) == [str(10**18 - 1)]


def test_an_input_named_like_an_output_is_told_not_lost(tmp_path, serve):
    """An input named "output" (the name a single output gets by default), or like the output of a
    scikit-learn model ("variable"), was renamed inside the exported model ("output__inner",
    "variable1"), and the conversion failed on ONNX Runtime's "Required inputs are missing". The
    clash is named, with what to do; with the outputs named otherwise the model converts."""
    from sklearn.linear_model import Ridge

    repo = tmp_path / "models"
    with pytest.raises(ConversionError, match=r"input\(s\) output have that name.*--output"):
        convert_torch(convert_models.mlp(), ["output:FP32:-1,16"], str(repo), "mlp")
    x = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    ridge = Ridge().fit(x, x[:, 0])
    with pytest.raises(ConversionError, match=r"input\(s\) variable of Ridge have the name of its output"):
        convert_sklearn(ridge, ["variable:FP32:-1,3"], str(repo), "ridge")
    assert leftovers(repo) == []
    convert_torch(convert_models.mlp(), ["output:FP32:-1,16"], str(repo), "mlp", outputs=["scores"])
    running = serve(str(repo))
    feed = grpcclient.InferInput("output", [2, 16], "FP32")
    feed.set_data_from_numpy(np.ones((2, 16), np.float32))
    got = grpcclient.InferenceServerClient(running.grpc_url).infer("mlp", [feed]).as_numpy("scores")
    with torch.no_grad():
        want = convert_models.mlp()(torch.ones(2, 16)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["", "a b", "../x", "1st"])
def test_an_output_name_is_a_tensor_name_like_an_input_name(tmp_path, name):
    """--output took any text: an empty name failed in ONNX Runtime after the export, and "a b" or
    "../x" was written into the config and served. It follows the inputs' rule, told before the
    model loads (the module named here does not exist)."""
    repo = tmp_path / "models"
    with pytest.raises(ConversionError, match=re.escape(f"--output {name!r} is not a valid tensor name")):
        convert_torch("no_such_module:mlp", ["x:FP32:-1,16"], str(repo), "m", outputs=[name])
    assert leftovers(repo) == []


def test_a_file_saved_with_torch_save_is_named_for_what_it_holds(tmp_path):
    """A state_dict (or a module pickled whole) given as --model was refused with torch.jit.load's
    own error, which calls the file corrupted. The error says what the file holds, read without
    running its code, and what to pass instead; a damaged file still gets torch's reason."""
    weights, whole, junk = tmp_path / "weights.pt", tmp_path / "whole.pt", tmp_path / "junk.pt"
    torch.save(convert_models.mlp().state_dict(), weights)
    torch.save(convert_models.mlp(), whole)
    junk.write_bytes(b"not a model\n")
    told = {}
    for path in (weights, whole, junk):
        with pytest.raises(ConversionError) as e:
            convert_torch(str(path), ["x:FP32:-1,16"], str(tmp_path / "models"), "m")
        told[path.name] = str(e.value)
    assert "a state_dict or checkpoint saved with torch.save (4 entries" in told["weights.pt"]
    assert "a pickled module, not TorchScript" in told["whole.pt"]
    for name in ("weights.pt", "whole.pt"):
        assert "corrupted" not in told[name] and "module:factory, a function returning the module" in told[name]
    assert "not a TorchScript file" in told["junk.pt"]
    assert leftovers(tmp_path / "models") == []


def test_a_string_input_to_a_torch_model_is_refused_before_it_loads(tmp_path):
    """A BYTES input reached torch.from_numpy, and the error blamed the model ("does not accept
    inputs shaped like the specs") and suggested --samples. It is refused before the model loads
    (the module named here does not exist), naming the input."""
    with pytest.raises(ConversionError, match=r"input\(s\) text: BYTES \(strings\) cannot reach a PyTorch model"):
        convert_torch("no_such_module:mlp", ["text:BYTES:-1,1", "x:FP32:-1,16"], str(tmp_path / "m"), "m")
    assert leftovers(tmp_path / "m") == []


def test_unnamed_dimensions_that_must_be_equal_are_hinted_at(tmp_path):
    """Token ids and their mask given as -1,-1 each got a sequence length of its own, and the error
    suggested --samples only (the ids are integers). It now says that -1 dimensions get sizes of
    their own and to name those that must be equal; named, the model converts."""
    specs = ["ids:INT64:-1,-1", "mask:FP32:-1,-1"]
    with pytest.raises(ConversionError, match=r"dimensions written -1 \(ids\[1\], mask\[1\]\) .* one name"):
        convert_torch(convert_models.sequence_encoder(), specs, str(tmp_path / "m"), "enc")
    r = convert_torch(convert_models.sequence_encoder(), ["ids:INT64:-1,seq", "mask:FP32:-1,seq"], str(tmp_path), "enc")
    assert r.written


def test_sklearn_inputs_with_dots_and_dashes_keep_their_names(tmp_path, serve):
    """skl2onnx makes an input "x.1" into "x_1" (and "unit-price" into "unit_price"), and the
    conversion failed on ONNX Runtime's "Required inputs are missing". The model takes the names
    the specs give, so callers send those; a DataFrame model's columns too."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    repo = tmp_path / "models"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 3)).astype(np.float32)
    clf = LogisticRegression().fit(x, x[:, 0] > 0)
    assert convert_sklearn(clf, ["x.1:FP32:-1,3"], str(repo), "clf").written
    frame = pd.DataFrame({"unit-price": x[:, 0], "shop.kind": rng.choice(["a", "b"], 60)})
    columns = ColumnTransformer(
        [("n", StandardScaler(), ["unit-price"]), ("c", OneHotEncoder(handle_unknown="ignore"), ["shop.kind"])]
    )
    pipe = Pipeline([("columns", columns), ("lr", LogisticRegression())]).fit(frame, x[:, 1] > 0)
    r = convert_sklearn(pipe, ["unit-price:FP32:-1,1", "shop.kind:BYTES:-1,1"], str(repo), "frame")
    assert [i["name"] for i in r.inputs] == ["unit-price", "shop.kind"]

    running = serve(str(repo))
    feed = grpcclient.InferInput("x.1", [4, 3], "FP32")
    feed.set_data_from_numpy(x[:4])
    got = grpcclient.InferenceServerClient(running.grpc_url).infer("clf", [feed]).as_numpy("label")
    assert got.ravel().tolist() == clf.predict(x[:4]).tolist()


def test_a_torchscript_module_handed_to_the_api_is_taken_as_a_torchscript_file_is(tmp_path):
    """A ScriptModule object was taken as a Python module: --exporter dynamo failed with torch's
    own export trace, and inputs named after keyword parameters were wrapped in a Python module
    the TorchScript interpreter refused. It gets a TorchScript file's clear errors, and converts
    with its inputs by position through the legacy exporter."""
    repo = tmp_path / "models"
    scripted = torch.jit.script(convert_models.mlp())
    with pytest.raises(ConversionError, match="the dynamo exporter cannot export a TorchScript module"):
        convert_torch(scripted, ["x:FP32:-1,16"], str(repo), "m", exporter="dynamo")
    with pytest.raises(ConversionError, match="a TorchScript module is exported with its inputs by position"):
        convert_torch(torch.jit.script(convert_models.Scaled()), ["x:FP32:-1,4", "scale:FP32:-1,4"], str(repo), "s")
    assert leftovers(repo) == []
    r = convert_torch(scripted, ["x:FP32:-1,16"], str(repo), "m")
    assert r.written and "legacy exporter" in r.source


class ClipsWhenExported(torch.nn.Module):
    """Answers inf for inf, but its exported graph clips to a finite bound."""

    def forward(self, x):
        y = x * 2.0
        if torch.onnx.is_in_onnx_export():
            y = y.clamp(-1e30, 1e30)
        return y


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_a_finite_answer_where_the_original_answers_inf_fails_the_parity_check(tmp_path, exporter):
    """An expected inf made the bound atol + rtol * |expected| infinite, so any finite answer was
    within it: the check reported a max abs error of inf and no mismatch, and wrote the model."""
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.array([[1.0, np.inf, -np.inf, 0.5]], np.float32))
    repo = tmp_path / "models"
    with pytest.raises(ConversionError, match="parity check failed.*2 element"):
        convert_torch(ClipsWhenExported(), ["x:FP32:-1,4"], str(repo), "m", exporter=exporter, samples=str(samples))
    assert leftovers(repo) == []


def test_string_samples_saved_as_bytes_reach_onnx_runtime_as_the_server_sends_them(tmp_path, serve):
    """String samples saved as numpy bytes reached ONNX Runtime as bytes objects, which it reads as
    the text "b'a'": a OneHotEncoder of known categories failed ("Unknown Category") where the
    served model, fed text by the server, works. The check feeds both models text."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"price": rng.standard_normal(80).astype(np.float32), "kind": rng.choice(["a", "b", "c"], 80)})
    columns = ColumnTransformer([("n", StandardScaler(), ["price"]), ("c", OneHotEncoder(), ["kind"])])
    pipe = Pipeline([("columns", columns), ("lr", LogisticRegression())]).fit(frame, rng.choice(["yes", "no"], 80))
    samples = tmp_path / "samples.npz"
    kinds = frame.kind.values[:10].astype("S").reshape(-1, 1)  # numpy bytes
    np.savez(samples, price=frame.price.values[:10].reshape(-1, 1), kind=kinds)
    repo = tmp_path / "models"
    r = convert_sklearn(pipe, ["price:FP32:-1,1", "kind:BYTES:-1,1"], str(repo), "shop", samples=str(samples))
    assert r.written and all(c.ok for c in r.checks)

    running = serve(str(repo))
    price, kind = grpcclient.InferInput("price", [3, 1], "FP32"), grpcclient.InferInput("kind", [3, 1], "BYTES")
    price.set_data_from_numpy(np.array([[0.1], [1.0], [-2.0]], np.float32))
    kind.set_data_from_numpy(np.array([[b"a"], [b"c"], [b"b"]], dtype=object))
    got = grpcclient.InferenceServerClient(running.grpc_url).infer("shop", [price, kind]).as_numpy("label")
    want = pipe.predict(pd.DataFrame({"price": [0.1, 1.0, -2.0], "kind": ["a", "c", "b"]}))
    assert [v.decode() for v in got.ravel()] == want.tolist()


def test_a_max_batch_size_no_config_can_hold_is_refused_before_the_model_loads(tmp_path):
    """--max-batch-size 3000000000 was taken, the model exported and checked, and the write ended
    in a traceback (protobuf: "Value out of range"; the config's field is an int32)."""
    with pytest.raises(ConversionError, match="--max-batch-size 3000000000: at most 2147483647"):
        convert_torch("no_such_module:mlp", ["x:FP32:-1,16"], str(tmp_path / "m"), "m", max_batch_size=3_000_000_000)
    with pytest.raises(ConversionError, match="--max-batch-size must be at least 1"):  # (was told after the load)
        convert_torch("no_such_module:mlp", ["x:FP32:-1,16"], str(tmp_path / "m"), "m", max_batch_size=0)
    assert leftovers(tmp_path / "m") == []


def test_inputs_too_large_to_generate_are_one_line_not_a_traceback(tmp_path):
    """A mistyped size ended the command in numpy's MemoryError traceback (300000000000000 columns:
    past any address space, so no machine allocates them)."""
    env = {**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["torch", "--model", "convert_models:mlp", "--input", "x:FP32:-1,300000000000000"]
    done = subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "convert", *args, "--repository", str(tmp_path / "m"), "--name", "m"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "batchgate convert: error: out of memory" in done.stderr and "are the --input sizes right?" in done.stderr
    assert leftovers(tmp_path / "m") == []


def test_a_dimension_past_int64_is_refused_before_the_model_loads(tmp_path):
    """A size past int64 reached numpy, whose ValueError ("Maximum allowed dimension exceeded") ended
    the command in a traceback; a config cannot declare it either."""
    with pytest.raises(ConversionError, match="dimension 99999999999999999999 is larger than a tensor's can be"):
        convert_torch("no_such_module:mlp", ["x:FP32:-1,99999999999999999999"], str(tmp_path / "m"), "m")
    assert leftovers(tmp_path / "m") == []


def test_an_empty_repository_is_refused_not_taken_as_the_current_directory(tmp_path):
    """--repository "" (a script's unset variable) wrote the model into the current directory."""
    for kind, model in (("torch", "convert_models:mlp"), ("sklearn", "model.pkl")):
        done = cli(kind, "--model", model, "--input", "x:FP32:-1,16", "--repository", "", "--name", "m", cwd=tmp_path)
        assert done.returncode == 1 and "--repository is empty" in done.stderr, done.stderr
        assert leftovers(tmp_path) == []


def test_an_empty_samples_option_is_refused_not_ignored(tmp_path):
    """--samples "" was taken as no samples: the check on real rows the caller asked for was left
    out without a word."""
    from sklearn.linear_model import Ridge

    x = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    with pytest.raises(ConversionError, match="--samples is empty"):
        convert_torch("no_such_module:mlp", ["x:FP32:-1,16"], str(tmp_path / "m"), "m", samples="")
    with pytest.raises(ConversionError, match="--samples is empty"):
        convert_sklearn(Ridge().fit(x, x[:, 0]), ["x:FP32:-1,3"], str(tmp_path / "m"), "r", samples=" ")
    assert leftovers(tmp_path / "m") == []


def test_an_opset_below_1_is_refused_before_the_model_loads(tmp_path):
    """--opset 0 was taken as no --opset, and the exporter's own opset was written without a word."""
    from sklearn.linear_model import Ridge

    x = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    with pytest.raises(ConversionError, match="--opset 0: an opset is a number from 1 up"):
        convert_torch("no_such_module:mlp", ["x:FP32:-1,16"], str(tmp_path / "m"), "m", opset=0)
    with pytest.raises(ConversionError, match="--opset -1: an opset is a number from 1 up"):
        convert_sklearn(Ridge().fit(x, x[:, 0]), ["x:FP32:-1,3"], str(tmp_path / "m"), "r", opset=-1)
    assert leftovers(tmp_path / "m") == []
