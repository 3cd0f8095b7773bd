"""``batchgate score`` as a real subprocess over a real model repository: each input format, both
output formats, column mapping and kept columns, integer and BYTES inputs, rejects with their
reason, a chunk the model fails bisected down to its failing rows, and a run killed mid-way and
resumed giving the very bytes of an uninterrupted run."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto

from batchgate.demo import _save, classifier_model, identity_model
from route_support import failing_classifier

BATCHGATE = [sys.executable, "-m", "batchgate.cli", "score"]


def score(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*BATCHGATE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("score_models"))
    # (priority levels: batch scoring asks for the model's lowest, a level it has)
    _save(
        classifier_model(),
        root,
        "clf",
        config="max_batch_size: 64\ndynamic_batching { priority_levels: 2 default_priority_level: 1 }\n",
    )
    _save(failing_classifier(), root, "clf_bad", config="max_batch_size: 8\n")
    _save(identity_model("ints", TensorProto.INT32, ("batch", 3)), root, "ints", config="max_batch_size: 16\n")
    _save(identity_model("texts", TensorProto.STRING, ("batch", 1)), root, "texts", config="max_batch_size: 16\n")
    return root


def _features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 4), dtype=np.float32) * 0.5


def _expected(repo: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(os.path.join(repo, "clf", "1", "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _parts(out: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(os.path.join(out, "part-*.parquet")))])


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _rejects(out: str) -> list[dict]:
    with open(os.path.join(out, "_rejects.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_without_the_score_extra_the_missing_package_and_the_extra_are_named(repo, tmp_path):
    """After `make serve` (the server alone), `batchgate score` ended in a traceback,
    "ModuleNotFoundError: No module named 'pyarrow'"; the other commands name their extra."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\n\nsys.modules['pyarrow'] = None  # import pyarrow fails\n")
    src = tmp_path / "in.csv"
    src.write_text("a,b,c,d\n0.1,0.2,0.3,0.4\n")
    path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [*BATCHGATE, "--model", "clf", "--model-repository", repo, "--input", str(src), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "batchgate score: pyarrow is missing: pip install 'batchgate[score]'" in done.stderr
    assert not os.path.exists(tmp_path / "o")


def test_a_target_given_as_a_url_is_refused_before_anything_runs(tmp_path):
    """`--target http://h:8001` (as tritonclient users write addresses) failed the run "errors
    resolving http://h:8001 ... Misformatted domain name"."""
    src = tmp_path / "in.csv"
    src.write_text("a,b,c,d\n0.1,0.2,0.3,0.4\n")
    done = score(
        "--model", "clf", "--target", "http://127.0.0.1:8001", "--input", str(src), "--out", str(tmp_path / "o")
    )
    assert done.returncode == 2
    assert "--target must be HOST:PORT (no scheme), not 'http://127.0.0.1:8001'" in done.stderr


def test_csv_to_parquet_keeps_columns_rejects_bad_rows_and_matches_onnx_runtime(repo, tmp_path):
    x = _features(1000)
    rows = [f"{i},{','.join(repr(float(v)) for v in x[i])},tag{i}" for i in range(1000)]
    rows[7] = "7,,0.1,0.2,0.3,tag7"  # a missing value
    rows[8] = "8,0.1,abc,0.2,0.3,tag8"  # not a number: column b reads as text, this row is refused
    src = tmp_path / "in.csv"
    src.write_text("id,a,b,c,d,tag\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out,
                 "--keep", "id,tag", "--columns", "features=a,b,c,d", "--batch-size", "300")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1000 rows: 998 scored, 2 rejected" in done.stderr
    table = _parts(out)
    assert table.column_names == ["id", "tag", "probabilities"]
    assert pa.types.is_fixed_size_list(table.schema.field("probabilities").type)
    ids = table.column("id").to_numpy()
    assert list(ids) == [i for i in range(1000) if i not in (7, 8)]  # input order, rejects left out
    got = np.array(table.column("probabilities").to_pylist(), np.float32)
    np.testing.assert_allclose(got, _expected(repo, x[ids]), rtol=1e-5)
    rejects = _rejects(out)
    assert [(r["row"], r["id"], r["tag"]) for r in rejects] == [(7, 7, "tag7"), (8, 8, "tag8")]
    assert "missing value" in rejects[0]["reason"] and "not a float32" in rejects[1]["reason"]
    manifest = _json(os.path.join(out, "_manifest.json"))
    assert manifest["done"] and manifest["rows"] == {"input": 1000, "scored": 998, "rejected": 2, "failed": 0}
    assert len(manifest["parts"]) == 4


def test_text_in_a_number_column_early_rejects_only_its_row_under_the_default_columns(repo, tmp_path):
    """Without --columns a model of one input takes every numeric column but the kept ones, typed
    from the file's first rows: one text cell there made its column text, the input lost a
    column, and every row was refused (exit 0). When all the columns left make the input's
    width, they are taken, and the bad cell refuses its row alone."""
    x = _features(400)
    rows = [f"{i},{','.join(repr(float(v)) for v in x[i])}" for i in range(400)]
    rows[5] = "5,0.1,abc,0.2,0.3"
    src = tmp_path / "in.csv"
    src.write_text("id,a,b,c,d\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out, "--keep", "id")
    assert done.returncode == 0, done.stderr
    assert "400 rows: 399 scored, 1 rejected" in done.stderr
    assert [r["row"] for r in _rejects(out)] == [5]


def test_a_2d_npy_feeds_a_model_of_one_input_without_columns(repo, tmp_path):
    """A 2-D .npy reads as one list column named 'input'; the default mapping took numeric
    columns only and refused it (exit 2), and the name it needed was written nowhere."""
    x = _features(50)
    src = tmp_path / "in.npy"
    np.save(src, x)
    out = str(tmp_path / "out")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out)
    assert done.returncode == 0, done.stderr
    got = np.array(_parts(out).column("probabilities").to_pylist(), np.float32)
    np.testing.assert_allclose(got, _expected(repo, x), rtol=1e-5)


def test_parquet_nan_rejected_unless_allowed_and_csv_output_flattened(repo, tmp_path):
    x = _features(50)
    x[3, 2] = np.nan
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)}), src)
    out = str(tmp_path / "out")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out, "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert "NaN or infinity" in _rejects(out)[0]["reason"] and _rejects(out)[0]["row"] == 3
    table = pcsv.read_csv(os.path.join(out, "part-00000.csv"))
    assert table.column_names == ["probabilities_0", "probabilities_1", "probabilities_2"] and table.num_rows == 49
    out2 = str(tmp_path / "out2")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out2, "--allow-nan")
    assert done.returncode == 0 and "50 scored" in done.stderr


def test_jsonl_npy_and_npz_inputs(repo, tmp_path):
    x = _features(40, seed=2)
    jl = tmp_path / "in.jsonl"
    jl.write_text("".join(json.dumps({"key": i, "features": [float(v) for v in x[i]]}) + "\n" for i in range(40)))
    npy, npz = tmp_path / "in.npy", tmp_path / "in.npz"
    np.save(npy, x)
    np.savez(npz, features=x)
    want = _expected(repo, x)
    for src, extra in ((jl, ["--keep", "key"]), (npy, ["--columns", "features=input"]), (npz, [])):
        out = str(tmp_path / f"out_{src.suffix[1:]}")
        done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out, *extra)
        assert done.returncode == 0, (src, done.stderr)
        got = np.array(_parts(out).column("probabilities").to_pylist(), np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_integer_and_bytes_inputs(repo, tmp_path):
    ints = np.arange(30, dtype=np.int64).reshape(10, 3)
    src = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"INPUT": pa.FixedSizeListArray.from_arrays(pa.array(ints.reshape(-1)), 3)}), src)
    out = str(tmp_path / "ints")
    assert score("--model", "ints", "--model-repository", repo, "--input", str(src), "--output", out).returncode == 0
    assert np.array(_parts(out).column("OUTPUT").to_pylist()).tolist() == ints.tolist()
    bad = tmp_path / "frac.csv"
    bad.write_text("INPUT_0,INPUT_1,INPUT_2\n1,2,3\n1.5,2,3\n")
    out = str(tmp_path / "frac")
    done = score("--model", "ints", "--model-repository", repo, "--input", str(bad), "--output", out,
                 "--columns", "INPUT=INPUT_0,INPUT_1,INPUT_2")  # fmt: skip
    assert done.returncode == 0 and "not a whole number" in _rejects(out)[0]["reason"]
    texts = tmp_path / "t.csv"
    texts.write_text("INPUT\nhello\nwörld\n")
    out = str(tmp_path / "texts")
    done = score("--model", "texts", "--model-repository", repo, "--input", str(texts), "--output", out)
    assert done.returncode == 0, done.stderr
    assert _parts(out).column("OUTPUT").to_pylist() == [["hello"], ["wörld"]]  # [rows, 1] kept as a list


def test_a_chunk_the_model_fails_is_bisected_to_the_failing_rows(repo, tmp_path):
    x = _features(64, seed=3)
    x[[5, 40], 0] = 2.0  # the failing model fails on a feature >= 1
    src = tmp_path / "in.npy"
    np.save(src, x)
    out = str(tmp_path / "out")
    done = score("--model", "clf_bad", "--model-repository", repo, "--input", str(src), "--output", out,
                 "--columns", "features=input", "--max-rejects", "5")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "62 scored, 0 rejected by their checks, 2 failed by the model" in done.stderr
    assert [(r["row"], r["outcome"]) for r in _rejects(out)] == [(5, "failed"), (40, "failed")]
    done = score("--model", "clf_bad", "--model-repository", repo, "--input", str(src), "--output", out + "2",
                 "--columns", "features=input", "--max-rejects", "1")  # fmt: skip
    assert done.returncode == 1 and "more than --max-rejects 1" in done.stderr


def test_max_rejects_stops_the_run_at_the_part_that_passes_it_and_a_rerun_resumes(repo, tmp_path):
    """--max-rejects was judged once the whole input was scored: an input of bad rows ran to its
    end before exit 1. The run stops after the part whose rejects pass the limit (in input
    order), keeping the parts recorded and the rejects so far; a rerun with a larger limit
    resumes from them and ends with the bytes of an uninterrupted run."""
    x = _features(10_000, seed=11)
    x[::2, 0] = np.nan  # half the rows of every part refused: 50 of each 100
    src = tmp_path / "in.npy"
    np.save(src, x)
    args = ["--model", "clf", "--model-repository", repo, "--input", str(src), "--columns", "features=input",
            "--batch-size", "100", "--concurrency", "2", "--quiet"]  # fmt: skip
    out = str(tmp_path / "out")
    done = score(*args, "--output", out, "--max-rejects", "120")
    assert done.returncode == 1 and "more than --max-rejects 120" in done.stderr, done.stderr
    assert "stopped after 300 rows" in done.stderr and "Traceback" not in done.stderr, done.stderr
    manifest = _json(os.path.join(out, "_manifest.json"))
    assert not manifest["done"] and [p["index"] for p in manifest["parts"]] == [0, 1, 2]
    names = {os.path.basename(f) for f in glob.glob(os.path.join(out, "*-*"))}
    assert names == {p["file"] for p in manifest["parts"]} | {p["rejects_file"] for p in manifest["parts"]}
    assert [r["row"] for r in _rejects(out)] == list(range(0, 300, 2))
    # the same limit: the kept parts already pass it, so the rerun stops at once
    done = score(*args, "--output", out, "--max-rejects", "120")
    assert done.returncode == 1 and "3 kept from an earlier run" in done.stderr, done.stderr
    assert len(_json(os.path.join(out, "_manifest.json"))["parts"]) == 3
    done = score(*args, "--output", out, "--max-rejects", "5000")
    assert done.returncode == 0 and "3 kept from an earlier run" in done.stderr, done.stderr
    assert "10000 rows: 5000 scored, 5000 rejected" in done.stderr and len(_rejects(out)) == 5000
    clean = str(tmp_path / "clean")
    assert score(*args, "--output", clean).returncode == 0
    _same_parts(clean, out, 100)


def test_an_input_inside_the_output_folder_is_refused_before_anything_is_written(repo, tmp_path):
    """An input named like a part inside the --output folder (a rerun of an earlier run's part,
    say) was overwritten by the run's own part-00000.parquet. Refused at start, exit 2, the file
    untouched; a link in the folder to a file elsewhere too (the run would replace the link), and
    --rejects naming the input file."""
    out = tmp_path / "out"
    out.mkdir()
    src = out / "part-00000.parquet"
    pq.write_table(
        pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(_features(10).reshape(-1)), 4)}), src
    )
    before = src.read_bytes()
    elsewhere = tmp_path / "in.npy"
    np.save(elsewhere, _features(10))
    (out / "link.npy").symlink_to(elsewhere)
    for given, output in ((src, out), (out / "link.npy", out), (src, f"{tmp_path}/./out/"), (src, tmp_path)):
        done = score("--model", "clf", "--model-repository", repo, "--input", str(given), "--output", str(output))
        assert done.returncode == 2 and "is inside the --output folder" in done.stderr, (given, output, done.stderr)
        assert "Traceback" not in done.stderr
    assert src.read_bytes() == before and sorted(os.listdir(out)) == ["link.npy", "part-00000.parquet"]
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "out"]
    done = score("--model", "clf", "--model-repository", repo, "--input", str(elsewhere), "--output",
                 str(tmp_path / "other"), "--rejects", str(elsewhere))  # fmt: skip
    assert done.returncode == 2 and "is the input file" in done.stderr, done.stderr
    # the same input beside the folder: the folder's own part-00000.parquet, which no manifest
    # records, is not overwritten either (it was); without it the run scores
    done = score("--model", "clf", "--model-repository", repo, "--input", str(elsewhere), "--output", str(out))
    assert done.returncode == 2 and "no manifest of batchgate score records" in done.stderr, done.stderr
    assert src.read_bytes() == before
    src.rename(tmp_path / "kept.parquet")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(elsewhere), "--output", str(out))
    assert done.returncode == 0, done.stderr


def test_a_killed_run_resumes_to_the_same_bytes(repo, tmp_path):
    n = 200_000
    x = _features(n, seed=4)
    src = tmp_path / "big.parquet"
    pq.write_table(
        pa.table({"id": np.arange(n), "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)}), src
    )
    args = ["--model", "clf", "--model-repository", repo, "--input", str(src), "--keep", "id",
            "--batch-size", "5000", "--concurrency", "1", "--quiet"]  # fmt: skip
    clean = str(tmp_path / "clean")
    assert score(*args, "--output", clean).returncode == 0
    resumed = str(tmp_path / "resumed")
    p = subprocess.Popen([*BATCHGATE, *args, "--output", resumed], stderr=subprocess.PIPE, text=True)
    manifest = os.path.join(resumed, "_manifest.json")
    end = time.monotonic() + 60
    while not (os.path.exists(manifest) and len(_json(manifest)["parts"]) >= 5):
        assert time.monotonic() < end and p.poll() is None, "no parts were written"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    assert not _json(manifest)["done"]
    done = score(*args, "--output", resumed)
    assert done.returncode == 0, done.stderr
    assert "kept from an earlier run" in done.stderr
    _same_parts(clean, resumed, 40)


def _same_parts(clean: str, other: str, count: int) -> None:
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(clean, "part-*")))
    assert len(names) == count
    assert names == sorted(os.path.basename(f) for f in glob.glob(os.path.join(other, "part-*")))
    for name in names:
        with open(os.path.join(clean, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() == b.read(), name


def test_a_server_that_dies_mid_run_stops_it_and_a_rerun_resumes(repo, tmp_path):
    """The target killed mid-run: the scorer retries (--max-retries 2), then stops with exit 3
    instead of marking the remaining rows failed; rerun against a new server, it keeps the parts
    written and ends with the same bytes as a clean run."""
    from processes import Proc, serve_args

    x = _features(64 * 300, seed=8)
    src = tmp_path / "in.npy"
    np.save(src, x)
    common = ["--model", "clf", "--protocol", "grpc", "--input", str(src), "--columns", "features=input",
              "--batch-size", "64", "--concurrency", "1", "--max-retries", "2", "--quiet"]  # fmt: skip
    first = Proc(serve_args(repo))
    out, clean = str(tmp_path / "out"), str(tmp_path / "clean")
    try:
        first.wait_ready()
        run = subprocess.Popen([*BATCHGATE, *common, "--target", first.grpc, "--output", out], stderr=subprocess.PIPE)
        manifest = os.path.join(out, "_manifest.json")
        end = time.monotonic() + 60
        while not (os.path.exists(manifest) and len(_json(manifest)["parts"]) >= 5):
            assert time.monotonic() < end and run.poll() is None, "no parts were written"
            time.sleep(0.005)
    finally:
        first.kill()
    stderr = run.communicate(timeout=60)[1].decode()
    assert run.returncode == 3 and "run again to resume" in stderr, stderr
    assert not _json(manifest)["done"] and 5 <= len(_json(manifest)["parts"]) < 300
    assert not os.path.exists(os.path.join(out, "_rejects.jsonl"))  # no row was marked failed
    second = Proc(serve_args(repo))
    try:
        second.wait_ready()
        done = score(*common, "--target", second.grpc, "--output", out)
        assert done.returncode == 0 and "kept from an earlier run" in done.stderr, done.stderr
        assert score(*common, "--target", second.grpc, "--output", clean).returncode == 0
    finally:
        second.kill()
    _same_parts(clean, out, 300)


def test_bad_arguments_are_named(repo, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("a,b\n1,2\n")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", str(tmp_path / "o"),
                 "--columns", "nope=a")  # fmt: skip
    assert done.returncode == 2 and "has no input 'nope'" in done.stderr
    done = score("--model", "missing", "--model-repository", repo, "--input", str(src), "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and "missing" in done.stderr
    bad = tmp_path / "in.xlsx"
    bad.write_text("x")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(bad), "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and "unknown format '.xlsx'" in done.stderr
    # each of these was a traceback (and --rejects on a folder wrote FOLDER.partial beside it);
    # a path as the model loaded one from outside the repository
    fake = tmp_path / "fake.npz"
    fake.write_text("not a zip")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = str(tmp_path / "o2")
    for args, words in (
        (["--input", str(fake), "--output", out], "batchgate score: ValueError"),
        (["--input", str(src), "--output", str(a_file)], "is a file, not a folder"),
        (["--input", str(src), "--output", out, "--rejects", str(tmp_path)], "is a folder, not a file"),
        (["--input", str(src), "--output", out, "--model", "../score_models/clf"], "--model must be a model name"),
    ):
        model = [] if "--model" in args else ["--model", "clf"]
        done = score(*model, "--model-repository", repo, *args)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    assert not os.path.exists(f"{tmp_path}.partial")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_through_a_server_requests_are_marked_offline_and_counted_apart(repo, tmp_path, protocol):
    import urllib.request

    from processes import Proc, serve_args

    x = _features(300, seed=5)
    src = tmp_path / "in.npy"
    np.save(src, x)
    p = Proc(serve_args(repo))
    try:
        p.wait_ready()
        target = p.grpc if protocol == "grpc" else p.http
        out = str(tmp_path / "out")
        done = score("--model", "clf", "--target", target, "--protocol", protocol, "--input", str(src),
                     "--output", out, "--columns", "features=input", "--batch-size", "100")  # fmt: skip
        assert done.returncode == 0, done.stderr
        got = np.array(_parts(out).column("probabilities").to_pylist(), np.float32)
        np.testing.assert_allclose(got, _expected(repo, x), rtol=1e-5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics", timeout=20).read().decode()
        offline = [ln for ln in text.splitlines() if ln.startswith('batchgate_offline_requests_total{model="clf"}')]
        # 3 chunks of 100 rows, each sent as 64 + 36 rows (max_batch_size 64): 6 requests, all offline
        assert offline and float(offline[0].split()[-1]) == 6, offline
    finally:
        p.kill()
    done = score("--model", "clf", "--target", "127.0.0.1:1", "--protocol", protocol, "--input", str(src),
                 "--output", str(tmp_path / "none"))  # fmt: skip
    # the server is unreachable: the run stops (exit 3), it does not mark every row failed
    assert done.returncode == 3 and "cannot read model 'clf'" in done.stderr and "resume" in done.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_through_mtls_with_a_rate_limited_key_the_servers_retry_after_is_waited(repo, tmp_path, protocol):
    """A server asking for client certificates, a key limited to 4 requests/s (burst 1): the run
    scores every row, each refused request waits the server's Retry-After (at least a second;
    backing off on its own schedule would come back after 50 ms) and is sent again. Without the
    client certificate, or with a wrong key, the run stops with exit 3."""
    import yaml

    from batchgate.security.auth import hash_token, new_token
    from processes import Proc, serve_args
    from tls_support import make_pki

    pki = make_pki(tmp_path)
    token = new_token()
    keys = tmp_path / "keys.yaml"
    entry = {"id": "nightly", "sha256": hash_token(token), "scopes": ["infer", "read"], "rate_per_s": 4, "burst": 1}
    keys.write_text(yaml.safe_dump({"keys": [entry]}))
    tls = ["--tls-cert-file", pki.path("server.crt"), "--tls-key-file", pki.path("server.key")]
    p = Proc(serve_args(repo, *tls, "--tls-client-ca-file", pki.path("ca.crt"), "--api-keys-file", str(keys)))
    x = _features(192, seed=6)
    src = tmp_path / "in.npy"
    np.save(src, x)
    try:
        p.wait_ready()
        port = p.ports[0] if protocol == "http" else p.ports[1]
        ca = ["--tls-ca", pki.path("ca.crt")]
        client = [*ca, "--tls-cert", pki.path("client.crt"), "--tls-key", pki.path("client.key")]
        common = ["--model", "clf", "--target", f"localhost:{port}", "--protocol", protocol, "--input", str(src),
                  "--columns", "features=input", "--batch-size", "64", "--concurrency", "1", "--quiet"]  # fmt: skip
        out = str(tmp_path / "out")
        held = tmp_path / "token"
        held.write_text(token + "\n")  # (a file, as a Secret is mounted: kept off the command line)
        done = score(*common, "--output", out, "--token-file", str(held), *client)
        assert done.returncode == 0, done.stderr
        got = np.array(_parts(out).column("probabilities").to_pylist(), np.float32)
        np.testing.assert_allclose(got, _expected(repo, x), rtol=1e-5)
        said = re.search(r"overloaded: (\d+) requests sent again after waiting ([\d.]+) s", done.stderr)
        assert said, done.stderr  # 3 requests of 64 rows, one at a time, at 4/s with a burst of 1: some refused
        retried, waited = int(said.group(1)), float(said.group(2))
        # each refused request waited the Retry-After (>= 1 s), after which the key's bucket holds a
        # token again: no request is refused twice
        assert 1 <= retried <= 3 and waited >= retried * 0.95, done.stderr

        done = score(*common, "--output", str(tmp_path / "o2"), "--token", token, *ca)
        assert done.returncode == 3 and "cannot read model 'clf'" in done.stderr, done.stderr
        done = score(*common, "--output", str(tmp_path / "o3"), "--token", "wrong", *client)
        assert done.returncode == 3 and ("UNAUTHENTICATED" in done.stderr or "401" in done.stderr), done.stderr
        held.write_text("\n")
        done = score(*common, "--output", str(tmp_path / "o4"), "--token-file", str(held), *client)
        assert done.returncode == 2 and "is empty" in done.stderr, done.stderr
    finally:
        p.kill()


def test_a_model_converted_by_batchgate_convert_scores_its_training_csv(tmp_path):
    from drift_support import NAMES, build

    built = build(str(tmp_path))  # `batchgate convert sklearn` of a logistic regression, and its train.csv
    out = str(tmp_path / "out")
    done = score("--model", "fraud", "--model-repository", built["repo"], "--input", built["csv"], "--output", out,
                 "--columns", "features=" + ",".join(NAMES), "--format", "csv")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "5000 rows: 5000 scored" in done.stderr
    table = pcsv.read_csv(os.path.join(out, "part-00000.csv"))
    x = pcsv.read_csv(built["csv"]).to_pandas()[NAMES].to_numpy(np.float32)[:4096]  # the values as written
    model = os.path.join(built["repo"], "fraud", "1", "model.onnx")
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    want = sess.run(None, {"features": x})[0].reshape(-1)  # the first output: the label
    label = next(c for c in table.column_names if "label" in c)
    np.testing.assert_array_equal(table.column(label).to_numpy(), want)


@pytest.mark.parametrize(
    "sig, status, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM")]
)
def test_ctrl_c_or_sigterm_stops_cleanly_and_a_rerun_resumes(repo, tmp_path, sig, status, said):
    """SIGINT mid-run: a message and exit 130, no traceback, only recorded parts (and their
    rejects) left in the folder; the same command then finishes the run. SIGTERM (a job
    scheduler, Kubernetes, docker stop) the same with exit 143: it killed the process where it
    stood, no message, with parts written but not recorded left in the folder."""
    n = 100_000
    src = tmp_path / "big.npy"
    np.save(src, _features(n, seed=9))
    args = ["--model", "clf", "--model-repository", repo, "--input", str(src), "--columns", "features=input",
            "--batch-size", "2000", "--concurrency", "2", "--quiet"]  # fmt: skip
    out = str(tmp_path / "out")
    # SIGINT as a terminal sends it: a shell without job control starts a background job (make
    # test &) with SIGINT ignored, and the ignore is inherited; the command must not inherit it.
    p = subprocess.Popen(
        [*BATCHGATE, *args, "--output", out],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    manifest = os.path.join(out, "_manifest.json")
    end = time.monotonic() + 60
    while not (os.path.exists(manifest) and len(_json(manifest)["parts"]) >= 3):
        assert time.monotonic() < end and p.poll() is None, "no parts were written"
        time.sleep(0.01)
    p.send_signal(sig)
    stderr = p.communicate(timeout=60)[1]
    assert p.returncode == status and said in stderr and "Traceback" not in stderr, stderr
    recorded = _json(manifest)["parts"]
    assert not _json(manifest)["done"] and len(recorded) < n // 2000
    names = set(os.listdir(out)) - {"_manifest.json"}  # (no half-written .NAME.partial either)
    assert names == {p["file"] for p in recorded} | {p["rejects_file"] for p in recorded}
    done = score(*args, "--output", out)
    assert done.returncode == 0 and "kept from an earlier run" in done.stderr, done.stderr
    assert _json(manifest)["done"] and _parts(out).num_rows == n


def test_a_kept_column_with_the_name_of_an_output_column_is_refused_not_replaced(repo, tmp_path):
    """A file's own column kept beside an output column of the same name (its ground truth
    'OUTPUT', or 'probabilities_1' beside the CSV's flattened probabilities) was silently
    replaced by the model's answer, exit 0. Refused, exit 2, naming the column."""
    texts = tmp_path / "texts.csv"
    texts.write_text("OUTPUT,INPUT\ntruth,hello\n")
    feats = tmp_path / "feats.csv"
    feats.write_text("a,b,c,d,probabilities_1\n0.1,0.2,0.3,0.4,truth\n")
    for model, src, extra in (
        ("texts", texts, ["--keep", "OUTPUT", "--columns", "INPUT=INPUT"]),
        ("clf", feats, ["--keep", "probabilities_1", "--columns", "features=a,b,c,d", "--format", "csv"]),
    ):
        out = str(tmp_path / f"out_{model}")
        done = score("--model", model, "--model-repository", repo, "--input", str(src), "--output", out, *extra)
        assert done.returncode == 2, done.stderr
        assert "kept column" in done.stderr and extra[1] in done.stderr and "Traceback" not in done.stderr
        assert not glob.glob(os.path.join(out, "part-*"))


def test_a_header_naming_a_column_twice_is_refused(repo, tmp_path):
    """CSV header a,a,b: the second 'a' was never read, the first fed twice ([1, 1, 3] scored for
    the row 1,2,3), exit 0."""
    src = tmp_path / "dup.csv"
    src.write_text("a,a,b\n1,2,3\n")
    for extra in ([], ["--columns", "INPUT=a,a,b"]):
        out = str(tmp_path / f"out{len(extra)}")
        done = score("--model", "ints", "--model-repository", repo, "--input", str(src), "--output", out, *extra)
        assert done.returncode == 2 and "'a'" in done.stderr and "two or more columns named" in done.stderr, done.stderr
        assert not glob.glob(os.path.join(out, "part-*"))


def test_a_run_into_a_folder_of_another_runs_output_leaves_none_of_its_parts(repo, tmp_path):
    """A second run with another input (or batch size, or format) into the same --output rewrote
    the parts it had and left the first run's others: a reader of the folder's parts got both
    runs' rows."""
    big, small = tmp_path / "big.npy", tmp_path / "small.npy"
    np.save(big, _features(100, seed=1))
    np.save(small, _features(10, seed=2))
    out = str(tmp_path / "out")
    for src in (big, small):
        done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out,
                     "--batch-size", "10", "--quiet")  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["_manifest.json", "_rejects-00000.jsonl", "_rejects.jsonl", "part-00000.parquet"]
    assert _parts(out).num_rows == 10
    done = score("--model", "clf", "--model-repository", repo, "--input", str(small), "--output", out,
                 "--batch-size", "10", "--format", "csv", "--quiet")  # fmt: skip
    assert done.returncode == 0 and not glob.glob(os.path.join(out, "*.parquet")), done.stderr


def test_part_files_no_manifest_records_are_refused_not_overwritten_or_mixed(repo, tmp_path):
    """A folder of part files without a manifest (another tool's, or a run whose _manifest.json
    was removed to score afresh): the run overwrote part-00000 and left the others, and the
    folder read as one dataset held both runs' rows. It is refused, nothing written or removed."""
    big, small = tmp_path / "big.npy", tmp_path / "small.npy"
    np.save(big, _features(40, seed=1))
    np.save(small, _features(10, seed=2))
    out = str(tmp_path / "out")
    args = ("--model", "clf", "--model-repository", repo, "--output", out, "--batch-size", "10", "--quiet")
    done = score(*args, "--input", str(big))
    assert done.returncode == 0, done.stderr
    os.remove(os.path.join(out, "_manifest.json"))
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    done = score(*args, "--input", str(small))
    assert done.returncode == 2, done.stderr
    assert "holds part files that no manifest of batchgate score records (part-00000.parquet" in done.stderr
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before
    assert _parts(out).num_rows == 40
    for name in glob.glob(os.path.join(out, "part-*")):  # removed: the run goes ahead
        os.remove(name)
    done = score(*args, "--input", str(small))
    assert done.returncode == 0 and _parts(out).num_rows == 10, done.stderr
    other = tmp_path / "other"  # a folder of other files is used as before, its files left
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    done = score(*args[:4], "--output", str(other), "--input", str(small), "--quiet")
    assert done.returncode == 0 and (other / "notes.txt").read_text() == "mine\n", done.stderr


def test_a_second_run_into_a_folder_a_run_is_writing_is_refused(repo, tmp_path):
    """Two runs into one folder at once (a job retried while its first try still runs) wrote the
    same parts through the same temporary names and removed each other's: one stopped with a
    FileNotFoundError, and a part could be left half written. A run holds a lock on the folder
    (as the one held here does) and a second is refused, nothing written."""
    import fcntl

    src = tmp_path / "in.npy"
    np.save(src, _features(30))
    out = tmp_path / "out"
    out.mkdir()
    args = ("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", str(out), "--quiet")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = score(*args)
        assert done.returncode == 2, done.stderr
        assert "another batchgate score is writing into this folder" in done.stderr
        assert os.listdir(out) == []
    finally:
        os.close(fd)
    done = score(*args)  # the lock let go: the run goes ahead
    assert done.returncode == 0 and _parts(str(out)).num_rows == 30, done.stderr


def test_a_version_added_since_the_parts_were_written_scores_them_again(tmp_path):
    """A rerun's key named the model, not its version: after version 2 was added, a resumed run
    kept the parts version 1 had scored and scored the rest with version 2, one output from two
    models, exit 0. The version that scores is in the key, the same read locally or from a
    server (so a local run still resumes through a --target, and back)."""
    from processes import Proc, serve_args

    root = str(tmp_path / "models")
    _save(classifier_model(), root, "clf", config="max_batch_size: 64\n")
    src = tmp_path / "in.npy"
    np.save(src, _features(40, seed=4))
    out = str(tmp_path / "out")
    args = ["--model", "clf", "--input", str(src), "--output", out, "--batch-size", "10", "--quiet"]
    assert score(*args, "--model-repository", root).returncode == 0
    server = Proc(serve_args(root))
    try:
        server.wait_ready()
        done = score(*args, "--target", server.grpc)
    finally:
        server.kill()
    assert done.returncode == 0 and "(4 kept from an earlier run)" in done.stderr, done.stderr
    os.makedirs(os.path.join(root, "clf", "2"))
    import onnx

    onnx.save(classifier_model(seed=5), os.path.join(root, "clf", "2", "model.onnx"))
    os.remove(os.path.join(out, "part-00002.parquet"))
    done = score(*args, "--model-repository", root)
    assert done.returncode == 0 and "kept from an earlier run" not in done.stderr, done.stderr
    sess = ort.InferenceSession(os.path.join(root, "clf", "2", "model.onnx"), providers=["CPUExecutionProvider"])
    got = np.array(_parts(out).column("probabilities").to_pylist(), np.float32)
    np.testing.assert_allclose(got, sess.run(None, {"features": np.load(src)})[0], rtol=1e-5)


def test_a_part_with_no_row_scored_has_the_output_columns(repo, tmp_path):
    """A part whose rows were all rejected had the kept columns only; read as a dataset (the
    first part's schema), the folder had no 'probabilities' at all."""
    import pyarrow.dataset as ds

    src = tmp_path / "in.csv"
    src.write_text("id,a,b,c,d\n1,x,1,1,1\n2,,1,1,1\n3,0.1,0.2,0.3,0.4\n")
    out = str(tmp_path / "out")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out,
                 "--keep", "id", "--columns", "features=a,b,c,d", "--batch-size", "2")  # fmt: skip
    assert done.returncode == 0 and "1 scored, 2 rejected" in done.stderr, done.stderr
    table = ds.dataset(sorted(glob.glob(os.path.join(out, "part-*.parquet")))).to_table()
    assert table.column_names == ["id", "probabilities"] and table.column("id").to_pylist() == [3]


def test_a_rejects_file_in_a_folder_that_does_not_exist_is_refused_before_the_run(repo, tmp_path):
    """It was found once every row was scored, gathering the rejects: FileNotFoundError, exit 2."""
    src = tmp_path / "in.npy"
    np.save(src, _features(10))
    out, rejects = str(tmp_path / "out"), str(tmp_path / "nowhere" / "rejects.jsonl")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out,
                 "--rejects", rejects)  # fmt: skip
    assert done.returncode == 2 and "nowhere does not exist" in done.stderr, done.stderr
    assert not os.path.exists(out)


def test_a_rejects_file_in_the_output_folder_a_first_run_makes_is_taken(repo, tmp_path):
    """--output OUT --rejects OUT/_bad.jsonl on a first run, OUT not yet made (the run makes it):
    refused, its folder not existing, where the same command run again took it."""
    src = tmp_path / "in.npy"
    x = _features(10)
    x[2, 1] = np.inf
    np.save(src, x)
    out = tmp_path / "new" / "out"
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", str(out),
                 "--rejects", str(out / "_bad.jsonl"), "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open(out / "_bad.jsonl") as f:
        assert [json.loads(line)["row"] for line in f] == [2]
    assert not (out / "_rejects.jsonl").exists() and _parts(str(out)).num_rows == 9


def test_a_rejects_file_naming_the_manifest_or_a_part_is_refused(repo, tmp_path):
    """--rejects OUT/_manifest.json replaced the manifest with the rejects (a rerun could not
    resume), OUT/part-00000.parquet the part itself (its rows lost, the folder unreadable as a
    dataset). Refused before the run, nothing written; another name in the folder is taken."""
    src = tmp_path / "in.npy"
    x = _features(10)
    x[3, 0] = np.nan
    np.save(src, x)
    out = tmp_path / "out"
    out.mkdir()
    args = ("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", str(out), "--quiet")
    for name in ("_manifest.json", "part-00000.parquet", "_rejects-00000.jsonl", "part-00003.csv"):
        done = score(*args, "--rejects", str(out / name))
        assert done.returncode == 2 and "names a file the run keeps in its --output folder" in done.stderr, name
        assert os.listdir(out) == []
    done = score(*args, "--rejects", str(out / "_bad_rows.jsonl"))
    assert done.returncode == 0, done.stderr
    assert _parts(str(out)).num_rows == 9 and _json(str(out / "_manifest.json"))["done"]
    with open(out / "_bad_rows.jsonl") as f:
        assert [json.loads(line)["row"] for line in f] == [3]


def test_the_output_folder_reads_as_one_dataset_and_an_earlier_versions_folder_resumes(repo, tmp_path):
    """pyarrow.dataset.dataset(out) and pandas.read_parquet(out) failed on the folder: they took
    manifest.json and the rejects files for parts. The bookkeeping now has names the readers skip
    (a leading '_'); a folder an earlier version wrote (the old names) is taken over and resumed."""
    import pandas as pd
    import pyarrow.dataset as ds

    x = _features(250, seed=11)
    x[17, 2] = np.nan  # one reject, so that the rejects files are not empty
    src = tmp_path / "in.parquet"
    features = pa.FixedSizeListArray.from_arrays(x.reshape(-1), 4)
    pq.write_table(pa.table({"id": np.arange(250), "features": features}), src)
    args = ["--model", "clf", "--model-repository", repo, "--input", str(src), "--keep", "id", "--batch-size", "100",
            "--quiet"]  # fmt: skip
    out = str(tmp_path / "out")
    done = score(*args, "--output", out)
    assert done.returncode == 0, done.stderr
    ids = [i for i in range(250) if i != 17]
    table = ds.dataset(out).to_table()
    assert table.column("id").to_pylist() == ids and table.column_names == ["id", "probabilities"]
    assert pd.read_parquet(out)["id"].tolist() == ids
    assert [r["row"] for r in _rejects(out)] == [17]
    csv_out = str(tmp_path / "csv")
    assert score(*args, "--output", csv_out, "--format", "csv").returncode == 0
    assert ds.dataset(csv_out, format="csv").to_table().column("id").to_pylist() == ids
    # an earlier version's folder: the same output under the old names, its last part not yet written
    os.rename(os.path.join(out, "_manifest.json"), os.path.join(out, "manifest.json"))
    os.rename(os.path.join(out, "_rejects.jsonl"), os.path.join(out, "rejects.jsonl"))
    for i in range(3):
        os.rename(os.path.join(out, f"_rejects-{i:05d}.jsonl"), os.path.join(out, f"rejects-{i:05d}.jsonl"))
    old = _json(os.path.join(out, "manifest.json"))
    for p in old["parts"]:
        p["rejects_file"] = f"rejects-{p['index']:05d}.jsonl"
    old["parts"], old["done"] = old["parts"][:2], False
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(old, f)
    os.remove(os.path.join(out, "part-00002.parquet"))
    done = score(*args, "--output", out)
    assert done.returncode == 0 and "(2 kept from an earlier run)" in done.stderr, done.stderr
    assert sorted(os.listdir(out)) == ["_manifest.json", *[f"_rejects-{i:05d}.jsonl" for i in range(3)],
                                       "_rejects.jsonl", *[f"part-{i:05d}.parquet" for i in range(3)]]  # fmt: skip
    assert ds.dataset(out).to_table().column("id").to_pylist() == ids
    assert [r["row"] for r in _rejects(out)] == [17]


def _variable_length_models(root: str) -> None:
    """total: FP32 [batch, n] -> its rows' sums [batch] (a fixed output); echo: Identity [batch, n]."""
    from onnx import helper

    from batchgate.demo import _model

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    total = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0)], "total", [x],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])], [axes],
    )  # fmt: skip
    echo = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "echo", [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )  # fmt: skip
    _save(_model(total), root, "total", config="max_batch_size: 8\n")
    _save(_model(echo), root, "echo", config="max_batch_size: 8\n")


def test_rows_of_different_lengths_are_scored_in_groups_or_refused_each_for_its_own_reason(repo, tmp_path):
    """JSON Lines whose list column varies in length per row: every row of a chunk but those of
    its longest length was refused ('2 values where other rows have 5'), also for a model whose
    input takes any length; and for an input of fixed width, one row too long refused every row
    of its chunk. Now a variable-length input is scored in groups of one length (when the model's
    outputs have fixed shapes), and a fixed width judges each row alone."""
    import pyarrow.dataset as ds

    root = str(tmp_path / "models")
    _variable_length_models(root)
    lengths = [2, 3, 3, 5, 2, 1, 4, 3, 7, 2, 2, 6, 3]
    src = tmp_path / "var.jsonl"
    src.write_text("".join(json.dumps({"id": i, "x": [float(i + k) for k in range(n)]}) + "\n"
                           for i, n in enumerate(lengths)))  # fmt: skip
    out = str(tmp_path / "total")
    done = score("--model", "total", "--model-repository", root, "--input", str(src), "--output", out, "--keep", "id",
                 "--batch-size", "10", "--quiet")  # fmt: skip
    assert done.returncode == 0 and "13 rows: 13 scored, 0 rejected" in done.stderr, done.stderr
    table = ds.dataset(out).to_table()
    assert table.column("id").to_pylist() == list(range(13))  # input order kept across the groups
    want = [sum(float(i + k) for k in range(n)) for i, n in enumerate(lengths)]
    np.testing.assert_allclose(table.column("total").to_numpy(), want)
    # outputs whose shape follows the length: the rows of the chunk's most common length score,
    # the others are refused saying why
    out = str(tmp_path / "echo")
    done = score("--model", "echo", "--model-repository", root, "--input", str(src), "--output", out, "--keep", "id",
                 "--batch-size", "10", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    echoed = ds.dataset(out).to_table().to_pylist()
    assert [r["id"] for r in echoed] == [1, 2, 7, 11]  # length 3 in chunk 0 (tied with 2: the longer), 6 in 1
    assert all(r["y"] == [float(r["id"] + k) for k in range(lengths[r["id"]])] for r in echoed)
    refused = _rejects(out)
    assert [r["row"] for r in refused] == [0, 3, 4, 5, 6, 8, 9, 10, 12]
    assert "the model's outputs vary in shape" in refused[0]["reason"]
    # a fixed width: only the row of the wrong width is refused
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(json.dumps({"id": i, "features": [0.1] * n}) + "\n" for i, n in enumerate([4, 4, 5, 4, 3])))
    out = str(tmp_path / "clf")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(odd), "--output", out, "--keep", "id",
                 "--quiet")  # fmt: skip
    assert done.returncode == 0 and "5 rows: 3 scored, 2 rejected" in done.stderr, done.stderr
    assert [(r["row"], r["reason"]) for r in _rejects(out)] == [
        (2, "column 'features': 5 values where input 'features' takes 4"),
        (4, "column 'features': 3 values where input 'features' takes 4"),
    ]


@pytest.mark.parametrize(
    "queue",
    [
        "default_queue_policy { max_queue_size: 3 }",
        # (the level the scorer's requests go to has a bound of its own, smaller than the queue's)
        "priority_levels: 2 default_priority_level: 2 priority_queue_policy { key: 2 value { max_queue_size: 2 } }",
        # (a queue timeout set for online latency: a request queued behind the chunk expired)
        "default_queue_policy { default_timeout_microseconds: 1000 timeout_action: REJECT }",
    ],
)
def test_a_local_model_with_a_small_queue_scores_every_row(tmp_path, queue):
    """A chunk's requests were all sent to the model at once (256 rows of a model batching 2 are
    128 requests); past a bounded queue they were refused as an overload ('queue is full'), the
    bisection took that for the rows' own failure, and healthy rows were counted 'failed by the
    model', exit 0 (a model queueing 100 lost 37% of a 20,000-row file under the defaults). The
    scorer now keeps no more requests at the model than its queue takes."""
    root = str(tmp_path / "models")
    _save(classifier_model(), root, "clf", config=f"max_batch_size: 2\ndynamic_batching {{ {queue} }}\n")
    x = _features(1000, seed=9)
    src = tmp_path / "in.npy"
    np.save(src, x)
    out = str(tmp_path / "out")
    done = score("--model", "clf", "--model-repository", root, "--input", str(src), "--output", out,
                 "--batch-size", "256", "--concurrency", "3", "--quiet")  # fmt: skip
    assert done.returncode == 0 and "1000 rows: 1000 scored, 0 rejected by their checks, 0 failed" in done.stderr, (
        done.stderr
    )
    sess = ort.InferenceSession(os.path.join(root, "clf", "1", "model.onnx"), providers=["CPUExecutionProvider"])
    got = np.array(_parts(out).column("probabilities").to_pylist(), np.float32)
    np.testing.assert_allclose(got, sess.run(None, {"features": x})[0], rtol=1e-5)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_through_a_server_a_request_dropped_at_its_queue_timeout_is_sent_again(tmp_path, protocol):
    """A model whose queue drops a request waiting past 500 us (a latency setting for online
    traffic): the server answers DEADLINE_EXCEEDED, HTTP 504. Over gRPC it was sent again, as an
    overload; over HTTP the 504 stopped the run, exit 3, as though the server were gone."""
    from processes import Proc, serve_args

    root = str(tmp_path / "models")
    _save(classifier_model(), root, "clf", config="max_batch_size: 2\ndynamic_batching { default_queue_policy { "
          "default_timeout_microseconds: 500 timeout_action: REJECT } }\n")  # fmt: skip
    x = _features(4000, seed=11)
    src = tmp_path / "in.npy"
    np.save(src, x)
    p = Proc(serve_args(root))
    try:
        p.wait_ready()
        target = p.grpc if protocol == "grpc" else p.http
        out = str(tmp_path / "out")
        done = score("--model", "clf", "--target", target, "--protocol", protocol, "--input", str(src),
                     "--output", out, "--batch-size", "1000", "--quiet")  # fmt: skip
    finally:
        p.kill()
    assert done.returncode == 0 and "4000 rows: 4000 scored" in done.stderr, done.stderr
    sess = ort.InferenceSession(os.path.join(root, "clf", "1", "model.onnx"), providers=["CPUExecutionProvider"])
    got = np.array(_parts(out).column("probabilities").to_pylist(), np.float32)
    np.testing.assert_allclose(got, sess.run(None, {"features": x})[0], rtol=1e-5)


@pytest.mark.parametrize("folder", ["/sys", "/proc"])
def test_a_rejects_file_that_cannot_be_written_is_refused_before_the_run(repo, tmp_path, folder):
    """A folder that exists but takes no new file (as root too: /sys refuses, /proc has no such
    name) was found once every row was scored, gathering the rejects: a traceback, exit 2."""
    src = tmp_path / "in.npy"
    np.save(src, _features(10))
    out, rejects = str(tmp_path / "out"), os.path.join(folder, "rejects.jsonl")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out,
                 "--rejects", rejects)  # fmt: skip
    assert done.returncode == 2 and f"--rejects {rejects}: cannot write there" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not os.path.exists(out)


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("in.csv", lambda p: p.write_text("id,a,b,c,d\n")),
        ("in.parquet", lambda p: pq.write_table(pa.table({"id": pa.array([], pa.int64())}), p)),
        ("in.npy", lambda p: np.save(p, np.zeros((0, 4), np.float32))),
    ],
)
def test_a_kept_column_the_input_lacks_is_refused_with_no_rows_too(repo, tmp_path, name, write):
    """With no row, the mapping was never built: a misspelled --keep passed, exit 0. Now the
    header (Parquet's schema, the array's name) is checked all the same."""
    src = tmp_path / name
    write(src)
    out = str(tmp_path / "out")
    done = score("--model", "clf", "--model-repository", repo, "--input", str(src), "--output", out,
                 "--keep", "idd")  # fmt: skip
    assert done.returncode == 2 and "--keep: the input has no column 'idd'" in done.stderr, done.stderr
