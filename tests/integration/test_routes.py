"""Routes served as V2 models: variants, pins, sticky cohorts, answers that name the variant,
metadata / ready / config / stats, and routes refused at start. Real gateway, real tritonclient
clients over both protocols, real ONNX models (tests/route_support.py)."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.config import ConfigError
from gateway_support import start_gateway
from route_support import FEATURES, infer_grpc, infer_http, route_repository, write_config

ROUTES = [
    {
        "name": "fraud",
        "variants": [
            {"name": "stable", "model": "clf_a", "version": "1", "weight": 50},
            {"name": "canary", "model": "clf_other", "weight": 50},
        ],
        "sticky_key": "header:x-user-id",
    },
    {
        "name": "by_param",
        "variants": [
            {"name": "one", "model": "clf_a", "weight": 50},
            {"name": "two", "model": "clf_other", "weight": 50},
        ],
        "sticky_key": "param:user",
    },
    {
        "name": "all_a",
        "variants": [
            {"name": "a", "model": "clf_a", "weight": 100},
            {"name": "idle", "model": "clf_other", "weight": 0},
        ],
    },
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return route_repository(str(tmp_path_factory.mktemp("route_models")))


@pytest.fixture(scope="module")
def routed(repo, tmp_path_factory):
    cfg = write_config(str(tmp_path_factory.mktemp("route_cfg") / "config.yaml"), ROUTES)
    running = start_gateway(repo, config_file=cfg)
    yield running
    running.stop()


def _variant_of(running, user: str, protocol: str) -> str:
    headers = {"x-user-id": user}
    if protocol == "http":
        _, params = infer_http(running.http_url, "fraud", headers=headers)
    else:
        _, params = infer_grpc(running.grpc_url, "fraud", headers=headers)
    return params["variant"]


def test_answer_names_the_variant_both_protocols(routed):
    for call, url in ((infer_http, routed.http_url), (infer_grpc, routed.grpc_url)):
        result, params = call(url, "all_a")
        assert params == {"variant": "a"}
        resp = result.get_response()
        name = resp["model_name"] if isinstance(resp, dict) else resp.model_name
        version = resp["model_version"] if isinstance(resp, dict) else resp.model_version
        assert (name, version) == ("clf_a", "1")  # the variant's model answers, under its own name
        assert result.as_numpy("probabilities").shape == (1, 3)


def test_http_answer_carries_the_variant_header(routed):
    body = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [0.1] * 4}]})
    conn = http.client.HTTPConnection("127.0.0.1", routed.gateway.http_port, timeout=10)
    conn.request("POST", "/v2/models/all_a/infer", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    assert resp.status == 200, payload
    assert resp.getheader("x-batchgate-variant") == "a"
    assert payload["parameters"] == {"variant": "a"}


def test_sticky_header_keeps_a_user_on_one_variant_across_protocols(routed):
    seen = {}
    for i in range(40):
        user = f"user-{i}"
        seen[user] = _variant_of(routed, user, "http")
        for _ in range(2):
            assert _variant_of(routed, user, "grpc") == seen[user]
    # 50/50 weights: both variants own some of these users
    assert set(seen.values()) == {"stable", "canary"}


def test_param_sticky_key_chooses_after_decoding(routed):
    got = {}
    for i in range(30):
        _, p1 = infer_http(routed.http_url, "by_param", parameters={"user": f"u{i}"})
        _, p2 = infer_grpc(routed.grpc_url, "by_param", parameters={"user": f"u{i}"})
        assert p1 == p2
        got[i] = p1["variant"]
    assert set(got.values()) == {"one", "two"}


def test_pins_by_header_and_parameter(routed):
    for call, url in ((infer_http, routed.http_url), (infer_grpc, routed.grpc_url)):
        for _ in range(5):
            assert call(url, "fraud", headers={"x-batchgate-variant": "canary"})[1]["variant"] == "canary"
            assert call(url, "fraud", parameters={"variant": "stable"})[1]["variant"] == "stable"
        # a weight-0 variant still answers a pin (testing a variant before it takes traffic)
        assert call(url, "all_a", headers={"x-batchgate-variant": "idle"})[1]["variant"] == "idle"


def test_a_header_and_a_parameter_pinning_different_variants_are_a_client_error(routed):
    """Review finding: the header's pin was served and the parameter's dropped, silently."""
    for call, url in ((infer_http, routed.http_url), (infer_grpc, routed.grpc_url)):
        with pytest.raises(InferenceServerException) as e:
            call(url, "fraud", headers={"x-batchgate-variant": "canary"}, parameters={"variant": "stable"})
        assert str(e.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), e.value
        assert "header pins 'canary'" in str(e.value) and "'stable'" in str(e.value)
        both = call(url, "fraud", headers={"x-batchgate-variant": "canary"}, parameters={"variant": "canary"})
        assert both[1]["variant"] == "canary"  # the same pin twice is fine


def test_unknown_pin_is_a_client_error_naming_the_variants(routed):
    with pytest.raises(InferenceServerException) as e:
        infer_http(routed.http_url, "fraud", headers={"x-batchgate-variant": "n" * 5000})
    assert "400" in str(e.value.status()) and "has no variant" in str(e.value) and "stable, canary" in str(e.value)
    assert len(str(e.value)) < 400  # the client's value is cut, not echoed whole
    with pytest.raises(InferenceServerException) as e:
        infer_grpc(routed.grpc_url, "fraud", parameters={"variant": "nope"})
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_route_metadata_ready_config_stats(routed):
    h = httpclient.InferenceServerClient(routed.http_url)
    g = grpcclient.InferenceServerClient(routed.grpc_url)
    assert h.is_model_ready("fraud") and g.is_model_ready("fraud")
    meta = h.get_model_metadata("fraud")
    assert meta["name"] == "fraud" and meta["inputs"][0]["name"] == "features"
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}
    gmeta = g.get_model_metadata("fraud")
    assert gmeta.name == "fraud" and gmeta.inputs[0].name == "features"
    assert h.get_model_config("fraud")["name"] == "fraud"
    assert g.get_model_config("fraud").config.name == "fraud"
    before = h.get_inference_statistics("all_a")["model_stats"][0]["inference_stats"]["success"]["count"]
    infer_grpc(routed.grpc_url, "all_a")
    after = g.get_inference_statistics("all_a").model_stats[0]
    assert after.name == "all_a" and after.inference_stats.success.count == before + 1
    names = {m["name"] for m in h.get_model_repository_index()}
    assert {"fraud", "by_param", "all_a", "clf_a"} <= names
    # a route has no versions
    with pytest.raises(InferenceServerException) as e:
        h.infer("fraud", [_http_input()], model_version="1")
    assert "no versions" in str(e.value)


def _http_input():
    inp = httpclient.InferInput("features", [1, 4], "FP32")
    inp.set_data_from_numpy(FEATURES)
    return inp


def test_route_counts_by_variant_in_metrics(routed):
    infer_http(routed.http_url, "all_a")
    text = _metrics(routed)
    assert 'batchgate_route_requests_total{route="all_a",status="OK",variant="a"}' in text
    assert 'batchgate_route_weight{route="fraud",variant="canary"} 50.0' in text
    assert 'batchgate_rollout_state{route="fraud"} 0.0' in text


def _metrics(running) -> str:
    import urllib.request

    with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
        return r.read().decode()


def test_batched_rows_answer_through_a_route(routed):
    feats = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    direct, _ = infer_grpc(routed.grpc_url, "clf_a", feats)
    via, params = infer_grpc(routed.grpc_url, "all_a", feats)
    assert params["variant"] == "a"
    np.testing.assert_allclose(via.as_numpy("probabilities"), direct.as_numpy("probabilities"))


@pytest.mark.parametrize(
    "routes, words",
    [
        (
            [{"name": "r", "variants": [{"name": "a", "model": "clf_a", "weight": 1}, {"name": "m", "model": "mlp"}]}],
            ["variant 'm' (mlp) has no input 'features'"],
        ),
        ([{"name": "r", "variants": [{"name": "a", "model": "ghost", "weight": 1}]}], ["model 'ghost'", "not in"]),
        ([{"name": "clf_a", "variants": [{"name": "a", "model": "clf_a", "weight": 1}]}], ["a model has that name"]),
        (
            [
                {
                    "name": "r",
                    "variants": [{"name": "a", "model": "clf_a", "weight": 1}],
                    "shadows": [{"name": "s", "model": "strings"}],
                }
            ],
            ["shadow 's' (strings) has no input 'features'"],
        ),
    ],
)
def test_routes_that_cannot_work_are_refused_at_start(repo, tmp_path, routes, words):
    cfg = write_config(str(tmp_path / "c.yaml"), routes)
    with pytest.raises(ConfigError) as e:
        start_gateway(repo, config_file=cfg)
    for w in words:
        assert w in str(e.value)


def test_sticky_cohorts_survive_a_restart(repo, tmp_path):
    cfg = write_config(str(tmp_path / "c.yaml"), ROUTES[:1])
    users = [f"person-{i}" for i in range(30)]
    first = start_gateway(repo, config_file=cfg)
    try:
        before = {u: _variant_of(first, u, "grpc") for u in users}
    finally:
        first.stop()
    second = start_gateway(repo, config_file=cfg)
    try:
        after = {u: _variant_of(second, u, "http") for u in users}
    finally:
        second.stop()
    assert before == after


def test_a_route_over_a_grpc_stream(routed):
    import queue

    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(routed.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(6):
            inp = grpcclient.InferInput("features", [1, 4], "FP32")
            inp.set_data_from_numpy(FEATURES)
            pin = "canary" if i % 2 else "stable"
            client.async_stream_infer("fraud", [inp], request_id=str(i), parameters={"variant": pin})
        got = {}
        for _ in range(6):
            result, error = answers.get(timeout=30)
            assert error is None
            resp = result.get_response()
            got[resp.id] = resp.parameters["variant"].string_param
    finally:
        client.stop_stream()
    assert got == {str(i): "canary" if i % 2 else "stable" for i in range(6)}
