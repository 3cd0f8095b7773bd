"""Several worker processes behind one port (``--workers 2``): both take traffic from both
protocols, ``/metrics`` and the V2 statistics add up to what the clients saw, a worker killed
under traffic is started again and only its in-flight calls fail, explicit loads and unloads
reach every worker (also one started later), SIGTERM under traffic loses no accepted request.

Real ``batchgate serve`` subprocesses, real tritonclient clients; a worker is reached by opening
new connections (the kernel spreads connections over the workers, not requests)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from batchgate.demo import _save, classifier_model, slow_model
from gateway_support import judge_while_half_written
from processes import BATCHGATE, Proc, free_port, logged_at, pod_statistics, serve_args, slow_to_load, successes

BODY = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [0.1, 0.2, 0.3, 0.4]}]})
PID = re.compile(r"worker (\d+) \(pid (\d+)\) ready")


def _metrics(p: Proc) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics", timeout=20).read().decode()


def _value(text: str, series: str) -> float:
    """The value of one exact series line (name and labels as rendered); 0 when absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _pids(p: Proc) -> dict[int, int]:
    """worker slot -> pid of its latest life, from the workers' ready lines."""
    return {int(m.group(1)): int(m.group(2)) for m in PID.finditer(p.output())}


def _kill_and_wait(p: Proc, slot: int, timeout: float = 60) -> int:
    """SIGKILL worker ``slot``, wait until it has started again, caught up and listens; its old pid."""
    victim = _pids(p)[slot]
    os.kill(victim, signal.SIGKILL)
    end = time.monotonic() + timeout
    while _pids(p)[slot] == victim:
        assert time.monotonic() < end, p.output()
        time.sleep(0.1)


def test_trace_settings_reach_every_worker(clf_repo):
    """Tracing on with a ratio of 0: nothing is traced until the trace extension sets trace_rate 1
    on one worker; then every request on every worker is (each worker exports its own spans)."""
    from otlp_support import Receiver

    receiver = Receiver()
    p = Proc(serve_args(clf_repo, "--workers", "2", "--allow-open-admin", "true", "--tracing", "otlp",
                        "--otlp-endpoint", receiver.endpoint, "--trace-sample-ratio", "0"))  # fmt: skip
    try:
        p.wait_ready()
        _grpc_infer(p.grpc)
        httpclient.InferenceServerClient(p.http).update_trace_settings(settings={"trace_rate": "1"})
        for _ in range(16):  # new connections: both workers
            _grpc_infer(p.grpc)
        spans = receiver.wait(lambda s: sum(x.name == "InferRequest" for x in s) >= 16)
        roots = [x for x in spans if x.name == "InferRequest"]
        assert len(roots) == 16
        host = socket.gethostname()
        assert {x.resource["service.instance.id"] for x in roots} == {f"{host}/worker 0", f"{host}/worker 1"}
    finally:
        p.kill()
        receiver.close()


def _grpc_infer(url: str, model: str = "clf") -> None:
    # A new client with a subchannel of its own: a new connection, maybe another worker (gRPC
    # core shares connections between channels to the same target by default: the 16 calls of
    # test_trace_settings_reach_every_worker could all reuse one, and see one worker).
    c = grpcclient.InferenceServerClient(url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
    try:
        x = grpcclient.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        c.infer(model, [x], client_timeout=20)
    finally:
        c.close()


def _http_infer(url: str) -> None:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.request("POST", "/v2/models/clf/infer", BODY, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
    finally:
        conn.close()


def _server_ready_everywhere(p: Proc) -> set[bool]:
    """What 16 new connections (both workers answer some) say of the server's readiness."""
    seen = set()
    for _ in range(16):
        c = httpclient.InferenceServerClient(p.http)
        seen.add(c.is_server_ready())
        c.close()
    return seen


def _ready_everywhere(p: Proc, model: str) -> set[bool]:
    """What 16 new connections (both workers answer some) say of the model's readiness."""
    seen = set()
    for _ in range(16):
        c = httpclient.InferenceServerClient(p.http)
        seen.add(c.is_model_ready(model))
        c.close()
    return seen


@pytest.fixture
def clf_repo(tmp_path):
    _save(classifier_model(), str(tmp_path), "clf", config="max_batch_size: 8\n")
    return str(tmp_path)


def test_the_pods_serving_line_says_metrics_off_as_one_process_does(clf_repo):
    """It said "metrics on off" with the metrics port off (-1)."""
    args = serve_args(clf_repo, "--workers", "2")
    args[args.index("--metrics-port") + 1] = "-1"
    p = Proc(args)
    try:
        p.wait_for("2 workers serving", timeout=60)
        line = next(x for x in p.lines if "2 workers serving" in x)
        assert line.rstrip().endswith("metrics off"), line
    finally:
        p.kill()


def test_a_pod_never_shares_its_ports_with_another_process(clf_repo):
    """SO_REUSEPORT let a second pod start on the ports of one already serving (another
    repository, without its API keys), each taking some of the connections."""
    first = Proc(serve_args(clf_repo, "--workers", "2"))
    try:
        first.wait_ready()
        for flag, port in (("--http-port", first.ports[0]), ("--grpc-port", first.ports[1])):
            second = Proc(serve_args(clf_repo, "--workers", "2", flag, str(port)))
            try:
                assert second.p.wait(60) != 0
                assert f":{port}: Address already in use" in second.output(), second.output()
            finally:
                second.kill()
        assert sorted(_pids(first)) == [0, 1]  # the first serves on, alone
    finally:
        first.kill()


def test_a_worker_that_cannot_load_a_model_the_pod_serves_does_not_listen(tmp_path):
    """A restarted worker whose catch-up load of a model failed only logged it and listened: a
    share of the connections got 'no model' for a model the pod serves."""
    _save(classifier_model(), str(tmp_path), "extra")
    p = Proc(
        serve_args(str(tmp_path), "--workers", "2", "--model-control-mode", "explicit", "--allow-open-admin", "true")
    )
    try:
        p.wait_ready()
        httpclient.InferenceServerClient(p.http).load_model("extra")
        (tmp_path / "extra" / "1" / "model.onnx").write_bytes(b"not a model any more")
        victim = _pids(p)[1]
        os.kill(victim, signal.SIGKILL)
        p.wait_for("catching up with the other workers: load extra failed")
        x = httpclient.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        for _ in range(16):  # a fresh connection each: the kernel spreads them over the listeners
            c = httpclient.InferenceServerClient(p.http)
            assert c.infer("extra", [x]).as_numpy("probabilities").shape == (1, 3)
            c.close()
        assert _pids(p)[1] == victim  # (no ready line of a new life)
    finally:
        p.kill()


def test_poll_mode_a_restarted_worker_that_cannot_load_a_model_the_others_serve_does_not_listen(tmp_path):
    """poll: a model file broken on disk keeps the old version on every worker (the rescan's
    build fails); a worker restarted then could not load the model, yet listened: half the
    connections got 503 for a model the pod serves, and its readiness said not ready."""
    _save(classifier_model(), str(tmp_path), "extra")
    p = Proc(serve_args(str(tmp_path), "--workers", "2", "--model-control-mode", "poll", "--repository-poll-s", "0.5"))
    x = httpclient.InferInput("features", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    try:
        p.wait_ready()
        (tmp_path / "extra" / "1" / "model.onnx").write_bytes(b"not a model any more")
        p.wait_for("model 'extra' not reloaded on any worker")
        victim = _pids(p)[1]
        os.kill(victim, signal.SIGKILL)
        p.wait_for("it could not load the model, which the workers beside it serve")
        for _ in range(16):  # a fresh connection each: the kernel spreads them over the listeners
            c = httpclient.InferenceServerClient(p.http)
            assert c.is_server_ready()
            assert c.infer("extra", [x]).as_numpy("probabilities").shape == (1, 3)
            c.close()
        assert _pids(p)[1] == victim  # (no ready line of a new life)
    finally:
        p.kill()


def test_a_restarted_worker_does_not_join_when_a_models_files_changed_since_the_pod_loaded_them(tmp_path):
    """A model file replaced on disk (by another valid model) without a load call reached only a
    restarted worker, which then served other weights than its neighbour under the same name and
    version. It is refused until the model is loaded through the API; then both serve the new file."""
    _save(classifier_model(seed=1), str(tmp_path), "extra")
    p = Proc(serve_args(str(tmp_path), "--workers", "2", "--model-control-mode", "explicit",
                        "--load-model", "extra", "--allow-open-admin", "true"))  # fmt: skip
    x = httpclient.InferInput("features", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))

    def answers() -> set[bytes]:  # over fresh connections: the kernel spreads them over the workers
        out = set()
        for _ in range(16):
            c = httpclient.InferenceServerClient(p.http)
            out.add(c.infer("extra", [x]).as_numpy("probabilities").round(5).tobytes())
            c.close()
        return out

    try:
        p.wait_ready()
        before = answers()
        assert len(before) == 1
        _save(classifier_model(seed=2), str(tmp_path), "extra")  # (other weights in 1/model.onnx)
        victim = _pids(p)[1]
        os.kill(victim, signal.SIGKILL)
        p.wait_for("its files changed on disk since the pod loaded them (1/model.onnx")
        assert answers() == before and _pids(p)[1] == victim  # the old weights only; no new life listens
        httpclient.InferenceServerClient(p.http).load_model("extra")  # every worker reads the new file
        end = time.monotonic() + 60
        while _pids(p)[1] == victim:  # the next try joins
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        after = answers()
        assert len(after) == 1 and after != before
    finally:
        p.kill()


def test_with_no_worker_left_on_the_old_files_a_restarted_worker_makes_the_new_ones_the_pods(tmp_path):
    """model_control_mode none: a changed file keeps a restarted worker out while its neighbour
    serves the old one (the message says only a restart helps); once that neighbour is gone too,
    the next worker to start is alone: what it read becomes the pod's, and the other joins on it."""
    _save(classifier_model(seed=1), str(tmp_path), "extra")
    p = Proc(serve_args(str(tmp_path), "--workers", "2"))
    x = httpclient.InferInput("features", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    try:
        p.wait_ready()
        first = httpclient.InferenceServerClient(p.http).infer("extra", [x]).as_numpy("probabilities")
        _save(classifier_model(seed=2), str(tmp_path), "extra")
        pids = _pids(p)
        os.kill(pids[1], signal.SIGKILL)
        p.wait_for("restart the pod (model_control_mode none")
        os.kill(pids[0], signal.SIGKILL)
        end = time.monotonic() + 60
        while not all(_pids(p)[i] != pids[i] for i in (0, 1)):  # both started again and listening
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        for _ in range(16):  # over fresh connections: both workers serve the new weights
            c = httpclient.InferenceServerClient(p.http)
            now = c.infer("extra", [x]).as_numpy("probabilities")
            c.close()
            assert not np.allclose(now, first), (now, first)
    finally:
        p.kill()


def test_a_restarted_worker_catches_up_with_a_remote_model_whose_upstream_is_down(tmp_path):
    """A remote model's catch-up load fails while its upstream is down: the worker listens and
    retries it in the background, as at start (it must not crash-loop for the outage)."""
    from fake_upstream import FakeUpstream

    fake = FakeUpstream()
    spec = f"name=fk upstreams={fake.address} batching=passthrough probe_interval_s=0.2"
    p = Proc(serve_args("", "--workers", "2", "--remote-model", spec, "--model-control-mode", "explicit",
                        "--allow-open-admin", "true"))  # fmt: skip
    try:
        p.wait_ready()
        httpclient.InferenceServerClient(p.http).load_model("fk")  # (recorded: replayed to a restarted worker)
        fake.stop()
        _kill_and_wait(p, 1, 30)
        assert "catching up with the other workers: load fk failed" in p.output()
    finally:
        p.kill()


def test_two_workers_share_the_ports_and_the_figures_add_up(clf_repo):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health_port = free_port()
    p = Proc(serve_args(clf_repo, "--workers", "2", "--health-port", str(health_port)))
    try:
        p.wait_ready()
        assert sorted(_pids(p)) == [0, 1]
        # The health port answers what the chart's probes ask, kubelet's "liveness" included.
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "inference.GRPCInferenceService", "liveness"):
                got = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert got.status == health_pb2.HealthCheckResponse.SERVING, service
        n = 24
        for _ in range(n):
            _grpc_infer(p.grpc)
            _http_infer(p.http)
        text = _metrics(p)
        per_worker = [_value(text, f'batchgate_worker_requests_total{{worker="{w}"}}') for w in "01"]
        assert all(v > 0 for v in per_worker), per_worker  # the kernel gave both some connections
        assert sum(per_worker) == 2 * n
        for protocol in ("grpc", "http"):
            series = f'batchgate_requests_total{{model="clf",protocol="{protocol}",status="OK",version="1"}}'
            assert _value(text, series) == n, text
        assert _value(text, 'batchgate_worker_up{worker="0"}') == 1
        assert _value(text, "batchgate_workers") == 2
        assert 'process_cpu_seconds_total{worker="1"}' in text and 'worker="supervisor"' in text
        assert _value(text, 'batchgate_model_ready{model="clf",version="1"}') == 1
        assert _value(text, 'nv_inference_request_success{model="clf",version="1"}') == 2 * n
        # V2 statistics, asked of whichever worker the connection reaches: the pod's sums.
        c = httpclient.InferenceServerClient(p.http)
        stats = pod_statistics(lambda: successes(c.get_inference_statistics("clf")), 2 * n)
        assert int(stats["inference_stats"]["success"]["count"]) == 2 * n
        assert int(stats["inference_count"]) == 2 * n
    finally:
        p.kill()


def test_statistics_after_a_reload_count_only_the_new_versions_as_in_one_process(clf_repo):
    """A reload's new version counts from zero (one process; Triton). A worker killed before it
    left its statistics of the old version behind, and they were added to the new version's for
    good (and stayed in nv_inference_* after an unload)."""
    p = Proc(serve_args(clf_repo, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "clf",
                        "--allow-open-admin", "true"))  # fmt: skip

    def successes() -> int:
        time.sleep(0.6)  # (a reading up to 0.5 s old is reused)
        stats = grpcclient.InferenceServerClient(p.grpc).get_inference_statistics("clf", as_json=True)
        return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))

    try:
        p.wait_ready()
        while _value(_metrics(p), 'batchgate_worker_requests_total{worker="1"}') == 0:
            _grpc_infer(p.grpc)  # until worker 1 has served some
        _kill_and_wait(p, 1)
        httpclient.InferenceServerClient(p.http).load_model("clf")
        assert successes() == 0
        for _ in range(4):
            _grpc_infer(p.grpc)
        assert successes() == 4
        httpclient.InferenceServerClient(p.http).unload_model("clf")
        assert 'nv_inference_request_success{model="clf"' not in _metrics(p)
    finally:
        p.kill()


def test_a_hung_worker_holds_no_scrape_and_is_killed_and_started_again(clf_repo):
    """A stopped (hung) worker: scrapes wait for it once, then not again (it reads as down), and
    after worker_hang_s without an answer the supervisor kills it and its keeper starts another."""
    p = Proc(serve_args(clf_repo, "--workers", "2", "--worker-hang-s", "4"))
    try:
        p.wait_ready()
        victim = _pids(p)[1]
        os.kill(victim, signal.SIGSTOP)
        _metrics(p)  # (this one may wait for it)
        took = time.monotonic()
        text = _metrics(p)
        assert time.monotonic() - took < 2.0, "a scrape waited for the hung worker again"
        assert _value(text, 'batchgate_worker_up{worker="1"}') == 0
        end = time.monotonic() + 60
        while _pids(p)[1] == victim:
            assert time.monotonic() < end, p.output()
            time.sleep(0.2)
        assert f"worker 1 (pid {victim}) has not answered for 4 s: killing it" in p.output()
        assert _value(_metrics(p), 'batchgate_worker_up{worker="1"}') == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
        p.kill()


# Run alone: with the suite's other processes on the same two cores, the surviving worker took
# all eight clients' calls slowly enough that admission refused them (each client retries at once):
# 18-57 failures a client in one parallel run, none alone or beside three busy loops.
@pytest.mark.serial
def test_a_killed_worker_is_restarted_and_only_its_in_flight_calls_fail(tmp_path):
    _save(slow_model(layers=8), str(tmp_path), "slow", config="max_batch_size: 16\n")
    p = Proc(serve_args(str(tmp_path), "--workers", "2"))
    try:
        p.wait_ready()
        stop = threading.Event()
        lock = threading.Lock()
        ok: Counter = Counter()
        failures: Counter = Counter()  # per client thread
        shed: Counter = Counter()
        failed_at: list[float] = []
        said: list[str] = []  # the first failures' words, for the assertion's message

        def client() -> grpcclient.InferenceServerClient:
            # A channel of its own connections: grpc shares subchannels between channels to one
            # address, so a reconnect could land in another's connection backoff (a connect that met
            # the dying socket) and fail at once, over and over, for a second or more.
            return grpcclient.InferenceServerClient(p.grpc, channel_args=[("grpc.use_local_subchannel_pool", 1)])

        def caller(i: int) -> None:
            c = client()
            x = grpcclient.InferInput("input", [4, 1024], "FP32")
            x.set_data_from_numpy(np.ones((4, 1024), np.float32))
            while not stop.is_set():
                try:
                    c.infer("slow", [x], client_timeout=20)
                    with lock:
                        ok[i] += 1
                except InferenceServerException as e:
                    if e.status() == "StatusCode.RESOURCE_EXHAUSTED":
                        # Admission shed load (the survivor alone with eight clients, on cores a
                        # busy machine shares): not a call the kill lost; back off, as a client would.
                        with lock:
                            shed[i] += 1
                        time.sleep(0.05)
                        continue
                    with lock:
                        failures[i] += 1
                        failed_at.append(time.monotonic())
                        if len(said) < 5:
                            said.append(f"{e.status()}: {(e.message() or '')[:120]}")
                    c.close()  # a client that saw its server go reconnects
                    c = client()

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        counted = sum(  # a scrape reads every worker now
            float(line.rsplit(" ", 1)[1])
            for line in _metrics(p).splitlines()
            if line.startswith('batchgate_requests_total{model="slow"')
        )
        victim = _pids(p)[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        end = time.monotonic() + 60
        while _pids(p)[0] == victim:  # started again, caught up, listening
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        before = dict(ok)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(30)
        # A client had at most one call in flight: its call on the killed worker fails (and, rarely,
        # a reconnect that reached the dying socket before the kernel closed it); only clients
        # whose connection was the killed worker's; every client got answers again afterwards.
        assert all(n <= 2 for n in failures.values()), (failures, shed, said)
        assert all(killed_at <= t <= killed_at + 2.0 for t in failed_at), (killed_at, failed_at)  # only then
        assert all(ok[i] > before.get(i, 0) for i in range(8)), (before, ok)
        assert f"worker 0 (pid {victim}) was killed by SIGKILL; starting it again" in p.output()
        text = _metrics(p)
        assert _value(text, 'batchgate_worker_restarts_total{worker="0"}') == 1
        assert _value(text, 'batchgate_worker_restarts_total{worker="1"}') == 0
        # What the dead worker had answered by the last read stays counted: totals never go back.
        after = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('batchgate_requests_total{model="slow"')
        )
        assert after >= counted + sum(ok.values()) - sum(before.values()), (counted, after)
    finally:
        p.kill()


# Loaded in the pod's processes (PYTHONPATH): once the test creates ``slow`` in $SLOW_DIR, a
# worker starting its HTTP listener says so in a file and waits 3 s first, its gRPC port already
# listening: the moments between its first listener and the last, made long enough to aim at.
_SLOW_HTTP_START = """
import asyncio, os
from batchgate.transport.http_listener import QuietUvicorn

_startup = QuietUvicorn.startup

async def startup(self, *args, **kwargs):
    folder = os.environ["SLOW_DIR"]
    if os.path.exists(os.path.join(folder, "slow")):
        open(os.path.join(folder, f"listening-{os.getpid()}"), "w").close()
        await asyncio.sleep(3)
    return await _startup(self, *args, **kwargs)

QuietUvicorn.startup = startup
"""


def test_a_restarted_worker_answers_every_call_its_gRPC_port_takes_while_it_starts_listening(clf_repo, tmp_path):
    """A restarted worker's gRPC port listens (the kernel gives it a share of the new
    connections at once) a moment before its HTTP port; the calls it took meanwhile were refused
    as "batchgate is shutting down" (the data plane accepted only once every listener was up),
    so a worker restarting under traffic failed calls that never met the killed one."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_SLOW_HTTP_START)
    path = os.pathsep.join(x for x in (str(hooks), os.environ.get("PYTHONPATH", "")) if x)
    p = Proc(serve_args(clf_repo, "--workers", "2"), env={"PYTHONPATH": path, "SLOW_DIR": str(hooks)})
    try:
        p.wait_ready()
        (hooks / "slow").touch()
        victim = _pids(p)[1]
        os.kill(victim, signal.SIGKILL)
        end = time.monotonic() + 60
        while not list(hooks.glob("listening-*")):  # the new worker 1: gRPC listens, HTTP not yet
            assert time.monotonic() < end, p.output()
            time.sleep(0.02)
        errors = []
        for _ in range(16):  # new connections: about half reach the new worker
            try:
                _grpc_infer(p.grpc)
            except InferenceServerException as e:
                errors.append(f"{e.status()}: {e.message()}")
        assert _pids(p)[1] == victim  # (all of it while the new worker was still starting)
        assert errors == []
    finally:
        p.kill()


def test_the_workers_access_log_lines_on_a_shared_stdout_stay_whole_when_the_pipe_is_full(clf_repo, tmp_path):
    """Every worker writes its access log to the stdout they share. A write of more than
    PIPE_BUF bytes to a full pipe is cut where the pipe has room, and another worker's write
    goes in between: with a reader slower than the lines (a log collector falling behind), lines
    came out spliced, one worker's in the middle of another's (300 of 12,000 in a first try)."""
    port = free_port()
    args = serve_args(clf_repo, "--workers", "2", "--access-log", "all", "--log-level", "warning")
    args[args.index("--http-port") + 1] = str(port)
    with open(tmp_path / "stderr", "w") as errors:
        p = subprocess.Popen(BATCHGATE + args, stdout=subprocess.PIPE, stderr=errors)
    body = json.dumps({"id": "r" * 100, "inputs": json.loads(BODY)["inputs"]})
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():  # new connections: both workers
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with contextlib.suppress(OSError, http.client.HTTPException):
                for _ in range(20):
                    conn.request("POST", "/v2/models/clf/infer", body, {"Content-Type": "application/json"})
                    conn.getresponse().read()
            conn.close()

    threads = [threading.Thread(target=caller) for _ in range(4)]
    try:
        end = time.monotonic() + 60
        while not _answers_ready(port):
            assert p.poll() is None and time.monotonic() < end, (tmp_path / "stderr").read_text()
            time.sleep(0.1)
        for t in threads:
            t.start()
        time.sleep(1.0)  # the pipe fills (64 KiB), both workers' writers wait with more lines
        out = b""
        os.set_blocking(p.stdout.fileno(), False)
        end = time.monotonic() + 3
        while time.monotonic() < end:  # a slow reader: the pipe stays about full
            with contextlib.suppress(BlockingIOError):
                out += os.read(p.stdout.fileno(), 1024)
            time.sleep(0.001)
        stop.set()
        for t in threads:
            t.join(30)
        p.send_signal(signal.SIGTERM)
        os.set_blocking(p.stdout.fileno(), True)
        out += p.stdout.read()
        assert p.wait(60) == 0
    finally:
        stop.set()
        if p.poll() is None:
            p.kill()
            p.wait(10)
    lines = out.decode().splitlines()
    assert len(lines) > 200
    spliced = []
    for line in lines:
        try:
            assert json.loads(line)["event.name"] == "batchgate.access"
        except (ValueError, AssertionError, KeyError):
            spliced.append(line)
    assert spliced == [], (len(spliced), len(lines), spliced[:2])
    assert {json.loads(line)["batchgate.worker"] for line in lines} == {"worker 0", "worker 1"}


def _answers_ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False


def test_explicit_loads_and_unloads_reach_every_worker_and_a_restarted_one(clf_repo):
    _save(classifier_model(seed=1), clf_repo, "clf2")
    p = Proc(
        serve_args(
            clf_repo,
            "--workers",
            "2",
            "--model-control-mode",
            "explicit",
            "--load-model",
            "clf",
            "--allow-open-admin",
            "true",
        )
    )
    try:
        p.wait_ready()

        assert _ready_everywhere(p, "clf2") == {False}
        httpclient.InferenceServerClient(p.http).load_model("clf2")
        assert _ready_everywhere(p, "clf2") == {True}
        for _ in range(8):
            _grpc_infer(p.grpc, "clf2")

        # A load that fails is called off on every worker; the answer says so, the old versions serve.
        with pytest.raises(InferenceServerException) as e:
            httpclient.InferenceServerClient(p.http).load_model(
                "clf2", config=json.dumps({"max_batch_size": 8}), files={"file:1/model.onnx": b"not a model"}
            )
        assert "no worker switched versions" in e.value.message()
        assert _ready_everywhere(p, "clf2") == {True}

        # A worker started after the load catches up before it listens.
        victim = _pids(p)[1]
        os.kill(victim, signal.SIGKILL)
        end = time.monotonic() + 60
        while _pids(p)[1] == victim:
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        assert _ready_everywhere(p, "clf2") == {True}

        grpcclient.InferenceServerClient(p.grpc).unload_model("clf2")
        assert _ready_everywhere(p, "clf2") == {False}
        assert _ready_everywhere(p, "clf") == {True}

        # A worker started after the unload lists the model as the others do: unloaded, with
        # the version served last (it listed it with no version, as one it never served).
        _kill_and_wait(p, 0)
        assert _indexes(p) == {'[["clf", "1", "READY"], ["clf2", "1", "UNAVAILABLE"]]'}
    finally:
        p.kill()


def _indexes(p: Proc) -> set[str]:
    """The repository indexes 16 new connections (both workers answer some) were given."""
    seen = set()
    for _ in range(16):
        c = httpclient.InferenceServerClient(p.http)
        seen.add(json.dumps([[m["name"], m.get("version"), m.get("state")] for m in c.get_model_repository_index()]))
        c.close()
    return seen


def _pod_loading_big(clf_repo) -> Proc:
    """Two workers in explicit mode, ready, with a slow-to-load model 'big' in the repository."""
    _save(slow_to_load(), clf_repo, "big", config="max_batch_size: 8\n")
    p = Proc(serve_args(clf_repo, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "clf",
                        "--allow-open-admin", "true"))  # fmt: skip
    try:
        p.wait_ready()
    except BaseException:
        p.kill()
        raise
    return p


def _load_big(p: Proc, answer: list[str], killed_ok: bool = False) -> threading.Thread:
    """A thread asking the pod to load 'big'; its answer (or error message) goes into ``answer``.
    ``killed_ok``: a call whose worker is killed counts as the load called off."""

    def load() -> None:
        try:
            httpclient.InferenceServerClient(p.http, network_timeout=120).load_model("big")
            answer.append("loaded")
        except InferenceServerException as e:
            answer.append(e.message())
        except Exception:
            if not killed_ok:
                raise
            answer.append("no worker switched versions (the call's worker was killed)")

    t = threading.Thread(target=load)
    t.start()
    return t


def test_a_load_called_off_by_a_worker_dying_leaves_no_worker_loading(clf_repo):
    """A worker killed while every worker built a load: the survivors, rolled back, kept the model
    LOADING for good (the index said so; nothing would ever finish it)."""
    p = _pod_loading_big(clf_repo)
    try:
        answer: list[str] = []
        t = _load_big(p, answer, killed_ok=True)
        p.wait_for("[worker 1]: readiness: not ready")  # (the load has begun: it wants the model)
        _kill_and_wait(p, 1)
        t.join(120)
        assert "no worker switched versions" in answer[0], answer
        states = set()
        for _ in range(16):  # fresh connections: both workers answer some
            c = httpclient.InferenceServerClient(p.http)
            states |= {r.get("state") for r in c.get_model_repository_index() if r["name"] == "big"}
            c.close()
        assert states == {"UNAVAILABLE"}, states
    finally:
        p.kill()


def test_after_a_failed_load_a_restarted_worker_is_not_ready_either(clf_repo):
    """Strict readiness: a load that fails leaves the server not ready until the model loads or is
    unloaded (as Triton's). A worker started after it said ready alone: a share of the readiness
    probes passed while the pod should be out of its Service."""
    os.makedirs(os.path.join(clf_repo, "broken", "1"))
    with open(os.path.join(clf_repo, "broken", "1", "model.onnx"), "wb") as f:
        f.write(b"not a model")
    p = Proc(serve_args(clf_repo, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "clf",
                        "--allow-open-admin", "true"))  # fmt: skip

    try:
        p.wait_ready()
        with pytest.raises(InferenceServerException, match="failed to load model 'broken'"):
            httpclient.InferenceServerClient(p.http).load_model("broken")
        assert _server_ready_everywhere(p) == {False}
        _kill_and_wait(p, 1)
        assert _server_ready_everywhere(p) == {False}
        httpclient.InferenceServerClient(p.http).unload_model("broken")
        assert _server_ready_everywhere(p) == {True}
    finally:
        p.kill()


def _connection_to(p: Proc, worker: str) -> http.client.HTTPConnection:
    """An HTTP connection that worker ``worker`` holds (told by its count of answers)."""
    host, port = p.http.split(":")
    for _ in range(64):
        before = _value(_metrics(p), f'batchgate_worker_requests_total{{worker="{worker}"}}')
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v2/models/clf/infer", BODY, {"Content-Type": "application/json"})
        conn.getresponse().read()
        if _value(_metrics(p), f'batchgate_worker_requests_total{{worker="{worker}"}}') > before:
            return conn
        conn.close()
    raise AssertionError("no connection reached worker " + worker)


def test_an_unload_while_a_worker_goes_away_reaches_it_when_it_starts_again(clf_repo):
    """A worker that went away during an unload (hung, then killed) failed the call: the client
    was told 503 though the others had unloaded, and the restarted worker, never told, loaded the
    model again (load_model) and served it alone."""
    p = Proc(serve_args(clf_repo, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "clf",
                        "--allow-open-admin", "true", "--worker-hang-s", "2"))  # fmt: skip
    victim = 0
    try:
        p.wait_ready()
        conn = _connection_to(p, "0")
        victim = _pids(p)[1]
        os.kill(victim, signal.SIGSTOP)
        conn.request("POST", "/v2/repository/models/clf/unload", "{}", {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        end = time.monotonic() + 60
        while _pids(p)[1] == victim:  # killed as hung, started again, caught up
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        assert _ready_everywhere(p, "clf") == {False}
    finally:
        with contextlib.suppress(ProcessLookupError):
            if victim:
                os.kill(victim, signal.SIGCONT)
        p.kill()


def _load_fails_on_a_stopped_worker(p: Proc, load, stopped: list[int]) -> None:
    """SIGSTOP worker 1 (its pid added to ``stopped``), ``load()``: it fails naming the worker
    killed as hung, and the worker is replaced."""
    victim = _pids(p)[1]
    stopped.append(victim)
    os.kill(victim, signal.SIGSTOP)
    with pytest.raises(InferenceServerException) as e:
        load()
    said = e.value.message()
    assert f"worker 1 (pid {victim}) did not answer the supervisor for 4 s (worker_hang_s): killed" in said, said
    assert "no worker switched versions" in said, said
    end = time.monotonic() + 60
    while _pids(p)[1] == victim:
        assert time.monotonic() < end, p.output()
        time.sleep(0.1)


def test_a_load_with_a_hung_worker_is_answered_naming_it_and_the_pod_converges(clf_repo):
    """A stopped worker during a two-phase load: answered once the worker was killed as hung, with
    "the other process went away during the call (worker 1; ...)", which said neither which
    process nor why. Now the answer names the worker, its pid and worker_hang_s; the new worker
    joins and the next load reaches every worker."""
    admin = free_port()  # worker 0's admin listener: a stopped worker 1 takes no call meant for it
    p = Proc(serve_args(clf_repo, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "clf",
                        "--allow-open-admin", "true", "--worker-hang-s", "4",
                        "--admin-http-port", str(admin)))  # fmt: skip
    stopped: list[int] = []
    try:
        p.wait_ready()
        c = httpclient.InferenceServerClient(f"127.0.0.1:{admin}", network_timeout=120, connection_timeout=120)
        _load_fails_on_a_stopped_worker(p, lambda: c.load_model("clf"), stopped)
        # An upload larger than the control socket's buffers: the supervisor waits to send it, not
        # for an answer, when the worker stops answering.
        files = {"file:1/model.onnx": classifier_model().SerializeToString(), "file:1/padding.bin": bytes(8 << 20)}
        _load_fails_on_a_stopped_worker(
            p, lambda: c.load_model("uploaded", config=json.dumps({"max_batch_size": 8}), files=files), stopped
        )
        c.load_model("clf")
        assert _ready_everywhere(p, "clf") == {True}
    finally:
        for victim in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        p.kill()


def test_a_worker_hung_while_catching_up_holds_no_pod_wide_change_for_ever(tmp_path):
    """A restarted worker catches up with the pod (the models loaded since the start) under the
    control lock, before it listens. One that hung meanwhile was never killed, since only ready
    workers were watched: the lock stayed held, and every later load, unload or registration
    waited for ever. Now a joining worker is watched too: killed after worker_hang_s, and the
    change waiting behind it is done."""
    _save(classifier_model(), str(tmp_path), "clf", config="max_batch_size: 8\n")
    for i in range(2):  # (models whose load takes a moment: the restarted worker loads them as it joins)
        _save(slow_model(width=1024, layers=600, seed=i), str(tmp_path), f"slow{i}", config="max_batch_size: 8\n")
    admin = free_port()  # worker 0's admin listener: the joining worker 1 takes no call meant for it
    p = Proc(serve_args(str(tmp_path), "--workers", "2", "--model-control-mode", "explicit", "--load-model", "clf",
                        "--allow-open-admin", "true", "--worker-hang-s", "4",
                        "--admin-http-port", str(admin)))  # fmt: skip
    stopped = 0
    try:
        p.wait_ready()
        c = httpclient.InferenceServerClient(f"127.0.0.1:{admin}", network_timeout=90, connection_timeout=90)
        for i in range(2):
            c.load_model(f"slow{i}")
        before = _pids(p)
        os.kill(before[1], signal.SIGKILL)
        mark = len(p.output())
        end = time.monotonic() + 90
        while "[worker 1]: model 'slow0' ready" not in p.output()[mark:]:  # its first catch-up load done
            assert time.monotonic() < end, p.output()
            time.sleep(0.02)
        children = subprocess.run(["pgrep", "-P", str(p.p.pid)], capture_output=True, text=True).stdout.split()
        (stopped,) = {int(c) for c in children} - set(before.values())
        os.kill(stopped, signal.SIGSTOP)  # hung while loading slow1, the control lock held
        c.unload_model("clf")  # waited for ever before
        said = p.output()
        assert f"worker 1 (pid {stopped}) has not answered for 4 s: killing it" in said, said[mark:]
        end = time.monotonic() + 90
        while _pids(p)[1] in (before[1], stopped):  # started again, caught up, listening
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        assert _ready_everywhere(p, "clf") == {False}
        assert _ready_everywhere(p, "slow1") == {True}
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        p.kill()


def test_a_restarted_worker_is_not_warned_about_an_unloaded_upload(clf_repo):
    """A model uploaded with its load (a name with no folder), then unloaded: each restarted worker
    replayed the unload of a name it never had and logged a WARNING that catching up failed."""
    p = Proc(serve_args(clf_repo, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "clf",
                        "--allow-open-admin", "true"))  # fmt: skip
    try:
        p.wait_ready()
        c = httpclient.InferenceServerClient(p.http)
        config = json.dumps({"max_batch_size": 8})
        c.load_model("uploaded", config=config, files={"file:1/model.onnx": classifier_model().SerializeToString()})
        c.unload_model("uploaded")
        _kill_and_wait(p, 1)
        assert "catching up with the other workers" not in p.output()
        assert _ready_everywhere(p, "uploaded") == {False}
    finally:
        p.kill()


def test_sigterm_under_traffic_loses_no_accepted_request(clf_repo):
    p = Proc(serve_args(clf_repo, "--workers", "2"))
    try:
        p.wait_ready()
        stop = threading.Event()
        lock = threading.Lock()
        outcomes: Counter = Counter()
        when: dict[str, list[float]] = {}

        def note(what: str) -> None:
            with lock:
                outcomes[what] += 1
                when.setdefault(what, []).append(time.time())

        def grpc_caller() -> None:
            c = grpcclient.InferenceServerClient(p.grpc)
            x = grpcclient.InferInput("features", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            while not stop.is_set():
                try:
                    c.infer("clf", [x], client_timeout=10)
                    note("OK")
                except InferenceServerException as e:
                    status = str(e.status())
                    if status == "StatusCode.UNAVAILABLE":  # draining, or the listener closed
                        note("UNAVAILABLE")
                        time.sleep(0.01)
                    else:
                        note(f"{status}: {e.message()}")

        def http_caller() -> None:
            host, port = p.http.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            while not stop.is_set():
                try:
                    conn.request("POST", "/v2/models/clf/infer", BODY, {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    r.read()
                    note("OK" if r.status == 200 else f"http {r.status}")
                    if r.getheader("connection", "").lower() == "close":
                        conn.close()
                except ConnectionRefusedError:
                    note("refused")
                    conn.close()
                    time.sleep(0.01)
                except (OSError, http.client.HTTPException) as e:
                    note(f"reset: {type(e).__name__}")
                    conn.close()

        threads = [threading.Thread(target=grpc_caller) for _ in range(3)]
        threads += [threading.Thread(target=http_caller) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(60) == 0, p.output()
        stop.set()
        for t in threads:
            t.join(15)
        assert outcomes["OK"] > 0, outcomes
        assert "supervisor: stopped" in p.output()
        assert p.output().count("closing the listeners") == 2
        # Every call got an answer with a status, or found no listener; anything else only in
        # the race of a listener's final close (a handful, as with one process: see Gateway.stop).
        allowed = {"OK", "UNAVAILABLE", "http 503", "refused"}
        other = {k: v for k, v in when.items() if k not in allowed}
        closing = logged_at(p.output(), "closing the listeners")  # the first worker's
        assert all(t >= closing - 0.05 for ts in other.values() for t in ts), (outcomes, closing)
        assert sum(len(ts) for ts in other.values()) <= max(10, 0.01 * sum(outcomes.values())), outcomes
    finally:
        p.kill()


def test_sigterm_during_a_load_answers_it_with_the_pods_verdict(clf_repo):
    """SIGTERM while every worker built a load: the worker that took it closed its channel to
    the supervisor once its own build ended, before the verdict came, and answered "the other
    process went away during the call" (the supervisor logged the verdict as an exception
    nobody retrieved). Now it waits for the verdict: the load is called off, and says so."""
    p = _pod_loading_big(clf_repo)
    try:
        answer: list[str] = []
        t = _load_big(p, answer)
        p.wait_for("[worker 1]: readiness: not ready")  # (the load has begun: it wants the model)
        p.wait_for("[worker 0]: readiness: not ready")
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(60) == 0, p.output()
        t.join(60)
        assert "no worker switched versions" in answer[0], answer
        assert "never retrieved" not in p.output()
    finally:
        p.kill()


def test_sigterm_while_a_worker_starts_again_exits_0(clf_repo):
    """A worker started again (after a crash) dies of SIGTERM if it comes before the interpreter
    can catch it; it held no request, yet the supervisor exited 1 as if a drain had failed."""
    p = Proc(serve_args(clf_repo, "--workers", "2"))
    try:
        p.wait_ready()

        def children() -> set[int]:
            tasks = f"/proc/{p.p.pid}/task"
            return {int(c) for t in os.listdir(tasks) for c in open(f"{tasks}/{t}/children").read().split()}

        before = children()
        os.kill(_pids(p)[1], signal.SIGKILL)
        end = time.monotonic() + 30
        while not children() - before:  # the new worker process has just been spawned
            assert time.monotonic() < end, p.output()
            time.sleep(0.005)
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(60) == 0, p.output()
        assert "supervisor: stopped" in p.output()
    finally:
        p.kill()


def test_routes_across_workers_one_leader_judges_the_pod_and_the_others_follow(tmp_path):
    from route_support import POISON, infer_grpc, route_repository, write_config

    repo = route_repository(str(tmp_path / "models"))
    ramp = {
        "name": "ramp",
        "variants": [
            {"name": "stable", "model": "clf_a", "weight": 100},
            {"name": "canary", "model": "clf_bad", "weight": 0},
        ],
        "rollout": {
            "canary": "canary",
            "baseline": "stable",
            "steps": [50, 100],
            "interval_s": 1,
            "min_requests": 10,
            "gates": {"max_error_rate": 0.01, "max_p99_ratio": 1000},
            "on_fail": "rollback",
        },
    }
    pair = {
        "name": "pair",
        "variants": [{"name": "a", "model": "clf_a", "weight": 100}, {"name": "b", "model": "clf_same", "weight": 0}],
        "shadows": [{"name": "other", "model": "clf_other", "percent": 100, "max_inflight": 64}],
        "compare": {"output": "probabilities", "kind": "classification", "atol": 1.0e-3},
    }
    log_file, audit = tmp_path / "disagreements.jsonl", tmp_path / "audit.jsonl"
    cfg = write_config(
        str(tmp_path / "c.yaml"),
        [ramp, pair],
        routing={"disagreement_log_file": str(log_file), "disagreement_log_per_s": 1000},
        auth={"audit_log_file": str(audit), "allow_open_admin": True},
    )
    p = Proc(serve_args(repo, "--workers", "2", "--config", cfg, "--admin-http-port", "0"))
    try:
        p.wait_ready()
        admin = int(re.search(r"admin HTTP on 127\.0\.0\.1:(\d+)", p.output()).group(1))
        # The failing canary: the leader judges the pod's figures and rolls it back; every worker follows.
        end = time.monotonic() + 30
        while _value(_metrics(p), 'batchgate_rollout_state{route="ramp"}') != 4:  # rolled_back
            assert time.monotonic() < end, p.output()
            for _ in range(20):
                with contextlib.suppress(InferenceServerException):  # the failing canary's answers
                    infer_grpc(p.grpc, "ramp", POISON)
        assert "[worker 0]: route 'ramp' rollout: step 50% failed" in p.output()  # the leader judged
        variants = {infer_grpc(p.grpc, "ramp", POISON)[1]["variant"] for _ in range(20)}
        assert variants == {"stable"}  # on both workers, new connections each
        text = _metrics(p)
        assert _value(text, 'batchgate_route_weight{route="ramp",variant="canary"}') == 0

        # Runtime weights through the admin API (worker 0's): every worker serves them.
        body = json.dumps({"weights": {"a": 0, "b": 100}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{admin}/admin/v1/routes/pair/weights", data=body, method="POST")
        urllib.request.urlopen(req, timeout=20).read()
        time.sleep(0.3)  # the change travels leader -> supervisor -> the others
        assert {infer_grpc(p.grpc, "pair")[1]["variant"] for _ in range(20)} == {"b"}
        # the route's statistics are the pod's, whichever worker answers (read again once the
        # figures the workers last gave are older than STATS_FRESH_S)
        time.sleep(0.6)
        for _ in range(4):
            with urllib.request.urlopen(f"http://{p.http}/v2/models/pair/stats", timeout=10) as r:
                stats = json.loads(r.read())["model_stats"][0]["inference_stats"]
            assert stats["success"]["count"] == 20, stats
        assert _value(_metrics(p), 'nv_inference_request_success{model="pair",version=""}') == 20
        per_worker = [_value(_metrics(p), f'batchgate_worker_requests_total{{worker="{w}"}}') for w in "01"]
        assert all(n > 0 for n in per_worker), per_worker
        # The pod's files have one writer, the supervisor: whole lines, each action once.
        actions = [json.loads(line)["action"] for line in audit.read_text().splitlines()]
        assert actions.count("routes.set_weights") == 1 and "rollout.step" in actions
        end = time.monotonic() + 10
        while not log_file.exists() or len(log_file.read_text().splitlines()) < 10:
            assert time.monotonic() < end, "no disagreements logged"
            time.sleep(0.1)
        assert all(json.loads(line)["shadow"] == "other" for line in log_file.read_text().splitlines())

        # A worker started later takes the pod's route state, not the configuration's.
        victim = _pids(p)[1]
        os.kill(victim, signal.SIGKILL)
        end = time.monotonic() + 60
        while _pids(p)[1] == victim:
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        assert {infer_grpc(p.grpc, "pair")[1]["variant"] for _ in range(20)} == {"b"}
        assert {infer_grpc(p.grpc, "ramp", POISON)[1]["variant"] for _ in range(20)} == {"stable"}
    finally:
        p.kill()


def test_the_admin_api_shows_a_routes_window_over_every_worker(tmp_path):
    """GetRoute and ListRoutes showed the window of worker 0 (where the admin API is) alone, a
    share of what the rollout judges: the pod's figures."""
    from route_support import infer_http, route_repository, write_config

    repo = route_repository(str(tmp_path / "models"))
    ramp = {
        "name": "ramp",
        "variants": [
            {"name": "stable", "model": "clf_a", "weight": 100},
            {"name": "canary", "model": "clf_same", "weight": 0},
        ],
        "rollout": {"canary": "canary", "baseline": "stable", "steps": [50, 100], "interval_s": 3600},
    }
    cfg = write_config(str(tmp_path / "c.yaml"), [ramp], auth={"allow_open_admin": True})
    p = Proc(serve_args(repo, "--workers", "2", "--config", cfg, "--admin-http-port", "0"))
    try:
        p.wait_ready()
        admin = int(re.search(r"admin HTTP on 127\.0\.0\.1:(\d+)", p.output()).group(1))
        sent = 0
        end = time.monotonic() + 60
        while not all(_value(_metrics(p), f'batchgate_worker_requests_total{{worker="{w}"}}') for w in "01"):
            assert time.monotonic() < end, p.output()
            for _ in range(10):  # a client (a connection) each: the kernel spreads them over the workers
                infer_http(p.http, "ramp")
                sent += 1
        for path in ("/ramp", ""):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/v1/routes{path}", timeout=20) as r:
                body = json.loads(r.read())
            route = body if path else body["routes"][0]
            assert sum(int(w.get("requests", 0)) for w in route["window"].values()) == sent, route["window"]
    finally:
        p.kill()


def test_shared_memory_and_log_settings_reach_every_worker(clf_repo):
    p = Proc(serve_args(clf_repo, "--workers", "2", "--allow-open-admin", "true"))
    key = f"/batchgate_{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key[1:], key, 64)
    try:
        p.wait_ready()
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        shm.set_shared_memory_region(handle, [x])
        grpcclient.InferenceServerClient(p.grpc).register_system_shared_memory("in", key, x.nbytes)
        seen = set()
        for _ in range(16):  # new connections: both workers read the region
            c = grpcclient.InferenceServerClient(p.grpc)
            inp = grpcclient.InferInput("features", [1, 4], "FP32")
            inp.set_shared_memory("in", x.nbytes)
            seen.add(c.infer("clf", [inp]).as_numpy("probabilities").tobytes())
            assert len(c.get_system_shared_memory_status().regions) == 1
            c.close()
        assert len(seen) == 1
        text = _metrics(p)
        assert _value(text, "batchgate_shm_regions") == 1  # every worker holds it: not summed
        assert _value(text, 'batchgate_shm_requests_total{action="register",outcome="OK"}') == 1

        httpclient.InferenceServerClient(p.http).update_log_settings({"log_verbose_level": 1})
        levels = set()
        for _ in range(16):
            c = httpclient.InferenceServerClient(p.http)
            levels.add(c.get_log_settings()["log_verbose_level"])
            c.close()
        assert levels == {1}

        grpcclient.InferenceServerClient(p.grpc).unregister_system_shared_memory("in")
        for _ in range(16):
            c = grpcclient.InferenceServerClient(p.grpc)
            assert len(c.get_system_shared_memory_status().regions) == 0
            c.close()
    finally:
        p.kill()
        shm.destroy_shared_memory_region(handle)


def test_a_region_a_restarted_worker_cannot_map_is_dropped_from_every_worker(clf_repo):
    """The segment shrank after its registration, then a worker died: the restarted one could
    not register the region again and went on without it, while the other kept it. Clients saw
    it or not by the worker their connection reached, and registering it again was refused
    (already registered). Now it is unregistered everywhere, and registers again."""
    p = Proc(serve_args(clf_repo, "--workers", "2"))
    key = f"/batchgate_{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key[1:], key, 64)
    try:
        p.wait_ready()
        grpcclient.InferenceServerClient(p.grpc).register_system_shared_memory("in", key, 64)
        os.truncate(f"/dev/shm/{key[1:]}", 16)  # the client shrinks its segment
        _kill_and_wait(p, 0)
        os.truncate(f"/dev/shm/{key[1:]}", 64)
        seen = Counter()
        for _ in range(16):  # new connections: both workers answer
            c = grpcclient.InferenceServerClient(p.grpc)
            seen[len(c.get_system_shared_memory_status().regions)] += 1
            c.close()
        assert seen == Counter({0: 16}), seen
        grpcclient.InferenceServerClient(p.grpc).register_system_shared_memory("in", key, 64)  # not "already"
        for _ in range(8):
            c = grpcclient.InferenceServerClient(p.grpc)
            assert len(c.get_system_shared_memory_status().regions) == 1
            c.close()
        assert "shared-memory region 'in' is dropped: a worker starting again could not map it" in p.output()
    finally:
        p.kill()
        shm.destroy_shared_memory_region(handle)


def test_front_mode_workers_forward_to_one_process_that_owns_and_batches_the_models(clf_repo):
    _save(classifier_model(seed=2), clf_repo, "late")
    p = Proc(
        serve_args(
            clf_repo,
            "--workers",
            "2",
            "--workers-mode",
            "front",
            "--model-control-mode",
            "explicit",
            "--load-model",
            "clf",
            "--allow-open-admin",
            "true",
        )
    )
    try:
        p.wait_ready()
        out = p.output()
        assert "[model owner]: model 'clf' ready" in out and "[worker 1]: model 'clf' ready" in out
        n = 16
        for _ in range(n):
            _grpc_infer(p.grpc)
            _http_infer(p.http)
        text = _metrics(p)
        per_worker = [_value(text, f'batchgate_worker_requests_total{{worker="{w}"}}') for w in "01"]
        assert all(v > 0 for v in per_worker) and sum(per_worker) == 2 * n, per_worker
        # What clients saw comes from the workers, what the model did from the owner: each once.
        assert _value(text, 'batchgate_requests_total{model="clf",protocol="http",status="OK",version="1"}') == n
        assert _value(text, 'batchgate_requests_total{model="clf",protocol="grpc",status="OK",version="1"}') == n
        assert _value(text, 'batchgate_inference_count_total{model="clf",version="1"}') == 2 * n
        assert _value(text, 'batchgate_model_ready{model="clf",version="1"}') == 1
        assert _value(text, 'batchgate_worker_up{worker="owner"}') == 1
        http = httpclient.InferenceServerClient(p.http)
        stats = pod_statistics(lambda: successes(http.get_inference_statistics("clf")), 2 * n)
        assert int(stats["inference_stats"]["success"]["count"]) == 2 * n

        # An explicit load goes to the owner, then every worker serves the new model.
        httpclient.InferenceServerClient(p.http).load_model("late")
        for _ in range(8):
            _grpc_infer(p.grpc, "late")
            c = httpclient.InferenceServerClient(p.http)
            assert c.is_model_ready("late")
            c.close()
        grpcclient.InferenceServerClient(p.grpc).unload_model("late")
        for _ in range(8):
            c = httpclient.InferenceServerClient(p.http)
            assert not c.is_model_ready("late")
            c.close()

        # The owner killed: started again with what was loaded; the workers find it again.
        owner = int(re.search(r"model owner \(pid (\d+)\) ready", p.output()).group(1))

        # The owner stopped (hung): no worker can answer, so the pod is not ready until it runs again.
        def ready() -> bool:
            c = httpclient.InferenceServerClient(p.http)
            try:
                return c.is_server_ready()
            finally:
                c.close()

        # A model failing on its callers' input (INTERNAL) does not take the owner out of rotation:
        # the pod stays ready and the other models answer.
        from route_support import failing_classifier

        _save(failing_classifier(), clf_repo, "bad")
        httpclient.InferenceServerClient(p.http).load_model("bad")
        for _ in range(8):
            with pytest.raises(InferenceServerException):
                _grpc_infer(p.grpc, "bad")
        for _ in range(10):
            assert ready()
            _grpc_infer(p.grpc)
            time.sleep(0.05)
        grpcclient.InferenceServerClient(p.grpc).unload_model("bad")

        os.kill(owner, signal.SIGSTOP)
        end = time.monotonic() + 30
        while ready():
            assert time.monotonic() < end, "the pod stayed ready with its model owner stopped"
            time.sleep(0.1)
        os.kill(owner, signal.SIGCONT)
        while not ready():
            assert time.monotonic() < end, "the pod did not come back when the model owner ran again"
            time.sleep(0.1)
        os.kill(owner, signal.SIGKILL)
        end = time.monotonic() + 60
        while p.output().count("model owner (pid") < 2:
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        while True:
            try:
                _grpc_infer(p.grpc)
                break
            except InferenceServerException:
                assert time.monotonic() < end, p.output()
                time.sleep(0.2)
        assert 'batchgate_worker_restarts_total{worker="owner"} 1.0' in _metrics(p)
    finally:
        p.kill()


def test_poll_rescans_are_the_supervisors_and_two_phase(clf_repo):
    import shutil

    p = Proc(serve_args(clf_repo, "--workers", "2", "--model-control-mode", "poll", "--repository-poll-s", "0.5"))
    try:
        p.wait_ready()

        def until(check, what: str) -> None:
            end = time.monotonic() + 30
            while not check():
                assert time.monotonic() < end, f"{what}:\n{p.output()}"
                time.sleep(0.2)

        _save(classifier_model(seed=3), clf_repo, "added")
        until(lambda: _ready_everywhere(p, "added") == {True}, "a new model reaches every worker")
        # A change that cannot build: no worker switches, every worker serves the old version.
        with open(os.path.join(clf_repo, "added", "1", "model.onnx"), "wb") as f:
            f.write(b"not a model")
        until(lambda: "model 'added' not reloaded on any worker" in p.output(), "the failed rescan is said")
        assert _ready_everywhere(p, "added") == {True}
        for _ in range(8):
            _grpc_infer(p.grpc, "added")
        assert p.output().count("[worker 0]: model 'added' ready") == 1  # loaded once, never swapped
        shutil.rmtree(os.path.join(clf_repo, "added"))
        until(lambda: _ready_everywhere(p, "added") == {False}, "a removed model leaves every worker")
        assert _ready_everywhere(p, "clf") == {True}
    finally:
        p.kill()


def test_the_supervisor_watches_the_keys_and_every_worker_follows(clf_repo, tmp_path):
    import yaml

    from batchgate.security.auth import hash_token, new_token

    app, ops = new_token(), new_token()

    def keys(*entries) -> str:
        return yaml.safe_dump({"keys": list(entries)})

    app_key = {"id": "app", "sha256": hash_token(app), "scopes": ["infer", "read"]}
    ops_key = {"id": "ops", "sha256": hash_token(ops), "scopes": ["read"]}
    path = tmp_path / "keys.yaml"
    path.write_text(keys(app_key, ops_key))
    args = ["--api-keys-file", str(path), "--api-keys-poll-s", "0.2", "--metrics-requires-key", "true"]
    p = Proc(serve_args(clf_repo, "--workers", "2", *args))
    try:
        p.wait_ready()

        def answers(token: str) -> set[int]:
            codes = set()
            for _ in range(16):  # new connections: both workers
                host, port = p.http.split(":")
                conn = http.client.HTTPConnection(host, int(port), timeout=20)
                conn.request(
                    "POST",
                    "/v2/models/clf/infer",
                    BODY,
                    {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
                )
                r = conn.getresponse()
                r.read()
                codes.add(r.status)
                conn.close()
            return codes

        assert answers(app) == {200}
        metrics = f"http://127.0.0.1:{p.ports[2]}/metrics"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(metrics, timeout=20)
        assert e.value.code == 401  # the supervisor's /metrics needs a key too
        req = urllib.request.Request(metrics, headers={"Authorization": f"Bearer {ops}"})
        assert b"batchgate_workers 2.0" in urllib.request.urlopen(req, timeout=20).read()

        path.write_text(keys(ops_key))  # "app" revoked
        end = time.monotonic() + 10
        while answers(app) != {401}:
            assert time.monotonic() < end, p.output()
            time.sleep(0.2)
        assert p.output().count("API keys reloaded") >= 3  # the supervisor, then each worker at once
        # a broken edit keeps the keys, and is counted once for the pod: the supervisor reads the
        # file (the workers hear only of a good one; the leader's count stayed 0)
        path.write_text("keys: [{id: broken}]\n")
        end = time.monotonic() + 10
        series = 'batchgate_reload_failures_total{file="api_keys"}'
        while _value(urllib.request.urlopen(req, timeout=20).read().decode(), series) != 1.0:
            assert time.monotonic() < end, p.output()
            time.sleep(0.2)
        assert answers(ops) == {403}  # (still known: its scope lacks infer)
    finally:
        p.kill()


def test_a_key_revoked_while_a_worker_starts_again_is_refused_by_it_too(clf_repo, tmp_path):
    """The supervisor told the workers of a keys file change, but only those serving: one that
    had read the file as it started again, and joined after, kept the revoked key for good."""
    import yaml

    from batchgate.security.auth import hash_token, new_token

    _save(slow_to_load(), clf_repo, "big", config="max_batch_size: 8\n")  # the restart takes seconds
    app = new_token()
    app_key = {"id": "app", "sha256": hash_token(app), "scopes": ["infer", "read"]}
    ops_key = {"id": "ops", "sha256": hash_token(new_token()), "scopes": ["read"]}
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [app_key, ops_key]}))
    p = Proc(serve_args(clf_repo, "--workers", "2", "--api-keys-file", str(path), "--api-keys-poll-s", "0.2"))
    try:
        p.wait_ready(120)
        victim = _pids(p)[1]
        os.kill(victim, signal.SIGKILL)
        p.wait_for(f"worker 1 (pid {victim}) was killed")
        end = time.monotonic() + 30
        while not [x for x in p.lines if "[worker 1]" in x and "API keys required" in x][1:]:
            assert time.monotonic() < end, p.output()
            time.sleep(0.02)
        new = _pids_of_children(p) - {_pids(p)[0]}
        assert len(new) == 1, new
        (starting,) = new
        os.kill(starting, signal.SIGSTOP)  # it has read the keys and loads "big": held there
        try:
            path.write_text(yaml.safe_dump({"keys": [ops_key]}))  # "app" revoked
            end = time.monotonic() + 30
            while not [x for x in p.lines if "API keys reloaded" in x and "[worker" not in x]:
                assert time.monotonic() < end, p.output()
                time.sleep(0.05)
            p.wait_for("[worker 0]: API keys reloaded")
        finally:
            os.kill(starting, signal.SIGCONT)
        end = time.monotonic() + 120
        while _pids(p)[1] != starting:
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        codes = set()
        for _ in range(16):  # new connections: both workers
            c = grpcclient.InferenceServerClient(p.grpc, channel_args=[("grpc.use_local_subchannel_pool", 1)])
            x = grpcclient.InferInput("features", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            try:
                c.infer("clf", [x], headers={"authorization": f"Bearer {app}"}, client_timeout=20)
                codes.add("OK")
            except InferenceServerException as e:
                codes.add(str(e.status()))
            c.close()
        assert codes == {"StatusCode.UNAUTHENTICATED"}, codes
    finally:
        p.kill()


def _pids_of_children(p: Proc) -> set[int]:
    tasks = f"/proc/{p.p.pid}/task"
    return {int(c) for t in os.listdir(tasks) for c in open(f"{tasks}/{t}/children").read().split()}


def test_a_keys_file_caught_half_written_reaches_no_worker(clf_repo, tmp_path):
    """The supervisor's poll settles a change before any worker reads it (see
    tests/integration/test_api_keys.py, which judges only answers given within a poll of the
    first write, for the same reason): cut after its scopes, "app" would reach clf, and "dash"
    after it would be 401, on whichever worker a connection reaches."""
    from batchgate.security.auth import hash_token, new_token

    app, dash, poll_s = new_token(), new_token(), 0.5
    full = (
        f"keys:\n  - id: app\n    sha256: {hash_token(app)}\n    scopes: [infer]\n"
        f'    models: ["other-*"]\n  - {{id: dash, sha256: {hash_token(dash)}, scopes: [read]}}\n'
    )
    half = full[: full.index("    models:")]
    path = tmp_path / "keys.yaml"
    path.write_text(full)
    p = Proc(serve_args(clf_repo, "--workers", "2", "--api-keys-file", str(path), "--api-keys-poll-s", str(poll_s)))
    try:
        p.wait_ready()
        host, port = p.http.split(":")

        def status(method: str, url: str, token: str, body: str | None = None) -> int:
            conn = http.client.HTTPConnection(host, int(port), timeout=20)  # a new one: either worker
            try:
                headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
                conn.request(method, url, body, headers)
                r = conn.getresponse()
                r.read()
                return r.status
            finally:
                conn.close()

        def answers() -> tuple[int, int]:
            return status("POST", "/v2/models/clf/infer", app, BODY), status("GET", "/v2/models/clf", dash)

        assert answers() == (403, 200)
        judge_while_half_written(path, half, full, poll_s, answers, (403, 200))
        assert answers() == (403, 200)
    finally:
        p.kill()


def test_route_state_is_kept_by_the_supervisor_across_a_pod_restart(tmp_path):
    from route_support import infer_grpc, route_repository, write_config

    repo = route_repository(str(tmp_path / "models"))
    pair = {
        "name": "pair",
        "variants": [{"name": "a", "model": "clf_a", "weight": 100}, {"name": "b", "model": "clf_same", "weight": 0}],
    }
    state = tmp_path / "state"
    cfg = write_config(str(tmp_path / "c.yaml"), [pair], routing={"state_dir": str(state)})
    args = serve_args(repo, "--workers", "2", "--config", cfg, "--admin-http-port", "0", "--allow-open-admin", "true")
    p = Proc(args)
    try:
        p.wait_ready()
        admin = int(re.search(r"admin HTTP on 127\.0\.0\.1:(\d+)", p.output()).group(1))
        body = json.dumps({"weights": {"a": 0, "b": 100}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{admin}/admin/v1/routes/pair/weights", data=body, method="POST")
        urllib.request.urlopen(req, timeout=20).read()
        end = time.monotonic() + 10
        kept = state / "route-pair.json"  # (written beside, then renamed: read only the final name)
        # (the POST's own write: the start-up state names "b" too, with weight 0; a wait on its name
        # alone let a slow machine go on with the POST's write still to come, which then failed too)
        while not kept.exists() or json.loads(kept.read_text())["table"]["weights"] != {"a": 0, "b": 100}:
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        # one series, the supervisor's (the workers keep no state of their own)
        assert [x for x in _metrics(p).splitlines() if x.startswith("batchgate_state_write_failures")] == [
            "batchgate_state_write_failures_total 0.0"
        ]
        kept.unlink()
        kept.mkdir()  # a write that fails (as root, permissions would not stop it) is counted
        urllib.request.urlopen(req, timeout=20).read()
        while "batchgate_state_write_failures_total 1.0" not in (seen := _metrics(p)):
            assert time.monotonic() < end + 10, ([x for x in seen.splitlines() if "state_write" in x], p.output())
            time.sleep(0.1)
        kept.rmdir()
        urllib.request.urlopen(req, timeout=20).read()
        while not kept.exists():
            assert time.monotonic() < end + 20, p.output()
            time.sleep(0.1)
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(60) == 0
    finally:
        p.kill()
    q = Proc(args)
    try:
        q.wait_ready()
        assert {infer_grpc(q.grpc, "pair")[1]["variant"] for _ in range(20)} == {"b"}
    finally:
        q.kill()
