"""Adding a version to a model that has one: the versions share one config.pbtxt, which the new
version must fit and which is never rewritten. What does not fit (instance kind, max_batch_size,
tensors) is refused with the setting, both values and the way on, before the export, and nothing
is written. Real conversions of tiny models into real folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from torch import nn

import convert_models  # tests/convert_models.py
from batchgate.converters import ConversionError, Tolerance, convert_sklearn, convert_torch
from batchgate.converters.cli import table
from batchgate.converters.pipeline import Job
from batchgate.converters.versions import require_fit, shared_config

TESTS = Path(__file__).resolve().parents[1]
FP16 = Tolerance(1e-2, 1e-2)


class Scale(nn.Module):
    """Doubles its input, whatever its shape or datatype."""

    def forward(self, x):
        return x * 2


class RowSum(nn.Module):
    def forward(self, x):
        return x.sum(-1)


class Log:
    """Collects the progress lines of a conversion."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def saw(self, start: str) -> bool:
        return any(line.startswith(start) for line in self.lines)


def entries(repo: Path, name: str) -> list[str]:
    return sorted(p.name for p in (repo / name).iterdir())


def refused(repo: Path, name: str, convert, **kw) -> tuple[str, Log]:
    """Run a conversion that must be refused; the model's config and folder stay exactly as they were
    and no staging folder is left in the repository."""
    config = repo / name / "config.pbtxt"
    before = config.read_bytes() if config.exists() else None
    listing = entries(repo, name)
    log = Log()
    with pytest.raises(ConversionError) as e:
        convert(progress=log, **kw)
    assert (config.read_bytes() if config.exists() else None) == before
    assert entries(repo, name) == listing
    assert not [p for p in os.listdir(repo) if p.startswith(".")]
    return str(e.value), log


def io_of(path: Path) -> tuple[list, list]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (
        [(a.name, a.type, a.shape[1:]) for a in sess.get_inputs()],
        [(a.name, a.type, a.shape[1:]) for a in sess.get_outputs()],
    )


def test_gpu_and_fp16_are_refused_beside_cpu_versions_before_the_export(tmp_path):
    repo = tmp_path / "models"
    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m")
    for kw, asked in (
        ({"gpu": True}, "KIND_GPU (--gpu)"),
        ({"fp16": FP16}, "KIND_GPU (--fp16, which implies --gpu)"),
    ):
        text, log = refused(
            repo,
            "m",
            lambda **k: convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", 2, **k),
            **kw,
        )
        assert f"model 'm' has version 1 served with {repo / 'm' / 'config.pbtxt'}; version 2" in text
        assert f"instance kind: the config has KIND_CPU, this conversion asks for {asked}" in text
        assert "convert with options that match it (no --gpu and no --fp16), or convert under a new --name" in text
        assert not log.saw("exporting"), log.lines
    assert entries(repo, "m") == ["1", "config.pbtxt"]


def test_fp16_and_optimize_fit_gpu_versions_and_a_cpu_version_does_not(tmp_path):
    repo = tmp_path / "models"
    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", gpu=True)
    config = (repo / "m" / "config.pbtxt").read_bytes()
    assert b"KIND_GPU" in config
    text, _ = refused(
        repo, "m", lambda **k: convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", 2, **k)
    )
    assert "instance kind: the config has KIND_GPU, this conversion asks for KIND_CPU (no --gpu)" in text
    assert "(--gpu)" in text

    r = convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", 2, fp16=FP16)
    assert r.written and r.stages == ["onnx", "fp16"] and r.config == "kept as it is (shared with version 1)"
    r3 = convert_torch(
        convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", 3, gpu=True, optimize=Tolerance(1e-4, 1e-3)
    )
    assert r3.config == "kept as it is (shared with versions 1, 2)"
    assert (repo / "m" / "config.pbtxt").read_bytes() == config
    assert entries(repo, "m") == ["1", "2", "3", "config.pbtxt"]
    # Every version takes and gives what the one config declares, and they compute the same thing.
    paths = [repo / "m" / v / "model.onnx" for v in ("1", "2", "3")]
    assert io_of(paths[0]) == io_of(paths[1]) == io_of(paths[2])
    assert io_of(paths[1])[0][0][1] == "tensor(float)"  # --fp16 keeps FP32 inputs
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    got = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for p in paths]
    np.testing.assert_allclose(got[1], got[0], atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(got[2], got[0], atol=1e-5, rtol=1e-4)


def test_max_batch_size_and_no_batch_must_match_the_config(tmp_path):
    repo = tmp_path / "models"
    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", max_batch_size=8)

    def again(spec="x:FP32:-1,16", **kw):
        return lambda **k: convert_torch(convert_models.mlp(), [spec], str(repo), "m", 2, **kw, **k)

    text, log = refused(repo, "m", again())
    assert "max_batch_size: the config has 8, this conversion asks for 64 (--max-batch-size 64)" in text
    assert "(--max-batch-size 8)" in text and not log.saw("exporting")
    text, _ = refused(repo, "m", again("x:FP32:3,16", batched=False))
    assert "max_batch_size: the config has 8, this conversion asks for 0 (--no-batch)" in text
    assert "(--max-batch-size 8 without --no-batch)" in text
    text, _ = refused(repo, "m", again(max_batch_size=16, gpu=True))  # every difference, not the first only
    assert "max_batch_size: the config has 8, this conversion asks for 16" in text and "instance kind" in text
    assert "(--max-batch-size 8; no --gpu and no --fp16)" in text
    assert convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", 2, max_batch_size=8).written

    convert_torch(Scale(), ["x:FP32:3,4"], str(repo), "flat", batched=False)
    text, _ = refused(repo, "flat", lambda **k: convert_torch(Scale(), ["x:FP32:-1,4"], str(repo), "flat", 2, **k))
    assert "max_batch_size: the config has 0, this conversion asks for 64 (--max-batch-size 64)" in text
    assert "(--no-batch)" in text


def test_a_signature_mismatch_names_the_tensor_before_the_export(tmp_path):
    repo = tmp_path / "models"
    convert_torch(Scale(), ["x:FP32:-1,4"], str(repo), "s")

    def again(model, spec, **kw):
        return lambda **k: convert_torch(model, [spec], str(repo), "s", 2, **kw, **k)

    cases = [
        (
            again(Scale(), "x:FP32:-1,5"),
            ["input 'x': dims [4] in the config, [5] in this model", "output 'output': dims [4] in the config, [5]"],
        ),
        (
            again(Scale(), "x:INT64:-1,4"),
            [
                "input 'x': datatype FP32 in the config, INT64 in this model",
                "output 'output': datatype FP32 in the config, INT64 in this model",
            ],
        ),
        (
            again(Scale(), "y:FP32:-1,4"),
            [
                "input 'x': in the config, not in this model (its inputs: 'y')",
                "input 'y': in this model, not in the config (its inputs: 'x')",
            ],
        ),
        (
            again(Scale(), "x:FP32:-1,4", outputs=["doubled"]),
            ["output 'output': in the config, not in this model (its outputs: 'doubled')"],
        ),
        (again(RowSum(), "x:FP32:-1,4"), ["output 'output': dims [4] in the config, [] in this model"]),
    ]
    for convert, words in cases:
        text, log = refused(repo, "s", convert)
        for w in words:
            assert w in text, text
        assert "convert under a new --name (the versions of a model take and give the same tensors)" in text
        assert not log.saw("exporting"), log.lines
    assert entries(repo, "s") == ["1", "config.pbtxt"]


def test_the_check_comes_before_an_export_that_would_fail(tmp_path):
    repo = tmp_path / "models"
    convert_torch(RowSum(), ["x:FP32:-1,4,4"], str(repo), "u")
    # A model neither exporter can export, with a signature that does not fit: the misfit is what is said.
    text, log = refused(
        repo, "u", lambda **k: convert_torch(convert_models.Unexportable(), ["x:FP32:-1,3,3"], str(repo), "u", 2, **k)
    )
    assert "input 'x': dims [4, 4] in the config, [3, 3] in this model" in text and not log.saw("exporting")
    # The same model with a fitting signature gets as far as the export, which fails as it must.
    text, log = refused(
        repo, "u", lambda **k: convert_torch(convert_models.Unexportable(), ["x:FP32:-1,4,4"], str(repo), "u", 2, **k)
    )
    assert "could not be exported to ONNX" in text and log.saw("exporting")


def test_sklearn_versions_fit_the_config_or_are_refused(tmp_path):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    repo = tmp_path / "models"
    convert_sklearn(LogisticRegression().fit(x, y), ["features:FP32:-1,4"], str(repo), "c")
    config = (repo / "c" / "config.pbtxt").read_bytes()

    forest = RandomForestClassifier(n_estimators=4, max_depth=3, random_state=0)
    text, log = refused(
        repo,
        "c",
        lambda **k: convert_sklearn(forest.fit(x, y), ["features:FP32:-1,4"], str(repo), "c", 2, **k),
        gpu=True,
    )
    assert "instance kind: the config has KIND_CPU, this conversion asks for KIND_GPU (--gpu)" in text
    assert not log.saw("converting with skl2onnx")
    x5 = rng.standard_normal((120, 5)).astype(np.float32)
    text, log = refused(
        repo, "c", lambda **k: convert_sklearn(forest.fit(x5, y), ["features:FP32:-1,5"], str(repo), "c", 2, **k)
    )
    assert "input 'features': dims [4] in the config, [5] in this model" in text
    assert not log.saw("converting with skl2onnx")
    three = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int))
    text, log = refused(repo, "c", lambda **k: convert_sklearn(three, ["features:FP32:-1,4"], str(repo), "c", 2, **k))
    # the outputs are known once skl2onnx has converted the model: refused then, before any parity check
    assert "output 'probabilities': dims [2] in the config, [3] in this model" in text
    assert log.saw("converting with skl2onnx") and not log.saw("running the original model")

    r = convert_sklearn(forest.fit(x, y), ["features:FP32:-1,4"], str(repo), "c", 2)
    assert r.written and r.config == "kept as it is (shared with version 1)"
    assert (repo / "c" / "config.pbtxt").read_bytes() == config
    assert io_of(repo / "c" / "1" / "model.onnx") == io_of(repo / "c" / "2" / "model.onnx")


def test_force_replaces_a_version_within_the_shared_config_or_the_only_version_with_its_config(tmp_path):
    repo = tmp_path / "models"
    for v in (1, 2):
        convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", v)
    config = (repo / "m" / "config.pbtxt").read_bytes()
    old = (repo / "m" / "1" / "model.onnx").read_bytes()
    text, _ = refused(
        repo,
        "m",
        lambda **k: convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", 1, **k),
        force=True,
        max_batch_size=32,
    )
    assert "model 'm' has version 2 served with" in text and "max_batch_size: the config has 64" in text
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == old
    r = convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", 1, force=True, exporter="legacy")
    assert r.written and r.config.startswith("kept as it is (shared with version 2)")
    assert r.config.endswith("its version_policy serves version(s) 2, not 1")  # the default: the latest only
    assert (repo / "m" / "config.pbtxt").read_bytes() == config

    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "solo")
    r = convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "solo", 1, force=True, max_batch_size=32)
    assert r.config == "written" and "max_batch_size: 32" in (repo / "solo" / "config.pbtxt").read_text()


def test_a_hand_edited_config_is_kept_byte_for_byte_and_its_version_policy_noted(tmp_path):
    repo = tmp_path / "models"
    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m")
    path = repo / "m" / "config.pbtxt"
    edited = (
        path.read_text()
        .replace("max_queue_delay_microseconds: 500", "max_queue_delay_microseconds: 2000")
        .replace("count: 1", "count: 2")
        + "version_policy { specific { versions: 1 } }\n"
    )
    assert "2000" in edited and "count: 2" in edited
    path.write_text(edited)
    r = convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", 2)
    assert r.written and path.read_text() == edited
    assert r.config == "kept as it is (shared with version 1); its version_policy serves version(s) 1, not 2"
    assert f"config     {r.config}" in table(r)


def test_versions_without_a_config_and_a_config_without_versions(tmp_path):
    repo = tmp_path / "models"
    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "bare")
    (repo / "bare" / "config.pbtxt").unlink()
    text, _ = refused(
        repo, "bare", lambda **k: convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "bare", 2, **k)
    )
    assert "has version(s) 1 and no config.pbtxt" in text and "convert under a new --name" in text

    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "lone")
    for f in (repo / "lone" / "1").iterdir():
        f.unlink()
    (repo / "lone" / "1").rmdir()
    config = (repo / "lone" / "config.pbtxt").read_bytes()
    text, _ = refused(
        repo,
        "lone",
        lambda **k: convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "lone", 1, **k),
        max_batch_size=32,
    )
    assert f"model 'lone' has {repo / 'lone' / 'config.pbtxt'} and no version yet; version 1 does not fit it" in text
    assert f"No version uses it yet: remove {repo / 'lone' / 'config.pbtxt'}" in text
    assert convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "lone", 1).written
    assert (repo / "lone" / "config.pbtxt").read_bytes() == config


def test_a_config_that_is_a_folder_is_refused_naming_it(tmp_path):
    """A model whose config.pbtxt is a folder stopped the conversion with IsADirectoryError's
    traceback instead of saying what is wrong; nothing may be written."""
    repo = tmp_path / "models"
    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "odd")
    config = repo / "odd" / "config.pbtxt"
    config.unlink()
    config.mkdir()
    listing = entries(repo, "odd")
    with pytest.raises(ConversionError) as e:
        convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "odd", 2)
    assert f"{config} cannot be read (Is a directory)" in str(e.value), e.value
    assert entries(repo, "odd") == listing and config.is_dir() and not list(config.iterdir())


def test_a_config_that_lists_no_tensors_is_compared_with_the_latest_version(tmp_path):
    repo = tmp_path / "models"
    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "auto")
    path = repo / "auto" / "config.pbtxt"
    path.write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 64\n')  # the server completes the tensors
    text, _ = refused(
        repo,
        "auto",
        lambda **k: convert_torch(convert_models.cnn(), ["image:FP32:-1,3,16,16"], str(repo), "auto", 2, **k),
    )
    assert "input 'x': in version 1's model, not in this model (its inputs: 'image')" in text
    assert "output 'output': dims [4] in version 1's model, [5] in this model" in text
    assert convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "auto", 2).written
    assert path.read_text() == 'platform: "onnxruntime_onnx"\nmax_batch_size: 64\n'


def test_a_config_changed_during_the_conversion_is_not_overwritten(tmp_path):
    repo = tmp_path / "models"
    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m")
    path = repo / "m" / "config.pbtxt"

    def edit_meanwhile(line: str) -> None:
        if line.startswith("parity check"):
            path.write_text(path.read_text() + "# edited while converting\n")

    with pytest.raises(ConversionError, match="changed while this conversion ran"):
        convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m", 2, progress=edit_meanwhile)
    assert path.read_text().endswith("# edited while converting\n")
    assert entries(repo, "m") == ["1", "config.pbtxt"] and not [p for p in os.listdir(repo) if p.startswith(".")]


def test_output_dims_fit_by_where_they_come_from(tmp_path):
    """-1 in the config is any size; a -1 read from an ONNX model states no size and fits a fixed
    one; a size seen to change when the original model runs does not."""
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'max_batch_size: 8\ninput { name: "x" data_type: TYPE_FP32 dims: [4] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [4, -1] }\n'
    )
    job = Job(
        specs=[], output_names=[], reference=None, repository=str(tmp_path), name="m", version=2, max_batch_size=8
    )
    shared = shared_config(job)
    x = [{"name": "x", "datatype": "FP32", "dims": [4]}]
    require_fit(job, shared, x, [{"name": "y", "datatype": "FP32", "dims": [4, 7]}], observed=True)
    require_fit(job, shared, x, [{"name": "y", "datatype": "FP32", "dims": [-1, 7]}])  # from an ONNX model
    with pytest.raises(ConversionError, match=r"output 'y': dims \[4, -1\] in the config, \[-1, 7\] in this model"):
        require_fit(job, shared, x, [{"name": "y", "datatype": "FP32", "dims": [-1, 7]}], observed=True)
    with pytest.raises(ConversionError, match=r"input 'x': dims \[4\] in the config, \[-1\] in this model"):
        require_fit(job, shared, [{"name": "x", "datatype": "FP32", "dims": [-1]}])  # inputs are declared alike


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "convert", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_command_line_documents_gpu_and_max_batch_size_and_refuses_a_gpu_version(tmp_path):
    helped = cli("torch", "--help")
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    assert "--max-batch-size N max_batch_size in the config" in text and "(default: 64;" in text
    assert "--gpu instance_group kind KIND_GPU in the config" in text and "Default: off, KIND_CPU" in text
    assert "implies --gpu; default: off" in text

    repo = tmp_path / "models"
    convert_torch(convert_models.mlp(), ["x:FP32:-1,16"], str(repo), "m")
    config = (repo / "m" / "config.pbtxt").read_bytes()
    done = cli(
        "torch", "--model", "convert_models:mlp", "--input", "x:FP32:-1,16", "--repository", str(repo), "--name", "m",
        "--version", "2", "--gpu",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "batchgate convert: error: model 'm' has version 1 served with" in done.stderr
    assert "instance kind: the config has KIND_CPU, this conversion asks for KIND_GPU (--gpu)" in done.stderr
    assert (repo / "m" / "config.pbtxt").read_bytes() == config and entries(repo, "m") == ["1", "config.pbtxt"]
