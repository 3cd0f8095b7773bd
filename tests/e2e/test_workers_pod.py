"""A pod of worker processes (``--workers 2``) seen as one server by a demanding client: the V2
statistics, ``/metrics`` and the control plane agree with what one process would say, whichever
worker a connection reaches.

Real ``batchgate serve`` subprocesses, real tritonclient clients over both protocols, ONNX models
built here (a doubling of FP64 rows); a worker is reached by opening new connections."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from test_workers import _metrics, _ready_everywhere, _server_ready_everywhere, _value

from gateway_support import eventually
from processes import Proc, serve_args

PID = re.compile(r"worker (\d+) \(pid (\d+)\) ready")


def _kill_and_wait(p: Proc, slot: int) -> None:
    """SIGKILL worker ``slot`` and wait until it has started again, caught up and listens."""

    def pids() -> dict[int, int]:
        return {int(m.group(1)): int(m.group(2)) for m in PID.finditer(p.output())}

    victim = pids()[slot]
    os.kill(victim, signal.SIGKILL)
    end = time.monotonic() + 60
    while pids()[slot] == victim:
        assert time.monotonic() < end, p.output()
        time.sleep(0.1)


def _doubler(path: str, name: str = "dbl") -> None:
    """A model ``name`` in the repository ``path``: FP64 [-1, 3] X -> Y = X + X, batching."""
    x = helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["b", 3])
    y = helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["b", 3])
    graph = helper.make_graph([helper.make_node("Add", ["X", "X"], ["Y"])], name, [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    os.makedirs(os.path.join(path, name, "1"))
    onnx.save(model, os.path.join(path, name, "1", "model.onnx"))
    with open(os.path.join(path, name, "config.pbtxt"), "w") as f:
        f.write("max_batch_size: 8\ndynamic_batching {}\n")


def _infer(url: str, model: str = "dbl") -> None:
    """One gRPC call on a connection of its own (so the kernel may hand it to either worker)."""
    c = grpcclient.InferenceServerClient(url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
    try:
        x = grpcclient.InferInput("X", [1, 3], "FP64")
        x.set_data_from_numpy(np.array([[1.0, 2.0, 3.0]]))
        out = c.infer(model, [x], client_timeout=30).as_numpy("Y")
        assert out.tolist() == [[2.0, 4.0, 6.0]]
    finally:
        c.close()


def _successes(p: Proc, name: str = "dbl") -> tuple[int, int]:
    """The model's (or route's) successful inferences in the V2 statistics, asked over HTTP and over gRPC."""
    h = httpclient.InferenceServerClient(p.http)
    g = grpcclient.InferenceServerClient(p.grpc)
    try:
        over_http = h.get_inference_statistics(name)["model_stats"][0]["inference_stats"]["success"]["count"]
        over_grpc = g.get_inference_statistics(name, as_json=True)["model_stats"][0]["inference_stats"]["success"]
        return int(over_http), int(over_grpc.get("count", 0))
    finally:
        h.close()
        g.close()


@pytest.fixture
def repo(tmp_path):
    _doubler(str(tmp_path / "models"))
    return str(tmp_path / "models")


def _until_worker_1_answers(p: Proc, model: str) -> None:
    """Calls on new connections until worker 1 has answered some more of them (the kernel spreads
    connections over the workers); then a scrape, which reads every worker's figures."""
    series = 'batchgate_worker_requests_total{worker="1"}'
    before = _value(_metrics(p), series)
    end = time.monotonic() + 60
    while _value(_metrics(p), series) == before:
        assert time.monotonic() < end, "worker 1 never answered"
        for _ in range(4):
            _infer(p.grpc, model)


def test_statistics_asked_right_after_a_reload_count_only_the_new_versions(repo):
    """A reload's new version counts from zero, as in one process, also when the statistics are
    asked at once: the workers' figures read just before the load (reused for half a second)
    held the old version's counts, and were answered as the new one's."""
    p = Proc(serve_args(repo, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "dbl",
                        "--allow-open-admin", "true"))  # fmt: skip
    try:
        p.wait_ready()
        for _ in range(6):
            _infer(p.grpc)
        # (a reading up to 0.5 s old may be reused: until one is read after the calls)
        eventually(lambda: _successes(p) == (6, 6), "the statistics never counted the six calls", 30)
        httpclient.InferenceServerClient(p.http).load_model("dbl")
        assert _successes(p) == (0, 0)
        for _ in range(3):
            _infer(p.grpc)
        eventually(lambda: _successes(p) == (3, 3), "the statistics never counted the new version's calls", 30)
    finally:
        p.kill()


def _negation() -> bytes:
    """An ONNX model uploaded by a load call (no folder in the repository): INT32 [-1, 2] A -> B = -A."""
    a = helper.make_tensor_value_info("A", TensorProto.INT32, ["b", 2])
    b = helper.make_tensor_value_info("B", TensorProto.INT32, ["b", 2])
    graph = helper.make_graph([helper.make_node("Neg", ["A"], ["B"])], "neg", [a], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _indexes(p: Proc) -> set[str]:
    """The repository indexes 16 new connections (both workers answer some) were given, over gRPC."""
    seen = set()
    for _ in range(16):
        c = grpcclient.InferenceServerClient(p.grpc, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        rows = c.get_model_repository_index(as_json=True).get("models", [])
        seen.add(json.dumps(sorted((r["name"], r.get("version", ""), r.get("state", "")) for r in rows)))
        c.close()
    return seen


def test_a_worker_started_after_an_uploaded_model_was_unloaded_lists_it_as_the_others_do(repo):
    """A model a load call uploaded (no folder in the repository), then unloaded: every worker
    lists it unloaded with the version it served. A worker started after the unload never knew
    the name, and left it out of its index: the answer depended on the connection."""
    p = Proc(serve_args(repo, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "dbl",
                        "--allow-open-admin", "true"))  # fmt: skip
    try:
        p.wait_ready()
        c = grpcclient.InferenceServerClient(p.grpc)
        c.load_model("neg", config=json.dumps({"max_batch_size": 4}), files={"file:1/model.onnx": _negation()})
        x = grpcclient.InferInput("A", [1, 2], "INT32")
        x.set_data_from_numpy(np.array([[1, -2]], np.int32))
        assert c.infer("neg", [x]).as_numpy("B").tolist() == [[-1, 2]]
        c.unload_model("neg")
        c.close()
        unloaded = {json.dumps([["dbl", "1", "READY"], ["neg", "1", "UNAVAILABLE"]])}
        assert _indexes(p) == unloaded
        _kill_and_wait(p, 1)
        assert _indexes(p) == unloaded
    finally:
        p.kill()


def _routes(path, variant: str | None) -> None:
    """The routes file: route ``r`` over the model ``dbl`` through ``variant`` (None: no route)."""
    routes = [] if variant is None else [{"name": "r", "variants": [{"name": variant, "model": "dbl", "weight": 100}]}]
    with open(f"{path}.tmp", "w") as f:
        f.write(json.dumps({"routes": routes}))  # (JSON is YAML)
    os.replace(f"{path}.tmp", path)


def test_what_a_restarted_worker_left_of_a_route_goes_when_the_route_is_redefined_or_removed(repo, tmp_path):
    """One process drops a removed route's figures, and a redefined route is a new one (its V2
    statistics from zero, its old variants' series gone). A worker that exited left its figures of
    the route in the pod's totals: a removed route stayed on /metrics for good, and a redefined
    one's statistics started from the old route's."""
    routes = tmp_path / "routes.yaml"
    _routes(routes, "a")
    p = Proc(serve_args(repo, "--workers", "2", "--routes-file", str(routes), "--routes-poll-s", "0.5"))
    try:
        p.wait_ready()
        _until_worker_1_answers(p, "r")
        _kill_and_wait(p, 1)
        assert _successes(p, "r")[0] > 0

        _routes(routes, "b")  # redefined: a new route
        gone = 'batchgate_route_requests_total{route="r",status="OK",variant="a"}'
        eventually(
            lambda: _successes(p, "r") == (0, 0) and gone not in _metrics(p), "the old route's figures stayed", 30
        )

        _until_worker_1_answers(p, "r")
        _kill_and_wait(p, 1)
        assert 'batchgate_route_requests_total{route="r",status="OK",variant="b"}' in _metrics(p)
        _routes(routes, None)  # removed
        eventually(lambda: 'route="r"' not in _metrics(p) and 'model="r"' not in _metrics(p), "the route stayed", 30)
    finally:
        p.kill()


def test_front_mode_the_requests_per_worker_add_up_to_the_clients_requests(repo):
    """batchgate_worker_requests_total is each worker's share of the clients' requests; the
    model owner of front mode had a series too, counting the same requests again as the workers
    forwarded them: summed over ``worker`` (as a dashboard does) the pod seemed to answer twice."""
    p = Proc(serve_args(repo, "--workers", "2", "--workers-mode", "front"))
    try:
        p.wait_ready()
        for _ in range(10):
            _infer(p.grpc)
        text = _metrics(p)
        per_worker = [line for line in text.splitlines() if line.startswith("batchgate_worker_requests_total{")]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in per_worker) == 10, per_worker
        assert _value(text, 'batchgate_requests_total{model="dbl",protocol="grpc",status="OK",version="1"}') == 10
        assert _value(text, 'batchgate_worker_up{worker="owner"}') == 1
    finally:
        p.kill()


@pytest.mark.parametrize("mode", ["none", "explicit"])
def test_a_restarted_worker_does_not_serve_a_model_folder_the_pod_never_read(repo, mode):
    """A folder added to the repository while the pod serves (``none`` mode, or ``explicit`` with
    ``load_model: '*'``) is not served, as one process would not serve it until a load (or a
    restart of the pod). A worker started again read the repository afresh and served it alone:
    whether a call on it worked depended on the connection."""
    extra = (
        ("--model-control-mode", "explicit", "--load-model", "*", "--allow-open-admin", "true")
        if mode == "explicit"
        else ()
    )
    p = Proc(serve_args(repo, "--workers", "2", *extra))
    try:
        p.wait_ready()
        shutil.copytree(os.path.join(repo, "dbl"), os.path.join(repo, "late"))
        _kill_and_wait(p, 1)
        assert _ready_everywhere(p, "late") == {False}
        assert len(_indexes(p)) == 1
        assert _ready_everywhere(p, "dbl") == {True}
        if mode == "explicit":  # a load makes it the pod's: every worker serves it
            httpclient.InferenceServerClient(p.http).load_model("late")
            assert _ready_everywhere(p, "late") == {True}
    finally:
        p.kill()


def test_a_restarted_worker_is_not_ready_while_the_others_could_not_load_a_model_mended_since(repo):
    """Strict readiness: a model the workers could not load at start keeps them not ready (as one
    process). Its file mended since on disk (``none`` mode reads it once), a worker started again
    loads it, but the others do not serve it: it must not serve it, nor say ready."""
    os.makedirs(os.path.join(repo, "broken", "1"))
    with open(os.path.join(repo, "broken", "1", "model.onnx"), "wb") as f:
        f.write(b"not a model")
    p = Proc(serve_args(repo, "--workers", "2"))

    try:
        p.wait_ready()
        assert _server_ready_everywhere(p) == {False}
        shutil.copy(os.path.join(repo, "dbl", "1", "model.onnx"), os.path.join(repo, "broken", "1", "model.onnx"))
        _kill_and_wait(p, 1)
        assert _server_ready_everywhere(p) == {False}
        assert _ready_everywhere(p, "broken") == {False}
        assert len(_indexes(p)) == 1
    finally:
        p.kill()


def test_an_unloaded_remote_models_upstream_series_go_also_those_a_restarted_worker_left(repo):
    """One process drops a remote model's upstream series when the model is unloaded. A worker
    that exited left its upstream counters in the pod's totals, and they stayed for good."""
    from fake_upstream import FakeUpstream

    fake = FakeUpstream()
    spec = f"name=fk upstreams={fake.address} batching=passthrough"
    p = Proc(serve_args(repo, "--workers", "2", "--remote-model", spec, "--model-control-mode", "explicit",
                        "--allow-open-admin", "true"))  # fmt: skip

    def call() -> None:
        c = grpcclient.InferenceServerClient(p.grpc, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        x = grpcclient.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.array([[1.0, 2.0]], np.float32))
        assert c.infer("fk", [x], client_timeout=30).as_numpy("y").tolist() == [[2.0, 4.0]]
        c.close()

    try:
        p.wait_ready()
        series = 'batchgate_worker_requests_total{worker="1"}'
        end = time.monotonic() + 60
        while _value(_metrics(p), series) == 0:  # (the scrape reads every worker's figures)
            assert time.monotonic() < end, "worker 1 never answered"
            for _ in range(4):
                call()
        _kill_and_wait(p, 1)
        assert 'batchgate_upstream_requests_total{model="fk"' in _metrics(p)
        httpclient.InferenceServerClient(p.http).unload_model("fk")
        left = [line for line in _metrics(p).splitlines() if line.startswith("batchgate_upstream_")]
        assert not [line for line in left if 'model="fk"' in line], left
    finally:
        p.kill()
        fake.stop()


def test_front_mode_shows_the_models_own_config_as_a_replicate_pod_does(repo):
    """A front pod's workers serve the owner's models as remote models: the config clients read
    was theirs, the workers' batching before the hop (500 us, four calls as a KIND_MODEL group)
    and the owner's private socket path, not the model's (its dynamic_batching, instances and
    version policy)."""
    configs = []
    for mode in ("replicate", "front"):
        p = Proc(serve_args(repo, "--workers", "2", "--workers-mode", mode))
        try:
            p.wait_ready()
            g = grpcclient.InferenceServerClient(p.grpc)
            over_grpc = g.get_model_config("dbl", as_json=True)["config"]
            g.close()
            over_http = httpclient.InferenceServerClient(p.http).get_model_config("dbl")
            configs.append((over_grpc, over_http))
        finally:
            p.kill()
    assert configs[1] == configs[0]
    assert "remote_upstreams" not in json.dumps(configs[1])
