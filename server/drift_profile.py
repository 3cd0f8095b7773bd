"""``batchgate drift profile``: a reference profile from a training file (and the model's answers).

    batchgate drift profile --model fraud --input features --data train.csv --out fraud.json
        [--model-repository DIR | --url http://host:8000] [--feature-names a,b,...]
        [--categorical a,b] [--numeric c] [--bins 20] [--max-categories 50]

Data files: ``.npz`` (one array per input, named like the input; a file with one array serves a
single input), ``.csv`` (a header row), ``.parquet`` and ``.jsonl`` (one object a line). In the
table forms a single input takes every column (or the ``--feature-names`` ones, in that order);
with several inputs a column ``<input>.<feature>`` belongs to ``<input>``. JSON lines may also
carry an input as a list (``{"features": [0.1, 2.0, ...]}``), and Parquet as a list column.

With ``--model-repository`` (ONNX Runtime, the model's latest version) or ``--url`` (any V2
server over HTTP) the data is also run through the model, and its outputs are profiled too. The
profile records the data file's SHA-256 and row count.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .core.drift import DEFAULT_BINS, DEFAULT_MAX_CATEGORIES, build_profile, build_tensor, columns
from .core.errors import ConfigError

MAX_ROWS = 10_000_000
BATCH_ROWS = 1024


def add_parser(sub) -> None:
    d = sub.add_parser(
        "drift",
        help="drift monitoring: build reference profiles; status, reset, rebaseline (the admin API)",
        description="Reference profiles for drift monitors, and the admin API's drift calls.",
    )
    ds = d.add_subparsers(dest="drift_command", required=True)
    p = ds.add_parser("profile", help="a reference profile from a data file (and the model's outputs)")
    p.add_argument("--model", required=True, help="the model (or route) the profile is for")
    p.add_argument("--input", action="append", required=True, dest="inputs", help="an input tensor to profile")
    p.add_argument("--data", required=True, help="reference data: .npz, .csv, .parquet or .jsonl")
    p.add_argument("--out", required=True, help="where to write the profile (JSON)")
    p.add_argument("--feature-names", help="comma-separated names of the (single) input's columns")
    p.add_argument("--categorical", default="", help="comma-separated features to treat as categories")
    p.add_argument("--numeric", default="", help="comma-separated features to treat as numbers")
    p.add_argument("--bins", type=int, default=DEFAULT_BINS, help=f"quantile bins per feature ({DEFAULT_BINS})")
    p.add_argument("--max-categories", type=int, default=DEFAULT_MAX_CATEGORIES, help="categories kept per feature")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--model-repository", help="run the data through the model here (ONNX Runtime)")
    run.add_argument("--url", help="run the data through the model on this V2 server (HTTP)")
    from .admin.cli import add_drift_commands

    add_drift_commands(ds)


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- reading data
def read_table(path: str) -> dict[str, np.ndarray]:
    """Column name -> values from a CSV, Parquet or JSON-lines file, as they are written (CSV
    cells as text; :func:`_column` reads numbers out of them); JSONL list values kept whole."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8" starts with one) is not part of the first name
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise ConfigError(f"{path}: the CSV file has no header row")
            _distinct(path, header)
            cells: list[list[str]] = [[] for _ in header]
            for i, row in enumerate(reader):
                if len(row) != len(header):
                    raise ConfigError(f"{path}: row {i + 2} has {len(row)} cells, the header {len(header)}")
                for c, v in zip(cells, row):
                    c.append(v)
        return {name: np.asarray(values, dtype=object) for name, values in zip(header, cells)}
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"{path}: reading Parquet needs pyarrow: pip install 'batchgate[parquet]'") from None

        table = pq.read_table(path)
        _distinct(path, table.column_names)
        return {name: _arrow_column(path, name, table.column(name)) for name in table.column_names}
    if ext in (".jsonl", ".ndjson"):
        rows: list[dict[str, Any]] = []
        lines: list[int] = []  # each row's line number, for messages
        with open(path, encoding="utf-8-sig") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise ConfigError(f"{path}: line {i + 1} is not JSON: {e}") from None
                    if not isinstance(obj, dict):
                        raise ConfigError(f"{path}: line {i + 1} is not a JSON object")
                    rows.append(obj)
                    lines.append(i + 1)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        out = {}
        for k in keys:
            values = [r.get(k) for r in rows]
            if any(isinstance(v, list) for v in values):
                out[k] = _list_column(path, k, values, lines)
            else:
                out[k] = np.asarray(values, dtype=object)  # (a null, or a key a line lacks: missing)
        return out
    raise ConfigError(f"{path}: unknown data format {ext!r} (.npz, .csv, .parquet, .jsonl)")


def _list_column(path: str, key: str, values: list[Any], lines: list[int]) -> np.ndarray:
    """A JSON-lines input given as a list a line: one row each, every list as long as the first."""
    width = len(next(v for v in values if isinstance(v, list)))
    for v, line in zip(values, lines):
        if not isinstance(v, list) or len(v) != width:
            got = f"{len(v)} values" if isinstance(v, list) else "no list"
            raise ConfigError(f"{path}: line {line} has {got} for '{key[:64]}', where others have {width}")
    try:
        return np.asarray(values)
    except ValueError:  # (lists inside the lists)
        raise ConfigError(f"{path}: '{key[:64]}' must hold a flat list of values a line") from None


def _distinct(path: str, names: Sequence[str]) -> None:
    """A column named twice would be read as one (the last): refused, naming it."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: the column(s) {', '.join(repr(n[:64]) for n in twice[:4])} appear more than once")


def _column(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Numbers where every cell is one (empty cells and nulls: NaN), else text (nulls kept as
    None: missing, as a Parquet text column's). JSON booleans stay booleans: categories, as a
    Parquet bool column's (float() would make them the numbers 1 and 0)."""
    if any(isinstance(v, bool | np.bool_) for v in values):
        return np.asarray(list(values), dtype=object)
    try:
        return np.asarray([float("nan") if v is None or v == "" else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return np.asarray([None if v is None else str(v) for v in values], dtype=object)


def _arrow_column(path: str, name: str, col) -> np.ndarray:
    import pyarrow as pa

    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    kind = col.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        inner = kind.value_type
        if pa.types.is_floating(inner) or pa.types.is_integer(inner):  # an input as a list of numbers a row
            rows = col.to_pylist()
            if any(r is None for r in rows) or len({len(r) for r in rows}) > 1:
                raise ConfigError(f"{path}: column '{name[:64]}' holds lists of numbers of several lengths (or nulls)")
            return np.array(rows, dtype=np.float64)  # (a null inside a list: NaN, missing)
    return np.asarray(col.to_pylist(), dtype=object)


def load_inputs(
    path: str, inputs: list[str], feature_names: list[str], as_text: Callable[[str, str], bool] = lambda t, n: False
) -> tuple[dict[str, np.ndarray], dict[str, list[str] | None], set[str]]:
    """Input name -> [rows, features] array, input name -> feature names (or None), and the
    features of table files whose cells are text (categorical unless told otherwise). A table's
    column is read as numbers where every cell is one, unless ``as_text(input, feature)``: then
    its cells stay as written (``01`` is not ``1``)."""
    names: dict[str, list[str] | None] = {i: None for i in inputs}
    text: set[str] = set()
    if path.lower().endswith(".npz"):
        try:
            archive = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as e:  # (not NumPy's at all, or a pickle)
            raise ConfigError(f"{path}: not a NumPy .npz archive: {e}") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a single .npy array, named .npz
            raise ConfigError(f"{path}: a single .npy array, not an .npz archive (numpy.savez names each array)")
        with archive as z:
            files = list(z.files)
            if len(inputs) == 1 and len(files) == 1:
                arrays = {inputs[0]: z[files[0]]}
            else:
                missing = [i for i in inputs if i not in files]
                if missing:
                    raise ConfigError(f"{path}: no array named {', '.join(missing)} (arrays: {', '.join(files)})")
                arrays = {i: z[i] for i in inputs}
        for name, array in arrays.items():  # (a scalar has no rows; complex numbers no order)
            if not array.ndim or array.dtype.kind not in "biufSUO":
                what = "a single value" if not array.ndim else f"{array.dtype} values"
                raise ConfigError(
                    f"{path}: array '{name}' holds {what}; a profile needs rows of numbers, booleans or text"
                )
        if feature_names:
            names[inputs[0]] = feature_names
        # (an array of 3 or more dimensions goes to the model as it is and is profiled flattened, as
        # the server flattens what it samples; before, the model was fed the flattened rows and failed)
        return {k: v if v.ndim > 2 else columns(v) for k, v in arrays.items()}, names, text
    table = read_table(path)
    out = {}
    for tensor in inputs:
        if tensor in table and table[tensor].ndim == 2:  # JSONL: the input as a list per line
            out[tensor] = table[tensor]
            names[tensor] = feature_names or None
            continue
        if len(inputs) == 1:
            cols = feature_names or [c for c in table if table[c].ndim == 1]
        else:
            cols = [c for c in table if c.startswith(f"{tensor}.")]
        missing = [c for c in cols if c not in table]
        if missing or not cols:
            raise ConfigError(f"{path}: no column(s) {', '.join(missing) or tensor + '.*'} for input '{tensor}'")
        given = [c.split(".", 1)[1] if len(inputs) > 1 else c for c in cols]
        typed = path.lower().endswith(".parquet")  # (Parquet columns have their types already)
        block = [table[c] if typed or as_text(tensor, n) else _column(table[c]) for c, n in zip(cols, given)]
        kind = object if any(b.dtype == object for b in block) else np.float64
        out[tensor] = np.stack([b.astype(kind) for b in block], axis=1)
        names[tensor] = given
        text.update(n for n, b in zip(given, block) if b.dtype == object)
    return out, names, text


# ---------------------------------------------------------------------------------- the model
# the numpy datatype of each ONNX Runtime / V2 datatype (BYTES and strings: Python objects)
ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32, "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(string)": np.object_,
}  # fmt: skip
V2_TYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
    "INT16": np.int16, "INT8": np.int8, "UINT64": np.uint64, "UINT32": np.uint32, "UINT16": np.uint16,
    "UINT8": np.uint8, "BOOL": np.bool_, "BYTES": np.object_,
}  # fmt: skip


@functools.lru_cache(maxsize=4)
def _session(repository: str, model: str):
    from .backends.onnx_zipmap import open_session
    from .core.types import check_model_name, is_version_text

    check_model_name(model)
    root = os.path.join(repository, model)
    versions = sorted((int(v) for v in os.listdir(root) if is_version_text(v)), reverse=True)
    if not versions:
        raise ConfigError(f"{root}: no numbered version directory")
    vdir = os.path.join(root, str(versions[0]))
    files = sorted(f for f in os.listdir(vdir) if f.endswith(".onnx"))
    if not files:
        raise ConfigError(f"{vdir}: no .onnx file")
    path = os.path.join(vdir, files[0])
    return open_session(path, f"{model}/{versions[0]}/{files[0]}", providers=["CPUExecutionProvider"])


def local_dtypes(repository: str, model: str) -> dict[str, np.dtype]:
    """The model's inputs' datatypes (its latest version, as ONNX Runtime reads it)."""
    return {
        i.name: np.dtype(ORT_TYPES[i.type]) for i in _session(repository, model).get_inputs() if i.type in ORT_TYPES
    }


def remote_dtypes(url: str, model: str) -> dict[str, np.dtype]:
    """The model's inputs' datatypes, from a V2 server's metadata."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.split("://", 1)[-1].rstrip("/"), ssl=url.startswith("https://"))
    try:
        meta = client.get_model_metadata(model)
    finally:
        client.close()
    return {i["name"]: np.dtype(V2_TYPES[i["datatype"]]) for i in meta["inputs"] if i["datatype"] in V2_TYPES}


def _feed(array: np.ndarray, dtype: Any) -> np.ndarray:
    """Rows as the model takes them: text as str objects for a string (BYTES) input."""
    if np.dtype(dtype) == np.dtype(object):
        return np.vectorize(
            lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v), otypes=[object]
        )(array)
    return array.astype(dtype)


def run_local(repository: str, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(repository, model)
    types = {i.name: i.type for i in session.get_inputs()}
    outs: dict[str, list[np.ndarray]] = {}
    rows = next(iter(feeds.values())).shape[0]
    for start in range(0, rows, BATCH_ROWS):
        batch = {
            k: _feed(v[start : start + BATCH_ROWS], ORT_TYPES.get(types.get(k, ""), v.dtype)) for k, v in feeds.items()
        }
        names = [o.name for o in session.get_outputs()]
        for name, value in zip(names, session.run(names, batch)):
            outs.setdefault(name, []).append(np.asarray(value))
    served = _reshaped_outputs(repository, model)
    return {k: _as_served(np.concatenate(v), served.get(k)) for k, v in outs.items()}


def _reshaped_outputs(repository: str, model: str) -> dict[str, tuple[bool, tuple[int, ...]]]:
    """Outputs the model's config.pbtxt reshapes (Triton's ``reshape``): name -> (batched, the
    dims callers get), so a profile names their features as the served answers do (a label the
    model gives as [N] is served [N, 1] under dims [1])."""
    from .repository.config import read_config

    cfg = read_config(os.path.join(repository, model), model)
    return {
        o.name: (cfg.max_batch_size > 0, tuple(int(d) for d in o.dims)) for o in cfg.output if o.HasField("reshape")
    }


def _as_served(array: np.ndarray, reshape: tuple[bool, tuple[int, ...]] | None) -> np.ndarray:
    if reshape is None:
        return array
    batched, dims = reshape
    return array.reshape((array.shape[0], *dims) if batched else dims)


def run_remote(url: str, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    address = url.split("://", 1)[-1].rstrip("/")
    client = httpclient.InferenceServerClient(address, ssl=url.startswith("https://"))
    meta = client.get_model_metadata(model)
    limit = int(client.get_model_config(model).get("max_batch_size") or 0)
    step = min(BATCH_ROWS, limit) if limit > 0 else BATCH_ROWS
    dtypes = {i["name"]: i["datatype"] for i in meta["inputs"]}
    outs: dict[str, list[np.ndarray]] = {}
    rows = next(iter(feeds.values())).shape[0]
    for start in range(0, rows, step):
        ins = []
        for k, v in feeds.items():
            arr = _feed(v[start : start + step], V2_TYPES.get(dtypes.get(k, ""), v.dtype))
            t = httpclient.InferInput(k, list(arr.shape), np_to_triton_dtype(arr.dtype))
            t.set_data_from_numpy(arr, binary_data=True)
            ins.append(t)
        result = client.infer(model, ins)
        for o in meta["outputs"]:
            outs.setdefault(o["name"], []).append(result.as_numpy(o["name"]))
    client.close()
    return {k: np.concatenate(v) for k, v in outs.items()}


# ---------------------------------------------------------------------------------- the command
def check_options(args: argparse.Namespace) -> None:
    """Options that cannot make a profile are refused before any work (exit 2)."""
    if not 2 <= args.bins <= 1000:
        raise ConfigError(f"--bins must be from 2 to 1000, not {args.bins}")
    if not 1 <= args.max_categories <= 100_000:
        raise ConfigError(f"--max-categories must be from 1 to 100000, not {args.max_categories}")
    both = set(_names(args.categorical)) & set(_names(args.numeric))
    if both:
        raise ConfigError(f"--categorical and --numeric both name {', '.join(sorted(both))}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise ConfigError(f"--out {args.out}: the directory {folder} does not exist")


def make_profile(args: argparse.Namespace) -> dict[str, Any]:
    check_options(args)
    served: dict[str, np.dtype] = {}
    if args.model_repository:
        served = local_dtypes(args.model_repository, args.model)
    elif args.url:
        served = remote_dtypes(args.url, args.model)
    asked = _names(args.categorical)
    numeric = _names(args.numeric)

    def as_text(tensor: str, name: str) -> bool:  # cells kept as written: a BYTES input's, or categories
        dtype = served.get(tensor)
        return (dtype is not None and dtype.kind == "O") or (dtype is None and name in asked)

    arrays, names, text = load_inputs(args.data, args.inputs, _names(args.feature_names), as_text)
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) != 1:
        raise ConfigError(f"{args.data}: the inputs have different row counts ({sorted(rows)})")
    count = rows.pop()
    if not count or count > MAX_ROWS:
        raise ConfigError(f"{args.data}: {count} rows; a profile needs 1 to {MAX_ROWS}")
    categorical = asked + sorted(text - set(numeric))
    for t, a in arrays.items():  # a table with text columns: its number columns stay numbers
        if a.dtype == object and names[t] and t not in served:
            numeric += [n for n in names[t] or () if n not in text and n not in asked]
    inputs = {
        t: build_tensor(t, a, names[t], categorical, numeric, args.bins, args.max_categories, served.get(t))
        for t, a in arrays.items()
    }
    outputs = {}
    if args.model_repository or args.url:
        feeds = {}
        for t, a in arrays.items():
            dtype = served.get(t, np.dtype(np.float64) if a.dtype == object else a.dtype)
            if a.dtype == object:
                a = _fed(t, a, dtype)
            feeds[t] = a
        run = run_local if args.model_repository else run_remote
        answers = run(args.model_repository or args.url, args.model, feeds)
        outputs = {
            name: build_tensor(name, a, None, categorical, numeric, bins=args.bins, max_categories=args.max_categories)
            for name, a in answers.items()
            if columns(a).shape[1] <= 4096
        }
    known = {f.name for fs in (*inputs.values(), *outputs.values()) for f in fs}
    unknown = [n for n in (*asked, *_names(args.numeric)) if n not in known]
    if unknown:
        raise ConfigError(f"--categorical/--numeric name no feature: {', '.join(unknown)} (features: {_shown(known)})")
    source = {"file": os.path.basename(args.data), "sha256": sha256_of(args.data), "rows": count}
    return build_profile(args.model, inputs, outputs, source).to_json()


def _shown(names: set[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed[:20]) + (f" and {len(listed) - 20} more" if len(listed) > 20 else "")


def main(args: argparse.Namespace) -> int:
    if args.drift_command != "profile":
        from .admin.cli import drift_main

        return drift_main(args)
    try:
        profile = make_profile(args)
    except (ConfigError, OSError, ValueError) as e:
        print(f"batchgate drift profile: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the model or server refused the data (ONNX Runtime, tritonclient)
        print(f"batchgate drift profile: running the model failed: {str(e)[:2000]}", file=sys.stderr)
        return 1
    tmp = args.out + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(profile, f, indent=1)
        os.replace(tmp, args.out)
    except OSError as e:
        print(f"batchgate drift profile: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    feats = sum(len(v) for v in profile["inputs"].values()) + sum(len(v) for v in profile["outputs"].values())
    print(
        f"profile {profile['id']} of '{args.model}': {profile['source']['rows']} rows, {feats} features "
        f"({len(profile['outputs'])} output tensor(s)) -> {args.out}"
    )
    return 0


def _fed(tensor: str, a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A table's text cells as the model takes them: numbers, True / False for a BOOL input (as a
    profile keys them), a null as empty text for a text input."""
    if dtype.kind == "O":
        return np.array(["" if v is None else v for v in a.ravel().tolist()], dtype=object).reshape(a.shape)
    if dtype.kind == "b":
        a = np.vectorize(lambda v: _BOOLS.get(str(v).strip().lower(), v), otypes=[object])(a)
    try:
        return a.astype(np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"input '{tensor}' holds text, but the model takes it as {dtype}") from None


_BOOLS = {"true": 1.0, "false": 0.0}
