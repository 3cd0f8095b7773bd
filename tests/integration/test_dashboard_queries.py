"""Every query of the chart's dashboard and every SLO recording rule, evaluated against scrapes of
real gateways (tools/promql_lite.py): a route with a stable variant, a canary that fails on some
inputs, a compared shadow and a rollout under way; a remote model on a second gateway. A query
that names a series the code does not export, or a label it does not carry, comes back empty and
fails here. Only the panels of what this set-up does not exercise (drift, admission refusals,
upstream errors) may be empty, and their metric names must still be families the scrape declares."""

from __future__ import annotations

import re
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from batchgate.remote_models import RemoteModel
from route_support import FEATURES, POISON, infer_grpc, infer_http, route_repository, write_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "deploy"))
import dashboard  # noqa: E402
from promql_lite import Evaluator, Recording  # noqa: E402

# What Prometheus adds to each scraped series (the ServiceMonitor's target labels).
TARGET = {"job": "batchgate", "namespace": "serving", "service": "rel-batchgate", "instance": "10.0.0.7:8002"}
# Series this set-up does not make: no drift monitor, nothing refused, no upstream failing.
MAY_BE_EMPTY = ("batchgate_drift_", "batchgate_refusals_total", "batchgate_upstream_errors_total")

ROUTE = {
    "name": "fraud",
    "variants": [
        {"name": "stable", "model": "clf_a", "weight": 90},
        {"name": "canary", "model": "clf_bad", "weight": 10},
    ],
    "shadows": [{"name": "next", "model": "clf_other", "percent": 100, "max_inflight": 8}],
    "compare": {"output": "probabilities", "kind": "classification", "atol": 1.0e-3},
    "rollout": {
        "canary": "canary",
        "baseline": "stable",
        "steps": [10, 50, 100],
        "interval_s": 3600,
        "min_requests": 100000,
        "gates": {"max_error_rate": 0.5},
        "on_fail": "pause",
    },
}


@pytest.fixture(scope="module")
def recording(tmp_path_factory, request):
    from gateway_support import start_gateway

    root = tmp_path_factory.mktemp("dash")
    repo = route_repository(str(root / "models"))
    upstream = start_gateway(repo, metrics_port=-1)
    request.addfinalizer(upstream.stop)
    cfg = write_config(str(root / "batchgate.yaml"), [ROUTE])
    remote = RemoteModel("remote_clf", (upstream.grpc_url,), upstream_model="clf_a", probe_interval_s=0.1)
    running = start_gateway(repo, config_file=cfg, remote_models=(remote,), latency_slo_ms=250)
    request.addfinalizer(running.stop)
    rec = Recording()

    def scrape() -> None:
        text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
        rec.add(time.time(), [(TARGET, text)])

    def traffic() -> None:
        for i in range(30):
            infer_grpc(running.grpc_url, "fraud", FEATURES)
            infer_http(running.http_url, "remote_clf", FEATURES)
            infer_grpc(running.grpc_url, "clf_a", np.tile(FEATURES, (1 + i % 3, 1)))
            if i % 5 == 0:  # the canary, pinned, on inputs it fails
                with pytest.raises(Exception):  # noqa: B017 - tritonclient's error, whichever client
                    infer_http(running.http_url, "fraud", POISON, headers={"x-batchgate-variant": "canary"})

    scrape()
    for _ in range(3):
        traffic()
        time.sleep(0.3)
        scrape()
    return rec, urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()


def _declared(text: str) -> set[str]:
    out = set()
    for fam in re.findall(r"^# TYPE (\w+) ", text, re.M):
        out |= {fam, fam + "_total", fam + "_bucket", fam + "_sum", fam + "_count"}
    return out


def test_every_dashboard_query_reads_what_a_real_gateway_exports(recording):
    rec, text = recording
    ev = Evaluator(rec)
    declared = _declared(text)
    empty = []
    for title, expr in dashboard.queries():
        names = set(re.findall(r"\b((?:batchgate|process)_[a-z_]+)\b", expr))
        assert names <= declared, (title, names - declared)
        got = ev.instant(expr, variables={"job": ".*", "model": ".*"})
        assert isinstance(got, dict), (title, expr)
        values = [v for v in got.values() if v == v]  # NaN: nothing to compute yet
        if not values:
            empty.append(title)
            assert any(m in expr for m in MAY_BE_EMPTY), f"panel '{title}' is empty: {expr}"
    assert 0 < len(empty) < len(dashboard.queries()) // 4, empty


def test_the_panels_say_what_happened(recording):
    rec, _ = recording
    ev = Evaluator(rec)
    v = {"job": ".*", "model": ".*"}
    rate = ev.instant('sum by (protocol) (rate(batchgate_requests_total{job=~"$job"}[1m]))', variables=v)
    assert {dict(k)["protocol"] for k in rate} == {"grpc", "http"} and all(x > 0 for x in rate.values())
    weights = ev.instant('max by (route, variant) (batchgate_route_weight{job=~"$job"})', variables=v)
    assert {dict(k)["variant"]: x for k, x in weights.items()} == {"stable": 90.0, "canary": 10.0}
    gate = dashboard.queries()[[t for t, _ in dashboard.queries()].index("Error rate by variant (rollout gate)")][1]
    by_variant = {dict(k)["variant"]: x for k, x in ev.instant(gate, variables=v).items()}
    assert by_variant["canary"] > 0.3  # the pinned canary failed on every poisoned request
    p99 = ev.instant(
        'histogram_quantile(0.99, sum by (le) (rate(batchgate_request_duration_seconds_bucket{job=~"$job"}[1m])))',
        variables=v,
    )
    assert 0 < next(iter(p99.values())) < 1.0


def test_the_slo_recording_rules_evaluate_on_real_series(recording, tmp_path):
    from helm_support import by_kind, helm_binary, render

    rec, _ = recording
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({}))
    groups = by_kind(render(helm_binary(), values))["PrometheusRule"][0]["spec"]["groups"]
    ev = Evaluator(rec)
    records = [r for g in groups for r in g["rules"] if "record" in r]
    assert len(records) == 10
    for r in records:
        got = ev.instant(r["expr"])
        assert isinstance(got, dict) and len(got) == 1, (r["record"], got)
        share = next(iter(got.values()))
        assert 0.0 <= share < 0.5, (r["record"], share)  # errors: the canary's INTERNAL answers; slow: none
    errors = ev.instant(next(r["expr"] for r in records if r["record"] == "batchgate:slo_errors:ratio_rate5m"))
    assert next(iter(errors.values())) > 0


def test_the_error_rate_alert_counts_overload_refusals(tmp_path):
    """BatchgateErrorRateHigh is "any code": a gateway refusing most requests at admission
    (RESOURCE_EXHAUSTED, counted in batchgate_request_errors_total, never in
    batchgate_requests_total, which counts what a model version answered) must raise it. It read
    batchgate_requests_total alone and saw an error rate of 0 while the gateway refused 5 in 6."""
    import socket

    from helm_support import by_kind, helm_binary, render

    from gateway_support import eventually, start_gateway

    running = start_gateway(route_repository(str(tmp_path / "models")), max_inflight_requests=1)
    try:
        rec = Recording()

        def scrape() -> None:
            rec.add(time.time(), [(TARGET, urllib.request.urlopen(running.metrics_url, timeout=10).read().decode())])

        def overload(refused: int) -> None:
            host, port = running.http_url.split(":")
            with socket.create_connection((host, int(port)), timeout=10) as held:  # admitted, its body never sent
                held.sendall(b"POST /v2/models/clf_a/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
                eventually(lambda: running.gateway.dataplane.admission.inflight == 1, "a request held")
                for _ in range(refused):
                    with pytest.raises(Exception, match="max_inflight_requests"):
                        infer_grpc(running.grpc_url, "clf_a", FEATURES)
            eventually(lambda: running.gateway.dataplane.admission.inflight == 0, "the held request gone")
            infer_grpc(running.grpc_url, "clf_a", FEATURES)

        overload(1)  # (every series present at the first scrape: a rate needs two)
        time.sleep(0.2)
        scrape()
        overload(5)
        time.sleep(0.2)
        scrape()
    finally:
        running.stop()
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({}))
    groups = by_kind(render(helm_binary(), values))["PrometheusRule"][0]["spec"]["groups"]
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "BatchgateErrorRateHigh")
    got = Evaluator(rec).instant(rule["expr"])
    assert got and next(iter(got.values())) > 0.5, (rule["expr"], got)
