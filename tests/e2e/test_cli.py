"""The ``batchgate`` command as a user runs it: a real subprocess, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.demo import _save, classifier_model, slow_model
from processes import BATCHGATE, Proc, serve_args


@pytest.fixture
def proc():
    started = []

    def start(args, env=None, preexec=None):
        p = Proc(args, env, preexec)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    repo = str(tmp_path_factory.mktemp("repo"))
    _save(classifier_model(), repo, "clf")
    return repo


def test_serve_on_free_ports_answers_both_protocols(proc, small_repo):
    p = proc(serve_args(small_repo)).wait_ready()
    x = np.ones((1, 4), np.float32)
    for mod, url in ((grpcclient, p.grpc), (httpclient, p.http)):
        c = mod.InferenceServerClient(url)
        inp = mod.InferInput("features", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        assert c.infer("clf", [inp]).as_numpy("probabilities").shape == (1, 3)
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics").read().decode()
    assert 'batchgate_requests_total{model="clf",protocol="grpc",status="OK",version="1"} 1.0' in text


def test_sigterm_drains_in_flight_work_then_exits_zero(proc, tmp_path):
    repo = str(tmp_path)
    _save(slow_model(layers=192), repo, "slow", config="max_batch_size: 64\n")
    p = proc(serve_args(repo, "--exit-timeout-secs", "60")).wait_ready()
    x = np.ones((64, 1024), np.float32)

    def call(_):
        c = grpcclient.InferenceServerClient(p.grpc)
        inp = grpcclient.InferInput("input", [64, 1024], "FP32")
        inp.set_data_from_numpy(x)
        return c.infer("slow", [inp]).as_numpy("output").shape

    http = httpclient.InferenceServerClient(p.http)
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(call, i) for i in range(32)]
        deadline = time.monotonic() + 20
        # Wait until the server has accepted every request, then ask it to stop.
        metrics = f"http://127.0.0.1:{p.ports[2]}/metrics"
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(metrics).read().decode()
            inflight = _sample(text, 'batchgate_inflight_requests{model="slow",version="1"}')
            done = _sample(text, 'batchgate_requests_total{model="slow",protocol="grpc",status="OK",version="1"}')
            if inflight + done >= 32:
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the server never accepted all 32 requests")
        assert inflight >= 4, "too little work left in flight to test draining"
        p.p.send_signal(signal.SIGTERM)
        # Readiness turns false at once, and new work is refused, while accepted work still runs.
        end = time.monotonic() + 5
        while http.is_server_ready() and time.monotonic() < end:
            time.sleep(0.005)
        assert not http.is_server_ready()
        inp = httpclient.InferInput("input", [1, 1024], "FP32")
        inp.set_data_from_numpy(np.ones((1, 1024), np.float32))
        with pytest.raises(InferenceServerException) as refused:
            http.infer("slow", [inp])
        assert refused.value.status() == "503"
        results = [f.result(60) for f in futures]
    assert results == [(64, 1024)] * 32
    assert p.p.wait(30) == 0, p.output()
    assert "draining" in p.output()


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--http-port", "70000"], {}, "http_port must be between 0 and 65535"),
        (
            ["--model-control-mode", "explicit", "--repository-poll-secs", "0"],
            {},
            "repository_poll_secs must be greater than 0",
        ),
        ([], {"BATCHGATE_MAX_QUEUE_SIZE": "lots"}, "BATCHGATE_MAX_QUEUE_SIZE: 'max_queue_size' must be an integer"),
        ([], {"BATCHGATE_LOG_FORMAT": "xml"}, "log_format must be one of plain, json"),
    ],
)
def test_bad_settings_exit_nonzero_with_a_clear_message(small_repo, args, env, message):
    r = subprocess.run(
        BATCHGATE + serve_args(small_repo)[:3] + args,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert r.returncode == 2
    assert message in r.stderr


def test_bad_config_file_and_missing_repository(tmp_path):
    cfg = tmp_path / "bg.yaml"
    cfg.write_text("http_port: 8000\nbogus_setting: 1\n")
    r = subprocess.run(
        BATCHGATE + ["serve", "--config", str(cfg), "--model-repository", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "unknown setting 'bogus_setting'" in r.stderr
    r = subprocess.run(
        BATCHGATE + ["serve", "--model-repository", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "is not a directory" in r.stderr


def test_config_file_and_env_and_json_logs_with_request_id(proc, small_repo, tmp_path):
    cfg = tmp_path / "bg.yaml"
    cfg.write_text(
        f"model_repository: {small_repo}\nhost: 127.0.0.1\nhttp_port: 0\ngrpc_port: 0\n"
        "metrics_port: 0\nadmin_port: -1\nlog_format: plain\n"
    )
    p = proc(["serve", "--config", str(cfg)], env={"BATCHGATE_LOG_FORMAT": "json"}).wait_ready()
    c = httpclient.InferenceServerClient(p.http)
    inp = httpclient.InferInput("features", [1, 5], "FP32")
    inp.set_data_from_numpy(np.ones((1, 5), np.float32))
    with pytest.raises(InferenceServerException):
        c.infer("clf", [inp], request_id="req-42")
    gc = grpcclient.InferenceServerClient(p.grpc)
    ginp = grpcclient.InferInput("features", [1, 5], "FP32")
    ginp.set_data_from_numpy(np.ones((1, 5), np.float32))
    with pytest.raises(InferenceServerException):
        gc.infer("clf", [ginp], headers={"x-request-id": "trace-7"})
    time.sleep(0.3)
    records = [json.loads(line) for line in p.output().splitlines() if line.startswith("{")]
    assert records, p.output()
    by_id = {r.get("request_id"): r for r in records}
    assert "req-42" in by_id and "INVALID_ARGUMENT" in by_id["req-42"]["msg"]
    assert "trace-7" in by_id


def test_settings_command_lists_every_setting():
    r = subprocess.run(BATCHGATE + ["settings"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "BATCHGATE_MAX_REQUEST_BYTES" in r.stdout and "model_control_mode" in r.stdout


def test_max_connections_is_fitted_to_the_file_descriptor_limit(proc, small_repo):
    """A process allowed fewer file descriptors than max_connections needs (two per connection:
    HTTP and gRPC, plus a reserve) bounds its connections by what it may open and says so,
    instead of failing accepts with EMFILE at random; the HTTP connection past that bound is
    answered 503 and closed."""
    import resource
    import socket

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))

    p = proc(serve_args(small_repo, "--max-connections", "1000"), preexec=low_limit).wait_ready()
    assert "connections are bounded at 44 per protocol" in p.output(), p.output()[-2000:]
    host, port = p.http.split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(44)]
    try:
        with socket.create_connection((host, int(port)), timeout=5) as extra:
            extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"(max_connections)" in reply, reply[:200]
    finally:
        for s in held:
            s.close()
