"""The load-test harness's accounting, run for real against the scripted test server: what
enters the latency histograms, what a Ctrl-C keeps, and how a generator that falls behind is
reported."""

from __future__ import annotations

import json

import pytest
from test_loadtest import loadtest, step, testserver  # noqa: F401 - testserver is a fixture


def _good_and_bad(path) -> None:
    """Requests in turn: one the test server answers, one it refuses at once (wrong shape)."""
    good = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    bad = {"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")


@pytest.mark.serial
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_fast_refusal_is_counted_as_an_error_and_not_as_a_latency(tmp_path, testserver, protocol):  # noqa: F811
    # Every answer takes the 50 ms service time; every refusal comes back at once. Half the
    # requests are refused: had they entered the histograms, the p50 would be a refusal's.
    srv = testserver("--service-ms", "50", "--workers", "8")
    data = tmp_path / "mixed.jsonl"
    _good_and_bad(data)
    done, doc = loadtest(
        tmp_path / "out",
        srv.grpc if protocol == "grpc" else srv.http,
        "--protocol",
        protocol,
        "--model",
        "echo",
        "--data",
        str(data),
        "--rate",
        "20",
        "--duration",
        "1",
        "--warmup",
        "0",
    )
    s = step(doc)
    refused = {"grpc": "INVALID_ARGUMENT", "http": "400"}[protocol]
    assert s["ok"] == 10 and s["errors"] == {refused: 10}, (s["ok"], s["errors"])
    assert s["samples"] == s["ok"], s["samples"]  # the answers only
    assert s["corrected_ms"]["p50"] >= 50 and s["uncorrected_ms"]["p50"] >= 50, s["corrected_ms"]
    assert done.returncode == 0, done.stderr  # no SLO given, and requests were answered
