"""Rollouts on a real gateway: a failing canary rolled back by its gates, a good one promoted,
a restart in the middle resumes at its step; runtime weights kept in state_dir until the routes
file changes the route; a bad routes file changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway_support import start_gateway
from route_support import FEATURES, POISON, infer_grpc, metric, route_repository, write_config


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return route_repository(str(tmp_path_factory.mktemp("rollout_models")))


def _route(canary_model: str, steps=(50, 100), min_requests=10, **gates) -> dict:
    return {
        "name": "ramp",
        "variants": [
            {"name": "stable", "model": "clf_a", "weight": 100},
            {"name": "canary", "model": canary_model, "weight": 0},
        ],
        "rollout": {
            "canary": "canary",
            "baseline": "stable",
            "steps": list(steps),
            "interval_s": 1,
            "min_requests": min_requests,
            # p99 of two equal CPU models on a busy test machine: not what these tests judge
            "gates": {"max_error_rate": 0.01, "max_p99_ratio": 1000, **gates},
            "on_fail": "rollback",
        },
    }


def _staged(name: str) -> dict:
    """A route whose canary is staged (weight 0), without a rollout."""
    variants = [
        {"name": "stable", "model": "clf_a", "weight": 100},
        {"name": "canary", "model": "clf_same", "weight": 0},
    ]
    return {"name": name, "variants": variants}


def _drive(running, until, features=FEATURES, timeout: float = 15.0) -> None:
    """Send requests (errors allowed) until ``until()`` holds."""
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, "the rollout did not get there in time"
        for _ in range(20):
            with contextlib.suppress(InferenceServerException):  # the failing canary's answers
                infer_grpc(running.grpc_url, "ramp", features)


def _state(running):
    return running.gateway.routes.routes["ramp"]


def _metrics(running) -> str:
    with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
        return r.read().decode()


def test_failing_canary_is_rolled_back_by_its_gate(repo, tmp_path):
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(str(tmp_path / "c.yaml"), [_route("clf_bad")], auth={"audit_log_file": str(audit)})
    running = start_gateway(repo, config_file=cfg)
    try:
        route = _state(running)
        assert route.rollout.state == "running" and route.weights == {"stable": 50, "canary": 50}
        started = time.monotonic()
        _drive(running, lambda: route.rollout.state != "running", POISON)
        assert route.rollout.state == "rolled_back"
        assert time.monotonic() - started < 2 * 1 + 2  # within two intervals (and the controller's tick)
        assert route.weights == {"stable": 100, "canary": 0}
        assert "error rate" in route.rollout.last
        for _ in range(20):  # every request now goes to the baseline
            assert infer_grpc(running.grpc_url, "ramp", POISON)[1]["variant"] == "stable"
        text = _metrics(running)
        assert metric(text, "batchgate_rollout_state", route="ramp") == 4
        assert metric(text, "batchgate_route_weight", route="ramp", variant="canary") == 0
    finally:
        running.stop()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    steps = [ln for ln in lines if ln["action"] == "rollout.step"]
    assert steps and steps[-1]["outcome"] == "rolled_back" and "error_rate=" in steps[-1]["detail"]


def test_a_rollout_that_waits_for_traffic_says_so_once(repo, tmp_path):
    """With no requests, each interval "waited" and wrote an audit record, a log line and the
    state file again: a wait that goes on is no transition."""
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(str(tmp_path / "c.yaml"), [_route("clf_same")], auth={"audit_log_file": str(audit)})
    running = start_gateway(repo, config_file=cfg)
    try:
        route = _state(running)
        end = time.monotonic() + 4.5  # four intervals of 1 s, no request
        while time.monotonic() < end:
            time.sleep(0.1)
        assert route.rollout.state == "running" and "waits" in route.rollout.last
    finally:
        running.stop()
    steps = [json.loads(line) for line in audit.read_text().splitlines()]
    waits = [ln for ln in steps if ln["action"] == "rollout.step" and "waits" in ln["detail"]]
    assert len(waits) == 1, waits


def test_good_canary_is_promoted_step_by_step(repo, tmp_path):
    cfg = write_config(str(tmp_path / "c.yaml"), [_route("clf_same")])
    running = start_gateway(repo, config_file=cfg)
    try:
        route = _state(running)
        seen = []
        _drive(running, lambda: seen.append(dict(route.weights)) or route.rollout.state == "promoted")
        assert {"stable": 50, "canary": 50} in seen
        assert route.weights == {"stable": 0, "canary": 100}
        assert metric(_metrics(running), "batchgate_rollout_state", route="ramp") == 3
    finally:
        running.stop()


def test_pinned_and_synthetic_requests_do_not_count_in_the_gates(repo, tmp_path):
    cfg = write_config(str(tmp_path / "c.yaml"), [_route("clf_bad", min_requests=5)])
    running = start_gateway(repo, config_file=cfg)
    try:
        route = _state(running)
        end = time.monotonic() + 2.5
        while time.monotonic() < end:  # failures, but all pinned or synthetic: nothing to judge
            for headers in ({"x-batchgate-variant": "canary"}, {"x-batchgate-synthetic": "1"}):
                with contextlib.suppress(InferenceServerException):
                    infer_grpc(running.grpc_url, "ramp", POISON, headers=headers)
        assert route.rollout.state == "running" and route.rollout.step == 0
        assert "fewer than min_requests" in route.rollout.last
    finally:
        running.stop()


def test_restart_resumes_the_rollout_at_its_step(repo, tmp_path):
    state_dir = tmp_path / "state"
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        [_route("clf_same", steps=(20, 40, 60, 80, 100), min_requests=5)],
        routing={"state_dir": str(state_dir)},
    )
    running = start_gateway(repo, config_file=cfg)
    try:
        route = _state(running)
        _drive(running, lambda: route.rollout.step >= 1)
    finally:
        running.stop()
    kept = json.loads((state_dir / "route-ramp.json").read_text())
    step, weights = kept["rollout"]["step"], kept["table"]["weights"]
    assert step >= 1
    again = start_gateway(repo, config_file=cfg)
    try:
        route = _state(again)
        assert route.rollout.step == step and route.weights == weights  # neither back to 0% nor on to 100%
    finally:
        again.stop()


def test_the_same_route_written_another_way_keeps_its_weights_and_so_does_state_kept_before(repo, tmp_path):
    """The kept state is matched to the route as parsed, not as written: `version: 1` rewritten
    `version: "1"`, with its keys in another order, reset the runtime weights to the file's.
    State kept under the digest of the file's text (before 2026-12-07) is still the route's
    after an upgrade."""
    state_dir, routes_file = tmp_path / "state", tmp_path / "routes.yaml"
    route = {
        "name": "ramp",
        "variants": [
            {"name": "stable", "model": "clf_a", "version": 1, "weight": 100},
            {"name": "canary", "model": "clf_same", "weight": 0},
        ],
    }
    write_config(str(routes_file), [route])
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        [],
        routing={"state_dir": str(state_dir), "routes_file": str(routes_file), "routes_poll_s": 0.1},
    )
    running = start_gateway(repo, config_file=cfg)
    try:
        running.call(_set(running, {"canary": 30}))
        assert _state(running).weights == {"stable": 100, "canary": 30}
        respelt = {
            "variants": [
                {"weight": 100, "version": "1", "model": "clf_a", "name": "stable"},
                {"model": "clf_same", "name": "canary", "weight": 0},
            ],
            "name": "ramp",
        }
        write_config(str(routes_file), [respelt])
        reloads = metric(_metrics(running), "batchgate_routes_reloads_total", outcome="ok")
        _until(lambda: metric(_metrics(running), "batchgate_routes_reloads_total", outcome="ok") > reloads)
        assert _state(running).weights == {"stable": 100, "canary": 30}
    finally:
        running.stop()
    kept_file = state_dir / "route-ramp.json"
    kept = json.loads(kept_file.read_text())
    from batchgate.core.routing import parse_routes

    kept["fingerprint"] = parse_routes([respelt])[0].legacy_fingerprint()  # as an older version kept it
    kept_file.write_text(json.dumps(kept))
    running = start_gateway(repo, config_file=cfg)
    try:
        assert _state(running).weights == {"stable": 100, "canary": 30}
    finally:
        running.stop()


def test_runtime_weights_persist_until_the_routes_file_changes(repo, tmp_path):
    state_dir = tmp_path / "state"
    audit = tmp_path / "audit.jsonl"
    routes_file = tmp_path / "routes.yaml"
    route = {
        "name": "ramp",
        "variants": [
            {"name": "stable", "model": "clf_a", "weight": 100},
            {"name": "canary", "model": "clf_same", "weight": 0},
        ],
    }
    write_config(str(routes_file), [route])
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        [],
        routing={"state_dir": str(state_dir), "routes_file": str(routes_file), "routes_poll_s": 0.1},
        auth={"audit_log_file": str(audit)},
    )
    running = start_gateway(repo, config_file=cfg)
    try:
        running.call(_set(running, {"canary": 30}))
        assert _state(running).weights == {"stable": 100, "canary": 30}
    finally:
        running.stop()
    running = start_gateway(repo, config_file=cfg)  # the runtime weights win over the file's
    try:
        assert _state(running).weights == {"stable": 100, "canary": 30}
        # a broken routes file changes nothing, and is counted
        routes_file.write_text("routes: [{name: ramp, variants: []}]\n")
        _until(lambda: metric(_metrics(running), "batchgate_routes_reloads_total", outcome="error") == 1)
        assert _state(running).weights == {"stable": 100, "canary": 30}
        # the route's definition changes in the file: its weights win again, and that is audited
        route["variants"][1]["weight"] = 10
        write_config(str(routes_file), [route])
        _until(lambda: _state(running).weights == {"stable": 100, "canary": 10})
    finally:
        running.stop()
    resets = [json.loads(x) for x in audit.read_text().splitlines() if '"route.reset"' in x]
    assert resets and resets[0]["target"] == "ramp"


def test_a_state_dir_that_cannot_be_written_at_run_time_is_counted(repo, tmp_path):
    state_dir = tmp_path / "state"
    route = _staged("ramp")
    running = start_gateway(
        repo, config_file=write_config(str(tmp_path / "c.yaml"), [route], routing={"state_dir": str(state_dir)})
    )
    try:
        before = _metrics(running)
        assert "\nbatchgate_state_write_failures_total " in before
        assert metric(before, "batchgate_state_write_failures_total") == 0
        kept = state_dir / "route-ramp.json"
        kept.unlink(missing_ok=True)
        kept.mkdir()  # (as root, permissions would not stop the write: a directory in its place does)
        running.call(_set(running, {"canary": 30}))
        assert _state(running).weights == {"stable": 100, "canary": 30}  # served all the same
        _until(lambda: metric(_metrics(running), "batchgate_state_write_failures_total") == 1)
    finally:
        running.stop()


async def _set(running, weights):
    running.gateway.routes.set_weights("ramp", weights)


def _until(check, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end
        time.sleep(0.05)


def test_a_deadline_the_caller_set_and_missed_is_not_the_canarys_error(repo, tmp_path):
    """DEADLINE_EXCEEDED from a caller's own (tight) timeout must not let callers roll a canary back."""
    cfg = write_config(str(tmp_path / "c.yaml"), [_route("clf_slow", min_requests=1_000_000)])
    running = start_gateway(repo, config_file=cfg)
    try:
        route = _state(running)
        missed = 0
        client = grpcclient.InferenceServerClient(running.grpc_url)
        inp = grpcclient.InferInput("features", [1, 4], "FP32")
        inp.set_data_from_numpy(FEATURES)
        for _ in range(60):
            try:
                client.infer("ramp", [inp], timeout=1)  # the V2 timeout: 1 µs
            except InferenceServerException as e:
                missed += "DEADLINE_EXCEEDED" in str(e.status())
        assert missed > 0
        assert route.windows["canary"].server_errors == 0 and route.windows["stable"].server_errors == 0
    finally:
        running.stop()


@pytest.mark.parametrize("canary, outcome", [("clf_other", "rolled_back"), ("clf_same", "promoted")])
def test_the_output_psi_gate_rolls_back_a_canary_whose_answers_are_distributed_differently(
    repo, tmp_path, canary, outcome
):
    """max_output_psi (the drift gate): the canary's answers against the baseline's over the
    interval; a canary answering the same inputs differently fails, an equal one passes."""
    cfg = write_config(str(tmp_path / "c.yaml"), [_route(canary, steps=(50, 100), max_output_psi=0.25)])
    running = start_gateway(repo, config_file=cfg)
    rng = np.random.default_rng(3)
    try:
        route = _state(running)
        end = time.monotonic() + 30
        while route.rollout.state == "running":
            assert time.monotonic() < end, "the rollout did not finish in time"
            for _ in range(10):
                infer_grpc(running.grpc_url, "ramp", rng.standard_normal((8, 4)).astype(np.float32))
        assert route.rollout.state == outcome, route.rollout.last
        if outcome == "rolled_back":
            assert "output PSI" in route.rollout.last
    finally:
        running.stop()


def test_the_output_psi_gate_rolls_back_a_canary_that_answers_nan(repo, tmp_path):
    """A canary whose answers turned NaN where the baseline's are numbers fails max_output_psi
    (before, NaN answers were left out of the PSI and the canary was promoted)."""
    route = _route("sq_nan", steps=(50, 100), max_output_psi=0.25)
    route["variants"][0]["model"] = "sq_abs"
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), [route]))
    rng = np.random.default_rng(5)
    try:
        state = _state(running)
        end = time.monotonic() + 30
        while state.rollout.state == "running":
            assert time.monotonic() < end, "the rollout did not finish in time"
            for _ in range(10):  # a negative feature: NaN from the canary, a number from the baseline
                infer_grpc(running.grpc_url, "ramp", rng.standard_normal((8, 4)).astype(np.float32))
        assert state.rollout.state == "rolled_back", state.rollout.last
        assert "output PSI" in state.rollout.last
    finally:
        running.stop()


@pytest.mark.parametrize("canary, outcome", [("emb_10", "rolled_back"), ("emb_100b", "promoted")])
def test_a_canary_that_refuses_values_the_baseline_takes_is_rolled_back(repo, tmp_path, canary, outcome):
    """A canary whose model refuses as invalid (400) what the baseline answers fails its gate
    (before, those answers counted nowhere and it was promoted); clients' bad values, which
    both refuse, do not fail an equal canary."""
    route = _route(canary, steps=(50, 100))
    route["variants"][0]["model"] = "emb_100"
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), [route]))
    rng = np.random.default_rng(7)
    client = grpcclient.InferenceServerClient(running.grpc_url)
    refused = {"stable": 0, "canary": 0}  # the most seen in one interval's figures
    try:
        state = _state(running)
        end = time.monotonic() + 30
        while state.rollout.state == "running":
            assert time.monotonic() < end, "the rollout did not finish in time"
            for name, figures in state.describe()["window"].items():
                refused[name] = max(refused[name], figures["refused"])
            for _ in range(10):
                ids = rng.integers(0, 20, (1, 3))  # past emb_10's table, within emb_100's
                if rng.random() < 0.2:
                    ids[0, 0] = 500  # past every table: refused by both
                inp = grpcclient.InferInput("ids", [1, 3], "INT64")
                inp.set_data_from_numpy(ids.astype(np.int64))
                with contextlib.suppress(InferenceServerException):
                    client.infer("ramp", [inp])
        assert state.rollout.state == outcome, state.rollout.last
        if outcome == "rolled_back":
            assert "refused" in state.rollout.last
        # the admin API's window figures show what the refused-share gate judges
        assert refused["stable"] > 0 and refused["canary"] > 0, refused
    finally:
        running.stop()


def test_a_routes_file_edit_moves_only_keys_of_variants_that_lost_weight(repo, tmp_path):
    """A definition change resets weights to the file's by moving buckets from the table served
    so far, never by laying the table out afresh: an edit that changes no weight moves no user,
    a ramp done by editing the file (GitOps) moves users only from losers to gainers, and so does
    a file changed while the server was down."""
    state_dir, routes_file = tmp_path / "state", tmp_path / "routes.yaml"
    route = {
        "name": "ramp",
        "variants": [
            {"name": "a", "model": "clf_a", "weight": 50},
            {"name": "b", "model": "clf_same", "weight": 30},
            {"name": "c", "model": "clf_other", "weight": 20},
        ],
        "sticky_key": "header:x-user",
    }
    write_config(str(routes_file), [route])
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        [],
        routing={"state_dir": str(state_dir), "routes_file": str(routes_file), "routes_poll_s": 0.1},
    )
    keys = [f"user-{i}".encode() for i in range(3000)]

    def placed(running) -> list[str]:
        table = _state(running).table
        return [table.variant_for(k) for k in keys]

    def moves(before, after) -> set[tuple[str, str]]:
        return {(x, y) for x, y in zip(before, after) if x != y}

    running = start_gateway(repo, config_file=cfg)
    try:
        first = placed(running)
        # only a shadow added: no weight changes, nobody moves
        route["shadows"] = [{"name": "s", "model": "clf_same", "percent": 10}]
        write_config(str(routes_file), [route])
        _until(lambda: running.gateway.routes.routes["ramp"].spec.shadows)
        assert placed(running) == first
        # 50/30/20 -> 40/30/30: b keeps every user, a's move to c only
        route["variants"][0]["weight"], route["variants"][2]["weight"] = 40, 30
        write_config(str(routes_file), [route])
        _until(lambda: _state(running).weights == {"a": 40, "b": 30, "c": 30})
        second = placed(running)
        assert moves(first, second) == {("a", "c")}
    finally:
        running.stop()
    # changed while down: 40/30/30 -> 40/20/40 on restart moves b's users to c only
    route["variants"][1]["weight"], route["variants"][2]["weight"] = 20, 40
    write_config(str(routes_file), [route])
    running = start_gateway(repo, config_file=cfg)
    try:
        assert _state(running).weights == {"a": 40, "b": 20, "c": 40}
        assert moves(second, placed(running)) == {("b", "c")}
    finally:
        running.stop()


def test_a_reload_keeps_the_shadow_runners_of_a_route_it_does_not_change(repo, tmp_path):
    """Rebuilt runners beside the old ones (still holding copies) made a shadow's budget two."""
    routes_file = tmp_path / "routes.yaml"
    shadowed = {
        "name": "ramp",
        "variants": [{"name": "a", "model": "clf_a", "weight": 100}],
        "shadows": [{"name": "s", "model": "clf_same", "percent": 100, "max_inflight": 4}],
    }
    other = {"name": "other", "variants": [{"name": "a", "model": "clf_a", "weight": 100}]}
    write_config(str(routes_file), [shadowed, other])
    cfg = write_config(str(tmp_path / "c.yaml"), [], routing={"routes_file": str(routes_file), "routes_poll_s": 0.1})
    running = start_gateway(repo, config_file=cfg)
    try:
        (runner,) = _state(running).shadows
        other["variants"].append({"name": "b", "model": "clf_same", "weight": 0})
        write_config(str(routes_file), [shadowed, other])
        _until(lambda: len(running.gateway.routes.routes["other"].spec.variants) == 2)
        assert _state(running).shadows == [runner] and not runner.closed
        # the shadowed route's own definition changes: a new runner, the old one cancelled
        shadowed["shadows"][0]["percent"] = 50
        write_config(str(routes_file), [shadowed, other])
        _until(lambda: _state(running).spec.shadows[0].percent == 50)
        (new,) = _state(running).shadows
        assert new is not runner and runner.closed
    finally:
        running.stop()


def test_a_routes_file_that_brings_many_routes_hashes_them_off_the_event_loop(repo, tmp_path, monkeypatch):
    """Each new route's bucket order is ~20 ms of hashing; a reload did it on the event loop
    (150 new routes held every request 3 s, 2,000 about 45 s). The reload now works the orders
    out on a thread first, and the loop finds them done."""
    from batchgate.core import buckets

    seen: list[str] = []
    original = buckets._seeded_order

    def recorded(route: str) -> list[int]:  # the real hashing, and which thread did it
        seen.append(threading.current_thread().name)
        return original(route)

    monkeypatch.setattr(buckets, "_seeded_order", recorded)
    routes_file = tmp_path / "routes.yaml"

    def route(i: int) -> dict:
        return {"name": f"many-{i}", "variants": [{"name": "a", "model": "clf_a", "weight": 100}]}

    write_config(str(routes_file), [route(0)])
    cfg = write_config(str(tmp_path / "c.yaml"), [], routing={"routes_file": str(routes_file), "routes_poll_s": 0.1})
    running = start_gateway(repo, config_file=cfg)
    try:
        seen.clear()
        write_config(str(routes_file), [route(i) for i in range(1, 21)])
        _until(lambda: metric(_metrics(running), "batchgate_routes_reloads_total", outcome="ok") >= 1)
        assert len(seen) == 20
        assert running.thread.name not in seen, seen
    finally:
        running.stop()


def test_a_canary_whose_model_is_unloaded_mid_rollout_fails_its_gate(repo, tmp_path):
    """Before, the requests sent to a canary whose model was unloaded were refused (503, 'not
    loaded') before the route counted anything: the rollout waited for canary answers for ever
    (or stepped on), and neither the per-variant metrics nor the statistics saw a failure."""
    import tritonclient.http as httpclient

    cfg = write_config(
        str(tmp_path / "c.yaml"),
        [_route("clf_same", steps=(50, 100), min_requests=5)],
        repository={"model_control_mode": "explicit", "load_model": ["*"]},
        auth={"allow_open_admin": True},
    )
    running = start_gateway(repo, config_file=cfg)
    try:
        route = _state(running)
        assert route.rollout.state == "running" and route.weights == {"stable": 50, "canary": 50}
        httpclient.InferenceServerClient(running.http_url).unload_model("clf_same")
        _drive(running, lambda: route.rollout.state != "running")
        assert route.rollout.state == "rolled_back" and "error rate" in route.rollout.last
        assert (
            metric(
                _metrics(running),
                "batchgate_route_requests_total",
                route="ramp",
                variant="canary",
                status="UNAVAILABLE",
            )
            > 0
        )
        for _ in range(10):  # the baseline answers everything again
            assert infer_grpc(running.grpc_url, "ramp")[1]["variant"] == "stable"
    finally:
        running.stop()


def test_synthetic_requests_to_a_canary_whose_model_is_unloaded_do_not_count_in_its_gate(repo, tmp_path):
    """A load test (x-batchgate-synthetic) against a route whose canary's model is not loaded:
    the refusals are served (503) but count in no gate, as synthetic answers do not; before, they
    were counted as the canary's errors before the request was read and rolled the canary back."""
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        [_route("clf_same", steps=(50, 100), min_requests=5)],
        repository={"model_control_mode": "explicit", "load_model": ["*"]},
        auth={"allow_open_admin": True},
    )
    running = start_gateway(repo, config_file=cfg)
    try:
        route = _state(running)
        assert route.rollout.state == "running" and route.weights == {"stable": 50, "canary": 50}
        import tritonclient.http as httpclient

        httpclient.InferenceServerClient(running.http_url).unload_model("clf_same")
        end = time.monotonic() + 2.5  # past two intervals
        refused = 0
        while time.monotonic() < end:
            try:
                infer_grpc(running.grpc_url, "ramp", headers={"x-batchgate-synthetic": "1"})
            except InferenceServerException:
                refused += 1
        assert refused > 5
        assert route.rollout.state == "running" and route.rollout.step == 0
        assert "fewer than min_requests" in route.rollout.last
    finally:
        running.stop()


@pytest.mark.parametrize("first_weighs", [True, False], ids=["staged canary", "promoted, old stable first"])
def test_a_variant_without_weight_whose_model_no_longer_fits_leaves_the_route_serving(repo, tmp_path, first_weighs):
    """A variant with no weight whose model was reloaded with another signature took its whole
    route down: every request 503, pinned ones to the variant with the weight included. A route is
    ready when every variant with weight is: now that variant alone is left out (pins to it
    refused). The same when that variant is listed first, as the old stable is after a promotion
    (the first variant was what the others had to fit)."""
    import tritonclient.http as httpclient

    weighted, idle = {"name": "stable", "model": "clf_a"}, {"name": "canary", "model": "clf_same"}
    if not first_weighs:
        weighted, idle = {"name": "canary", "model": "clf_a"}, {"name": "stable", "model": "clf_same"}
    variants = [{**weighted, "weight": 100}, {**idle, "weight": 0}]
    route = {"name": "r", "variants": variants if first_weighs else variants[::-1]}
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        [route],
        repository={"model_control_mode": "explicit", "load_model": ["*"]},
        auth={"allow_open_admin": True},
    )
    running = start_gateway(repo, config_file=cfg)
    try:
        admin = httpclient.InferenceServerClient(running.http_url)
        other = (Path(repo) / "strings" / "1" / "model.onnx").read_bytes()  # takes strings, not features
        admin.load_model("clf_same", config=json.dumps({"max_batch_size": 8}), files={"file:1/model.onnx": other})
        assert admin.is_model_ready("r")
        for _ in range(10):
            assert infer_grpc(running.grpc_url, "r")[1]["variant"] == weighted["name"]
        with pytest.raises(InferenceServerException, match="not loaded"):
            infer_grpc(running.grpc_url, "r", headers={"x-batchgate-variant": idle["name"]})
    finally:
        running.stop()


def test_a_shadow_naming_the_canarys_version_is_known_as_the_canarys_shadow(repo, tmp_path):
    """The canary names its model without a version, the shadow names the same model with its
    version ("1"): before, they were matched as written and never found the same, so the
    canary's own answers were copied to its own model (agreeing with themselves) and the
    disagreement gate never judged the canary."""
    route = {
        "name": "shadowed",
        "variants": [
            {"name": "stable", "model": "clf_a", "weight": 50},
            {"name": "canary", "model": "clf_same", "weight": 50},
        ],
        "shadows": [{"name": "next", "model": "clf_same", "version": "1", "percent": 100}],
        "compare": {"output": "probabilities", "kind": "classification"},
    }
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), [route]))
    try:
        for _ in range(10):
            assert (
                infer_grpc(running.grpc_url, "shadowed", headers={"x-batchgate-variant": "canary"})[1]["variant"]
                == "canary"
            )
        time.sleep(0.3)
        copies = sum(
            float(line.rsplit(" ", 1)[1])
            for line in _metrics(running).splitlines()
            if line.startswith("batchgate_shadow_requests_total{")
        )
        assert copies == 0  # no copy of the canary's answers to the canary's own model
    finally:
        running.stop()


def test_weights_set_by_hand_after_a_rollback_are_the_canary_share_reported(repo, tmp_path):
    """After a rollback (or a promotion) the rollout's own figure (0 or 100) was reported
    whatever weights were set by hand afterwards, in the admin API and the gauge."""
    cfg = write_config(str(tmp_path / "c.yaml"), [_route("clf_bad")])
    running = start_gateway(repo, config_file=cfg)
    try:
        route = _state(running)
        _drive(running, lambda: route.rollout.state != "running", POISON)
        assert route.rollout.state == "rolled_back"
        assert metric(_metrics(running), "batchgate_rollout_canary_percent", route="ramp") == 0
        running.call(_set(running, {"canary": 100}))  # stable 100, canary 100: half each
        assert metric(_metrics(running), "batchgate_rollout_canary_percent", route="ramp") == 50
        assert route.describe()["rollout"]["canary_percent"] == 50
    finally:
        running.stop()


def test_a_routes_file_edited_while_the_server_starts_is_served(repo, tmp_path, monkeypatch):
    """The watcher took the file's first stamp only once the routes were installed: an edit made
    after the start read the file and before that stamp counted as applied, and was not served
    until the file changed again. The stamp is now taken before the read."""
    import batchgate.app as app

    routes_file = tmp_path / "routes.yaml"
    route = _staged("ramp")
    write_config(str(routes_file), [route])
    edited = json.loads(json.dumps(route))
    edited["variants"][1]["weight"] = 25
    read = app.read_routes_file

    def read_then_edited(path: str):
        specs = read(path)
        write_config(path, [edited])  # an edit lands right after the start's read
        return specs

    monkeypatch.setattr(app, "read_routes_file", read_then_edited)
    cfg = write_config(str(tmp_path / "c.yaml"), [], routing={"routes_file": str(routes_file), "routes_poll_s": 0.1})
    running = start_gateway(repo, config_file=cfg)
    try:
        _until(lambda: _state(running).weights == {"stable": 100, "canary": 25})
    finally:
        running.stop()


def test_the_admin_api_shows_a_window_without_joining_its_kept_answers(repo, tmp_path, monkeypatch):
    """GetRoute and ListRoutes showed each variant's window through the gate's own figures, which
    join the answers kept for the output PSI gate (up to 512 x 64 x 256 values): about 10 ms a
    variant on the event loop, on every call, for counts that do not need them."""
    import batchgate.routes as routes_module

    route = _route("clf_same", steps=(50, 100), min_requests=10_000, max_output_psi=0.2)
    route["rollout"]["interval_s"] = 3600
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), [route]))
    try:
        for _ in range(20):
            infer_grpc(running.grpc_url, "ramp")
        windows = _state(running).windows
        assert sum(len(w.outputs) for w in windows.values()) == 20  # answers kept for the gate

        joined: list[int] = []

        class Spy:  # numpy as routes.py sees it, counting what it joins
            def __getattr__(self, name):
                return getattr(np, name)

            @staticmethod
            def concatenate(arrays, *args, **kwargs):
                joined.append(len(arrays))
                return np.concatenate(arrays, *args, **kwargs)

        monkeypatch.setattr(routes_module, "np", Spy())
        url = f"http://127.0.0.1:{running.gateway.admin_http_port}/admin/v1/routes"
        for path in ("", "/ramp"):
            with urllib.request.urlopen(url + path, timeout=10) as r:
                body = json.loads(r.read())
        assert sum(int(w.get("requests", 0)) for w in body["window"].values()) == 20
        assert joined == []
    finally:
        running.stop()


def test_the_output_psi_gate_judges_an_output_every_variant_gives(repo, tmp_path):
    """Without compare, the output PSI gate reads the first output of the heaviest variant; a
    variant may give more outputs than the first listed, so that could be one the canary lacks:
    the canary kept no answers and the gate never had the rows to judge."""
    from onnx import TensorProto, helper, numpy_helper

    from batchgate.demo import _model, _save

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["z"]),
            helper.make_node("ArgMax", ["z"], ["label"], axis=1, keepdims=0),
            helper.make_node("Softmax", ["z"], ["probabilities"], axis=-1),
        ],
        "label_first",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
        ],
        [numpy_helper.from_array(w, "W")],
    )
    models = tmp_path / "models"
    route_repository(str(models))
    _save(_model(g), str(models), "label_first", config="max_batch_size: 8\n")
    route = _route("clf_a", steps=(10, 100), min_requests=10_000, max_output_psi=0.2)
    route["rollout"]["interval_s"] = 3600
    route["variants"] = [  # the canary listed first: the baseline (the heaviest) may give more
        {"name": "canary", "model": "clf_a", "weight": 0},
        {"name": "stable", "model": "label_first", "weight": 100},
    ]
    running = start_gateway(str(models), config_file=write_config(str(tmp_path / "c.yaml"), [route]))
    try:
        windows = _state(running).windows
        _drive(running, lambda: all(w.outputs for w in windows.values()))
        assert all(w.width == 3 for w in windows.values())  # the probabilities, on both sides
    finally:
        running.stop()


def test_a_route_replaced_while_the_controller_steps_is_not_stepped(repo, tmp_path):
    """The controller steps its routes one by one, waiting on each one's audit line; a reload
    that replaced a route meanwhile still had the route it replaced stepped: a rollout.step
    record for a route no longer served, and its state written to state_dir over the new one's
    (the next start found the old definition there and reset the route again)."""
    from batchgate.core.routing import parse_routes

    state_dir = tmp_path / "state"
    first, second = _route("clf_same", min_requests=10_000), _route("clf_same", min_requests=10_000)
    first["name"], second["name"] = "ramp-a", "ramp-b"
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        [first, second],
        routing={"state_dir": str(state_dir)},
        auth={"audit_log_file": str(tmp_path / "audit.jsonl")},
    )
    running = start_gateway(repo, config_file=cfg)
    try:
        table = running.gateway.routes
        changed = json.loads(json.dumps(second))
        changed["rollout"]["gates"]["max_error_rate"] = 0.02  # ramp-b's definition changes

        async def step_while_reloaded():
            # the reload runs at the controller's first wait (ramp-a's audit line) and replaces ramp-b
            asyncio.ensure_future(table.install(parse_routes([first, changed]), "the test"))
            await table.step(time.time() + 10)

        running.call(step_while_reloaded())
        new = table.routes["ramp-b"]
        assert new.spec.rollout.gates.max_error_rate == 0.02
        assert new.rollout.state == "running" and new.rollout.step == 0 and new.rollout.last.startswith("started")
    finally:
        running.stop()  # (what is kept is on disk once it has stopped)
    kept = json.loads((state_dir / "route-ramp-b.json").read_text())
    assert kept["fingerprint"] == new.spec.fingerprint()
