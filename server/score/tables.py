"""Input tables for batch scoring: files read as a stream of record batches, table columns mapped
to a model's inputs, rows checked against the model's signature before any is scored.

Parquet, CSV and JSON Lines are streamed (pyarrow's incremental readers); ``.npy`` is memory-mapped
and sliced; ``.npz`` is read whole (numpy cannot stream it): each array is a column named after
its key, its first dimension the rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..core.signature import ModelSignature, TensorSpec

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
CSV_BLOCK_BYTES = 1 << 20


class ScoreError(ValueError):
    """Arguments or an input that cannot be scored; the message says what and why."""


def input_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    fmt = FORMATS.get(ext)
    if fmt is None:
        raise ScoreError(f"--input {path}: unknown format '{ext}' (known: {', '.join(sorted(FORMATS))})")
    return fmt


def read_batches(path: str, rows: int) -> Iterator[pa.RecordBatch]:
    """The file as record batches of exactly ``rows`` rows (the last one shorter), in file order."""
    fmt = input_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        # pre_buffer off: with it, pyarrow keeps every column chunk it read until the file is
        # closed (measured: a 400 MB file held whole), and memory would grow with the file.
        yield from _rechunk((b for b in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows)), rows)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES))
        yield from _rechunk(iter(reader), rows)
    elif fmt == "jsonl":
        import pyarrow.json as pjson

        reader = pjson.open_json(path, read_options=pjson.ReadOptions(block_size=CSV_BLOCK_BYTES))
        yield from _rechunk(iter(reader), rows)
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
        a = np.ascontiguousarray(a)
        if a.ndim == 1:
            cols[name] = pa.array(a)
        else:
            width = int(np.prod(a.shape[1:]))
            flat = pa.array(a.reshape(-1)) if a.dtype.kind != "U" else pa.array(a.reshape(-1).tolist())
            cols[name] = pa.FixedSizeListArray.from_arrays(flat, width)
    return pa.RecordBatch.from_pydict(cols)


@dataclass(frozen=True)
class Mapping:
    """Which columns feed each model input: one list column, or scalar columns stacked in order."""

    sources: dict[str, tuple[str, ...]]  # input name -> column names
    keep: tuple[str, ...]  # columns carried through to the output

    @staticmethod
    def build(sig: ModelSignature, schema: pa.Schema, given: Sequence[str], keep: Sequence[str]) -> Mapping:
        """``given``: ``input=col1,col2`` items (--columns). Default: a column named after each
        input; else, for a model of one input, every numeric column but the kept ones."""
        names = set(schema.names)
        for k in keep:
            if k not in names:
                raise ScoreError(f"--keep: the input has no column '{k}' (columns: {', '.join(schema.names)})")
        sources: dict[str, tuple[str, ...]] = {}
        inputs = {t.name: t for t in sig.inputs}
        for item in given:
            name, sep, cols = item.partition("=")
            if not sep or not cols:
                raise ScoreError(f"--columns {item!r}: write input=col1,col2,...")
            if name not in inputs:
                raise ScoreError(f"--columns: model '{sig.name}' has no input '{name}' (inputs: {', '.join(inputs)})")
            listed = tuple(c.strip() for c in cols.split(",") if c.strip())
            missing = [c for c in listed if c not in names]
            if missing:
                raise ScoreError(f"--columns: the input has no column(s) {', '.join(missing)}")
            sources[name] = listed
        for t in sig.inputs:
            if t.name in sources or t.optional:
                continue
            if t.name in names:
                sources[t.name] = (t.name,)
            elif len(sig.inputs) == 1:
                numeric = [
                    f.name
                    for f in schema
                    if f.name not in keep and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
                ]
                if not numeric:
                    raise ScoreError(f"no numeric column to feed input '{t.name}' (give --columns {t.name}=...)")
                sources[t.name] = tuple(numeric)
            else:
                raise ScoreError(
                    f"no column named '{t.name}' for model input '{t.name}': map it with --columns {t.name}=col1,..."
                )
        return Mapping(sources, tuple(keep))


@dataclass
class Prepared:
    """One batch of rows, checked: the rows that can be scored (their positions in the batch and
    their tensors) and the rejected ones with the reason."""

    good: np.ndarray  # positions of the rows to score
    feeds: dict[str, np.ndarray]  # input name -> [good rows, ...]
    rejects: list[tuple[int, str]]  # (position, reason)


def prepare(batch: pa.RecordBatch, sig: ModelSignature, mapping: Mapping, allow_nan: bool) -> Prepared:
    n = batch.num_rows
    bad: dict[int, str] = {}
    feeds: dict[str, np.ndarray] = {}
    for spec in sig.inputs:
        cols = mapping.sources.get(spec.name)
        if not cols:
            continue
        arr, why = _tensor(batch, cols, spec, sig.max_batch_size)
        for i, reason in why.items():
            bad.setdefault(i, reason)
        if not allow_nan and arr.dtype.kind == "f":
            finite = np.isfinite(arr.reshape(n, -1)).all(axis=1) if n else np.ones(0, bool)
            for j in np.flatnonzero(~finite).tolist():
                bad.setdefault(j, f"input '{spec.name}': NaN or infinity (--allow-nan lets it through)")
        feeds[spec.name] = arr
    good = np.array([i for i in range(n) if i not in bad], dtype=np.int64)
    return Prepared(good, {k: v[good] for k, v in feeds.items()}, sorted(bad.items()))


def _tensor(
    batch: pa.RecordBatch, cols: tuple[str, ...], spec: TensorSpec, max_batch: int
) -> tuple[np.ndarray, dict[int, str]]:
    """The input's tensor for every row of the batch ([rows, *dims]) and the rows that cannot
    give one (a missing value, a value of the wrong type or width)."""
    n = batch.num_rows
    dt = spec.dtype
    why: dict[int, str] = {}
    dims = spec.dims if max_batch > 0 else spec.dims[1:] if spec.dims and spec.dims[0] == -1 else spec.dims
    parts = []
    for c in cols:
        col = batch.column(batch.schema.get_field_index(c))
        for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)).tolist():
            why.setdefault(i, f"column '{c}': missing value")
        if pa.types.is_fixed_size_list(col.type) and _numeric(col.type.value_type) and col.values.null_count == 0:
            # the common case, without a Python object per value: the child array reshaped
            width = col.type.list_size
            flat = col.values.slice(col.offset * width, n * width).to_numpy(zero_copy_only=False)
            parts.append(_as(flat.reshape(n, width), dt.np_dtype, c, why))
        elif pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            values = col.to_pylist()
            widths = {len(v) for v in values if v is not None}
            w = max(widths) if widths else 0
            for i, v in enumerate(values):
                if v is not None and len(v) != w:
                    why.setdefault(i, f"column '{c}': {len(v)} values where other rows have {w}")
            rows = [(v if v is not None and len(v) == w else [None] * w) for v in values]
            parts.append(_as(np.array(rows, dtype=object), dt.np_dtype, c, why))
        else:
            parts.append(_as(col.to_numpy(zero_copy_only=False).reshape(n, 1), dt.np_dtype, c, why))
    arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    want = [d for d in dims]
    width = int(np.prod([d for d in want if d > 0])) if want and all(d > 0 for d in want) else None
    have = arr.shape[1] if arr.ndim > 1 else 1
    if width is not None and have != width:
        reason = f"{have} values for input '{spec.name}', which takes {width} ({list(dims)})"
        for i in range(n):
            why.setdefault(i, reason)
        return np.zeros((n, *[max(d, 1) for d in dims]), dt.np_dtype), why
    if want and all(d > 0 for d in want):
        arr = arr.reshape(n, *want)
    elif len(want) == 1:
        arr = arr.reshape(n, have)
    elif not want:
        arr = arr.reshape(n)
    return arr, why


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _as(values: np.ndarray, dtype: np.dtype, column: str, why: dict[int, str]) -> np.ndarray:
    """``values`` as ``dtype``; a value that is not one (text in a number column, 3.5 for an
    integer input, a number past the type's range) rejects its row."""
    if dtype == np.object_:
        out = np.empty(values.shape, dtype=object)
        for idx, v in np.ndenumerate(values):
            out[idx] = v if isinstance(v, bytes) else (b"" if v is None else str(v).encode())
        return out
    if values.dtype != object:
        if np.issubdtype(dtype, np.integer) and values.dtype.kind == "f":
            frac = ~np.isfinite(values) | (np.mod(values, 1) != 0)
            for i in np.flatnonzero(frac.reshape(values.shape[0], -1).any(axis=1)):
                why.setdefault(int(i), f"column '{column}': not a whole number for an integer input")
            values = np.where(frac, 0, values)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            num = values.astype(np.float64, copy=False)
            out_of = (num < info.min) | (num > info.max)
            for i in np.flatnonzero(out_of.reshape(values.shape[0], -1).any(axis=1)):
                why.setdefault(int(i), f"column '{column}': out of the range of {np.dtype(dtype).name}")
            values = np.where(out_of, 0, values)
        return values.astype(dtype)
    out = np.zeros(values.shape, dtype=dtype)
    for idx, v in np.ndenumerate(values):
        if v is None:
            continue
        try:
            out[idx] = v
        except (TypeError, ValueError, OverflowError):
            why.setdefault(int(idx[0]), f"column '{column}': {str(v)[:40]!r} is not a {np.dtype(dtype).name}")
    return out
