"""The population stability index: of a window's counts against reference frequencies (a drift
window's ``psi`` test, ``drift_window.py``), and of two samples over the deciles of one (the output
PSI gate of a rollout, ``rollout.py``, and the columns of an answer a route keeps for it)."""

from __future__ import annotations

import functools
import math

import numpy as np

PSI_FLOOR = 1e-4  # a reference frequency below it counts as this (an empty cell is not an infinite score)


def psi(window: np.ndarray, reference: np.ndarray) -> float:
    """PSI of window counts against reference frequencies (the same cells)."""
    n = window.sum()
    cells = window.shape[0]
    w = (window + 0.5) / (n + 0.5 * cells)
    q = np.maximum(reference, PSI_FLOOR)
    q = q / q.sum()
    return float(np.sum((w - q) * np.log(w / q)))


MAX_PSI_COLUMNS = 256  # columns of a wide answer judged (evenly spaced), so a judgement's work is bounded


@functools.lru_cache(maxsize=16)  # (asked for each answer a route keeps: one width a route, mostly)
def judged_columns(width: int) -> np.ndarray | slice:
    """The columns of an answer ``width`` wide that the output PSI judges: all of them, or
    :data:`MAX_PSI_COLUMNS` evenly spaced (the same ones for the same width, so a sample that
    kept only these is judged as the whole answers would be)."""
    if width <= MAX_PSI_COLUMNS:
        return slice(None)
    return np.unique(np.linspace(0, width - 1, MAX_PSI_COLUMNS).astype(np.int64))


def two_sample_psi(sample: np.ndarray, reference: np.ndarray, bins: int = 10) -> list[tuple[float, int]]:
    """PSI of ``sample`` against ``reference`` (both [rows, columns], or 1-D) on deciles of the
    reference's finite values (ties collapse into one bin), per column: (PSI, its degrees of
    freedom, the cells less one). At most :data:`MAX_PSI_COLUMNS` columns, evenly spaced. An
    infinity falls in the lowest or the highest bin, and NaN, when either side has one, in a bin
    of its own: answers that turned NaN are the most different of all (left out, a canary that
    answered only NaN would have passed with a PSI of 0)."""
    a, b = sample.reshape(sample.shape[0], -1), reference.reshape(reference.shape[0], -1)
    columns = judged_columns(min(a.shape[1], b.shape[1]))
    if isinstance(columns, slice):
        columns = np.arange(min(a.shape[1], b.shape[1]))
    # (only the judged columns in float64: a wide answer's whole sample would be copied otherwise)
    a, b = a[:, columns].astype(np.float64), b[:, columns].astype(np.float64)
    out = []
    for j in range(columns.shape[0]):
        x, y = a[:, j], b[:, j]
        if not x.shape[0] or not y.shape[0]:
            continue
        finite = y[np.isfinite(y)]
        edges = np.unique(np.quantile(finite, np.arange(1, bins) / bins)) if finite.shape[0] else finite
        nan_x, nan_y = np.isnan(x), np.isnan(y)
        nans = bool(nan_x.any() or nan_y.any())
        cells = edges.shape[0] + 1 + nans
        cx = np.bincount(np.searchsorted(edges, x[~nan_x], side="left"), minlength=cells).astype(np.float64)
        cy = np.bincount(np.searchsorted(edges, y[~nan_y], side="left"), minlength=cells).astype(np.float64)
        if nans:
            cx[-1], cy[-1] = nan_x.sum(), nan_y.sum()
        out.append((psi(cx, (cy + 0.5) / (cy.sum() + 0.5 * cells)), cells - 1))
    return out


def psi_by_chance(df: int, rows: int, reference_rows: int, z: float) -> float:
    """How large two samples of ``rows`` and ``reference_rows`` from one distribution make their
    PSI over ``df`` + 1 cells by chance, at the normal quantile ``z``: the PSI is close to the
    chi-square distance, so it is about chi2(df) * (1/rows + 1/reference_rows); the chi-square
    quantile by Wilson and Hilferty's approximation (no scipy in the serving process)."""
    if df <= 0:
        return 0.0
    c = 2.0 / (9.0 * df)
    return df * max(0.0, 1.0 - c + z * math.sqrt(c)) ** 3 * (1.0 / rows + 1.0 / reference_rows)
