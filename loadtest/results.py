"""What a load test measures, as data: windows, steps and runs, with HdrHistograms.

Latencies are integer microseconds in HdrHistograms (1 µs to 10 min, 3 significant digits).
Histograms from worker processes and from windows are merged, never their percentiles
averaged. Three histograms per window:

- ``corrected``: answer time minus the *intended* send time (the schedule's): what a user
  arriving on schedule waits, coordinated omission included;
- ``uncorrected``: answer time minus the actual send time (what most tools report);
- ``lag``: dispatch time minus intended send time: the generator's own lateness (its health).
  Waiting for a free connection or stream slot is not lag: that wait is the server's
  back-pressure and shows in ``corrected`` only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 600_000_000  # 10 minutes
SIGNIFICANT = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class Histogram(HdrHistogram):
    """hdrh's histogram with its mean and standard deviation computed over the counts array at
    once. hdrh walks its ~21,500 buckets in Python for each (and each percentile distribution
    file computes both): writing a six-step sweep's reports took 20 s, most of it there. The
    figures are hdrh's own definitions, bucket for bucket (``_tables``)."""

    def get_mean_value(self) -> float:
        if not self.total_count:
            return 0.0
        return float(int(np.dot(_counts(self), _tables(self)[1]))) / self.total_count

    def get_stddev(self) -> float:
        if not self.total_count:
            return 0.0
        counts, mid = _counts(self), _tables(self)[1]
        dev = mid - float(int(np.dot(counts, mid))) / self.total_count
        return math.sqrt(float(np.dot(dev * dev, counts)) / self.total_count)


def _counts(h: HdrHistogram) -> np.ndarray:
    return np.ctypeslib.as_array(h.counts)[: h.counts_len].astype(np.int64)


@functools.cache
def _bucket_tables(lowest: int, highest: int, digits: int) -> tuple[np.ndarray, np.ndarray]:
    h = HdrHistogram(lowest, highest, digits)
    top = [h.get_highest_equivalent_value(h.get_value_from_index(i)) for i in range(h.counts_len)]
    mid = [h._hdr_median_equiv_value(v) for v in top]
    return np.array(top, np.int64), np.array(mid, np.int64)


def _tables(h: HdrHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Per bucket: the value hdrh reports it at (its top) and the value it averages it as (its
    middle)."""
    return _bucket_tables(h.lowest_trackable_value, h.highest_trackable_value, h.significant_figures)


def histogram() -> Histogram:
    return Histogram(LOWEST_US, HIGHEST_US, SIGNIFICANT)


def decode(blob: bytes | str) -> HdrHistogram:
    h = histogram()
    if blob:
        h.decode_and_add(blob)
    return h


def merge(hists) -> HdrHistogram:
    out = histogram()
    for h in hists:
        if h.get_total_count():
            out.add(h)
    return out


def percentiles_ms(h: HdrHistogram, ps=PERCENTILES) -> dict[str, float | None]:
    """p50, p90, ... and max in milliseconds (None when the histogram is empty)."""
    if not h.get_total_count():
        return {**{_key(p): None for p in ps}, "max": None, "mean": None}
    vals = values_at(h, ps)
    out: dict[str, float | None] = {_key(p): vals[p] / 1000 for p in ps}
    out["max"] = h.get_max_value() / 1000
    out["mean"] = h.get_mean_value() / 1000
    return out


def values_at(h: HdrHistogram, ps) -> dict[float, int]:
    """The value at each percentile ``p`` by nearest rank: the smallest recorded value with at
    least p% of the samples at or below it (Java HdrHistogram's rule). hdrh rounds the rank to the
    nearest instead: of 195 samples its p99 was the 193rd, with 2 samples above it (98.97% at or
    below) where the report said 1, a tail reported lower than it was. The rank is counted in
    exact fractions: 99.9% of 1,000 is the 999th, not the 1,000th that 99.9 / 100 * 1000 rounds to."""
    total = h.get_total_count()
    if not total:
        return {}
    want = sorted((max(1, math.ceil(Fraction(repr(float(p))) * total / 100)), p) for p in set(ps))
    # the first bucket whose running count reaches each rank, reported at its top (as hdrh's
    # recorded-values iterator reports it)
    at = np.searchsorted(np.cumsum(_counts(h)), [r for r, _ in want], side="left")
    return {p: int(_tables(h)[0][i]) for (_, p), i in zip(want, at, strict=True)}


def _key(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", ""))  # 99.9 -> p999


def above(count: int, p: float) -> int:
    """How many samples lie above percentile ``p``: what a percentile rests on."""
    return math.floor(count * (100.0 - p) / 100.0 + 1e-9)  # 100 - 99.9 is not exact in binary


@dataclass
class Window:
    """One measurement interval, all worker processes merged."""

    index: int
    start_s: float  # from the start of the measurement (warm-up windows are negative)
    end_s: float
    phase: str  # warmup | measure
    target_rate: float | None  # requests/s the schedule asked for (open loop); None when closed
    sent: int = 0  # requests dispatched
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by gRPC code name or HTTP status
    late: int = 0  # dispatched later than the lag threshold
    corrected: HdrHistogram = field(default_factory=histogram)
    uncorrected: HdrHistogram = field(default_factory=histogram)
    lag: HdrHistogram = field(default_factory=histogram)
    cpu_s: float = 0.0  # generator CPU seconds spent in the window (all workers)
    overflow: int = 0  # latencies beyond the histogram's range (recorded at its maximum)
    server: dict[str, float] = field(default_factory=dict)  # Prometheus gauges at the window's end

    @property
    def seconds(self) -> float:
        return max(1e-9, self.end_s - self.start_s)

    @property
    def completed(self) -> int:
        return self.ok + sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "phase": self.phase,
            "target_rate": self.target_rate,
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(self.errors),
            "late": self.late,
            "sent_rate": self.sent / self.seconds,
            "throughput": self.ok / self.seconds,
            "corrected_ms": percentiles_ms(self.corrected),
            "uncorrected_ms": percentiles_ms(self.uncorrected),
            "lag_ms": percentiles_ms(self.lag),
            "generator_cores": self.cpu_s / self.seconds,
            "overflow": self.overflow,
            "server": dict(self.server),
        }


@dataclass
class Step:
    """One load level: an open-loop rate or a closed-loop concurrency, held for a while."""

    label: str
    mode: str  # open | closed
    target_rate: float | None = None
    concurrency: int | None = None
    windows: list[Window] = field(default_factory=list)
    valid: bool = True  # the generator kept up (see ``problems``)
    problems: list[str] = field(default_factory=list)
    stable: bool | None = None  # the last 3 windows agree (None: too few windows)
    stability: dict[str, Any] = field(default_factory=dict)
    slo_met: bool | None = None
    slo_problems: list[str] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)  # server-side view over the measurement

    def measured(self) -> list[Window]:
        return [w for w in self.windows if w.phase == "measure"]

    def hist(self, which: str) -> HdrHistogram:
        return merge(getattr(w, which) for w in self.measured())

    @property
    def seconds(self) -> float:
        ws = self.measured()
        return sum(w.seconds for w in ws) if ws else 0.0

    def totals(self) -> dict[str, Any]:
        ws = self.measured()
        errors: dict[str, int] = {}
        for w in ws:
            for k, v in w.errors.items():
                errors[k] = errors.get(k, 0) + v
        sent, ok = sum(w.sent for w in ws), sum(w.ok for w in ws)
        secs = self.seconds or 1e-9
        done = ok + sum(errors.values())
        return {
            "seconds": self.seconds,
            "sent": sent,
            "ok": ok,
            "errors": errors,
            "completed": done,
            "error_rate": (done - ok) / done if done else 0.0,
            "sent_rate": sent / secs,
            "throughput": ok / secs,
            "late": sum(w.late for w in ws),
            "overflow": sum(w.overflow for w in ws),
            "generator_cores": sum(w.cpu_s for w in ws) / secs,
        }

    def summary(self) -> dict[str, Any]:
        corrected, uncorrected, lag = self.hist("corrected"), self.hist("uncorrected"), self.hist("lag")
        return {
            "label": self.label,
            "mode": self.mode,
            "target_rate": self.target_rate,
            "concurrency": self.concurrency,
            **self.totals(),
            "samples": corrected.get_total_count(),
            "corrected_ms": percentiles_ms(corrected),
            "uncorrected_ms": percentiles_ms(uncorrected),
            "lag_ms": percentiles_ms(lag),
            "valid": self.valid,
            "problems": list(self.problems),
            "stable": self.stable,
            "stability": dict(self.stability),
            "slo_met": self.slo_met,
            "slo_problems": list(self.slo_problems),
            "server": dict(self.server),
        }


@dataclass
class Run:
    """A whole invocation: one step, or the steps of a sweep."""

    scenario: dict[str, Any]
    environment: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    sweep: dict[str, Any] = field(default_factory=dict)  # kind, the best step's label, how it was found
    interrupted: str | None = None  # why the run ended early (a Ctrl-C), None when it ran to its end
    terminated: bool = False  # ended by SIGTERM rather than Ctrl-C (the exit status tells them apart)

    @property
    def valid(self) -> bool:
        """Whether the result stands. A sweep stands on the steps that decide it: its best step
        and the nearest step above that missed (an invalid step further up, where the generator
        could not keep up, does not change the answer)."""
        if self.interrupted is not None:
            return False
        if not self.sweep or self.sweep.get("kind") != "rate":
            return all(s.valid for s in self.steps)
        best = next((s for s in self.steps if s.label == self.sweep.get("best")), None)
        floor = best.target_rate or 0.0 if best is not None else float("-inf")
        above = [s for s in self.steps if (s.target_rate or 0.0) > floor]
        deciding = ([best] if best is not None else []) + (
            [min(above, key=lambda s: s.target_rate or 0.0)] if above else []
        )
        return all(s.valid for s in deciding)

    @property
    def slo_met(self) -> bool | None:
        verdicts = [s.slo_met for s in self.steps if s.slo_met is not None]
        if self.sweep:
            return self.sweep.get("best") is not None
        return all(verdicts) if verdicts else None
