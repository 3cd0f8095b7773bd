"""Input tables for batch scoring: table columns mapped to a model's inputs, rows checked against
the model's signature before any is scored (the files are read in inputs.py).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa

from ..core.signature import ModelSignature, TensorSpec
from .inputs import INF_TEXT, NAN_TEXT, NULL_TEXT, REASON, ScoreError, input_format, read_batches

__all__ = ["Mapping", "Plan", "Prepared", "ScoreError", "input_format", "prepare", "read_batches"]


@dataclass(frozen=True)
class Mapping:
    """Which columns feed each model input: one list column, or scalar columns stacked in order."""

    sources: dict[str, tuple[str, ...]]  # input name -> column names
    keep: tuple[str, ...]  # columns carried through to the output

    @staticmethod
    def named(
        sig: ModelSignature, schema: pa.Schema, given: Sequence[str], keep: Sequence[str]
    ) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        """The columns named (``--keep``, ``--columns``), each checked against the input's header
        and the model's inputs; the sources ``given`` maps, and the kept columns, each as the
        header writes it (see :func:`_header_name`)."""
        header = list(schema.names)
        names = set(header)
        kept = []
        for k in keep:
            found = _header_name(k, header, names)
            if found is None:
                raise ScoreError(f"--keep: the input has no column {k!r} (columns: {_listing(header)})")
            kept.append(found)
        sources: dict[str, tuple[str, ...]] = {}
        inputs = {t.name: t for t in sig.inputs}
        for item in given:
            name, sep, cols = item.partition("=")
            if not sep or not cols:
                raise ScoreError(f"--columns {item!r}: write input=col1,col2,...")
            if name not in inputs:
                raise ScoreError(f"--columns: model '{sig.name}' has no input '{name}' (inputs: {', '.join(inputs)})")
            listed = [c.strip() for c in cols.split(",") if c.strip()]
            found_ = [_header_name(c, header, names) for c in listed]
            missing = [c for c, f in zip(listed, found_) if f is None]
            if missing:
                said = ", ".join(map(repr, missing))
                raise ScoreError(f"--columns: the input has no column(s) {said} (columns: {_listing(header)})")
            sources[name] = tuple(f for f in found_ if f is not None)
        return sources, tuple(kept)

    @staticmethod
    def build(sig: ModelSignature, schema: pa.Schema, given: Sequence[str], keep: Sequence[str]) -> Mapping:
        """``given``: ``input=col1,col2`` items (--columns). Default: a column named after each
        input; else, for a model of one input, every numeric column but the kept ones."""
        names = set(schema.names)
        sources, keep = Mapping.named(sig, schema, given, keep)
        for t in sig.inputs:
            if t.name in sources or t.optional:
                continue
            if t.name in names:
                sources[t.name] = (t.name,)
            elif len(sig.inputs) == 1:
                free = [f for f in schema if f.name not in keep]
                numeric = [f.name for f in free if _numeric(f.type) and not pa.types.is_boolean(f.type)]
                width = int(np.prod(t.dims)) if t.dims and all(d > 0 for d in t.dims) else None
                if width is not None and len(numeric) != width and len(free) == width:
                    # A number column with text in the file's first rows reads as text; when every
                    # column left makes the input's width, take them all: a bad cell rejects its row.
                    numeric = [f.name for f in free]
                lists = [f.name for f in free if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)]
                if not numeric and len(lists) == 1:  # (a 2-D .npy: its one column, "input")
                    numeric = lists
                if not numeric:
                    raise ScoreError(f"no numeric column to feed input '{t.name}' (give --columns {t.name}=...)")
                sources[t.name] = tuple(numeric)
            else:
                raise ScoreError(
                    f"no column named '{t.name}' for model input '{t.name}': map it with --columns {t.name}=col1,..."
                )
        # a name the header gives twice: only one of the columns would be read, in each place it is named
        used = {c for cols in sources.values() for c in cols} | set(keep)
        # (counted once: schema.names is a new list at each use, and counting it per column took
        # minutes for a file of 60,000 columns)
        seen = Counter(schema.names)
        twice = sorted(c for c in used if seen[c] > 1)
        if twice:
            raise ScoreError(f"the input has two or more columns named {', '.join(map(repr, twice))}: rename them")
        return Mapping(sources, tuple(keep))


class Plan:
    """What to read of a file (read_batches' ``plan``): the mapping, built from the columns of the
    file's first rows; the columns that feed an input with its dtype, the kept ones."""

    def __init__(self, sig: ModelSignature, columns: Sequence[str], keep: Sequence[str]):
        self.sig, self.columns, self.keep = sig, columns, keep
        self.mapping: Mapping | None = None

    def __call__(self, schema: pa.Schema) -> dict[str, Any]:
        self.mapping = Mapping.build(self.sig, schema, self.columns, self.keep)
        want: dict[str, Any] = dict.fromkeys(self.mapping.keep)
        inputs = {t.name: t for t in self.sig.inputs}
        for name, cols in self.mapping.sources.items():
            for c in cols:
                want[c] = inputs[name].dtype.np_dtype
        return want

    def no_rows(self, schema: pa.Schema) -> None:
        """A file with a header (a schema) and no rows: the columns named are checked all the
        same, so that a misspelled ``--keep`` is not hidden by an empty input (the types, which
        a header alone does not give, are not judged)."""
        Mapping.named(self.sig, schema, self.columns, self.keep)


def _header_name(name: str, header: list[str], names: set[str]) -> str | None:
    """The header's column for a name given (``--keep``, ``--columns``): its own, else the one
    column whose name is it with spaces around (``id, amount, age``, as CSV files written by
    hand have it: the names given are stripped, and such a column could not be named at all)."""
    if name in names:
        return name
    loose = [h for h in header if h.strip() == name]
    return loose[0] if len(loose) == 1 else None


def _listing(header: list[str], most: int = 40) -> str:
    """The header's names, quoted (a name's spaces show), the first ``most`` of them."""
    shown = ", ".join(map(repr, header[:most]))
    return shown + (f", ... ({len(header)} in all)" if len(header) > most else "")


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
    if REASON in batch.schema.names and batch.column(REASON).null_count < n:  # a value that did not fit its column
        for i, reason in enumerate(batch.column(REASON).to_pylist()):
            if reason:
                bad[i] = reason
    for spec in sig.inputs:
        cols = mapping.sources.get(spec.name)
        if not cols:
            continue
        arr, why = _tensor(batch, cols, spec, sig.max_batch_size, allow_nan)
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
    batch: pa.RecordBatch, cols: tuple[str, ...], spec: TensorSpec, max_batch: int, allow_nan: bool = False
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
        if dt.np_dtype != np.object_ and not _gives_numbers(col.type):
            # (a timestamp, a struct: numpy cannot compare its values with numbers, and the run crashed)
            raise ScoreError(
                f"column '{c}' is of type {col.type}, which holds no numbers for input '{spec.name}' "
                f"({dt.v2}): cast it to a number type first, or feed it to a BYTES input"
            )
        if pa.types.is_decimal(col.type) and dt.np_dtype != np.object_:  # (Spark's and databases' money) as
            # numbers, not Decimal objects; for a BYTES input its text as written (1.10, not 1.1)
            col = col.cast(pa.float64())
        for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)).tolist():
            why.setdefault(i, f"column '{c}': missing value")
        fixed = len(cols) == 1 and bool(dims) and all(d > 0 for d in dims)
        if fixed and _listed(col.type) and _listed(col.type.value_type):
            # lists of lists, as a tensor of rank 2 or more is written (this command's own Parquet
            # parts, JSON): each row's shape is judged against the input's (its values were taken
            # for one list of that many values, and every row was refused)
            parts.append(_as(_nested(col, tuple(dims), spec.name, c, why), dt.np_dtype, c, why))
        elif len(cols) == 1 and len(dims) >= 2 and _listed(col.type) and _listed(col.type.value_type):
            # the same for an input of rank 2 or more with a variable dimension ([-1, 3]): one
            # shape per request, the most common one of those the input takes (each row's values
            # were read as one number, and every row was refused, "'[1.0, 2.0]' is not a float32")
            return _varied(col, tuple(dims), spec.name, c, why, dt.np_dtype), why
        elif pa.types.is_fixed_size_list(col.type) and _numeric(col.type.value_type) and col.values.null_count == 0:
            # the common case, without a Python object per value: the child array reshaped
            width = col.type.list_size
            flat = col.values.slice(col.offset * width, n * width).to_numpy(zero_copy_only=False)
            parts.append(_as(flat.reshape(n, width), dt.np_dtype, c, why))
        elif pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            values = col.to_pylist()
            # A fixed width judges each row alone (one long row had every row of its chunk
            # refused); else the rows of a request share one length (run.py groups them by it
            # when the model's outputs have fixed shapes): the most common one scores.
            w = int(np.prod(dims)) if fixed else _most_common([len(v) for v in values if v is not None])
            for i, v in enumerate(values):
                if v is not None and len(v) != w:
                    why.setdefault(
                        i,
                        f"column '{c}': {len(v)} values where input '{spec.name}' takes {w}"
                        if fixed
                        else f"column '{c}': {len(v)} values where other rows of its chunk have {w}: the model's "
                        "outputs vary in shape, so rows of different lengths cannot be answered as one batch",
                    )
            rows = [(v if v is not None and len(v) == w else [None] * w) for v in values]
            parts.append(_as(np.array(rows, dtype=object), dt.np_dtype, c, why))
        elif dt.np_dtype != np.object_ and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            parts.append(_from_text(col, dt.np_dtype, c, why, allow_nan))  # CSV: numbers read as text
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


def _listed(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)


def _nested(col: pa.Array, dims: tuple[int, ...], name: str, column: str, why: dict[int, str]) -> np.ndarray:
    """A column of nested lists as [rows, values in order]; a row whose shape is not ``dims``
    (other sizes, uneven lists, a list missing inside) is refused saying so."""
    n, width = len(col), int(np.prod(dims))
    sizes, inner = [], col.type
    while pa.types.is_fixed_size_list(inner):
        sizes.append(inner.list_size)
        inner = inner.value_type
    if tuple(sizes) == dims and _numeric(inner):  # fixed-size lists all the way: the values, reshaped
        flat, count = col, n
        for size in sizes:
            flat = flat.values.slice(flat.offset * size, count * size)
            count *= size
            if flat.null_count:
                break
        else:
            return flat.to_numpy(zero_copy_only=False).reshape(n, width)
    rows = []
    for i, v in enumerate(col.to_pylist()):
        shape, values = _shape(v) if v is not None else (dims, [None] * width)
        if shape != dims:
            got = f"values of shape {list(shape)}" if shape is not None else "lists of uneven lengths"
            why.setdefault(i, f"column '{column}': {got} where input '{name}' takes {list(dims)}")
            values = [None] * width
        rows.append(values)
    return np.array(rows, dtype=object).reshape(n, width)


def _varied(
    col: pa.Array, dims: tuple[int, ...], name: str, column: str, why: dict[int, str], dtype: np.dtype
) -> np.ndarray:
    """A column of nested lists for an input of a variable dimension, as [rows, *shape]: the
    most common shape among the rows of a shape the input takes; the other rows are refused."""
    n = len(col)
    shaped = [_shape(v) if v is not None else (None, []) for v in col.to_pylist()]
    fits = [
        s for s, _ in shaped if s is not None and len(s) == len(dims) and all(d <= 0 or d == k for d, k in zip(dims, s))
    ]
    counts: dict[tuple[int, ...], int] = {}
    for s in fits:
        counts[s] = counts.get(s, 0) + 1
    shape = max(counts, key=lambda s: (counts[s], s)) if counts else tuple(max(d, 1) for d in dims)
    width = int(np.prod(shape))
    rows = []
    for i, (have, values) in enumerate(shaped):
        if have != shape:
            if have is not None or col[i].is_valid:
                got = f"values of shape {list(have)}" if have is not None else "lists of uneven lengths"
                takes = f"where input '{name}' takes {list(dims)}"
                if have is not None and have in counts:
                    takes = f"where other rows of its chunk have {list(shape)}: a request is one tensor"
                why.setdefault(i, f"column '{column}': {got} {takes}")
            values = [None] * width
        rows.append(values)
    return _as(np.array(rows, dtype=object).reshape(n, width), dtype, column, why).reshape(n, *shape)


def _shape(v: Any) -> tuple[tuple[int, ...] | None, list[Any]]:
    """The shape of nested lists and their values in order; None for uneven ones."""
    if not isinstance(v, list):
        return (), [v]
    inner = [_shape(x) for x in v]
    shapes = {s for s, _ in inner}
    if len(shapes) > 1:
        return None, []
    below = shapes.pop() if shapes else ()
    if below is None:
        return None, []
    return (len(v), *below), [x for _, values in inner for x in values]


def _most_common(lengths: list[int]) -> int:
    """The most common length (the longest of those tied); 0 for none."""
    if not lengths:
        return 0
    values, counts = np.unique(lengths, return_counts=True)
    return int(values[counts == counts.max()].max())


def _gives_numbers(t: pa.DataType) -> bool:
    """Whether a column of type ``t`` can feed a number input: numbers, text (parsed per value),
    nulls, or dictionaries and lists of these."""
    if pa.types.is_dictionary(t):
        return _gives_numbers(t.value_type)
    if _listed(t):
        return _gives_numbers(t.value_type)
    return (
        _numeric(t)
        or pa.types.is_null(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def _from_text(col: pa.Array, dtype: np.dtype, column: str, why: dict[int, str], nan: bool = False) -> np.ndarray:
    """A text column as numbers: at once when every value parses, else value by value (a value
    that does not rejects its row); the CSV reader's missing-value words are missing values, but
    for a float input with ``nan`` (--allow-nan) its NaN spellings are NaN."""
    import pyarrow.compute as pc

    n = len(col)
    kind = np.dtype(dtype).kind
    missing = pc.is_in(col, value_set=pa.array(NULL_TEXT)).to_numpy(zero_copy_only=False)
    nans = None
    if nan and kind == "f":
        nans = pc.is_in(col, value_set=pa.array(NAN_TEXT)).to_numpy(zero_copy_only=False)
        missing = missing & ~nans
    for i in np.flatnonzero(missing).tolist():
        why.setdefault(i, f"column '{column}': missing value")
    col = pc.if_else(pa.array(missing if nans is None else missing | nans), pa.scalar(None, col.type), col)
    out = None
    if kind in "fiu":
        try:
            parsed = pc.cast(col, pa.float64() if kind == "f" else pa.int64()).fill_null(0)
            out = _as(parsed.to_numpy(zero_copy_only=False).reshape(n, 1), dtype, column, why)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    if out is None:  # value by value: a NaN spelling as NaN itself, not a missing value
        values = col.to_pylist()
        for i in np.flatnonzero(nans).tolist() if nans is not None else ():
            values[i] = float("nan")
        out = _as(np.array(values, dtype=object).reshape(n, 1), dtype, column, why)
    if kind == "f":  # a number past float64's range (1e400) reads as infinity: refused as past the
        big = np.isinf(out.reshape(n))  # range, also with --allow-nan, unlike infinity written as such
        if big.any():
            text = pc.utf8_lower(pc.utf8_trim_whitespace(col))
            spelled = pc.is_in(text, value_set=pa.array(INF_TEXT)).to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(big & ~spelled).tolist():
                why.setdefault(i, f"column '{column}': {str(col[i].as_py())[:40]} is past the range of {dtype.name}")
    if nans is not None and nans.any():
        out[nans.reshape(n, 1)] = np.nan
    return out


def _as(values: np.ndarray, dtype: np.dtype, column: str, why: dict[int, str]) -> np.ndarray:
    """``values`` as ``dtype``; a value that is not one (text in a number column, 3.5 for an
    integer input, a number past the type's range: 1e40 for a float32) rejects its row."""
    if dtype == np.object_:
        out = np.empty(values.shape, dtype=object)
        for idx, v in np.ndenumerate(values):
            if v is None:  # (a null inside a list: it was sent as b"", and scored)
                why.setdefault(int(idx[0]), f"column '{column}': missing value")
            out[idx] = v if isinstance(v, bytes) else b"" if v is None else _text(v).encode()
        return out
    if values.dtype.kind in "OUS":
        values = _parsed(values, dtype, column, why)
    rows = values.shape[0]
    if dtype == np.bool_ and values.dtype.kind in "iuf":  # numbers for a BOOL input: 0 and 1 only, as
        other = ~np.isin(values, (0, 1))  # a CSV's text is read (5 or 0.5 was cast to True, silently)
        flat = other.reshape(rows, -1)
        for r in np.flatnonzero(flat.any(axis=1)).tolist():
            why.setdefault(r, f"column '{column}': {values.reshape(rows, -1)[r][flat[r]][0]:g} is not a bool")
        values = np.where(other, 0, values)
    if np.issubdtype(dtype, np.integer) and values.dtype.kind == "f":
        frac = ~np.isfinite(values) | (np.mod(values, 1) != 0)
        for i in np.flatnonzero(frac.reshape(rows, -1).any(axis=1)):
            why.setdefault(int(i), f"column '{column}': not a whole number for an integer input")
        values = np.where(frac, 0, values)
    if np.issubdtype(dtype, np.integer) and values.dtype != dtype:
        info = np.iinfo(dtype)
        if values.dtype.kind in "iub":  # integers compared exactly (as float64, 2**63 of a uint64 was
            out_of = (values < info.min) | (values > info.max)  # not past int64's max, and wrapped negative)
        else:  # (float(2**63 - 1) is 2**63 itself: a float that large is past the max)
            num = values.astype(np.float64, copy=False)
            out_of = (num < info.min) | (num >= float(info.max) + 1)
        for i in np.flatnonzero(out_of.reshape(rows, -1).any(axis=1)):
            why.setdefault(int(i), f"column '{column}': out of the range of {np.dtype(dtype).name}")
        values = np.where(out_of, 0, values)
    if np.issubdtype(dtype, np.floating):
        with np.errstate(over="ignore", invalid="ignore"):
            out = values.astype(dtype)
        over = np.isinf(out) & np.isfinite(values)  # a finite number past the type's range (inf stays inf)
        if over.any():
            flat = over.reshape(rows, -1)
            for r in np.flatnonzero(flat.any(axis=1)).tolist():
                v = values.reshape(rows, -1)[r][flat[r]][0]
                why.setdefault(r, f"column '{column}': {v:g} is past the range of {np.dtype(dtype).name}")
            out[over] = 0
        return out
    return values.astype(dtype)


def _text(v: Any) -> str:
    """A value for a BYTES input as text, as a JSON Lines file gives it (its JSON text): ``true``,
    a struct or map as a JSON object or pairs (Python's ``True``, ``{'a': 1}`` were sent)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def _parsed(values: np.ndarray, dtype: np.dtype, column: str, why: dict[int, str]) -> np.ndarray:
    """Python values (a list column, text) as numbers, value by value: float64 for a float
    input, else ``dtype``; a value that is not a number of the type rejects its row."""
    kind = np.dtype(dtype).kind
    out = np.zeros(values.shape, dtype=np.float64 if kind == "f" else dtype)
    name = np.dtype(dtype).name
    info = np.iinfo(dtype) if kind in "iu" else None
    for idx, v in np.ndenumerate(values):
        row = int(idx[0])
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, Decimal):  # (in a list column of decimals)
            v = float(v)
        if v is None or (isinstance(v, str) and v in NULL_TEXT):
            why.setdefault(row, f"column '{column}': missing value")
            continue
        if isinstance(v, str):
            text = v
            if kind == "b":
                v = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower(), text)
            else:
                try:
                    v = int(text) if kind in "iu" else float(text)
                except ValueError:
                    try:
                        v = float(text)
                    except ValueError:
                        v = text
        if not isinstance(v, (bool, int, float, np.number, np.bool_)) or (kind == "b" and isinstance(v, str)):
            why.setdefault(row, f"column '{column}': {str(v)[:40]!r} is not a {name}")
            continue
        if kind == "b" and not isinstance(v, (bool, np.bool_)) and v not in (0, 1):  # (5 was True)
            why.setdefault(row, f"column '{column}': {v:g} is not a bool")
            continue
        if info is not None:
            if isinstance(v, (float, np.floating)) and not (math.isfinite(v) and float(v).is_integer()):
                why.setdefault(row, f"column '{column}': not a whole number for an integer input")
                continue
            if not info.min <= int(v) <= info.max:
                why.setdefault(row, f"column '{column}': out of the range of {name}")
                continue
            v = int(v)
        try:
            out[idx] = v
        except (TypeError, ValueError, OverflowError):
            why.setdefault(row, f"column '{column}': {str(v)[:40]!r} is not a {name}")
    return out
