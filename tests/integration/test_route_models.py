"""Routes over the kinds of models a user brings: a remote model as a variant and as a shadow,
a BYTES input as the sticky key, and a variant's model unloaded under the route."""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.remote_models import RemoteModel
from fake_upstream import FakeUpstream
from gateway_support import start_gateway
from route_support import infer_grpc, infer_http, metric, route_repository, write_config


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return route_repository(str(tmp_path_factory.mktemp("route_kinds")))


def _metrics(running) -> str:
    with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
        return r.read().decode()


def _outcomes(text: str, route: str) -> dict[str, float]:
    """Every outcome counted for the shadow copies of ``route``."""
    found = {}
    for m in re.finditer(r"^batchgate_shadow_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("route") == route:
            found[labels["outcome"]] = found.get(labels["outcome"], 0) + float(m.group(2))
    return found


@pytest.mark.parametrize("senders", [2, 0], ids=["sender-threads", "event-loop"])
def test_remote_models_as_variant_and_shadow(repo, tmp_path, senders):
    upstream = start_gateway(repo)
    try:
        remote = f"name=clf_remote upstreams={upstream.grpc_url} upstream_model=clf_a batching=passthrough"
        routes = [
            {
                "name": "mixed",
                "variants": [
                    {"name": "here", "model": "clf_a", "weight": 50},
                    {"name": "there", "model": "clf_remote", "weight": 50},
                ],
                "shadows": [{"name": "mirror", "model": "clf_remote", "percent": 100, "max_inflight": 64}],
                "compare": {"output": "probabilities", "kind": "regression", "atol": 1e-5},
            }
        ]
        # no gathering: a copy starts once no primary request is in flight (gathering: see
        # test_shadow_copies_gather_into_few_calls)
        cfg = write_config(
            str(tmp_path / "c.yaml"),
            routes,
            remote_models=[remote],
            routing={"shadow_gather_ms": 0, "shadow_send_threads": senders},
        )
        running = start_gateway(repo, config_file=cfg)
        try:
            feats = np.random.default_rng(1).random((3, 4), dtype=np.float32)
            seen: list[str] = []
            for _ in range(20):
                result, params = infer_grpc(running.grpc_url, "mixed", feats)
                seen.append(params["variant"])
                model = result.get_response().model_name
                assert model == {"here": "clf_a", "there": "clf_remote"}[params["variant"]]
            assert set(seen) == {"here", "there"}
            # the shadow runs the model of variant 'there': only the answers of 'here' get a copy
            # (a model compared with itself would always agree)
            here = seen.count("here")
            end = time.monotonic() + 10
            while time.monotonic() < end:
                text = _metrics(running)
                if metric(text, "batchgate_shadow_requests_total", route="mixed", outcome="compared") == here:
                    break
                time.sleep(0.05)
            # the same model over the wire: every row agrees
            assert metric(text, "batchgate_shadow_requests_total", route="mixed", outcome="compared") == here
            assert metric(text, "batchgate_shadow_agreements_total", route="mixed", shadow="mirror") == here
            # copies that wait for idle time go out together: fewer upstream calls than copies
            up_before = _metrics(upstream)
            client = grpcclient.InferenceServerClient(running.grpc_url)
            done = threading.Semaphore(0)
            n = 40
            for _ in range(n):  # pinned to the local variant: only the shadow calls the upstream
                inp = grpcclient.InferInput("features", [3, 4], "FP32")
                inp.set_data_from_numpy(feats)
                client.async_infer(
                    "mixed", [inp], lambda result, error: done.release(), headers={"x-batchgate-variant": "here"}
                )
            for _ in range(n):
                assert done.acquire(timeout=30)
            end = time.monotonic() + 30  # (as in _sequential_copies: copies wait for idle time)
            while time.monotonic() < end:
                text = _metrics(running)
                if metric(text, "batchgate_shadow_requests_total", route="mixed", outcome="answered") == n:
                    break
                time.sleep(0.05)
            answered = metric(text, "batchgate_shadow_requests_total", route="mixed", outcome="answered")
            inflight = running.gateway.dataplane.admission.inflight  # (shadow work waits while it is above 0)
            assert answered == n, f"{n} pinned: outcomes {_outcomes(text, 'mixed')}, in flight {inflight}"
            up_after = _metrics(upstream)
            calls = sum(
                metric(up_after, "batchgate_requests_total", model="clf_a", status="OK", protocol=p)
                - metric(up_before, "batchgate_requests_total", model="clf_a", status="OK", protocol=p)
                for p in ("grpc",)
            )
            rows = metric(up_after, "batchgate_inference_count_total", model="clf_a") - metric(
                up_before, "batchgate_inference_count_total", model="clf_a"
            )
            assert rows == 3 * n and calls < n
            # ... but without gathering, copies of requests that come one after another go one by one
            assert _sequential_copies(running, upstream, "mixed", feats, 10, pin=True) >= 8
        finally:
            running.stop()
    finally:
        upstream.stop()


def _sequential_copies(running, upstream, route: str, feats: np.ndarray, n: int, pin: bool) -> float:
    """Upstream calls made by the shadow for ``n`` requests sent one after another (``pin``: each
    pinned to the local variant, so only the shadow calls the upstream; such copies are answered,
    not compared)."""
    outcome = "answered" if pin else "compared"
    before = _metrics(upstream)
    start = _outcomes(_metrics(running), route)
    for _ in range(n):
        infer_grpc(running.grpc_url, route, feats, headers={"x-batchgate-variant": "here"} if pin else None)
    # (shadow senders run at SCHED_IDLE: on a machine busy with other work their copies wait for it)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        now = _outcomes(_metrics(running), route)
        if sum(now.values()) >= sum(start.values()) + n:
            break
        time.sleep(0.05)
    got = {k: v - start.get(k, 0) for k, v in now.items() if v != start.get(k, 0)}
    assert got == {outcome: n}, f"outcomes of {n} copies on {route}: {got}"
    after = _metrics(upstream)
    return metric(after, "batchgate_requests_total", model="clf_a", status="OK", protocol="grpc") - metric(
        before, "batchgate_requests_total", model="clf_a", status="OK", protocol="grpc"
    )


def test_shadow_copies_gather_into_few_calls(repo, tmp_path, caplog):
    """With shadow_gather_ms, copies of requests that come one after another wait for each other
    and go to the upstream together: far fewer calls than copies, every copy still compared.
    A failed copy's reason is logged (a WARNING a second at most)."""
    upstream = start_gateway(repo)
    try:
        remote = f"name=clf_remote upstreams={upstream.grpc_url} upstream_model=clf_a batching=passthrough"
        routes = [
            {
                "name": "gathered",
                "variants": [{"name": "here", "model": "clf_a", "weight": 100}],
                "shadows": [{"name": "mirror", "model": "clf_remote", "percent": 100, "max_inflight": 64}],
                "compare": {"output": "probabilities", "kind": "regression", "atol": 1e-5},
            },
            {  # half its budget waiting starts them at once
                "name": "small_budget",
                "variants": [{"name": "here", "model": "clf_a", "weight": 100}],
                "shadows": [{"name": "mirror", "model": "clf_remote", "percent": 100, "max_inflight": 4}],
                "compare": {"output": "probabilities", "kind": "regression", "atol": 1e-5},
            },
        ]
        cfg = write_config(str(tmp_path / "c.yaml"), routes, remote_models=[remote], routing={"shadow_gather_ms": 1000})
        running = start_gateway(repo, config_file=cfg)
        try:
            feats = np.random.default_rng(2).random((2, 4), dtype=np.float32)
            assert _sequential_copies(running, upstream, "gathered", feats, 10, pin=False) <= 3
            text = _metrics(running)
            assert metric(text, "batchgate_shadow_agreements_total", route="gathered", shadow="mirror") == 10
            # two copies (half the budget of 4) start together at once, without waiting out the
            # gathering time; a pair answered before the next comes, none is dropped (unpaced, a
            # machine busy elsewhere starves the SCHED_IDLE senders and the budget rightly drops)
            calls = sum(_sequential_copies(running, upstream, "small_budget", feats, 2, pin=False) for _ in range(5))
            assert 5 <= calls <= 7
            # the upstream gone: the primary still answers; the copies fail, counted, never answered
            upstream.stop()
            for _ in range(5):
                result, _ = infer_grpc(running.grpc_url, "gathered", feats)
                assert result.as_numpy("probabilities").shape == (2, 3)
            end = time.monotonic() + 15
            while time.monotonic() < end:
                text = _metrics(running)
                if metric(text, "batchgate_shadow_requests_total", route="gathered", outcome="failed") == 5:
                    break
                time.sleep(0.1)
            assert metric(text, "batchgate_shadow_requests_total", route="gathered", outcome="failed") == 5
            assert metric(text, "batchgate_shadow_error_delta_total", route="gathered", side="shadow_only") == 5
            said = [r.getMessage() for r in caplog.records if "a copy failed" in r.getMessage()]
            assert said and all(m.startswith("shadow mirror of route gathered (model clf_remote)") for m in said), said
            assert len(said) <= 2  # five failures within a second or two: one line each second at most
        finally:
            running.stop()
    finally:
        upstream.stop()


def test_a_bytes_input_keys_the_cohort(repo, tmp_path):
    routes = [
        {
            "name": "texts",
            "variants": [
                {"name": "a", "model": "strings", "weight": 50},
                {"name": "b", "model": "strings_b", "weight": 50},
            ],
            "sticky_key": "input:INPUT",
        }
    ]
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), routes))
    try:
        client = httpclient.InferenceServerClient(running.http_url)

        def variant(first: str, second: str) -> str:
            data = np.array([[first.encode(), b"x"], [second.encode(), b"y"]], dtype=object)
            inp = httpclient.InferInput("INPUT", [2, 2], "BYTES")
            inp.set_data_from_numpy(data)
            result = client.infer("texts", [inp])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT"), data)
            return result.get_response()["parameters"]["variant"]

        users = {f"user-{i}": variant(f"user-{i}", "other") for i in range(30)}
        assert set(users.values()) == {"a", "b"}
        for user, v in users.items():  # only the first row keys the cohort
            assert variant(user, f"{user}-second-row") == v
    finally:
        running.stop()


def test_unloading_a_variants_model_makes_the_route_unready(repo, tmp_path):
    routes = [
        {
            "name": "r",
            "variants": [
                {"name": "a", "model": "clf_a", "weight": 50},
                {"name": "b", "model": "clf_same", "weight": 50},
            ],
        }
    ]
    running = start_gateway(
        repo,
        config_file=write_config(str(tmp_path / "c.yaml"), routes),
        model_control_mode="explicit",
        load_model=("clf_a", "clf_same"),
    )
    try:
        g = grpcclient.InferenceServerClient(running.grpc_url)
        assert g.is_model_ready("r")
        g.unload_model("clf_same")
        assert not g.is_model_ready("r")
        index = {
            row["name"]: row for row in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()
        }
        assert index["r"]["state"] == "UNAVAILABLE" and "clf_same" in index["r"]["reason"]
        # requests for the other variant still answer; those for the unloaded one say why
        errors, answered = [], set()
        for _ in range(30):
            try:
                answered.add(infer_http(running.http_url, "r")[1]["variant"])
            except InferenceServerException as e:
                errors.append(str(e))
        assert answered == {"a"} and errors and all("variant 'b'" in e and "clf_same" in e for e in errors)
        g.load_model("clf_same")
        assert g.is_model_ready("r")
        assert {infer_grpc(running.grpc_url, "r", headers={"x-batchgate-variant": "b"})[1]["variant"]} == {"b"}
    finally:
        running.stop()


@pytest.mark.parametrize("senders", [2, 0], ids=["sender-threads", "event-loop"])
def test_remote_shadows_get_the_callers_parameters_and_each_step_of_a_sequence_alone(tmp_path, senders):
    """A remote shadow's upstream is sent the request's parameters, as a remote variant's is
    (Triton's sequence_id, a Python model's own); copies share a call only with copies of the
    same parameters, and never for a sequence-batching upstream. Before, every copy went without
    parameters and the steps of a sequence went together as one batch."""
    upstream = FakeUpstream()
    try:
        remote = [
            RemoteModel("fk_main", (upstream.address,), upstream_model="fk", batching="passthrough"),
            RemoteModel("fk_shadow", (upstream.address,), upstream_model="typed"),
            RemoteModel("seq_shadow", (upstream.address,), upstream_model="seq"),
        ]
        routes = [
            {
                "name": "steps",
                "variants": [{"name": "main", "model": "fk_main", "weight": 100}],
                "shadows": [
                    {"name": "plain", "model": "fk_shadow", "percent": 100, "max_inflight": 64},
                    {"name": "seq", "model": "seq_shadow", "percent": 100, "max_inflight": 64},
                ],
                "compare": {"output": "y", "kind": "regression", "atol": 1e-5},
            }
        ]
        # a long gathering time: the copies wait for each other (before, they went as one call)
        cfg = write_config(
            str(tmp_path / "c.yaml"), routes, routing={"shadow_gather_ms": 1000, "shadow_send_threads": senders}
        )
        os.makedirs(tmp_path / "empty")
        running = start_gateway(str(tmp_path / "empty"), config_file=cfg, remote_models=tuple(remote))
        try:
            client = grpcclient.InferenceServerClient(running.grpc_url)
            n = 4
            for i in range(n):
                inp = grpcclient.InferInput("x", [1, 2], "FP32")
                inp.set_data_from_numpy(np.full((1, 2), i, np.float32))
                client.infer(
                    "steps",
                    [inp],
                    sequence_id=42,
                    sequence_start=i == 0,
                    sequence_end=i == n - 1,
                    parameters={"tag": "ab"[0 < i < n - 1]},  # the middle steps alike
                )
            end = time.monotonic() + 15
            while _outcomes(_metrics(running), "steps").get("compared", 0) < 2 * n:
                assert time.monotonic() < end, _outcomes(_metrics(running), "steps")
                time.sleep(0.05)
            text = _metrics(running)
            for shadow in ("plain", "seq"):
                assert metric(text, "batchgate_shadow_agreements_total", route="steps", shadow=shadow) == n
            calls = {m: [(p, s) for model, p, s in upstream.seen if model == m] for m in ("typed", "seq")}
            for params, _ in calls["typed"] + calls["seq"]:
                assert params["sequence_id"].uint64_param == 42 or params["sequence_id"].int64_param == 42
                assert params["tag"].string_param in ("a", "b")
            # one step a call, in the order sent, each with its own start and end
            assert [s[0][0] for _, s in calls["seq"]] == [1] * n
            starts = [(p["sequence_start"].bool_param, p["sequence_end"].bool_param) for p, _ in calls["seq"]]
            assert starts == [(True, False), (False, False), (False, False), (False, True)]
            # the other shadow: each call holds copies of one tag, every row sent once
            assert sum(s[0][0] for _, s in calls["typed"]) == n and len(calls["typed"]) >= 2
        finally:
            running.stop()
    finally:
        upstream.stop()


@pytest.mark.parametrize("senders", [1, 0], ids=["sender-threads", "event-loop"])
def test_a_remote_shadow_copy_has_the_time_its_caller_gave_from_when_it_starts(repo, tmp_path, senders):
    """A copy starts once primary work leaves time (and a gathering copy waits for others), later
    than its request; it was sent with the caller's own deadline, so that wait, the gateway's,
    failed it (DEADLINE_EXCEEDED: counted `failed`, an error only the shadow made). Here the copy
    waits 1 s to gather, past its caller's 0.8 s."""
    upstream = start_gateway(repo)
    try:
        remote = f"name=clf_remote upstreams={upstream.grpc_url} upstream_model=clf_a batching=passthrough"
        routes = [
            {
                "name": "late",
                "variants": [{"name": "here", "model": "clf_a", "weight": 100}],
                "shadows": [{"name": "mirror", "model": "clf_remote", "percent": 100, "max_inflight": 64}],
                "compare": {"output": "probabilities", "kind": "regression", "atol": 1e-5},
            }
        ]
        cfg = write_config(
            str(tmp_path / "c.yaml"),
            routes,
            remote_models=[remote],
            routing={"shadow_gather_ms": 1000, "shadow_send_threads": senders},
        )
        running = start_gateway(repo, config_file=cfg)
        try:
            inp = grpcclient.InferInput("features", [1, 4], "FP32")
            inp.set_data_from_numpy(np.full((1, 4), 0.1, np.float32))
            grpcclient.InferenceServerClient(running.grpc_url).infer("late", [inp], client_timeout=0.8)
            end = time.monotonic() + 30
            while not _outcomes(_metrics(running), "late"):
                assert time.monotonic() < end, "the copy was not settled"
                time.sleep(0.1)
            assert _outcomes(_metrics(running), "late") == {"compared": 1}
        finally:
            running.stop()
    finally:
        upstream.stop()
