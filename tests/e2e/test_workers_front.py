"""Front mode (``--workers-mode front``) under a burst: each worker merges its clients' requests
into one call to the model-owning process, and the pod's figures still count client requests,
not those calls: the queue and in-flight gauges an autoscaler reads, the V2 statistics and
Triton's ``nv_inference_request_success``.

A real ``batchgate serve`` with two front workers, a model slow enough to queue, real
tritonclient gRPC clients (one connection each, spread over the workers by the kernel)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.demo import _save, classifier_model, slow_model
from gateway_support import eventually
from processes import Proc, free_port, pod_statistics, serve_args, successes

WIDTH = 512
CLIENTS = 32


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _call(url: str, headers: dict[str, str] | None = None) -> None:
    c = grpcclient.InferenceServerClient(url)
    try:
        x = grpcclient.InferInput("input", [1, WIDTH], "FP32")
        x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
        c.infer("slow", [x], client_timeout=120, headers=headers)
    finally:
        c.close()


def test_front_mode_counts_client_requests_not_the_workers_calls_to_the_owner(tmp_path):
    # Batches of at most 2 rows: the workers' 2 x 4 calls to the owner carry at most 16 of the
    # clients' 32 requests; the others wait at the workers, and are counted there.
    _save(
        slow_model(width=WIDTH, layers=400), str(tmp_path), "slow", config="max_batch_size: 2\ndynamic_batching { }\n"
    )
    # (Counting, not overload: neither a standing queue nor an expected wait may refuse the
    # clients, whose threads would end on the refusal and leave the peaks below short of them.)
    p = Proc(
        serve_args(
            str(tmp_path), "--workers", "2", "--workers-mode", "front", "--queue-target-ms", "0",
            "--max-queue-wait-ms", "0",
        )
    )  # fmt: skip
    try:
        p.wait_ready()
        url = f"http://127.0.0.1:{p.ports[2]}/metrics"
        # A client cannot pass for many: only the owner reads the count, from the workers' calls.
        _call(p.grpc, {"x-batchgate-requests": "1000"})
        peak = {"inflight": 0.0, "queued": 0.0}
        stop = threading.Event()
        answered = [0] * CLIENTS

        def client(i: int) -> None:  # closed loop: its next request as soon as it has its answer
            c = grpcclient.InferenceServerClient(p.grpc)
            x = grpcclient.InferInput("input", [1, WIDTH], "FP32")
            x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
            try:
                while not stop.is_set():
                    c.infer("slow", [x], client_timeout=120)
                    answered[i] += 1
            finally:
                c.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            end = time.monotonic() + 20
            scrapes = 0
            while scrapes < 20 or (time.monotonic() < end and peak["queued"] <= CLIENTS // 2):
                text = urllib.request.urlopen(url, timeout=20).read().decode()
                scrapes += 1
                for key, family in (("inflight", "batchgate_inflight_requests"), ("queued", "batchgate_queue_depth")):
                    peak[key] = max(peak[key], _value(text, f'{family}{{model="slow",version="1"}}'))
        finally:
            stop.set()
            for t in threads:
                t.join()
        total = 1 + sum(answered)
        text = urllib.request.urlopen(url, timeout=20).read().decode()
        # The workers did merge: fewer calls reached the owner than clients sent requests ...
        calls = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("batchgate_upstream_requests_total{") and 'model="slow"' in line
        )
        assert 0 < calls < total, (calls, total)
        # ... and yet every figure counts the clients' requests.
        http = httpclient.InferenceServerClient(p.http)
        stats = pod_statistics(lambda: successes(http.get_inference_statistics("slow")), total)
        assert int(stats["inference_stats"]["success"]["count"]) == total
        assert int(stats["inference_stats"]["queue"]["count"]) == total
        assert _value(text, 'nv_inference_request_success{model="slow",version="1"}') == total
        assert _value(text, 'batchgate_inference_count_total{model="slow",version="1"}') == total
        # Nearly every client's request was in flight, and most of them waited (at a worker for a
        # free call, or in the owner's queue); the owner alone had at most 16.
        assert peak["inflight"] > CLIENTS * 3 // 4, peak
        assert peak["queued"] > CLIENTS // 2, peak
        after = _value(text, 'batchgate_inflight_requests{model="slow",version="1"}')
        assert after == 0 and _value(text, 'batchgate_queue_depth{model="slow",version="1"}') == 0
        # Every process's own event-loop lag is in the pod's figures, the front workers' too
        # (they read and admit the requests): three timers ticking ten times a second, not one.
        t0, ticks0 = time.monotonic(), _value(text, "batchgate_event_loop_lag_seconds_count")
        time.sleep(6)
        text = urllib.request.urlopen(url, timeout=20).read().decode()
        rate = (_value(text, "batchgate_event_loop_lag_seconds_count") - ticks0) / (time.monotonic() - t0)
        assert rate > 18, rate
    finally:
        p.kill()


def _front_pod_with_a_broken_model(tmp_path) -> Proc:
    """A front pod (not started yet) in explicit mode serving 'clf', whose repository also holds
    'broken', a file that is no model."""
    _save(classifier_model(), str(tmp_path), "clf", config="max_batch_size: 8\n")
    os.makedirs(tmp_path / "broken" / "1")
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    return Proc(serve_args(str(tmp_path), "--workers", "2", "--workers-mode", "front", "--model-control-mode",
                           "explicit", "--load-model", "clf", "--allow-open-admin", "true"))  # fmt: skip


def test_front_mode_a_model_the_owner_could_not_load_can_be_unloaded(tmp_path):
    """A failed load keeps the pod not ready until the model loads or is unloaded; a front worker
    refused the unload (404 unknown model: it follows only the owner's ready models), so the pod
    stayed not ready for good."""
    p = _front_pod_with_a_broken_model(tmp_path)
    try:
        p.wait_ready()
        c = httpclient.InferenceServerClient(p.http)
        with pytest.raises(InferenceServerException, match="failed to load model 'broken'"):
            c.load_model("broken")
        c.unload_model("broken")
        assert not c.is_model_ready("broken") and c.is_model_ready("clf")
        with pytest.raises(InferenceServerException, match="unknown model 'nothing'"):
            c.unload_model("nothing")
    finally:
        p.kill()


def test_front_mode_workers_readiness_follows_the_owners_strict_readiness(tmp_path):
    """After a failed load the owner is not ready (strict readiness) and so was the supervisor's
    health port, but every front worker's /v2/health/ready still said ready."""
    p = _front_pod_with_a_broken_model(tmp_path)

    def ready_everywhere() -> set[bool]:
        seen = set()
        for _ in range(12):  # fresh connections: both workers answer some
            c = httpclient.InferenceServerClient(p.http)
            seen.add(c.is_server_ready())
            c.close()
        return seen

    def soon(want: set[bool]) -> None:  # (the owner's readiness is read every 2 s)
        end = time.monotonic() + 10
        while ready_everywhere() != want:
            assert time.monotonic() < end, want
            time.sleep(0.2)

    try:
        p.wait_ready()
        assert ready_everywhere() == {True}
        with pytest.raises(InferenceServerException, match="failed to load model 'broken'"):
            httpclient.InferenceServerClient(p.http).load_model("broken")
        soon({False})
        httpclient.InferenceServerClient(p.http).unload_model("broken")
        soon({True})
    finally:
        p.kill()


def test_front_mode_an_unload_while_the_owner_goes_away_is_done(tmp_path):
    """The owner hung during an unload (then killed as hung): the unload is replayed to it as it
    starts again, yet the client was answered 503 'the other process is gone' (the workers'
    follow-up read of the owner's models failed)."""
    _save(classifier_model(), str(tmp_path), "clf", config="max_batch_size: 8\n")
    p = Proc(serve_args(str(tmp_path), "--workers", "2", "--workers-mode", "front", "--model-control-mode",
                        "explicit", "--load-model", "clf", "--allow-open-admin", "true",
                        "--worker-hang-s", "2"))  # fmt: skip
    owner = 0
    try:
        p.wait_ready()
        owner = int(re.findall(r"model owner \(pid (\d+)\) ready", p.output())[-1])
        os.kill(owner, signal.SIGSTOP)
        httpclient.InferenceServerClient(p.http, network_timeout=60).unload_model("clf")
        end = time.monotonic() + 60
        while len(re.findall(r"model owner \(pid (\d+)\) ready", p.output())) < 2:  # started again
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
        assert not httpclient.InferenceServerClient(p.http).is_model_ready("clf")
    finally:
        with contextlib.suppress(ProcessLookupError):
            if owner:
                os.kill(owner, signal.SIGCONT)
        p.kill()


def _ready_everywhere(p: Proc, model: str) -> set[bool]:
    seen = set()
    for _ in range(12):  # fresh connections: both workers answer some
        c = httpclient.InferenceServerClient(p.http)
        seen.add(c.is_model_ready(model))
        c.close()
    return seen


def _pid(p: Proc, who: str) -> int:
    """The pid of the latest life of ``who`` ("model owner", "worker 1"), from its ready lines."""
    return int(re.findall(rf"{who} \(pid (\d+)\) ready", p.output())[-1])


def _until_started_again(p: Proc, who: str, old: int) -> None:
    end = time.monotonic() + 90
    while _pid(p, who) == old:
        assert time.monotonic() < end, p.output()
        time.sleep(0.2)


def test_front_mode_a_hung_process_holds_no_pod_wide_change_for_ever(tmp_path):
    """A stopped front worker held an unload for ever: the supervisor waited for its answer to
    follow the owner's models, holding the control lock, and its own loop that kills hung
    workers waited on that lock too; a stopped owner did the same to a load. Now the hung process
    is killed after worker_hang_s (10 s here: longer than one round of reading the figures, so the
    old loop did meet the lock before it could kill), and the change is answered: the unload is
    done (the new worker follows the owner's models as it starts), the load fails naming the owner."""
    _save(classifier_model(), str(tmp_path), "clf", config="max_batch_size: 8\n")
    admin = free_port()  # worker 0's admin listener: a stopped worker 1 takes no call meant for it
    p = Proc(serve_args(str(tmp_path), "--workers", "2", "--workers-mode", "front", "--model-control-mode",
                        "explicit", "--load-model", "clf", "--allow-open-admin", "true", "--worker-hang-s", "10",
                        "--admin-http-port", str(admin)))  # fmt: skip
    stopped: list[int] = []
    try:
        p.wait_ready()
        c = httpclient.InferenceServerClient(f"127.0.0.1:{admin}", network_timeout=120, connection_timeout=120)
        victim = _pid(p, "worker 1")
        os.kill(victim, signal.SIGSTOP)
        stopped.append(victim)
        c.unload_model("clf")
        _until_started_again(p, "worker 1", victim)
        assert f"worker 1 (pid {victim}) did not answer the supervisor for 10 s (worker_hang_s): killed" in p.output()
        assert _ready_everywhere(p, "clf") == {False}

        owner = _pid(p, "model owner")
        os.kill(owner, signal.SIGSTOP)
        stopped.append(owner)
        with pytest.raises(InferenceServerException) as e:
            c.load_model("clf")
        assert f"model owner (pid {owner}) did not answer the supervisor for 10 s" in e.value.message()
        _until_started_again(p, "model owner", owner)
        c.load_model("clf")  # the pod converged: the new owner loads, every worker follows
        assert _ready_everywhere(p, "clf") == {True}
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        p.kill()


SOCKET = re.compile(r"\[model owner\]: .*gRPC on unix:(\S+)/models\.sock")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_front_mode_a_killed_supervisors_folder_is_removed_by_the_next_start(tmp_path):
    """A SIGKILLed supervisor left its private folder (the owner's socket) in the temporary folder
    for good; with the chart's /tmp an emptyDir, one more each time the container was killed. The
    next front-mode start removes it, and only it: not the folder of a pod still running there, not
    a link or a folder without a lock that look like one, not an older version's folder."""
    # a temporary folder of its own, short enough for the owner's socket (pod_dir.pod_root)
    tmp = Path(tempfile.mkdtemp(prefix="bg-", dir="/tmp"))
    env = {"TMPDIR": str(tmp)}
    _save(classifier_model(), str(tmp_path / "models"), "clf", config="max_batch_size: 8\n")

    def pod() -> Proc:
        p = Proc(serve_args(str(tmp_path / "models"), "--workers", "2", "--workers-mode", "front"), env=env)
        p.wait_ready()
        return p

    live = dead = later = None
    try:
        live = pod()
        live_dir = SOCKET.search(live.output()).group(1)
        dead = pod()
        dead_dir = SOCKET.search(dead.output()).group(1)
        children = [int(x) for x in re.findall(r"\(pid (\d+)\) ready", dead.output())]
        supervisor = dead.p.pid
        dead.kill()  # SIGKILL: its workers drain and go (they die with it), its folder stays
        end = time.monotonic() + 60
        while not all(_gone(pid) for pid in children):
            assert time.monotonic() < end, dead.output()
            time.sleep(0.1)
        assert os.path.isdir(dead_dir)
        # Look-alikes of a dead supervisor's folder that are none: a link to a folder elsewhere,
        # a folder without a lock file, an older version's folder (no pid, no lock).
        outside = tmp_path / "outside"
        outside.mkdir(mode=0o700)
        (outside / "keep").write_text("mine")
        link = tmp / f"batchgate-{supervisor}-linklink"
        link.symlink_to(outside, target_is_directory=True)
        unlocked = tmp / f"batchgate-{supervisor}-unlocked"
        unlocked.mkdir(mode=0o700)
        older = tmp / "batchgate-a1b2c3d4"
        older.mkdir(mode=0o700)

        later = pod()
        assert not os.path.exists(dead_dir), later.output()
        assert f"front mode: removed {dead_dir}, left by a supervisor that is gone" in later.output()
        assert os.path.exists(os.path.join(live_dir, "models.sock"))
        assert link.is_symlink() and (outside / "keep").read_text() == "mine"
        assert unlocked.is_dir() and older.is_dir()
        for p in (live, later):  # both pods serve, each through its own owner's socket
            c = httpclient.InferenceServerClient(p.http)
            x = httpclient.InferInput("features", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            assert c.infer("clf", [x]).as_numpy("probabilities").shape[0] == 1
            c.close()
    finally:
        for p in (live, dead, later):
            if p is not None:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_front_mode_a_restarted_worker_never_says_ready_while_the_owner_is_not(tmp_path):
    """The owner's readiness was pushed to the workers at each read of the figures (every 2 s), so a
    front worker started again while the owner was not ready (a failed load) listened saying ready
    until the next read. Now a joining worker is told before it listens, and the others when the
    owner's readiness changes."""
    p = _front_pod_with_a_broken_model(tmp_path)
    try:
        p.wait_ready()
        with pytest.raises(InferenceServerException, match="failed to load model 'broken'"):
            httpclient.InferenceServerClient(p.http).load_model("broken")
        p.wait_for("[worker 1]: readiness: not ready")
        victim = _pid(p, "worker 1")
        os.kill(victim, signal.SIGKILL)
        _until_started_again(p, "worker 1", victim)
        p.wait_for(f"worker 1 (pid {_pid(p, 'worker 1')}) ready")
        restarted = p.output().split(f"worker 1 (pid {victim}) was killed by SIGKILL", 1)[1]
        end = time.monotonic() + 30
        while "[worker 1]: readiness:" not in restarted:
            assert time.monotonic() < end, p.output()
            time.sleep(0.1)
            restarted = p.output().split(f"worker 1 (pid {victim}) was killed by SIGKILL", 1)[1]
        first = re.search(r"\[worker 1\]: readiness: (.*)", restarted).group(1)
        assert first.startswith("not ready"), p.output()
        httpclient.InferenceServerClient(p.http).unload_model("broken")
        end = time.monotonic() + 30
        while _ready_everywhere_server(p) != {True}:
            assert time.monotonic() < end, p.output()
            time.sleep(0.2)
    finally:
        p.kill()


def _ready_everywhere_server(p: Proc) -> set[bool]:
    seen = set()
    for _ in range(12):  # fresh connections: both workers answer some
        c = httpclient.InferenceServerClient(p.http)
        seen.add(c.is_server_ready())
        c.close()
    return seen


def test_front_mode_failure_reasons_count_client_requests_as_the_statistics_do(tmp_path):
    """A worker's call to the owner that merged n client requests and failed in the model is sent
    again one request at a time, so that only the request at fault fails. The owner counted both
    (until 2026-12-06): the statistics and Triton's families said 2n failures for n, and the call,
    counted once by reason, put n - 1 of them under OTHER. Every request here fails in the model:
    n failures, all BACKEND."""
    from route_support import POISON, failing_classifier

    # A long queue delay and a batch of 8: each worker merges the requests its clients send at once.
    cfg = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000000 preferred_batch_size: [8] }\n"
    _save(failing_classifier(), str(tmp_path), "clf_bad", config=cfg)
    # (no admission refusal: a refused request is in no statistics, and would leave them short)
    p = Proc(serve_args(str(tmp_path), "--workers", "2", "--workers-mode", "front", "--queue-target-ms", "0",
                        "--max-queue-wait-ms", "0"))  # fmt: skip
    try:
        p.wait_ready()
        clients = 8
        start = threading.Barrier(clients)
        failed = [0] * clients

        def client(i: int) -> None:
            c = grpcclient.InferenceServerClient(p.grpc)
            x = grpcclient.InferInput("features", [1, 4], "FP32")
            x.set_data_from_numpy(POISON)
            try:
                start.wait(60)
                c.infer("clf_bad", [x], client_timeout=120)
            except InferenceServerException:
                failed[i] = 1
            finally:
                c.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(failed) == clients

        def failures() -> tuple[dict, int]:
            got = json.loads(urllib.request.urlopen(f"http://{p.http}/v2/models/clf_bad/stats", timeout=20).read())
            return got, int(got["model_stats"][0]["inference_stats"]["fail"].get("count", 0))

        stats = pod_statistics(failures, clients)
        assert stats["model_stats"][0]["inference_stats"]["fail"]["count"] == clients
        text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics", timeout=20).read().decode()
        reason = 'nv_inference_request_failure{{model="clf_bad",reason="{}",version="1"}}'
        assert _value(text, reason.format("BACKEND")) == clients, text
        assert _value(text, reason.format("OTHER")) == 0
    finally:
        p.kill()


def test_front_mode_logs_each_client_request_once(tmp_path):
    """The workers write the access lines of the requests their clients send; the model owner
    wrote one more for each call a worker made to it (client.address "unix", until 2026-12-06):
    every request twice, and a merged call as one more line."""
    _save(classifier_model(), str(tmp_path / "models"), "clf", config="max_batch_size: 8\n")
    log = tmp_path / "access.log"
    p = Proc(serve_args(str(tmp_path / "models"), "--workers", "2", "--workers-mode", "front", "--access-log", "all",
                        "--access-log-file", str(log)))  # fmt: skip
    try:
        p.wait_ready()
        c = grpcclient.InferenceServerClient(p.grpc)
        x = grpcclient.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        for i in range(3):
            c.infer("clf", [x], request_id=f"r{i}")
        c.close()
        # The workers' own figures (until 2026-12-06 the pod showed only the owner's: its lines)
        url = f"http://127.0.0.1:{p.ports[2]}/metrics"
        eventually(
            lambda: (
                _value(urllib.request.urlopen(url, timeout=20).read().decode(), "batchgate_access_log_lines_total") == 3
            ),
            "the workers' three lines counted",
        )
        p.p.send_signal(signal.SIGTERM)  # a stop writes what is queued, then closes the file
        p.p.wait(60)
    finally:
        p.kill()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(line["batchgate.request.id"] for line in lines) == ["r0", "r1", "r2"], lines
    assert {line["client.address"] for line in lines} == {"127.0.0.1"}


def test_front_mode_exports_the_certificate_the_workers_serve(tmp_path):
    """The workers serve TLS, the model owner a Unix socket: the pod's figures took per-process
    families such as the certificate's expiry from the owner only (until 2026-12-06), so a front
    pod had no batchgate_tls_certificate_expiry_timestamp_seconds, and its alert never fired."""
    from tls_support import make_pki

    _save(classifier_model(), str(tmp_path / "models"), "clf", config="max_batch_size: 8\n")
    pki = make_pki(tmp_path)
    tls = ["--tls-cert-file", pki.path("server.crt"), "--tls-key-file", pki.path("server.key")]
    p = Proc(serve_args(str(tmp_path / "models"), "--workers", "2", "--workers-mode", "front", *tls))
    try:
        p.wait_ready()
        text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics", timeout=20).read().decode()
    finally:
        p.kill()
    expires = pki.server.cert.not_valid_after_utc.timestamp()
    assert _value(text, "batchgate_tls_certificate_expiry_timestamp_seconds") == expires


def test_front_mode_exports_the_routes_the_workers_serve(tmp_path):
    """The workers serve the routes over the owner's models (it has none): the pod's figures took
    the route families and the routes' statistics from the owner only (until 2026-12-06), so a
    front pod had no batchgate_route_* / batchgate_shadow_* series and no statistics of a route."""
    import yaml

    models = tmp_path / "models"
    _save(classifier_model(), str(models), "a", config="max_batch_size: 8\n")
    _save(classifier_model(seed=1), str(models), "b", config="max_batch_size: 8\n")
    routes = tmp_path / "routes.yaml"
    variants = [{"name": "va", "model": "a", "weight": 50}, {"name": "vb", "model": "b", "weight": 50}]
    routes.write_text(yaml.safe_dump({"routes": [{"name": "r", "variants": variants}]}))
    p = Proc(serve_args(str(models), "--workers", "2", "--workers-mode", "front", "--routes-file", str(routes)))
    try:
        p.wait_ready()
        c = grpcclient.InferenceServerClient(p.grpc)
        x = grpcclient.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        for _ in range(10):
            c.infer("r", [x])
        stats = pod_statistics(lambda: successes(c.get_inference_statistics("r", as_json=True)), 10)
        c.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics", timeout=20).read().decode()
    finally:
        p.kill()
    series = 'batchgate_route_requests_total{{route="r",status="OK",variant="{}"}}'
    answered = sum(_value(text, series.format(v)) for v in ("va", "vb"))
    assert answered == 10, text
    assert _value(text, 'nv_inference_request_success{model="r",version=""}') == 10
    assert int(stats["inference_stats"]["success"]["count"]) == 10


def test_front_mode_a_higher_priority_request_passes_those_waiting_at_the_workers(tmp_path):
    """The workers' queue before the owner's knew no priority levels: requests past the calls a
    worker keeps open to the owner waited there in arrival order, so a priority-1 request sent
    after 10 of the default level was answered 10th of 11 (the owner's levels ordered only what
    reached it). The workers' queues now take the owner's priority_levels and default level."""
    config = "max_batch_size: 1\ndynamic_batching { priority_levels: 2 default_priority_level: 2 }\n"
    _save(slow_model(width=1024, layers=1500), str(tmp_path), "slow", config=config)  # ~0.3 s a request
    p = Proc(serve_args(str(tmp_path), "--workers", "2", "--workers-mode", "front", "--queue-target-ms", "0",
                        "--max-queue-wait-ms", "0"))  # fmt: skip
    try:
        p.wait_ready()
        order: list[str] = []
        lock = threading.Lock()

        def client(name: str, priority: int) -> None:
            c = grpcclient.InferenceServerClient(p.grpc)
            x = grpcclient.InferInput("input", [1, 1024], "FP32")
            x.set_data_from_numpy(np.ones((1, 1024), np.float32))
            try:
                c.infer("slow", [x], client_timeout=120, priority=priority)
                with lock:
                    order.append(name)
            finally:
                c.close()

        lows = [threading.Thread(target=client, args=(f"low{i}", 0)) for i in range(10)]
        for t in lows:
            t.start()
        metrics = f"http://127.0.0.1:{p.ports[2]}/metrics"
        series = 'batchgate_inflight_requests{model="slow",version="1"}'
        eventually(
            lambda: _value(urllib.request.urlopen(metrics, timeout=20).read().decode(), series) >= 10,
            "the 10 requests of the default level in flight",
            timeout=60,
        )
        high = threading.Thread(target=client, args=("high", 1))
        high.start()
        for t in (*lows, high):
            t.join()
        assert len(order) == 11
        # at most the one executing and those the owner took meanwhile go before it
        assert order.index("high") <= 3, order
    finally:
        p.kill()
