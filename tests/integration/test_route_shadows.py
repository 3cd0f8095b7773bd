"""Shadows: copies compared with the primary's answer, dropped past their budget, failures kept
from the caller, disagreements sampled to a file. Real gateway, real clients, real models."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from batchgate.demo import _save
from gateway_support import start_gateway
from route_support import (
    FEATURES,
    POISON,
    infer_grpc,
    infer_http,
    labeller_model,
    metric,
    route_repository,
    sqrt_model,
    two_output_classifier,
    write_config,
)

COMPARE = {"output": "probabilities", "kind": "classification"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return route_repository(str(tmp_path_factory.mktemp("shadow_models")))


def _metrics(running) -> str:
    with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
        return r.read().decode()


def _wait_metric(running, name: str, want: float, timeout: float = 10.0, **labels) -> float:
    end = time.monotonic() + timeout
    while True:
        got = metric(_metrics(running), name, **labels)
        if got >= want or time.monotonic() > end:
            return got
        time.sleep(0.05)


def test_shadows_are_compared_and_disagreements_logged(repo, tmp_path):
    log_file = tmp_path / "disagreements.jsonl"
    routes = [
        {
            "name": "scored",
            "variants": [{"name": "main", "model": "clf_a", "weight": 100}],
            "shadows": [
                {"name": "same", "model": "clf_same", "percent": 100, "max_inflight": 64},
                {"name": "other", "model": "clf_other", "percent": 100, "max_inflight": 64},
            ],
            "compare": COMPARE,
        }
    ]
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        routes,
        routing={"disagreement_log_file": str(log_file), "disagreement_log_per_s": 1000},
    )
    running = start_gateway(repo, config_file=cfg)
    try:
        rng = np.random.default_rng(3)
        n = 40
        for i in range(n):
            feats = (rng.standard_normal((2, 4)) * 3).astype(np.float32)
            call = infer_http if i % 2 else infer_grpc
            result, params = call(running.http_url if i % 2 else running.grpc_url, "scored", feats)
            assert params == {"variant": "main"}  # the caller sees the primary only
        compared = "batchgate_shadow_requests_total"
        assert _wait_metric(running, compared, n, route="scored", shadow="same", outcome="compared") == n
        assert _wait_metric(running, compared, n, route="scored", shadow="other", outcome="compared") == n
        text = _metrics(running)
        assert metric(text, "batchgate_shadow_agreements_total", route="scored", shadow="same") == n
        assert metric(text, "batchgate_shadow_top1_flips_total", route="scored", shadow="same") == 0
        assert metric(text, "batchgate_shadow_rows_compared_total", route="scored", shadow="same") == 2 * n
        flips = metric(text, "batchgate_shadow_top1_flips_total", route="scored", shadow="other")
        agreed_other = metric(text, "batchgate_shadow_agreements_total", route="scored", shadow="other")
        assert flips > 0 and agreed_other < n  # a different model: some rows change class
        assert metric(text, "batchgate_shadow_abs_delta_count", route="scored", shadow="same") == 2 * n
        # a histogram with negative buckets has no _count (OpenMetrics): the +Inf bucket holds it
        delta = "batchgate_shadow_latency_delta_seconds_bucket"
        assert metric(text, delta, route="scored", shadow="other", le="+Inf") == n
    finally:
        running.stop()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert lines and {ln["shadow"] for ln in lines} == {"other"}
    assert len(lines) == n - agreed_other
    first = lines[0]
    assert first["route"] == "scored" and first["primary"]["model"] == "clf_a"
    assert first["inputs"][0]["name"] == "features" and first["inputs"][0]["shape"] == [2, 4]
    assert first["primary_output"]["shape"] == [2, 3] and first["shadow_output"]["shape"] == [2, 3]


def test_shadow_budget_drops_and_failures_never_reach_the_caller(repo, tmp_path):
    routes = [
        {
            "name": "guarded",
            "variants": [{"name": "main", "model": "clf_a", "weight": 100}],
            "shadows": [
                {"name": "slow", "model": "clf_slow", "percent": 100, "max_inflight": 1},
                {"name": "bad", "model": "clf_bad", "percent": 100, "max_inflight": 64},
            ],
            "compare": COMPARE,
        }
    ]
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), routes))
    try:
        client = grpcclient.InferenceServerClient(running.grpc_url)
        n = 30
        done = threading.Semaphore(0)
        errors: list = []

        def callback(result, error):
            if error is not None:
                errors.append(error)
            done.release()

        for _ in range(n):  # all at once: the slow shadow's budget of one is full at once
            inp = grpcclient.InferInput("features", [1, 4], "FP32")
            inp.set_data_from_numpy(POISON)  # the bad shadow fails on these; the primary does not
            client.async_infer("guarded", [inp], callback)
        for _ in range(n):
            assert done.acquire(timeout=30)
        assert errors == []
        total = "batchgate_shadow_requests_total"
        assert _wait_metric(running, total, n, route="guarded", shadow="bad", outcome="failed") == n
        text = _metrics(running)
        assert (
            metric(text, "batchgate_shadow_error_delta_total", route="guarded", shadow="bad", side="shadow_only") == n
        )
        dropped = metric(text, total, route="guarded", shadow="slow", outcome="dropped")
        assert dropped >= 1
        end = time.monotonic() + 10
        while time.monotonic() < end:
            text = _metrics(running)
            ran = metric(text, total, route="guarded", shadow="slow", outcome="compared")
            if ran + dropped >= n:
                break
            time.sleep(0.05)
        assert ran + dropped == n  # every copy is either run and compared, or dropped and counted
        # the shadow never ran on the primary's scheduler: the primary's model saw exactly n requests
        assert metric(text, "batchgate_requests_total", model="clf_a", status="OK") == n
        assert metric(text, "batchgate_requests_total", model="clf_bad") == 0
    finally:
        running.stop()


def test_shadow_percent_samples_copies(repo, tmp_path):
    routes = [
        {
            "name": "sampled",
            "variants": [{"name": "main", "model": "clf_a", "weight": 100}],
            "shadows": [{"name": "some", "model": "clf_same", "percent": 25, "max_inflight": 64}],
        }
    ]
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), routes))
    try:
        n = 400
        for _ in range(n):
            infer_grpc(running.grpc_url, "sampled")
        time.sleep(0.5)
        got = metric(_metrics(running), "batchgate_shadow_requests_total", route="sampled", outcome="answered")
        assert 0.15 * n < got < 0.35 * n  # 25% of 400: 100, binomial sd ~9
    finally:
        running.stop()


def test_synthetic_and_pinned_requests_are_shadowed_but_not_compared(repo, tmp_path):
    routes = [
        {
            "name": "quiet",
            "variants": [{"name": "main", "model": "clf_a", "weight": 100}],
            "shadows": [{"name": "other", "model": "clf_other", "percent": 100, "max_inflight": 64}],
            "compare": COMPARE,
        }
    ]
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), routes))
    try:
        for headers in ({"x-batchgate-synthetic": "1"}, {"x-batchgate-variant": "main"}) * 5:
            infer_grpc(running.grpc_url, "quiet", headers=headers)
        infer_http(running.http_url, "quiet")  # one ordinary request: compared
        total = "batchgate_shadow_requests_total"
        assert _wait_metric(running, total, 10, route="quiet", outcome="answered") == 10
        assert _wait_metric(running, total, 1, route="quiet", outcome="compared") == 1
        rows = metric(_metrics(running), "batchgate_shadow_rows_compared_total", route="quiet", shadow="other")
        assert rows == 1
    finally:
        running.stop()


def test_nan_answers_are_compared_as_values(tmp_path):
    """Two models that answer NaN at the same place agree; NaN on one side only disagrees as
    far as can be (+Inf bucket). Before, every NaN row disagreed, was counted in the smallest
    |delta| bucket, and the histogram's sum stayed NaN for good."""
    root = str(tmp_path / "models")
    for name, absolute in (("sq_a", False), ("sq_b", False), ("sq_abs", True)):
        _save(sqrt_model(absolute), root, name, config="max_batch_size: 8\n")
    routes = [
        {
            "name": name,
            "variants": [{"name": "main", "model": "sq_a", "weight": 100}],
            "shadows": [{"name": "s", "model": shadow, "percent": 100, "max_inflight": 64}],
            "compare": {"output": "y", "kind": "regression", "atol": 1e-3},
        }
        for name, shadow in (("same", "sq_b"), ("apart", "sq_abs"))
    ]
    running = start_gateway(root, config_file=write_config(str(tmp_path / "c.yaml"), routes))
    try:
        feats = np.array([[-1, 1, 4, 9], [1, 4, 9, 16]], np.float32)  # first row: a NaN answer
        n = 6
        for i in range(n):
            for route in ("same", "apart"):
                call = infer_http if i % 2 else infer_grpc
                result, _ = call(running.http_url if i % 2 else running.grpc_url, route, feats)
                assert np.isnan(result.as_numpy("y")[0, 0])
        total = "batchgate_shadow_requests_total"
        assert _wait_metric(running, total, n, route="same", outcome="compared") == n
        assert _wait_metric(running, total, n, route="apart", outcome="compared") == n
        text = _metrics(running)
        assert metric(text, "batchgate_shadow_agreements_total", route="same") == n
        assert metric(text, "batchgate_shadow_abs_delta_bucket", route="same", le="1e-06") == 2 * n
        assert metric(text, "batchgate_shadow_abs_delta_sum", route="same") == 0
        assert metric(text, "batchgate_shadow_agreements_total", route="apart") == 0
        # the NaN rows are the far ones; the others agree
        assert metric(text, "batchgate_shadow_abs_delta_bucket", route="apart", le="1e-06") == n
        assert metric(text, "batchgate_shadow_abs_delta_bucket", route="apart", le="100.0") == n
        assert metric(text, "batchgate_shadow_abs_delta_bucket", route="apart", le="+Inf") == 2 * n
    finally:
        running.stop()


def test_a_copy_that_fails_its_shadow_fails_alone_in_its_batch(repo, tmp_path):
    """Copies gathered into one run of the shadow: one copy whose values the shadow fails on
    fails that copy only, as a primary batch runs again request by request; the others are
    compared (each failed with it, counted failed and shadow_only: 37 of 40 with 20 bad)."""
    routes = [
        {
            "name": "mixed",
            "variants": [{"name": "main", "model": "clf_a", "weight": 100}],
            "shadows": [{"name": "bad", "model": "clf_bad", "percent": 100, "max_inflight": 64}],
            "compare": COMPARE,
        }
    ]
    # copies wait up to a second for others: a full batch (8 rows) goes out as one run
    cfg = write_config(str(tmp_path / "c.yaml"), routes, routing={"shadow_gather_ms": 1000})
    running = start_gateway(repo, config_file=cfg)
    try:
        n = 16
        for i in range(n):  # every other request carries values the shadow fails on
            infer_grpc(running.grpc_url, "mixed", POISON if i % 2 else FEATURES)
        total = "batchgate_shadow_requests_total"
        end = time.monotonic() + 30
        while time.monotonic() < end:
            text = _metrics(running)
            failed = metric(text, total, route="mixed", shadow="bad", outcome="failed")
            compared = metric(text, total, route="mixed", shadow="bad", outcome="compared")
            if failed + compared >= n:
                break
            time.sleep(0.05)
        assert (failed, compared) == (n // 2, n // 2)
        assert metric(text, "batchgate_shadow_agreements_total", route="mixed", shadow="bad") == n // 2
        assert metric(text, "batchgate_shadow_error_delta_total", route="mixed", shadow="bad", side="shadow_only") == (
            n // 2
        )
    finally:
        running.stop()


def test_a_text_label_that_changes_is_a_top1_flip(tmp_path):
    """A classifier that answers its class as text (BYTES, one value a row) compared as a
    classification: a row whose label changed is a top-1 flip, as a numeric label's is (the
    flips counter stayed 0 while every such row disagreed)."""
    root = str(tmp_path / "models")
    _save(labeller_model(("cat", "dog", "eel")), root, "names_a", config="max_batch_size: 8\n")
    _save(labeller_model(("cat", "dog", "fox")), root, "names_b", config="max_batch_size: 8\n")
    routes = [
        {
            "name": "named",
            "variants": [{"name": "main", "model": "names_a", "weight": 100}],
            "shadows": [{"name": "s", "model": "names_b", "percent": 100, "max_inflight": 64}],
            "compare": {"output": "label", "kind": "classification"},
        }
    ]
    running = start_gateway(root, config_file=write_config(str(tmp_path / "c.yaml"), routes))
    try:
        flipped = np.array([[0, 0, 1, 0], [1, 0, 0, 0]], np.float32)  # eel / fox, then cat / cat
        same = np.array([[0, 1, 0, 0]], np.float32)  # dog / dog
        result, _ = infer_grpc(running.grpc_url, "named", flipped)
        assert result.as_numpy("label").tolist() == [b"eel", b"cat"]
        infer_http(running.http_url, "named", same)
        assert _wait_metric(running, "batchgate_shadow_requests_total", 2, route="named", outcome="compared") == 2
        text = _metrics(running)
        assert metric(text, "batchgate_shadow_agreements_total", route="named") == 1
        assert metric(text, "batchgate_shadow_rows_compared_total", route="named") == 3
        assert metric(text, "batchgate_shadow_top1_flips_total", route="named") == 1
    finally:
        running.stop()


def test_a_client_that_asks_for_other_outputs_is_still_compared(tmp_path):
    """A client that asks for some outputs only (Triton's requested outputs), not the compared
    one: the primary computes the compared output too, for the comparison, and answers only what
    was asked. Before, the copy ran on the shadow and nothing was compared ('answered')."""
    root = str(tmp_path / "models")
    _save(two_output_classifier(seed=0), root, "two_a", config="max_batch_size: 8\n")
    _save(two_output_classifier(seed=0), root, "two_b", config="max_batch_size: 8\n")
    routes = [
        {
            "name": "picky",
            "variants": [{"name": "main", "model": "two_a", "weight": 100}],
            "shadows": [{"name": "s", "model": "two_b", "percent": 100, "max_inflight": 64}],
            "compare": COMPARE,
        }
    ]
    running = start_gateway(root, config_file=write_config(str(tmp_path / "c.yaml"), routes))
    try:
        n = 6
        for i in range(n):
            if i % 2:
                client = httpclient.InferenceServerClient(running.http_url)
                inp, out = httpclient.InferInput("features", [1, 4], "FP32"), httpclient.InferRequestedOutput("logits")
            else:
                client = grpcclient.InferenceServerClient(running.grpc_url)
                inp, out = grpcclient.InferInput("features", [1, 4], "FP32"), grpcclient.InferRequestedOutput("logits")
            inp.set_data_from_numpy(FEATURES)
            result = client.infer("picky", [inp], outputs=[out])
            assert result.as_numpy("logits").shape == (1, 3)
            assert result.as_numpy("probabilities") is None  # only what was asked for
        total = "batchgate_shadow_requests_total"
        assert _wait_metric(running, total, n, route="picky", outcome="compared") == n
        assert metric(_metrics(running), "batchgate_shadow_agreements_total", route="picky") == n
    finally:
        running.stop()
