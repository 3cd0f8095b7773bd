"""Remote models: batchgate in front of upstream V2 servers, over real sockets.

Each upstream is a second batchgate process (ONNX backend) started on ephemeral ports:
a real Open Inference Protocol server across the network. The gateway runs in this
process (the ``serve`` fixture) and is queried with real tritonclient clients."""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.config import RemoteModel
from batchgate.demo import _model, _save, classifier_model, identity_model, slow_model
from gateway_support import gather_model
from processes import Proc, free_port

CLASSIFIER = "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 500 }\n"
# `make test` runs this module twice: calls through batchgate's own HTTP/2 client (the default),
# then through grpc.aio's channel (BATCHGATE_TEST_REMOTE_CLIENT=grpcio)
FAST = dict(
    probe_interval_s=0.1,
    eject_s=0.3,
    eject_after_failures=3,
    client=os.environ.get("BATCHGATE_TEST_REMOTE_CLIENT", "h2"),
)


@pytest.fixture
def upstream():
    """Start batchgate processes over a repository; each is killed at the end of the test."""
    started: list[Proc] = []

    def start(repo, *extra, ports=(0, 0)):
        p = Proc(
            [
                "serve",
                "--model-repository",
                str(repo),
                "--host",
                "127.0.0.1",
                "--http-port",
                str(ports[0]),
                "--grpc-port",
                str(ports[1]),
                "--metrics-port",
                "0",
                "--admin-port",
                "-1",
                "--admin-http-port",
                "-1",
                "--allow-open-admin",
                "true",
                "--log-level",
                "info",
                *extra,
            ]
        )
        started.append(p)
        return p.wait_ready()

    yield start
    for p in started:
        p.kill()


def _classifier_repo(root):
    _save(classifier_model(), str(root), "clf", config=CLASSIFIER)
    return root


def _infer(mod, url, model, x, name="features", out="probabilities", **kw):
    c = mod.InferenceServerClient(url)
    inp = mod.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return c.infer(model, [inp], **kw).as_numpy(out)


def _status(e: InferenceServerException) -> str:
    return (e.status() or "").replace("StatusCode.", "")


def _metric_lines(running, prefix: str) -> list[str]:
    text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    return [line for line in text.splitlines() if line.startswith(prefix)]


def _wait(cond, what: str, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_outputs_equal_onnx_runtime_in_both_batching_modes_over_grpc_and_http(tmp_path, serve, upstream):
    repo = _classifier_repo(tmp_path / "up")
    _save(identity_model("ids"), str(repo), "ids", config="max_batch_size: 8\n")
    up = upstream(repo)
    running = serve(
        "",
        remote_models=(
            RemoteModel("gw", (up.grpc,), upstream_model="clf", batching="gateway", max_queue_delay_us=2000, **FAST),
            RemoteModel("pt", (up.grpc,), upstream_model="clf", batching="passthrough", **FAST),
            RemoteModel("ids", (up.grpc,), batching="passthrough", **FAST),
        ),
    )
    ref = ort.InferenceSession(str(repo / "clf" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(48)]

    def call(i):
        model = "gw" if i % 2 else "pt"
        mod, url = (grpcclient, running.grpc_url) if i % 4 < 2 else (httpclient, running.http_url)
        return _infer(mod, url, model, xs[i])

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(call, range(len(xs))))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out, ref.run(None, {"features": x})[0], rtol=1e-5, atol=1e-6)

    # the upstream's real signature, under our names
    meta = httpclient.InferenceServerClient(running.http_url).get_model_metadata("gw")
    assert meta["name"] == "gw" and meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    cfg = grpcclient.InferenceServerClient(running.grpc_url).get_model_config("pt", as_json=True)["config"]
    assert cfg["max_batch_size"] == 16 and cfg["parameters"]["remote_batching"]["string_value"] == "passthrough"
    index = {
        m["name"]: m["state"] for m in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()
    }
    assert index == {"gw": "READY", "pt": "READY", "ids": "READY"}

    # gateway mode batched at batchgate; passthrough sent one call per request
    stats = {
        s["name"]: s
        for s in httpclient.InferenceServerClient(running.http_url).get_inference_statistics()["model_stats"]
    }
    assert stats["gw"]["inference_stats"]["success"]["count"] == 24
    assert stats["gw"]["execution_count"] < 24
    assert stats["pt"]["execution_count"] == 24
    up_stats = httpclient.InferenceServerClient(up.http).get_inference_statistics("clf")["model_stats"][0]
    assert up_stats["inference_stats"]["success"]["count"] == stats["gw"]["execution_count"] + 24

    # BYTES travel raw too
    words = np.array([["ab", "ü", ""], ["x" * 300, "y", "z"]], dtype=object)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("INPUT", [2, 3], "BYTES")
    inp.set_data_from_numpy(words)
    got = c.infer("ids", [inp]).as_numpy("OUTPUT")
    assert [[v.decode() for v in row] for row in got] == words.tolist()

    # per-upstream metrics, every one the README lists
    from test_metrics import README_UPSTREAM_METRICS

    text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    assert [n for n in README_UPSTREAM_METRICS if n not in text] == []
    requests = _metric_lines(running, "batchgate_upstream_requests_total")
    assert any(f'model="pt",upstream="{up.grpc}"' in line and line.endswith(" 24.0") for line in requests), requests
    assert any(
        'model="gw"' in line for line in _metric_lines(running, "batchgate_upstream_request_duration_seconds_count")
    )
    assert all(line.endswith(" 0.0") for line in _metric_lines(running, "batchgate_upstream_outstanding"))
    assert all(line.endswith(" 1.0") for line in _metric_lines(running, "batchgate_upstream_healthy"))


class Traffic:
    """Callers in background threads, over gRPC and HTTP in turn, until stopped; every outcome
    is kept (OK, or the gRPC code / HTTP status)."""

    def __init__(self, running, model: str, x: np.ndarray, callers: int = 4):
        import threading

        self.outcomes: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(running, model, x, i), daemon=True) for i in range(callers)
        ]
        for t in self._threads:
            t.start()

    def _run(self, running, model, x, i):
        while not self._stop.is_set():
            try:
                if i % 2:  # a generous client deadline: a call that hung would end DEADLINE_EXCEEDED
                    _infer(grpcclient, running.grpc_url, model, x, client_timeout=20)
                else:
                    _infer(httpclient, running.http_url, model, x)
                self.outcomes.append("OK")
            except InferenceServerException as e:
                self.outcomes.append(_status(e))

    def wait_for(self, n: int) -> None:
        start = len(self.outcomes)
        _wait(lambda: len(self.outcomes) >= start + n, f"{n} more answers")

    def stop(self) -> list[str]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
            assert not t.is_alive(), "a caller hung"
        return self.outcomes


def test_an_upstream_killed_under_traffic_fails_fast_then_traffic_recovers_after_restart(tmp_path, serve, upstream):
    repo = _classifier_repo(tmp_path / "up")
    up = upstream(repo)
    ports = (int(up.http.rsplit(":", 1)[1]), int(up.grpc.rsplit(":", 1)[1]))
    running = serve("", remote_models=(RemoteModel("clf", (up.grpc,), batching="passthrough", **FAST),))
    x = np.ones((1, 4), np.float32)
    traffic = Traffic(running, "clf", x)
    traffic.wait_for(20)
    up.kill()
    c = grpcclient.InferenceServerClient(running.grpc_url)
    _wait(lambda: not c.is_model_ready("clf"), "the model to turn not ready")  # no upstream in rotation
    traffic.wait_for(40)  # answered while the upstream is down
    down = traffic.stop()
    first_failure = next(i for i, o in enumerate(down) if o != "OK")
    assert all(o == "OK" for o in down[:first_failure])
    assert set(down[first_failure:]) <= {"OK", "UNAVAILABLE", "503"}, down  # never a timeout
    assert "UNAVAILABLE" in down and "503" in down
    inp = grpcclient.InferInput("features", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        c.infer("clf", [inp])
    assert _status(e.value) == "UNAVAILABLE" and up.grpc in e.value.message()  # it names the upstream

    traffic = Traffic(running, "clf", x)
    upstream(repo, ports=ports)  # the same address again, batchgate untouched
    _wait(lambda: c.is_model_ready("clf"), "the model to be ready again")
    traffic.wait_for(10)
    later = len(traffic.outcomes)
    traffic.wait_for(40)
    after = traffic.stop()[later:]
    assert after and set(after) == {"OK"}


@pytest.mark.parametrize("retries", [0, 1])
def test_only_a_request_never_delivered_is_retried_on_another_upstream(tmp_path, serve, upstream, retries):
    repo = _classifier_repo(tmp_path / "up")
    a, b = upstream(repo), upstream(repo)
    # probes far apart: only calls find out that an upstream is gone
    running = serve(
        "",
        remote_models=(
            RemoteModel(
                "clf",
                (a.grpc, b.grpc),
                batching="passthrough",
                retries=retries,
                probe_interval_s=60,
                eject_after_failures=3,
            ),
        ),
    )
    x = np.ones((1, 4), np.float32)
    for _ in range(4):  # both upstreams answer
        _infer(grpcclient, running.grpc_url, "clf", x)
    a.kill()
    time.sleep(0.3)
    codes = []
    for _ in range(12):  # one at a time: the two upstreams take turns until one is ejected
        try:
            _infer(grpcclient, running.grpc_url, "clf", x)
            codes.append("OK")
        except InferenceServerException as e:
            codes.append(_status(e))
    if retries:
        assert codes == ["OK"] * 12  # each refused connection was tried again on the other upstream
    else:
        assert codes.count("UNAVAILABLE") == 3 and codes[-6:] == ["OK"] * 6  # then ejected
    ejections = _metric_lines(running, "batchgate_upstream_ejections_total")
    assert any(f'upstream="{a.grpc}"' in line and line.endswith(" 1.0") for line in ejections), ejections


def test_with_two_upstreams_one_killed_every_request_succeeds_after_ejection(tmp_path, serve, upstream):
    repo = _classifier_repo(tmp_path / "up")
    a, b = upstream(repo), upstream(repo)
    running = serve(
        "",
        remote_models=(
            RemoteModel("clf", (a.grpc, b.grpc), batching="passthrough", retries=1, **{**FAST, "eject_s": 30.0}),
        ),
    )
    x = np.ones((1, 4), np.float32)
    with ThreadPoolExecutor(4) as pool:
        assert all(o is not None for o in pool.map(lambda _: _infer(grpcclient, running.grpc_url, "clf", x), range(20)))
    for up in (a, b):  # the calls were spread over both
        stats = httpclient.InferenceServerClient(up.http).get_inference_statistics("clf")["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] >= 5
    a.kill()

    def ejected():
        lines = _metric_lines(running, "batchgate_upstream_healthy")
        return any(f'upstream="{a.grpc}"' in line and line.endswith(" 0.0") for line in lines)

    failed = []

    def call(i):
        try:
            mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
            _infer(mod, url, "clf", x)
        except InferenceServerException as e:
            failed.append(_status(e))

    with ThreadPoolExecutor(4) as pool:  # requests delivered to the dying upstream may fail, no more
        list(pool.map(call, range(20)))
    _wait(ejected, "the killed upstream to leave the rotation")
    failed.clear()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(call, range(60)))
    assert failed == []
    up_b = httpclient.InferenceServerClient(b.http).get_inference_statistics("clf")["model_stats"][0]
    assert up_b["inference_stats"]["success"]["count"] >= 60


def _busy_upstream(tmp_path, upstream):
    repo = tmp_path / "up"
    _save(slow_model(width=1024, layers=384), str(repo), "slow", config="max_batch_size: 64\ndynamic_batching { }\n")
    return upstream(repo, "--inline-execution-max-us", "0")


def _occupy(up):
    """Keep the upstream's only instance busy for a while (64 rows of a slow model)."""
    pool = ThreadPoolExecutor(1)
    big = np.ones((64, 1024), np.float32)
    fut = pool.submit(_infer, grpcclient, up.grpc, "slow", big, "input", "output")
    _wait(lambda: _upstream_gauges(up) == (1.0, 0.0), "the busy batch to execute upstream")
    return pool, fut


def _upstream_gauges(up) -> tuple[float, float]:
    """The upstream's own (in flight, queue depth) for its model 'slow'."""
    url = f"http://127.0.0.1:{up.ports[2]}/metrics"
    got = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        for name in ("batchgate_inflight_requests", "batchgate_queue_depth"):
            if line.startswith(name + "{") and 'model="slow"' in line:
                got[name] = float(line.rsplit(" ", 1)[1])
    return got.get("batchgate_inflight_requests", -1.0), got.get("batchgate_queue_depth", -1.0)


def test_a_deadline_shorter_than_the_upstream_latency_is_deadline_exceeded_and_never_runs_upstream(
    tmp_path, serve, upstream
):
    up = _busy_upstream(tmp_path, upstream)
    running = serve("", remote_models=(RemoteModel("slow", (up.grpc,), batching="passthrough", **FAST),))
    pool, busy = _occupy(up)
    x = np.ones((1, 1024), np.float32)
    with pytest.raises(InferenceServerException) as e:
        _infer(grpcclient, running.grpc_url, "slow", x, "input", "output", client_timeout=0.05)
    assert _status(e.value) == "DEADLINE_EXCEEDED"
    busy.result(60)
    pool.shutdown()
    time.sleep(0.2)
    stats = httpclient.InferenceServerClient(up.http).get_inference_statistics("slow")["model_stats"][0]
    # the upstream got the call with its deadline and never executed it
    assert stats["execution_count"] == 1 and stats["inference_count"] == 64
    assert stats["inference_stats"]["fail"]["count"] == 1


def test_a_cancelled_caller_cancels_the_upstream_call(tmp_path, serve, upstream):
    up = _busy_upstream(tmp_path, upstream)
    running = serve("", remote_models=(RemoteModel("slow", (up.grpc,), batching="passthrough", **FAST),))
    pool, busy = _occupy(up)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("input", [1, 1024], "FP32")
    inp.set_data_from_numpy(np.ones((1, 1024), np.float32))
    answers = []
    ctx = c.async_infer("slow", [inp], callback=lambda result, error: answers.append(error))
    served = running.gateway.repository.resolve("slow", "")
    _wait(lambda: served.in_flight == 1, "the call to reach the upstream")
    time.sleep(0.05)
    ctx.cancel()
    _wait(lambda: served.in_flight == 0, "the gateway to let the call go")
    busy.result(60)
    pool.shutdown()
    time.sleep(0.2)
    stats = httpclient.InferenceServerClient(up.http).get_inference_statistics("slow")["model_stats"][0]
    assert stats["execution_count"] == 1 and stats["inference_count"] == 64  # the cancelled call never ran
    lines = _metric_lines(running, "batchgate_upstream_errors_total")
    assert any('code="CANCELLED"' in line for line in lines), lines


def test_an_upstream_invalid_argument_stays_invalid_argument_with_its_message(tmp_path, serve, upstream):
    repo = _classifier_repo(tmp_path / "up")
    up = upstream(repo, "--model-control-mode", "explicit", "--load-model", "*")
    running = serve("", remote_models=(RemoteModel("clf", (up.grpc,), batching="passthrough", **FAST),))
    x = np.ones((1, 4), np.float32)
    assert _infer(grpcclient, running.grpc_url, "clf", x).shape == (1, 3)
    # The upstream's model changes under the gateway: it now takes 8 features, so the
    # request the gateway still finds valid is refused upstream.
    _save(identity_model("clf", dtype=1, shape=("batch", 8)), str(repo), "clf", config="max_batch_size: 16\n")
    up_client = grpcclient.InferenceServerClient(up.grpc)
    up_client.load_model("clf")
    for mod, url, code in ((grpcclient, running.grpc_url, "INVALID_ARGUMENT"), (httpclient, running.http_url, "400")):
        with pytest.raises(InferenceServerException) as e:
            _infer(mod, url, "clf", x)
        assert _status(e.value) == code
        assert up.grpc in e.value.message() and "features" in e.value.message()


def test_a_remote_model_whose_upstream_is_down_is_unavailable_and_loads_when_it_comes_up(tmp_path, serve, upstream):
    port, http_port = free_port(), free_port()  # nothing listens there (yet)
    address = f"127.0.0.1:{port}"
    running = serve("", remote_models=(RemoteModel("clf", (address,), **FAST),))
    index = httpclient.InferenceServerClient(running.http_url).get_model_repository_index()
    assert index[0]["name"] == "clf" and index[0]["state"] == "UNAVAILABLE" and address in index[0]["reason"]
    with pytest.raises(InferenceServerException) as e:
        _infer(httpclient, running.http_url, "clf", np.ones((1, 4), np.float32))
    assert _status(e.value) == "503" and address in e.value.message()

    upstream(_classifier_repo(tmp_path / "up"), ports=(http_port, port))
    c = grpcclient.InferenceServerClient(running.grpc_url)
    _wait(lambda: c.is_model_ready("clf"), "the remote model to load")
    assert _infer(grpcclient, running.grpc_url, "clf", np.ones((1, 4), np.float32)).shape == (1, 3)


def test_the_cli_serves_remote_models_without_a_repository_and_explicit_mode_reloads_them(tmp_path, upstream):
    up = upstream(_classifier_repo(tmp_path / "up"))
    gw = upstream(
        "",
        "--model-control-mode",
        "explicit",
        "--remote-model",
        f"name=front upstreams={up.grpc} upstream_model=clf batching=gateway",
        "--remote-model",
        f"name=direct upstreams={up.grpc} upstream_model=clf batching=passthrough",
    )
    x = np.ones((2, 4), np.float32)
    want = _infer(grpcclient, up.grpc, "clf", x)
    for model in ("front", "direct"):
        np.testing.assert_allclose(_infer(httpclient, gw.http, model, x), want, rtol=1e-6)
    c = grpcclient.InferenceServerClient(gw.grpc)
    c.unload_model("front")
    assert not c.is_model_ready("front") and c.is_model_ready("direct")
    with pytest.raises(InferenceServerException) as e:
        c.load_model("front", config='{"max_batch_size": 4}')
    assert "remote model" in e.value.message()
    c.load_model("front")
    assert c.is_model_ready("front")
    np.testing.assert_allclose(_infer(grpcclient, gw.grpc, "front", x), want, rtol=1e-6)


def test_a_gateway_batch_goes_on_while_one_of_its_callers_remains(tmp_path, serve, upstream):
    up = _busy_upstream(tmp_path, upstream)
    running = serve(
        "",
        remote_models=(
            RemoteModel("slow", (up.grpc,), batching="gateway", max_batch_size=2, max_queue_delay_us=5_000_000, **FAST),
        ),
    )
    pool, busy = _occupy(up)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("input", [1, 1024], "FP32")
    inp.set_data_from_numpy(np.ones((1, 1024), np.float32))
    answers = {}
    first = c.async_infer("slow", [inp], callback=lambda result, error: answers.setdefault("first", error))
    c.async_infer("slow", [inp], callback=lambda result, error: answers.setdefault("second", error or result))
    served = running.gateway.repository.resolve("slow", "")
    _wait(lambda: _upstream_gauges(up)[1] == 1.0, "the batch of two to wait upstream")  # one call, two rows
    first.cancel()
    _wait(lambda: "second" in answers, "the remaining caller's answer", 60)
    assert not isinstance(answers["second"], InferenceServerException), answers["second"]
    assert answers["second"].as_numpy("output").shape == (1, 1024)
    busy.result(60)
    pool.shutdown()
    _wait(lambda: served.in_flight == 0, "the gateway to finish")
    stats = httpclient.InferenceServerClient(up.http).get_inference_statistics("slow")["model_stats"][0]
    assert stats["execution_count"] == 2 and stats["inference_count"] == 66  # the busy batch, then ours


def test_an_unload_while_the_load_is_being_retried_stays_unloaded(tmp_path, serve, upstream):
    port, http_port = free_port(), free_port()  # nothing listens there yet
    running = serve(
        "", model_control_mode="explicit", remote_models=(RemoteModel("clf", (f"127.0.0.1:{port}",), **FAST),)
    )
    c = grpcclient.InferenceServerClient(running.grpc_url)
    c.unload_model("clf")
    upstream(_classifier_repo(tmp_path / "up"), ports=(http_port, port))  # the upstream comes up after
    time.sleep(1.0)  # ten probe intervals: a surviving retry would have loaded it by now
    index = httpclient.InferenceServerClient(running.http_url).get_model_repository_index()
    # (it never served: no version to name, as Triton shows a model whose versions it does not know)
    assert index == [{"name": "clf", "state": "UNAVAILABLE", "reason": "unloaded"}]
    c.load_model("clf")  # and an explicit load brings it back
    assert c.is_model_ready("clf")


def test_upstream_state_changes_are_logged(tmp_path, serve, upstream, caplog):
    """Down at start; out of the rotation with the reason; ejected; probes failing while
    ejected; rejoined once the upstream is back."""
    caplog.set_level(logging.INFO, logger="batchgate.remote")
    repo = _classifier_repo(tmp_path / "up")
    up = upstream(repo)
    ports = (int(up.http.rsplit(":", 1)[1]), int(up.grpc.rsplit(":", 1)[1]))
    dead = "127.0.0.1:1"  # nothing listens on port 1
    spec = RemoteModel("clf", (up.grpc, dead), batching="passthrough", retries=0, **FAST)
    running = serve("", remote_models=(spec,))

    def logged(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    assert logged(f"upstream {dead} of model 'clf' is down at start: UNAVAILABLE")
    assert not logged(f"upstream {up.grpc} of model 'clf' is down at start")
    x = np.ones((1, 4), np.float32)
    _infer(grpcclient, running.grpc_url, "clf", x)
    up.kill()
    _wait(lambda: logged(f"upstream {up.grpc} of model 'clf' left the rotation: UNAVAILABLE"), "the left line")
    upstream(repo, ports=ports)  # the same address again
    _wait(lambda: logged(f"upstream {up.grpc} of model 'clf' rejoined the rotation"), "the rejoined line")

    # Calls that fail on the upstream eject it (with the reason); a probe that fails while it
    # is ejected says so; once it answers again it rejoins.
    caplog.clear()
    repo2 = tmp_path / "up2"
    _save(_one_row_model(), str(repo2), "one", config="max_batch_size: 0\n")
    pair = [upstream(repo2), upstream(repo2)]
    spec = RemoteModel("one", tuple(u.grpc for u in pair), batching="passthrough", retries=0, **FAST)
    running2 = serve("", remote_models=(spec,))
    two = np.ones((2, 4), np.float32)  # the upstream's model fails on two rows: INTERNAL
    for _ in range(9):
        with pytest.raises(InferenceServerException):
            _infer(grpcclient, running2.grpc_url, "one", two, name="x", out="y")
    ejected = [u for u in pair if logged(f"upstream {u.grpc} of model 'one' ejected after 3 consecutive failures")]
    # one is ejected; the last in rotation never is for errors a request's values may cause
    assert len(ejected) == 1 and logged("failures, last INTERNAL")
    one = np.ones((1, 4), np.float32)
    assert _infer(grpcclient, running2.grpc_url, "one", one, name="x", out="y").shape == (1, 4)
    up2 = ejected[0]
    ports2 = (int(up2.http.rsplit(":", 1)[1]), int(up2.grpc.rsplit(":", 1)[1]))
    up2.kill()
    _wait(lambda: logged(f"upstream {up2.grpc} of model 'one': probe failed (UNAVAILABLE"), "the probe-failed line")
    upstream(repo2, ports=ports2)
    _wait(lambda: logged(f"upstream {up2.grpc} of model 'one' rejoined the rotation: its probe succeeded"), "rejoin")


def _one_row_model():
    """x [n, 4] -> y [1, 4]: runs only with n = 1 (a fixed Reshape); ONNX Runtime fails otherwise. Served
    with max_batch_size 0 (its output has no batch dimension, so batching it is refused at load)."""
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([1, 4], np.int64), "shape")
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    graph = helper.make_graph(
        [node],
        "one_row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [shape],
    )
    return _model(graph)


def _paths(running, model: str) -> dict[str, float]:
    out = {}
    for line in _metric_lines(running, "batchgate_remote_requests_total"):
        if f'model="{model}"' in line:
            path = line.split('path="', 1)[1].split('"', 1)[0]
            out[path] = float(line.rsplit(" ", 1)[1])
    return out


def test_a_grpc_request_in_passthrough_is_forwarded_raw_and_answered_like_a_decoded_one(tmp_path, serve, upstream):
    """The caller's bytes go to the upstream as they came (no tensor decoded at the gateway); the
    answer carries the gateway's model name and version, like the decoded (HTTP) path's."""
    up = upstream(_classifier_repo(tmp_path / "up"))
    running = serve("", remote_models=(RemoteModel("front", (up.grpc,), upstream_model="clf", batching="passthrough"),))
    x = np.random.default_rng(3).random((3, 4), dtype=np.float32)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("features", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    r = c.infer("front", [inp], request_id="req-7")
    resp = r.get_response()
    assert (resp.model_name, resp.model_version, resp.id) == ("front", "1", "req-7")
    decoded = _infer(httpclient, running.http_url, "front", x)
    np.testing.assert_array_equal(r.as_numpy("probabilities"), decoded)
    assert _paths(running, "front") == {"raw": 1.0, "decoded": 1.0}
    stats = c.get_inference_statistics("front").model_stats[0]
    assert stats.inference_stats.success.count == 2 and stats.inference_count == 6 and stats.execution_count == 2
    up_stats = httpclient.InferenceServerClient(up.http).get_inference_statistics("clf")["model_stats"][0]
    assert up_stats["inference_stats"]["success"]["count"] == 2


def test_a_raw_forwarded_request_still_meets_the_request_limits(tmp_path, serve, upstream):
    up = upstream(_classifier_repo(tmp_path / "up"))
    running = serve("", remote_models=(RemoteModel("clf", (up.grpc,), batching="passthrough"),), max_inputs=4)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    deep = grpcclient.InferInput("features", [1] * 40, "FP32")
    deep.set_data_from_numpy(np.ones([1] * 40, np.float32))
    many = []
    for i in range(5):
        t = grpcclient.InferInput(f"in{i}", [1, 4], "FP32")
        t.set_data_from_numpy(np.ones((1, 4), np.float32))
        many.append(t)
    for inputs, limit in (([deep], "(max_tensor_dims)"), (many, "(max_inputs)")):
        with pytest.raises(InferenceServerException) as e:
            c.infer("clf", inputs)
        assert _status(e.value) == "INVALID_ARGUMENT" and e.value.message().endswith(limit), e.value.message()
    # a parameter name reserved for the server is refused here too, as on the decoded path
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    msg = service_pb2.ModelInferRequest(model_name="clf")
    msg.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    msg.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    msg.parameters["triton_anything"].bool_param = True
    with grpc.insecure_channel(running.grpc_url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(msg, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in err.value.details()
    # the classification extension is refused as the README says, and tensors' own parameters
    # are bounded, as on the decoded path
    x = grpcclient.InferInput("features", [1, 4], "FP32").set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as e:
        c.infer("clf", [x], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)])
    assert _status(e.value) == "INVALID_ARGUMENT" and "classification extension" in e.value.message()
    msg = service_pb2.ModelInferRequest(model_name="clf")  # the same asked in another parameter type
    msg.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    msg.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    msg.outputs.add(name="probabilities").parameters["classification"].uint64_param = 2
    with grpc.insecure_channel(running.grpc_url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(msg, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "classification" in err.value.details()
    for field in ("inputs", "outputs"):
        msg = service_pb2.ModelInferRequest(model_name="clf")
        msg.inputs.add(name="features", datatype="FP32", shape=[1, 4])
        msg.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        tensor = msg.inputs[0] if field == "inputs" else msg.outputs.add(name="probabilities")
        for i in range(17):
            tensor.parameters[f"p{i}"].bool_param = True
        with grpc.insecure_channel(running.grpc_url) as channel, pytest.raises(grpc.RpcError) as err:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(msg, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 16 parameters" in err.value.details()
    up_stats = httpclient.InferenceServerClient(up.http).get_inference_statistics("clf")["model_stats"][0]
    assert up_stats["inference_stats"]["success"]["count"] == 0 and up_stats["inference_stats"]["fail"]["count"] == 0


def test_when_every_instance_is_busy_a_request_queues_on_the_decoded_path(tmp_path, serve, upstream):
    up = _busy_upstream(tmp_path, upstream)
    running = serve("", remote_models=(RemoteModel("slow", (up.grpc,), batching="passthrough", max_inflight=1),))
    x = np.ones((1, 1024), np.float32)
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: _infer(grpcclient, running.grpc_url, "slow", x, "input", "output"), range(6)))
    assert all(o.shape == (1, 1024) for o in outs)
    paths = _paths(running, "slow")
    assert paths.get("raw", 0) + paths.get("decoded", 0) == 6 and paths.get("decoded", 0) >= 1, paths
    lines = _metric_lines(running, "batchgate_upstream_outstanding")
    assert lines and all(line.endswith(" 0.0") for line in lines)


def test_a_request_with_a_tensor_in_shared_memory_takes_the_decoded_path(tmp_path, serve, upstream):
    """The gateway reads the region (the upstream has no access to it): never forwarded raw."""
    import uuid

    import tritonclient.utils.shared_memory as shm

    up = upstream(_classifier_repo(tmp_path / "up"))
    running = serve("", remote_models=(RemoteModel("clf", (up.grpc,), batching="passthrough"),))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    key = f"/batchgate_{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key[1:], key, x.nbytes)
    try:
        shm.set_shared_memory_region(handle, [x])
        c = grpcclient.InferenceServerClient(running.grpc_url)
        c.register_system_shared_memory("x", key, x.nbytes)
        inp = grpcclient.InferInput("features", [2, 4], "FP32").set_shared_memory("x", x.nbytes)
        got = c.infer("clf", [inp]).as_numpy("probabilities")
        np.testing.assert_array_equal(got, _infer(grpcclient, running.grpc_url, "clf", x))
        assert _paths(running, "clf") == {"decoded": 1.0, "raw": 1.0}
    finally:
        shm.destroy_shared_memory_region(handle)


def test_forwarding_decoded_turns_raw_forwarding_off(tmp_path, serve, upstream):
    up = upstream(_classifier_repo(tmp_path / "up"))
    spec = RemoteModel("clf", (up.grpc,), batching="passthrough", forwarding="decoded")
    running = serve("", remote_models=(spec,))
    _infer(grpcclient, running.grpc_url, "clf", np.ones((1, 4), np.float32))
    assert _paths(running, "clf") == {"decoded": 1.0}


def test_a_v2_timeout_bounds_a_raw_forwarded_call_as_it_does_a_decoded_one(tmp_path, serve, upstream):
    """The V2 'timeout' parameter (µs), not only the gRPC deadline, bounds the upstream call of a
    request forwarded as its bytes; a malformed one is refused before anything is sent."""
    up = _busy_upstream(tmp_path, upstream)
    running = serve("", remote_models=(RemoteModel("slow", (up.grpc,), batching="passthrough", **FAST),))
    pool, busy = _occupy(up)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("input", [1, 1024], "FP32")
    inp.set_data_from_numpy(np.ones((1, 1024), np.float32))
    t0 = time.monotonic()
    with pytest.raises(InferenceServerException) as e:
        c.infer("slow", [inp], timeout=50_000)  # 50 ms, no gRPC deadline
    assert _status(e.value) == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 5
    assert _paths(running, "slow") == {"raw": 1.0}
    # tritonclient will not send a malformed timeout: a raw message does
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    msg = pb.ModelInferRequest(model_name="slow")
    msg.inputs.add(name="input", datatype="FP32", shape=[1, 1024])
    msg.raw_input_contents.append(np.ones((1, 1024), np.float32).tobytes())
    msg.parameters["timeout"].string_param = "soon"

    def upstream_failures() -> int:
        stats = httpclient.InferenceServerClient(up.http).get_inference_statistics("slow")["model_stats"][0]
        return stats["inference_stats"]["fail"]["count"]

    before = upstream_failures()
    with grpc.insecure_channel(running.grpc_url) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(msg, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "parameter 'timeout'" in err.value.details()
    assert up.grpc not in err.value.details() and upstream_failures() == before  # refused here, never sent
    busy.result(60)
    pool.shutdown()


def test_the_h2_client_carries_both_batching_modes_on_one_connection(tmp_path, serve, upstream):
    """client=h2: raw-forwarded and gateway-batched calls go over batchgate's own HTTP/2 client,
    one connection per upstream, answers equal to ONNX Runtime's (the probes stay on grpc.aio)."""
    repo = _classifier_repo(tmp_path / "up")
    up = upstream(repo)
    fast = {**FAST, "client": "h2"}
    running = serve(
        "",
        remote_models=(
            RemoteModel("gw", (up.grpc,), upstream_model="clf", batching="gateway", **fast),
            RemoteModel("pt", (up.grpc,), upstream_model="clf", batching="passthrough", **fast),
        ),
    )
    ref = ort.InferenceSession(str(repo / "clf" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    for model in ("gw", "pt", "gw", "pt"):
        np.testing.assert_allclose(
            _infer(grpcclient, running.grpc_url, model, x), ref.run(None, {"features": x})[0], rtol=1e-5, atol=1e-6
        )
    for model in ("gw", "pt"):
        backend = running.gateway.repository.resolve(model, "").backend
        (u,) = backend.upstreams
        assert u.h2 is not None and u.h2._protocol is not None and not u.h2._protocol.lost
    metrics = _metric_lines(running, 'batchgate_remote_requests_total{model="pt",path="raw"')
    assert metrics and float(metrics[0].rsplit(" ", 1)[1]) == 2


def test_a_model_whose_upstream_stays_down_at_start_is_logged_and_counted_once(serve, upstream, tmp_path, caplog):
    """Its load is retried every probe interval; the failure is logged and counted once for the
    series (a load-failure alert must not count seconds), then it loads when the upstream comes."""
    caplog.set_level(logging.DEBUG, logger="batchgate")
    port, http_port = free_port(), free_port()
    spec = RemoteModel("clf", (f"127.0.0.1:{port}",), batching="passthrough", retries=0, **FAST)
    running = serve("", remote_models=(spec,))
    time.sleep(1.5)  # many probe intervals
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    failed = [r for r in records if "remote model 'clf' failed to load" in r.getMessage()]
    down = [r for r in records if "is down at start" in r.getMessage()]
    assert len(failed) == 1 and len(down) == 1, [r.getMessage() for r in records]
    metrics = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    assert 'batchgate_model_load_failures_total{model="clf"} 1.0' in metrics
    upstream(_classifier_repo(tmp_path / "up"), ports=(http_port, port))
    _wait(lambda: grpcclient.InferenceServerClient(running.grpc_url).is_model_ready("clf"), "the load")


def test_a_gateway_batch_one_callers_values_fail_upstream_fails_only_that_caller(tmp_path, serve, upstream):
    """An index past the table fails the upstream's Gather for the whole batch the gateway sent:
    each request goes again alone (as a local batch does, and as an open model's did), so only
    the caller whose value failed it gets the error (the upstream's INVALID_ARGUMENT); the two
    others got INTERNAL too."""
    _save(gather_model(), str(tmp_path), "gather", config="max_batch_size: 8\n")
    up = upstream(tmp_path)
    spec = RemoteModel("rg", (up.grpc,), upstream_model="gather", max_queue_delay_us=300_000, **FAST)
    running = serve("", remote_models=(spec,))

    def call(i):
        c = grpcclient.InferenceServerClient(running.grpc_url)
        inp = grpcclient.InferInput("idx", [1, 1], "INT64")
        inp.set_data_from_numpy(np.array([[i]], np.int64))
        try:
            return float(c.infer("rg", [inp]).as_numpy("out")[0, 0])
        except InferenceServerException as e:
            return _status(e)

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(call, [1, 99, 2])) == [10.0, "INVALID_ARGUMENT", 20.0]


def test_a_gateway_batch_past_a_message_size_limit_goes_again_one_request_at_a_time(tmp_path, serve, upstream):
    """Two 600 KB requests under a 1 MB max_request_bytes, merged into one gateway batch: the
    call past the limit (gRPC's on what is sent, or the gateway's on the 1.2 MB answer) failed
    both callers RESOURCE_EXHAUSTED though each fits alone, and their retries failed alike.
    Nothing sent is bounded but by the requests; an answer past the limit reruns each alone."""
    from onnx import TensorProto, helper

    width = 150_000
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
    )
    _save(_model(graph), str(tmp_path), "big", config="max_batch_size: 8\n")
    up = upstream(tmp_path)
    spec = RemoteModel("rbig", (up.grpc,), upstream_model="big", max_queue_delay_us=300_000, **FAST)
    running = serve("", remote_models=(spec,), max_request_bytes=1_000_000)

    def call(i):
        mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
        x = np.full((1, width), i, np.float32)
        inp = mod.InferInput("x", [1, width], "FP32")
        inp.set_data_from_numpy(x)
        try:
            return bool((mod.InferenceServerClient(url).infer("rbig", [inp]).as_numpy("y") == x).all())
        except InferenceServerException as e:
            return _status(e)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(call, [1, 2])) == [True, True]
    stats = httpclient.InferenceServerClient(up.http).get_inference_statistics("big")["model_stats"][0]
    assert stats["execution_count"] == 3  # the batch of two, then each alone


def test_an_unloaded_remote_model_takes_its_upstream_series_with_it(tmp_path, serve, upstream):
    """Until 2026-12-06 an unloaded remote model's upstream series stayed until a restart, its
    health gauge at 0: a removed upstream read as down for ever. Loaded again, they come back."""
    up = upstream(_classifier_repo(tmp_path / "up"))
    running = serve("", model_control_mode="explicit", remote_models=(RemoteModel("clf", (up.grpc,), **FAST),))
    _infer(grpcclient, running.grpc_url, "clf", np.ones((1, 4), np.float32))
    healthy = f'batchgate_upstream_healthy{{model="clf",upstream="{up.grpc}"}}'
    assert _metric_lines(running, healthy) == [f"{healthy} 1.0"]
    c = grpcclient.InferenceServerClient(running.grpc_url)
    c.unload_model("clf")
    _wait(lambda: not c.is_model_ready("clf"), "the unload")
    assert _metric_lines(running, "batchgate_upstream_") == []
    c.load_model("clf")
    _wait(lambda: _metric_lines(running, healthy) == [f"{healthy} 1.0"], "the upstream back in rotation")


@pytest.mark.parametrize("batching", ["gateway", "passthrough"])
def test_large_bytes_requests_and_answers_are_framed_and_read_on_a_thread_and_come_back_whole(
    tmp_path, serve, upstream, batching
):
    """A batch whose BYTES inputs or outputs pass OFF_LOOP_ELEMENTS is built and read on a thread
    (framed and read element by element on the event loop, 1,000,000 elements held it ~0.6 s):
    every element comes back in order, through gRPC and HTTP, in both batching modes."""
    from batchgate.core.types import OFF_LOOP_ELEMENTS

    repo = tmp_path / "up"
    _save(identity_model("ids"), str(repo), "ids", config="max_batch_size: 8\n")
    up = upstream(repo)
    running = serve("", remote_models=(RemoteModel("ids", (up.grpc,), batching=batching, **FAST),))
    n = OFF_LOOP_ELEMENTS + 1000
    sent = np.array([[f"row {i}".encode() for i in range(n)]], dtype=object)
    for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
        inp = mod.InferInput("INPUT", [1, n], "BYTES")
        inp.set_data_from_numpy(sent)
        got = mod.InferenceServerClient(url).infer("ids", [inp]).as_numpy("OUTPUT")
        assert got.shape == (1, n) and list(got.reshape(-1)) == list(sent.reshape(-1)), mod.__name__
