"""The chart's Grafana dashboard and its SLO rules, rendered by the real helm binary: the dashboard
ConfigMap the kube-prometheus-stack sidecar loads, valid raw JSON with a data source variable;
the SLO recording rules and burn-rate alerts checked by promtool (where it is installed: Debian's
prometheus package; `make test` installs it) and unit-tested with series that must and must not
page; the latency threshold made a bucket boundary of the server's histogram."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import promql_parser
import pytest
import yaml
from helm_support import ROOT, by_kind, exported_series, render, template, validate

sys.path.insert(0, str(ROOT / "tools"))
import dashboard  # noqa: E402  (tools/dashboard.py)
from promql_lite import expand  # noqa: E402

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")


def _values(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _names(expr: str) -> set[str]:
    """The metric names a query reads."""
    return set(re.findall(r"\b((?:batchgate|process)_[a-z_]+)\b", expr))


def test_the_dashboard_ships_as_a_configmap_the_grafana_sidecar_loads(helm, tmp_path):
    assert not [d for d in render(helm, _values(tmp_path, {})) if d["metadata"]["name"].endswith("-dashboard")]
    values = {"dashboards": {"enabled": True, "annotations": {"grafana_folder": "Serving"}}, "prometheusRelease": "kps"}
    docs = render(helm, _values(tmp_path, values))
    validate(docs)
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rel-batchgate-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Serving"}
    text = cm["data"]["batchgate.json"]
    assert text.strip() == dashboard.render().strip(), "the chart's JSON is not what tools/dashboard.py makes"
    board = json.loads(text)
    # raw JSON, provisioned as it is: no "export for sharing" inputs, no fixed id, a data source variable
    assert board["id"] is None and "__inputs" not in board and board["uid"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    exported = exported_series()
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            promql_parser.parse(expand(t["expr"], {"job": ".*", "model": ".*"}))  # valid PromQL
            assert 'job=~"$job"' in t["expr"], (p["title"], t["expr"])
            names = _names(t["expr"])
            assert names and {n for n in names if n.startswith("batchgate_")} <= exported, (p["title"], names)
    # what the issue asks the dashboard to show, each in a panel's query
    queries = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in (
        "batchgate_requests_total", "batchgate_request_errors_total", "batchgate_request_duration_seconds_bucket",
        "batchgate_queue_depth", "batchgate_queue_oldest_age_seconds", "batchgate_batch_size_bucket",
        "batchgate_inflight_requests", "batchgate_refusals_total", "batchgate_upstream_healthy",
        "batchgate_route_weight", "batchgate_route_requests_total", "batchgate_shadow_agreements_total",
        "batchgate_drift_score", "batchgate_drift_detections_total", "batchgate_model_ready",
    ):  # fmt: skip
        assert metric in queries, metric
    for q in (0.5, 0.9, 0.99):
        assert f"histogram_quantile({q}," in queries
    # ServiceMonitor and PrometheusRule carry the stack's release label
    kinds = by_kind(docs)
    assert kinds["ServiceMonitor"][0]["metadata"]["labels"]["release"] == "kps"
    assert kinds["PrometheusRule"][0]["metadata"]["labels"]["release"] == "kps"


def test_dashboards_of_same_named_releases_in_one_grafana_namespace_do_not_collide(helm, tmp_path):
    """With dashboards.namespace, release rel of namespace team-a and release rel of team-b both
    put a ConfigMap in monitoring: one name for both made the second install fail (helm will not
    take over an object another release owns)."""
    values = _values(tmp_path, {"dashboards": {"enabled": True, "namespace": "monitoring"}})
    names = set()
    for ns in ("team-a", "team-b"):
        (cm,) = [
            d
            for d in render(helm, values, "--namespace", ns)
            if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
        ]
        validate([cm])
        assert cm["metadata"]["namespace"] == "monitoring"
        names.add(cm["metadata"]["name"])
    assert names == {"rel-batchgate-team-a-dashboard", "rel-batchgate-team-b-dashboard"}


def test_the_committed_dashboard_is_current():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "dashboard.py"), "--check"], capture_output=True)
    assert out.returncode == 0, out.stderr.decode()


def _rules(helm: str, tmp_path: Path, values: dict) -> tuple[list[dict], dict]:
    docs = render(helm, _values(tmp_path, values))
    validate(docs)
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "batchgate.yaml" in d["data"])
    return by_kind(docs)["PrometheusRule"][0]["spec"]["groups"], yaml.safe_load(cm["data"]["batchgate.yaml"])


def test_slo_rules_are_valid_and_the_threshold_is_a_bucket(helm, tmp_path):
    groups, config = _rules(helm, tmp_path, {})
    slo = next(g for g in groups if g["name"].endswith("-slo"))
    records = {r["record"]: r for r in slo["rules"] if "record" in r}
    for w in ("5m", "30m", "1h", "6h", "3d"):
        assert f"batchgate:slo_errors:ratio_rate{w}" in records and f"batchgate:slo_slow:ratio_rate{w}" in records
    alerts = {r["alert"]: r for r in slo["rules"] if "alert" in r}
    assert set(alerts) == {
        "BatchgateErrorBudgetBurn", "BatchgateErrorBudgetBurnSlow", "BatchgateLatencyBudgetBurn",
        "BatchgateLatencyBudgetBurnSlow",
    }  # fmt: skip
    page = alerts["BatchgateErrorBudgetBurn"]["expr"]
    assert "> (14.4 * 0.001)" in page and "> (6 * 0.001)" in page and "ratio_rate1h" in page and "ratio_rate5m" in page
    assert alerts["BatchgateErrorBudgetBurn"]["labels"]["severity"] == "critical"
    assert alerts["BatchgateErrorBudgetBurnSlow"]["labels"]["severity"] == "warning"
    assert 'le="0.25"' in records["batchgate:slo_slow:ratio_rate5m"]["expr"]
    assert config["observability"]["latency_slo_ms"] == 250
    exported = exported_series()
    for g in groups:
        for r in g["rules"]:
            promql_parser.parse(r["expr"])
            assert {n for n in _names(r["expr"]) if n.startswith("batchgate_")} <= exported, r["expr"]
    # a whole number of seconds is written as the server's le label writes it
    groups, config = _rules(helm, tmp_path, {"slo": {"latency": {"thresholdSeconds": 1, "objective": 0.95}}})
    slo = next(g for g in groups if g["name"].endswith("-slo"))
    assert 'le="1.0"' in next(r for r in slo["rules"] if r.get("record") == "batchgate:slo_slow:ratio_rate1h")["expr"]
    assert config["observability"]["latency_slo_ms"] == 1000
    out = template(helm, _values(tmp_path, {"slo": {"availability": {"objective": 99.9}}}))
    assert out.returncode != 0 and "shares between 0 and 1" in out.stderr
    out = template(helm, _values(tmp_path, {"config": {"observability": {"latency_slo_ms": 5}}}))
    assert out.returncode != 0 and "use the value slo.latency.thresholdSeconds" in out.stderr
    groups, config = _rules(helm, tmp_path, {"slo": {"enabled": False}})
    assert not [g for g in groups if g["name"].endswith("-slo")] and "observability" not in config


def _series(labels: str, per_minute: float, minutes: int, after: int = 0) -> dict:
    """A counter flat at 0 for ``after`` minutes, then growing by ``per_minute`` to ``minutes``."""
    flat = f"0x{after - 1} " if after else ""
    return {"series": labels, "values": f"{flat}0+{per_minute:g}x{minutes - after}"}


def _fired(rule: dict) -> dict:
    return {"exp_labels": {**rule["labels"], "batchgate": "rel-batchgate", "namespace": "serving"}}


@needs_promtool
def test_promtool_checks_the_rules_and_the_burn_rate_alerts_page_when_they_should(helm, tmp_path):
    groups, _ = _rules(helm, tmp_path, {})
    by_name = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # the unit tests below check when alerts fire and with which labels (the annotations quote
    # $value, which promtool would have to match to the digit)
    bare = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups]
    rules.write_text(yaml.safe_dump({"groups": bare}))
    sel = 'namespace="serving",service="rel-batchgate"'
    minutes = 7 * 60
    ok = f'batchgate_requests_total{{{sel},model="m",version="1",protocol="grpc",status="OK"}}'
    err = f'batchgate_request_errors_total{{{sel},protocol="grpc",code="{{code}}",reason="none"}}'
    bucket = f'batchgate_request_duration_seconds_bucket{{{sel},model="m",version="1",protocol="grpc",le="0.25"}}'
    count = f'batchgate_request_duration_seconds_count{{{sel},model="m",version="1",protocol="grpc"}}'
    unavailable, invalid = err.replace("{code}", "UNAVAILABLE"), err.replace("{code}", "INVALID_ARGUMENT")
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {  # from 2h on, 10% of requests fail with UNAVAILABLE: past 14.4x a 0.1% budget over 1h and 5m: page
                "interval": "1m",
                "input_series": [_series(ok, 900, minutes), _series(unavailable, 100, minutes, after=120)],
                "alert_rule_test": [
                    {"eval_time": "1h", "alertname": "BatchgateErrorBudgetBurn", "exp_alerts": []},
                    {"eval_time": "2h5m", "alertname": "BatchgateErrorBudgetBurn", "exp_alerts": []},  # 1h: 0.8%
                    {
                        "eval_time": "3h15m",
                        "alertname": "BatchgateErrorBudgetBurn",
                        "exp_alerts": [_fired(by_name["BatchgateErrorBudgetBurn"])],
                    },
                ],
            },
            {  # the same share of a client's own mistakes spends no budget
                "interval": "1m",
                "input_series": [_series(ok, 900, minutes), _series(invalid, 100, minutes, after=120)],
                "alert_rule_test": [
                    {"eval_time": "3h15m", "alertname": "BatchgateErrorBudgetBurn", "exp_alerts": []},
                    {"eval_time": "7h", "alertname": "BatchgateErrorBudgetBurn", "exp_alerts": []},
                ],
            },
            {  # from 2h on, 10% slower than 0.25 s against a 1% budget: never 14.4x, but past 6x over 6h and 30m
                "interval": "1m",
                "input_series": [
                    {"series": bucket, "values": f"0+1000x120 120000+900x{minutes - 120}"},
                    _series(count, 1000, minutes),
                ],
                "alert_rule_test": [
                    {"eval_time": "2h5m", "alertname": "BatchgateLatencyBudgetBurn", "exp_alerts": []},
                    {"eval_time": "3h", "alertname": "BatchgateLatencyBudgetBurn", "exp_alerts": []},  # 6h: 2.2%
                    {
                        "eval_time": "6h30m",
                        "alertname": "BatchgateLatencyBudgetBurn",
                        "exp_alerts": [_fired(by_name["BatchgateLatencyBudgetBurn"])],
                    },
                ],
            },
        ],
    }
    test_file = tmp_path / "slo_test.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    out = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_the_certificate_and_reload_alerts_fire_when_they_should(helm, tmp_path):
    """A certificate 10 days from expiry (inside the 14-day default) fires once it has been so
    for an hour, one 30 days away does not; a refused keys file fires for 15 minutes after it."""
    groups, _ = _rules(helm, tmp_path, {})
    by_name = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    rules = tmp_path / "rules.yaml"
    bare = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups]
    rules.write_text(yaml.safe_dump({"groups": bare}))
    sel = 'namespace="serving",service="rel-batchgate"'
    expiry = f'batchgate_tls_certificate_expiry_timestamp_seconds{{{sel},pod="p1"}}'
    other = f'batchgate_tls_certificate_expiry_timestamp_seconds{{{sel},pod="p2"}}'
    failed = f'batchgate_reload_failures_total{{{sel},pod="p1",file="api_keys"}}'
    day = 86400
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": expiry, "values": f"{10 * day}x180"},  # (time() starts at 0)
                    {"series": other, "values": f"{30 * day}x180"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "BatchgateCertificateExpiresSoon", "exp_alerts": []},
                    {
                        "eval_time": "2h",
                        "alertname": "BatchgateCertificateExpiresSoon",
                        "exp_alerts": [
                            {"exp_labels": {**by_name["BatchgateCertificateExpiresSoon"]["labels"], "pod": "p1"}}
                        ],
                    },
                ],
            },
            {
                "interval": "1m",
                "input_series": [{"series": failed, "values": "0x30 1x60"}],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "BatchgateReloadFailed", "exp_alerts": []},
                    {
                        "eval_time": "40m",
                        "alertname": "BatchgateReloadFailed",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    **by_name["BatchgateReloadFailed"]["labels"],
                                    "pod": "p1",
                                    "file": "api_keys",
                                }
                            }
                        ],
                    },
                    {"eval_time": "80m", "alertname": "BatchgateReloadFailed", "exp_alerts": []},
                ],
            },
        ],
    }
    test_file = tmp_path / "security_test.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    out = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_readme_explains_every_alert_the_chart_raises(helm, tmp_path):
    groups, _ = _rules(helm, tmp_path, {})
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    readme = (ROOT / "README.md").read_text()
    assert [a for a in sorted(alerts) if f"`{a}`" not in readme] == []


def test_with_a_podmonitor_the_rules_and_the_autoscaler_read_this_releases_series_only(helm, tmp_path):
    """With monitoring.kind PodMonitor the chart's queries picked this release's series by
    pod=~"<fullname>-.*", which also matches every pod of a release whose name starts the same
    in the namespace (rel-batchgate-canary beside rel-batchgate): the autoscaler scaled on both
    queues, and the alerts averaged both. The Prometheus Operator labels a PodMonitor's series
    job="<namespace>/<PodMonitor name>", one release's own."""
    from promql_lite import Evaluator, Recording

    values = {"monitoring": {"kind": "PodMonitor"}, "autoscaling": {"mode": "keda"}}
    docs = by_kind(render(helm, _values(tmp_path, values)))
    query = docs["ScaledObject"][0]["spec"]["triggers"][0]["metadata"]["query"]
    groups = docs["PrometheusRule"][0]["spec"]["groups"]
    queue_alert = next(r["expr"] for g in groups for r in g["rules"] if r.get("alert") == "BatchgateQueueDepthHigh")
    scrape = '# TYPE batchgate_queue_depth gauge\nbatchgate_queue_depth{model="m",version="1"} %d\n'
    target = {"namespace": "serving", "container": "batchgate", "endpoint": "metrics"}
    ours = {**target, "job": "serving/rel-batchgate", "pod": "rel-batchgate-7d9f8c6b5-x2k4q"}
    canary = {**target, "job": "serving/rel-batchgate-canary", "pod": "rel-batchgate-canary-5c4b7d8f9-p8m2z"}
    rec = Recording()
    rec.add(0.0, [(ours, scrape % 1), (canary, scrape % 500)])
    ev = Evaluator(rec)
    assert list(ev.instant(query).values()) == [1.0]  # this release's queue, not the canary's with it
    assert ev.instant(queue_alert) == {}  # one request queued here: no alert


@needs_promtool
def test_a_fractional_certificate_expiry_days_is_that_many_days(helm, tmp_path):
    """alerts.certificateExpiryDays 1.5: a certificate a day from expiry fires, one two days away
    does not. sprig's mul cut each operand to an integer (until 2026-12-06), so 1.5 days read as
    one and 0.5 as none at all: an alert only once the certificate had expired."""
    groups, _ = _rules(helm, tmp_path, {"alerts": {"certificateExpiryDays": 1.5}})
    by_name = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    rules = tmp_path / "rules.yaml"
    bare = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups]
    rules.write_text(yaml.safe_dump({"groups": bare}))
    sel = 'namespace="serving",service="rel-batchgate"'
    day = 86400
    series = [
        {"series": f'batchgate_tls_certificate_expiry_timestamp_seconds{{{sel},pod="{pod}"}}', "values": f"{v}x180"}
        for pod, v in (("p1", day + day // 4), ("p2", 2 * day))  # (time() starts at 0)
    ]
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": "2h",
                        "alertname": "BatchgateCertificateExpiresSoon",
                        "exp_alerts": [
                            {"exp_labels": {**by_name["BatchgateCertificateExpiresSoon"]["labels"], "pod": "p1"}}
                        ],
                    },
                ],
            },
        ],
    }
    test_file = tmp_path / "expiry_test.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    out = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("days", [0, -2, "soon"])
def test_a_certificate_expiry_days_that_is_not_above_zero_stops_the_render(helm, tmp_path, days):
    out = template(helm, _values(tmp_path, {"alerts": {"enabled": True, "certificateExpiryDays": days}}))
    assert out.returncode != 0 and "alerts.certificateExpiryDays must be a number of days above 0" in out.stderr
