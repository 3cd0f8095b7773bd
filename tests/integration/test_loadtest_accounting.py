"""The load-test harness's accounting, run for real against the scripted test server: what
enters the latency histograms, what a Ctrl-C keeps, and how a generator that falls behind is
reported."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_loadtest import loadtest, step, testserver  # noqa: F401 - testserver is a fixture


def _good_and_bad(path) -> None:
    """Requests in turn: one the test server answers, one it refuses at once (wrong shape)."""
    good = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    bad = {"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")


@pytest.mark.serial
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_fast_refusal_is_counted_as_an_error_and_not_as_a_latency(tmp_path, testserver, protocol):  # noqa: F811
    # Every answer takes the 50 ms service time; every refusal comes back at once. Half the
    # requests are refused: had they entered the histograms, the p50 would be a refusal's.
    srv = testserver("--service-ms", "50", "--workers", "8")
    data = tmp_path / "mixed.jsonl"
    _good_and_bad(data)
    done, doc = loadtest(
        tmp_path / "out",
        srv.grpc if protocol == "grpc" else srv.http,
        "--protocol",
        protocol,
        "--model",
        "echo",
        "--data",
        str(data),
        "--rate",
        "20",
        "--duration",
        "1",
        "--warmup",
        "0",
    )
    s = step(doc)
    refused = {"grpc": "INVALID_ARGUMENT", "http": "400"}[protocol]
    assert s["ok"] == 10 and s["errors"] == {refused: 10}, (s["ok"], s["errors"])
    assert s["samples"] == s["ok"], s["samples"]  # the answers only
    assert s["corrected_ms"]["p50"] >= 50 and s["uncorrected_ms"]["p50"] >= 50, s["corrected_ms"]
    assert done.returncode == 0, done.stderr  # no SLO given, and requests were answered


@pytest.mark.serial
def test_a_ctrl_c_mid_step_keeps_the_windows_measured_before_it(tmp_path, testserver):  # noqa: F811
    srv = testserver()
    out = tmp_path / "out"
    args = [
        *("loadtest", srv.grpc, "--model", "echo", "--rate", "50", "--duration", "60", "--window", "0.5"),
        *("--warmup", "0", "--deadline-ms", "200", "--max-lag-p99-ms", "250", "--out", str(out)),
    ]
    p = subprocess.Popen(
        [sys.executable, "-m", "batchgate.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own, as a terminal's Ctrl-C reaches it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        seen = []
        for line in p.stderr:  # the live line of each window, shown once the window is over
            seen.append(line)
            if "#2 1..1.5s]" in line:
                break
        os.killpg(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    stderr = "".join(seen) + stderr
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr  # (each worker printed one)
    assert "interrupted (Ctrl-C) during step 'constant 50/s'" in stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["verdict"]["interrupted"] and doc["verdict"]["valid"] is False
    s = step(doc)
    assert not s["valid"] and "interrupted" in s["problems"][0]
    windows = [w for w in s["windows"] if w["phase"] == "measure"]
    # at least the windows shown before the Ctrl-C, each whole, and none near the interrupt
    assert len(windows) >= 2 and all(w["end_s"] - w["start_s"] == 0.5 for w in windows), windows
    assert s["sent"] == 25 * len(windows) and s["ok"] == s["sent"], s
    assert (out / "summary.txt").exists() and "interrupted" in stdout


@pytest.mark.serial
def test_a_sigterm_mid_step_keeps_what_was_measured_as_a_ctrl_c_does(tmp_path, testserver):  # noqa: F811
    """SIGTERM (``timeout``, a cancelled CI job, Kubernetes) ended the run with no report at all:
    what was measured was lost. It now ends as a Ctrl-C does, with its own exit status, 143."""
    srv = testserver()
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-m", "batchgate.cli", "loadtest", srv.grpc, "--model", "echo", "--rate", "50"]
        + ["--duration", "60", "--window", "0.5", "--warmup", "0", "--deadline-ms", "200"]
        + ["--max-lag-p99-ms", "250", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        seen = []
        for line in p.stderr:
            seen.append(line)
            if "#2 1..1.5s]" in line:
                break
        p.terminate()  # (the coordinator alone, as timeout sends it)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    stderr = "".join(seen) + stderr
    assert p.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    assert "interrupted (SIGTERM) during step 'constant 50/s'" in stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["verdict"]["interrupted"] and doc["verdict"]["valid"] is False
    windows = [w for w in step(doc)["windows"] if w["phase"] == "measure"]
    assert len(windows) >= 2, windows
    assert (out / "summary.txt").exists() and "interrupted" in stdout
    deadline = time.monotonic() + 30
    while _alive_in_group(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive_in_group(p.pid) == [], "workers outlived the coordinator"


def _alive_in_group(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that still run (a zombie has ended: nothing in this
    container may reap the orphans)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _ppid, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # (gone meanwhile)
        if int(group) == pgid and state not in ("Z", "X"):
            alive.append(int(entry))
    return alive


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_the_workers_end_when_the_coordinator_is_killed(tmp_path, testserver):  # noqa: F811
    """SIGTERM (``timeout``, a cancelled CI job) runs no clean-up in the coordinator: its worker
    went on sending to the end of the 60 s step with nobody measuring, then waited for good."""
    srv = testserver()
    p = subprocess.Popen(
        [sys.executable, "-m", "batchgate.cli", "loadtest", srv.grpc, "--model", "echo", "--rate", "20"]
        + ["--duration", "60", "--window", "0.5", "--warmup", "0", "--max-lag-p99-ms", "250"]
        + ["--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own: its workers are found by it
    )
    try:
        for line in p.stderr:  # the first window's live line: the worker is sending
            if "#0 0..0.5s]" in line:
                break
        assert len(_alive_in_group(p.pid)) >= 2, "the coordinator and its worker"
        p.terminate()
        p.wait(30)
        deadline = time.monotonic() + 30  # (they are gone at once; this only bounds a failure)
        while _alive_in_group(p.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive_in_group(p.pid) == [], "workers outlived the coordinator"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.stderr.close()
        p.wait(10)


@pytest.mark.serial
def test_a_sweep_without_an_slo_does_not_call_a_failing_rate_sustainable(tmp_path, testserver):  # noqa: F811
    """A rate sweep with no SLO judged its steps on validity alone while its report said 'SLO
    errors <= 0.10%' and 'SLO met': a rate at which half the requests failed was named the
    sustainable throughput. A sweep's steps now meet the default error budget at least."""
    srv = testserver()
    data = tmp_path / "mixed.jsonl"
    _good_and_bad(data)
    args = ("--model", "echo", "--duration", "1", "--warmup", "0", "--sweep-rate", "10,20")
    done, doc = loadtest(tmp_path / "bad", srv.grpc, *args, "--data", str(data))
    assert doc["sweep"]["best"] is None and doc["steps"][0]["slo_met"] is False, doc["sweep"]
    assert "error rate 50.00% > budget 0.10%" in doc["steps"][0]["slo_problems"]
    assert done.returncode == 1, done.stderr
    done, doc = loadtest(tmp_path / "good", srv.grpc, *args)  # answered: both rates pass
    assert doc["sweep"]["best"] == doc["steps"][1]["label"] and done.returncode == 0, (doc["sweep"], done.stderr)


@pytest.mark.serial
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_timeout_enters_the_uncorrected_histogram_at_its_deadline(tmp_path, testserver, protocol):  # noqa: F811
    """One request in flight at a time against a 50 ms server, at ten times its capacity: most
    requests wait for the slot and leave with a few ms of their deadline left (or none), then
    time out. Timed from their send they entered the uncorrected histogram at those few ms, and
    its p50 read below the server's service time. A timeout enters at its deadline."""
    srv = testserver("--service-ms", "50", "--workers", "1")
    limit = ("--streams-per-channel", "1") if protocol == "grpc" else ("--connections", "1")
    done, doc = loadtest(
        tmp_path / "out",
        srv.grpc if protocol == "grpc" else srv.http,
        *("--protocol", protocol, "--model", "echo", "--rate", "200", "--duration", "1", "--warmup", "0"),
        *("--deadline-ms", "300", *limit),
    )
    s = step(doc)
    timeouts = sum(v for k, v in s["errors"].items() if k in ("DEADLINE_EXCEEDED", "timeout"))
    assert timeouts > s["completed"] / 2, s["errors"]  # most of them: the p50 is a timeout's
    assert s["samples"] == s["completed"], s  # answers and timeouts, nothing else
    assert s["uncorrected_ms"]["p50"] >= 300, s["uncorrected_ms"]
    assert s["uncorrected_ms"]["p50"] <= s["corrected_ms"]["p50"], (s["uncorrected_ms"], s["corrected_ms"])


def test_a_stream_target_that_goes_away_mid_run_is_counted_without_tracebacks(tmp_path, testserver):  # noqa: F811
    """The server stops during the step: its streams end with an error, and the new ones fail to
    connect. Each request the reader failed while its own write failed first left an exception
    never retrieved, and asyncio printed a traceback for it (dozens a second); a write racing
    a stream's end was counted "client error (InvalidStateError)"."""
    srv = testserver()
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-m", "batchgate.cli", "loadtest", srv.grpc, "--grpc-stream", "--model", "echo"]
        + ["--rate", "100", "--duration", "2", "--window", "0.5", "--warmup", "0", "--max-lag-p99-ms", "250"]
        + ["--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        for line in p.stderr:  # the first window's live line: streams are open and answered
            seen.append(line)
            if "#0 0..0.5s]" in line:
                break
        srv.stop()
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    stderr = "".join(seen) + stderr
    assert "never retrieved" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    s = step(json.loads((out / "results.json").read_text()))
    assert s["ok"] >= 50 and s["errors"].get("UNAVAILABLE", 0) > 0, s["errors"]
    assert not [k for k in s["errors"] if k.startswith("client error")], s["errors"]


def test_a_window_is_shown_with_the_counts_its_workers_sent_while_the_coordinator_was_held_up(tmp_path, testserver):  # noqa: F811
    """The coordinator scrapes --metrics-url as each window ends, and a stalled server's page
    takes up to 2 s. It read one worker message per turn, then showed every window due: those
    shown after a slow scrape read "send 0.0/40.0" though the worker had sent them all."""
    import http.server
    import re
    import threading

    class SlowMetrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(1.2)  # (what holds the coordinator up; not a bound anything is judged by)
            body = b"# TYPE up gauge\nup 1\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    metrics = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowMetrics)
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    srv = testserver()
    out = tmp_path / "out"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batchgate.cli", "loadtest", srv.grpc, "--model", "echo", "--rate", "40"]
            + ["--duration", "1.5", "--window", "0.5", "--warmup", "0", "--max-lag-p99-ms", "250"]
            + ["--metrics-url", f"http://127.0.0.1:{metrics.server_address[1]}/metrics", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        metrics.shutdown()
    assert done.returncode == 0, done.stderr
    shown = {int(i): float(r) for i, r in re.findall(r"#(\d+) [^\]]*\]  send ([\d.]+)/", done.stderr)}
    s = step(json.loads((out / "results.json").read_text()))
    sent = {w["index"]: w["sent_rate"] for w in s["windows"] if w["phase"] == "measure"}
    assert shown == sent == {0: 40.0, 1: 40.0, 2: 40.0}, done.stderr


# The scripted test server, except that its stream ends itself (status OK) on every 10th request,
# leaving that request unanswered: as a server closing a stream does.
_ENDING_STREAMS = """
import asyncio
from batchgate.loadtest import testserver as ts

seen = 0

async def stream(self, requests, context):
    global seen
    async for request in requests:
        seen += 1
        if seen % 10 == 0:
            return
        yield await self._stream_one(request)

ts._GrpcService.ModelStreamInfer = stream

async def main():
    server = ts.TestServer(service_ms=5, workers=8)
    await server.start()
    print(f"gRPC on {server.grpc_port}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.serial
def test_a_request_left_unanswered_by_a_stream_the_server_ends_is_not_a_timeout(tmp_path):
    """A stream the server ended with status OK left the requests written on it waiting out their
    deadline: each was counted DEADLINE_EXCEEDED at 500 ms, a timeout the server never had."""
    script = tmp_path / "ending_streams.py"
    script.write_text(_ENDING_STREAMS)
    srv = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline()
        assert line.startswith("gRPC on "), line
        done, doc = loadtest(
            tmp_path / "out",
            f"127.0.0.1:{line.split()[-1]}",
            *("--model", "echo", "--grpc-stream", "--rate", "50", "--duration", "1", "--warmup", "0"),
            *("--deadline-ms", "500"),
        )
    finally:
        srv.terminate()
        srv.wait(10)
    s = step(doc)
    assert s["sent"] == 50 and s["completed"] == 50 and s["ok"] >= 40, s
    assert set(s["errors"]) == {"stream ended unanswered"}, s["errors"]
    assert s["samples"] == s["ok"], s["samples"]  # the answers: no unanswered request entered at a deadline
    assert done.returncode == 0, done.stderr


@pytest.mark.serial
def test_a_sweep_that_found_its_rate_passes_though_a_step_above_it_answered_nothing(tmp_path, testserver):  # noqa: F811
    """The step above a sweep's knee misses the SLO, as it should; when it answered no request at
    all, the run exited 1 ("no request was answered OK") while its report said the sustainable
    rate was found and the SLO met. The sweep's verdict decides."""
    srv = testserver()
    good = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    bad = {"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}
    data = tmp_path / "then_refused.jsonl"  # one worker sends these in turn: step 1 the 10 good, step 2 the 20 bad
    data.write_text("".join(json.dumps(r) + "\n" for r in [good] * 10 + [bad] * 20))
    done, doc = loadtest(
        tmp_path / "out",
        srv.grpc,
        *("--model", "echo", "--data", str(data), "--workers", "1", "--sweep-rate", "10,20"),
        *("--duration", "1", "--warmup", "0", "--cooldown", "0"),
    )
    first, second = doc["steps"]
    assert (first["ok"], first["errors"]) == (10, {}), first
    assert (second["ok"], second["errors"]) == (0, {"INVALID_ARGUMENT": 20}), second
    assert doc["sweep"]["best"] == first["label"] and doc["verdict"]["slo_met"] is True, doc["verdict"]
    assert done.returncode == 0, done.stderr
