"""The simulation: a traffic ramp driven through pods shaped like the :class:`QueueCurve` and the
chart's autoscaler, one tick at a time (:func:`simulate`)."""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..jsonsafe import json_safe
from .controller import HPA, Autoscaling, Decision, Rules, load_values
from .traffic import EPS, QueueCurve, _check_ramp, parse_ramp, rate_at

FORMAT = "batchgate-autoscale"
FORMAT_VERSION = 1


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
        from .report import _table

        return _table(self)

    def summary_line(self) -> str:
        from .report import _summary_line

        return _summary_line(self.summary)

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return json_safe(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "assumptions": ASSUMPTIONS,
                "autoscaling": {
                    "source": s.source,
                    "enabled": s.enabled,
                    "mode": s.mode,
                    "minReplicas": s.min_replicas,
                    "maxReplicas": s.max_replicas,
                    "targetQueueDepth": s.target,
                    "behavior": {"scaleUp": _rules_dict(s.scale_up), "scaleDown": _rules_dict(s.scale_down)},
                },
                "params": self.params,
                "ramp": [list(p) for p in self.ramp],
                "curve": self.curve.to_dict(),
                "summary": self.summary,
                "decisions": [_asdict(d) for d in self.decisions],
                "timeline": self.rows,
            }
        )

    def write_json(self, path) -> str:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        return str(path)

    def plot(self, path) -> str:
        from .report import _plot

        return _plot(self, path)


ASSUMPTIONS = [
    "steady state per rate: a pod holds the queue the load test measured at the rate it receives",
    (
        "traffic spreads evenly over ready pods (per-request balancing); with rebalance_s > 0 it follows long-lived "
        "connections closed at that age, so a new pod's share grows as they reconnect"
    ),
    "above capacity the excess piles up as backlog at (rate - capacity) req/s and drains at (capacity - rate)",
    "a new pod takes no traffic and reports no metric until ready_delay_s after its creation",
    "a removed pod stops taking traffic at once; its queue drains during termination and leaves the model",
]


def _rules_dict(r: Rules) -> dict[str, Any]:
    return {
        "stabilizationWindowSeconds": r.stabilization_s,
        "selectPolicy": r.select,
        "tolerance": r.tolerance,
        "policies": [{"type": p.kind, "value": p.value, "periodSeconds": p.period_s} for p in r.policies],
    }


def _asdict(d: Decision) -> dict[str, Any]:
    return {k: getattr(d, k) for k in d.__dataclass_fields__}


def simulate(
    curve: QueueCurve,
    values: Autoscaling | str | Path | dict | None = None,
    ramp: str | Sequence[tuple[float, float]] = "0:100",
    step_s: float = 1.0,
    *,
    ready_delay_s: float = 30.0,
    target: float | None = None,
    tolerance: float = 0.1,
    sync_period_s: float = 15.0,
    metric_lag_s: float = 0.0,
    duration_s: float | None = None,
    initial_replicas: int | None = None,
    queue_limit: float | None = None,
    rebalance_s: float = 0.0,
    slo_p99_ms: float | None = None,
    metric: str | None = None,
    unready: str = "missing",
) -> Simulation:
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
    ``grpc_max_connection_age_s``), with ages spread evenly: each tick the connections opened
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
        (k, {p.id: 1.0 / (life * n0) for p in pods}) for k in range(life)
    )

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
                gone = {p.id for p in order[: len(pods) - decision.desired]}
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
        row = {
            "t": t,
            "offered": rate,
            "ready": n,
            "desired": len(pods),
            "rate_per_pod": rate / n if n else None,
            "rate_max": busiest,
            "queue_per_pod": q_mean,
            "queue_max": max(queues.values(), default=None),
            "queue_total": sum(queues.values()),
            "above_target": q_mean is not None and q_mean > settings.target,
            "above_capacity": over,
            "p99_ms": p99,
            "backlog_wait_ms": backlog / cap * 1000.0,
            "refused": 0.0,
            "sync": decision is not None,
        }
        if decision is not None:
            row.update(
                {
                    "metric": decision.metric,
                    "ratio": decision.ratio,
                    "proposal": decision.proposal,
                    "decision": decision.reason,
                    "replicas_before": decision.current,
                }
            )
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

    sim = Simulation(
        rows,
        hpa.decisions,
        settings,
        curve,
        ramp_pts,
        params={
            "step_s": step_s,
            "ready_delay_s": ready_delay_s,
            "tolerance": tolerance,
            "sync_period_s": sync_period_s,
            "metric_lag_s": metric_lag_s,
            "duration_s": end,
            "initial_replicas": n0,
            "queue_limit": queue_limit,
            "rebalance_s": rebalance_s,
            "slo_p99_ms": slo_p99_ms,
            "metric": hpa.metric,
            "unready": unready,
        },
    )
    sim.summary = _summarize(sim, step_s)
    return sim


def _summarize(sim: Simulation, step_s: float) -> dict[str, Any]:
    rows = sim.rows
    spans = rows[:-1] if len(rows) > 1 else rows  # each tick stands for the step after it
    peak = max(rows, key=lambda r: r["desired"])
    qrows = [r for r in rows if r["queue_per_pod"] is not None]
    worst = max(qrows, key=lambda r: r["queue_per_pod"]) if qrows else None
    out = {
        "target": sim.settings.target,
        "capacity_per_pod": sim.curve.capacity,
        "peak_replicas": peak["desired"],
        "peak_replicas_at_s": peak["t"],
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
