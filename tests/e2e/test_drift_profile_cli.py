"""``batchgate drift profile`` as a subprocess: every data format, categorical columns, several
inputs, the model's outputs through ONNX Runtime or a running server, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgate.core.drift import profile_from_json
from drift_support import FEATURES, NAMES, batchgate, build, training_data
from gateway_support import start_gateway

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("drift-cli")))


def _profile(tmp_path, *args: str) -> dict:
    out = str(tmp_path / "p.json")
    done = batchgate("drift", "profile", "--model", "fraud", "--out", out, *args)
    assert done.returncode == 0, done.stderr
    assert "profile " in done.stdout and out in done.stdout
    with open(out) as f:
        data = json.load(f)
    profile_from_json(data)  # what the server will read
    return data


def test_the_csv_profile_describes_every_feature_and_the_models_outputs(built):
    with open(built["profile"]) as f:
        data = json.load(f)
    feats = data["inputs"]["features"]
    assert [f["name"] for f in feats] == NAMES
    assert data["source"]["rows"] == 5000 and len(data["source"]["sha256"]) == 64
    f0 = feats[0]
    assert f0["kind"] == "numeric" and abs(f0["mean"]) < 0.1 and 0.9 < f0["std"] < 1.1
    assert len(f0["bins"]["edges"]) == 19 and abs(sum(f0["bins"]["freqs"]) - 1) < 1e-9
    assert f0["cdf"]["values"] == sorted(f0["cdf"]["values"])
    assert set(data["outputs"]) == {"label", "probabilities"}
    assert data["outputs"]["label"][0]["kind"] == "categorical"
    assert set(data["outputs"]["label"][0]["categories"]) == {"0", "1"}


def test_npz_with_one_or_several_inputs(tmp_path):
    x, _ = training_data(2000)
    np.savez(tmp_path / "one.npz", anything=x)
    data = _profile(tmp_path, "--input", "features", "--data", str(tmp_path / "one.npz"))
    assert [f["name"] for f in data["inputs"]["features"]] == [f"features[{i}]" for i in range(FEATURES)]
    ids = np.random.default_rng(0).integers(0, 5, (2000, 2))
    np.savez(tmp_path / "two.npz", features=x, ids=ids)
    data = _profile(
        tmp_path, "--input", "features", "--input", "ids", "--data", str(tmp_path / "two.npz"), "--numeric", "ids[1]"
    )
    assert [f["kind"] for f in data["inputs"]["ids"]] == ["categorical", "numeric"]  # INT64: categories by default
    done = batchgate(
        "drift", "profile", "--model", "m", "--input", "nosuch", "--data", str(tmp_path / "two.npz"), "--out", "x"
    )
    assert done.returncode == 2 and "no array named nosuch" in done.stderr


def test_csv_columns_names_and_categories(tmp_path):
    rng = np.random.default_rng(1)
    with open(tmp_path / "t.csv", "w") as f:
        f.write("amount,country,age,empty\n")
        for i in range(1000):
            missing = "" if i % 10 == 0 else f"{rng.normal():.4f}"
            f.write(f"{rng.lognormal():.4f},{rng.choice(['fr', 'de', 'us'])},{rng.integers(18, 90)},{missing}\n")
    data = _profile(
        tmp_path,
        "--input", "x", "--data", str(tmp_path / "t.csv"), "--feature-names", "age,country,empty",
        "--categorical", "age",
    )  # fmt: skip
    feats = {f["name"]: f for f in data["inputs"]["x"]}
    assert list(feats) == ["age", "country", "empty"]
    assert feats["country"]["kind"] == "categorical" and set(feats["country"]["categories"]) == {"fr", "de", "us"}
    assert feats["age"]["kind"] == "categorical"
    assert feats["empty"]["kind"] == "numeric" and abs(feats["empty"]["missing_rate"] - 0.1) < 1e-9
    done = batchgate(
        "drift", "profile", "--model", "m", "--input", "x", "--data", str(tmp_path / "t.csv"),
        "--feature-names", "nosuch", "--out", str(tmp_path / "x.json"),
    )  # fmt: skip
    assert done.returncode == 2 and "no column(s) nosuch" in done.stderr


def test_parquet_and_json_lines(tmp_path):
    x, _ = training_data(500)
    table = pa.table({name: x[:, i] for i, name in enumerate(NAMES)})
    pq.write_table(table, tmp_path / "t.parquet")
    data = _profile(tmp_path, "--input", "features", "--data", str(tmp_path / "t.parquet"))
    assert [f["name"] for f in data["inputs"]["features"]] == NAMES and data["source"]["rows"] == 500
    with open(tmp_path / "rows.jsonl", "w") as f:  # one input as a list per line, plus a table column
        for row in x:
            f.write(json.dumps({"features": [float(v) for v in row], "note": "x"}) + "\n")
    data = _profile(tmp_path, "--input", "features", "--data", str(tmp_path / "rows.jsonl"))
    assert len(data["inputs"]["features"]) == FEATURES
    done = batchgate(
        "drift", "profile", "--model", "m", "--input", "x", "--data", str(tmp_path / "t.txt"), "--out", "o"
    )
    assert done.returncode == 2 and "unknown data format '.txt'" in done.stderr


def test_outputs_through_a_running_server_match_onnx_runtimes(built, tmp_path):
    running = start_gateway(built["repo"])
    try:
        data = _profile(tmp_path, "--input", "features", "--data", built["csv"], "--url", f"http://{running.http_url}")
    finally:
        running.stop()
    with open(built["profile"]) as f:
        local = json.load(f)
    assert data["outputs"]["probabilities"][1]["mean"] == pytest.approx(
        local["outputs"]["probabilities"][1]["mean"], abs=1e-5
    )
    assert data["id"] == local["id"]


def _mixed_repository(root) -> str:
    """A model of three inputs, FP32 x, BOOL b and BYTES c, each answered as it came."""
    import onnx
    from onnx import TensorProto, helper

    kinds = {"x": TensorProto.FLOAT, "b": TensorProto.BOOL, "c": TensorProto.STRING}
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in kinds],
        "mixed",
        [helper.make_tensor_value_info(n, t, ["N", 1]) for n, t in kinds.items()],
        [helper.make_tensor_value_info(f"{n}_out", t, ["N", 1]) for n, t in kinds.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (root / "repo" / "mixed" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "repo" / "mixed" / "1" / "model.onnx"))
    return str(root / "repo")


def test_table_cells_reach_the_model_as_it_takes_them_and_nulls_are_missing(tmp_path):
    """A CSV's True / False for a BOOL input were refused ("holds text"); a Parquet text column's
    nulls became the category "None" (and the text "None" fed to the model); a CSV naming a
    column twice lost one of them without a word."""
    repo = _mixed_repository(tmp_path)
    args = ("--model", "mixed", "--input", "x", "--input", "b", "--input", "c", "--model-repository", repo)
    with open(tmp_path / "t.csv", "w") as f:
        f.write("x.v,b.flag,c.cat\n")
        for i in range(400):
            f.write(f"{i / 100},{'True' if i % 4 else 'False'},{'abc'[i % 3]}\n")
    data = _profile(tmp_path, *args, "--data", str(tmp_path / "t.csv"))
    flag = data["inputs"]["b"][0]
    assert flag["categories"] == {"1": 0.75, "0": 0.25}
    assert data["outputs"]["b_out"][0]["categories"] == {"1": 0.75, "0": 0.25}

    cats = [None if i % 10 == 0 else "abc"[i % 3] for i in range(400)]
    pq.write_table(
        pa.table({"x.v": [i / 100 for i in range(400)], "b.flag": [bool(i % 4) for i in range(400)], "c.cat": cats}),
        tmp_path / "t.parquet",
    )
    data = _profile(tmp_path, *args, "--data", str(tmp_path / "t.parquet"))
    cat = data["inputs"]["c"][0]
    assert cat["missing_rate"] == 0.1 and "None" not in cat["categories"]
    assert "None" not in data["outputs"]["c_out"][0]["categories"]

    with open(tmp_path / "twice.csv", "w") as f:
        f.write("a,a,b\n1,2,3\n4,5,6\n")
    done = batchgate(
        "drift", "profile", "--model", "m", "--input", "x", "--data", str(tmp_path / "twice.csv"),
        "--out", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert done.returncode == 2 and "the column(s) 'a' appear more than once" in done.stderr


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    """Excel saves "CSV UTF-8" with a BOM; it was read into the first name, which was then refused."""
    csv = tmp_path / "excel.csv"
    csv.write_text("f0,f1\n1,2\n3,4\n5,6\n", encoding="utf-8-sig")
    data = _profile(tmp_path, "--input", "features", "--data", str(csv))
    assert [f["name"] for f in data["inputs"]["features"]] == ["f0", "f1"]
    lines = tmp_path / "bom.jsonl"
    lines.write_text('{"f0": 1, "f1": 2}\n{"f0": 3, "f1": 4}\n', encoding="utf-8-sig")
    data = _profile(tmp_path, "--input", "features", "--data", str(lines))
    assert [f["name"] for f in data["inputs"]["features"]] == ["f0", "f1"]


def _profile_of(tmp_path, data):
    """``batchgate drift profile`` of ``data`` for the input ``features`` (the finished process)."""
    out = str(tmp_path / "p.json")
    return batchgate("drift", "profile", "--model", "m", "--input", "features", "--data", str(data), "--out", out)


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            '{"features": [1, 2]}\n\n{"features": [1, 2, 3]}\n',
            "line 3 has 3 values for 'features', where others have 2",
        ),
        ('{"features": [1, 2]}\n{"other": 1}\n', "line 2 has no list for 'features'"),
        ('{"features": [1, 2]}\n{"features": [1,\n', "line 2 is not JSON"),
    ],
)
def test_json_lines_that_do_not_make_a_table_are_refused_naming_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(lines)
    done = _profile_of(tmp_path, path)
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.parametrize("rows", ["99999999999999999999", "-5", "many"])
def test_drift_rebaseline_refuses_a_row_count_the_request_cannot_carry(rows):
    """Past int64, protobuf raised out of the command with a traceback (before any connection)."""
    done = batchgate("drift", "rebaseline", "fraud", "--rows", rows, "--admin", "127.0.0.1:9")
    assert done.returncode == 2 and "--rows: must be a whole number of rows" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_parquet_list_of_numbers_column_is_an_input_of_numeric_features(tmp_path):
    """A list<float> column (one input a row, as embeddings are kept) was read as Python lists,
    and every feature of it profiled as categories (each float a category)."""
    x, _ = training_data(500)
    variable = pa.array([list(row) for row in x], type=pa.list_(pa.float32()))
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), FEATURES)
    for name, column in (("list", variable), ("fixed", fixed)):
        pq.write_table(pa.table({"features": column}), tmp_path / f"{name}.parquet")
        data = _profile(tmp_path, "--input", "features", "--data", str(tmp_path / f"{name}.parquet"))
        feats = data["inputs"]["features"]
        assert len(feats) == FEATURES and {f["kind"] for f in feats} == {"numeric"}
        assert abs(feats[0]["mean"] - float(x[:, 0].astype(np.float64).mean())) < 1e-6
    ragged = pa.array([[1.0, 2.0], [1.0]], type=pa.list_(pa.float64()))
    pq.write_table(pa.table({"features": ragged}), tmp_path / "ragged.parquet")
    done = _profile_of(tmp_path, tmp_path / "ragged.parquet")
    assert done.returncode == 2 and "column 'features' holds lists of numbers of several lengths" in done.stderr


def test_a_json_null_is_missing_as_a_parquet_null_is(tmp_path):
    """A JSON-lines null (or a key a line lacks) of a text column became the category "" (the
    empty text), not missing; of a number column it was missing already."""
    path = tmp_path / "nulls.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            row = {"n": None if i % 4 == 0 else i, "t": None if i % 5 == 0 else "ab"[i % 2]}
            if i % 8 == 1:
                del row["t"]
            f.write(json.dumps(row) + "\n")
    data = _profile(tmp_path, "--input", "features", "--data", str(path))
    n, t = data["inputs"]["features"]
    assert n["kind"] == "numeric" and n["missing_rate"] == 0.25
    assert (
        t["kind"] == "categorical" and t["missing_rate"] == 12 / 40
    )  # (8 nulls, 5 lines without it, one both) and "" not in t["categories"]


def test_json_booleans_are_categories_as_parquet_booleans_are(tmp_path):
    """JSON-lines true / false were read as the numbers 1 and 0, so the column was profiled as
    numeric, where the same column in Parquet (bool) or a CSV (True / False) is categorical."""
    flags = [i % 3 == 0 for i in range(30)]
    with open(tmp_path / "b.jsonl", "w") as f:
        for i, flag in enumerate(flags):
            f.write(json.dumps({"flag": None if i == 1 else flag}) + "\n")
    pq.write_table(pa.table({"flag": [None if i == 1 else v for i, v in enumerate(flags)]}), tmp_path / "b.parquet")
    kept = []
    for name in ("b.jsonl", "b.parquet"):
        (feature,) = _profile(tmp_path, "--input", "features", "--data", str(tmp_path / name))["inputs"]["features"]
        assert feature["kind"] == "categorical" and set(feature["categories"]) == {"0", "1"}, name
        assert feature["missing_rate"] == 1 / 30, name
        kept.append(feature["categories"])
    assert kept[0] == kept[1]


def test_csv_booleans_in_any_case_are_the_categories_of_parquet_booleans(tmp_path):
    """A CSV's `true` / `false` (Spark, JavaScript) or `TRUE` / `FALSE` (spreadsheets) were the
    categories "true" and "false", where the same column in Parquet, JSON lines or a CSV's
    `True` / `False` is "1" and "0", as live BOOL values are keyed: every live value was unseen."""
    flags = [i % 3 == 0 for i in range(30)]
    pq.write_table(pa.table({"flag": flags}), tmp_path / "b.parquet")
    (want,) = _profile(tmp_path, "--input", "features", "--data", str(tmp_path / "b.parquet"))["inputs"]["features"]
    for words in (("true", "false"), ("TRUE", "FALSE"), ("True", "false")):
        (tmp_path / "b.csv").write_text("flag\n" + "".join(f"{words[0] if v else words[1]}\n" for v in flags))
        (got,) = _profile(tmp_path, "--input", "features", "--data", str(tmp_path / "b.csv"))["inputs"]["features"]
        assert got["kind"] == "categorical" and got["categories"] == want["categories"], (words, got)


def _lone_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # (numpy.save would add .npy to the name)
        np.save(f, array)


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: np.savez(p, x=np.float64(3.0)), "array 'x' holds a single value"),
        (lambda p: np.savez(p, x=np.array([1 + 2j, 3j])), "array 'x' holds complex128 values"),
        (lambda p: _lone_npy(p, np.zeros((4, 2))), "a single .npy array, not an .npz archive"),
    ],
)
def test_npz_files_that_hold_no_rows_of_values_are_refused_naming_what_they_hold(tmp_path, write, message):
    """A scalar was 'running the model failed: tuple index out of range' (exit 1, no model given),
    a lone .npy 'running the model failed: ... context manager protocol', and complex values were
    profiled as their real parts."""
    path = str(tmp_path / "data.npz")
    write(path)
    done = batchgate(
        "drift", "profile", "--model", "m", "--input", "x", "--data", path, "--out", str(tmp_path / "p.json")
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "running the model" not in done.stderr


def test_an_npz_input_of_three_dimensions_reaches_the_model_as_it_is_and_is_profiled_flattened(tmp_path):
    """A model taking [N, 3, 4]: the rows go to it in that shape (fed flattened, ONNX Runtime
    refused them: "Invalid rank for input"), and each of the 12 positions is a feature, in the
    order the server flattens what it samples."""
    from onnx import TensorProto

    from batchgate.demo import _save, identity_model

    repo = str(tmp_path / "repo")
    _save(identity_model("cube", TensorProto.FLOAT, shape=("n", 3, 4)), repo, "cube", config="max_batch_size: 0\n")
    data = np.random.default_rng(4).random((40, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "cube.npz", INPUT=data)
    out = str(tmp_path / "p.json")
    done = batchgate("drift", "profile", "--model", "cube", "--input", "INPUT", "--data", str(tmp_path / "cube.npz"),
                     "--out", out, "--model-repository", repo)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open(out) as f:
        profile = json.load(f)
    assert [f["name"] for f in profile["inputs"]["INPUT"]] == [f"INPUT[{i}]" for i in range(12)]
    assert [f["name"] for f in profile["outputs"]["OUTPUT"]] == [f"OUTPUT[{i}]" for i in range(12)]
