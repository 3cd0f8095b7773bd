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
from gateway_support import eventually

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
    # (a model not ready is being unloaded; it leaves the index once that is done: read on a
    # machine busy with four test processes, the index still listed it)
    _wait(lambda: [r["name"] for r in c.get_model_repository_index()] == ["b"])


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
        ("version_policy: { specific { versions: [3, 7, 1] } }", ["1", "3"]),  # (7: no directory, said once)
    ],
)
def test_version_policies(tmp_path, serve, policy, served, caplog):
    repo = str(tmp_path)
    for v in (1, 2, 3):
        _save(classifier_model(seed=v), repo, "clf", v)
    (tmp_path / "clf" / "config.pbtxt").write_text(policy + "\n")
    caplog.set_level("WARNING", logger="batchgate.repository")
    running = serve(repo)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    assert list(c.get_model_metadata("clf").versions) == served
    said = [r.getMessage() for r in caplog.records if "no directory" in r.getMessage()]
    assert said == (["model 'clf': version_policy names version(s) 7, which have no directory; serving 1, 3"]
                    if "7" in policy else [])  # fmt: skip
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


def _infer_body() -> bytes:
    import json

    x = FEATURES.tolist()
    return json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 4], "data": x}]}).encode()


def test_a_request_whose_body_is_on_the_way_during_a_reload_is_answered(tmp_path, serve):
    """An HTTP request is admitted to a version as its head arrives. Before, a reload that
    swapped that version out while the body was still on the way closed its scheduler at once,
    and the request was refused 503 "shutting down" though the new version was ready."""
    import json
    import socket

    repo = str(tmp_path)
    path = _save(classifier_model(), repo, "clf", 1)
    running = serve(repo, model_control_mode="explicit", load_model=("clf",))
    admin = httpclient.InferenceServerClient(running.http_url)
    body = _infer_body()
    with socket.create_connection(("127.0.0.1", running.gateway.http_port), timeout=20) as s:
        head = f"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        s.sendall(head.encode() + body[:10])
        time.sleep(0.3)  # (admitted: its head read)
        admin.load_model("clf")  # a reload: the version it was admitted to is swapped out
        assert admin.is_model_ready("clf")
        s.sendall(body[10:])
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 200"), answer[:200]
    out = json.loads(rest[: int(re_length(head_bytes))])["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 3), expected(path).reshape(2, 3), rtol=1e-6)


def re_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    raise AssertionError(f"no Content-Length in {head!r}")


def test_a_request_during_an_unload_is_told_the_model_is_unloading(tmp_path, serve):
    """Before, while an unload waited for queued requests, a new request was refused with an
    empty reason ("model 'm' is not ready: ") and the index said UNLOADING with no reason."""
    repo = str(tmp_path)
    config = SIMPLE_CONFIG.replace('name: "simple"', 'name: "slowq"') + (
        "dynamic_batching { preferred_batch_size: [8] max_queue_delay_microseconds: 2000000 }\n"
    )
    _save(simple_model(), repo, "slowq", 1, config=config)
    running = serve(repo, model_control_mode="explicit", load_model=("slowq",))
    c = grpcclient.InferenceServerClient(running.grpc_url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = []
    for n in ("INPUT0", "INPUT1"):
        i = grpcclient.InferInput(n, [1, 16], "INT32")
        i.set_data_from_numpy(a)
        inputs.append(i)
    queued = threading.Thread(target=lambda: c.infer("slowq", inputs))  # waits out the queue delay
    queued.start()
    eventually(lambda: running.gateway.dataplane.in_flight == 1, "the first request was not queued")
    unload = threading.Thread(target=lambda: httpclient.InferenceServerClient(running.http_url).unload_model("slowq"))
    unload.start()

    def state() -> dict:
        index = httpclient.InferenceServerClient(running.http_url).get_model_repository_index()
        return next(m for m in index if m["name"] == "slowq")

    try:
        eventually(lambda: state()["state"] == "UNLOADING", "the unload did not start", timeout=1.5)
        assert state()["reason"] == "unloading"
        with pytest.raises(InferenceServerException, match=r"not ready: unloading"):
            c.infer("slowq", inputs)
    finally:
        queued.join(10)
        unload.join(10)
