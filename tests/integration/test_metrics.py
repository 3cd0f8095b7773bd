"""Prometheus metrics move as requests are served, with the names the README lists."""

from __future__ import annotations

import gc
import os
import re
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.demo import _save, classifier_model

README_METRICS = [
    "batchgate_requests_total",
    "batchgate_request_duration_seconds",
    "batchgate_queue_duration_seconds",
    "batchgate_compute_duration_seconds",
    "batchgate_inference_count_total",
    "batchgate_execution_count_total",
    "batchgate_queue_depth",
    "batchgate_inflight_requests",
    "batchgate_model_ready",
    "batchgate_model_load_duration_seconds",
    "batchgate_model_load_failures_total",
    "batchgate_queue_oldest_age_seconds",
    "batchgate_batch_size",
    "batchgate_refusals_total",
    "batchgate_event_loop_lag_seconds",
    "batchgate_gc_pause_seconds",
]
# exported once a remote model is loaded (tests/integration/test_remote_backend.py)
README_UPSTREAM_METRICS = [
    "batchgate_upstream_requests_total",
    "batchgate_upstream_errors_total",
    "batchgate_upstream_request_duration_seconds",
    "batchgate_upstream_ejections_total",
    "batchgate_upstream_outstanding",
    "batchgate_upstream_healthy",
]


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def sample(metrics: dict, name: str, **labels) -> float:
    want = {k: str(v) for k, v in labels.items()}
    for key, value in metrics.items():
        m = re.fullmatch(r"([a-zA-Z_:]+)\{(.*)\}", key)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if got == want:
            return value
    raise KeyError(f"{name}{want} not exported")


@pytest.fixture
def running(tmp_path, serve):
    _save(classifier_model(), str(tmp_path), "clf")
    return serve(str(tmp_path))


def test_request_counters_histograms_and_gauges(running):
    x = np.ones((3, 4), np.float32)
    for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
        c = mod.InferenceServerClient(url)
        for _ in range(4):
            inp = mod.InferInput("features", [3, 4], "FP32")
            inp.set_data_from_numpy(x)
            c.infer("clf", [inp])
        bad = mod.InferInput("features", [3, 2], "FP32")
        bad.set_data_from_numpy(np.ones((3, 2), np.float32))
        with pytest.raises(InferenceServerException):
            c.infer("clf", [bad])
    m = scrape(running.metrics_url)
    for proto in ("grpc", "http"):
        assert sample(m, "batchgate_requests_total", model="clf", version=1, protocol=proto, status="OK") == 4
        assert (
            sample(m, "batchgate_requests_total", model="clf", version=1, protocol=proto, status="INVALID_ARGUMENT")
            == 1
        )
        assert sample(m, "batchgate_request_duration_seconds_count", model="clf", version=1, protocol=proto) == 5
    assert sample(m, "batchgate_inference_count_total", model="clf", version=1) == 24  # 8 requests x 3 rows
    assert sample(m, "batchgate_execution_count_total", model="clf", version=1) == 8
    assert sample(m, "batchgate_queue_duration_seconds_count", model="clf", version=1) == 8
    assert sample(m, "batchgate_compute_duration_seconds_count", model="clf", version=1) == 8
    assert sample(m, "batchgate_queue_depth", model="clf", version=1) == 0
    assert sample(m, "batchgate_inflight_requests", model="clf", version=1) == 0
    assert sample(m, "batchgate_model_ready", model="clf", version=1) == 1
    assert sample(m, "batchgate_model_load_duration_seconds", model="clf", version=1) > 0


def test_every_metric_the_readme_lists_is_exported(running):
    text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    families = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    exported = set()
    for f in families:
        exported |= {f, f + "_total"}
    missing = [n for n in README_METRICS if n not in exported]
    assert missing == []
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert [n for n in README_METRICS + README_UPSTREAM_METRICS if n not in readme] == []


def test_the_event_loops_lateness_and_the_collectors_pauses_are_measured(running):
    """A stall of the gateway's event loop shows in batchgate_event_loop_lag_seconds (its timer
    runs late by about the stall), and a full collection in batchgate_gc_pause_seconds."""

    def late_timers(m: dict) -> float:  # timers that ran more than 250 ms late
        return m["batchgate_event_loop_lag_seconds_count"] - m['batchgate_event_loop_lag_seconds_bucket{le="0.25"}']

    before = scrape(running.metrics_url)
    running.loop.call_soon_threadsafe(time.sleep, 0.6)  # the loop stalls 600 ms
    gc.collect()  # a full collection, timed whichever thread runs it
    deadline = time.monotonic() + 10
    while True:
        m = scrape(running.metrics_url)
        late = late_timers(m) - late_timers(before)
        if late >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert late >= 1  # one more timer ran more than 250 ms late (500-600 ms)
    full = sample(m, "batchgate_gc_pause_seconds_count", generation=2)
    assert full >= sample(before, "batchgate_gc_pause_seconds_count", generation=2) + 1
    assert sample(m, "batchgate_gc_pause_seconds_bucket", generation=2, le="+Inf") == full


@pytest.mark.parametrize(("ms", "le"), [(300, "0.3"), (13.1, "0.0131")])
def test_a_latency_objective_becomes_a_bucket_boundary(tmp_path, serve, ms, le):
    """observability.latency_slo_ms adds its threshold to the request-duration buckets (a latency
    SLO counts the requests under it from that bucket); the other histograms keep theirs. The
    boundary is the threshold's decimal in seconds, as the chart's SLO rule writes its le: 13.1 ms
    was 13.1 / 1000 = 0.013099999999999999, a bucket the rule's le="0.0131" never matched."""
    _save(classifier_model(), str(tmp_path), "clf")
    running = serve(str(tmp_path), latency_slo_ms=ms)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("features", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    c.infer("clf", [inp])
    m = scrape(running.metrics_url)
    under = sample(m, "batchgate_request_duration_seconds_bucket", model="clf", version=1, protocol="grpc", le=le)
    assert under == 1 or ms < 100  # (13.1 ms: a busy machine may take longer; the bucket is there)
    les = {re.search(r'le="([^"]+)"', k).group(1) for k in m if k.startswith("batchgate_queue_duration_seconds_bucket")}
    assert le not in les and "0.25" in les
