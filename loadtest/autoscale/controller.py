"""The chart's ``autoscaling`` values (:func:`load_values`) and the ``autoscaling/v2`` controller's
arithmetic for one queue-depth metric (:class:`HPA`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .traffic import EPS

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
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 15},
                {"type": "Pods", "value": 4, "periodSeconds": 15},
            ],
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


def _rules(d: dict[str, Any] | None, default: dict[str, Any], where: str) -> Rules:
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
    """The gateway's per-model queue limit (``config.limits.max_queue_size``) in a values file, if set."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    config = (doc.get("config") or {}) if isinstance(doc, dict) else {}
    limits = config.get("limits") if isinstance(config, dict) else None
    v = limits.get("max_queue_size") if isinstance(limits, dict) else None
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
        enabled=bool(d.get("enabled", True)),
        mode=mode,
        min_replicas=lo,
        max_replicas=hi,
        target=target,
        scale_up=_rules(behavior.get("scaleUp"), DEFAULT_VALUES["behavior"]["scaleUp"], "behavior.scaleUp"),
        scale_down=_rules(behavior.get("scaleDown"), DEFAULT_VALUES["behavior"]["scaleDown"], "behavior.scaleDown"),
        source=label,
    )


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

    def __init__(
        self,
        settings: Autoscaling | None = None,
        *,
        tolerance: float = 0.1,
        sync_period_s: float = 15.0,
        metric: str | None = None,
        unready: str = "missing",
    ):
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
