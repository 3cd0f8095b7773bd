"""The chart's Grafana dashboard, made from the panel list below (one place to read and change it).

    python tools/dashboard.py            # writes helm/batchgate/dashboards/batchgate.json
    python tools/dashboard.py --check    # exit 1 if the file is not what this list makes

The JSON is Grafana's raw dashboard model (``id`` null, no ``__inputs``): the kube-prometheus-stack
sidecar provisions it as it is; the "export for sharing" form does not provision. Every query
reads the data source from the ``datasource`` variable and selects ``job=~"$job"`` (and
``model=~"$model"`` on per-model series). tests/deploy/test_helm_dashboards.py checks the file
and evaluates every query against scrapes of a real gateway; tools/dashboard_preview.py draws it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "helm" / "batchgate" / "dashboards" / "batchgate.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
J = 'job=~"$job"'
JM = 'job=~"$job",model=~"$model"'
RI = "[$__rate_interval]"


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[tuple[str, str], ...]  # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"  # or heatmap
    width: int = 12


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _q(p: float) -> str:
    return f"histogram_quantile({p}, sum by (le) (rate(batchgate_request_duration_seconds_bucket{{{JM}}}{RI})))"


ROWS = (
    Row(
        "Traffic",
        (
            Panel(
                "Requests / s by protocol",
                "Inference requests answered by a model version, per second (batchgate_requests_total).",
                (
                    (f"sum by (protocol) (rate(batchgate_requests_total{{{JM}}}{RI}))", "{{protocol}}"),
                    (
                        f'sum by (protocol) (rate(batchgate_requests_total{{{JM},status!="OK"}}{RI}))',
                        "{{protocol}} errors",
                    ),
                ),
                "reqps",
            ),
            Panel(
                "Errors / s by code and protocol",
                "Every request answered with an error, by its code, admission refusals included "
                "(batchgate_request_errors_total).",
                (
                    (
                        f"sum by (protocol, code) (rate(batchgate_request_errors_total{{{J}}}{RI}))",
                        "{{protocol}} {{code}}",
                    ),
                ),
                "reqps",
            ),
        ),
    ),
    Row(
        "Latency",
        (
            Panel(
                "Latency p50 / p90 / p99",
                "From a request's arrival to its answer, from the histogram (batchgate_request_duration_seconds).",
                ((_q(0.5), "p50"), (_q(0.9), "p90"), (_q(0.99), "p99")),
                "s",
            ),
            Panel(
                "p99 latency by model",
                "The 99th percentile per model.",
                (
                    (
                        "histogram_quantile(0.99, sum by (le, model) "
                        f"(rate(batchgate_request_duration_seconds_bucket{{{JM}}}{RI})))",
                        "{{model}}",
                    ),
                ),
                "s",
            ),
        ),
    ),
    Row(
        "Queues and batching",
        (
            Panel(
                "Queue depth",
                "Requests admitted and not yet executing, per model: the autoscaling signal (batchgate_queue_depth).",
                ((f"sum by (model) (batchgate_queue_depth{{{JM}}})", "{{model}}"),),
            ),
            Panel(
                "Oldest queued request",
                "How long the longest-waiting queued request has waited (batchgate_queue_oldest_age_seconds).",
                ((f"max by (model) (batchgate_queue_oldest_age_seconds{{{JM}}})", "{{model}}"),),
                "s",
            ),
            Panel(
                "Batch sizes",
                "Rows per model execution: how often each size ran (batchgate_batch_size).",
                ((f"sum by (le) (rate(batchgate_batch_size_bucket{{{JM}}}{RI}))", "{{le}}"),),
                kind="heatmap",
            ),
            Panel(
                "Rows per execution and in flight",
                "Mean rows per execution (batching at work), and requests accepted and not yet answered.",
                (
                    (
                        f"sum by (model) (rate(batchgate_batch_size_sum{{{JM}}}{RI})) / "
                        f"sum by (model) (rate(batchgate_batch_size_count{{{JM}}}{RI}))",
                        "{{model}} rows / execution",
                    ),
                    (f"sum by (model) (batchgate_inflight_requests{{{JM}}})", "{{model}} in flight"),
                ),
            ),
            Panel(
                "Refusals / s by reason",
                "Requests turned away or dropped unexecuted by an admission limit (batchgate_refusals_total).",
                ((f"sum by (reason) (rate(batchgate_refusals_total{{{JM}}}{RI}))", "{{reason}}"),),
                "reqps",
            ),
            Panel(
                "Queue and compute time p99",
                "Time waiting in the queue, and one backend execution, at the 99th percentile.",
                (
                    (
                        "histogram_quantile(0.99, sum by (le) "
                        f"(rate(batchgate_queue_duration_seconds_bucket{{{JM}}}{RI})))",
                        "queue",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (le) "
                        f"(rate(batchgate_compute_duration_seconds_bucket{{{JM}}}{RI})))",
                        "compute",
                    ),
                ),
                "s",
            ),
        ),
    ),
    Row(
        "Upstreams (remote models)",
        (
            Panel(
                "Upstream health",
                "1 while an upstream is in rotation (batchgate_upstream_healthy).",
                ((f"min by (model, upstream) (batchgate_upstream_healthy{{{JM}}})", "{{model}} {{upstream}}"),),
            ),
            Panel(
                "Upstream errors / s and p99",
                "Failed calls to each upstream by code, and the p99 of a call.",
                (
                    (
                        f"sum by (upstream, code) (rate(batchgate_upstream_errors_total{{{JM}}}{RI}))",
                        "{{upstream}} {{code}}",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (le, upstream) "
                        f"(rate(batchgate_upstream_request_duration_seconds_bucket{{{JM}}}{RI})))",
                        "{{upstream}} p99 (s)",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Canaries and shadows",
        (
            Panel(
                "Route weights and the rollout",
                "Each variant's weight now, and the canary's percentage at the rollout's step.",
                (
                    (f"max by (route, variant) (batchgate_route_weight{{{J}}})", "{{route}} {{variant}}"),
                    (f"max by (route) (batchgate_rollout_canary_percent{{{J}}})", "{{route}} canary % (rollout)"),
                ),
            ),
            Panel(
                "Error rate by variant (rollout gate)",
                "Share of each variant's requests answered with an error: the rollout's max_error_rate gate.",
                (
                    (
                        f'sum by (route, variant) (rate(batchgate_route_requests_total{{{J},status!="OK"}}{RI})) / '
                        f"sum by (route, variant) (rate(batchgate_route_requests_total{{{J}}}{RI}))",
                        "{{route}} {{variant}}",
                    ),
                ),
                "percentunit",
            ),
            Panel(
                "Shadow agreement",
                "Share of compared shadow answers that agreed with the primary's (the disagreement gate).",
                (
                    (
                        f"sum by (route, shadow) (rate(batchgate_shadow_agreements_total{{{J}}}{RI})) / "
                        f'sum by (route, shadow) (rate(batchgate_shadow_requests_total{{{J},outcome="compared"}}{RI}))',
                        "{{route}} {{shadow}}",
                    ),
                ),
                "percentunit",
            ),
            Panel(
                "Shadow copies / s by outcome",
                "Copies of requests sent to shadows: compared, answered, dropped (budget full) or failed.",
                (
                    (
                        f"sum by (shadow, outcome) (rate(batchgate_shadow_requests_total{{{J}}}{RI}))",
                        "{{shadow}} {{outcome}}",
                    ),
                ),
                "reqps",
            ),
        ),
    ),
    Row(
        "Drift",
        (
            Panel(
                "Drift scores",
                "The last window's score per feature and test (PSI, KS, chi-square...; batchgate_drift_score).",
                ((f"max by (model, feature, test) (batchgate_drift_score{{{JM}}})", "{{model}} {{feature}} {{test}}"),),
            ),
            Panel(
                "Drift detections and state",
                "Times each monitor entered the drifted state in the last hour, and whether it is drifted now.",
                (
                    (
                        f"sum by (model) (increase(batchgate_drift_detections_total{{{JM}}}[1h]))",
                        "{{model}} detections",
                    ),
                    (f"max by (model) (batchgate_drift_active{{{JM}}})", "{{model}} drifted"),
                ),
            ),
        ),
    ),
    Row(
        "Fleet",
        (
            Panel(
                "Replicas",
                "Pods exporting batchgate metrics.",
                ((f"count(count by (instance) (batchgate_model_ready{{{J}}}))", "replicas"),),
            ),
            Panel(
                "CPU per replica",
                "CPU seconds a second per pod (its worker processes together).",
                ((f"sum by (instance) (rate(process_cpu_seconds_total{{{J}}}{RI}))", "{{instance}}"),),
            ),
        ),
    ),
)


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
    }


def _panel(p: Panel, pid: int, x: int, y: int) -> dict:
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}
        for i, (expr, legend) in enumerate(p.targets)
    ]
    out: dict = {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
        "targets": targets,
    }
    if p.kind == "heatmap":
        for t in targets:
            t["format"] = "heatmap"
        out["options"] = {"calculate": False, "yAxis": {"unit": p.unit}, "color": {"scheme": "Blues", "mode": "scheme"}}
    else:
        out["fieldConfig"] = {
            "defaults": {"unit": p.unit, "custom": {"lineWidth": 1, "fillOpacity": 10}},
            "overrides": [],
        }
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return out


def build() -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for row in ROWS:
        panels.append(
            {"id": pid, "type": "row", "title": row.title, "collapsed": False, "panels": [],
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
        )  # fmt: skip
        pid, y, x = pid + 1, y + 1, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(p, pid, x, y))
            pid, x = pid + 1, x + p.width
        y += 8
    return {
        "id": None,
        "uid": "batchgate-overview",
        "title": "batchgate",
        "description": "batchgate model-serving gateway: traffic, latency, queues and batching, upstreams, "
        "canaries and shadows, drift, fleet",
        "tags": ["batchgate", "model-serving"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "refresh": 1,
                    "hide": 0,
                },  # fmt: skip
                _variable("job", "Job", "label_values(batchgate_model_ready, job)"),
                _variable("model", "Model", 'label_values(batchgate_model_ready{job=~"$job"}, model)'),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel query."""
    return [(p.title, expr) for row in ROWS for p in row.panels for expr, _ in p.targets]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file differs from what this list makes")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is not what tools/dashboard.py makes: run it", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(queries())} queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
