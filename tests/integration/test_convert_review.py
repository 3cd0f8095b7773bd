"""Converter input checked before the export (repository, --samples), --opset kept or refused,
write failures told as errors, and the hint of a refused version beside a model of another platform."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from torch import nn

from batchgate.converters import ConversionError, convert_torch
from batchgate.converters.pipeline import Job, write

TESTS = Path(__file__).resolve().parents[1]


class Scale(nn.Module):
    def forward(self, x):
        return x * 2


class Log(list):
    """The progress lines of a conversion."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def exported(self) -> bool:
        return any(line.startswith("exporting") for line in self)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "convert", "torch", "--model", "convert_models:mlp"]
        + ["--input", "x:FP32:-1,16", "--name", "m", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_an_unusable_repository_is_refused_before_the_export_without_a_traceback(tmp_path):
    plain = tmp_path / "plainfile"
    plain.write_text("")
    for repo, words in (
        (plain / "models", f"--repository {plain}/models: {plain} is not a directory"),
        ("/proc/batchgate-models", "--repository /proc/batchgate-models: cannot write in /proc"),
    ):
        done = cli("--repository", str(repo))
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and "exporting" not in done.stderr, done.stderr
        assert f"batchgate convert: error: {words}" in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("batchgate convert: error:")
    # A model folder that is a file.
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "m").write_text("")
    log = Log()
    with pytest.raises(ConversionError, match="is not a directory"):
        convert_torch(Scale(), ["x:FP32:-1,4"], str(tmp_path / "repo"), "m", progress=log)
    assert not log.exported()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only directory")
def test_a_read_only_repository_is_refused_before_the_export(tmp_path):
    repo = tmp_path / "ro"
    repo.mkdir()
    repo.chmod(0o555)
    try:
        log = Log()
        with pytest.raises(ConversionError, match="cannot write in"):
            convert_torch(Scale(), ["x:FP32:-1,4"], str(repo), "m", progress=log)
        assert not log.exported() and os.listdir(repo) == []
    finally:
        repo.chmod(0o755)


def test_a_failed_write_is_a_conversion_error(tmp_path):
    """write() once let OSError out (a traceback from the command): here its mkdir fails."""
    plain = tmp_path / "plainfile"
    plain.write_text("")
    target = plain / "models" / "m" / "1"
    job = Job(specs=[], output_names=[], reference=None, repository=str(plain / "models"), name="m")
    model = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    with pytest.raises(ConversionError, match=r"writing .*plainfile/models/m/1 failed \(Not a directory\)"):
        write(model, job, target, "", {})


# A reader in a process of its own: says "watching", then looks at the folder until the stop
# file appears; exits 1 the first time the folder is missing.
WATCH = """
import os, sys
folder, stop = sys.argv[1], sys.argv[2]
print("watching", flush=True)
while not os.path.exists(stop):
    for _ in range(1000):
        if not os.path.isdir(folder):
            print("missing", flush=True)
            sys.exit(1)
"""


def test_force_puts_the_new_version_where_the_old_one_was_in_one_step(tmp_path):
    """--force renamed the old version folder away and then the new one in: a repository poll
    between the two renames found the model without that version, and a polling server unloaded
    it. The two folders now trade places in one step (``exchange``: Linux's renameat2 with
    RENAME_EXCHANGE): a reader looking all the while, from another process, never finds it missing."""
    from batchgate.converters.pipeline import exchange

    repo = tmp_path / "models"
    target = repo / "m" / "1"
    job = Job(specs=[], output_names=[], reference=None, repository=str(repo), name="m", force=True)
    model = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    write(model, job, target, "", {"n": 0})
    stop = tmp_path / "stop"
    watcher = subprocess.Popen([sys.executable, "-c", WATCH, str(target), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "watching"
        for n in range(1, 301):
            write(model, job, target, "", {"n": n})
            if watcher.poll() is not None:
                break
    finally:
        stop.touch()
        out, _ = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, f"the version folder was missing at some moment ({out.strip()}, after {n} writes)"
    assert json.loads((target / "conversion.json").read_text()) == {"n": 300}
    assert sorted(os.listdir(repo)) == ["m"] and sorted(os.listdir(repo / "m")) == ["1", "config.pbtxt"]

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "in-a").touch()
    assert exchange(a, b) and os.listdir(b) == ["in-a"] and os.listdir(a) == []
    with pytest.raises(FileNotFoundError):
        exchange(a, tmp_path / "nowhere")


def test_bad_samples_are_told_before_the_export(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not numpy")
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, 4), np.float32))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, y=np.zeros((2, 4), np.float32))
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, x=np.array([object()], dtype=object))
    empty = tmp_path / "empty.npz"  # no rows: it was taken, and the check compared nothing
    np.savez(empty, x=np.zeros((0, 4), np.float32))
    for path, words in (
        (text, f"--samples {text}: not an .npz file"),
        (npy, f"--samples {npy}: not an .npz file"),
        (wrong, f"--samples {wrong}: no array for input(s) x (it holds y)"),
        (pickled, f"--samples {pickled}: cannot read 'x'"),
        (tmp_path / "none.npz", "no such file"),
        (tmp_path, "not a file"),
        (empty, f"--samples {empty}: 'x' has shape [0, 4], no values: the parity check would compare nothing"),
    ):
        log = Log()
        with pytest.raises(ConversionError) as e:
            convert_torch(Scale(), ["x:FP32:-1,4"], str(tmp_path / "repo"), "m", samples=str(path), progress=log)
        assert words in str(e.value) and "pickled" not in str(e.value)
        assert not log.exported(), (path, log)
    assert not (tmp_path / "repo").exists()


def test_samples_whose_inputs_differ_in_rows_are_told_before_the_export(tmp_path):
    from convert_models import TwoInTwoOut

    samples = tmp_path / "rows.npz"
    np.savez(samples, tokens=np.zeros((3, 5), np.int64), dense=np.zeros((2, 3), np.float32))
    log = Log()
    with pytest.raises(ConversionError) as e:
        convert_torch(TwoInTwoOut(), ["tokens:INT64:-1,5", "dense:FP32:-1,3"], str(tmp_path / "repo"), "two",
                      samples=str(samples), progress=log)  # fmt: skip
    assert "the inputs' arrays have different numbers of rows ({'tokens': 3, 'dense': 2})" in str(e.value)
    assert not log.exported() and not (tmp_path / "repo").exists()


def test_samples_whose_named_dimension_differs_between_inputs_are_told_before_the_export(tmp_path):
    """``ids`` and ``mask`` share ``seq``: samples of 5 ids and 7 mask values were taken, and the
    model failed on them after the export."""
    from convert_models import SequenceEncoder

    samples = tmp_path / "rows.npz"
    np.savez(samples, ids=np.zeros((2, 5), np.int64), mask=np.ones((2, 7), np.float32))
    log = Log()
    with pytest.raises(ConversionError) as e:
        convert_torch(SequenceEncoder(), ["ids:INT64:-1,seq", "mask:FP32:-1,seq"], str(tmp_path / "repo"), "seq",
                      samples=str(samples), progress=log)  # fmt: skip
    assert "dimension 'seq' has size 5 in 'ids', 7 in 'mask'" in str(e.value)
    assert not log.exported() and not (tmp_path / "repo").exists()


def test_opset_is_what_was_asked_or_refused(tmp_path):
    repo = tmp_path / "models"
    log = Log()
    result = convert_torch(Scale(), ["x:FP32:-1,4"], str(repo), "old", opset=13, progress=log)
    assert onnx.load(str(repo / "old" / "1" / "model.onnx")).opset_import[0].version == 13
    assert "legacy exporter, opset 13" in result.source
    record = json.loads((repo / "old" / "1" / "conversion.json").read_text())
    assert record["opset"] == 13 and record["exporter"] == "legacy"
    assert "it wrote opset 18, not the --opset 13 asked for" in record["exporter_fallback_after"]
    assert any(line.startswith("exported with the legacy exporter after: dynamo exporter") for line in log)
    with pytest.raises(ConversionError) as e:
        convert_torch(Scale(), ["x:FP32:-1,4"], str(repo), "dyn", exporter="dynamo", opset=13)
    assert "dynamo exporter: it wrote opset 18, not the --opset 13 asked for" in str(e.value)
    assert "--exporter legacy or auto" in str(e.value)
    assert not (repo / "dyn").exists()
    convert_torch(Scale(), ["x:FP32:-1,4"], str(repo), "new", opset=20)
    assert onnx.load(str(repo / "new" / "1" / "model.onnx")).opset_import[0].version == 20


def test_a_version_refused_beside_a_torchscript_model_names_the_platform_not_the_tensors(tmp_path):
    repo = tmp_path / "models"
    (repo / "ts" / "1").mkdir(parents=True)
    (repo / "ts" / "1" / "model.pt").write_bytes(b"\x00")
    (repo / "ts" / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\nmax_batch_size: 64\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "output" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )
    with pytest.raises(ConversionError) as e:
        convert_torch(Scale(), ["x:FP32:-1,4"], str(repo), "ts", 2)
    text = str(e.value)
    assert "platform: the config has 'pytorch_libtorch'" in text
    assert "take and give the same tensors" not in text
    assert text.endswith(
        "convert under a new --name (the versions of a model share its platform and model file, which this "
        "conversion cannot change)."
    )
