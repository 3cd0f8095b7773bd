"""Triton's nv_inference_* families on /metrics: Triton's names, types, labels and units, the same
figures as the V2 statistics API (models and routes), failures by reason; the setting that turns
them off; process_* metrics; and a metrics port that answers /metrics only. Real gateway on
ephemeral ports, real tritonclient calls, real HTTP scrapes."""

from __future__ import annotations

import gzip
import http.client
import re
import urllib.request
from decimal import Decimal

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from batchgate.cli import build_parser, serve_flags
from batchgate.config import RemoteModel, load_settings
from batchgate.core.stats import ModelStats
from batchgate.demo import _save, classifier_model
from batchgate.monitoring.metrics import Metrics
from gateway_support import start_gateway
from route_support import FEATURES, POISON, failing_classifier, write_config

TYPES = {
    "nv_inference_request_success": "counter",
    "nv_inference_request_failure": "counter",
    "nv_inference_count": "counter",
    "nv_inference_exec_count": "counter",
    "nv_inference_request_duration_us": "counter",
    "nv_inference_queue_duration_us": "counter",
    "nv_inference_compute_input_duration_us": "counter",
    "nv_inference_compute_infer_duration_us": "counter",
    "nv_inference_compute_output_duration_us": "counter",
    "nv_inference_pending_request_count": "gauge",
}
DURATIONS = {
    "nv_inference_request_duration_us": "success",
    "nv_inference_queue_duration_us": "queue",
    "nv_inference_compute_input_duration_us": "compute_input",
    "nv_inference_compute_infer_duration_us": "compute_infer",
    "nv_inference_compute_output_duration_us": "compute_output",
}
REASONS = {"REJECTED", "CANCELED", "BACKEND", "OTHER"}
ROUTE = {
    "name": "front",
    "variants": [
        {"name": "a", "model": "clf", "weight": 100},
        {"name": "b", "model": "clf_bad", "weight": 0},
    ],
}
SAMPLE = re.compile(r'^(\w+)\{((?:\w+="(?:[^"\\]|\\.)*",?)*)\} (\S+)$')


def _repo(root) -> str:
    cfg = "max_batch_size: 8\n"
    _save(classifier_model(seed=0), str(root), "clf", config=cfg)
    _save(failing_classifier(seed=0), str(root), "clf_bad", config=cfg)
    return str(root)


def _infer(mod, url: str, model: str, x: np.ndarray, headers: dict | None = None) -> None:
    inp = mod.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    mod.InferenceServerClient(url).infer(model, [inp], headers=headers)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return _repo(tmp_path_factory.mktemp("triton_models"))


@pytest.fixture(scope="module")
def gw(repo, tmp_path_factory):
    """A gateway with two local models, a remote one (another gateway upstream) and a route, after
    some traffic: answered, refused as invalid (OTHER), failed in the model (BACKEND), through the
    route, and to a model that does not exist."""
    cfg = write_config(str(tmp_path_factory.mktemp("triton_cfg") / "config.yaml"), [ROUTE])
    upstream = start_gateway(repo)
    remote = RemoteModel("rclf", (upstream.grpc_url,), upstream_model="clf", batching="passthrough")
    running = start_gateway(repo, config_file=cfg, remote_models=(remote,))
    try:
        rows = np.full((2, 4), 0.1, np.float32)
        for _ in range(3):
            _infer(grpcclient, running.grpc_url, "clf", rows)
        for _ in range(2):
            _infer(httpclient, running.http_url, "clf", FEATURES)
        for mod, url in ((httpclient, running.http_url), (grpcclient, running.grpc_url)):
            with pytest.raises(InferenceServerException):  # wrong shape: INVALID_ARGUMENT
                _infer(mod, url, "clf", np.ones((1, 2), np.float32))
        with pytest.raises(InferenceServerException):  # the model fails on it: INTERNAL
            _infer(grpcclient, running.grpc_url, "clf_bad", POISON)
        _infer(grpcclient, running.grpc_url, "clf_bad", FEATURES)
        _infer(httpclient, running.http_url, "rclf", FEATURES)
        for _ in range(2):
            _infer(httpclient, running.http_url, "front", FEATURES)
        with pytest.raises(InferenceServerException):  # through the route, pinned to the failing variant
            _infer(httpclient, running.http_url, "front", POISON, headers={"x-batchgate-variant": "b"})
        with pytest.raises(InferenceServerException):
            _infer(httpclient, running.http_url, "no_such_model", FEATURES)
        yield running
    finally:
        running.stop()
        upstream.stop()


def scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def samples(text: str, prefix: str = "nv_") -> list[tuple[str, dict[str, str], str]]:
    """(name, labels, value as written) of every sample line starting with ``prefix``."""
    out = []
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a labelled sample: {line!r}"
        out.append((m.group(1), dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2))), m.group(3)))
    return out


def series(text: str) -> dict[tuple[str, str, str, str], str]:
    """(family, model, version, reason or "") -> the value as written."""
    return {(n, lb["model"], lb["version"], lb.get("reason", "")): v for n, lb, v in samples(text)}


def test_the_families_agree_with_the_statistics_api_for_every_model_and_route(gw):
    stats = httpclient.InferenceServerClient(gw.http_url).get_inference_statistics()["model_stats"]
    text = scrape(gw.metrics_url)
    got = series(text)
    listed = {(e["name"], e["version"]) for e in stats}
    assert listed == {("clf", "1"), ("clf_bad", "1"), ("rclf", "1"), ("front", "")}  # the route: a model
    exported = {(m, v) for (n, m, v, _) in got if n == "nv_inference_request_success"}
    assert exported == listed
    for e in stats:
        m, v, inf = e["name"], e["version"], e["inference_stats"]
        assert int(got[("nv_inference_request_success", m, v, "")]) == inf["success"]["count"], m
        failed = {r: int(got[("nv_inference_request_failure", m, v, r)]) for r in REASONS}
        assert sum(failed.values()) == inf["fail"]["count"], (m, failed)
        assert int(got[("nv_inference_count", m, v, "")]) == e["inference_count"], m
        assert int(got[("nv_inference_exec_count", m, v, "")]) == e["execution_count"], m
        for family, phase in DURATIONS.items():  # microseconds, exactly the statistics' ns / 1000
            assert Decimal(got[(family, m, v, "")]) == Decimal(inf[phase]["ns"]) / 1000, (family, m)
    # what the traffic was
    assert got[("nv_inference_request_success", "clf", "1", "")] == "7"  # 3 gRPC + 2 HTTP + 2 by the route
    assert got[("nv_inference_count", "clf", "1", "")] == "10"  # rows: 3 x 2 + 4 x 1
    assert {r: got[("nv_inference_request_failure", "clf", "1", r)] for r in REASONS} == {
        "REJECTED": "0",
        "CANCELED": "0",
        "BACKEND": "0",
        "OTHER": "2",  # the wrong shapes
    }
    assert got[("nv_inference_request_failure", "clf_bad", "1", "BACKEND")] == "2"  # the model failed, twice
    assert got[("nv_inference_request_failure", "clf_bad", "1", "OTHER")] == "0"
    assert got[("nv_inference_request_success", "front", "", "")] == "2"
    assert got[("nv_inference_request_failure", "front", "", "BACKEND")] == "1"
    assert got[("nv_inference_request_failure", "front", "", "OTHER")] == "0"
    assert got[("nv_inference_request_success", "rclf", "1", "")] == "1"  # the remote model
    assert float(got[("nv_inference_request_duration_us", "clf", "1", "")]) > 0
    assert 'model="no_such_model"' not in text  # a name from a request never becomes a label


def test_exposition_uses_tritons_names_types_and_labels(gw):
    text = scrape(gw.metrics_url)
    lines = text.splitlines()
    for name, kind in TYPES.items():
        assert f"# TYPE {name} {kind}" in lines, name
    for name, labels, _ in samples(text):
        assert name in TYPES, name  # no _total, _created, _sum or _count samples
        want = {"model", "version", "reason"} if name == "nv_inference_request_failure" else {"model", "version"}
        assert set(labels) == want, (name, labels)
    assert 'nv_inference_request_success{model="clf",version="1"} 7' in lines  # as Triton writes it
    assert not [ln for ln in lines if ln.startswith("nv_") and ("_total" in ln or "_created" in ln)]
    assert not [ln for ln in lines if re.match(r"# (TYPE|HELP) nv_\w*(_total|_created) ", ln)]
    parsed = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("nv_")}
    assert {n: f.type for n, f in parsed.items()} == TYPES
    reasons = {s.labels["reason"] for s in parsed["nv_inference_request_failure"].samples}
    assert reasons == REASONS  # every reason has its series, zero or not, as in Triton


def test_pending_request_count_is_each_versions_queue_depth(gw):
    text = scrape(gw.metrics_url)
    got = series(text)
    depth = {(lb["model"], lb["version"]): v for n, lb, v in samples(text, "batchgate_queue_depth")}
    pending = {(m, v): value for (n, m, v, _), value in got.items() if n == "nv_inference_pending_request_count"}
    assert set(pending) == {("clf", "1"), ("clf_bad", "1"), ("rclf", "1")}  # a route has no queue of its own
    assert {k: float(v) for k, v in pending.items()} == {k: float(depth[k]) for k in pending}
    assert set(pending.values()) == {"0"}  # idle


def test_process_metrics_are_exported(gw):
    lines = scrape(gw.metrics_url).splitlines()
    assert "# TYPE process_cpu_seconds_total counter" in lines
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert any(ln.startswith(name + " ") and float(ln.split(" ")[1]) > 0 for ln in lines), name
    assert any(ln.startswith("python_info{") for ln in lines)


def _request(port: int, method: str, path: str, headers: dict | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def test_the_metrics_port_answers_only_metrics(gw):
    port = gw.gateway.metrics_port
    ok, body = _request(port, "GET", "/metrics")
    assert ok.status == 200 and ok.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    assert b"nv_inference_request_success{" in body and b"batchgate_requests_total{" in body
    # (also "//metrics" and "/%6Detrics": the HTTP server had read both as /metrics)
    for path in (
        "/",
        "/metrics/",
        "/metricsx",
        "/favicon.ico",
        "/v2/health/ready",
        "/metrics/extra",
        "//metrics",
        "/%6Detrics",
    ):
        resp, body = _request(port, "GET", path)
        assert resp.status == 404, path
        assert b"nv_" not in body and b"batchgate_" not in body
    head, body = _request(port, "HEAD", "/metrics")
    assert head.status == 200 and body == b"" and int(head.getheader("Content-Length") or 0) > 0
    assert _request(port, "HEAD", "/nope")[0].status == 404
    post, _ = _request(port, "POST", "/metrics")
    assert post.status == 405 and post.getheader("Allow") == "GET, HEAD"
    zipped, body = _request(port, "GET", "/metrics", {"Accept-Encoding": "gzip"})
    assert zipped.status == 200 and zipped.getheader("Content-Encoding") == "gzip"
    assert b"# TYPE nv_inference_count counter" in gzip.decompress(body)
    # Accept-Encoding as RFC 9110 reads it: q=0 refuses a coding (until 2026-12-06 any mention of
    # gzip was taken for a request of it), and a preference for identity is kept.
    for refused in ("gzip;q=0", "gzip;q=0.0, identity", "identity, gzip;q=0.5", "deflate"):
        plain, body = _request(port, "GET", "/metrics", {"Accept-Encoding": refused})
        assert plain.getheader("Content-Encoding") is None and b"# TYPE nv_inference_count" in body, refused
    for asked in ("GZIP", "deflate;q=0.5, gzip", "identity;q=0.1, gzip;q=0.8"):
        zipped, body = _request(port, "GET", "/metrics", {"Accept-Encoding": asked})
        assert zipped.getheader("Content-Encoding") == "gzip" and gzip.decompress(body), asked
    # A scraper asking for OpenMetrics (as Prometheus does) still gets text format 0.0.4.
    om, body = _request(port, "GET", "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert (om.getheader("Content-Type") or "").startswith("text/plain; version=0.0.4")
    assert b"nv_inference_request_success{" in body and not body.rstrip().endswith(b"# EOF")


def test_triton_metrics_off_leaves_no_nv_families(serve, tmp_path):
    running = serve(_repo(tmp_path), triton_metrics=False)
    _infer(httpclient, running.http_url, "clf", FEATURES)
    text = scrape(running.metrics_url)
    assert [ln for ln in text.splitlines() if "nv_" in ln] == []
    assert 'batchgate_requests_total{model="clf",protocol="http",status="OK",version="1"} 1.0' in text
    assert "process_cpu_seconds_total " in text


def test_triton_metrics_setting_from_flag_environment_and_file(tmp_path):
    repo = str(tmp_path)
    assert load_settings(None, {"model_repository": repo}, environ={}).server.triton_metrics is True
    args = build_parser().parse_args(["serve", "--model-repository", repo, "--triton-metrics", "false"])
    assert load_settings(None, serve_flags(args), environ={}).server.triton_metrics is False
    env = {"BATCHGATE_TRITON_METRICS": "false"}
    assert load_settings(None, {"model_repository": repo}, environ=env).server.triton_metrics is False
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  triton_metrics: false\n")
    assert load_settings(str(cfg), {"model_repository": repo}, environ={}).server.triton_metrics is False


def _reasons(m: Metrics, model: str, version: str) -> dict[str, str]:
    got = series(m.exposition().decode())
    return {r: got[("nv_inference_request_failure", model, version, r)] for r in REASONS}


def test_reasons_follow_the_statistics_across_a_reload_and_add_up_across_processes():
    """A reloaded version's statistics start again, and so do its reasons; a route's statistics
    start again when its definition changes while its other figures go on. Snapshots of several
    processes add their failures up."""
    m = Metrics()
    mm = m.bind("m", "1")
    first = ModelStats("m", "1")
    mm.track(object(), first, lambda: 0, lambda: 0, lambda: 0.0)
    for status in ("INTERNAL", "CANCELLED", "INVALID_ARGUMENT"):
        first.record_request(False, 10)
        mm.request_done("grpc", status, 0.0)
    assert _reasons(m, "m", "1") == {"REJECTED": "0", "CANCELED": "1", "BACKEND": "1", "OTHER": "1"}
    second = ModelStats("m", "1")  # the reload
    mm.track(object(), second, lambda: 0, lambda: 0, lambda: 0.0)
    second.record_request(False, 10)
    mm.request_done("http", "RESOURCE_EXHAUSTED", 0.0)
    assert _reasons(m, "m", "1") == {"REJECTED": "1", "CANCELED": "0", "BACKEND": "0", "OTHER": "0"}

    route = ModelStats("r", "")
    m.route_stats = lambda: [route]
    rm = m.route("r")
    route.record_request(False, 5)
    rm.answered("a", "INTERNAL")
    assert _reasons(m, "r", "") == {"REJECTED": "0", "CANCELED": "0", "BACKEND": "1", "OTHER": "0"}
    route = ModelStats("r", "")  # the route redefined: new statistics, the same route figures
    route.record_request(False, 5)
    rm.answered("a", "CANCELLED")
    assert _reasons(m, "r", "") == {"REJECTED": "0", "CANCELED": "1", "BACKEND": "0", "OTHER": "0"}

    both = m.snapshot().merge(m.snapshot())
    assert both.failures[("m", "1")] == {"REJECTED": 2}
    assert both.stats[("m", "1")]["inference_stats"]["fail"]["count"] == 2
