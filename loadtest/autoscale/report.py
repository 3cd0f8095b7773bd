"""What a simulation shows: the table per sync period, the summary line, the plot, and the command
line (``python -m batchgate.loadtest.autoscale``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..jsonsafe import json_safe
from .controller import CHART_VALUES, load_values, queue_limit_from_values
from .simulation import Simulation, simulate
from .traffic import QueueCurve, _finite, pick_target


def _summary_line(s: dict[str, Any]) -> str:
    q = s["max_queue_per_pod"]
    line = (
        f"peak replicas {s['peak_replicas']} (t={_n(s['peak_replicas_at_s'])} s), "
        f"max queue per pod {_n(q)} (target {_n(s['target'])}), "
        f"{_n(s['seconds_above_target'])} s above target, "
        f"{_n(s['seconds_above_capacity'])} s above capacity, final replicas {s['final_replicas']}"
    )
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
        rows.append(
            [
                _n(r["t"]),
                _n(r["offered"]),
                f"{r['ready']}/{r['desired']}",
                per_pod,
                _n(r["queue_per_pod"]),
                _n(r["queue_max"]),
                _n(r["p99_ms"]),
                hpa,
                ", ".join(words) or "ok",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    left = {7, 8}
    lines = [
        (
            f"autoscaling: {s.mode}, replicas {s.min_replicas}..{s.max_replicas}, targetQueueDepth {_n(s.target)}, "
            f"pod capacity {_n(sim.curve.capacity)} req/s (queue {_n(sim.curve.queue_at_capacity)} there), "
            f"ready delay {_n(sim.params['ready_delay_s'])} s, values: {s.source}"
        )
    ]
    extras = [
        f"{k} {_n(sim.params[key])}{unit}"
        for k, key, unit in (
            ("metric lag", "metric_lag_s", " s"),
            ("connections recycled every", "rebalance_s", " s"),
            ("queue limit", "queue_limit", ""),
        )
        if sim.params.get(key)
    ]
    if extras:
        lines.append("  also: " + ", ".join(extras))
    for row in rows:
        lines.append(
            "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        )
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
    top.legend(
        handles,
        [h.get_label() for h in handles],
        loc="upper left",
        bbox_to_anchor=(1.07, 1.0),
        fontsize=8,
        frameon=False,
    )
    s = sim.settings
    top.set_title(
        f"{s.mode} autoscaling on queue depth: target {_n(s.target)}/pod, {s.min_replicas}..{s.max_replicas} "
        f"replicas, pod capacity {_n(sim.curve.capacity)} req/s, ready delay "
        f"{_n(sim.params['ready_delay_s'])} s"
        + (f", connections recycled every {_n(sim.params['rebalance_s'])} s" if sim.params.get("rebalance_s") else ""),
        fontsize=9,
    )

    q = [math.nan if r["queue_per_pod"] is None else r["queue_per_pod"] for r in rows]
    qmax = [math.nan if r["queue_max"] is None else r["queue_max"] for r in rows]
    bottom.plot(t, q, color="tab:orange", lw=1.6, label="queue per pod (mean of ready pods)")
    bottom.plot(t, qmax, color="tab:red", lw=0.9, ls=":", label="worst pod")
    bottom.axhline(s.target, color="black", ls="--", lw=1.0, label=f"target {_n(s.target)}")
    bottom.axhline(
        sim.curve.queue_at_capacity,
        color="tab:purple",
        ls=":",
        lw=1.0,
        label=f"queue at capacity {_n(sim.curve.queue_at_capacity)}",
    )
    start = None
    for r in rows + [{"above_capacity": False, "t": rows[-1]["t"]}]:
        if r["above_capacity"] and start is None:
            start = r["t"]
        elif not r["above_capacity"] and start is not None:
            bottom.axvspan(
                start,
                r["t"],
                color="tab:red",
                alpha=0.12,
                lw=0,
                label="above capacity" if "above capacity" not in bottom.get_legend_handles_labels()[1] else None,
            )
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
        "one pod). Prints a line per sync period and writes autoscale.json and autoscale.png.",
    )
    p.add_argument("--results", required=True, help="results.json of a load test against one pod")
    p.add_argument("--values", help=f"Helm values file (default: {CHART_VALUES} if present, else the chart's defaults)")
    p.add_argument(
        "--ramp",
        required=True,
        help="total offered req/s over time: T:RATE,T:RATE,... "
        "(e.g. 0:100,300:2000,600:2000,900:200), linearly interpolated",
    )
    p.add_argument(
        "--duration",
        type=float,
        help="seconds simulated (default: the ramp's last time; the last rate is held beyond it)",
    )
    p.add_argument(
        "--ready-delay",
        type=float,
        default=30.0,
        help="seconds from a pod's creation to taking traffic (image pull + model load; default 30)",
    )
    p.add_argument("--target", type=float, help="override autoscaling.targetQueueDepth (what-if)")
    p.add_argument("--tolerance", type=float, default=0.1, help="HPA tolerance (default 0.1)")
    p.add_argument("--sync", type=float, default=15.0, help="HPA sync period, s (default 15)")
    p.add_argument(
        "--metric-lag",
        type=float,
        default=0.0,
        help="age of the queue values the HPA reads (scrape + adapter delay), s (default 0)",
    )
    p.add_argument("--step", type=float, default=1.0, help="simulation tick, s (default 1)")
    p.add_argument("--initial-replicas", type=int, help="ready pods at t=0 (default minReplicas)")
    p.add_argument(
        "--rebalance",
        type=float,
        default=0.0,
        help="per-connection balancing: seconds over which clients' connections are recycled (the "
        "chart's config.server.grpc_max_connection_age_s, 300); 0 = per-request balancing (default)",
    )
    p.add_argument(
        "--queue-limit",
        type=float,
        help="a pod's queue limit, beyond which requests are refused (default: the values' "
        "config.limits.max_queue_size if set, else none; 0: none)",
    )
    p.add_argument("--slo-p99-ms", type=float, help="latency SLO (default: the load test's own)")
    p.add_argument(
        "--keep-up",
        type=float,
        default=0.95,
        help="a step is on the curve when ok/s >= this share of the offered rate (default 0.95)",
    )
    p.add_argument("--capacity", type=float, help="a pod's capacity in req/s (default: the highest rate on the curve)")
    p.add_argument("--out", help="folder for autoscale.json and autoscale.png (default: the results' folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .. import report

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
        sim = simulate(
            curve,
            settings,
            args.ramp,
            args.step,
            ready_delay_s=args.ready_delay,
            target=args.target,
            tolerance=args.tolerance,
            sync_period_s=args.sync,
            metric_lag_s=args.metric_lag,
            duration_s=args.duration,
            initial_replicas=args.initial_replicas,
            queue_limit=limit or None,
            rebalance_s=args.rebalance,
            slo_p99_ms=slo,
        )
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"autoscale: error: {e}", file=sys.stderr)
        return 2

    print(
        f"pod curve from {curve.source}: {len(curve.points)} step(s), capacity {_n(curve.capacity)} req/s per pod "
        f"(queue {_n(curve.queue_at_capacity)} there)"
    )
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
        print(
            f"target from the load test: the largest queue per pod within the SLO"
            f"{f' (p99 <= {_n(slo)} ms)' if slo is not None else ''} is {_n(pick.queue_depth)}, at "
            f"{pick.point.label or _n(pick.point.rate) + ' req/s'} ({_n(pick.point.rate)} req/s, p99 "
            f"{_n(pick.point.p99_ms)} ms); targetQueueDepth {_n(sim.settings.target)} is "
            f"{'within' if sim.settings.target <= pick.queue_depth else 'ABOVE'} it"
        )
    print()
    print(sim.table(), end="")
    out = Path(args.out) if args.out else Path(args.results).resolve().parent
    doc = sim.to_dict()
    doc["results"] = str(args.results)
    doc["target_pick"] = (
        None
        if pick is None
        else {
            "queue_depth": pick.queue_depth,
            "slo_p99_ms": slo,
            "label": pick.point.label,
            "rate_per_pod": pick.point.rate,
            "p99_ms": pick.point.p99_ms,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscale.json").write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    paths = [str(out / "autoscale.json")]
    try:
        paths.append(sim.plot(out / "autoscale.png"))
    except ImportError:
        print("autoscale: matplotlib is missing: no plot (pip install 'batchgate[loadtest]')", file=sys.stderr)
    print(f"\nwritten: {', '.join(paths)}", file=sys.stderr)
    return 0
