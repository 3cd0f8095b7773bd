"""Scoring one window of live rows against a reference profile, and the debounced verdict.

Pure: numpy (and scipy's incomplete gamma for chi-square p-values); no I/O, no clock. The
detector process (``monitoring/drift.py``) gathers sampled rows into windows and hands each
window to :meth:`Scorer.score`; :class:`Debounce` turns per-window verdicts into the state that
is exported and announced.

Per feature and window:

- ``psi``: population stability index over the reference's quantile bins (categories for a
  categorical feature); the window's frequencies are smoothed (+0.5 a cell), so an empty bin is
  not an infinite score. Decided by ``psi_threshold``, outside the p-value family, and only with
  :data:`PSI_MIN_ROWS_PER_CELL` rows a cell (with fewer, chance alone reaches the usual
  thresholds: its mean without drift is about (cells - 1) / rows), and only past what chance
  makes of it at the window's size, at ``alpha`` / features (``psi_by_chance``).
- ``ks``: Kolmogorov-Smirnov distance between the window and the reference CDF, read at the
  profile's CDF grid (distinct values only, so ties are exact rather than broken). Reading the
  distance at fewer points than the full statistic can only make it smaller, so the p-value from
  the Kolmogorov distribution (two-sample effective size, Stephens' correction) is conservative.
- ``chi2``: Pearson's chi-square of a categorical feature's window counts against the reference
  frequencies, cells expected below 5 pooled, divided by 1 + n / m (the reference is a sample
  too). (A monitor listing ``ks`` tests categorical features with chi-square: KS has no meaning
  for categories.)
- ``adwin``: river's ADWIN on the feature standardised with the reference mean and std, fed one
  value per chunk of :data:`ADWIN_CHUNK` rows (the chunk mean, scaled to unit variance; a cut is
  looked for at every value, clock=1, which costs little at one value per chunk); it keeps
  its state across windows and decides on its own ``delta`` (default ``alpha`` / features): a
  window whose mean is beyond the bound sqrt(2 ln(2/delta)) standard errors from the reference
  mean is flagged, with or without a change point seen in the stream (a drift present from the
  start, or after a reset or restart, has none), and so is one in which ADWIN cuts its window
  at a change when the values since the cut are beyond that bound. The score is the window's
  standardised mean shift.

The p-values of all features in a window form one family: Bonferroni (reject at ``alpha / m``)
bounds the chance of any false alarm in the window by ``alpha``; Benjamini-Hochberg bounds the
share of false discoveries instead. NaN and inf values are counted as the missing rate and never
reach a test. Missing, out-of-range and unseen-category rates are alarmed on their own
thresholds, beside drift (a burst of NaN is a data-quality alarm, not drift).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np

from .drift import Feature, Profile, category_key
from .drift_monitors import ADWIN_CHUNK, MonitorSpec
from .psi import PSI_FLOOR, psi, psi_by_chance

Z_LIMIT = 1e9  # a standardised chunk mean's bound (see _standardised)
PSI_MIN_ROWS_PER_CELL = 10  # PSI decides only with this many rows a cell (its null mean is ~(cells - 1) / n)
_MIN_EXPECTED = 5.0
_FLOAT64 = np.dtype(np.float64)


class ChangeDetector(Protocol):
    def update(self, x: float) -> None: ...

    @property
    def drift_detected(self) -> bool: ...


def river_adwin(delta: float) -> ChangeDetector:
    from river.drift import ADWIN  # the [drift] extra; imported where detectors run

    detector: ChangeDetector = ADWIN(delta=delta, clock=1)  # type: ignore[no-untyped-call]
    return detector


_K = np.arange(1, 101, dtype=np.float64)
_SIGNS = np.where(_K % 2 == 1, 1.0, -1.0)


def kolmogorov_sf(lam: Any) -> np.ndarray:
    """P(K > lam) for the Kolmogorov distribution (the limit law of sqrt(n) * D), of each value."""
    lam = np.asarray(lam, dtype=np.float64)
    terms = np.exp(-2.0 * np.square(_K) * np.square(lam)[..., None]) * _SIGNS
    out = np.clip(2.0 * terms.sum(axis=-1), 0.0, 1.0)
    return np.where(lam < 0.2, 1.0, out)


def ks_pvalue(d: Any, n: Any, m: Any) -> np.ndarray:
    """The KS p-value of distances ``d`` between windows of ``n`` rows and references of ``m``
    (two-sample effective size, Stephens' correction), element by element."""
    n, m = np.asarray(n, dtype=np.float64), np.asarray(m, dtype=np.float64)
    en = np.where(m > 0, n * m / np.maximum(n + m, 1.0), n)
    root = np.sqrt(np.maximum(en, 1.0))
    return kolmogorov_sf((root + 0.12 + 0.11 / root) * np.asarray(d, dtype=np.float64))


def chi2_sf(x: float, df: int) -> float:
    from scipy.special import gammaincc

    if df <= 0:
        return 1.0
    return float(gammaincc(df / 2.0, x / 2.0))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells expected below 5 pooled."""
    n = counts.sum()
    expected = probs / probs.sum() * n
    small = expected < _MIN_EXPECTED
    c = counts[~small].astype(np.float64)
    e = expected[~small]
    if small.any():
        pc, pe = float(counts[small].sum()), float(expected[small].sum())
        if pe < _MIN_EXPECTED and e.shape[0]:  # still small: fold it into the smallest kept cell
            i = int(np.argmin(e))
            c[i] += pc
            e[i] += pe
        else:
            c = np.append(c, pc)
            e = np.append(e, pe)
    if e.shape[0] < 2:
        return 0.0, 0
    return float(np.sum((c - e) ** 2 / e)), int(e.shape[0] - 1)


@dataclass
class FeatureScore:
    scores: dict[str, float] = field(default_factory=dict)  # test -> score
    pvalues: dict[str, float] = field(default_factory=dict)  # p-value tests only
    decided: set[str] = field(default_factory=set)  # tests that found drift
    quality: dict[str, float] = field(default_factory=dict)  # missing | out_of_range | unseen -> rate
    alarms: set[str] = field(default_factory=set)  # quality kinds past their threshold


@dataclass
class WindowResult:
    rows: int
    features: dict[str, FeatureScore]
    drifted: list[str]  # features with any test deciding drift
    drifted_window: bool
    tests: int  # p-values in the family
    threshold: float  # the p-value threshold that decided (Bonferroni or BH)

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "drifted": self.drifted,
            "drifted_window": self.drifted_window,
            "p_threshold": self.threshold,
            "features": {
                name: {
                    "scores": fs.scores,
                    "pvalues": fs.pvalues,
                    "decided": sorted(fs.decided),
                    "quality": fs.quality,
                    "alarms": sorted(fs.alarms),
                }
                for name, fs in self.features.items()
            },
        }


@dataclass
class _Numeric:
    feature: Feature
    edges: np.ndarray
    freqs: np.ndarray
    points: np.ndarray
    values: np.ndarray
    low: float
    high: float
    adwin: ChangeDetector | None
    delta: float


@dataclass
class _Categorical:
    feature: Feature
    index: dict[str, int]
    probs: np.ndarray  # categories..., other


def narrow(
    edges: np.ndarray, freqs: np.ndarray, points: np.ndarray, values: np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A profile's bins and CDF grid as a tensor of ``dtype`` (float32, float16) sees them: each
    edge and point rounded to ``dtype``, as the live values were. A reference value at or below
    an edge is, rounded, at or below the rounded edge (rounding never reverses an order), so a
    value equal to an edge in the profile (0.1) falls in the same bin live (0.1f, just above 0.1
    in float64). Edges (points) that round to one value become one: their bins' frequencies are
    added up (the highest point's CDF value is kept)."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = edges.astype(dtype).astype(np.float64)
        p = points.astype(dtype).astype(np.float64)
    ue = np.unique(e)
    if freqs.shape[0] == edges.shape[0] + 1:  # bin j (right edge e_j) lands in the bin of its rounded edge
        cell = np.append(np.searchsorted(ue, e), ue.shape[0])
        freqs = np.bincount(cell, weights=freqs, minlength=ue.shape[0] + 1)
    if values.shape[0] == points.shape[0]:
        up = np.unique(p)
        values = values[np.searchsorted(p, up, side="right") - 1]
        p = up
    return ue, freqs, p, values


def _narrower(dtype: np.dtype) -> bool:
    return dtype.kind == "f" and dtype.itemsize < 8


class _Block:
    """The numeric features of one tensor as padded arrays, so a window is scored with whole-array
    operations: edges and CDF points padded with +inf (after every value), reference
    frequencies with a mask of the real cells. Built per datatype of the live tensor: for a
    float32 (float16) one, the grid is read at that precision (:func:`narrow`)."""

    def __init__(self, parts: list[_Numeric], dtype: np.dtype = _FLOAT64):
        self.parts = parts
        grids = [
            narrow(p.edges, p.freqs, p.points, p.values, dtype)
            if _narrower(dtype)
            else (p.edges, p.freqs, p.points, p.values)
            for p in parts
        ]
        k = len(parts)
        e = max((g[0].shape[0] for g in grids), default=0)
        c = max((g[2].shape[0] for g in grids), default=0)
        self.edges = np.full((k, e), np.inf)
        self.points = np.full((k, c), np.inf)
        self.values = np.ones((k, c))
        self.q = np.ones((k, e + 1))
        self.mask = np.zeros((k, e + 1), dtype=bool)
        self.cells = np.ones(k)
        for j, (edges, freqs, points, values) in enumerate(grids):
            ne, nc = edges.shape[0], points.shape[0]
            self.edges[j, :ne] = edges
            self.points[j, :nc] = points
            self.values[j, :nc] = values
            if freqs.shape[0] == ne + 1:
                q = np.maximum(freqs, PSI_FLOOR)
                self.q[j, : ne + 1] = q / q.sum()
                self.mask[j, : ne + 1] = True
                self.cells[j] = ne + 1
        self.low = np.array([p.low for p in parts])
        self.high = np.array([p.high for p in parts])
        if _narrower(dtype):  # the range as the live values were rounded (a constant 0.1 is 0.1f live)
            with np.errstate(over="ignore"):
                self.low, self.high = (a.astype(dtype).astype(np.float64) for a in (self.low, self.high))
        self.mean = np.array([p.feature.mean for p in parts])
        self.std = np.array([p.feature.scale for p in parts])
        self.reference_n = np.array([int(p.feature.count * (1 - p.feature.missing_rate)) for p in parts])
        self.adwin = any(p.adwin is not None for p in parts)


def _chunk_means(chunks: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # (values near the float64 limit: see below)
        means: np.ndarray = chunks.mean(axis=1)
    return means


def _standardised(means: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """Chunk means in standard errors from the reference mean, held within +-Z_LIMIT: finite
    values near the float64 limit (a sentinel such as DBL_MAX) overflowed a chunk's sum, and an
    infinite score fed ADWIN and made the drift status unreadable as JSON (until 2026-12-06). A
    chunk whose sum was undefined (+inf and -inf) counts as no shift; KS, PSI and the range see it."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = (means - mean) * (math.sqrt(ADWIN_CHUNK) / std)
    held: np.ndarray = np.nan_to_num(np.clip(z, -Z_LIMIT, Z_LIMIT), nan=0.0)
    return held


class Scorer:
    """Scores windows of one monitor against its profile. ``columns`` of :meth:`score` map
    each watched tensor, as ``(side, tensor)``, to its rows ([rows, features])."""

    def __init__(
        self,
        spec: MonitorSpec,
        profile: Profile,
        adwin: Callable[[float], ChangeDetector] = river_adwin,
    ):
        self.spec = spec
        self.profile = profile
        self.layout = profile.features(spec.outputs)
        tests = set(spec.tests)
        self.psi = "psi" in tests
        self.ks = "ks" in tests
        self.chi2 = "chi2" in tests or "ks" in tests
        nf = len(self.layout)
        delta = spec.adwin_delta or spec.alpha / max(1, nf)
        self.adwin_bound = math.sqrt(2.0 * math.log(2.0 / delta))  # (in standard errors; see _adwin)
        self.parts: list[_Numeric | _Categorical] = []
        for _, _, f in self.layout:
            if f.kind == "numeric":
                span = (f.max - f.min) * spec.out_of_range_margin
                self.parts.append(
                    _Numeric(
                        f,
                        np.asarray(f.edges, dtype=np.float64),
                        np.asarray(f.freqs, dtype=np.float64),
                        np.asarray(f.cdf_points, dtype=np.float64),
                        np.asarray(f.cdf_values, dtype=np.float64),
                        f.min - span,
                        f.max + span,
                        adwin(delta) if "adwin" in tests and f.count and f.missing_rate < 1 else None,
                        delta,
                    )
                )
            else:
                cats = list(f.categories)
                self.parts.append(
                    _Categorical(
                        f,
                        {c: i for i, c in enumerate(cats)},
                        np.asarray([*f.categories.values(), f.other], dtype=np.float64),
                    )
                )
        self.needed = self.min_drifted()
        # PSI decides only past what chance makes of it at the window's size (at alpha / features)
        self.psi_z = NormalDist().inv_cdf(1.0 - spec.alpha / max(1, nf))
        self.quality_alpha = spec.alpha / max(1, nf)  # (the same for the quality alarms)
        self._plans: dict[tuple[tuple[int, ...], str], _Block] = {}

    def min_drifted(self) -> int:
        s = self.spec
        if s.min_drifted_share > 0:
            return max(1, math.ceil(s.min_drifted_share * len(self.layout)))
        return s.min_drifted_features

    def feature_columns(self, columns: Mapping[tuple[str, str], np.ndarray]) -> list[np.ndarray | None]:
        """One 1-D column per feature of the layout, from the window's tensors (None: the
        window holds no rows of that tensor, e.g. outputs a request did not ask for)."""
        out: list[np.ndarray | None] = []
        offsets: dict[tuple[str, str], int] = {}
        for side, tensor, _ in self.layout:
            key = (side, tensor)
            i = offsets.get(key, 0)
            offsets[key] = i + 1
            block = columns.get(key)
            out.append(None if block is None else block[:, i])
        return out

    def score(self, columns: Mapping[tuple[str, str], np.ndarray]) -> WindowResult:
        cols = self.feature_columns(columns)
        rows = max((int(c.shape[0]) for c in cols if c is not None), default=0)
        results: dict[str, FeatureScore] = {}
        family: list[tuple[str, str, float]] = []
        numeric: dict[tuple[str, str], list[int]] = {}  # the numeric features of each tensor, scored together
        for i, ((side, tensor, _), part, col) in enumerate(zip(self.layout, self.parts, cols)):
            if col is None:
                continue
            results[part.feature.name] = FeatureScore()
            if isinstance(part, _Numeric):
                numeric.setdefault((side, tensor), []).append(i)
        for idx in numeric.values():
            block = np.stack([cols[i] for i in idx], axis=1)  # type: ignore[misc]
            self._numeric(self._plan(tuple(idx), block.dtype), block, results, family)
        for part, col in zip(self.parts, cols):
            if col is not None and isinstance(part, _Categorical):
                self._categorical(part, col, results[part.feature.name], family)
        threshold = self._threshold([p for _, _, p in family])
        for name, test, p in family:
            if p <= threshold:
                results[name].decided.add(test)
        drifted = [name for name, fs in results.items() if fs.decided]
        return WindowResult(rows, results, drifted, len(drifted) >= self.needed, len(family), threshold)

    def _threshold(self, pvalues: Sequence[float]) -> float:
        m = len(pvalues)
        if not m:
            return 0.0
        alpha = self.spec.alpha
        if self.spec.correction == "bonferroni":
            return alpha / m
        ranked = np.sort(np.asarray(pvalues))
        ok = np.nonzero(ranked <= alpha * np.arange(1, m + 1) / m)[0]
        return float(ranked[ok[-1]]) if ok.shape[0] else 0.0  # p <= 0 never happens: nothing rejected

    def _plan(self, idx: tuple[int, ...], dtype: np.dtype) -> _Block:
        dtype = dtype if _narrower(dtype) else _FLOAT64
        plan = self._plans.get((idx, dtype.str))
        if plan is None:
            parts = [self.parts[i] for i in idx]
            plan = self._plans[(idx, dtype.str)] = _Block(parts, dtype)  # type: ignore[arg-type]
        return plan

    def _numeric(
        self,
        plan: _Block,
        block: np.ndarray,
        results: dict[str, FeatureScore],
        family: list[tuple[str, str, float]],
    ) -> None:
        """The numeric features of one tensor, [rows, features], scored together: one sort of
        the block, two binary searches a feature, the rest in whole-array operations."""
        spec = self.spec
        parts = plan.parts
        x = block.astype(np.float64, copy=False)
        total = x.shape[0]
        finite = np.isfinite(x)
        clean = bool(finite.all())
        if not clean:
            x = np.where(finite, x, np.nan)  # NaN sorts last and compares false
        n = finite.sum(axis=0)
        by_feature = np.ascontiguousarray(np.sort(x, axis=0).T)
        k = len(parts)
        left = np.empty((k, plan.edges.shape[1]), dtype=np.int64)
        right = np.empty((k, plan.points.shape[1]), dtype=np.int64)
        for j in range(k):  # padding: +inf edges and points fall after every value
            xs = by_feature[j, : n[j]]
            left[j] = np.searchsorted(xs, plan.edges[j], side="right")  # bins are (e_i-1, e_i]
            right[j] = np.searchsorted(xs, plan.points[j], side="right")
        nf = np.maximum(n, 1).astype(np.float64)
        counts = np.diff(left, axis=1, prepend=0, append=n[:, None]).astype(np.float64)
        w = (counts + 0.5) / (nf + 0.5 * plan.cells)[:, None]
        psis = np.where(plan.mask, (w - plan.q) * np.log(w / plan.q), 0.0).sum(axis=1)
        ds = np.abs(right / nf[:, None] - plan.values).max(axis=1, initial=0.0)
        pvalues = ks_pvalue(ds, n, plan.reference_n)
        outside = ((x < plan.low) | (x > plan.high)).sum(axis=0)
        missing = (total - n) / max(total, 1)
        chunk_z = None
        if plan.adwin and clean and total >= ADWIN_CHUNK:
            chunks = total // ADWIN_CHUNK
            means = _chunk_means(x[: chunks * ADWIN_CHUNK].reshape(chunks, ADWIN_CHUNK, k))
            chunk_z = _standardised(means, plan.mean, plan.std).T.tolist()
        enough = n >= PSI_MIN_ROWS_PER_CELL * plan.cells
        for j, part in enumerate(parts):
            f = part.feature
            fs = results[f.name]
            nj = int(n[j])
            fs.quality["missing"] = float(missing[j])
            if missing[j] > f.missing_rate + spec.missing_rate_margin and self._past_chance(
                total - nj, total, f.missing_rate
            ):
                fs.alarms.add("missing")
            if not nj or not f.count or f.missing_rate >= 1:
                continue
            oor = float(outside[j]) / nj
            fs.quality["out_of_range"] = oor
            if oor > spec.out_of_range_max and self._past_chance(int(outside[j]), nj, 2.0 / (plan.reference_n[j] + 1)):
                fs.alarms.add("out_of_range")  # (a new value is beyond a sample's min or max at 2 / (n + 1))
            if self.psi:
                v = float(psis[j])
                fs.scores["psi"] = v
                if v >= spec.psi_threshold and enough[j] and self._psi_past_chance(v, int(plan.cells[j]), nj, f.count):
                    fs.decided.add("psi")
            if self.ks and part.points.shape[0]:
                fs.scores["ks"] = float(ds[j])
                fs.pvalues["ks"] = p = float(pvalues[j])
                family.append((f.name, "ks", p))
            if part.adwin is not None:
                if chunk_z is not None:
                    z = chunk_z[j]
                else:  # NaN in the window: this feature's finite values, in order
                    col = block[:, j].astype(np.float64)
                    vals = col[np.isfinite(col)]
                    c = vals.shape[0] // ADWIN_CHUNK
                    m = _chunk_means(vals[: c * ADWIN_CHUNK].reshape(c, ADWIN_CHUNK)) if c else vals[:0]
                    z = _standardised(m, f.mean, f.scale).tolist()
                if z:
                    self._adwin(part, z, fs)

    def _psi_past_chance(self, value: float, cells: int, rows: int, reference_rows: int) -> bool:
        """Whether a PSI is beyond what two samples of one distribution reach by chance (see
        :func:`psi_by_chance`): with few rows a cell, a fixed threshold is reached by chance alone
        (32 binary features in windows of 32 rows raised a false alarm in 8 windows of 10, 32
        normal ones in windows of 200 rows in 1 of 10, until 2026-12-06)."""
        return value >= psi_by_chance(cells - 1, max(1, rows), max(1, reference_rows), self.psi_z)

    def _past_chance(self, count: int, rows: int, rate: float) -> bool:
        """Whether ``count`` of ``rows`` (missing, out-of-range or unseen values) is more than the
        reference's ``rate`` of them makes by chance, at ``alpha`` / features: a quality alarm
        needs it besides its threshold, so that at a few rows one value is not an alarm (windows
        of 10 rows alarmed unseen in 1 in 4, until 2026-12-06); at a window's usual size any rate
        past its threshold is past chance too."""
        if count <= 0 or rate >= 1:
            return False
        if rate <= 0:
            return True
        from scipy.special import bdtrc  # P(X > k), X ~ Binomial(rows, rate)

        return float(bdtrc(count - 1, rows, rate)) <= self.quality_alpha

    @staticmethod
    def _adwin(part: _Numeric, z: list[float], fs: FeatureScore) -> None:
        """Flagged when the window's mean is beyond ADWIN's bound sqrt(2 ln(2/delta)) from the
        reference mean (in standard errors; the reference mean is an estimate too: its variance
        is added), whether or not ADWIN saw the change happen: a stream already away when the
        monitor starts (or after a reset or a restart) has no change point in it. A change ADWIN
        detects inside the window flags it too when the values since ADWIN's cut are beyond the
        bound, though the window's mean, diluted by those before, is not yet."""
        detector = part.adwin
        assert detector is not None
        hit = False
        for v in z:
            detector.update(v)
            hit = hit or detector.drift_detected
        count = max(1, part.feature.count)
        bound = math.sqrt(2.0 * math.log(2.0 / part.delta))

        def shift(mean: float, chunks: int) -> float:
            return abs(mean) * math.sqrt(chunks / (1.0 + chunks * ADWIN_CHUNK / count))

        wz = shift(sum(z) / len(z), len(z))
        flagged = wz > bound
        if hit and not flagged:
            width = int(getattr(detector, "width", 0) or 0)
            if width:
                flagged = shift(float(getattr(detector, "estimation", 0.0)), width) > bound
        if flagged:
            fs.decided.add("adwin")
        fs.scores["adwin"] = wz

    def _categorical(
        self, part: _Categorical, col: np.ndarray, fs: FeatureScore, family: list[tuple[str, str, float]]
    ) -> None:
        f = part.feature
        total = col.shape[0]
        if col.dtype.kind == "f":
            values = col[np.isfinite(col)]
        else:
            values = col if col.dtype.kind in "iub" else col.tolist()
        n = len(values)
        missing = (total - n) / total if total else 0.0
        fs.quality["missing"] = missing
        if missing > f.missing_rate + self.spec.missing_rate_margin and self._past_chance(
            total - n, total, f.missing_rate
        ):
            fs.alarms.add("missing")
        if not n:
            return
        cells = part.probs.shape[0]
        counts = np.zeros(cells, dtype=np.float64)
        other = cells - 1
        index = part.index
        if col.dtype.kind in "iubf":  # each distinct value keyed once (a float at its own precision)
            uniq, cnt = np.unique(values, return_counts=True)
            for u, c in zip(uniq, cnt.tolist()):
                counts[index.get(category_key(u), other)] += c
        else:
            for v in values:
                counts[index.get(category_key(v), other)] += 1
        unseen = float(counts[other]) / n
        fs.quality["unseen"] = unseen
        if unseen > f.other + self.spec.unseen_max and self._past_chance(int(counts[other]), n, f.other):
            fs.alarms.add("unseen")
        # the reference, smoothed so a category it never saw is possible, not impossible
        m = max(1, f.count)
        probs = (part.probs * m + 0.5) / (m + 0.5 * cells)
        if self.psi:
            v = psi(counts, probs)
            fs.scores["psi"] = v
            if (
                v >= self.spec.psi_threshold
                and n >= PSI_MIN_ROWS_PER_CELL * cells
                and self._psi_past_chance(v, cells, n, m)
            ):
                fs.decided.add("psi")
        if self.chi2:
            stat, df = chi_square(counts, probs)
            # The reference frequencies are estimates too: against a sample of m rows, Pearson's
            # statistic of n rows is about (1 + n / m) times a chi-square (the two-sample form; KS
            # takes the two-sample size likewise). Read as exact, a reference of 20,000 rows made
            # windows of 2,000 alarm 2 to 5 times alpha (until 2026-12-06).
            stat /= 1.0 + n / max(1.0, f.count * (1.0 - f.missing_rate))
            p = chi2_sf(stat, df)
            fs.scores["chi2"] = stat
            fs.pvalues["chi2"] = p
            family.append((f.name, "chi2", p))


class Debounce:
    """A flag that turns on after ``windows`` drifted windows in a row and off after as many
    clean ones; :meth:`step` says when it changed."""

    def __init__(self, windows: int):
        self.windows = windows
        self.on = False
        self.run = 0  # consecutive windows disagreeing with the current state

    def step(self, drifted: bool) -> bool:
        if drifted != self.on:
            self.run += 1
            if self.run >= self.windows:
                self.on = drifted
                self.run = 0
                return True
        else:
            self.run = 0
        return False

    def reset(self) -> None:
        self.on = False
        self.run = 0
