"""Drift monitors: what the ``drift`` section asks for, and reference profiles.

Pure: no I/O and no clock. The ``drift`` list (already parsed YAML) is read into checked
:class:`MonitorSpec` objects in ``core/drift_monitors.py``. This module builds a reference
:class:`Profile` from arrays (the
``batchgate drift profile`` command and live rebaselining), and reads one back from its JSON
form, checking every field (a profile is a file an operator hands in; its feature names become
metric labels). Scoring windows against a profile lives in ``core/drift_window.py``.

A profile describes, per feature of each watched tensor, the reference distribution:

- numeric: count, mean, std, min, max, missing rate (NaN/inf), quantile bins (``bins`` interior
  edges from the reference quantiles, with each bin's exact reference frequency; repeated
  quantiles, as ties in counts or a mass at zero make them, collapse into one edge) and a finer
  CDF grid (``cdf_points`` distinct values with the exact share of the reference at or below
  each) for the Kolmogorov-Smirnov test;
- categorical (INT, BOOL or BYTES tensors, or features named so): the frequencies of the most
  common categories and an ``other`` bucket for the rest.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from .drift_monitors import MonitorSpec
from .errors import ConfigError
from .routing import _name, _shown, _unique

PROFILE_FORMAT = "batchgate.drift.profile/1"
DEFAULT_BINS = 20
DEFAULT_CDF_POINTS = 99
DEFAULT_MAX_CATEGORIES = 50
# A feature name is a metric label: a bounded, printable alphabet.
FEATURE_NAME = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,128}")
FEATURE_NAME_RULE = "feature names are 1 to 128 of [A-Za-z0-9_.:[]-]"
MAX_CATEGORY_BYTES = 256


# ---------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # numeric | categorical
    count: int
    missing_rate: float
    # numeric
    mean: float = 0.0
    std: float = 0.0
    min: float = 0.0
    max: float = 0.0
    edges: tuple[float, ...] = ()  # interior bin edges, rising; bins are (-inf, e0], (e0, e1], ..., (e_last, inf)
    freqs: tuple[float, ...] = ()  # len(edges) + 1 reference frequencies
    cdf_points: tuple[float, ...] = ()
    cdf_values: tuple[float, ...] = ()  # share of the reference <= each point
    # categorical
    categories: Mapping[str, float] = field(default_factory=dict)
    other: float = 0.0

    @property
    def scale(self) -> float:
        """What the numeric feature is standardised by: its std, or 1 for a constant (a profile
        made before 2026-12-06 may hold a float64 sum's rounding residue for its std, 1e-17 for
        a constant 0.1: dividing by it made every window of the same constant a drift)."""
        return self.std if self.std > 0 and self.max > self.min else 1.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "missing_rate": self.missing_rate,
        }
        if self.kind == "numeric":
            out.update(
                mean=self.mean,
                std=self.std,
                min=self.min,
                max=self.max,
                bins={"edges": list(self.edges), "freqs": list(self.freqs)},
                cdf={"points": list(self.cdf_points), "values": list(self.cdf_values)},
            )
        else:
            out.update(categories=dict(self.categories), other=self.other)
        return out


@dataclass(frozen=True)
class Profile:
    model: str
    inputs: Mapping[str, tuple[Feature, ...]]
    outputs: Mapping[str, tuple[Feature, ...]]
    source: Mapping[str, Any]

    @cached_property
    def id(self) -> str:
        """A digest of the distributions (not of when or from where they were taken); computed
        once (a profile is never changed)."""
        body = repr(
            [
                (side, name, [sorted(f.to_json().items()) for f in feats])
                for side, tensors in (("in", self.inputs), ("out", self.outputs))
                for name, feats in sorted(tensors.items())
            ]
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def features(self, outputs: bool) -> list[tuple[str, str, Feature]]:
        """(side, tensor, feature) in a fixed order: the inputs', then (with ``outputs``) the outputs'."""
        out = [("input", t, f) for t, fs in self.inputs.items() for f in fs]
        if outputs:
            out += [("output", t, f) for t, fs in self.outputs.items() for f in fs]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "id": self.id,
            "model": self.model,
            "source": dict(self.source),
            "inputs": {t: [f.to_json() for f in fs] for t, fs in self.inputs.items()},
            "outputs": {t: [f.to_json() for f in fs] for t, fs in self.outputs.items()},
        }


def categorical_dtype(dtype: np.dtype) -> bool:
    """INT, UINT, BOOL and BYTES tensors hold categories; floating point ones, measurements."""
    return dtype.kind in "iubOSU"


def cut_utf8(data: bytes) -> bytes:
    """At most :data:`MAX_CATEGORY_BYTES` bytes of ``data``, never ending in part of a UTF-8
    character (a character the cut would split is left out whole)."""
    if len(data) < MAX_CATEGORY_BYTES:
        return data
    data = data[:MAX_CATEGORY_BYTES]
    i = len(data) - 1
    while i > len(data) - 4 and i > 0 and data[i] & 0xC0 == 0x80:  # continuation bytes at the end
        i -= 1
    lead = data[i]
    need = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
    return data[:i] if i + need > len(data) else data


_BOOL_TEXT = {"true": "1", "false": "0"}  # (matched in any case: True, true, TRUE)


def category_key(value: Any) -> str:
    """The text a category is kept under, the same in a profile and live, whatever carried it:

    - text (str, or bytes decoded as UTF-8, invalid bytes as ``\\xNN``) as it is, cut to
      :data:`MAX_CATEGORY_BYTES` bytes of UTF-8 (never inside a character): ``"01"`` and
      ``b"01"`` are one category, ``"1"`` another;
    - the texts ``True`` and ``False``, in any case (``true``, ``FALSE``: other tools' CSV), as
      ``1`` and ``0``, like BOOL values (so a text column of booleans matches a BOOL tensor, and
      a BYTES one holding them matches its profile, one of an older release too: its
      categories are keyed again as it is read);
    - a bool or integer as its decimal digits, a float equal to an integer too (``1.0`` is ``1``),
      another float in the shortest form of its own precision (float32 0.1 is ``0.1``)."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        text = bytes(cut_utf8(bytes(value))).decode("utf-8", "backslashreplace")
    elif isinstance(value, (str, np.str_)):
        text = str(value)
        if len(text) * 4 > MAX_CATEGORY_BYTES:  # (shorter text is under the bound in any case)
            text = cut_utf8(text.encode("utf-8", "surrogatepass")).decode("utf-8", "backslashreplace")
    elif isinstance(value, (bool, np.bool_, int, np.integer)):
        return str(int(value))  # True and 1 are one category, whatever the tensor's type
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))  # 1.0 and 1 too
    else:
        text = str(value)
        if len(text) * 4 > MAX_CATEGORY_BYTES:
            text = cut_utf8(text.encode("utf-8", "surrogatepass")).decode("utf-8", "backslashreplace")
    return _BOOL_TEXT.get(text.lower(), text) if len(text) <= 5 else text


def _tally(values: np.ndarray) -> tuple[dict[str, int], int]:
    """A categorical column's count of each category key, and its missing values."""
    missing = 0
    if values.dtype.kind in "OSU":  # (a null of a table's text column is missing, not "None")
        present = [v for v in values.tolist() if v is not None]
        missing = values.shape[0] - len(present)
        keys = [category_key(v) for v in present]
        weights = [1] * len(keys)
    else:
        if values.dtype.kind == "f":
            finite = values[np.isfinite(values)]
            missing = values.shape[0] - int(finite.shape[0])
            values = finite
        uniq, counts = np.unique(values, return_counts=True)
        keys = [category_key(u) for u in uniq]  # numpy scalars: a float32 keyed at its own precision
        weights = counts.tolist()
    tally: dict[str, int] = {}
    for k, c in zip(keys, weights):
        tally[k] = tally.get(k, 0) + c  # (values that key alike, e.g. True and 1, are one category)
    return tally, missing


def build_feature(
    name: str,
    values: np.ndarray,
    kind: str,
    bins: int = DEFAULT_BINS,
    cdf_points: int = DEFAULT_CDF_POINTS,
    max_categories: int = DEFAULT_MAX_CATEGORIES,
) -> Feature:
    """The reference description of one feature's values (1-D)."""
    check_feature_name(name)
    n = int(values.shape[0])
    if kind == "categorical":
        tally, missing = _tally(values)
        seen = n - missing
        pairs = sorted(tally.items(), key=lambda kc: (-kc[1], kc[0]))
        if len(pairs) > max_categories and seen >= 4:
            # More categories than are kept: those kept are chosen on a quarter of the rows and
            # their frequencies measured on the other three. Chosen and measured on the same
            # rows, the kept ones were those that came up most often by chance, their
            # frequencies overestimated (1,000 ids of 0.001 each, 20,000 rows: 0.0014 to
            # 0.0018), and every window of the same stream alarmed (chi-square, unseen) until
            # 2026-12-06. The feature's count is then the rows measured: the tests weigh the
            # reference's own sampling error by it.
            rest = np.arange(values.shape[0]) % 4 != 0
            count = int(rest.sum())
            chosen, _ = _tally(values[0::4])
            measured, gone = _tally(values[rest])
            keys = sorted(chosen, key=lambda k: (-chosen[k], k))[:max_categories]
            seen_b = count - gone
            kept = [(k, measured.get(k, 0)) for k in keys]
            cats = {k: c / seen_b for k, c in kept} if seen_b else {}
            other = (seen_b - sum(c for _, c in kept)) / seen_b if seen_b else 0.0
        else:
            count = n
            kept = pairs[:max_categories]
            cats = {k: c / seen for k, c in kept} if seen else {}
            other = (seen - sum(c for _, c in kept)) / seen if seen else 0.0
        return Feature(name, "categorical", count, missing / n if n else 0.0, categories=cats, other=other)
    served = values.dtype if values.dtype.kind == "f" and values.dtype.itemsize < 8 else None
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    m = int(finite.shape[0])
    if m == 0:
        return Feature(name, "numeric", n, 1.0 if n else 0.0)
    qs = np.quantile(finite, np.arange(1, bins) / bins)
    grid = np.quantile(finite, np.linspace(0, 1, cdf_points + 2)[1:-1])
    if served is not None:  # float32 (float16) values: edges and points at that precision, as served
        qs, grid = qs.astype(served).astype(np.float64), grid.astype(served).astype(np.float64)
    edges = np.unique(qs)
    counts = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=edges.shape[0] + 1)
    points = np.unique(grid)
    srt = np.sort(finite)
    cdf = np.searchsorted(srt, points, side="right") / m
    constant = srt[0] == srt[-1]  # (summing a constant leaves rounding residue: 0.1 has a std of 1e-17)
    # values near the float64 limit: moments taken scaled down (their sums overflowed to a profile
    # of inf, which a server refuses)
    big = max(abs(float(srt[0])), abs(float(srt[-1])))
    by = big if big > 1e300 else 1.0
    return Feature(
        name,
        "numeric",
        n,
        (n - m) / n,
        mean=float(srt[0]) if constant else float((finite / by).mean() * by),
        std=0.0 if constant else float((finite / by).std() * by),
        min=float(srt[0]),
        max=float(srt[-1]),
        edges=tuple(float(e) for e in edges),
        freqs=tuple(float(c) / m for c in counts),
        cdf_points=tuple(float(p) for p in points),
        cdf_values=tuple(float(v) for v in cdf),
    )


def check_feature_name(name: str) -> None:
    if not isinstance(name, str) or FEATURE_NAME.fullmatch(name) is None:
        raise ConfigError(f"feature name {_shown(name)} is not allowed ({FEATURE_NAME_RULE})")


def feature_widths(spec: MonitorSpec, profile: Profile) -> dict[tuple[str, str], int]:
    """How many features each monitored tensor has in the profile: (side, tensor) -> columns."""
    widths: dict[tuple[str, str], int] = {}
    for side, tensor, _ in profile.features(spec.outputs):
        widths[(side, tensor)] = widths.get((side, tensor), 0) + 1
    return widths


def columns(array: np.ndarray) -> np.ndarray:
    """A tensor's rows as a 2-D [rows, features] array (a 1-D tensor is one feature)."""
    if array.ndim == 1:
        return array.reshape(-1, 1)
    if array.ndim == 2:
        return array
    return array.reshape(array.shape[0], -1)


def build_tensor(
    tensor: str,
    array: np.ndarray,
    names: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    numeric: Sequence[str] = (),
    bins: int = DEFAULT_BINS,
    max_categories: int = DEFAULT_MAX_CATEGORIES,
    served: np.dtype | None = None,
) -> tuple[Feature, ...]:
    """The features of one 2-D tensor. Names default to ``tensor[i]`` (a 1-D tensor's to
    ``tensor``); a feature is categorical when the tensor's datatype holds categories or its
    name is in ``categorical``, unless it is in ``numeric``. ``served``: the datatype the model
    takes the tensor in, when known (the data may have been read as float64 or text): it decides
    the kind in place of the data's, and numeric features are taken at its precision (float32
    values, as they will be served)."""
    array = np.asarray(array)
    cols = columns(array)
    count = cols.shape[1]
    if not names:  # a 1-D tensor (a label per row) is one feature named like it
        names = [tensor] if array.ndim == 1 else [f"{tensor}[{i}]" for i in range(count)]
    names = list(names)
    if len(names) != count:
        raise ConfigError(f"tensor '{tensor}' has {count} columns but {len(names)} feature names were given")
    _unique(names, f"tensor '{tensor}': feature")
    default = "categorical" if categorical_dtype(cols.dtype if served is None else served) else "numeric"
    out = []
    for i, name in enumerate(names):
        kind = "categorical" if name in categorical else "numeric" if name in numeric else default
        col = cols[:, i]
        if kind == "numeric" and cols.dtype.kind in "OSU":
            try:
                col = col.astype(np.float64)
            except (TypeError, ValueError):
                raise ConfigError(f"feature '{name}' of '{tensor}' holds text; it can only be categorical") from None
        if kind == "numeric" and served is not None and served.kind == "f" and col.dtype.kind in "fiu":
            col = col.astype(served)
        out.append(build_feature(name, col, kind, bins=bins, max_categories=max_categories))
    return tuple(out)


def build_profile(
    model: str,
    inputs: Mapping[str, tuple[Feature, ...]],
    outputs: Mapping[str, tuple[Feature, ...]] | None = None,
    source: Mapping[str, Any] | None = None,
) -> Profile:
    all_names = [f.name for fs in (*inputs.values(), *(outputs or {}).values()) for f in fs]
    _unique(all_names, "profile feature")
    return Profile(model, dict(inputs), dict(outputs or {}), dict(source or {}))


def profile_from_json(data: Any, where: str = "profile") -> Profile:
    """A profile read back from its JSON form, every field checked."""
    if not isinstance(data, Mapping) or data.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"{where}: not a batchgate drift profile (format {PROFILE_FORMAT!r} expected)")
    model = data.get("model")
    if not isinstance(model, str) or len(model) > 128:
        raise ConfigError(f"{where}: 'model' must be a model name")
    source = data.get("source") or {}
    if not isinstance(source, Mapping):
        raise ConfigError(f"{where}: 'source' must be a mapping")
    sides: dict[str, dict[str, tuple[Feature, ...]]] = {}
    for side in ("inputs", "outputs"):
        tensors = data.get(side) or {}
        if not isinstance(tensors, Mapping):
            raise ConfigError(f"{where}: '{side}' must map tensor names to feature lists")
        sides[side] = {
            _name(t, f"{where}.{side}"): tuple(_feature(f, f"{where}.{side}.{t}[{i}]") for i, f in enumerate(fs))
            if isinstance(fs, list) and fs
            else _bad(f"{where}.{side}.{t}: must be a non-empty list of features")
            for t, fs in tensors.items()
        }
    if not sides["inputs"]:
        raise ConfigError(f"{where}: the profile describes no input tensor")
    return build_profile(model, sides["inputs"], sides["outputs"], source)


def _bad(message: str) -> Any:
    raise ConfigError(message)


def _float(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ConfigError(f"{where}: must be a finite number, not {_shown(raw)}")
    return float(raw)


def _share(raw: Any, where: str) -> float:
    v = _float(raw, where)
    if not 0 <= v <= 1:
        raise ConfigError(f"{where}: must be a share from 0 to 1, not {_shown(raw)}")
    return v


def _floats(raw: Any, where: str, limit: int = 10_000) -> tuple[float, ...]:
    if not isinstance(raw, list) or len(raw) > limit:
        raise ConfigError(f"{where}: must be a list of at most {limit} numbers")
    return tuple(_float(v, where) for v in raw)


def _feature(raw: Any, where: str) -> Feature:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or FEATURE_NAME.fullmatch(name) is None:
        raise ConfigError(f"{where}: feature name {_shown(name)} is not allowed ({FEATURE_NAME_RULE})")
    kind = raw.get("kind")
    count = raw.get("count", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"{where}: 'count' must be a whole number")
    missing = _share(raw.get("missing_rate", 0.0), f"{where}.missing_rate")
    if kind == "categorical":
        cats = raw.get("categories") or {}
        if not isinstance(cats, Mapping) or len(cats) > 100_000:
            raise ConfigError(f"{where}: 'categories' must map categories to frequencies")
        table: dict[str, float] = {}
        for k, v in cats.items():  # keyed as live values are (a profile of an older release too)
            key = category_key(str(k))
            table[key] = min(1.0, table.get(key, 0.0) + _share(v, f"{where}.categories"))
        return Feature(
            name, "categorical", count, missing, categories=table, other=_share(raw.get("other", 0), f"{where}.other")
        )
    if kind != "numeric":
        raise ConfigError(f"{where}: 'kind' must be numeric or categorical, not {_shown(kind)}")
    bins = raw.get("bins") or {}
    cdf = raw.get("cdf") or {}
    if not isinstance(bins, Mapping) or not isinstance(cdf, Mapping):
        raise ConfigError(f"{where}: 'bins' and 'cdf' must be mappings")
    edges = _floats(bins.get("edges", []), f"{where}.bins.edges")
    freqs = _floats(bins.get("freqs", []), f"{where}.bins.freqs")
    points = _floats(cdf.get("points", []), f"{where}.cdf.points")
    values = _floats(cdf.get("values", []), f"{where}.cdf.values")
    if count and missing < 1 and (len(freqs) != len(edges) + 1 or len(points) != len(values)):
        raise ConfigError(f"{where}: bins need one frequency more than edges, and cdf one value per point")
    if any(a >= b for a, b in zip(edges, edges[1:])) or any(a >= b for a, b in zip(points, points[1:])):
        raise ConfigError(f"{where}: bin edges and cdf points must rise")
    if any(not 0 <= v <= 1 for v in (*values, *freqs)) or any(a > b for a, b in zip(values, values[1:])):
        raise ConfigError(f"{where}: bin frequencies and cdf values must be shares, the cdf's never falling")
    lo, hi, std = raw.get("min", 0.0), raw.get("max", 0.0), raw.get("std", 0.0)
    if (
        isinstance(std, (int, float))
        and std < 0
        or (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi)
    ):
        raise ConfigError(f"{where}: 'std' must not be negative, nor 'min' above 'max'")
    return Feature(
        name,
        "numeric",
        count,
        missing,
        mean=_float(raw.get("mean", 0.0), f"{where}.mean"),
        std=_float(raw.get("std", 0.0), f"{where}.std"),
        min=_float(raw.get("min", 0.0), f"{where}.min"),
        max=_float(raw.get("max", 0.0), f"{where}.max"),
        edges=edges,
        freqs=freqs,
        cdf_points=points,
        cdf_values=values,
    )
