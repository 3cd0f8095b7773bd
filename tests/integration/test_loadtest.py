"""The load-test harness against real servers over real sockets: the scripted test server
(loadtest/testserver.py) for the timing properties, and batchgate itself for the reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from batchgate.demo import build_demo_repository
from processes import Proc, serve_args

READY = re.compile(r"HTTP on [^:]+:(\d+), gRPC on [^:]+:(\d+)")


class TestServerProc:
    """``python -m batchgate.loadtest.testserver`` in a subprocess."""

    __test__ = False

    def __init__(self, *args: str):
        self.p = subprocess.Popen(
            [sys.executable, "-m", "batchgate.loadtest.testserver", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.p.stdout.readline()
        m = READY.search(line)
        assert m, f"test server did not start: {line}{self.p.stdout.read() if self.p.poll() is not None else ''}"
        self.http, self.grpc = f"127.0.0.1:{m.group(1)}", f"127.0.0.1:{m.group(2)}"
        threading.Thread(target=self.p.stdout.read, daemon=True).start()  # keep the pipe drained

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            self.p.wait(10)


@pytest.fixture
def testserver():
    started = []

    def start(*args):
        s = TestServerProc(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# The generator's own lag bound (10 ms by default) judges the machine it runs on: on a shared
# 2-core CI runner running other tests beside this one, a step of a test about reports, shapes or
# rates was marked INVALID (exit 3) by a 12 ms p99 dispatch lag. Those tests loosen the bound; the
# tests about validity itself keep the default (``strict=True``).
LAG_TOLERANT = ("--max-lag-p99-ms", "250")


def loadtest(
    out: Path, *args: str, timeout: float = 180, strict: bool = False
) -> tuple[subprocess.CompletedProcess, dict]:
    extra = () if strict or "--max-lag-p99-ms" in args else LAG_TOLERANT
    done = subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "loadtest", *args, *extra, "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    report = out / "results.json"
    doc = json.loads(report.read_text()) if report.exists() else {}
    return done, doc


def step(doc: dict, i: int = 0) -> dict:
    return doc["steps"][i]


@pytest.mark.serial
def test_a_one_second_stall_shows_in_the_corrected_p99_and_not_in_the_uncorrected(tmp_path, testserver):
    # Two keep-alive connections, one request in flight on each: while the server stalls, the
    # requests the schedule keeps producing wait for a connection. Timed from their intended
    # send time they saw the stall; timed from their actual send they did not.
    srv = testserver("--stall-at", "1.5", "--stall-s", "1")
    done, doc = loadtest(
        tmp_path,
        srv.http,
        "--protocol",
        "http",
        "--model",
        "echo",
        "--rate",
        "100",
        "--duration",
        "4",
        "--warmup",
        "0.5",
        "--connections",
        "2",
        "--deadline-ms",
        "5000",
    )
    assert done.returncode == 0, done.stderr
    s = step(doc)
    assert s["valid"], s["problems"]  # waiting for a connection is the server's doing, not the generator's
    assert s["corrected_ms"]["p99"] >= 500, s["corrected_ms"]
    assert s["uncorrected_ms"]["p99"] < 100, s["uncorrected_ms"]
    assert s["corrected_ms"]["max"] >= 900 and s["errors"] == {}


@pytest.mark.serial
def test_a_sustainable_rate_is_achieved_within_one_percent(tmp_path, testserver):
    srv = testserver()
    done, doc = loadtest(tmp_path, srv.grpc, "--model", "echo", "--rate", "400", "--duration", "3", "--warmup", "0.5")
    assert done.returncode == 0, done.stderr
    s = step(doc)
    assert s["valid"] and abs(s["sent_rate"] - 400) / 400 <= 0.01, s
    assert s["ok"] == s["samples"] == s["stability"]["scheduled"] == 1200  # every scheduled request, answered
    # a warm-up shorter than a window is a window of its own length, at the rate asked
    (warm,) = [w for w in s["windows"] if w["phase"] == "warmup"]
    assert warm["start_s"] == -0.5 and abs(warm["sent_rate"] - 400) / 400 <= 0.05, warm


@pytest.mark.serial
def test_a_rate_the_generator_cannot_keep_is_marked_invalid(tmp_path, testserver):
    srv = testserver()
    done, doc = loadtest(
        tmp_path, srv.grpc, "--model", "echo", "--rate", "200000", "--duration", "2", "--warmup", "0", strict=True
    )
    assert done.returncode == 3, done.stdout + done.stderr  # invalid measurement
    s = step(doc)
    assert not s["valid"] and any("fell behind" in p or "lag" in p for p in s["problems"])
    assert "INVALID" in done.stdout
    # the verdict says what to change, from what went wrong (this machine decides which advice)
    advice = next(p for p in s["problems"] if p.startswith("to fix: "))
    assert "a lower --rate" in advice and ("--workers" in advice or "--precise-timing" in advice), advice
    assert "to fix: " in done.stdout


@pytest.mark.serial
def test_the_rate_sweep_finds_the_knee_of_a_server_with_known_capacity(tmp_path, testserver):
    # 10 ms per request, one at a time: 100 requests/s, and latency explodes past it.
    srv = testserver("--service-ms", "10", "--workers", "1")
    done, doc = loadtest(
        tmp_path,
        srv.grpc,
        "--model",
        "echo",
        "--sweep-rate",
        "20:200",
        "--search",
        "binary",
        "--precision",
        "8",
        "--slo-p99-ms",
        "100",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--deadline-ms",
        "1000",
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # a best rate was found
    # 180 req/s wide, to within 8: at most 2 ends and 5 halvings, announced with the time left
    assert "step 1 of at most 7: constant 20/s (at most " in done.stderr, done.stderr
    assert f"step {len(doc['steps'])} of at most 7: " in done.stderr and ", done by " in done.stderr
    best = doc["sweep"]["best"]
    rate = next(s["target_rate"] for s in doc["steps"] if s["label"] == best)
    assert 80 <= rate <= 100.5, (best, [(s["label"], s["slo_met"]) for s in doc["steps"]])
    assert all(s["slo_met"] is False for s in doc["steps"] if s["target_rate"] > 110)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


@pytest.mark.serial
def test_an_slo_breach_is_a_non_zero_exit(tmp_path, testserver):
    srv = testserver("--service-ms", "5", "--workers", "1")
    done, doc = loadtest(
        tmp_path,
        srv.http,
        "--protocol",
        "http",
        "--model",
        "echo",
        "--rate",
        "50",
        "--duration",
        "1.5",
        "--warmup",
        "0.2",
        "--slo-p99-ms",
        "1",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert step(doc)["slo_met"] is False and "SLO" in done.stdout


@pytest.mark.serial
@pytest.mark.parametrize(
    "protocol, extra",
    [("grpc", []), ("http", ["--http-encoding", "binary"]), ("grpc", ["--grpc-stream"]), ("http", [])],
)
def test_against_batchgate_reports_and_plots_are_written_and_agree_with_its_own_histograms(tmp_path, protocol, extra):
    repo = build_demo_repository(str(tmp_path / "models"))
    srv = Proc(serve_args(repo)).wait_ready()
    try:
        target = srv.grpc if protocol == "grpc" else srv.http
        out = tmp_path / "out"
        done, doc = loadtest(
            out,
            target,
            "--protocol",
            protocol,
            "--model",
            "classifier",
            "--rate",
            "300",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--metrics-url",
            f"http://127.0.0.1:{srv.ports[2]}/metrics",
            *extra,
        )
    finally:
        srv.kill()
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("results.json", "results.csv", "summary.txt", "timeline.png", "spectrum.png"):
        assert (out / name).stat().st_size > 0, name
    assert list(out.glob("*.hlog")) and list(out.glob("*.hgrm"))
    s = step(doc)
    assert s["valid"] and s["ok"] == s["stability"]["scheduled"] and s["errors"] == {}
    server = s["server"]
    assert server["request_count"] >= s["ok"] * 0.95  # the server saw the step (and a little warm-up tail)
    # The client's latency is the server's plus the hop (client, network, transport): never less
    # (within the server histogram's bucket resolution), and not more than a few milliseconds.
    for q in ("p50", "p90"):
        client, srv_ms = s["uncorrected_ms"][q], server[f"request_{q}_ms"]
        assert srv_ms - 0.25 <= client <= srv_ms + 10, (q, client, srv_ms)
    assert any(w["server"].get("queue_depth") is not None for w in s["windows"])


@pytest.mark.serial
def test_a_stream_refusal_is_recorded_by_the_code_its_words_say(tmp_path):
    """A stream's error answer has no code: every one was recorded UNKNOWN. batchgate's overload
    refusal (RESOURCE_EXHAUSTED on a unary call) is now recorded as such: one request in flight at
    most, eight callers of a model that takes tens of milliseconds, each on a stream of its own
    (a stream's request waits for the same stream's requests in flight instead of being refused:
    refusals reach only a stream with nothing of its own in flight)."""
    from batchgate.demo import _save
    from route_support import slow_classifier

    repo = tmp_path / "models"
    _save(slow_classifier(), str(repo), "slow", config="max_batch_size: 8\n")
    srv = Proc(serve_args(str(repo), "--max-inflight-requests", "1")).wait_ready()
    try:
        done, doc = loadtest(
            tmp_path / "out",
            srv.grpc,
            "--model",
            "slow",
            "--grpc-stream",
            "--concurrency",
            "8",
            "--channels",
            "8",
            "--duration",
            "1",
            "--warmup",
            "0",
        )
    finally:
        srv.kill()
    assert done.returncode == 0, done.stdout + done.stderr
    s = step(doc)
    assert s["ok"] > 0 and set(s["errors"]) == {"RESOURCE_EXHAUSTED"}, s["errors"]


@pytest.mark.serial
def test_the_server_view_counts_every_request_the_step_sent(tmp_path):
    """With no warm-up, the server's count over the step is exactly what was sent. It came out one
    short: the scrape the count starts from was taken once the measurement had begun, after the
    first request (sent at 0) had been answered and counted."""
    repo = build_demo_repository(str(tmp_path / "models"))
    srv = Proc(serve_args(repo)).wait_ready()
    try:
        for protocol, target in (("grpc", srv.grpc), ("http", srv.http)):
            done, doc = loadtest(
                tmp_path / protocol,
                target,
                "--protocol",
                protocol,
                "--model",
                "classifier",
                "--rate",
                "20",
                "--duration",
                "1",
                "--warmup",
                "0",
                "--metrics-url",
                f"http://127.0.0.1:{srv.ports[2]}/metrics",
            )
            assert done.returncode == 0, done.stdout + done.stderr
            s = step(doc)
            assert s["sent"] == s["ok"] == 20, s
            assert s["server"]["request_count"] == 20, (protocol, s["server"])
    finally:
        srv.kill()


@pytest.mark.serial
def test_workers_poisson_arrivals_and_a_ramp_shape(tmp_path, testserver):
    srv = testserver()
    done, doc = loadtest(
        tmp_path,
        srv.grpc,
        "--model",
        "echo",
        "--workers",
        "2",
        "--arrival",
        "poisson",
        "--shape",
        "ramp:100:400",
        "--duration",
        "4",
        "--warmup",
        "0.5",
        "--window",
        "1",
    )
    assert done.returncode == 0, done.stderr
    s = step(doc)
    assert s["valid"] and s["ok"] == s["samples"] == s["stability"]["scheduled"]
    windows = [w for w in s["windows"] if w["phase"] == "measure"]
    targets = [w["target_rate"] for w in windows]
    assert targets == sorted(targets) and targets[0] < 160 and targets[-1] > 340  # the ramp
    assert windows[-1]["sent"] > 2 * windows[0]["sent"]  # the sends followed it


@pytest.mark.serial
def test_sweeps_by_steps_and_by_concurrency_closed_loop(tmp_path, testserver):
    srv = testserver("--service-ms", "10", "--workers", "1")
    done, doc = loadtest(
        tmp_path / "rate",
        srv.http,
        "--protocol",
        "http",
        "--model",
        "echo",
        "--sweep-rate",
        "40:160:40",
        "--slo-p99-ms",
        "60",
        "--duration",
        "1.5",
        "--warmup",
        "0.3",
        "--deadline-ms",
        "1000",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rates = [s["target_rate"] for s in doc["steps"]]
    assert rates[:2] == [40, 80] and doc["sweep"]["best"] == "constant 80/s"
    assert doc["steps"][-1]["slo_met"] is False and len(rates) <= 4  # stops at the first breach
    assert "step 1 of 4: constant 40/s (at most " in done.stderr, done.stderr
    if len(rates) < 4:
        assert f"the sweep stops at step {len(rates)} of 4: it missed the SLO" in done.stderr

    done, doc = loadtest(
        tmp_path / "conc",
        srv.grpc,
        "--model",
        "echo",
        "--sweep-concurrency",
        "1,4",
        "--duration",
        "1.5",
        "--warmup",
        "0.3",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    one, four = doc["steps"]
    assert one["mode"] == four["mode"] == "closed" and "closed loop" in one["label"]
    assert "step 2 of 2: concurrency 4 (closed loop) (about " in done.stderr, done.stderr
    assert four["corrected_ms"]["p50"] > 2.5 * one["corrected_ms"]["p50"]  # they queue at the one worker
    assert abs(four["throughput"] - one["throughput"]) < 0.25 * one["throughput"]  # at the same capacity


EXAMPLES = Path(__file__).resolve().parents[2] / "loadtest" / "examples"


@pytest.mark.serial
def test_the_closed_loop_example_runs_and_its_best_step_has_the_highest_passing_throughput(tmp_path, testserver):
    # the shipped example as it is, pointed at the test server and shortened by flags (flags win)
    srv = testserver()
    done, doc = loadtest(
        tmp_path,
        "--scenario",
        str(EXAMPLES / "closed-loop.yaml"),
        srv.http,
        "--model",
        "echo",
        "--duration",
        "0.4",
        "--window",
        "0.4",
        "--warmup",
        "0",
        "--cooldown",
        "0",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert doc["scenario"]["mode"] == "closed" and doc["scenario"]["protocol"] == "http"
    levels = [s["concurrency"] for s in doc["steps"]]
    assert levels == [1, 2, 4, 8, 16, 32]  # the example's YAML list
    for k in (1, 6):
        assert f"step {k} of 6: concurrency {levels[k - 1]} (closed loop) (about " in done.stderr, done.stderr
    passing = [s for s in doc["steps"] if s["slo_met"]]
    best = next(s for s in doc["steps"] if s["label"] == doc["sweep"]["best"])
    assert best["throughput"] == max(s["throughput"] for s in passing)


def test_a_timeout_is_an_error_recorded_at_its_timeout(tmp_path, testserver):
    srv = testserver("--service-ms", "300", "--workers", "8")
    done, doc = loadtest(
        tmp_path,
        srv.grpc,
        "--model",
        "echo",
        "--rate",
        "20",
        "--duration",
        "1.5",
        "--warmup",
        "0",
        "--deadline-ms",
        "50",
    )
    s = step(doc)
    assert set(s["errors"]) == {"DEADLINE_EXCEEDED"} and s["ok"] == 0
    assert s["corrected_ms"]["p50"] >= 50 and s["uncorrected_ms"]["p50"] >= 50
    assert "DEADLINE_EXCEEDED" in done.stdout


@pytest.mark.serial
def test_payloads_from_files_carry_the_synthetic_marker(tmp_path):
    import asyncio

    import numpy as np

    from batchgate.loadtest.testserver import TestServer

    loop = asyncio.new_event_loop()
    server = TestServer()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        npz = tmp_path / "one.npz"
        np.savez(npz, INPUT0=np.ones((3, 4), np.float32))
        jsonl = tmp_path / "many.jsonl"
        jsonl.write_text(
            "\n".join(
                json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [i, i, i, i]}]})
                for i in range(5)
            )
            + "\n"
        )
        runs = [(f"127.0.0.1:{server.grpc_port}", "grpc", npz), (f"127.0.0.1:{server.http_port}", "http", jsonl)]
        total = 0
        for target, protocol, data in runs:
            done, doc = loadtest(
                tmp_path / protocol,
                target,
                "--protocol",
                protocol,
                "--model",
                "echo",
                "--data",
                str(data),
                "--rate",
                "50",
                "--duration",
                "1",
                "--warmup",
                "0",
            )
            assert done.returncode == 0, done.stderr
            total += step(doc)["ok"]
        assert total >= 100 and server.synthetic == server.received == server.answered
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"inputs": [{"name": "INPUT0"}]}\n')
        done, _ = loadtest(
            tmp_path / "bad",
            runs[1][0],
            "--protocol",
            "http",
            "--model",
            "echo",
            "--data",
            str(bad),
            "--rate",
            "10",
            "--duration",
            "0.5",
        )
        assert done.returncode == 2 and "bad.jsonl:1: not a V2 JSON request" in done.stderr
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


@pytest.mark.serial
@pytest.mark.parametrize("extra", [[], ["--grpc-stream"]])
def test_errors_are_recorded_by_their_code_and_an_error_budget_alone_gates_the_exit(tmp_path, testserver, extra):
    srv = testserver()
    bad = tmp_path / "bad.jsonl"  # the test server takes [n, 4]: every request is refused
    bad.write_text(
        json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]})
        + "\n"
    )
    done, doc = loadtest(
        tmp_path / "out",
        srv.grpc,
        "--model",
        "echo",
        "--data",
        str(bad),
        "--rate",
        "40",
        "--duration",
        "1",
        # a short warm-up: the first send of a new stream can be late by more than the generator's
        # 10 ms lag bound, and with 40 samples that one sample made the whole run INVALID (exit 3)
        "--warmup",
        "0.3",
        "--error-budget",
        "0.01",
        *extra,
    )
    s = step(doc)
    # A V2 stream error carries a message and no code: the test server's words name none (UNKNOWN);
    # either way, not a timeout, so no refusal is a latency sample.
    assert set(s["errors"]) == ({"UNKNOWN"} if extra else {"INVALID_ARGUMENT"}), s["errors"]
    assert s["samples"] == 0 and s["corrected_ms"]["p99"] is None
    assert done.returncode == 1 and s["slo_met"] is False  # 100% errors against a 1% budget


def test_a_grpc_stream_worker_opens_its_streams_as_it_connects(testserver):
    """The streams were opened by a step's first requests, on the event loop in the measured
    window (the reader's import of the protocol's messages alone took ~0.1 s): a one-second run
    with no warm-up read INVALID for the dispatch lag. They are now open once connect() returns,
    their readers running, before any step."""
    import asyncio
    import queue

    from batchgate.loadtest.payload import Encoded
    from batchgate.loadtest.worker import Transport, Worker

    srv = testserver()

    async def run() -> list:
        w = Worker(
            0, Transport(srv.grpc, "grpc", "echo", grpc_stream=True, channels=2), [Encoded(b"", {})], queue.Queue()
        )
        await w.connect()
        try:
            return [(s is not None and not s.done()) for s in w.streams]
        finally:
            await w.close()

    assert asyncio.run(run()) == [True, True]
