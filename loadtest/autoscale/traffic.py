"""The pod, as the load test measured it (:class:`QueueCurve`, :func:`pick_target`), and the traffic
ramp driven through it (:func:`parse_ramp`, :func:`rate_at`)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, TypeGuard

EPS = 1e-9


# ============================================================================================
# the pod, as the load test measured it


@dataclass(frozen=True)
class CurvePoint:
    """One measured load level of one pod."""

    rate: float  # req/s offered to the pod
    queue: float  # mean batchgate_queue_depth over the step's measurement windows
    p99_ms: float | None = None  # corrected p99 (from the intended send time)
    label: str = ""
    slo_met: bool | None = None


class QueueCurve:
    """Queue depth and p99 of one pod as functions of the request rate it receives.

    Built from the valid steps of a load test run against a single server (one server = one pod),
    or directly from points. Between measured rates both are interpolated linearly; below the lowest
    one the queue falls linearly to 0 at rate 0 and the p99 is the lowest step's.

    ``capacity`` is the highest rate measured (or the one given): the estimate of what a pod
    sustains. The curve answers only up to it; the simulation treats arrivals beyond it as a
    growing backlog (see :func:`simulate`). The curve is a steady-state description: it says what
    queue a pod settles at for a rate held long enough, not how fast it gets there.
    """

    def __init__(
        self,
        points: Iterable[CurvePoint | Sequence],
        capacity: float | None = None,
        source: str = "points",
        dropped: Sequence[tuple[str, str]] = (),
    ):
        pts = [p if isinstance(p, CurvePoint) else CurvePoint(*p) for p in points]
        pts = [p for p in pts if _finite(p.rate) and p.rate > 0 and _finite(p.queue)]
        if not pts:
            raise ValueError("a queue curve needs at least one point with a positive rate and a queue depth")
        pts.sort(key=lambda p: p.rate)
        self.points: list[CurvePoint] = pts
        self.capacity = float(capacity) if capacity is not None else pts[-1].rate
        if not self.capacity > 0:
            raise ValueError("the capacity must be positive")
        self.source = source
        self.dropped = list(dropped)  # (step label, why it is not on the curve)
        rates: list[float] = []
        queues: list[float] = []
        for p in pts:  # a rate measured more than once: the mean of its queues
            if rates and abs(rates[-1] - p.rate) < EPS:
                continue
            same = [max(0.0, q.queue) for q in pts if abs(q.rate - p.rate) < EPS]
            rates.append(p.rate)
            queues.append(sum(same) / len(same))
        self._q_rates = [0.0] + rates
        self._q_vals = [0.0] + queues
        lat = [(p.rate, p.p99_ms) for p in pts if _finite(p.p99_ms)]
        self._p_rates = [r for r, _ in lat]
        self._p_vals = [v for _, v in lat]

    # ------------------------------------------------------------------ building
    @classmethod
    def from_points(cls, points: Iterable[Sequence], capacity: float | None = None) -> QueueCurve:
        """From ``(rate, queue[, p99_ms[, label[, slo_met]]])`` tuples."""
        return cls(points, capacity=capacity, source="points")

    @classmethod
    def from_run(cls, run, keep_up: float = 0.95, capacity: float | None = None) -> QueueCurve:
        """From a load-test ``Run`` against one pod. A step is on the curve when it is valid (the
        generator kept up), has ``queue_depth`` scraped in its measurement windows (the test ran
        with ``--metrics-url``), and the server kept up with it (open loop: at least ``keep_up`` of
        the offered rate came back as successes; a step past the knee holds a queue that grows
        with time, not a steady one). Closed-loop steps use their throughput as the rate.
        ``capacity`` replaces the estimate (the highest rate on the curve), e.g. when the top step
        was already past the knee although the server answered everything in it."""
        from ..results import percentiles_ms

        points, dropped = [], []
        for s in run.steps:
            if not s.valid:
                why = "; ".join(s.problems) or "the generator fell behind"
                dropped.append((s.label, f"invalid measurement: {why}"))
                continue
            qs = [w.server.get("queue_depth") for w in s.measured()]
            qs = [float(q) for q in qs if _finite(q)]
            if not qs:
                dropped.append((s.label, "no queue_depth scraped (run the load test with --metrics-url)"))
                continue
            t = s.totals()
            if s.mode == "open" and s.target_rate:
                rate = float(s.target_rate)
                if t["throughput"] < keep_up * rate:
                    why = f"the server fell behind: {t['throughput']:.1f} ok/s of {rate:g} offered (< {keep_up:.0%})"
                    dropped.append((s.label, why))
                    continue
            else:
                rate = float(t["throughput"])
            p99 = percentiles_ms(s.hist("corrected"), (99.0,))["p99"]
            points.append(CurvePoint(rate, sum(qs) / len(qs), p99, s.label, s.slo_met))
        if not points:
            why = "; ".join(f"{label}: {reason}" for label, reason in dropped) or "the run has no steps"
            raise ValueError(f"no step of the run can describe a pod's queue ({why})")
        name = (run.scenario or {}).get("name") or (run.scenario or {}).get("model") or "load test"
        return cls(points, capacity=capacity, source=str(name), dropped=dropped)

    @classmethod
    def from_results(cls, path, keep_up: float = 0.95, capacity: float | None = None) -> QueueCurve:
        """From a ``results.json`` written by ``batchgate loadtest``."""
        from .. import report

        curve = cls.from_run(report.read_json(path), keep_up=keep_up, capacity=capacity)
        curve.source = str(path)
        return curve

    # ------------------------------------------------------------------ reading
    def queue(self, rate_per_pod: float) -> float:
        """Steady queue depth of a pod receiving ``rate_per_pod`` req/s, for rates up to the capacity
        (higher rates read the capacity's value: the backlog beyond it is the simulation's part)."""
        r = min(max(0.0, rate_per_pod), self.capacity)
        return _interp(self._q_rates, self._q_vals, r)

    def p99_ms(self, rate_per_pod: float) -> float | None:
        """Corrected p99 at ``rate_per_pod`` (interpolated), or None above capacity or unmeasured."""
        if rate_per_pod > self.capacity + EPS or not self._p_rates:
            return None
        return _interp(self._p_rates, self._p_vals, max(0.0, rate_per_pod))

    @property
    def queue_at_capacity(self) -> float:
        return self.queue(self.capacity)

    def knee_warning(self) -> str | None:
        """A note when the top step looks past the knee (its queue far above the step below it
        while that one was nearly empty): its rate then overstates what a pod sustains."""
        if len(self.points) < 2 or self.capacity < self.points[-1].rate - EPS:
            return None
        top, below = self.points[-1], self.points[-2]
        if top.queue > 10 * max(below.queue, 1.0):
            return (
                f"the top step ({top.label or _fmt_rate(top.rate)}) may be past the knee: queue {top.queue:.3g} "
                f"against {below.queue:.3g} at {_fmt_rate(below.rate)}; its rate is taken as the pod's capacity "
                f"(--capacity sets another)"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "capacity_per_pod": self.capacity,
            "queue_at_capacity": self.queue_at_capacity,
            "points": [
                {"label": p.label, "rate_per_pod": p.rate, "queue": p.queue, "p99_ms": p.p99_ms, "slo_met": p.slo_met}
                for p in self.points
            ],
            "dropped": [{"label": label, "why": why} for label, why in self.dropped],
        }


def _fmt_rate(r: float) -> str:
    return f"{r:g} req/s"


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 if x1 <= x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _finite(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TargetPick:
    queue_depth: float  # the largest per-pod queue measured within the SLO
    point: CurvePoint  # the step it comes from
    slo_p99_ms: float | None


def pick_target(curve: QueueCurve, slo_p99_ms: float | None = None) -> TargetPick | None:
    """The largest per-pod queue depth whose measured step met the latency SLO.

    With ``slo_p99_ms`` a step meets it when its corrected p99 is at or below it; without, the
    run's own SLO verdicts (``slo_met``) decide. Steps are read in rate order and the reading stops
    at the first one that misses: a lucky step beyond the knee does not count. None when even the
    lowest rate misses. Take a margin below the value before using it as ``targetQueueDepth``: the
    HPA only acts once the average is 10% past the target, and reacts after a sync period and a cold
    start."""
    best: CurvePoint | None = None
    for p in curve.points:
        ok = (p.p99_ms is not None and p.p99_ms <= slo_p99_ms) if slo_p99_ms is not None else p.slo_met is True
        if not ok:
            break
        if best is None or p.queue >= best.queue:
            best = p
    return None if best is None else TargetPick(best.queue, best, slo_p99_ms)


# ============================================================================================
# traffic


def parse_ramp(text: str) -> list[tuple[float, float]]:
    """``"0:100,300:2000,600:2000,900:200"`` -> [(0, 100), (300, 2000), ...]: (seconds, total req/s)
    points, linearly interpolated; two points at the same time make a step."""
    points = []
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        try:
            t, r = part.split(":")
            points.append((float(t), float(r)))
        except ValueError:
            raise ValueError(
                f"a ramp is T:RATE points separated by commas, e.g. 0:100,300:2000 (got {part!r})"
            ) from None
    return _check_ramp(points)


def _check_ramp(points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    pts = [(float(t), float(r)) for t, r in points]
    if not pts:
        raise ValueError("the ramp has no points")
    if any(not (math.isfinite(t) and math.isfinite(r)) or r < 0 or t < 0 for t, r in pts):
        raise ValueError("ramp times and rates must be finite and not negative")
    if any(b[0] < a[0] for a, b in pairwise(pts)):
        raise ValueError("ramp times must not decrease")
    return pts


def rate_at(ramp: Sequence[tuple[float, float]], t: float) -> float:
    """The total offered rate at time ``t``: held flat before the first and after the last point."""
    times = [p[0] for p in ramp]
    if t <= times[0]:
        return ramp[0][1] if t < times[0] else ramp[bisect.bisect_right(times, t) - 1][1]
    if t >= times[-1]:
        return ramp[-1][1]
    i = bisect.bisect_right(times, t)
    (t0, r0), (t1, r1) = ramp[i - 1], ramp[i]
    return r0 if t1 <= t0 else r0 + (r1 - r0) * (t - t0) / (t1 - t0)
