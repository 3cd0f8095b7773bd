"""Batch scoring's input checks over real files (CSV, JSON Lines) and the real engine (run.py),
with an identity model in place of a backend: text kept as text for a BYTES input, a column whose
values change type mid-file rejecting only the rows that do not fit, empty files, a number past
float32's range, and a file pyarrow cannot read named as a bad input."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgate.core.signature import ModelSignature, TensorSpec
from batchgate.core.types import DATATYPES
from batchgate.score.run import Job, run
from batchgate.score.tables import ScoreError


class Identity:
    """A model whose one output is its one input."""

    def __init__(self, name: str, datatype: str, dims: tuple[int, ...]):
        spec = TensorSpec(name, DATATYPES[datatype], dims)
        self.signature = ModelSignature(
            "identity", "onnxruntime_onnx", 64, (spec,), (TensorSpec("y", spec.dtype, dims),)
        )
        self.name = name

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": feeds[self.name]}


def _score(model: Identity, src, out, **kw) -> tuple:
    job = Job(model, str(src), str(out), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a numpy overflow warning on stderr would fail the test)
        counts = asyncio.run(run(job))
    parts = sorted(glob.glob(os.path.join(out, "part-*.parquet")))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
    with open(os.path.join(out, "_rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out, "_manifest.json")) as f:
        assert json.load(f)["done"]
    return counts, table, rejects


def test_a_bytes_input_from_csv_or_jsonl_gets_the_text_as_written(tmp_path):
    model = Identity("s", "BYTES", (1,))
    csv = tmp_path / "zip.csv"
    csv.write_text("id,s\n1,007\n2,0123\n3,1e3\n4,\n")
    counts, table, rejects = _score(model, csv, tmp_path / "csv", keep=("id",))
    assert counts.scored == 4 and not rejects
    assert table.column("y").to_pylist() == [["007"], ["0123"], ["1e3"], [""]]  # not 7.0, 123.0, 1000.0
    jl = tmp_path / "zip.jsonl"
    jl.write_text('{"s": "007"}\n{"s": "1e3"}\n{"s": 12}\n')  # a JSON number for a text input: its JSON text
    counts, table, rejects = _score(model, jl, tmp_path / "jl")
    assert counts.scored == 3 and table.column("y").to_pylist() == [["007"], ["1e3"], ["12"]]


def test_a_csv_column_of_whole_numbers_that_turns_fractional_after_a_block_is_scored(tmp_path):
    model = Identity("features", "FP32", (2,))
    n = 150_000  # past the reader's first block (1 MiB), from which pyarrow infers the types
    lines = [f"{i},{i % 100},7" for i in range(n)] + [f"{n},1.5,7", f"{n + 1},x,7", f"{n + 2},NA,7"]
    src = tmp_path / "drift.csv"
    src.write_text("id,a,b\n" + "\n".join(lines) + "\n")
    assert src.stat().st_size > 1 << 20
    counts, table, rejects = _score(
        model, src, tmp_path / "out", keep=("id",), columns=("features=a,b",), batch_size=50_000
    )
    assert (counts.input, counts.scored, counts.rejected) == (n + 3, n + 1, 2)
    assert table.column("y").to_pylist()[-1] == [1.5, 7.0] and table.column("id").to_pylist()[-1] == n
    assert [(r["id"], r["reason"]) for r in rejects] == [
        (n + 1, "column 'a': 'x' is not a float32"),
        (n + 2, "column 'a': missing value"),
    ]


def test_jsonl_text_in_a_number_column_rejects_only_its_row(tmp_path):
    model = Identity("features", "FP32", (4,))
    src = tmp_path / "l.jsonl"
    rows = [{"id": 1, "features": [1, 2, 3, 4]}, {"id": 2, "features": [1, "x", 3, 4]}, {"id": 3, "features": 5}]
    rows += [{"id": 4, "features": [1, None, 3, 4]}, {"id": 5, "features": [1.5, 2, 3, 4]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    counts, table, rejects = _score(model, src, tmp_path / "out", keep=("id",))
    assert table.column("id").to_pylist() == [1, 5] and table.column("y").to_pylist()[1] == [1.5, 2, 3, 4]
    reasons = {r["row"]: r["reason"] for r in rejects}
    assert reasons == {
        1: "column 'features': 'x' is not a float32",
        2: "column 'features': 5 is not a list",
        3: "column 'features': missing value",
        5: "not a JSON object: b'not json'",
    }
    # the same in scalar columns, after a first block of numbers
    flat = tmp_path / "l4.jsonl"
    many = [json.dumps({"id": i, "a": i, "b": 2}) for i in range(40_000)]
    flat.write_text("\n".join([*many, '{"id": 40000, "a": "x", "b": 2}', '{"id": 40001, "a": 0.5, "b": 2}']) + "\n")
    assert flat.stat().st_size > 1 << 20
    model = Identity("features", "FP32", (2,))
    counts, table, rejects = _score(model, flat, tmp_path / "out4", keep=("id",), columns=("features=a,b",))
    assert (counts.scored, counts.rejected) == (40_001, 1) and rejects[0]["id"] == 40_000
    assert table.column("y").to_pylist()[-1] == [0.5, 2.0]


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl", "header.csv"])
def test_an_empty_file_is_zero_rows(tmp_path, name):
    src = tmp_path / name
    src.write_text("id,a,b\n" if name == "header.csv" else "")
    counts, table, rejects = _score(Identity("features", "FP32", (2,)), src, tmp_path / "out")
    assert (counts.input, counts.parts, table, rejects) == (0, 0, None, [])


def test_a_number_past_float32s_range_is_rejected_even_with_allow_nan(tmp_path):
    model = Identity("features", "FP32", (2,))
    src = tmp_path / "big.csv"
    src.write_text("a,b\n1e40,1\n1,1\ninf,1\n")
    for allow_nan in (False, True):
        counts, table, rejects = _score(model, src, tmp_path / f"out{allow_nan}", allow_nan=allow_nan)
        assert rejects[0]["row"] == 0 and rejects[0]["reason"] == "column 'a': 1e+40 is past the range of float32"
        assert "NaN or infinity" in rejects[1]["reason"] if not allow_nan else len(rejects) == 1
        assert table.column("y").to_pylist()[-1] == ([1.0, 1.0] if not allow_nan else [float("inf"), 1.0])
    jl = tmp_path / "big.jsonl"
    jl.write_text('{"features": [1, 1e40]}\n{"features": [1, 2]}\n')
    counts, table, rejects = _score(model, jl, tmp_path / "outjl", allow_nan=True)
    assert counts.scored == 1 and "1e+40 is past the range of float32" in rejects[0]["reason"]


def test_nan_written_in_a_csv_is_nan_with_allow_nan_and_missing_values_stay_missing(tmp_path):
    """--allow-nan lets through "NaN and infinity written as such": a CSV's NaN was taken for the
    reader's missing-value word and its row rejected."""
    model = Identity("features", "FP32", (2,))
    src = tmp_path / "nan.csv"
    src.write_text("a,b\nNaN,1\n-nan,2\ninf,3\n,4\nNA,5\n")
    counts, table, rejects = _score(model, src, tmp_path / "out", allow_nan=True)
    got = table.column("y").to_pylist()
    assert [np.isnan(r[0]) for r in got[:2]] == [True, True] and got[2] == [float("inf"), 3.0]
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (3, "column 'a': missing value"),
        (4, "column 'a': missing value"),
    ]
    counts, table, rejects = _score(model, src, tmp_path / "strict")
    assert counts.scored == 0 and len(rejects) == 5
    # a value that does not parse in the same batch: the column goes value by value, NaN still NaN
    src.write_text("a,b\nNaN,1\nabc,2\n")
    counts, table, rejects = _score(model, src, tmp_path / "mixed", allow_nan=True, columns=("features=a,b",))
    assert np.isnan(table.column("y").to_pylist()[0][0]) and [r["row"] for r in rejects] == [1]


def test_a_csv_row_longer_than_the_readers_block_is_named(tmp_path):
    src = tmp_path / "long.csv"
    src.write_text("id,a,b\n" + "x" * (3 << 20) + ",1,2\n")
    with pytest.raises(ScoreError, match="past its first 0 rows, a row is longer than 1 MiB, the most a CSV row may"):
        _score(Identity("features", "FP32", (2,)), src, tmp_path / "out", columns=("features=a,b",))


def test_a_csv_quote_never_closed_is_named_with_where_it_is(tmp_path):
    """A stray quote opening a cell (``"x``) makes the rest of the file one cell; the reader
    fails as for a row past its block, and the message spoke of a long row only, without saying
    where: it names the quote left open too, and the rows read before it."""
    rows = [f"{i},{i % 7}.25,1.5" for i in range(400_000)]
    rows[80_000] = '80000,"3.25,1.5'
    src = tmp_path / "quote.csv"
    src.write_text("id,a,b\n" + "\n".join(rows) + "\n")
    assert src.stat().st_size > 1 << 20
    with pytest.raises(ScoreError) as e:
        _score(Identity("features", "FP32", (2,)), src, tmp_path / "out", columns=("features=a,b",), batch_size=1000)
    said = str(e.value)
    assert "or a quote is never closed" in said, said
    read = int(re.search(r"past its first (\d+) rows", said).group(1))
    assert 0 < read <= 80_000  # (the rows before the reader's block holding the quote)


def test_a_csv_pyarrow_cannot_read_is_a_bad_input(tmp_path):
    src = tmp_path / "ragged.csv"
    src.write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(ScoreError, match="ragged.csv: .*columns"):
        asyncio.run(run(Job(Identity("features", "FP32", (2,)), str(src), str(tmp_path / "out"))))


def test_the_manifest_is_saved_about_once_a_second_not_once_a_part(tmp_path, monkeypatch):
    """The manifest, which grows by a part at a time, was rewritten (and fsynced) after every
    part: quadratic, 55 s of a run's time spent on it by 3,000 parts (a 12-million-row file at
    the default --batch-size), most of an hour by 24,000. Saved once a second at most, or when
    a sixteenth more parts are written (the first ones at once), and at the end."""
    from batchgate.score.output import Manifest

    saves = []
    real = Manifest.save
    monkeypatch.setattr(Manifest, "save", lambda self: (saves.append(len(self.parts)), real(self))[1])
    src = tmp_path / "in.npy"
    np.save(src, np.arange(1200, dtype=np.float32).reshape(600, 2))
    counts, table, _ = _score(Identity("x", "FP32", (2,)), src, tmp_path / "out", batch_size=2)
    assert counts.parts == 300 and table.num_rows == 600
    assert len(saves) < 100 and saves[:17] == list(range(17)) and saves[-1] == 300, saves


def test_a_csv_cell_that_is_not_utf8_rejects_its_row_not_the_run(tmp_path):
    """A Latin-1 byte in a CSV column read as text stopped the run (exit 2, "invalid UTF8 data",
    no row named), and a rerun stopped at the same place: the file could never be scored past
    it. A number column's cell rejects its row; a kept column's is written escaped (the row is
    scored); a BYTES input gets the bytes as written (the model judges them)."""
    n = 60_000  # the bad cells past the reader's first block, where the column types were inferred
    head = "".join(f"{i},{i % 7},2,name{i},t{i}\n" for i in range(n)).encode()
    src = tmp_path / "latin1.csv"
    src.write_bytes(b"id,a,b,name,s\n" + head + b"60000,1\xe9,2,ok,t\n60001,1,2,caf\xe9,t\n60002,1,2,ok,\xe9t\n")
    assert src.stat().st_size > 1 << 20
    model = Identity("features", "FP32", (2,))
    counts, table, rejects = _score(model, src, tmp_path / "out", keep=("id", "name"), columns=("features=a,b",))
    assert (counts.scored, counts.rejected) == (n + 2, 1)
    assert [(r["id"], r["reason"]) for r in rejects] == [(n, "column 'a': not UTF-8 text")]
    assert table.column("name").to_pylist()[-2:] == ["caf\\xe9", "ok"]
    assert table.schema.field("name").type == pa.string()
    counts, table, rejects = _score(Identity("s", "BYTES", (1,)), src, tmp_path / "bytes", keep=("id",))
    assert counts.scored == n + 3 and table.column("y").to_pylist()[-1] == ["\\xe9t"]  # (the output escaped as text)


def test_decimal_columns_are_numbers(tmp_path):
    """Parquet's decimal columns (what Spark and databases write for money): every row was
    rejected, "'1.50' is not a float32", exit 0; and a model of one input found no numeric
    column among them."""
    from decimal import Decimal

    src = tmp_path / "money.parquet"
    amounts = pa.array([Decimal("1.50"), Decimal("2.25"), None], pa.decimal128(10, 2))
    pq.write_table(pa.table({"id": [1, 2, 3], "a": amounts, "b": [1.0, 2.0, 3.0]}), src)
    for columns in (("features=a,b",), ()):
        out = tmp_path / f"out{len(columns)}"
        counts, table, rejects = _score(Identity("features", "FP32", (2,)), src, out, keep=("id",), columns=columns)
        assert table.column("y").to_pylist() == [[1.5, 1.0], [2.25, 2.0]]
        assert [(r["id"], r["reason"]) for r in rejects] == [(3, "column 'a': missing value")]
    lists = tmp_path / "lists.parquet"
    column = pa.array([[Decimal("1.5"), Decimal("2")]], pa.list_(pa.decimal128(5, 1)))
    pq.write_table(pa.table({"features": column}), lists)
    counts, table, rejects = _score(Identity("features", "FP32", (2,)), lists, tmp_path / "lists")
    assert table.column("y").to_pylist() == [[1.5, 2.0]]
    counts, table, rejects = _score(Identity("n", "INT64", (1,)), src, tmp_path / "ints", columns=("n=a",))
    assert counts.scored == 0 and "not a whole number" in rejects[0]["reason"]


def test_a_kept_list_or_struct_column_goes_into_csv_parts_as_json_text(tmp_path):
    """pyarrow's CSV writer takes no nested type: a kept list column (JSON Lines tags) stopped
    the run at its first part, "Unsupported Type:list", exit 2. Written as JSON text, as the
    outputs of higher rank are."""
    import pyarrow.csv as pcsv

    src = tmp_path / "tags.jsonl"
    src.write_text('{"tags": ["a", "b"], "meta": {"k": 1}, "x": [1, 2]}\n{"tags": [], "meta": null, "x": [3, 4]}\n')
    job = Job(Identity("x", "FP32", (2,)), str(src), str(tmp_path / "out"), fmt="csv", keep=("tags", "meta"))
    counts = asyncio.run(run(job))
    assert counts.scored == 2
    table = pcsv.read_csv(tmp_path / "out" / "part-00000.csv")
    assert table.column("tags").to_pylist() == ['["a", "b"]', "[]"]
    assert table.column("meta").to_pylist() == ['{"k": 1}', ""]  # (a null: an empty cell)


def test_a_json_array_is_named_as_not_json_lines(tmp_path):
    """pandas' to_json(orient='records') writes a JSON array on one line (.json, read as JSON
    Lines): the run said "no numeric column to feed input", which was not the trouble."""
    src = tmp_path / "records.json"
    src.write_text('[{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}]')
    with pytest.raises(ScoreError, match="starts with a JSON array; the JSON Lines read here are one object a line"):
        _score(Identity("features", "FP32", (2,)), src, tmp_path / "out")


def _strict(text: str) -> object:
    """JSON as strict readers take it (jq, Go, JSON.parse): NaN and Infinity are not JSON."""

    def refuse(word: str) -> object:
        raise ValueError(f"{word} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_the_rejects_file_and_the_manifest_are_strict_json_with_nan_in_kept_columns(tmp_path):
    """A kept column's NaN or infinity went into _rejects.jsonl as bare NaN / Infinity (Python's
    json default), which jq, Go and JSON.parse refuse: written as null."""
    nan, inf = float("nan"), float("inf")
    floats = pa.list_(pa.float64())
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [1.0, nan, -inf, inf],
                "v": pa.array([[1.0, 2.0], [nan, 1.0], [None, 1.0], [inf, 0.5]], floats),
                "meta": [{"w": nan}, {"w": 1.0}, {"w": -inf}, {"w": 2.0}],
                "x": pa.array([[1.0, 2.0], [nan, 1.0], [None, 1.0], [inf, 0.5]], floats),
            }
        ),
        src,
    )
    out = tmp_path / "out"
    counts, table, rejects = _score(Identity("x", "FP32", (2,)), src, out, keep=("id", "v", "meta"))
    assert counts.scored == 1 and [r["row"] for r in rejects] == [1, 2, 3]
    with open(out / "_rejects.jsonl") as f:
        lines = [_strict(line) for line in f if line.strip()]
    assert [(r["id"], r["v"], r["meta"]) for r in lines] == [
        (None, [None, 1.0], {"w": 1.0}),
        (None, [None, 1.0], {"w": None}),
        (None, [None, 0.5], {"w": 2.0}),
    ]
    assert "NaN or infinity" in lines[0]["reason"]
    _strict((out / "_manifest.json").read_text())


def test_a_kept_bytes_column_reads_as_its_text_in_the_rejects(tmp_path):
    """A kept binary column (ids as bytes in Parquet) went into _rejects.jsonl as Python's repr,
    "b'k-1'": now as its text, as the output parts write it (bytes that are not UTF-8 with
    backslash escapes)."""
    src = tmp_path / "in.parquet"
    x = pa.array([[1.0, 2.0], [float("nan"), 1.0], [3.0, float("inf")]], pa.list_(pa.float64()))
    pq.write_table(pa.table({"key": pa.array([b"k-0", b"k-1", b"k-\xff"], pa.binary()), "x": x}), src)
    out = tmp_path / "out"
    counts, table, rejects = _score(Identity("x", "FP32", (2,)), src, out, keep=("key",))
    assert counts.scored == 1 and table.column("key").to_pylist() in (["k-0"], [b"k-0"])
    with open(out / "_rejects.jsonl") as f:
        assert [_strict(line)["key"] for line in f if line.strip()] == ["k-1", "k-\\xff"]


@pytest.mark.parametrize(
    "orient, layout",
    [
        (None, '"columns"'),  # DataFrame.to_json()'s default: {column: {index: value}}
        ("index", '"index"'),
        ("split", '"split"'),
        ("table", '"table"'),
        ("indent", "pretty-printed"),
    ],
)
def test_a_pandas_to_json_of_another_layout_than_json_lines_is_refused_naming_the_fix(tmp_path, orient, layout):
    """DataFrame.to_json() with pandas' default layout is one object of columns on one line: it
    read as ONE row (its columns objects), scored or rejected as such. Each of pandas' one-document
    layouts is refused, saying how to write JSON Lines."""
    import pandas as pd

    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]})
    src = tmp_path / "frame.json"
    text = frame.to_json(indent=2) if orient == "indent" else frame.to_json(orient=orient)
    src.write_text(text)
    with pytest.raises(ScoreError) as e:
        _score(Identity("features", "FP32", (2,)), src, tmp_path / "out", columns=("features=a,b",))
    assert layout in str(e.value) and 'to_json(orient="records", lines=True)' in str(e.value)
    # what the message says to write reads as the frame's rows
    src.write_text(frame.to_json(orient="records", lines=True))
    counts, table, _ = _score(Identity("features", "FP32", (2,)), src, tmp_path / "ok", columns=("features=a,b",))
    assert counts.scored == 3 and table.column("y").to_pylist() == [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]


def test_a_single_json_line_holding_an_object_still_reads_as_a_row(tmp_path):
    """The layouts above are told apart from a JSON Lines file of one row whose column holds an
    object (for a BYTES input, its JSON text)."""
    src = tmp_path / "one.jsonl"
    src.write_text('{"s": {"k": "v"}}')
    counts, table, rejects = _score(Identity("s", "BYTES", (1,)), src, tmp_path / "out")
    assert counts.scored == 1 and not rejects and table.column("y").to_pylist() == [['{"k": "v"}']]


def test_the_engine_refuses_an_input_inside_its_output_folder(tmp_path):
    """run() itself (not only the CLI) refuses an input in the folder it writes parts into."""
    out = tmp_path / "out"
    out.mkdir()
    src = out / "part-00000.csv"
    src.write_text("a,b\n1,2\n")
    with pytest.raises(ScoreError, match="is inside the --output folder"):
        _score(Identity("features", "FP32", (2,)), src, out, columns=("features=a,b",))
    assert src.read_text() == "a,b\n1,2\n" and os.listdir(out) == ["part-00000.csv"]


def test_a_csv_with_quoted_line_breaks_past_the_first_block_is_read_whole(tmp_path):
    """A quoted cell holding a line break (RFC 4180, as spreadsheets and pandas write free text)
    stopped the run, exit 2, at the first reader block (1 MiB) that ended inside such a cell:
    pyarrow's CSV reader cuts blocks at line breaks unless told that cells may hold them."""
    src = tmp_path / "notes.csv"
    rows = 40_000  # about 2.5 MiB: several blocks
    with open(src, "w", newline="") as f:
        f.write("id,note,a,b\n")
        for i in range(rows):
            f.write(f'{i},"first line of {i}\nsecond, quoted ""line"" {i % 7}",{i},1\n')
    model = Identity("features", "FP32", (2,))
    counts, table, rejects = _score(
        model, src, tmp_path / "out", columns=("features=a,b",), keep=("id", "note"), batch_size=5000
    )
    assert counts.scored == rows and not rejects
    assert table.column("id").to_pylist() == list(range(rows))
    assert table.column("note")[12345].as_py() == 'first line of 12345\nsecond, quoted "line" 4'
    assert table.column("y")[rows - 1].as_py() == [rows - 1, 1]


def test_nested_lists_feed_an_input_of_rank_two_or_more_row_by_row(tmp_path):
    """A tensor of rank 2 or more per row written as lists of lists (this command's own Parquet
    parts write an output [2, 3] so; pandas and JSON Lines write nested lists) was taken for a
    list of 2 values where the input takes 6, and every row was refused. Now each row's shape is
    judged against the input's: fixed-size lists all the way (no Python object per value), plain
    lists, and JSON Lines; a row of another shape, uneven, or missing a list inside is refused
    alone, saying so."""
    model = Identity("x", "FP32", (2, 3))
    x = np.arange(7 * 6, dtype=np.float32).reshape(7, 2, 3)
    fixed = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3), 2)
    src = tmp_path / "fixed.parquet"
    pq.write_table(pa.table({"id": range(7), "x": fixed}), src)
    counts, table, rejects = _score(model, src, tmp_path / "fixed", keep=("id",), batch_size=3)  # (sliced batches)
    assert counts.scored == 7 and not rejects
    np.testing.assert_array_equal(np.array(table.column("y").to_pylist(), np.float32), x)

    rows = x.tolist()
    rows[1] = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]  # 6 values, but of shape [3, 2]
    rows[3] = [[1.0, 2.0, 3.0], [4.0, 5.0]]  # uneven
    rows[4] = [[1.0, 2.0, 3.0], None]  # a list missing inside
    rows[5] = None
    src = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": range(7), "x": pa.array(rows, pa.list_(pa.list_(pa.float32())))}), src)
    jl = tmp_path / "rows.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "x": r}) + "\n" for i, r in enumerate(rows)))
    for path in (src, jl):
        counts, table, rejects = _score(model, path, tmp_path / path.suffix[1:], keep=("id",), batch_size=3)
        assert table.column("id").to_pylist() == [0, 2, 6]
        np.testing.assert_array_equal(np.array(table.column("y").to_pylist(), np.float32), x[[0, 2, 6]])
        assert [(r["row"], r["reason"]) for r in rejects] == [
            (1, "column 'x': values of shape [3, 2] where input 'x' takes [2, 3]"),
            (3, "column 'x': lists of uneven lengths where input 'x' takes [2, 3]"),
            (4, "column 'x': lists of uneven lengths where input 'x' takes [2, 3]"),
            (5, "column 'x': missing value"),
        ]


def test_a_kept_binary_column_goes_into_csv_parts_as_escaped_text(tmp_path):
    """A kept binary column of a Parquet file (raw keys, hashes) holding bytes that are not UTF-8
    stopped the run at its first CSV part, 'ArrowInvalid: Invalid UTF8 payload', exit 2; bytes
    inside a kept list or struct were written as Python's "b'...'". Both are now their text,
    escaped as a BYTES output's (``\\xff``)."""
    import pyarrow.csv as pcsv

    src = tmp_path / "keys.parquet"
    pq.write_table(
        pa.table({
            "key": pa.array([b"\xffk", b"plain", None], pa.binary()),
            "keys": pa.array([[b"\xfe"], [], None], pa.list_(pa.binary())),
            "meta": pa.array([{"h": b"\xe9"}, {"h": b"a"}, None], pa.struct([("h", pa.binary())])),
            "x": pa.array([[1.0, 2.0]] * 3, pa.list_(pa.float32())),
        }),
        src,
    )  # fmt: skip
    job = Job(Identity("x", "FP32", (2,)), str(src), str(tmp_path / "out"), fmt="csv", keep=("key", "keys", "meta"))
    assert asyncio.run(run(job)).scored == 3
    table = pcsv.read_csv(
        tmp_path / "out" / "part-00000.csv", convert_options=pcsv.ConvertOptions(strings_can_be_null=True)
    )
    assert table.column("key").to_pylist() == ["\\xffk", "plain", None]
    assert [None if v is None else json.loads(v) for v in table.column("keys").to_pylist()] == [["\\xfe"], [], None]
    assert [None if v is None else json.loads(v) for v in table.column("meta").to_pylist()] == [
        {"h": "\\xe9"}, {"h": "a"}, None
    ]  # fmt: skip


def test_an_integer_past_int64s_range_by_less_than_float64s_step_is_rejected_not_wrapped(tmp_path):
    """A uint64 column's 2**63 (and the next 1,023 values) or a double's 2.0**63 for an INT64
    input: the range check compared them as float64, where int64's max rounds up to 2**63, so
    they passed and were scored as -2**63 and thereabouts, silently. Compared exactly now."""
    src = tmp_path / "big.parquet"
    pq.write_table(
        pa.table({
            "u": pa.array([2**63, 2**63 + 1000, 2**63 - 1, 5], pa.uint64()),
            "f": pa.array([2.0**63, -(2.0**63), 1.0, 9.2e18], pa.float64()),
        }),
        src,
    )  # fmt: skip
    model = Identity("v", "INT64", (1,))
    counts, table, rejects = _score(model, src, tmp_path / "u", columns=("v=u",))
    assert table.column("y").to_pylist() == [[2**63 - 1], [5]]
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (0, "column 'u': out of the range of int64"), (1, "column 'u': out of the range of int64")
    ]  # fmt: skip
    counts, table, rejects = _score(model, src, tmp_path / "f", columns=("v=f",))
    assert table.column("y").to_pylist() == [[-(2**63)], [1], [9_200_000_000_000_000_000]]
    assert [(r["row"], r["reason"]) for r in rejects] == [(0, "column 'f': out of the range of int64")]


def test_numbers_for_a_bool_input_are_0_or_1_whatever_the_format(tmp_path):
    """A Parquet (or .npy) number column feeding a BOOL input was cast with numpy, so 5, -1 and
    0.5 were scored as True, silently, where a CSV's '5' was refused as not a bool. Numbers are
    now 0 and 1 only, in a column of scalars or of lists."""
    model = Identity("v", "BOOL", (2,))
    src = tmp_path / "flags.parquet"
    pq.write_table(
        pa.table({
            "a": pa.array([0, 1, 5, 1, -1], pa.int64()),
            "b": pa.array([1.0, 0.0, 1.0, 0.5, 0.0]),
            "l": pa.array([[0, 1], [1, 0], [5, 1], [1, 3], [-1, 0]], pa.list_(pa.int64())),
        }),
        src,
    )  # fmt: skip
    for columns in (("v=a,b",), ("v=l",)):
        counts, table, rejects = _score(model, src, tmp_path / columns[0][2:].replace(",", ""), columns=columns)
        assert counts.scored == 2 and len(rejects) == 3
        assert all("is not a bool" in r["reason"] for r in rejects)
    counts, table, rejects = _score(model, src, tmp_path / "ab", columns=("v=a,b",))
    assert table.column("y").to_pylist() == [[False, True], [True, False]]
    assert [r["reason"] for r in rejects] == [
        "column 'a': 5 is not a bool", "column 'b': 0.5 is not a bool", "column 'a': -1 is not a bool"
    ]  # fmt: skip


def test_a_number_past_float64s_range_is_rejected_with_allow_nan_not_scored_as_infinity(tmp_path):
    """1e400 (past float64's range, not only float32's) reads as infinity, and with --allow-nan
    was scored as infinity, in a CSV and in JSON Lines, where 1e40 is refused as past the range:
    --allow-nan lets through infinity written as such ('inf', 'Infinity'), not a number too big."""
    model = Identity("features", "FP64", (2,))
    src = tmp_path / "big.csv"
    src.write_text("a,b\n1e400,1\n-1e999,1\ninf,1\n1,-Infinity\n")
    counts, table, rejects = _score(model, src, tmp_path / "csv", allow_nan=True)
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (0, "column 'a': 1e400 is past the range of float64"), (1, "column 'a': -1e999 is past the range of float64")
    ]  # fmt: skip
    assert table.column("y").to_pylist() == [[float("inf"), 1.0], [1.0, float("-inf")]]
    jl = tmp_path / "big.jsonl"
    jl.write_text('{"features": [1, 1e400], "k": 1}\n{"features": [Infinity, 2], "k": 1e999}\n')
    counts, table, rejects = _score(model, jl, tmp_path / "jl", allow_nan=True, keep=("k",))
    assert [(r["row"], r["reason"]) for r in rejects] == [(0, "column 'features': 1e400 is past the range of float64")]
    # (a kept column is carried as it reads)
    assert table.to_pylist() == [{"k": float("inf"), "y": [float("inf"), 2.0]}]


def test_part_names_sort_in_input_order_past_99999_parts(tmp_path):
    """Five digits always: part-100000 sorted before part-99999, and a reader that sorts the
    names (a sorted glob, a listing) read the rows out of order. The digits now follow the most
    parts the input could make: its rows where the file says them, else its size in bytes."""
    from batchgate.score.output import part_name, part_width

    src = tmp_path / "big.csv"  # 3 rows, but 200 kB: up to 200,000 parts of one row, as far as its size says
    src.write_text("s,note\n" + "".join(f"{i},{'x' * 100_000 if i == 1 else ''}\n" for i in range(3)))
    width = part_width(str(src), 1)
    assert width == 6
    for name, save in (("a.npz", np.savez_compressed), ("a.npy", np.save)):  # (their headers say the rows)
        save(tmp_path / name, np.zeros((150_000, 1), np.float32))
        assert (part_width(str(tmp_path / name), 1), part_width(str(tmp_path / name), 2)) == (6, 5), name
    names = [part_name(i, "parquet", width) for i in range(99_990, 100_010)]
    assert sorted(names) == names
    model = Identity("s", "BYTES", (1,))
    counts, table, _ = _score(model, src, tmp_path / "out", keep=("note",), batch_size=1)
    assert sorted(os.listdir(tmp_path / "out")) == [
        "_manifest.json", "_rejects-000000.jsonl", "_rejects-000001.jsonl", "_rejects-000002.jsonl",
        "_rejects.jsonl", "part-000000.parquet", "part-000001.parquet", "part-000002.parquet",
    ]  # fmt: skip
    assert table.column("y").to_pylist() == [["0"], ["1"], ["2"]]
    # an earlier version's output of it (five digits): resumed, its parts are written again under
    # the names that sort, and the old ones removed, not left beside them
    out = tmp_path / "out"
    with open(out / "_manifest.json") as f:
        doc = json.load(f)
    for p in doc["parts"]:
        old = f"part-{p['index']:05d}.parquet"
        os.replace(out / p["file"], out / old)
        p["file"] = old
    (out / "_manifest.json").write_text(json.dumps(doc))
    counts, table, _ = _score(model, src, out, keep=("note",), batch_size=1)
    assert counts.skipped_parts == 0 and table.column("y").to_pylist() == [["0"], ["1"], ["2"]]
    assert sorted(glob.glob("part-*", root_dir=out)) == [f"part-00000{i}.parquet" for i in range(3)]
    small = tmp_path / "small.parquet"  # the file says 3 rows: five digits, as before
    pq.write_table(pa.table({"s": ["a", "b", "c"]}), small)
    _score(model, small, tmp_path / "small", batch_size=1)
    assert sorted(glob.glob("part-*", root_dir=tmp_path / "small")) == [f"part-0000{i}.parquet" for i in range(3)]


def test_a_timestamp_or_struct_column_for_a_number_input_is_named_not_a_crash(tmp_path):
    import datetime

    when = pa.array([datetime.datetime(2020, 1, 1), None], pa.timestamp("us"))
    for name, column in (("ts", when), ("st", pa.array([{"a": 1}, None]))):
        src = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"x": column}), src)
        with pytest.raises(ScoreError, match=re.escape(f"column 'x' is of type {column.type},")):
            _score(Identity("x", "INT64", (1,)), src, tmp_path / name)
    # a BYTES input takes it as text
    counts, table, _ = _score(Identity("x", "BYTES", (1,)), tmp_path / "ts.parquet", tmp_path / "text")
    assert counts.scored == 1 and table.column("y").to_pylist() == [["2020-01-01T00:00:00.000000"]]


def test_a_null_inside_a_list_for_a_bytes_input_rejects_its_row(tmp_path):
    src = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"s": pa.array([["a", "b"], ["c", None], None, [None, "d"]])}), src)
    counts, table, rejects = _score(Identity("s", "BYTES", (2,)), src, tmp_path / "out")
    assert counts.scored == 1 and table.column("y").to_pylist() == [["a", "b"]]  # ["c", ""] was scored
    assert [(r["row"], r["reason"]) for r in rejects] == [(i, "column 's': missing value") for i in (1, 2, 3)]
    jl = tmp_path / "texts.jsonl"
    jl.write_text('{"s": [["a"], ["b"]]}\n{"s": [["c"], [null]]}\n')
    counts, table, rejects = _score(Identity("s", "BYTES", (2, 1)), jl, tmp_path / "nested")
    assert counts.scored == 1 and [r["row"] for r in rejects] == [1]


def test_a_part_whose_rejects_file_is_gone_or_changed_is_scored_again_on_a_rerun(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,x\n" + "".join(f"{i},{'bad' if i % 3 == 0 else i}\n" for i in range(9)))
    out = tmp_path / "out"
    first = _score(Identity("x", "FP32", (1,)), src, out, keep=("id",), batch_size=3)[2]
    assert [r["id"] for r in first] == [0, 3, 6]
    os.remove(out / "_rejects-00000.jsonl")  # (it failed every rerun: FileNotFoundError, exit 2)
    (out / "_rejects-00002.jsonl").write_text("")  # (its row's reason was lost)
    counts, table, rejects = _score(Identity("x", "FP32", (1,)), src, out, keep=("id",), batch_size=3)
    assert counts.skipped_parts == 1 and rejects == first and table.num_rows == 6


def test_a_part_with_no_row_scored_has_a_variable_output_as_an_empty_list_column(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], None, None, [3.0], None], pa.list_(pa.float32()))}), src)
    # the second part (rows 2-3) has no row scored: its output of a variable width, (0, 0), was an
    # ArrowInvalid ("list_size needs to be a strict positive integer") that stopped the run
    counts, table, rejects = _score(Identity("x", "FP32", (-1,)), src, tmp_path / "out", batch_size=2)
    assert (counts.scored, counts.rejected, counts.parts) == (2, 3, 3)
    schemas = [pq.read_schema(p) for p in sorted(glob.glob(str(tmp_path / "out" / "part-*.parquet")))]
    assert all(s.equals(schemas[0]) for s in schemas) and schemas[0].field("y").type == pa.list_(pa.float32())
    assert table.column("y").to_pylist() == [[1.0, 2.0], [3.0]]


def test_a_kept_jsonl_value_of_another_type_than_the_first_rows_is_named_as_a_kept_columns(tmp_path):
    src = tmp_path / "k.jsonl"
    src.write_text('{"x": 1, "k": 1}\n{"x": 2, "k": 2.5}\n{"x": 3, "k": "a"}\n')
    counts, _, rejects = _score(Identity("x", "FP32", (1,)), src, tmp_path / "out", keep=("k",))
    assert (counts.scored, counts.rejected) == (1, 2)
    first = "that of the file's first rows"  # (it said "not a whole number for an integer input", "not a int64")
    assert [r["reason"] for r in rejects] == [
        f"column 'k': 2.5 does not fit the type of this kept column, int64, {first}",
        f"column 'k': 'a' does not fit the type of this kept column, int64, {first}",
    ]


def test_a_parquet_decimal_bool_or_struct_for_a_bytes_input_is_its_text_as_json_lines_give_it(tmp_path):
    from decimal import Decimal

    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table(
            {
                "d": pa.array([Decimal("1.10"), Decimal("007.50")], pa.decimal128(5, 2)),
                "b": [True, False],
                "st": pa.array([{"a": 1, "b": "x"}, {"a": 2, "b": None}]),
            }
        ),
        src,
    )
    model = Identity("s", "BYTES", (3,))
    counts, table, _ = _score(model, src, tmp_path / "out", columns=("s=d,b,st",))
    assert counts.scored == 2  # (it was 1.1, True, {'a': 1, 'b': 'x'}: a float's text and Python's reprs)
    assert table.column("y").to_pylist() == [
        ["1.10", "true", '{"a": 1, "b": "x"}'],
        ["7.50", "false", '{"a": 2, "b": null}'],
    ]


@pytest.mark.parametrize("dtype", [np.complex64, [("a", "f4"), ("b", "i4")]])
def test_a_complex_or_record_array_is_named_not_a_crash(tmp_path, dtype):
    src = tmp_path / "in.npy"
    np.save(src, np.zeros(3, dtype=dtype))  # (pyarrow's ArrowNotImplementedError stopped the run, a traceback)
    with pytest.raises(ScoreError, match=r"the array 'input' is of type .*\(complex, records or objects\)"):
        _score(Identity("x", "FP32", (1,)), src, tmp_path / "out")


def test_a_kept_date_past_the_year_9999_is_written_as_arrows_text_not_a_crash(tmp_path):
    far = pa.array([253402300800 * 10, 253402300800 * 10], pa.timestamp("s"))  # (year 10000 and more)
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"x": [1.0, None], "ts": far, "st": pa.StructArray.from_arrays([far], ["t"])}), src)
    # an OverflowError ("date value out of range") stopped the run: the rejected row's kept values, and a
    # struct holding one as JSON text in a CSV part
    counts, _, rejects = _score(Identity("x", "FP32", (1,)), src, tmp_path / "out", keep=("ts", "st"), fmt="csv")
    assert (counts.scored, counts.rejected) == (1, 1)
    said = "<value out of range: 2534023008000000>"  # (Parquet keeps seconds as milliseconds)
    assert rejects[0]["ts"] == said and rejects[0]["st"] == {"t": said}
    with open(tmp_path / "out" / "part-00000.csv") as f:
        assert f.read().splitlines()[1] == f'{said},"{{""t"": ""{said}""}}",1'


def test_a_jsonl_whole_number_past_float64s_range_is_rejected_with_allow_nan_not_scored_as_infinity(tmp_path):
    big = "1" + "0" * 400  # (pyarrow read it as infinity, which --allow-nan let through)
    src = tmp_path / "in.jsonl"
    src.write_text(f'{{"x": [1, 2]}}\n{{"x": [{big}, 2]}}\n{{"x": [-{big}, 2]}}\n{{"x": [Infinity, NaN]}}\n')
    counts, table, rejects = _score(Identity("x", "FP64", (2,)), src, tmp_path / "out", allow_nan=True)
    assert (counts.scored, counts.rejected) == (2, 2)
    assert [r["reason"] for r in rejects] == [
        f"column 'x': {big[:40]} is past the range of float64",
        f"column 'x': -{big[:39]} is past the range of float64",
    ]
    assert table.column("y").to_pylist()[1][0] == float("inf")  # Infinity written as such


def test_nested_lists_feed_an_input_of_rank_two_with_a_variable_dimension(tmp_path):
    src = tmp_path / "in.parquet"
    rows = [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0]], None, [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[1.0]]]
    pq.write_table(pa.table({"x": rows}), src)
    # (every row was refused: "'[1.0, 2.0, 3.0]' is not a float32")
    counts, table, rejects = _score(Identity("x", "FP32", (-1, 3)), src, tmp_path / "out")
    assert table.column("y").to_pylist() == [rows[0], rows[3]]
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (1, "column 'x': values of shape [1, 3] where other rows of its chunk have [2, 3]: a request is one tensor"),
        (2, "column 'x': missing value"),
        (4, "column 'x': values of shape [1, 1] where input 'x' takes [-1, 3]"),
    ]


def test_csv_header_names_with_spaces_around_are_named_without_them(tmp_path):
    """A header written by hand, ``id, a, b``: the names given to --columns and --keep are
    stripped, so no name could match ' a' and such a column could not be scored or kept at all
    ("the input has no column(s) a"). The one column whose name is the name with spaces around
    is taken; a name still not found is told with the header's names quoted, spaces showing."""
    model = Identity("features", "FP32", (2,))
    src = tmp_path / "hand.csv"
    src.write_text("id, a , b\n1, 1.5, 2\n2, x, 3\n")
    counts, table, rejects = _score(model, src, tmp_path / "out", keep=("id",), columns=("features=a,b",))
    assert (counts.scored, counts.rejected) == (1, 1)
    assert table.column_names == ["id", "y"] and table.column("y").to_pylist() == [[1.5, 2.0]]
    assert [(r["id"], r["reason"]) for r in rejects] == [(2, "column ' a ': ' x' is not a float32")]
    counts, table, _ = _score(model, src, tmp_path / "kept", keep=("id", "b"), columns=("features=a,b",))
    assert table.column_names == ["id", " b", "y"] and table.column(" b").to_pylist() == [" 2"]
    with pytest.raises(ScoreError, match=r"no column\(s\) 'c' \(columns: 'id', ' a ', ' b'\)"):
        _score(model, src, tmp_path / "bad", columns=("features=a,c",))
    src.write_text("id, a,a ,b\n1,1,2,3\n")  # two columns that are 'a' with spaces around: neither is guessed
    with pytest.raises(ScoreError, match=r"no column\(s\) 'a' "):
        _score(model, src, tmp_path / "two", columns=("features=a,b",))


def test_gzipped_csv_and_json_lines_are_read_as_the_plain_files_are(tmp_path):
    """A warehouse or Spark export comes as .csv.gz or .jsonl.gz; until 2026-12-06 the run refused
    it as an unknown format ('.gz'). Rows past the reader's first block, the same answers as the
    plain file, an empty one, and a file cut short named as such."""
    import gzip

    model = Identity("features", "FP32", (2,))
    rows = "".join(f"{i},{i / 4},{-i}\n" for i in range(120_000))  # ~2 MB: more than one block
    plain = tmp_path / "x.csv"
    plain.write_text("id,a,b\n" + rows)
    packed = tmp_path / "x.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    want = _score(model, plain, tmp_path / "plain", keep=("id",), columns=("features=a,b",))
    got = _score(model, packed, tmp_path / "packed", keep=("id",), columns=("features=a,b",))
    assert got[0].scored == want[0].scored == 120_000 and got[1].equals(want[1])
    jl = tmp_path / "x.jsonl.gz"
    jl.write_bytes(gzip.compress(b'{"features": [1, 2]}\n{"features": [3.5, 4]}\n'))
    counts, table, _ = _score(model, jl, tmp_path / "jl")
    assert counts.scored == 2 and table.column("y").to_pylist() == [[1.0, 2.0], [3.5, 4.0]]
    empty = tmp_path / "e.jsonl.gz"
    empty.write_bytes(gzip.compress(b""))
    assert _score(model, empty, tmp_path / "e")[0].input == 0
    for cut in (jl, packed):
        short = tmp_path / f"short-{cut.name}"
        short.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
        with pytest.raises(ScoreError, match=re.escape(short.name)):
            asyncio.run(
                run(
                    Job(
                        model,
                        str(short),
                        str(tmp_path / f"out-{cut.name}"),
                        columns=("features=a,b",) if cut is packed else (),
                    )
                )
            )


@pytest.mark.parametrize("name", ["x.parquet.gz", "x.npy.gz", "x.gz"])
def test_only_csv_and_json_lines_are_read_gzipped_and_the_refusal_says_so(tmp_path, name):
    src = tmp_path / name
    src.write_bytes(b"")
    with pytest.raises(ScoreError, match="only CSV and JSON Lines are read compressed"):
        asyncio.run(run(Job(Identity("features", "FP32", (2,)), str(src), str(tmp_path / "out"))))
