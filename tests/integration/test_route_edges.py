"""Routes at their edges, each once a defect: BYTES answers compared across a local and a remote
model, a batched model's 1-D output compared row by row, a Pause or Resume that changes nothing
leaving weights set by hand alone, a route defined twice, a shadow whose model stops fitting,
variants that batch differently, a route's own execution statistics, and a variant that stops fitting
while another member is not loaded."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from batchgate.config import ConfigError
from batchgate.demo import _model, _save, classifier_model
from gateway_support import start_gateway
from route_support import infer_grpc, metric, route_repository, write_config


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    root = route_repository(str(tmp_path_factory.mktemp("route_edges")))
    _save(_labeller(0), root, "label_a", config="max_batch_size: 8\n")
    _save(_labeller(5), root, "label_b", config="max_batch_size: 8\n")
    _save(classifier_model(seed=0), root, "clf_small", config="max_batch_size: 2\n")
    _save(_scorer_and_labeller(), root, "clf_labelled", config="max_batch_size: 8\n")
    return root


def _scorer_and_labeller():
    """features FP32 [-1, 4] -> probabilities FP32 [-1, 3] (as the classifiers) and label INT64 [-1]."""
    w = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probabilities"], axis=-1),
            helper.make_node("ArgMax", ["z"], ["label"], axis=1, keepdims=0),
        ],
        "scorer_and_labeller",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [numpy_helper.from_array(w, "W")],
    )
    return _model(g)


def _labeller(seed: int):
    """features FP32 [-1, 4] -> label INT64 [-1]: the top class of a dense layer (as skl2onnx's
    classifiers answer their labels)."""
    w = np.random.default_rng(seed).standard_normal((4, 5)).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["z"]),
            helper.make_node("ArgMax", ["z"], ["label"], axis=1, keepdims=0),
        ],
        "labeller",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(w, "W")],
    )
    return _model(g)


def _metrics(running) -> str:
    with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
        return r.read().decode()


def _until(check, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "not in time"
        time.sleep(0.05)


def test_bytes_answers_of_a_local_and_a_remote_model_agree(repo, tmp_path):
    upstream = start_gateway(repo)
    try:
        remote = f"name=strings_remote upstreams={upstream.grpc_url} upstream_model=strings batching=passthrough"
        routes = [
            {
                "name": "words",
                "variants": [{"name": "here", "model": "strings", "weight": 100}],
                "shadows": [{"name": "there", "model": "strings_remote", "percent": 100, "max_inflight": 64}],
                "compare": {"output": "OUTPUT", "kind": "regression"},
            }
        ]
        cfg = write_config(str(tmp_path / "c.yaml"), routes, remote_models=[remote], routing={"shadow_gather_ms": 0})
        running = start_gateway(repo, config_file=cfg)
        try:
            client = grpcclient.InferenceServerClient(running.grpc_url)
            for i in range(10):
                inp = grpcclient.InferInput("INPUT", [2, 2], "BYTES")
                inp.set_data_from_numpy(np.array([[b"a", "é".encode()], [b"%d" % i, b""]], dtype=object))
                client.infer("words", [inp])
            compared = "batchgate_shadow_requests_total"
            _until(lambda: metric(_metrics(running), compared, route="words", outcome="compared") == 10)
            assert metric(_metrics(running), "batchgate_shadow_agreements_total", route="words", shadow="there") == 10
        finally:
            running.stop()
    finally:
        upstream.stop()


def test_a_batched_models_one_dimensional_output_is_compared_row_by_row(repo, tmp_path):
    routes = [
        {
            "name": "labels",
            "variants": [{"name": "main", "model": "label_a", "weight": 100}],
            "shadows": [{"name": "next", "model": "label_b", "percent": 100, "max_inflight": 64}],
            "compare": {"output": "label", "kind": "classification"},
        }
    ]
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), routes))
    try:
        x = np.random.default_rng(2).standard_normal((40, 4)).astype(np.float32)
        a = np.concatenate(
            [infer_grpc(running.grpc_url, "label_a", x[i : i + 8])[0].as_numpy("label") for i in range(0, 40, 8)]
        )
        b = np.concatenate(
            [infer_grpc(running.grpc_url, "label_b", x[i : i + 8])[0].as_numpy("label") for i in range(0, 40, 8)]
        )
        for i in range(0, 40, 4):
            infer_grpc(running.grpc_url, "labels", x[i : i + 4])
        _until(lambda: metric(_metrics(running), "batchgate_shadow_rows_compared_total", route="labels") == 40)
        text = _metrics(running)
        # each row's label is its own comparison: a flip is a row whose label differs
        differ = int((a != b).sum())
        assert 0 < differ < 40
        assert metric(text, "batchgate_shadow_top1_flips_total", route="labels", shadow="next") == differ
        rows_agreeing = [bool((a[i : i + 4] == b[i : i + 4]).all()) for i in range(0, 40, 4)]
        assert metric(text, "batchgate_shadow_agreements_total", route="labels", shadow="next") == sum(rows_agreeing)
        assert metric(text, "batchgate_shadow_abs_delta_count", route="labels", shadow="next") == 40
    finally:
        running.stop()


def test_pause_or_resume_that_changes_nothing_keeps_weights_set_by_hand(repo, tmp_path):
    route = {
        "name": "ramp",
        "variants": [
            {"name": "stable", "model": "clf_a", "weight": 100},
            {"name": "canary", "model": "clf_same", "weight": 0},
        ],
        "rollout": {"canary": "canary", "baseline": "stable", "steps": [10, 50, 100], "interval_s": 3600},
    }
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), [route]))
    try:
        routes = running.gateway.routes

        async def act(fn, *args):
            return fn(*args)

        def weights():
            return dict(routes.routes["ramp"].table.weights)

        assert weights() == {"stable": 90, "canary": 10}
        running.call(act(routes.set_weights, "ramp", {"stable": 60, "canary": 40}))  # pauses the rollout
        assert routes.routes["ramp"].rollout.state == "paused"
        running.call(act(routes.transition, "ramp", "pause"))  # already paused: nothing changes
        assert weights() == {"stable": 60, "canary": 40}
        running.call(act(routes.transition, "ramp", "resume"))  # on with the rollout: its step's weights
        assert weights() == {"stable": 90, "canary": 10}
        running.call(act(routes.transition, "ramp", "promote"))
        assert weights() == {"stable": 0, "canary": 100}
        running.call(act(routes.set_weights, "ramp", {"stable": 30, "canary": 70}))
        for action in ("pause", "resume"):  # neither applies to a promoted rollout
            running.call(act(routes.transition, "ramp", action))
            assert weights() == {"stable": 30, "canary": 70}
    finally:
        running.stop()


def test_a_route_defined_in_the_configuration_and_the_routes_file_is_refused(repo, tmp_path):
    route = {"name": "twice", "variants": [{"name": "a", "model": "clf_a", "weight": 1}]}
    routes_file = write_config(str(tmp_path / "routes.yaml"), [route])
    cfg = write_config(str(tmp_path / "c.yaml"), [route], routing={"routes_file": routes_file})
    with pytest.raises(ConfigError) as e:
        start_gateway(repo, config_file=cfg)
    assert "route(s) twice defined more than once" in str(e.value)


def test_variants_that_batch_differently_are_refused(repo, tmp_path):
    route = {
        "name": "r",
        "variants": [{"name": "a", "model": "clf_a", "weight": 1}, {"name": "b", "model": "clf_small", "weight": 1}],
    }
    with pytest.raises(ConfigError) as e:
        start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), [route]))
    assert "variant 'b' (clf_small) takes batches of at most 2" in str(e.value)


def _watched(repo, tmp_path, **routing):
    """A copy of the repository, and a gateway polling it with route 'watched': clf_a, shadowed
    by clf_same."""
    own = tmp_path / "models"
    shutil.copytree(repo, own)
    routes = [
        {
            "name": "watched",
            "variants": [{"name": "main", "model": "clf_a", "weight": 100}],
            "shadows": [{"name": "s", "model": "clf_same", "percent": 100, "max_inflight": 8}],
        }
    ]
    cfg = write_config(str(tmp_path / "c.yaml"), routes, **({"routing": routing} if routing else {}))
    running = start_gateway(str(own), config_file=cfg, model_control_mode="poll", repository_poll_s=0.2)
    return own, running


def test_a_shadow_whose_model_stops_fitting_is_left_out_and_the_route_serves_on(repo, tmp_path):
    own, running = _watched(repo, tmp_path)
    try:
        infer_grpc(running.grpc_url, "watched")
        # clf_same's new version takes other inputs: it can no longer shadow the route
        os.makedirs(own / "clf_same" / "2")
        shutil.copy(own / "strings" / "1" / "model.onnx", own / "clf_same" / "2" / "model.onnx")
        _until(
            lambda: running.gateway.repository.resolve("clf_same", "").name == "clf_same" and _version(running) == "2"
        )
        _until(lambda: not running.gateway.routes.routes["watched"].shadows)
        route = running.gateway.routes.routes["watched"]
        assert route.not_ready_reason() is None
        result, params = infer_grpc(running.grpc_url, "watched")
        assert params == {"variant": "main"} and result.as_numpy("probabilities").shape == (1, 3)
    finally:
        running.stop()


@pytest.mark.parametrize("change", ["stops fitting", "removed"])
def test_a_route_left_serving_without_its_shadow_does_not_refuse_the_next_routes_file(repo, tmp_path, change):
    """A reload checked every route as at start, the unchanged ones too: once a shadow's model no
    longer fitted (or was gone), a route serving on without it made every later routes file
    refused, one that only added another route included."""
    routes_file = tmp_path / "routes.yaml"
    write_config(str(routes_file), [])
    own, running = _watched(repo, tmp_path, routes_file=str(routes_file), routes_poll_s=0.1)
    try:
        if change == "removed":
            shutil.rmtree(own / "clf_same")
        else:
            os.makedirs(own / "clf_same" / "2")
            shutil.copy(own / "strings" / "1" / "model.onnx", own / "clf_same" / "2" / "model.onnx")
        _until(lambda: not running.gateway.routes.routes["watched"].shadows)
        other = {"name": "other", "variants": [{"name": "a", "model": "clf_a", "weight": 100}]}
        write_config(str(routes_file), [other])
        _until(lambda: "other" in running.gateway.routes.routes)
        assert metric(_metrics(running), "batchgate_routes_reloads_total", outcome="error") == 0
        assert infer_grpc(running.grpc_url, "watched")[1] == {"variant": "main"}
        assert not running.gateway.routes.routes["watched"].shadows  # still left out
    finally:
        running.stop()


def test_a_shadow_whose_model_is_unloaded_is_said_to_be_left_out(repo, tmp_path, caplog):
    """Its runner went without a word: no copy, no counter series, no line."""
    import logging

    caplog.set_level(logging.WARNING, logger="batchgate.routes")
    own, running = _watched(repo, tmp_path)
    try:
        infer_grpc(running.grpc_url, "watched")
        url = f"http://127.0.0.1:{running.gateway.admin_http_port}/admin/v1/routes/watched"

        def shadows() -> list[dict]:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return json.loads(answer.read())["shadows"]

        assert [(s["name"], s.get("active"), s.get("reason", "")) for s in shadows()] == [("s", True, "")]
        shutil.rmtree(own / "clf_same")
        _until(lambda: not running.gateway.routes.routes["watched"].shadows)
        said = [r.getMessage() for r in caplog.records]
        assert "route 'watched': shadow 's' left out: model 'clf_same' is not served" in said, said
        assert infer_grpc(running.grpc_url, "watched")[1] == {"variant": "main"}  # the route serves on
        # Review finding: the admin API's route listed only the shadows with a runner, so one left
        # out vanished from it; it is listed, inactive, with why
        (shadow,) = shadows()
        assert shadow["name"] == "s" and shadow["model"] == "clf_same" and not shadow.get("active")
        assert "left out: model 'clf_same' is not served" in shadow["reason"], shadow
    finally:
        running.stop()


def _version(running) -> str:
    return running.gateway.repository.resolve("clf_same", "").version


def test_a_routes_statistics_count_its_inferences_and_executions(repo, tmp_path):
    routes = [{"name": "counted", "variants": [{"name": "main", "model": "clf_a", "weight": 100}]}]
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), routes))
    try:
        before = time.time() * 1000
        for rows in (1, 3, 2):
            infer_grpc(running.grpc_url, "counted", np.ones((rows, 4), np.float32))
        stats = grpcclient.InferenceServerClient(running.grpc_url).get_inference_statistics("counted", as_json=True)
        (entry,) = stats["model_stats"]
        assert int(entry["inference_count"]) == 6 and int(entry["execution_count"]) == 3
        assert int(entry["last_inference"]) >= before - 1000
        assert int(entry["inference_stats"]["success"]["count"]) == 3
    finally:
        running.stop()


def test_a_model_folder_named_like_a_route_is_not_loaded(repo, tmp_path, caplog):
    own = tmp_path / "models"
    shutil.copytree(repo, own)
    routes = [{"name": "front", "variants": [{"name": "main", "model": "clf_a", "weight": 100}]}]
    cfg = write_config(str(tmp_path / "c.yaml"), routes)
    running = start_gateway(str(own), config_file=cfg, model_control_mode="poll", repository_poll_s=0.1)
    try:
        shutil.copytree(own / "clf_same", own / "front")  # a folder with the route's name appears
        shutil.copytree(own / "clf_same", own / "later")  # (and another: a rescan has happened once it loads)
        _until(lambda: "later" in running.gateway.repository.models and running.gateway.repository.ready("later"))
        assert "front" not in running.gateway.repository.models
        warned = "model folder 'front' is not loaded: a route has that name"
        assert any(warned in r.getMessage() for r in caplog.records)
        assert infer_grpc(running.grpc_url, "front")[1] == {"variant": "main"}  # still the route
    finally:
        running.stop()
    # the conflict is the operator's to settle: the next start refuses it, naming it
    with pytest.raises(ConfigError) as refused:
        start_gateway(str(own), config_file=cfg, model_control_mode="poll", repository_poll_s=0.1)
    assert "route 'front': a model has that name" in str(refused.value)
    shutil.rmtree(own / "front")
    running = start_gateway(str(own), config_file=cfg, model_control_mode="explicit")
    try:
        with pytest.raises(InferenceServerException) as e:
            grpcclient.InferenceServerClient(running.grpc_url).load_model("front")
        assert "'front' is a route; a model needs a name of its own" in e.value.message()
    finally:
        running.stop()


def test_in_explicit_mode_a_route_on_a_model_the_repository_lacks_is_refused(repo, tmp_path):
    route = {"name": "typo", "variants": [{"name": "a", "model": "clf_aa", "weight": 1}]}
    with pytest.raises(ConfigError) as e:
        start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), [route]), model_control_mode="explicit")
    assert "'a' uses model 'clf_aa', not in the repository" in str(e.value)
    ok = {"name": "fine", "variants": [{"name": "a", "model": "clf_a", "weight": 1}]}  # a folder not yet loaded
    start_gateway(repo, config_file=write_config(str(tmp_path / "d.yaml"), [ok]), model_control_mode="explicit").stop()


def test_a_route_on_a_version_the_loaded_model_lacks_is_refused_at_start(repo, tmp_path):
    """Before, the server started and said ready with the variant's version missing: the route
    was never ready and the requests that variant drew were refused, uncounted."""
    route = {
        "name": "v7",
        "variants": [
            {"name": "a", "model": "clf_a", "weight": 90},
            {"name": "b", "model": "clf_same", "version": "7", "weight": 10},
        ],
    }
    with pytest.raises(ConfigError) as e:
        start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), [route]))
    assert "route 'v7': 'b': model 'clf_same' has no version 7 loaded; loaded versions: 1" in str(e.value)


def test_a_variant_that_stops_fitting_while_a_shadows_model_is_unloaded_takes_the_route_out(repo, tmp_path):
    """With one member not loaded (here the shadow's model) the signatures were not checked at
    all: a variant with weight then reloaded with other inputs left the route ready, and its
    share of the requests answered 400. Now the members loaded are checked: the route refuses,
    naming the variant and the tensor."""
    from pathlib import Path

    import tritonclient.http as httpclient

    routes = [
        {
            "name": "halves",
            "variants": [
                {"name": "a", "model": "clf_a", "weight": 50},
                {"name": "b", "model": "clf_same", "weight": 50},
            ],
            "shadows": [{"name": "s", "model": "clf_other", "percent": 100}],
        }
    ]
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        routes,
        repository={"model_control_mode": "explicit", "load_model": ["*"]},
        auth={"allow_open_admin": True},
    )
    running = start_gateway(repo, config_file=cfg)
    try:
        admin = httpclient.InferenceServerClient(running.http_url)
        admin.unload_model("clf_other")
        other = (Path(repo) / "strings" / "1" / "model.onnx").read_bytes()  # takes strings, not features
        admin.load_model("clf_same", config=json.dumps({"max_batch_size": 8}), files={"file:1/model.onnx": other})
        assert not admin.is_model_ready("halves")
        with pytest.raises(InferenceServerException, match="variant 'b' \\(clf_same\\) has no input 'features'"):
            infer_grpc(running.grpc_url, "halves")
    finally:
        running.stop()


def test_a_variant_or_shadow_gone_from_a_route_takes_its_series_with_it(repo, tmp_path):
    """A route removed from the configuration took its series with it; a variant renamed or a
    shadow removed kept theirs for the life of the process (a routes file that names each
    release's canary anew grew /metrics by every name it ever had)."""
    routes_file = tmp_path / "routes.yaml"
    route = {
        "name": "rename",
        "variants": [
            {"name": "stable", "model": "clf_a", "weight": 50},
            {"name": "canary-1", "model": "clf_same", "weight": 50},
        ],
        "shadows": [{"name": "next-1", "model": "clf_other", "percent": 100}],
        "compare": {"output": "probabilities", "kind": "classification"},
    }
    write_config(str(routes_file), [route])
    cfg = write_config(str(tmp_path / "c.yaml"), [], routing={"routes_file": str(routes_file), "routes_poll_s": 0.1})
    running = start_gateway(repo, config_file=cfg)
    try:
        for variant in ("stable", "canary-1"):
            infer_grpc(running.grpc_url, "rename", headers={"x-batchgate-variant": variant})
        _until(lambda: 'shadow="next-1"' in _metrics(running))
        assert 'variant="canary-1"' in _metrics(running)
        route["variants"][1]["name"] = "canary-2"
        route["shadows"][0]["name"] = "next-2"
        write_config(str(routes_file), [route])
        _until(lambda: metric(_metrics(running), "batchgate_routes_reloads_total", outcome="ok") == 1)
        infer_grpc(running.grpc_url, "rename", headers={"x-batchgate-variant": "canary-2"})
        _until(lambda: 'shadow="next-2"' in _metrics(running))
        text = _metrics(running)
        assert 'variant="canary-1"' not in text and 'shadow="next-1"' not in text
        # what stayed in the route keeps counting from where it was
        assert metric(text, "batchgate_route_requests_total", route="rename", variant="stable", status="OK") == 1
        assert metric(text, "batchgate_route_requests_total", route="rename", variant="canary-2", status="OK") == 1
    finally:
        running.stop()


def test_a_route_shows_only_the_outputs_every_variant_gives(repo, tmp_path):
    """A variant may give more outputs than the first; the route's metadata and config were its
    heaviest variant's, so they listed an output the other variants lack, and a client that asked
    for it was refused on their share of its requests ("model 'clf_a' has no output 'label'")."""
    import tritonclient.http as httpclient

    route = {
        "name": "extra",
        "variants": [
            {"name": "stable", "model": "clf_a", "weight": 40},
            {"name": "canary", "model": "clf_labelled", "weight": 60},
        ],
    }
    running = start_gateway(repo, config_file=write_config(str(tmp_path / "c.yaml"), [route]))
    try:
        h = httpclient.InferenceServerClient(running.http_url)
        g = grpcclient.InferenceServerClient(running.grpc_url)
        assert [o["name"] for o in h.get_model_metadata("extra")["outputs"]] == ["probabilities"]
        assert [o.name for o in g.get_model_metadata("extra").outputs] == ["probabilities"]
        assert [o["name"] for o in h.get_model_config("extra")["output"]] == ["probabilities"]
        assert [o.name for o in g.get_model_config("extra").config.output] == ["probabilities"]
        # the model itself still shows both
        assert [o["name"] for o in h.get_model_metadata("clf_labelled")["outputs"]] == ["probabilities", "label"]
    finally:
        running.stop()
