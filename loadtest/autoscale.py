"""Queue-depth autoscaling, simulated: what the chart's HPA would do with the queue a load test measured.

The chart scales Pods on the average ``batchgate_queue_depth`` per pod. A load test against *one*
pod (``batchgate loadtest --sweep-rate ... --metrics-url ...``) measures, for each offered rate, the
queue that pod holds and the latency its callers see. This module joins the two:

- :class:`QueueCurve` turns the load test into a per-pod model: queue depth and p99 as functions of
  the request rate one pod receives, up to the pod's capacity (the highest rate it sustained);
- :class:`HPA` is the ``autoscaling/v2`` controller's arithmetic for one metric with an
  ``AverageValue`` target (proportional rule, tolerance, stabilization windows, rate policies), as
  the Kubernetes controller computes it;
- :func:`simulate` drives a traffic ramp through both, one tick at a time, and reports how many
  replicas run, what queue each holds, and when a pod is past its capacity;
- :func:`pick_target` reads the target queue depth off the load test: the largest per-pod queue
  whose step still met the latency SLO.

Run it as ``python -m batchgate.loadtest.autoscale --results results.json --ramp 0:100,300:2000``.

The modelling assumptions (each one is repeated where it is used):

1. *Steady state per rate.* A pod that receives r req/s (r at or below its capacity) holds the queue
   the load test measured at r, straight away; the queue's own transients (seconds) are ignored
   next to the autoscaler's (tens of seconds and more).
2. *Even spread.* Traffic is divided evenly over the *ready* pods at every instant. That is what
   per-request balancing gives (an L7 proxy or mesh, or clients doing round robin over the headless
   Service). With a plain ClusterIP Service, long-lived gRPC channels stay where they are until the
   gateway's maximum connection age closes them: ``rebalance_s`` (``--rebalance``) models that
   connection churn, and a new pod's share then grows over about that long.
3. *Fluid overload.* Above capacity the excess arrivals pile up: a pod's extra backlog grows at
   (rate - capacity) req/s and drains at (capacity - rate) once the rate falls below capacity.
   Its queue is the curve's value at capacity plus that backlog, never below the curve.
4. *Cold starts.* A pod created by a scale-up takes no traffic and reports no metric until
   ``ready_delay_s`` later (image pull, model load, readiness probe).
5. *Scale-down.* Removed pods stop taking traffic at once; what they held is assumed to drain
   during their termination grace period and leaves the model.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

FORMAT = "batchgate-autoscale"
FORMAT_VERSION = 1
EPS = 1e-9

# The chart's ``autoscaling`` block; a key missing from a values file takes its value from here.
DEFAULT_VALUES: dict[str, Any] = {
    "enabled": True,
    "mode": "hpa",
    "minReplicas": 1,
    "maxReplicas": 10,
    "targetQueueDepth": 8,
    "behavior": {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15},
                         {"type": "Pods", "value": 4, "periodSeconds": 15}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "selectPolicy": "Min",
            "policies": [{"type": "Percent", "value": 10, "periodSeconds": 60}],
        },
    },
}
CHART_VALUES = "helm/batchgate/values.yaml"


# ============================================================================================
# the chart's values


@dataclass(frozen=True)
class Policy:
    """One rate policy: at most ``value`` pods (``Pods``) or ``value`` percent (``Percent``) of the
    replicas at the start of the last ``period_s`` seconds."""

    kind: str  # Pods | Percent
    value: int
    period_s: int


@dataclass(frozen=True)
class Rules:
    """``behavior.scaleUp`` or ``behavior.scaleDown``."""

    stabilization_s: int
    select: str = "Max"  # Max | Min | Disabled
    policies: tuple[Policy, ...] = ()
    tolerance: float | None = None  # per-direction tolerance (HPAConfigurableTolerance); None: the global one


@dataclass(frozen=True)
class Autoscaling:
    """The chart's ``autoscaling`` values, checked."""

    enabled: bool
    mode: str  # hpa | keda
    min_replicas: int
    max_replicas: int
    target: float  # targetQueueDepth: the average queue per pod aimed for
    scale_up: Rules
    scale_down: Rules
    source: str = "built-in defaults"


def _rules(d: dict[str, Any], default: dict[str, Any], where: str) -> Rules:
    d = {**default, **(d or {})}
    select = str(d.get("selectPolicy") or "Max")
    if select not in ("Max", "Min", "Disabled"):
        raise ValueError(f"{where}.selectPolicy must be Max, Min or Disabled, not {select!r}")
    window = int(d.get("stabilizationWindowSeconds") or 0)
    if not 0 <= window <= 3600:
        raise ValueError(f"{where}.stabilizationWindowSeconds must be within 0..3600, not {window}")
    policies = []
    for i, p in enumerate(d.get("policies") or default["policies"]):
        kind, value, period = p.get("type"), p.get("value"), p.get("periodSeconds")
        if kind not in ("Pods", "Percent"):
            raise ValueError(f"{where}.policies[{i}].type must be Pods or Percent, not {kind!r}")
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}.policies[{i}].value must be a positive integer, not {value!r}")
        if not isinstance(period, int) or not 0 < period <= 1800:
            raise ValueError(f"{where}.policies[{i}].periodSeconds must be within 1..1800, not {period!r}")
        policies.append(Policy(kind, value, period))
    tol = d.get("tolerance")
    return Rules(window, select, tuple(policies), None if tol is None else _quantity(tol, f"{where}.tolerance"))


def _quantity(v: Any, where: str) -> float:
    """A number, or a Kubernetes quantity string such as "8" or "7500m"."""
    try:
        if isinstance(v, str) and v.strip().endswith("m"):
            return float(v.strip()[:-1]) / 1000
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, not {v!r}") from None


def queue_limit_from_values(path: str | Path) -> int | None:
    """The gateway's per-model queue limit (``config.max_queue_size``) in a values file, if set."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    v = (doc.get("config") or {}).get("max_queue_size") if isinstance(doc, dict) else None
    return int(v) if isinstance(v, int) and v > 0 else None


def load_values(source: str | Path | dict | None = None) -> Autoscaling:
    """The ``autoscaling`` block of a Helm values file (a path), of a values document (a dict with an
    ``autoscaling`` key) or the block itself (a dict without one). Missing keys take the chart's
    defaults (:data:`DEFAULT_VALUES`); ``None`` gives the defaults."""
    label = "built-in defaults"
    doc: dict[str, Any] = {}
    if isinstance(source, (str, Path)):
        import yaml

        label = str(source)
        try:
            doc = yaml.safe_load(Path(source).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read values {source}: {e}") from None
        doc = doc.get("autoscaling") or {}
    elif isinstance(source, dict):
        label = "values given"
        doc = source["autoscaling"] if isinstance(source.get("autoscaling"), dict) else source
    if not isinstance(doc, dict):
        raise TypeError(f"{label}: autoscaling must be a mapping")
    d = {**DEFAULT_VALUES, **doc}
    behavior = {**DEFAULT_VALUES["behavior"], **(d.get("behavior") or {})}
    mode = str(d.get("mode") or "hpa")
    if mode not in ("hpa", "keda"):
        raise ValueError(f"autoscaling.mode must be hpa or keda, not {mode!r}")
    lo, hi = int(d["minReplicas"]), int(d["maxReplicas"])
    target = _quantity(d["targetQueueDepth"], "autoscaling.targetQueueDepth")
    if lo < 1:
        raise ValueError(f"autoscaling.minReplicas must be at least 1 (scale to zero is not modelled), not {lo}")
    if hi < lo:
        raise ValueError(f"autoscaling.maxReplicas ({hi}) is below minReplicas ({lo})")
    if not target > 0:
        raise ValueError(f"autoscaling.targetQueueDepth must be positive, not {target}")
    return Autoscaling(
        enabled=bool(d.get("enabled", True)), mode=mode, min_replicas=lo, max_replicas=hi, target=target,
        scale_up=_rules(behavior.get("scaleUp"), DEFAULT_VALUES["behavior"]["scaleUp"], "behavior.scaleUp"),
        scale_down=_rules(behavior.get("scaleDown"), DEFAULT_VALUES["behavior"]["scaleDown"],
                          "behavior.scaleDown"),
        source=label)


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

    def __init__(self, points: Iterable[CurvePoint | Sequence], capacity: float | None = None,
                 source: str = "points", dropped: Sequence[tuple[str, str]] = ()):
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
        rates, queues = [], []
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
        from .results import percentiles_ms

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
        from . import report

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
            return (f"the top step ({top.label or _fmt_rate(top.rate)}) may be past the knee: queue {top.queue:.3g} "
                    f"against {below.queue:.3g} at {_fmt_rate(below.rate)}; its rate is taken as the pod's capacity "
                    f"(--capacity sets another)")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "capacity_per_pod": self.capacity, "queue_at_capacity": self.queue_at_capacity,
                "points": [{"label": p.label, "rate_per_pod": p.rate, "queue": p.queue, "p99_ms": p.p99_ms,
                            "slo_met": p.slo_met} for p in self.points],
                "dropped": [{"label": label, "why": why} for label, why in self.dropped]}


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


def _finite(v: Any) -> bool:
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
# the controller


@dataclass(frozen=True)
class Decision:
    """One sync of the controller."""

    t: float
    current: int  # the Deployment's replicas (spec) before the sync
    metric: float | None  # the average per pod the controller saw
    ratio: float | None  # metric / target (with not-ready pods counted as the rules below say)
    proposal: int  # the replica calculator's answer, before stabilization and policies
    stabilized: int  # after the stabilization windows
    desired: int  # after the rate policies and min/max: what the Deployment is set to
    reason: str


class HPA:
    """The ``autoscaling/v2`` controller for one metric with an ``AverageValue`` target, following
    the arithmetic of the Kubernetes controller (``pkg/controller/podautoscaler``):

    1. *Replica calculator.* ``metric="pods"`` (a Pods metric through prometheus-adapter, the chart's
       ``mode: hpa``): the average of the pods that report a value, ratio = average / target; within
       the tolerance (|ratio - 1| <= 0.1) the replica count stays; otherwise ``ceil(ratio x
       reporting pods)``. Pods that report nothing (not ready yet) are handled conservatively, as
       the controller handles pods without metrics: on a scale-up they count as a queue of 0, on a
       scale-down as exactly the target; the ratio is recomputed over all pods and the count stays
       when that moves it into the tolerance or across 1. ``unready="ignored"`` leaves them out
       instead (what the controller does with Pending pods).
       ``metric="external"`` (KEDA's prometheus trigger with ``metricType: AverageValue``, the
       chart's ``mode: keda``, on a ``sum(batchgate_queue_depth)`` query): ratio = total /
       (target x current pods), and ``ceil(total / target)`` outside the tolerance; not-ready pods
       simply add nothing to the total.
    2. *Stabilization.* Every unstabilized proposal is kept with its time. The result is the current
       count raised to the lowest proposal of the scale-up window and lowered to the highest of the
       scale-down window (proposals strictly newer than ``now - window``, the current one included).
    3. *Rate policies*, per direction. Each policy limits the change against the replica count at the
       start of its period, reconstructed as current minus the pods added plus the pods removed by
       scale events strictly newer than ``now - periodSeconds``: ``Pods`` allows start +/- value,
       ``Percent`` allows ``ceil(start x (1 + value/100))`` up and ``int(start x (1 - value/100))``
       down. ``selectPolicy: Max`` takes the policy allowing the biggest change, ``Min`` the smallest,
       ``Disabled`` forbids that direction. Then min/maxReplicas apply.

    Beforehand, a count outside [min, max] is brought inside without consulting the metric. When
    no pod reports a value the sync does nothing (the controller reports an error and skips).
    """

    def __init__(self, settings: Autoscaling | None = None, *, tolerance: float = 0.1, sync_period_s: float = 15.0,
                 metric: str | None = None, unready: str = "missing"):
        self.settings = settings or load_values(None)
        self.tolerance = float(tolerance)
        self.sync_period_s = float(sync_period_s)
        self.metric = metric or ("external" if self.settings.mode == "keda" else "pods")
        if self.metric not in ("pods", "external"):
            raise ValueError(f"metric must be pods or external, not {self.metric!r}")
        if unready not in ("missing", "ignored"):
            raise ValueError(f"unready must be missing or ignored, not {unready!r}")
        self.unready = unready
        self._recommendations: list[tuple[float, int]] = []
        self._up_events: list[tuple[float, int]] = []
        self._down_events: list[tuple[float, int]] = []
        self.decisions: list[Decision] = []

    # ------------------------------------------------------------------ 1. the replica calculator
    def _within(self, ratio: float) -> bool:
        s = self.settings
        if ratio < 1.0:
            tol = s.scale_down.tolerance if s.scale_down.tolerance is not None else self.tolerance
            return 1.0 - ratio <= tol
        tol = s.scale_up.tolerance if s.scale_up.tolerance is not None else self.tolerance
        return ratio - 1.0 <= tol

    def calculate(self, current: int, values: Sequence[float], missing: int = 0) -> tuple[int, float, float] | None:
        """(proposal, average metric, ratio) from the pods' values; None when nobody reports.
        ``current``: the Deployment's replica count; ``values``: one per reporting pod;
        ``missing``: pods counted in ``current`` that report nothing (not ready)."""
        target = self.settings.target
        if self.metric == "external":
            total = float(sum(values))
            ratio = total / (target * current)
            if self._within(ratio):
                return current, total / current, ratio
            return math.ceil(total / target), total / current, ratio
        if not values:
            return None
        avg = float(sum(values)) / len(values)
        ratio = avg / target
        if missing <= 0 or self.unready == "ignored":
            if self._within(ratio):
                return current, avg, ratio
            return math.ceil(ratio * len(values)), avg, ratio
        # pods without a value: 0 on a scale-up, the target on a scale-down; then re-check
        filler = target if ratio < 1.0 else 0.0
        n = len(values) + missing
        new_ratio = (float(sum(values)) + filler * missing) / n / target
        if self._within(new_ratio) or (ratio < 1.0 < new_ratio) or (new_ratio < 1.0 < ratio):
            return current, avg, new_ratio
        proposal = math.ceil(new_ratio * n)
        if (new_ratio < 1.0 and proposal > current) or (new_ratio > 1.0 and proposal < current):
            return current, avg, new_ratio
        return proposal, avg, new_ratio

    def replicas_for(self, current: int, values: Sequence[float], missing: int = 0) -> int:
        """The replica calculator's proposal alone (no stabilization, no policies, no min/max)."""
        got = self.calculate(current, values, missing)
        return current if got is None else got[0]

    # ------------------------------------------------------------------ 2. stabilization
    def _stabilize(self, now: float, current: int, proposal: int) -> int:
        up_cut = now - self.settings.scale_up.stabilization_s
        down_cut = now - self.settings.scale_down.stabilization_s
        up = down = proposal
        for t, rec in self._recommendations:
            if t > up_cut + EPS:
                up = min(up, rec)
            if t > down_cut + EPS:
                down = max(down, rec)
        keep = min(up_cut, down_cut)
        self._recommendations = [(t, r) for t, r in self._recommendations if t > keep + EPS]
        self._recommendations.append((now, proposal))
        return min(max(current, up), down)

    # ------------------------------------------------------------------ 3. rate policies
    @staticmethod
    def _changed(events: list[tuple[float, int]], now: float, period_s: float) -> int:
        return sum(n for t, n in events if t > now - period_s + EPS)

    def _period_start(self, now: float, current: int, period_s: float) -> int:
        return current - self._changed(self._up_events, now, period_s) + self._changed(self._down_events, now, period_s)

    def up_limit(self, now: float, current: int) -> int:
        """The most replicas the scale-up policies allow now."""
        rules = self.settings.scale_up
        if rules.select == "Disabled":
            return current
        picks = []
        for p in rules.policies:
            start = self._period_start(now, current, p.period_s)
            picks.append(start + p.value if p.kind == "Pods" else math.ceil(start * (1 + p.value / 100)))
        return (min(picks) if rules.select == "Min" else max(picks)) if picks else current

    def down_limit(self, now: float, current: int) -> int:
        """The fewest replicas the scale-down policies allow now."""
        rules = self.settings.scale_down
        if rules.select == "Disabled":
            return current
        picks = []
        for p in rules.policies:
            start = self._period_start(now, current, p.period_s)
            picks.append(start - p.value if p.kind == "Pods" else int(start * (1 - p.value / 100)))
        return (max(picks) if rules.select == "Min" else min(picks)) if picks else current

    # ------------------------------------------------------------------ one sync
    def sync(self, now: float, current: int, values: Sequence[float], missing: int = 0) -> Decision:
        """One pass of the control loop at time ``now`` (seconds): returns the decision and
        remembers it (the stabilization windows and rate policies need the history)."""
        s = self.settings
        metric = ratio = None
        if current > s.max_replicas:
            proposal = stabilized = desired = s.max_replicas
            reason = "above maxReplicas"
        elif current < s.min_replicas:
            proposal = stabilized = desired = s.min_replicas
            reason = "below minReplicas"
        else:
            got = self.calculate(current, values, missing)
            if got is None:
                d = Decision(now, current, None, None, current, current, current, "no metrics")
                self.decisions.append(d)
                return d
            proposal, metric, ratio = got
            stabilized = self._stabilize(now, current, proposal)
            desired, reason = stabilized, "within tolerance" if proposal == current else "desired"
            if stabilized != proposal:
                reason = "scale-down stabilized" if proposal < current else "scale-up stabilized"
            if stabilized > current:
                limit = max(self.up_limit(now, current), current)
                cap = min(s.max_replicas, limit)
                if stabilized > cap:
                    desired = cap
                    reason = "scale-up limited by policy" if limit < s.max_replicas else "at maxReplicas"
            elif stabilized < current:
                limit = min(self.down_limit(now, current), current)
                floor = max(s.min_replicas, limit)
                if stabilized < floor:
                    desired = floor
                    reason = "scale-down limited by policy" if limit > s.min_replicas else "at minReplicas"
        if desired > current:
            self._up_events = [(t, n) for t, n in self._up_events if t > now - _longest(s.scale_up) + EPS]
            self._up_events.append((now, desired - current))
        elif desired < current:
            self._down_events = [(t, n) for t, n in self._down_events if t > now - _longest(s.scale_down) + EPS]
            self._down_events.append((now, current - desired))
        d = Decision(now, current, metric, ratio, proposal, stabilized, desired, reason)
        self.decisions.append(d)
        return d


def _longest(rules: Rules) -> float:
    return max((p.period_s for p in rules.policies), default=0)


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
            raise ValueError(f"a ramp is T:RATE points separated by commas, e.g. 0:100,300:2000 "
                             f"(got {part!r})") from None
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


# ============================================================================================
# the simulation


@dataclass
class _Pod:
    id: int
    created_s: float
    ready_s: float
    backlog: float = 0.0  # requests queued beyond the curve's steady value (overload leftovers)
    share: float = 0.0  # the part of the total traffic it receives (connections it holds)


@dataclass
class Simulation:
    """What :func:`simulate` returns: a row per tick, the controller's decisions and a summary."""

    rows: list[dict[str, Any]]
    decisions: list[Decision]
    settings: Autoscaling
    curve: QueueCurve
    ramp: list[tuple[float, float]]
    params: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)

    def sync_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["sync"]]

    def table(self) -> str:
        """A compact table, one line per sync period, and the summary line."""
        return _table(self)

    def summary_line(self) -> str:
        return _summary_line(self.summary)

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return _clean({
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "assumptions": ASSUMPTIONS,
            "autoscaling": {"source": s.source, "enabled": s.enabled, "mode": s.mode, "minReplicas": s.min_replicas,
                            "maxReplicas": s.max_replicas, "targetQueueDepth": s.target,
                            "behavior": {"scaleUp": _rules_dict(s.scale_up), "scaleDown": _rules_dict(s.scale_down)}},
            "params": self.params, "ramp": [list(p) for p in self.ramp], "curve": self.curve.to_dict(),
            "summary": self.summary,
            "decisions": [_asdict(d) for d in self.decisions],
            "timeline": self.rows,
        })

    def write_json(self, path) -> str:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        return str(path)

    def plot(self, path) -> str:
        return _plot(self, path)


ASSUMPTIONS = [
    "steady state per rate: a pod holds the queue the load test measured at the rate it receives",
    ("traffic spreads evenly over ready pods (per-request balancing); with rebalance_s > 0 it follows long-lived "
     "connections closed at that age, so a new pod's share grows as they reconnect"),
    "above capacity the excess piles up as backlog at (rate - capacity) req/s and drains at (capacity - rate)",
    "a new pod takes no traffic and reports no metric until ready_delay_s after its creation",
    "a removed pod stops taking traffic at once; its queue drains during termination and leaves the model",
]


def _rules_dict(r: Rules) -> dict[str, Any]:
    return {"stabilizationWindowSeconds": r.stabilization_s, "selectPolicy": r.select, "tolerance": r.tolerance,
            "policies": [{"type": p.kind, "value": p.value, "periodSeconds": p.period_s} for p in r.policies]}


def _asdict(d: Decision) -> dict[str, Any]:
    return {k: getattr(d, k) for k in d.__dataclass_fields__}


def _clean(obj: Any) -> Any:
    from .report import json_safe

    return json_safe(obj)


def simulate(curve: QueueCurve, values: Autoscaling | str | Path | dict | None = None,
             ramp: str | Sequence[tuple[float, float]] = "0:100", step_s: float = 1.0, *,
             ready_delay_s: float = 30.0, target: float | None = None, tolerance: float = 0.1,
             sync_period_s: float = 15.0, metric_lag_s: float = 0.0, duration_s: float | None = None,
             initial_replicas: int | None = None, queue_limit: float | None = None, rebalance_s: float = 0.0,
             slo_p99_ms: float | None = None, metric: str | None = None, unready: str = "missing") -> Simulation:
    """Drive the traffic ``ramp`` (total req/s over time) through pods shaped like ``curve`` and the
    chart's autoscaler (``values``: an :class:`Autoscaling`, a values file or dict; ``target``
    overrides ``targetQueueDepth``).

    Time advances in ``step_s`` ticks from 0 to ``duration_s`` (default: the ramp's last time). At
    each tick the offered rate is divided over the ready pods; each ready pod's queue is the curve's
    steady value at its rate plus its backlog, which grows while its rate is above the capacity and
    drains below it (``queue_limit``, e.g. the gateway's ``max_queue_size``, caps a pod's queue: the
    rest is refused). Every ``sync_period_s`` (from t = 0) the controller reads the queues the pods
    reported ``metric_lag_s`` earlier (the scrape and adapter delay; pods ready since then have no
    value) and sets the replica count; new pods become ready ``ready_delay_s`` after they are
    created. A scale-down removes pods that are not ready first, then those ready most recently
    (as a ReplicaSet does).

    Division of the traffic: with ``rebalance_s = 0`` (the default) it is even over the ready pods
    at every instant: per-request balancing. A positive ``rebalance_s`` models per-connection
    balancing of long-lived connections that the server closes at that age (the gateway's
    ``grpc_max_connection_age_secs``), with ages spread evenly: each tick the connections opened
    ``rebalance_s`` earlier reconnect and land evenly on the pods ready then, so a new pod's share
    grows linearly and is even ``rebalance_s`` after it became ready (if nothing else changed);
    the connections of a removed pod reconnect at once, evenly. Traffic follows connections.

    It starts with ``initial_replicas`` (default minReplicas) ready pods, even shares, nothing queued.
    """
    settings = values if isinstance(values, Autoscaling) else load_values(values)
    if target is not None:
        if not target > 0:
            raise ValueError("the target queue depth must be positive")
        settings = replace(settings, target=float(target))
    ramp_pts = parse_ramp(ramp) if isinstance(ramp, str) else _check_ramp(ramp)
    if not step_s > 0:
        raise ValueError("step_s must be positive")
    if rebalance_s < 0 or ready_delay_s < 0 or metric_lag_s < 0:
        raise ValueError("rebalance_s, ready_delay_s and metric_lag_s must not be negative")
    end = float(duration_s) if duration_s is not None else ramp_pts[-1][0]
    hpa = HPA(settings, tolerance=tolerance, sync_period_s=sync_period_s, metric=metric, unready=unready)
    cap = curve.capacity
    n0 = initial_replicas if initial_replicas is not None else settings.min_replicas
    if n0 < 1:
        raise ValueError("initial_replicas must be at least 1")
    pods = [_Pod(i, -math.inf, -math.inf, share=1.0 / n0) for i in range(n0)]
    next_id = n0
    # per-connection balancing: cohorts of connections (the tick they close at, {pod id: traffic share})
    life = max(1, round(rebalance_s / step_s)) if rebalance_s > 0 else 0
    cohorts: deque[tuple[int, dict[int, float]]] = deque(
        (k, {p.id: 1.0 / (life * n0) for p in pods}) for k in range(life))

    def reconnect(mass: float, tick: int, ready: list[_Pod]) -> None:
        """``mass`` of the traffic's connections opens anew, evenly over the ready pods."""
        if mass > 0 and ready:
            part = mass / len(ready)
            cohorts.append((tick + life, {p.id: part for p in ready}))
            for p in ready:
                p.share += part
    samples: deque[tuple[float, dict[int, float]]] = deque()  # (t, {pod id: queue}) for the metric lag
    rows: list[dict[str, Any]] = []
    ticks = max(0, math.floor(end / step_s + EPS))
    next_sync = 0.0

    def view(t: float):
        """The ready pods, the total rate, and each ready pod's rate and queue at ``t``."""
        ready = [p for p in pods if p.ready_s <= t + EPS]
        total = sum(p.share for p in ready)
        if ready and (rebalance_s <= 0 or total <= EPS):
            for p in ready:
                p.share = 1.0 / len(ready)
        elif ready and abs(total - 1.0) > 1e-9:
            for p in ready:
                p.share /= total
        rate = rate_at(ramp_pts, t)
        rates = {p.id: rate * p.share for p in ready}
        return ready, rate, rates, {p.id: curve.queue(rates[p.id]) + p.backlog for p in ready}

    for i in range(ticks + 1):
        t = i * step_s
        if life:  # connections at their maximum age close and reconnect
            by_id = {p.id: p for p in pods}
            mass = 0.0
            while cohorts and cohorts[0][0] <= i:
                for pid, m in cohorts.popleft()[1].items():
                    by_id[pid].share -= m
                    mass += m
            reconnect(mass, i, [p for p in pods if p.ready_s <= t + EPS])
        ready, rate, rates, queues = view(t)
        samples.append((t, queues))
        while len(samples) > 1 and samples[1][0] <= t - metric_lag_s + EPS:
            samples.popleft()
        decision = None
        if t + EPS >= next_sync:
            next_sync += sync_period_s
            alive = {p.id for p in pods}
            vals = [q for pid, q in samples[0][1].items() if pid in alive]
            decision = hpa.sync(t, len(pods), vals, missing=len(pods) - len(vals))
            if decision.desired > len(pods):
                for _ in range(decision.desired - len(pods)):
                    pods.append(_Pod(next_id, t, t + ready_delay_s))
                    next_id += 1
            elif decision.desired < len(pods):
                order = sorted(pods, key=lambda p: (p.ready_s <= t + EPS, -p.ready_s, -p.id))
                gone = {p.id for p in order[:len(pods) - decision.desired]}
                pods = [p for p in pods if p.id not in gone]
                moved = sum(parts.pop(pid, 0.0) for _, parts in cohorts for pid in gone)
                reconnect(moved, i, [p for p in pods if p.ready_s <= t + EPS])  # a removed pod's clients
            ready, rate, rates, queues = view(t)
        n = len(ready)
        busiest = max(rates.values(), default=0.0)
        backlog = max((p.backlog for p in ready), default=0.0)
        over = busiest > cap + EPS or backlog > EPS
        q_mean = sum(queues.values()) / n if n else None
        p99 = None if over or not n else curve.p99_ms(busiest)
        row = {"t": t, "offered": rate, "ready": n, "desired": len(pods),
               "rate_per_pod": rate / n if n else None, "rate_max": busiest,
               "queue_per_pod": q_mean, "queue_max": max(queues.values(), default=None),
               "queue_total": sum(queues.values()),
               "above_target": q_mean is not None and q_mean > settings.target, "above_capacity": over,
               "p99_ms": p99, "backlog_wait_ms": backlog / cap * 1000.0, "refused": 0.0,
               "sync": decision is not None}
        if decision is not None:
            row.update({"metric": decision.metric, "ratio": decision.ratio, "proposal": decision.proposal,
                        "decision": decision.reason, "replicas_before": decision.current})
        if slo_p99_ms is not None:
            row["slo_met"] = p99 is not None and p99 <= slo_p99_ms
        if i < ticks:  # advance the backlogs over [t, t + step)
            refused = 0.0
            for p in ready:
                r = rates[p.id]
                p.backlog = max(0.0, p.backlog + (r - cap) * step_s)
                if queue_limit is not None and curve.queue(r) + p.backlog > queue_limit:
                    extra = min(curve.queue(r) + p.backlog - queue_limit, p.backlog)
                    p.backlog -= extra
                    refused += extra
            row["refused"] = refused
        rows.append(row)

    sim = Simulation(rows, hpa.decisions, settings, curve, ramp_pts,
                     params={"step_s": step_s, "ready_delay_s": ready_delay_s, "tolerance": tolerance,
                             "sync_period_s": sync_period_s, "metric_lag_s": metric_lag_s, "duration_s": end,
                             "initial_replicas": n0, "queue_limit": queue_limit, "rebalance_s": rebalance_s,
                             "slo_p99_ms": slo_p99_ms, "metric": hpa.metric, "unready": unready})
    sim.summary = _summarize(sim, step_s)
    return sim


def _summarize(sim: Simulation, step_s: float) -> dict[str, Any]:
    rows = sim.rows
    spans = rows[:-1] if len(rows) > 1 else rows  # each tick stands for the step after it
    peak = max(rows, key=lambda r: r["desired"])
    qrows = [r for r in rows if r["queue_per_pod"] is not None]
    worst = max(qrows, key=lambda r: r["queue_per_pod"]) if qrows else None
    out = {
        "target": sim.settings.target, "capacity_per_pod": sim.curve.capacity,
        "peak_replicas": peak["desired"], "peak_replicas_at_s": peak["t"],
        "peak_ready": max(r["ready"] for r in rows),
        "final_replicas": rows[-1]["desired"],
        "max_queue_per_pod": worst["queue_per_pod"] if worst else None,
        "max_queue_per_pod_at_s": worst["t"] if worst else None,
        "max_queue_one_pod": max((r["queue_max"] or 0.0) for r in rows),
        "seconds_above_target": sum(step_s for r in spans if r["above_target"]),
        "seconds_above_capacity": sum(step_s for r in spans if r["above_capacity"]),
        "replica_seconds": sum(r["desired"] * step_s for r in spans),
        "refused": sum(r["refused"] for r in rows),
        "scale_events": sum(1 for d in sim.decisions if d.desired != d.current),
    }
    if sim.params.get("slo_p99_ms") is not None:
        out["seconds_slo_missed"] = sum(step_s for r in spans if not r.get("slo_met"))
    return out


def _summary_line(s: dict[str, Any]) -> str:
    q = s["max_queue_per_pod"]
    line = (f"peak replicas {s['peak_replicas']} (t={_n(s['peak_replicas_at_s'])} s), "
            f"max queue per pod {_n(q)} (target {_n(s['target'])}), "
            f"{_n(s['seconds_above_target'])} s above target, "
            f"{_n(s['seconds_above_capacity'])} s above capacity, final replicas {s['final_replicas']}")
    if "seconds_slo_missed" in s:
        line += f", {_n(s['seconds_slo_missed'])} s missing the SLO"
    if s.get("refused"):
        line += f", {s['refused']:,.0f} requests refused (queue limit)"
    return line


def _n(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int) or float(v).is_integer() or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _table(sim: Simulation) -> str:
    s = sim.settings
    slo = sim.params.get("slo_p99_ms")
    head = ["t s", "offered/s", "ready/desired", "req/s/pod", "queue/pod", "worst pod", "p99 ms", "HPA", "verdict"]
    rows = [head]
    for r in sim.sync_rows():
        hpa = "-"
        if r.get("decision") is not None:
            before = r["replicas_before"]
            hpa = f"{before}->{r['desired']}" if r["desired"] != before else f"keep {before}"
            if r.get("ratio") is not None:
                hpa += f" (x{r['ratio']:.2f})"
            if r["decision"] not in ("desired", "within tolerance"):
                hpa += f" {r['decision']}"
        words = []
        if r["above_capacity"]:
            wait = r["backlog_wait_ms"]
            words.append("OVER CAPACITY" + (f" +{_n(wait)} ms wait" if wait > 0 else ""))
        elif r["above_target"]:
            words.append("above target")
        if slo is not None and not r.get("slo_met"):
            words.append("SLO missed")
        per_pod = _n(r["rate_per_pod"])
        if r["rate_per_pod"] and r["rate_max"] > 1.02 * r["rate_per_pod"]:
            per_pod += f" (max {_n(r['rate_max'])})"
        rows.append([_n(r["t"]), _n(r["offered"]), f"{r['ready']}/{r['desired']}", per_pod,
                     _n(r["queue_per_pod"]), _n(r["queue_max"]), _n(r["p99_ms"]), hpa, ", ".join(words) or "ok"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    left = {7, 8}
    lines = [(f"autoscaling: {s.mode}, replicas {s.min_replicas}..{s.max_replicas}, targetQueueDepth {_n(s.target)}, "
              f"pod capacity {_n(sim.curve.capacity)} req/s (queue {_n(sim.curve.queue_at_capacity)} there), "
              f"ready delay {_n(sim.params['ready_delay_s'])} s, values: {s.source}")]
    extras = [f"{k} {_n(sim.params[key])}{unit}" for k, key, unit in
              (("metric lag", "metric_lag_s", " s"), ("connections recycled every", "rebalance_s", " s"),
               ("queue limit", "queue_limit", "")) if sim.params.get(key)]
    if extras:
        lines.append("  also: " + ", ".join(extras))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.append(_summary_line(sim.summary))
    return "\n".join(lines) + "\n"


def _plot(sim: Simulation, path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1]})
    rows = sim.rows
    t = [r["t"] for r in rows]
    top.plot(t, [r["offered"] for r in rows], color="tab:blue", lw=1.6, label="offered req/s")
    top.set_ylabel("offered req/s", color="tab:blue")
    top.grid(True, alpha=0.3)
    reps = top.twinx()
    reps.step(t, [r["desired"] for r in rows], where="post", color="tab:gray", ls="--", lw=1.2, label="desired pods")
    reps.step(t, [r["ready"] for r in rows], where="post", color="tab:green", lw=1.8, label="ready pods")
    reps.set_ylabel("replicas")
    reps.set_ylim(0, max(r["desired"] for r in rows) * 1.15 + 1)
    handles = top.get_legend_handles_labels()[0] + reps.get_legend_handles_labels()[0]
    top.legend(handles, [h.get_label() for h in handles], loc="upper left", bbox_to_anchor=(1.07, 1.0), fontsize=8,
               frameon=False)
    s = sim.settings
    top.set_title(f"{s.mode} autoscaling on queue depth: target {_n(s.target)}/pod, {s.min_replicas}..{s.max_replicas} "
                  f"replicas, pod capacity {_n(sim.curve.capacity)} req/s, ready delay "
                  f"{_n(sim.params['ready_delay_s'])} s"
                  + (f", connections recycled every {_n(sim.params['rebalance_s'])} s"
                     if sim.params.get("rebalance_s") else ""), fontsize=9)

    q = [math.nan if r["queue_per_pod"] is None else r["queue_per_pod"] for r in rows]
    qmax = [math.nan if r["queue_max"] is None else r["queue_max"] for r in rows]
    bottom.plot(t, q, color="tab:orange", lw=1.6, label="queue per pod (mean of ready pods)")
    bottom.plot(t, qmax, color="tab:red", lw=0.9, ls=":", label="worst pod")
    bottom.axhline(s.target, color="black", ls="--", lw=1.0, label=f"target {_n(s.target)}")
    bottom.axhline(sim.curve.queue_at_capacity, color="tab:purple", ls=":", lw=1.0,
                   label=f"queue at capacity {_n(sim.curve.queue_at_capacity)}")
    start = None
    for r in rows + [{"above_capacity": False, "t": rows[-1]["t"]}]:
        if r["above_capacity"] and start is None:
            start = r["t"]
        elif not r["above_capacity"] and start is not None:
            bottom.axvspan(start, r["t"], color="tab:red", alpha=0.12, lw=0,
                           label="above capacity" if "above capacity" not in
                           bottom.get_legend_handles_labels()[1] else None)
            start = None
    finite = [v for v in qmax if math.isfinite(v)]
    if finite and max(finite) > 20 * max(s.target, sim.curve.queue_at_capacity, 1e-9):
        bottom.set_yscale("symlog", linthresh=max(1.0, s.target))
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("queue depth per pod")
    bottom.set_xlabel("time (s)")
    bottom.grid(True, alpha=0.3)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.07, 1.0), fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


# ============================================================================================
# command line


def _run_slo(run) -> float | None:
    slo = ((run.sweep or {}).get("slo") or {}).get("p99_ms")
    if slo is None:
        slo = (run.scenario or {}).get("slo_p99_ms")
    return float(slo) if _finite(slo) else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m batchgate.loadtest.autoscale",
        description="Simulate the chart's queue-depth autoscaler on a traffic ramp, with pods shaped like the one "
                    "a load test measured (results.json from `batchgate loadtest --metrics-url ...`, run against "
                    "one pod). Prints a line per sync period and writes autoscale.json and autoscale.png.")
    p.add_argument("--results", required=True, help="results.json of a load test against one pod")
    p.add_argument("--values", help=f"Helm values file (default: {CHART_VALUES} if present, else the chart's "
                                    "defaults)")
    p.add_argument("--ramp", required=True, help="total offered req/s over time: T:RATE,T:RATE,... "
                                                 "(e.g. 0:100,300:2000,600:2000,900:200), linearly interpolated")
    p.add_argument("--duration", type=float, help="seconds simulated (default: the ramp's last time; the last "
                                                  "rate is held beyond it)")
    p.add_argument("--ready-delay", type=float, default=30.0, help="seconds from a pod's creation to taking "
                                                                   "traffic (image pull + model load; default 30)")
    p.add_argument("--target", type=float, help="override autoscaling.targetQueueDepth (what-if)")
    p.add_argument("--tolerance", type=float, default=0.1, help="HPA tolerance (default 0.1)")
    p.add_argument("--sync", type=float, default=15.0, help="HPA sync period, s (default 15)")
    p.add_argument("--metric-lag", type=float, default=0.0, help="age of the queue values the HPA reads "
                                                                 "(scrape + adapter delay), s (default 0)")
    p.add_argument("--step", type=float, default=1.0, help="simulation tick, s (default 1)")
    p.add_argument("--initial-replicas", type=int, help="ready pods at t=0 (default minReplicas)")
    p.add_argument("--rebalance", type=float, default=0.0,
                   help="per-connection balancing: seconds over which clients' connections are recycled (the "
                        "chart's config.grpc_max_connection_age_secs, 300); 0 = per-request balancing (default)")
    p.add_argument("--queue-limit", type=float,
                   help="a pod's queue limit, beyond which requests are refused (default: the values' "
                        "config.max_queue_size if set, else none; 0: none)")
    p.add_argument("--slo-p99-ms", type=float, help="latency SLO (default: the load test's own)")
    p.add_argument("--keep-up", type=float, default=0.95, help="a step is on the curve when ok/s >= this share "
                                                               "of the offered rate (default 0.95)")
    p.add_argument("--capacity", type=float, help="a pod's capacity in req/s (default: the highest rate on the "
                                                  "curve)")
    p.add_argument("--out", help="folder for autoscale.json and autoscale.png (default: the results' folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from . import report

        run = report.read_json(args.results)
        curve = QueueCurve.from_run(run, keep_up=args.keep_up, capacity=args.capacity)
        curve.source = args.results
        values_src = args.values
        if values_src is None and Path(CHART_VALUES).is_file():
            values_src = CHART_VALUES
        settings = load_values(values_src)
        slo = args.slo_p99_ms if args.slo_p99_ms is not None else _run_slo(run)
        limit = args.queue_limit
        if limit is None and values_src is not None:
            limit = queue_limit_from_values(values_src)
        sim = simulate(curve, settings, args.ramp, args.step, ready_delay_s=args.ready_delay, target=args.target,
                       tolerance=args.tolerance, sync_period_s=args.sync, metric_lag_s=args.metric_lag,
                       duration_s=args.duration, initial_replicas=args.initial_replicas,
                       queue_limit=limit or None, rebalance_s=args.rebalance, slo_p99_ms=slo)
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"autoscale: error: {e}", file=sys.stderr)
        return 2

    print(f"pod curve from {curve.source}: {len(curve.points)} step(s), capacity {_n(curve.capacity)} req/s per pod "
          f"(queue {_n(curve.queue_at_capacity)} there)")
    for label, why in curve.dropped:
        print(f"  not on the curve: {label}: {why}")
    warning = curve.knee_warning()
    if warning:
        print(f"  note: {warning}")
    if not settings.enabled:
        print("note: autoscaling.enabled is false in the values; simulating the autoscaler anyway")
    pick = pick_target(curve, slo)
    if slo is None and pick is None:
        print("target from the load test: no SLO known (give --slo-p99-ms)")
    elif pick is None:
        print(f"target from the load test: no step met p99 <= {_n(slo)} ms")
    else:
        print(f"target from the load test: the largest queue per pod within the SLO"
              f"{f' (p99 <= {_n(slo)} ms)' if slo is not None else ''} is {_n(pick.queue_depth)}, at "
              f"{pick.point.label or _n(pick.point.rate) + ' req/s'} ({_n(pick.point.rate)} req/s, p99 "
              f"{_n(pick.point.p99_ms)} ms); targetQueueDepth {_n(sim.settings.target)} is "
              f"{'within' if sim.settings.target <= pick.queue_depth else 'ABOVE'} it")
    print()
    print(sim.table(), end="")
    out = Path(args.out) if args.out else Path(args.results).resolve().parent
    doc = sim.to_dict()
    doc["results"] = str(args.results)
    doc["target_pick"] = None if pick is None else {"queue_depth": pick.queue_depth, "slo_p99_ms": slo,
                                                     "label": pick.point.label, "rate_per_pod": pick.point.rate,
                                                     "p99_ms": pick.point.p99_ms}
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscale.json").write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    paths = [str(out / "autoscale.json")]
    try:
        paths.append(sim.plot(out / "autoscale.png"))
    except ImportError:
        print("autoscale: matplotlib is missing: no plot (pip install 'batchgate[loadtest]')", file=sys.stderr)
    print(f"\nwritten: {', '.join(paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
