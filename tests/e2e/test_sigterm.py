"""SIGTERM under steady traffic (issue: safe to expose, point 10): calls that arrive while the
server drains get UNAVAILABLE / 503 with a message, never CANCELLED or a reset connection in
the middle of a request, until the listeners close (then connecting fails, which clients see
as UNAVAILABLE / connection refused)."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections import Counter

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from batchgate.demo import _save, classifier_model, slow_model
from processes import Proc, logged_at, serve_args, slow_to_load

BODY = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [0.1, 0.2, 0.3, 0.4]}]})


def test_sigterm_under_traffic_answers_unavailable_never_cancelled(tmp_path):
    _save(classifier_model(), str(tmp_path), "clf")
    _save(slow_model(layers=96), str(tmp_path), "slow", config="max_batch_size: 64\n")
    p = Proc(serve_args(str(tmp_path)))
    try:
        p.wait_ready()
        stop = threading.Event()
        outcomes: Counter = Counter()
        lock = threading.Lock()

        when: dict[str, list[float]] = {}

        def note(what: str) -> None:
            with lock:
                outcomes[what] += 1
                when.setdefault(what, []).append(time.time())

        def grpc_caller():
            c = grpcclient.InferenceServerClient(p.grpc)
            x = grpcclient.InferInput("features", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            while not stop.is_set():
                try:
                    c.infer("clf", [x], client_timeout=10)
                    note("grpc OK")
                except InferenceServerException as e:
                    status = str(e.status())
                    if status == "StatusCode.UNAVAILABLE" and "shutting down" not in (e.message() or ""):
                        note("grpc UNAVAILABLE (connect)")  # the listener is closed
                        time.sleep(0.01)
                    else:
                        note(f"grpc {status}" + ("" if "UNAVAILABLE" in status else f": {e.message()}"))

        def http_caller():
            host, port = p.http.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            while not stop.is_set():
                try:
                    conn.request("POST", "/v2/models/clf/infer", BODY, {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    body = r.read()
                    note(f"http {r.status}")
                    if r.status == 503 and b"shutting down" not in body:
                        note("http 503 without the message")
                    if r.getheader("connection", "").lower() == "close":
                        conn.close()
                except ConnectionRefusedError:
                    note("http refused (listener closed)")
                    conn.close()
                    time.sleep(0.01)
                except (OSError, http.client.HTTPException) as e:  # reset, broken pipe, closed early
                    note(f"http reset: {type(e).__name__}")
                    conn.close()

        def slow_caller():  # keeps work in flight, so the drain lasts while the others call
            c = grpcclient.InferenceServerClient(p.grpc)
            x = grpcclient.InferInput("input", [64, 1024], "FP32")
            x.set_data_from_numpy(np.ones((64, 1024), np.float32))
            while not stop.is_set():
                try:
                    c.infer("slow", [x], client_timeout=30)
                    note("grpc OK")
                except InferenceServerException as e:
                    note(f"grpc {e.status()}" + ("" if "UNAVAILABLE" in str(e.status()) else f": {e.message()}"))
                    time.sleep(0.01)

        threads = [threading.Thread(target=slow_caller) for _ in range(2)]
        threads += [threading.Thread(target=grpc_caller) for _ in range(4)]
        threads += [threading.Thread(target=http_caller) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(30) == 0, p.output()
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(15)
        good = ("grpc OK", "http 200", "grpc StatusCode.UNAVAILABLE", "http 503")
        closed = ("grpc UNAVAILABLE (connect)", "http refused (listener closed)")
        assert outcomes["grpc OK"] > 0 and outcomes["http 200"] > 0, outcomes
        assert outcomes["grpc StatusCode.UNAVAILABLE"] > 0 and outcomes["http 503"] > 0, (
            outcomes
        )  # drained while called
        # Every call before the listeners close gets an answer with a status; the only other
        # outcomes allowed are the race of the final close itself (see Gateway.stop), a handful.
        closing = logged_at(p.output(), "closing the listeners")
        bad = {k: v for k, v in when.items() if k not in good + closed}
        assert all(t >= closing - 0.05 for ts in bad.values() for t in ts), (outcomes, closing)
        assert sum(len(ts) for ts in bad.values()) <= max(10, 0.01 * sum(outcomes.values())), outcomes
    finally:
        p.kill()


def test_sigterm_while_a_model_loads_stops_before_serving(tmp_path):
    """SIGTERM while start-up loads a model ONNX Runtime takes seconds to build: the load went
    on to its end, then the server listened and said it was serving, and only then drained (a
    pod deleted during a long load held its node until the load ended). Now it stops before
    listening, and the process exits without waiting for the load's thread."""
    _save(slow_to_load(), str(tmp_path), "big", config="max_batch_size: 8\n")
    p = Proc(serve_args(str(tmp_path)))
    try:
        p.wait_for("model 'big' loading", timeout=60)
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(60) == 0, p.output()
        out = p.output()
        assert "shutdown signal received while starting" in out, out
        assert "HTTP on" not in out and "model 'big' ready" not in out, out
        assert "exiting without waiting for batchgate-admin" in out, out  # (the load's thread, left)
    finally:
        p.kill()


def test_sigterm_while_workers_load_a_model_stops_every_process(tmp_path):
    """The same with worker processes: each worker stops its start-up at the supervisor's
    SIGTERM (before, each went on loading, listened, then drained)."""
    _save(slow_to_load(), str(tmp_path), "big", config="max_batch_size: 8\n")
    p = Proc(serve_args(str(tmp_path), "--workers", "2"))
    try:
        p.wait_for("[worker 0]: model 'big' loading", timeout=60)
        p.wait_for("[worker 1]: model 'big' loading", timeout=60)
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(60) == 0, p.output()
        out = p.output()
        assert "model 'big' ready" not in out and "HTTP on" not in out, out
        assert out.count("exiting without waiting for batchgate-admin") == 2, out  # (each worker's load)
    finally:
        p.kill()
