"""Strict readiness (Triton's default): the server is ready only while every model that should
be loaded is ready; liveness stays separate. Remote models count for the first readiness only."""

from __future__ import annotations

import os
import time

import grpc
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protocol_support import QUICK
from tritonclient.utils import InferenceServerException

from batchgate.config import RemoteModel
from batchgate.demo import _save, classifier_model

SERVICE = "inference.GRPCInferenceService"


def views(running) -> tuple[bool, bool, int]:
    """Readiness as HTTP, gRPC ServerReady and the gRPC health service say it."""
    http = httpclient.InferenceServerClient(running.http_url)
    g = grpcclient.InferenceServerClient(running.grpc_url)
    with grpc.insecure_channel(running.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        health = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        # kubelet's gRPC liveness probe asks "liveness": alive whatever readiness says
        alive = stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
    assert alive.status == health_pb2.HealthCheckResponse.SERVING
    assert http.is_server_live() and g.is_server_live()  # not ready is still alive
    return http.is_server_ready(), g.is_server_ready(), health.status


def wait_for(running, ready: bool, timeout: float = 10.0) -> tuple[bool, bool, int]:
    serving = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    end = time.monotonic() + timeout
    while True:
        got = views(running)
        if got == (ready, ready, serving) or time.monotonic() > end:
            return got
        time.sleep(0.1)


def broken_repo(root) -> str:
    _save(classifier_model(), str(root), "good")
    os.makedirs(root / "broken" / "1")
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    return str(root)


NOT_READY = (False, False, health_pb2.HealthCheckResponse.NOT_SERVING)
READY = (True, True, health_pb2.HealthCheckResponse.SERVING)


def test_a_model_that_failed_to_load_keeps_the_server_not_ready(tmp_path, serve):
    running = serve(broken_repo(tmp_path), **QUICK)
    assert wait_for(running, False) == NOT_READY
    assert running.gateway.dataplane.model_ready("good")


def test_strict_readiness_can_be_turned_off(tmp_path, serve):
    running = serve(broken_repo(tmp_path), strict_readiness=False, **QUICK)
    assert wait_for(running, True) == READY


def test_fixing_the_model_makes_the_server_ready(tmp_path, serve):
    repo = broken_repo(tmp_path)
    running = serve(repo, model_control_mode="poll", repository_poll_s=3600, **QUICK)
    assert wait_for(running, False) == NOT_READY
    _save(classifier_model(), repo, "broken")
    running.call(running.gateway.repository.poll_once())
    assert wait_for(running, True) == READY


def test_explicit_mode_expects_what_was_asked_for(tmp_path, serve):
    repo = broken_repo(tmp_path)
    running = serve(repo, model_control_mode="explicit", load_model=("good",), **QUICK)
    assert wait_for(running, True) == READY  # 'broken' was not asked for
    g = grpcclient.InferenceServerClient(running.grpc_url)
    g.unload_model("good")
    assert wait_for(running, True) == READY
    g.load_model("good")
    assert wait_for(running, True) == READY
    # Asked for and failed: not ready (as Triton), until it loads or is unloaded.
    try:
        g.load_model("broken")
        raise AssertionError("a model that is not ONNX loaded")
    except InferenceServerException:
        pass
    assert wait_for(running, False) == NOT_READY
    g.unload_model("broken")
    assert wait_for(running, True) == READY


def test_a_failed_load_of_a_name_the_repository_lacks_leaves_readiness_as_it_was(tmp_path, serve):
    """Nothing of such a load stays, so nothing can be unloaded: it must not be expected either
    (it was, and one bad upload took the server out of its Service until a restart)."""
    repo = broken_repo(tmp_path)
    running = serve(repo, model_control_mode="explicit", load_model=("good",), **QUICK)
    assert wait_for(running, True) == READY
    g = grpcclient.InferenceServerClient(running.grpc_url)
    config = '{"name": "ghost", "platform": "onnxruntime_onnx", "max_batch_size": 0}'
    for files in ({"file:1/model.onnx": b"not onnx"}, None):  # uploaded files, or a config alone
        try:
            g.load_model("ghost", config=config, files=files)
            raise AssertionError("a model that is not ONNX loaded")
        except InferenceServerException as e:
            assert "ghost" in e.message()
        assert [m.name for m in g.get_model_repository_index().models] == ["broken", "good"]
        assert wait_for(running, True, timeout=1.0) == READY


def test_a_remote_model_counts_until_it_has_served_once(tmp_path, serve):
    up_repo = tmp_path / "up"
    up_repo.mkdir()
    _save(classifier_model(), str(up_repo), "clf")
    upstream = serve(str(up_repo), **QUICK)
    spec = RemoteModel("clf", (upstream.grpc_url,), batching="passthrough", probe_interval_s=0.1, eject_s=0.3)
    running = serve("", remote_models=(spec,), **QUICK)
    assert wait_for(running, True) == READY
    upstream.stop()
    g = grpcclient.InferenceServerClient(running.grpc_url)
    end = time.monotonic() + 10
    while g.is_model_ready("clf") and time.monotonic() < end:
        time.sleep(0.1)
    assert not g.is_model_ready("clf")  # the model is out...
    assert views(running) == READY  # ...but the replica stays in its Service


def test_a_remote_model_whose_upstreams_are_down_at_start_keeps_the_server_not_ready(serve):
    spec = RemoteModel("clf", ("127.0.0.1:1",), batching="passthrough", probe_interval_s=0.1)
    running = serve("", remote_models=(spec,), **QUICK)
    assert wait_for(running, False) == NOT_READY
