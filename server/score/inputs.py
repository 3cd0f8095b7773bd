"""Input files for batch scoring, read as a stream of record batches.

Parquet is streamed (pyarrow's incremental reader); ``.npy`` is memory-mapped and sliced; ``.npz``
is read whole (numpy cannot stream it): each array is a column named after its key, its first
dimension the rows. CSV and JSON Lines carry no types, and pyarrow infers them from the file's
first block, then fails the whole read at a later value of another type (a whole-number column
that turns to ``1.5`` after a megabyte, text in a number column). So these two are read with
the types the model's inputs ask for (``plan``: the columns to read and, for the ones feeding an
input, its numpy dtype): CSV reads those columns as text, converted per row when the batch is
checked (tables.py), so ``007`` stays ``007`` for a BYTES input; JSON Lines is cut into blocks of
lines, each read with those types, and a block pyarrow refuses is read line by line: a value
that does not fit its column leaves the row with the reason in the ``REASON`` column, and the
row is rejected with that reason instead of the run stopping.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import zlib
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".npy": "npy",
    ".npz": "npz",
}
# CSV and JSON Lines may come compressed (an export from a warehouse or Spark, as often as not):
# read through the decompressor as a stream. The other formats compress inside themselves.
COMPRESSED = (".gz",)
GZIP_MAX_RATIO = 1032  # deflate's most: no gzip file holds more than this many bytes per byte
CSV_BLOCK_BYTES = 1 << 20
REASON = "\x00batchgate_reason"  # a row that did not fit its columns' types: why (null for the others)
# what pyarrow's CSV reader takes for a missing number (its ConvertOptions.null_values)
NULL_TEXT = (
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null",
)  # fmt: skip
NAN_TEXT = ("-NaN", "-nan", "NaN", "nan")  # among them: NaN itself, with --allow-nan
INF_TEXT = ("inf", "+inf", "-inf", "infinity", "+infinity", "-infinity")  # (lower case) infinity itself


class Plan(Protocol):
    def __call__(self, schema: pa.Schema) -> dict[str, Any]:
        """The columns to read, each with the numpy dtype of the input it feeds (None: a kept
        column, read with the type inferred from the file's first rows); called with the
        inferred schema once the file is known to hold rows, before the first batch."""

    def no_rows(self, schema: pa.Schema) -> None:
        """Called instead when the file has a schema (a CSV header, Parquet's) and no rows."""


class ScoreError(ValueError):
    """Arguments or an input that cannot be scored; the message says what and why."""


def input_format(path: str) -> str:
    base, ext = os.path.splitext(path)
    ext = ext.lower()
    if ext in COMPRESSED:
        inner = os.path.splitext(base)[1].lower()
        fmt = FORMATS.get(inner)
        if fmt not in ("csv", "jsonl"):
            raise ScoreError(
                f"--input {path}: only CSV and JSON Lines are read compressed ('.csv{ext}', '.jsonl{ext}'), "
                f"not '{inner}{ext}' (Parquet and .npz compress inside the file)"
            )
        return fmt
    fmt = FORMATS.get(ext)
    if fmt is None:
        raise ScoreError(
            f"--input {path}: unknown format '{ext}' (known: {', '.join(sorted(FORMATS))}; "
            f".csv and .jsonl also gzipped, {', '.join(COMPRESSED)})"
        )
    return fmt


def compressed(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in COMPRESSED


def _no_bytes(path: str) -> bool:
    """Whether the file holds nothing once decompressed."""
    if not compressed(path):
        return os.path.getsize(path) == 0
    with gzip.open(path, "rb") as f:
        return not f.read(1)


def read_batches(path: str, rows: int, plan: Plan | None = None) -> Iterator[pa.RecordBatch]:
    """The file as record batches of exactly ``rows`` rows (the last one shorter), in file order.
    An empty file has no rows; a file pyarrow cannot read (a CSV row of the wrong width, a kept
    column whose values change type) is a ScoreError naming it."""
    fmt = input_format(path)
    try:
        if _no_bytes(path):
            return
        if fmt == "csv":
            decode: dict[str, bool] = {}  # (known once the file's first rows are read)
            for batch in _rechunk(_csv_rows(path, plan, decode), rows):
                yield _decoded(batch, decode) if decode else batch
        elif fmt == "jsonl":
            yield from _rechunk(_jsonl(path, plan), rows)
        else:
            yield from _planned(_other(path, fmt, rows), plan, lambda: _schema(path, fmt))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ScoreError(f"--input {path}: {e}") from None
    except (OSError, EOFError, zlib.error) as e:
        if not compressed(path):
            raise
        # cut short or not gzip at all (Python's reader: EOFError, BadGzipFile; pyarrow's: OSError)
        raise ScoreError(f"--input {path}: not a whole gzip file ({e})") from None


def _planned(
    batches: Iterator[pa.RecordBatch], plan: Plan | None, schema: Callable[[], pa.Schema]
) -> Iterator[pa.RecordBatch]:
    empty = True
    for i, b in enumerate(batches):
        if i == 0 and plan is not None:
            plan(b.schema)
        empty = False
        yield b
    if empty and plan is not None:
        plan.no_rows(schema())


def _schema(path: str, fmt: str) -> pa.Schema:
    """The columns of a file without rows: Parquet's schema; an array's names (``input``, an
    ``.npz``'s keys), which are all :meth:`Plan.no_rows` checks."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).schema_arrow
    if fmt == "npy":
        return pa.schema([("input", pa.null())])
    with np.load(path, allow_pickle=False) as z:
        return pa.schema([(k, pa.null()) for k in z.files])


def _other(path: str, fmt: str, rows: int) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        # pre_buffer off: with it, pyarrow keeps every column chunk it read until the file is
        # closed (measured: a 400 MB file held whole), and memory would grow with the file.
        yield from _rechunk((b for b in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows)), rows)
    elif fmt == "npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim == 0:
            raise ScoreError(f"--input {path}: a 0-d array has no rows")
        for start in range(0, arr.shape[0], rows):
            yield _array_batch({"input": np.asarray(arr[start : start + rows])})
    else:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        lengths = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise ScoreError(f"--input {path}: the arrays must share their first dimension (the rows)")
        n = lengths.pop()
        for start in range(0, n, rows):
            yield _array_batch({k: a[start : start + rows] for k, a in arrays.items()})


def _csv_rows(path: str, plan: Plan | None, decode: dict[str, bool]) -> Iterator[pa.RecordBatch]:
    """:func:`_csv`, a row longer than the reader's block told as such (pyarrow says an object
    straddles two block boundaries), and where: a quote left open makes the same error (a cell
    opened with a quote runs to the next one, line breaks and all), and was told as a long row."""
    read = 0
    try:
        for batch in _csv(path, plan, decode):
            read += batch.num_rows
            yield batch
    except pa.ArrowInvalid as e:
        if "straddl" not in str(e):
            raise
        raise ScoreError(
            f"--input {path}: past its first {read} rows, a row is longer than {CSV_BLOCK_BYTES >> 20} MiB, the most "
            'a CSV row may take here, or a quote is never closed (a cell that starts with " runs to the next ", '
            "line breaks and all): close the quote, or give such long rows as JSON Lines or Parquet"
        ) from None


def _csv(path: str, plan: Plan | None, decode: dict[str, bool]) -> Iterator[pa.RecordBatch]:
    """The file's batches as the reader gives them; ``decode`` gets the columns read as bytes for
    :func:`_decoded` (once per chunk of rows: per reader batch, a wide file took twice as long)."""
    import pyarrow.csv as pcsv

    options = pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
    # a quoted cell may hold a line break (RFC 4180: free text from spreadsheets, pandas); without
    # this the reader cut its blocks at any line break and failed where one fell inside a cell
    parse = pcsv.ParseOptions(newlines_in_values=True)
    first = pcsv.open_csv(path, read_options=options, parse_options=parse)  # the types of the first block
    if plan is None:
        yield from first
        return
    schema = first.schema
    try:
        first.read_next_batch()
    except StopIteration:  # a header and no rows
        plan.no_rows(schema)
        return
    finally:
        first.close()
    want = plan(schema)
    # text read as bytes (pyarrow refuses a whole file for one cell that is not UTF-8), then
    # decoded a batch at a time: the columns feeding an input, and the kept ones of text
    # (a set: a list looked up per column took minutes for a file of 60,000 columns)
    text = {c for c, dt in want.items() if dt is not None or pa.types.is_string(_known(schema.field(c).type))}
    types = {c: pa.binary() if c in text else _known(schema.field(c).type) for c in want}
    convert = pcsv.ConvertOptions(column_types=types, include_columns=list(want))
    decode.update({c: want[c] is not None for c in text if want[c] is None or np.dtype(want[c]) != np.object_})
    yield from pcsv.open_csv(path, read_options=options, parse_options=parse, convert_options=convert)


def _decoded(batch: pa.RecordBatch, decode: dict[str, bool]) -> pa.RecordBatch:
    """``decode``'s columns (bytes) as text. A value that is not UTF-8 rejects its row (the
    ``REASON`` column) where the column feeds an input (True); a kept one is escaped. A BYTES
    input's column stays bytes, as written."""
    reasons: list[str | None] = [None] * batch.num_rows
    columns = []
    for name, col in zip(batch.schema.names, batch.columns):
        if name in decode:
            try:
                col = col.cast(pa.string())
            except pa.ArrowInvalid:
                values = col.to_pylist()
                for i, v in enumerate(values):
                    try:
                        values[i] = v if v is None else v.decode()
                    except UnicodeDecodeError:
                        values[i] = None if decode[name] else v.decode("utf-8", "backslashreplace")
                        if decode[name] and reasons[i] is None:
                            reasons[i] = f"column '{name}': not UTF-8 text"
                col = pa.array(values, pa.string())
        columns.append(col)
    return pa.RecordBatch.from_arrays([*columns, pa.array(reasons, pa.string())], [*batch.schema.names, REASON])


def _known(t: pa.DataType) -> pa.DataType:
    return pa.string() if pa.types.is_null(t) else t


def _jsonl(path: str, plan: Plan | None) -> Iterator[pa.RecordBatch]:
    import pyarrow.json as pjson

    blocks = _line_blocks(path)
    first = next(blocks, None)
    if first is None:
        return
    if first.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):  # (one line each: an array would be a row of lists)
        raise ScoreError(
            f"--input {path}: starts with a JSON array; the JSON Lines read here are one object a line "
            "(pandas writes them with to_json(orient='records', lines=True))"
        )
    body = first.strip(b"\xef\xbb\xbf \t\r\n")
    end = body.find(b"\n")
    if body[: end if end >= 0 else len(body)].strip() == b"{":  # (a line of only '{' is no JSON object)
        raise ScoreError(
            f"--input {path}: one JSON document written over several lines (pretty-printed), not JSON Lines, "
            'which are one object a line; pandas writes them with to_json(orient="records", lines=True)'
        )
    if b"\n" not in body:  # one line: it may be the whole of a pandas to_json() of another layout
        second = next(blocks, None)
        if second is None and (layout := pandas_layout(_loads(body))):
            raise ScoreError(
                f"--input {path}: one JSON document in pandas' {layout} layout, which would read as one row; "
                'JSON Lines are one object a line: write them with to_json(orient="records", lines=True)'
            )
        blocks = chain([second], blocks) if second is not None else blocks
    try:
        schema = pjson.read_json(io.BytesIO(first)).schema
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        schema = _python_schema(first)
    want = plan(schema) if plan is not None else dict.fromkeys(schema.names)
    declared = pa.schema([pa.field(c, _declared(schema.field(c).type, dt)) for c, dt in want.items()])
    parse = pjson.ParseOptions(explicit_schema=declared, unexpected_field_behavior="ignore")
    out = declared.append(pa.field(REASON, pa.string()))
    floats = [c for c, dt in want.items() if dt is not None and np.dtype(dt).kind == "f"]
    for block in chain([first], blocks):
        try:
            table = pjson.read_json(io.BytesIO(block), parse_options=parse).select(declared.names).cast(declared)
            if any(_any_infinite(table.column(c)) for c in floats):
                # pyarrow reads a whole number past float64's range (1 and 400 zeros) as infinity, which
                # --allow-nan let through: line by line it is told apart from Infinity written as such
                raise pa.ArrowInvalid("infinity")
            table = table.append_column(REASON, pa.nulls(table.num_rows, pa.string()))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            table = _python_block(block, out, want)
        yield from table.to_batches()


def _any_infinite(col: pa.ChunkedArray) -> bool:
    import pyarrow.compute as pc

    while pa.types.is_list(col.type):
        col = pc.list_flatten(col)
    return pa.types.is_floating(col.type) and bool(pc.any(pc.is_inf(col)).as_py())


def pandas_layout(doc: Any) -> str:
    """The name of the layout of a pandas ``to_json()`` that ``doc`` has, other than JSON Lines'
    (``records`` with ``lines=True``); empty for none. The default, ``columns`` (``{column:
    {index: value}}``), and ``index`` (the other way round) are objects of objects sharing their
    keys; taken for one when there are two or more of them or the keys at a level are whole
    numbers (pandas' default index), so that a single row holding one object (text for a BYTES
    input) still reads as a row."""
    if not isinstance(doc, dict) or not doc:
        return ""
    keys = set(doc)
    if {"columns", "data"} <= keys <= {"columns", "index", "data"} and isinstance(doc["data"], list):
        return '"split" (orient="split": columns, index, data)'
    if keys == {"schema", "data"} and isinstance(doc["schema"], dict) and "fields" in doc["schema"]:
        return '"table" (orient="table": schema, data)'
    inner = [v for v in doc.values() if isinstance(v, dict)]
    if len(inner) != len(doc) or not inner[0] or any(v.keys() != inner[0].keys() for v in inner):
        return ""
    numbered = any(all(k.lstrip("-").isdigit() for k in level) for level in (keys, inner[0].keys()))
    if len(doc) >= 2 or numbered:
        return '"columns" (DataFrame.to_json()\'s default: {column: {index: value}}) or "index"'
    return ""


def _line_blocks(path: str) -> Iterator[bytes]:
    """The file in blocks of whole lines, about CSV_BLOCK_BYTES each (a longer line whole)."""
    with gzip.open(path, "rb") if compressed(path) else open(path, "rb") as f:
        rest = b""
        while True:
            data = f.read(CSV_BLOCK_BYTES)
            if not data:
                if rest.strip():
                    yield rest
                return
            data = rest + data
            cut = data.rfind(b"\n") + 1
            block, rest = data[:cut], data[cut:]
            if block.strip():
                yield block


def _python_schema(block: bytes) -> pa.Schema:
    """The columns of a block pyarrow cannot read (a column of numbers and text): each column's
    type as pyarrow infers it, else that of its first value."""
    rows = [r for r in (_loads(line) for line in block.splitlines()) if isinstance(r, dict)]
    names = list(dict.fromkeys(k for r in rows for k in r))
    fields = []
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            t = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            first = next(v for v in values if v is not None)
            try:
                t = pa.array([first]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                t = pa.string()
        fields.append(pa.field(name, t))
    return pa.schema(fields)


def _loads(line: bytes) -> Any:
    try:
        return json.loads(line, parse_float=_float) if line.strip() else None
    except ValueError:
        return None


class _Past(float):
    """A JSON number past float64's range (``1e400``), which reads as infinity: told apart from
    infinity written as such (``Infinity``), which --allow-nan lets through."""

    text: str

    def __new__(cls, text: str) -> _Past:
        self = super().__new__(cls, text)
        self.text = text
        return self


def _float(text: str) -> float:
    v = float(text)
    return _Past(text) if math.isinf(v) else v


def _declared(inferred: pa.DataType, dtype: Any) -> pa.DataType:
    """A column's type: for one feeding an input, the input's (as lists where the file's rows
    are lists), for a kept one what its first rows hold."""
    if dtype is None:
        return _known(inferred)
    if pa.types.is_list(inferred) or pa.types.is_large_list(inferred) or pa.types.is_fixed_size_list(inferred):
        return pa.list_(_declared(inferred.value_type, dtype))
    kind = np.dtype(dtype).kind
    return {"f": pa.float64(), "b": pa.bool_(), "O": pa.string()}.get(kind, pa.int64())


def _python_block(block: bytes, schema: pa.Schema, want: dict[str, Any]) -> pa.Table:
    """A block of lines read one by one: a value that does not fit its column is left out and its
    row gets the reason."""
    fields = [f for f in schema if f.name != REASON]
    columns: dict[str, list[Any]] = {f.name: [] for f in schema}
    for line in block.splitlines():
        if not line.strip():
            continue
        row = _loads(line)
        reason = None if isinstance(row, dict) else f"not a JSON object: {line[:40]!r}"
        for f in fields:
            value = row.get(f.name) if isinstance(row, dict) else None
            value, why = _fit(raw := value, f.type, want[f.name])
            if why and want[f.name] is None:  # a kept column: no input's type to name ("for an integer input")
                why = f"{_show(raw)} does not fit the type of this kept column, {f.type}, that of the file's first rows"
            if why and reason is None:
                reason = f"column '{f.name}': {why}"
            columns[f.name].append(None if why else value)
        columns[REASON].append(reason)
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)


def _fit(v: Any, t: pa.DataType, dtype: Any) -> tuple[Any, str | None]:
    """``v`` as a value of the column type ``t``, or why it is not one (``dtype``: the numpy
    type of the input the column feeds, for the reason; None for a kept column)."""
    if v is None:
        return None, None
    if pa.types.is_list(t):
        if not isinstance(v, list):
            return None, f"{_show(v)} is not a list"
        out = []
        for e in v:
            x, why = _fit(e, t.value_type, dtype)
            if why:
                return None, why
            out.append(x)
        return out, None
    name = np.dtype(dtype).name if dtype is not None else str(t)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return (v if isinstance(v, str) else json.dumps(v)), None  # a number for a text input: its JSON text
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if pa.types.is_boolean(t):
        return (v, None) if isinstance(v, bool) else (None, f"{_show(v)} is not a {name}")
    if pa.types.is_floating(t):
        if not number:
            return None, f"{_show(v)} is not a {name}"
        if isinstance(v, _Past) and dtype is not None:  # (a kept column carries it as infinity)
            return None, f"{v.text[:40]} is past the range of {name}"
        try:
            return float(v), None
        except OverflowError:
            return None, f"{_show(v)} is past the range of {name}"
    if pa.types.is_integer(t):
        if not number:
            return None, f"{_show(v)} is not a {name}"
        if isinstance(v, float) and not v.is_integer():
            return None, "not a whole number for an integer input"
        try:
            pa.scalar(int(v), t)
        except (pa.ArrowInvalid, OverflowError, ValueError):
            return None, f"out of the range of {name}"
        return int(v), None
    try:
        pa.scalar(v, t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, TypeError):
        return None, f"{_show(v)} does not fit the column's type {t} (that of the file's first rows)"
    return v, None


def _show(v: Any) -> str:
    return repr(v[:40]) if isinstance(v, str) else json.dumps(v)[:40]


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    pending: list[pa.RecordBatch] = []
    have = 0
    for b in batches:
        pending.append(b)
        have += b.num_rows
        while have >= rows:
            table = pa.Table.from_batches(pending)
            head, rest = table.slice(0, rows), table.slice(rows)
            yield head.combine_chunks().to_batches()[0] if head.num_rows else head
            pending, have = rest.to_batches(), rest.num_rows
    if have:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _array_batch(arrays: dict[str, np.ndarray]) -> pa.RecordBatch:
    cols = {}
    for name, a in arrays.items():
        if a.dtype.kind in "cVO":  # (pyarrow has no such column: the run stopped with its traceback)
            raise ScoreError(
                f"the array '{name}' is of type {a.dtype} (complex, records or objects), which no model input takes: "
                "give numbers, bools or text"
            )
        a = np.ascontiguousarray(a)
        if a.ndim == 1:
            cols[name] = pa.array(a)
        else:
            width = int(np.prod(a.shape[1:]))
            flat = pa.array(a.reshape(-1)) if a.dtype.kind != "U" else pa.array(a.reshape(-1).tolist())
            cols[name] = pa.FixedSizeListArray.from_arrays(flat, width)
    return pa.RecordBatch.from_pydict(cols)
