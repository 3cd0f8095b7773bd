"""Batch scoring's output: numbered part files (Parquet or CSV), a manifest, and the rejects.

Only the parts have plain names: the folder reads as one dataset (``pyarrow.dataset.dataset``,
``pandas.read_parquet``, Spark), since those readers skip names that start with ``_`` or ``.``,
and the bookkeeping has such names: ``_manifest.json``, ``_rejects-NNNNN.jsonl`` (each part's
rejects), ``_rejects.jsonl`` (all of them) and ``.NAME.partial`` (a file being written). Until
2026-12-06 they were ``manifest.json``, ``rejects-NNNNN.jsonl`` and ``rejects.jsonl``, which the
readers took for parts and failed on; a run into such a folder takes that manifest over.

Part ``i`` holds the scored rows of input rows ``[i * batch_size, (i + 1) * batch_size)``, in input
order, its number zero-padded to one width for the run (:func:`part_width`) so the names sort;
it is written beside its final name, fsynced and renamed, then recorded in the manifest
(rewritten the same way, at most once a second or a sixteenth more parts) with its SHA-256. A run restarted
with the same arguments keeps every part the manifest records whose file still has that digest,
and scores the others: the final output is the same bytes as an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import time
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .inputs import GZIP_MAX_RATIO, ScoreError, compressed, input_format

MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # (and its rejects-NNNNN.jsonl, rejects.jsonl: see the module text)
REJECTS = "_rejects.jsonl"
MANIFEST_VERSION = 1
PART_DIGITS = 5  # the fewest digits of a part's number
SAVE_EVERY_S = 1.0


def part_name(index: int, fmt: str, width: int = PART_DIGITS) -> str:
    """``part-NNNNN.fmt``: the index zero-padded to ``width`` (:func:`part_width`), the same for
    every part of a run, so that the names sort in input order."""
    return f"part-{index:0{width}d}.{fmt}"


def rejects_name(index: int, width: int = PART_DIGITS) -> str:
    return f"_rejects-{index:0{width}d}.jsonl"


def part_width(input_path: str, batch_size: int) -> int:
    """The digits of the parts' numbers: 5, or more when the input could make more than 100,000
    parts. A reader that sorts the names (a glob sorted, a listing) read ``part-100000`` before
    ``part-99999``. The most parts is judged before the run from the file: its row count where
    the file says it (Parquet, ``.npy``, ``.npz``), else its size (a CSV or JSON-lines row takes at
    least a byte); so a rerun with the same input and batch size names its parts alike."""
    rows = _row_bound(input_path)
    parts = -(-rows // max(1, batch_size))
    return max(PART_DIGITS, len(str(max(0, parts - 1))))


def _row_bound(path: str) -> int:
    fmt = input_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        if fmt == "npy":
            shape = np.load(path, mmap_mode="r").shape
            return int(shape[0]) if shape else 0
        if fmt == "npz":
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
                if not members:
                    return 0
                with z.open(members[0]) as f:  # (its header only: the arrays share their rows)
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape = read(f)[0]
                    return int(shape[0]) if shape else 0
        return os.path.getsize(path) * (GZIP_MAX_RATIO if compressed(path) else 1)
    except (OSError, ValueError, zipfile.BadZipFile):  # (an unreadable file: reading it says why)
        return 0


def partial_path(path: str) -> str:
    """Where ``path`` is written before it is renamed: hidden, so no reader takes it for a part."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.partial")


def input_in_output(input_path: str, out_dir: str) -> str:
    """Why the input cannot be read from inside the output folder (empty when it is elsewhere):
    the run writes parts there and removes the part files it did not record, so an input named
    like a part (part-00000.parquet) would be overwritten or removed before it is read. Each path
    is taken as given and with its links resolved (a link in the folder is a file of it too)."""
    ins = {os.path.abspath(input_path), os.path.realpath(input_path)}
    outs = {os.path.abspath(out_dir), os.path.realpath(out_dir)}
    if any(os.path.commonpath([i, o]) == o for i in ins for o in outs):
        return (
            f"--input {input_path} is inside the --output folder {out_dir}, where the run writes its parts and "
            "removes parts it did not write: move the input out of it, or give another --output"
        )
    return ""


def rejects_in_the_way(rejects: str, out_dir: str) -> str:
    """Why ``rejects`` (--rejects) cannot be written where it is (empty when it can): a file the
    run keeps in the output folder, its manifest, a part or a part's rejects, which the gathered
    rejects replaced (the manifest: the run could not resume; a part: its rows were lost)."""
    if not rejects:
        return ""
    folder, name = os.path.split(os.path.abspath(rejects))
    if os.path.realpath(folder) != os.path.realpath(out_dir):
        return ""
    ours = re.fullmatch(r"\.?(?:part-\d+\.(?:parquet|csv)|_?rejects-\d+\.jsonl)(?:\.partial)?", name)
    if name in (MANIFEST, LEGACY_MANIFEST) or ours:
        return (
            f"--rejects {rejects} names a file the run keeps in its --output folder (the manifest, a part or a "
            f"part's rejects), which the rejects would replace: give another name (the default is {REJECTS})"
        )
    return ""


@contextlib.contextmanager
def only_writer(out_dir: str) -> Iterator[None]:
    """Held while a run writes into ``out_dir``: a second run into the same folder (a job
    retried while its first try still runs) is refused, where both wrote the same parts through
    the same temporary names and removed each other's (one stopped, FileNotFoundError, and a
    part could be left half of one run's bytes). An advisory lock on the folder itself (no file
    of its own); where the system takes none (Windows, some network file systems) runs go on
    without it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScoreError(
                f"--output {out_dir}: another batchgate score is writing into this folder; wait for it to end "
                "(a rerun then resumes from its parts), or give another --output"
            ) from None
        except OSError:  # (no locks here: as before)
            pass
        yield
    finally:
        os.close(fd)


def output_columns(
    keep: pa.Table, outputs: Mapping[str, np.ndarray], fmt: str, variable: frozenset[str] = frozenset()
) -> pa.Table:
    """The kept input columns, then one column per output (see the module text of tables.py for
    the shapes): Parquet keeps a tensor row as a (nested) fixed-size list; CSV flattens a 2-D
    output to ``<name>_<i>`` and writes higher ranks and BYTES as JSON text. An output of a
    variable dimension (``variable``: its names) is a (nested) list, and JSON text in a CSV, so
    that every part has the same columns of the same types whatever the lengths in it."""
    cols: dict[str, pa.Array] = {name: keep.column(name).combine_chunks() for name in keep.column_names}
    for name, col in cols.items():
        if fmt == "csv" and pa.types.is_nested(col.type):  # (pyarrow's CSV writer takes none): JSON text
            cols[name] = pa.array(
                [None if v is None else json.dumps(_py(v), default=str) for v in py_values(col)], pa.string()
            )
        elif fmt == "csv" and _binary(col.type):  # (the writer refuses bytes that are not UTF-8): escaped text
            cols[name] = pa.array([None if v is None else _text(v) for v in col.to_pylist()], pa.string())
    for name, arr in outputs.items():
        # a kept column the output would replace (a file's own ground truth 'label', say)
        flat = re.compile(re.escape(name) + (r"(_\d+)?" if fmt == "csv" else ""))
        clash = [c for c in keep.column_names if flat.fullmatch(c)]
        if clash:
            raise ScoreError(
                f"the kept column '{clash[0]}' has the name of a column of the model's output '{name}', which "
                "would replace it: rename it in the input, or do not keep it"
            )
        if arr.dtype == object:  # BYTES: text (UTF-8; other bytes escaped)
            if arr.ndim == 1:
                cols[name] = pa.array([_text(v) for v in arr.tolist()], pa.string())
            elif fmt == "csv":
                cols[name] = pa.array([json.dumps(_py(v)) for v in arr.tolist()])
            else:
                texts: pa.Array = pa.array([_text(v) for v in arr.reshape(-1).tolist()], pa.string())
                cols[name] = _nested(texts, arr.shape)
        elif arr.ndim == 1:
            cols[name] = pa.array(arr)
        elif fmt == "csv" and arr.ndim == 2 and name not in variable:
            for i in range(arr.shape[1]):
                cols[f"{name}_{i}"] = pa.array(np.ascontiguousarray(arr[:, i]))
        elif fmt == "csv":
            cols[name] = pa.array([json.dumps(v) for v in arr.tolist()])
        else:
            cols[name] = _nested(pa.array(np.ascontiguousarray(arr).reshape(-1)), arr.shape)
        if name in variable and (pa.types.is_fixed_size_list(cols[name].type) or pa.types.is_list(cols[name].type)):
            cols[name] = cols[name].cast(_listed(cols[name].type))
    return pa.table(cols)


def _nested(values: pa.Array, shape: tuple[int, ...]) -> pa.Array:
    """The values of an array of ``shape`` as rows of (nested) fixed-size lists. A dimension of
    0 (a variable one, in a part where no row was scored: zeros in its place) gives empty lists,
    as pyarrow takes no fixed-size list of 0 values (the run stopped, ArrowInvalid)."""
    for level in range(len(shape) - 1, 0, -1):
        width = shape[level]
        if width == 0:
            count = int(np.prod(shape[:level], dtype=np.int64))  # the lists at this level
            values = pa.ListArray.from_arrays(pa.array(np.zeros(count + 1, np.int32)), values)
        else:
            values = pa.FixedSizeListArray.from_arrays(values, int(width))
    return values


def py_values(col: pa.Array | pa.ChunkedArray) -> list[Any]:
    """``col.to_pylist()``; where Python cannot hold a value (a date or time past the year 9999,
    as a database's 'infinity' is exported: an OverflowError stopped the run), the column's
    dates and times as Arrow's text of them."""
    try:
        return col.to_pylist()
    except (OverflowError, ValueError):
        return col.cast(_dates_as_text(col.type)).to_pylist()


def _dates_as_text(t: pa.DataType) -> pa.DataType:
    if pa.types.is_temporal(t):
        return pa.string()
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_dates_as_text(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(_dates_as_text(t.key_type), _dates_as_text(t.item_type))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_dates_as_text(t.value_type), t.list_size)
    if pa.types.is_large_list(t):
        return pa.large_list(_dates_as_text(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(_dates_as_text(t.value_type))
    return t


def _listed(t: pa.DataType) -> pa.DataType:
    """``t`` with each (fixed-size) list a list."""
    return pa.list_(_listed(t.value_type)) if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) else t


def _text(v: object) -> str:
    return v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)


def _py(v: object) -> object:
    """``v`` for JSON text: bytes as their text (not Python's "b'...'"), inside lists, structs and maps too."""
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    if isinstance(v, dict):
        return {k: _py(x) for k, x in v.items()}
    return _text(v) if isinstance(v, bytes) else v


def _binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def reject_line(row: dict[str, Any]) -> str:
    """One line of the rejects file: strict JSON, which Python's json module does not write by
    default (NaN and infinity as bare ``NaN``/``Infinity``, refused by jq, Go, JSON.parse): a
    non-finite number in a kept column is written as null (the reason says what the input held), and
    bytes as their text."""
    return json.dumps(_finite(row), default=str, allow_nan=False)


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, bytes):  # (a kept binary column: its text, as the parts write it, not "b'...'")
        return _text(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def encode(table: pa.Table, fmt: str) -> bytes:
    """The part's bytes: the same table always gives the same bytes (no timestamps)."""
    sink = io.BytesIO()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, sink, compression="zstd")
    else:
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, sink)
    return sink.getvalue()


def write_atomically(path: str, data: bytes) -> None:
    tmp = partial_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Manifest:
    """What is written: the run's identity (``key``: the arguments that shape the output) and,
    per part, its file, digest and counts."""

    def __init__(self, out_dir: str, key: dict[str, Any], width: int = PART_DIGITS):
        self.out_dir, self.key, self.width = out_dir, key, width
        self.parts: dict[int, dict[str, Any]] = {}
        self.done = False
        self.found = False  # resume() found a manifest: the folder holds a scoring's output
        self.saved_at = time.monotonic()  # of the last save
        self.unsaved = 0  # parts recorded since

    @property
    def path(self) -> str:
        return os.path.join(self.out_dir, MANIFEST)

    def resume(self) -> int:
        """Take the parts of an earlier run with the same key whose files are intact; how many."""
        legacy = os.path.join(self.out_dir, LEGACY_MANIFEST)
        path = self.path if os.path.exists(self.path) or not os.path.exists(legacy) else legacy
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return 0
        self.found = True
        if path == legacy:
            doc = self._take_over(doc, legacy)
        if doc.get("version") != MANIFEST_VERSION or doc.get("key") != self.key:
            return 0
        fmt = self.key.get("format", "")
        for p in doc.get("parts", []):
            try:  # (a part named with other digits, by an earlier version, is written again under its name)
                ok = p["file"] == part_name(int(p["index"]), fmt, self.width)
                if ok:
                    with open(os.path.join(self.out_dir, p["file"]), "rb") as f:
                        ok = digest(f.read()) == p["sha256"]
                if ok and p.get("rejects_file"):  # its rejects too, gathered at the end: one gone or
                    # changed failed every rerun (exit 2) or lost its rows' reasons; the part is scored again
                    with open(os.path.join(self.out_dir, p["rejects_file"]), "rb") as f:
                        ok = "rejects_sha256" not in p or digest(f.read()) == p["rejects_sha256"]
            except (OSError, KeyError, TypeError, ValueError):
                ok = False
            if ok:
                self.parts[int(p["index"])] = p
        return len(self.parts)

    def _take_over(self, doc: Any, legacy: str) -> Any:
        """An earlier version's manifest: its parts' rejects renamed as this version names them
        (a part whose rejects are gone is scored again), the manifest saved under its new name,
        and the old names removed."""
        parts = doc.get("parts", []) if isinstance(doc, dict) else []
        for p in parts:
            with contextlib.suppress(OSError, KeyError, TypeError, ValueError):
                new = rejects_name(int(p["index"]))
                os.replace(os.path.join(self.out_dir, p["rejects_file"]), os.path.join(self.out_dir, new))
                p["rejects_file"] = new
        if isinstance(doc, dict):
            write_atomically(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())
        for name in (LEGACY_MANIFEST, "rejects.jsonl"):  # (the gathered rejects are written again)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.out_dir, name))
        return doc

    def record(self, part: dict[str, Any]) -> None:
        """Noted, and saved when a second has passed since the last save or the parts not saved
        make a sixteenth of all (saving the growing manifest after each part was quadratic: 55 s
        for 3,000 parts). A part written but not saved is scored again by a rerun."""
        self.parts[part["index"]] = part
        self.unsaved += 1
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S or self.unsaved * 16 >= len(self.parts):
            self.save()

    def save(self) -> None:
        doc = {
            "version": MANIFEST_VERSION,
            "key": self.key,
            "done": self.done,
            "parts": [self.parts[i] for i in sorted(self.parts)],
            "rows": {k: sum(p[k] for p in self.parts.values()) for k in ("input", "scored", "rejected", "failed")},
        }
        write_atomically(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())
        self.saved_at, self.unsaved = time.monotonic(), 0
