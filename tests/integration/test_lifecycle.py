"""Model repository lifecycle under traffic: poll-mode reloads, explicit load/unload,
version policies, models that fail to load."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.demo import SIMPLE_CONFIG, _save, classifier_model, simple_model

FEATURES = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


def expected(path: str) -> np.ndarray:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {"features": FEATURES})[0]


class Traffic:
    """Clients (gRPC and HTTP) calling one model in a loop until stopped; records every outcome."""

    def __init__(self, running, model: str, threads_per_protocol: int = 2):
        self.running, self.model = running, model
        self.stop_flag = threading.Event()
        self.ok: list[tuple[str, np.ndarray]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._loop, args=(mod,), daemon=True)
            for mod in (grpcclient, httpclient)
            for _ in range(threads_per_protocol)
        ]

    def _loop(self, mod):
        url = self.running.grpc_url if mod is grpcclient else self.running.http_url
        client = mod.InferenceServerClient(url)
        while not self.stop_flag.is_set():
            inp = mod.InferInput("features", [2, 4], "FP32")
            inp.set_data_from_numpy(FEATURES)
            try:
                r = client.infer(self.model, [inp])
                version = r.get_response()["model_version"] if mod is httpclient else r.get_response().model_version
                with self.lock:
                    self.ok.append((version, r.as_numpy("probabilities")))
            except InferenceServerException as e:
                with self.lock:
                    self.errors.append(str(e))
        client.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)

    def wait_for(self, pred, timeout: float = 30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if pred(self.ok):
                    return
            time.sleep(0.05)
        raise AssertionError("condition not reached under traffic")


def _atomic_save(model, repo, name, version):
    """Write a version directory elsewhere, then move it in with one rename."""
    staging = os.path.join(repo, ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    path = _save(model, staging, name, version)
    os.rename(os.path.dirname(path), os.path.join(repo, name, str(version)))
    shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(repo, name, str(version), "model.onnx")


def test_poll_mode_picks_up_a_new_version_under_traffic_without_failures(tmp_path, serve):
    repo = str(tmp_path)
    v1 = _save(classifier_model(seed=0), repo, "clf", 1)
    running = serve(repo, model_control_mode="poll", repository_poll_secs=0.2)
    want1 = expected(v1)
    with Traffic(running, "clf") as t:
        t.wait_for(lambda ok: len(ok) > 20)
        v2 = _atomic_save(classifier_model(seed=1, bias_shift=3.0), repo, "clf", 2)
        want2 = expected(v2)
        t.wait_for(lambda ok: sum(1 for v, _ in ok if v == "2") > 20)
    assert t.errors == []
    versions = {v for v, _ in t.ok}
    assert versions == {"1", "2"}
    for v, out in t.ok:
        np.testing.assert_allclose(out, want1 if v == "1" else want2, rtol=1e-5)
    idx = httpclient.InferenceServerClient(running.http_url).get_model_repository_index()
    assert [(r["name"], r["version"], r["state"]) for r in idx] == [("clf", "2", "READY")]


def test_poll_mode_loads_new_models_and_unloads_removed_ones(tmp_path, serve):
    repo = str(tmp_path)
    _save(classifier_model(), repo, "a", 1)
    running = serve(repo, model_control_mode="poll", repository_poll_secs=0.2)
    c = httpclient.InferenceServerClient(running.http_url)
    assert c.is_model_ready("a") and not c.is_model_ready("b")
    staging = tmp_path / ".b"
    _save(classifier_model(), str(staging), "b", 1)
    os.rename(staging / "b", tmp_path / "b")
    _wait(lambda: c.is_model_ready("b"))
    shutil.rmtree(tmp_path / "a")
    _wait(lambda: not c.is_model_ready("a"))
    assert [r["name"] for r in c.get_model_repository_index()] == ["b"]


def test_explicit_reload_under_traffic_loses_nothing(tmp_path, serve):
    repo = str(tmp_path)
    _save(classifier_model(), repo, "clf", 1)
    running = serve(repo, model_control_mode="explicit", load_model=("clf",))
    admin = grpcclient.InferenceServerClient(running.grpc_url)
    with Traffic(running, "clf") as t:
        for _ in range(5):
            t.wait_for(lambda ok, n=len(t.ok): len(ok) > n + 10)
            admin.load_model("clf")  # a reload: swap in fresh sessions
    assert t.errors == []
    assert len(t.ok) > 50


def test_unloading_one_model_does_not_disturb_another(tmp_path, serve):
    repo = str(tmp_path)
    _save(classifier_model(), repo, "clf", 1)
    _save(simple_model(), repo, "simple", 1, config=SIMPLE_CONFIG)
    running = serve(repo, model_control_mode="explicit", load_model=("*",))
    admin = httpclient.InferenceServerClient(running.http_url)
    with Traffic(running, "clf") as t:
        for _ in range(3):
            admin.unload_model("simple")
            assert not admin.is_model_ready("simple")
            admin.load_model("simple")
            assert admin.is_model_ready("simple")
        t.wait_for(lambda ok: len(ok) > 20)
    assert t.errors == []


def test_a_model_that_fails_to_load_is_reported_and_others_serve(tmp_path, serve):
    repo = str(tmp_path)
    _save(classifier_model(), repo, "good", 1)
    os.makedirs(tmp_path / "broken" / "1")
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    os.makedirs(tmp_path / "empty")
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.pbtxt").write_text("max_batch_size: [oops")
    _save(classifier_model(), repo, "badcfg", 1)
    running = serve(repo)
    c = httpclient.InferenceServerClient(running.http_url)
    assert c.is_server_live()
    assert not c.is_server_ready()  # strict readiness: models that should serve do not
    assert c.is_model_ready("good") and not c.is_model_ready("broken")
    rows = {r["name"]: r for r in c.get_model_repository_index()}
    assert rows["good"]["state"] == "READY"
    assert rows["broken"]["state"] == "UNAVAILABLE" and "ONNX Runtime cannot load" in rows["broken"]["reason"]
    assert rows["empty"]["state"] == "UNAVAILABLE" and "no version directory" in rows["empty"]["reason"]
    assert rows["badcfg"]["state"] == "UNAVAILABLE" and "config.pbtxt" in rows["badcfg"]["reason"]
    inp = httpclient.InferInput("features", [2, 4], "FP32")
    inp.set_data_from_numpy(FEATURES)
    with pytest.raises(InferenceServerException) as e:
        c.infer("broken", [inp])
    assert e.value.status() == "503" and "not ready" in e.value.message()


@pytest.mark.parametrize(
    "policy, served",
    [
        ("", ["3"]),
        ("version_policy: { latest { num_versions: 2 } }", ["2", "3"]),
        ("version_policy: { all { } }", ["1", "2", "3"]),
        ("version_policy: { specific { versions: [1, 3] } }", ["1", "3"]),
    ],
)
def test_version_policies(tmp_path, serve, policy, served):
    repo = str(tmp_path)
    for v in (1, 2, 3):
        _save(classifier_model(seed=v), repo, "clf", v)
    (tmp_path / "clf" / "config.pbtxt").write_text(policy + "\n")
    running = serve(repo)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    assert list(c.get_model_metadata("clf").versions) == served
    for v in ("1", "2", "3"):
        assert c.is_model_ready("clf", v) == (v in served)
    inp = grpcclient.InferInput("features", [2, 4], "FP32")
    inp.set_data_from_numpy(FEATURES)
    # No version asked: the highest served version answers.
    assert c.infer("clf", [inp]).get_response().model_version == served[-1]
    want = expected(str(tmp_path / "clf" / served[0] / "model.onnx"))
    np.testing.assert_allclose(
        c.infer("clf", [inp], model_version=served[0]).as_numpy("probabilities"), want, rtol=1e-5
    )


def _wait(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")
