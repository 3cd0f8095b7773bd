"""The drift tests' statistics, on fixed seeds (pure code, no server).

False alarms: stationary streams over 32 features (normal, and real-data-like: lognormal,
Poisson with ties, zero-inflated, bimodal, and a mix with categorical columns) scored window by
window against a profile of the same distribution; the share of windows with any alarm must stay
within 2x ``alpha``. ``make drift-sweep`` (BATCHGATE_DRIFT_SWEEP=1) runs 2,500 windows a stream
at alpha 0.01; ``make test`` runs 250 at alpha 0.05 (fixed seeds: the same windows every run).

Power: a 0.5 sigma mean shift in one feature of 32 is flagged within 3 windows of 2,000 rows (with
the debounce of 2), a x1.5 variance change and a categorical frequency shift are flagged, and a
burst of NaN is counted as a missing rate without a drift alarm.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from batchgate.core.drift import build_profile, build_tensor
from batchgate.core.drift_monitors import parse_monitors
from batchgate.core.drift_window import Debounce, Scorer, chi_square, kolmogorov_sf, ks_pvalue
from batchgate.core.psi import psi

LONG = os.environ.get("BATCHGATE_DRIFT_SWEEP", "").strip() not in ("", "0")
WINDOWS = 2500 if LONG else 250
ALPHA = 0.01 if LONG else 0.05
ROWS = 2000
F = 32
REFERENCE_ROWS = 50_000


def stream(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal((n, F))
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, (n, F))
    if kind == "poisson":  # small counts: most values tie
        return rng.poisson(2.0, (n, F)).astype(np.float64)
    if kind == "zero_inflated":
        return np.where(rng.random((n, F)) < 0.6, 0.0, rng.exponential(2.0, (n, F)))
    if kind == "bimodal":
        return np.where(rng.random((n, F)) < 0.3, rng.normal(-2.0, 0.5, (n, F)), rng.normal(2.0, 1.0, (n, F)))
    if kind == "mixed":  # 28 numeric columns and 4 categorical ones (small integers as categories)
        x = rng.standard_normal((n, F))
        x[:, 28:] = rng.choice(6, size=(n, 4), p=[0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
        return x
    raise AssertionError(kind)


def monitor(**over):
    spec = {"model": "m", "inputs": ["x"], "reference": "p.json", "alpha": ALPHA, **over}
    return parse_monitors([spec])[0]


def profile_of(ref: np.ndarray, kind: str):
    categorical = [f"x[{i}]" for i in range(28, F)] if kind == "mixed" else ()
    return build_profile("m", {"x": build_tensor("x", ref, categorical=categorical)})


@pytest.mark.timeout(1800 if LONG else 120)
@pytest.mark.parametrize("correction", ["bonferroni", "bh"])
@pytest.mark.parametrize("kind", ["normal", "lognormal", "poisson", "zero_inflated", "bimodal", "mixed"])
def test_stationary_streams_raise_few_false_alarms(kind, correction):
    rng = np.random.default_rng(sum(map(ord, kind)) + (7 if correction == "bh" else 0))
    scorer = Scorer(monitor(correction=correction), profile_of(stream(kind, rng, REFERENCE_ROWS), kind))
    alarmed = 0
    for _ in range(WINDOWS):
        alarmed += scorer.score({("input", "x"): stream(kind, rng, ROWS)}).drifted_window
    share = alarmed / WINDOWS
    print(f"{kind} {correction}: {alarmed} of {WINDOWS} windows alarmed ({share:.4f}; alpha {ALPHA})")
    assert share <= 2 * ALPHA, f"{kind}: {alarmed} of {WINDOWS} windows raised a false alarm"


def _windows_until_detected(kind: str, shift, tests=None, limit: int = 10) -> int | None:
    """Windows after the change until the debounced flag turns on (None: never within limit)."""
    rng = np.random.default_rng(11)
    over = {"debounce_windows": 2, "alpha": 0.01}
    if tests is not None:
        over["tests"] = tests
    scorer = Scorer(monitor(**over), profile_of(stream(kind, rng, REFERENCE_ROWS), kind))
    flag = Debounce(2)
    for _ in range(3):  # in distribution first: no alarm
        assert not flag.step(scorer.score({("input", "x"): stream(kind, rng, ROWS)}).drifted_window)
    for w in range(1, limit + 1):
        x = shift(stream(kind, rng, ROWS), rng)
        flag.step(scorer.score({("input", "x"): x}).drifted_window)
        if flag.on:
            return w
    return None


def _mean_shift(x, rng):
    x[:, 5] += 0.5
    return x


@pytest.mark.parametrize("tests", [None, ["ks"], ["psi"], ["adwin"]])
def test_a_half_sigma_mean_shift_in_one_feature_is_flagged_within_three_windows(tests):
    found = _windows_until_detected("normal", _mean_shift, tests)
    assert found is not None and found <= 3, found


def test_a_variance_change_is_flagged():
    def wider(x, rng):
        x[:, 9] *= 1.5
        return x

    found = _windows_until_detected("normal", wider)
    assert found is not None and found <= 3, found


def test_a_categorical_frequency_shift_is_flagged():
    def moved(x, rng):
        x[:, 30] = rng.choice(6, size=x.shape[0], p=[0.3, 0.3, 0.15, 0.1, 0.1, 0.05])
        return x

    found = _windows_until_detected("mixed", moved, ["ks"])
    assert found is not None and found <= 3, found


def test_a_burst_of_nan_is_counted_not_alarmed():
    rng = np.random.default_rng(5)
    scorer = Scorer(monitor(alpha=0.01), profile_of(stream("normal", rng, REFERENCE_ROWS), "normal"))
    x = stream("normal", rng, ROWS)
    x[100:180, 3] = np.nan  # 4% of the window
    x[500:520, 4] = np.inf
    r = scorer.score({("input", "x"): x})
    assert not r.drifted_window and not r.drifted
    assert r.features["x[3]"].quality["missing"] == pytest.approx(80 / ROWS)
    assert r.features["x[4]"].quality["missing"] == pytest.approx(20 / ROWS)
    assert not r.features["x[3]"].alarms  # under the margin (0.1 over the reference's 0)
    x[:, 3] = np.nan  # a column gone altogether is a data-quality alarm, still not drift
    r = scorer.score({("input", "x"): x})
    assert r.features["x[3]"].alarms == {"missing"} and "x[3]" not in r.drifted


def test_out_of_range_and_unseen_categories_are_alarmed():
    rng = np.random.default_rng(6)
    scorer = Scorer(monitor(), profile_of(stream("mixed", rng, REFERENCE_ROWS), "mixed"))
    x = stream("mixed", rng, ROWS)
    x[:100, 0] = 50.0  # 5% far beyond the reference's maximum
    x[:200, 29] = 17  # a category the reference never saw
    r = scorer.score({("input", "x"): x})
    assert "out_of_range" in r.features["x[0]"].alarms
    assert "unseen" in r.features["x[29]"].alarms
    assert r.features["x[29]"].quality["unseen"] == pytest.approx(0.1)


def test_the_kolmogorov_tail_and_small_helpers():
    assert kolmogorov_sf(0.1) == 1.0
    assert kolmogorov_sf(1.36) == pytest.approx(0.05, abs=0.002)  # the textbook 5% point
    assert kolmogorov_sf(1.63) == pytest.approx(0.01, abs=0.001)
    assert ks_pvalue(0.0, 2000, 50_000) == 1.0
    assert psi(np.array([50.0, 50.0]), np.array([0.5, 0.5])) == pytest.approx(0.0)
    assert psi(np.array([90.0, 10.0]), np.array([0.5, 0.5])) > 0.5
    stat, df = chi_square(np.array([10.0, 10.0, 0.0]), np.array([0.5, 0.5, 1e-9]))
    assert df == 1 and stat == pytest.approx(0.0)


def test_debounce_needs_runs_both_ways():
    d = Debounce(2)
    assert not d.step(True) and not d.on
    assert not d.step(False)  # a clean window breaks the run
    assert not d.step(True)
    assert d.step(True) and d.on
    assert not d.step(False) and d.on
    assert d.step(False) and not d.on


@pytest.mark.parametrize("categories", [200, 1000])
def test_a_categorical_feature_with_more_categories_than_kept_raises_few_false_alarms(categories):
    """Store or region ids, evenly spread over more values than a profile keeps (50): the kept
    ones were those most frequent in the reference, by chance, so their frequencies were
    overestimated (0.0014 to 0.0018 for 1,000 ids of 0.001 each, from 20,000 rows) and every
    window of the same stream was a drift (chi-square) or an unseen-category alarm."""
    rng = np.random.default_rng(categories)
    ids = rng.permutation(10 * categories)[:categories]  # (ids, not 0..n-1)

    def draw(n):
        return ids[rng.integers(0, categories, (n, 4))]

    profile = build_profile("m", {"x": build_tensor("x", draw(20_000))})
    scorer = Scorer(monitor(alpha=0.01, inputs=["x"]), profile)
    windows = 100
    drifted = quality = 0
    for _ in range(windows):
        r = scorer.score({("input", "x"): draw(ROWS)})
        drifted += r.drifted_window
        quality += any(fs.alarms for fs in r.features.values())
    assert drifted <= 3 and quality <= 3, (drifted, quality)
