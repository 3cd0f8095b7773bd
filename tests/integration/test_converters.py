"""Converters: a PyTorch or scikit-learn model becomes a repository entry that batchgate serves
and that answers what the original computes (queried with tritonclient, against the original)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import convert_models  # tests/convert_models.py
from batchgate.converters import (
    ConversionError,
    Tolerance,
    convert_sklearn,
    convert_torch,
)

TESTS = Path(__file__).resolve().parents[1]

# Several CLI runs of torch's exporter each: 60-90 s beside a busy machine's other work, near the
# suite's 120 s per test.
HEAVY = pytest.mark.timeout(360)


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "convert", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def infer(url: str, mod, model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    c = mod.InferenceServerClient(url)
    inputs = []
    for name, arr in feeds.items():
        dt = {np.float32: "FP32", np.int64: "INT64"}[arr.dtype.type]
        i = mod.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    res = c.infer(model, inputs, outputs=[mod.InferRequestedOutput(o) for o in outputs])
    return [res.as_numpy(o) for o in outputs]


def torch_run(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(v) for v in feeds.values()])
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def leftovers(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir()) if repo.exists() else []


@HEAVY
def test_torch_models_converted_by_the_cli_are_served_and_agree_with_torch(tmp_path, serve):
    repo = tmp_path / "models"
    jobs = [
        ("mlp", "convert_models:mlp", ["x:FP32:-1,16"], []),
        ("cnn", "convert_models:cnn", ["image:FP32:-1,3,16,16"], []),
        ("two", "convert_models:two_in_two_out", ["tokens:INT64:-1,5", "dense:FP32:-1,3"], ["score", "embedding"]),
        ("seq", "convert_models:sequence_encoder", ["ids:INT64:batch,seq", "mask:FP32:batch,seq"], []),
    ]
    for name, model, inputs, outputs in jobs:
        args = ["torch", "--model", model, "--repository", str(repo), "--name", name]
        for i in inputs:
            args += ["--input", i]
        for o in outputs:
            args += ["--output", o]
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert f"model      {name} version 1" in done.stdout and "parity check" in done.stdout
        record = json.loads((repo / name / "1" / "conversion.json").read_text())
        assert record["exporter"] in ("dynamo", "legacy") and record["opset"] >= 17
        assert all(c["ok"] for c in record["checks"]) and record["checks"][0]["cases"] == 3
        assert "converted_by" in (repo / name / "config.pbtxt").read_text()

    running = serve(str(repo))
    rng = np.random.default_rng(1)
    cases = [
        ("mlp", convert_models.mlp(), {"x": rng.standard_normal((3, 16)).astype(np.float32)}, ["output"]),
        ("cnn", convert_models.cnn(), {"image": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}, ["output"]),
        (
            "two",
            convert_models.two_in_two_out(),
            {"tokens": rng.integers(0, 10, (4, 5)), "dense": rng.standard_normal((4, 3)).astype(np.float32)},
            ["score", "embedding"],
        ),
    ]
    # the sequence length differs from one request to the next, and from the export's example
    for length in (1, 7, 12):
        ids = rng.integers(0, 10, (2, length))
        mask = (rng.random((2, length)) < 0.8).astype(np.float32)
        cases.append(("seq", convert_models.sequence_encoder(), {"ids": ids, "mask": mask}, ["output"]))
    for name, module, feeds, outputs in cases:
        want = torch_run(module, feeds)
        for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
            got = infer(url, mod, name, feeds, outputs)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4)


def test_the_python_api_converts_a_module_and_a_torchscript_file_with_optimize_and_fp16(tmp_path, serve):
    repo = tmp_path / "models"
    module = convert_models.mlp()
    r = convert_torch(
        module, ["x:FP32:-1,16"], str(repo), "mlp", optimize=Tolerance(1e-4, 1e-3), fp16=Tolerance(1e-2, 1e-2)
    )
    assert r.written and r.stages == ["onnx", "optimized", "fp16"] and all(c.ok for c in r.checks)
    assert 0 < r.checks[-1].max_abs < 1e-2  # FP16 is close, not exact
    assert "kind: KIND_GPU" in (repo / "mlp" / "config.pbtxt").read_text()  # FP16 is for GPU serving

    scripted = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.script(module), str(scripted))
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.random.default_rng(2).standard_normal((7, 16)).astype(np.float32))
    r2 = convert_torch(str(scripted), ["x:FP32:-1,16"], str(repo), "scripted", samples=str(samples))
    assert "legacy exporter" in r2.source  # the dynamo exporter does not take TorchScript
    assert r2.checks[0].cases == 4  # three generated input sets and the samples

    running = serve(str(repo))  # served on the CPU here: no GPU, the CUDA provider falls back
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    want = torch_run(module, {"x": x})[0]
    np.testing.assert_allclose(
        infer(running.grpc_url, grpcclient, "mlp", {"x": x}, ["output"])[0], want, rtol=1e-2, atol=1e-2
    )
    np.testing.assert_allclose(
        infer(running.http_url, httpclient, "scripted", {"x": x}, ["output"])[0], want, rtol=1e-3, atol=1e-4
    )


def test_sklearn_pipeline_and_tree_ensemble_are_served_and_agree_with_sklearn(tmp_path, serve):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    forest = RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0).fit(x, y)
    repo = tmp_path / "models"
    path = tmp_path / "pipeline.pkl"
    path.write_bytes(pickle.dumps(pipeline))
    done = cli(
        "sklearn",
        "--model",
        str(path),
        "--input",
        "features:FP32:-1,4",
        "--repository",
        str(repo),
        "--name",
        "pipeline",
    )
    assert done.returncode == 0, done.stderr
    r = convert_sklearn(forest, ["features:FP32:-1,4"], str(repo), "forest")
    assert [c.output for c in r.checks] == ["label", "probabilities"] and all(c.ok for c in r.checks)
    # One label a row: Triton refuses a tensor without dims, so the config says dims [1] reshaped to []
    # (the model's own shape), and a second version fits the config the first one wrote.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = text_format.Parse((repo / "forest" / "config.pbtxt").read_text(), mc.ModelConfig())
    label_entry = next(o for o in cfg.output if o.name == "label")
    assert list(label_entry.dims) == [1] and label_entry.HasField("reshape") and not label_entry.reshape.shape
    assert all(len(t.dims) for t in [*cfg.input, *cfg.output])
    convert_sklearn(forest, ["features:FP32:-1,4"], str(repo), "forest", version=2)

    running = serve(str(repo))
    q = rng.standard_normal((9, 4)).astype(np.float32)
    for name, est in (("pipeline", pipeline), ("forest", forest)):
        for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
            label, proba = infer(url, mod, name, {"features": q}, ["label", "probabilities"])
            assert label.shape == (9, 1)  # as Triton answers it: the config's dims [1] a row
            np.testing.assert_array_equal(label.reshape(-1), est.predict(q))
            np.testing.assert_allclose(proba, est.predict_proba(q), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "model, inputs, words",
    [
        ("nosuchmodule_xyz:build", "x:FP32:-1,16", "cannot import module 'nosuchmodule_xyz'"),
        ("convert_models:nope", "x:FP32:-1,16", "module 'convert_models' has no attribute 'nope'"),
        ("convert_models:not_a_module", "x:FP32:-1,16", "neither an nn.Module nor a factory"),
        ("convert_models:Unexportable", "x:FP32:-1,4,4", "could not be exported to ONNX"),
        ("convert_models:mlp", "x:FP32:-1,7", "does not accept inputs shaped like the specs"),
        ("convert_models:mlp", "x:FP32:-1,16 --output a --output b", "returns 1 output(s); --output names 2"),
        ("convert_models:mlp", "x:FLOAT99:-1,16", "unknown datatype 'FLOAT99'"),
        ("convert_models:mlp", "x:FP32", "must be NAME:DTYPE:SHAPE"),
        ("convert_models:Noisy", "x:FP32:-1,16", "parity check failed, nothing written"),
        ("missing.pt", "x:FP32:-1,16", "no such file"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_nothing_behind(tmp_path, model, inputs, words):
    repo = tmp_path / "models"
    repo.mkdir()
    first, *rest = inputs.split(" ")
    done = cli("torch", "--model", model, "--input", first, *rest, "--repository", str(repo), "--name", "m")
    assert done.returncode == 1, done.stdout + done.stderr
    assert words in done.stderr
    assert "config     written" not in done.stdout + done.stderr  # (a failed parity check's summary said so)
    assert leftovers(repo) == []  # no model folder, no staging folder


@HEAVY
def test_an_existing_version_needs_force_and_force_replaces_it(tmp_path):
    repo = tmp_path / "models"
    base = [
        "torch",
        "--model",
        "convert_models:mlp",
        "--input",
        "x:FP32:-1,16",
        "--repository",
        str(repo),
        "--name",
        "m",
    ]
    assert cli(*base).returncode == 0
    before = (repo / "m" / "1" / "model.onnx").read_bytes()
    again = cli(*base)
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == before
    forced = cli(*base, "--force", "--opset", "18")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((repo / "m" / "1" / "conversion.json").read_text())["opset"] == 18
    assert cli(*base, "--version", "2").returncode == 0
    assert leftovers(repo) == ["m"] and sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "config.pbtxt"]


def test_sklearn_bad_input(tmp_path):
    repo = tmp_path / "models"
    repo.mkdir()
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(pickle.dumps({"not": "a model"}))
    done = cli("sklearn", "--model", str(junk), "--input", "f:FP32:-1,4", "--repository", str(repo), "--name", "m")
    assert done.returncode == 1 and "not a scikit-learn estimator" in done.stderr
    with pytest.raises(ConversionError, match="one input tensor"):
        from sklearn.linear_model import LinearRegression

        convert_sklearn(
            LinearRegression().fit(np.ones((3, 2)), [1, 2, 3]), ["a:FP32:-1,1", "b:FP32:-1,1"], str(repo), "m"
        )
    assert leftovers(repo) == []


class _Touches:
    """A pickle that creates a file as it is loaded (what any pickle may do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_conversion_refused_for_its_destination_never_loads_the_pickle(tmp_path):
    """Unpickling runs the file's code; it ran before the destination was checked, so even a
    conversion refused at once had run it."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Touches(marker)))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    done = cli("sklearn", "--model", str(evil), "--input", "f:FP32:-1,4", "--repository", str(not_a_dir), "--name", "m")
    assert done.returncode == 1 and "--repository" in done.stderr, done.stderr
    assert not marker.exists()


def test_the_server_never_imports_torch_or_sklearn():
    code = (
        "import sys, batchgate.app, batchgate.cli, batchgate.converters; "
        "print(sorted(m for m in ('torch', 'sklearn', 'skl2onnx', 'hdrh', 'aiohttp', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


@HEAVY
def test_outputs_without_a_batch_dimension_names_and_versions_are_checked(tmp_path):
    repo = tmp_path / "models"
    base = ["--input", "x:FP32:-1,16", "--repository", str(repo)]
    done = cli("torch", "--model", "convert_models:SumOverBatch", *base, "--name", "s")
    assert done.returncode == 1 and "not the batch dimension; convert with --no-batch" in done.stderr
    done = cli(
        "torch",
        "--model",
        "convert_models:SumOverBatch",
        "--input",
        "x:FP32:4,16",
        "--repository",
        str(repo),
        "--name",
        "s",
        "--no-batch",
    )
    assert done.returncode == 0, done.stderr  # without batching the shapes are taken as given
    assert "max_batch_size" not in (repo / "s" / "config.pbtxt").read_text()  # 0: not written by protobuf
    # told before the model is even imported; a name the server would skip is refused (before,
    # 200 characters or a trailing newline were converted and never served)
    for name in ("", "../up", ".hidden", "a/b", "x" * 200, "nl\n"):
        bad = cli("torch", "--model", "no_such_module:mlp", *base, "--name", name)
        assert bad.returncode == 1 and "--name" in bad.stderr and "no_such_module" not in bad.stderr, name
    dup = cli("torch", "--model", "convert_models:mlp", *base, "--name", "m", "--output", "x")
    assert dup.returncode == 1 and "must differ from each other and from the inputs" in dup.stderr
    assert cli("torch", "--model", "convert_models:mlp", *base, "--name", "m").returncode == 0
    other = cli(
        "torch",
        "--model",
        "convert_models:cnn",
        "--input",
        "image:FP32:-1,3,16,16",
        "--repository",
        str(repo),
        "--name",
        "m",
        "--version",
        "2",
    )
    assert other.returncode == 1 and "convert under a new --name" in other.stderr
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "config.pbtxt"]
    assert leftovers(repo) == ["m", "s"]


def test_integer_outputs_must_be_equal_and_nan_agrees_with_nan(tmp_path):
    r = convert_torch(convert_models.ArgmaxAndLog(), ["x:FP32:-1,16"], str(tmp_path), "al", outputs=["label", "log"])
    label, log = r.checks
    assert label.ok and label.max_abs == 0 and log.ok  # log of negatives: NaN on both sides, equal


def test_a_module_answering_a_dict_names_its_outputs_by_the_keys(tmp_path, serve):
    r = convert_torch(convert_models.DictOut(), ["x:FP32:-1,4"], str(tmp_path), "d")
    assert [c.output for c in r.checks] == ["logits", "total"] and all(c.ok for c in r.checks)
    running = serve(str(tmp_path))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    logits, total = infer(running.grpc_url, grpcclient, "d", {"x": x}, ["logits", "total"])
    np.testing.assert_allclose(logits, x * 2)
    np.testing.assert_allclose(total, x.sum(-1, keepdims=True))


def test_json_output_is_stdout_alone_whatever_the_model_prints(tmp_path):
    """A model that prints as it runs wrote before the JSON of --json on stdout."""
    repo = tmp_path / "models"
    repo.mkdir()
    done = cli("torch", "--model", "convert_models:Printer", "--input", "x:FP32:-1,4",
               "--repository", str(repo), "--name", "p", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "p"
    assert "forward called" in done.stderr


def test_a_pipeline_taking_some_values_only_is_checked_on_the_samples(tmp_path):
    """A one-hot encoder of a category column (codes 0-3) raises on the generated inputs (normal
    floats), and those were always run: such a pipeline could not be converted at all, --samples
    of real rows or not. With --samples the generated sets the original refuses are left out
    (said, and in conversion.json); without, the error asks for them."""
    import onnxruntime as ort
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(0)
    x = np.c_[rng.integers(0, 4, 300), rng.standard_normal((300, 2))].astype(np.float32)
    columns = ColumnTransformer([("code", OneHotEncoder(), [0]), ("num", StandardScaler(), [1, 2])])
    model = Pipeline([("columns", columns), ("lr", LogisticRegression())]).fit(x, (x[:, 0] > 1).astype(int))
    repo = tmp_path / "models"
    with pytest.raises(ConversionError, match="fails on generated inputs .*unknown categories.*--samples"):
        convert_sklearn(model, ["x:FP32:-1,3"], str(repo), "coded")
    samples = tmp_path / "rows.npz"
    np.savez(samples, x=x[:50])
    said = []
    r = convert_sklearn(model, ["x:FP32:-1,3"], str(repo), "coded", samples=str(samples), progress=said.append)
    assert r.written and all(c.ok and c.cases == 1 for c in r.checks)
    assert any("left out of the parity check" in s for s in said)
    record = json.loads((repo / "coded" / "1" / "conversion.json").read_text())
    assert len(record["parity_left_out"]) == 3
    sess = ort.InferenceSession(str(repo / "coded" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    label, proba = sess.run(None, {"x": x[50:80]})
    np.testing.assert_array_equal(label.reshape(-1), model.predict(x[50:80]))
    np.testing.assert_allclose(proba, model.predict_proba(x[50:80]), rtol=1e-4, atol=1e-5)


def test_a_regressor_of_several_targets_is_declared_with_its_real_width(tmp_path, serve):
    """skl2onnx declares a regressor's ``variable`` [N, 1] whatever the number of targets: the
    config said dims [1] while the model answered [N, 2]. The model and the config now declare what
    ONNX Runtime answers, and the server sends what the estimator predicts."""
    import onnxruntime as ort
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 5)).astype(np.float32)
    forest = RandomForestRegressor(n_estimators=4, random_state=0).fit(x, np.c_[x[:, 0], 2 * x[:, 1]])
    repo = tmp_path / "models"
    said: list[str] = []
    r = convert_sklearn(forest, ["features:FP32:-1,5"], str(repo), "targets", progress=said.append)
    assert r.outputs == [{"name": "variable", "datatype": "FP32", "config": "TYPE_FP32", "dims": [2]}]
    assert any("declares output 'variable' [-1, 1] but answers [-1, 2]" in s for s in said)
    sess = ort.InferenceSession(str(repo / "targets" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].shape[1:] == [2]
    record = json.loads((repo / "targets" / "1" / "conversion.json").read_text())
    assert record["declared_shapes_corrected"] == {"variable": {"declared": [-1, 1], "answered": [-1, 2]}}
    convert_sklearn(forest, ["features:FP32:-1,5"], str(repo), "targets", version=2)  # fits the config

    running = serve(str(repo))
    meta = grpcclient.InferenceServerClient(running.grpc_url).get_model_metadata("targets")
    assert [list(o.shape) for o in meta.outputs] == [[-1, 2]]
    q = rng.standard_normal((7, 5)).astype(np.float32)
    (got,) = infer(running.grpc_url, grpcclient, "targets", {"features": q}, ["variable"])
    np.testing.assert_allclose(got, forest.predict(q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["auto", "legacy"])
def test_without_batching_the_parity_check_tries_other_sizes_than_the_export(tmp_path, exporter):
    """With --no-batch the check ran one input set, of the sizes the model was exported with: a
    model whose exporter baked a dynamic size in passed it, was written, and answered wrong (or
    failed) at any other size. Now it is refused, and a model that keeps the size dynamic is
    checked on three sets of sizes."""
    repo = tmp_path / "models"
    with pytest.raises(ConversionError, match="parity check failed|cannot run the model"):
        convert_torch(
            convert_models.MeanBySize(), ["x:FP32:-1,-1"], str(repo), "mean", batched=False, exporter=exporter
        )
    assert leftovers(repo) == []
    r = convert_torch(
        convert_models.sequence_encoder(), ["ids:INT64:n,seq", "mask:FP32:n,seq"], str(repo), "enc", batched=False
    )
    assert r.written and all(c.ok and c.cases == 3 for c in r.checks)


def test_an_input_the_model_does_not_read_stays_an_input_with_either_exporter(tmp_path, serve):
    """The legacy exporter (the only one for a TorchScript file) leaves out an input the model does
    not read: the conversion failed with ONNX Runtime's "Invalid input name". The input is put back,
    so the model takes what its specs say whichever exporter wrote it, and it is served."""
    import onnxruntime as ort

    repo = tmp_path / "models"
    specs = ["flags:INT64:-1,seq", "x:FP32:-1,4"]
    script = tmp_path / "ignores.pt"
    torch.jit.save(torch.jit.script(convert_models.ignores_flags()), str(script))
    args = ["torch", "--model", str(script), "--repository", str(repo), "--name", "scripted"]
    done = cli(*args, "--input", specs[0], "--input", specs[1])
    assert done.returncode == 0, done.stderr
    convert_torch(convert_models.ignores_flags(), specs, str(repo), "traced", exporter="legacy")
    convert_torch(convert_models.ignores_flags(), specs, str(repo), "dynamo", exporter="dynamo")
    shapes = {}
    for name in ("scripted", "traced", "dynamo"):
        sess = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        shapes[name] = [(i.name, i.type, i.shape[1:]) for i in sess.get_inputs()]
    assert shapes["scripted"] == shapes["traced"] == [("flags", "tensor(int64)", ["seq"]), ("x", "tensor(float)", [4])]
    assert [n for n, _, _ in shapes["dynamo"]] == ["flags", "x"]

    running = serve(str(repo))
    rng = np.random.default_rng(3)
    feeds = {"flags": rng.integers(0, 2, (3, 6)), "x": rng.standard_normal((3, 4)).astype(np.float32)}
    want = torch_run(convert_models.ignores_flags(), feeds)
    for name in ("scripted", "traced", "dynamo"):
        (got,) = infer(running.grpc_url, grpcclient, name, feeds, ["output"])
        np.testing.assert_allclose(got, want[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("flag", "value"), [("--atol", "-1"), ("--rtol", "nan"), ("--optimize-atol", "-0.5"), ("--fp16-rtol", "-1e-2")]
)
def test_a_tolerance_no_element_can_meet_is_refused_before_the_model_loads(tmp_path, flag, value):
    """A negative or NaN tolerance was taken: the parity check then failed any inexact output and
    blamed the model. It is refused, naming the option, before the model is imported."""
    extra = ["--optimize"] if flag.startswith("--optimize") else ["--fp16"] if flag.startswith("--fp16") else []
    done = cli("torch", "--model", "no_such_module:build", "--input", "x:FP32:-1,16", "--repository",
               str(tmp_path / "models"), "--name", "m", *extra, f"{flag}={value}")  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: {flag} {float(value)}: a tolerance is a number, 0 or more" in done.stderr
    assert "no_such_module" not in done.stderr and leftovers(tmp_path / "models") == []


def test_a_module_in_training_is_handed_back_in_the_modes_it_came_in(tmp_path):
    """convert_torch put the caller's module in eval mode and left it so: a conversion made while a
    model is being trained turned its dropout and batch norm off for the rest of the training. It
    is converted in eval mode (the export and the parity check) and handed back as it came, each
    submodule in its own mode, whether the conversion is written or refused."""
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 4)
    )
    model[1].eval()  # a frozen batch norm inside a model in training
    before = [m.training for m in model.modules()]
    assert before == [True, True, False, True, True]
    result = convert_torch(model, ["x:FP32:-1,16"], str(tmp_path / "models"), "trained")
    assert result.written and [m.training for m in model.modules()] == before
    with pytest.raises(ConversionError):  # the version exists: refused
        convert_torch(model, ["x:FP32:-1,16"], str(tmp_path / "models"), "trained")
    assert [m.training for m in model.modules()] == before


def test_a_classifier_of_bool_labels_answers_bool_labels(tmp_path, serve):
    """skl2onnx answers a classifier trained on bool labels with INT64 0 / 1 where the estimator
    predicts False / True (the parity check took 1 == True): the label is BOOL now, in the model,
    the config and the answers of both protocols."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    x = rng.random((200, 3)).astype(np.float32)
    model = LogisticRegression().fit(x, x[:, 0] > 0.5)
    repo = tmp_path / "models"
    r = convert_sklearn(model, ["x:FP32:-1,3"], str(repo), "flag")
    assert r.outputs[0] == {"name": "label", "datatype": "BOOL", "config": "TYPE_BOOL", "dims": []}
    running = serve(str(repo))
    q = rng.random((6, 3)).astype(np.float32)
    for url, mod in ((running.grpc_url, grpcclient), (running.http_url, httpclient)):
        label, proba = infer(url, mod, "flag", {"x": q}, ["label", "probabilities"])
        assert label.dtype == np.bool_ and label.shape == (6, 1)  # dims [1] a row, as Triton answers it
        assert label.reshape(-1).tolist() == model.predict(q).tolist()
        np.testing.assert_allclose(proba, model.predict_proba(q), rtol=1e-4, atol=1e-5)
