"""The load-test CLI run for real against the scripted test server: shapes are labelled by their
schedule, bad sizes and URLs are refused up front (exit 2, one line), the schedule holds exactly
rate x duration requests, and sweeps say why they stopped."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest
from test_loadtest import loadtest, step, testserver  # noqa: F401 - testserver is a fixture

from processes import free_port

QUICK = ("--duration", "1", "--warmup", "0.2", "--cooldown", "0")


def _one_line_error(done, *words: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchgate loadtest: error: "), done.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.serial
def test_a_shape_is_labelled_and_offered_as_its_schedule(tmp_path, testserver):  # noqa: F811
    srv = testserver()
    done, doc = loadtest(tmp_path, srv.grpc, "--model", "echo", "--shape", "ramp:10:50", *QUICK)
    assert done.returncode == 0, done.stdout + done.stderr
    s = step(doc)
    assert s["label"] == "ramp 10→50/s" and s["target_rate"] == 30  # the mean of the ramp, not --rate's 100
    assert "ramp 10→50/s" in done.stdout and "30.0 req/s" in done.stdout and "100.0 req/s" not in done.stdout
    assert s["stability"]["scheduled"] == 30


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--shape", "ramp:10:50", "--sweep-rate", "10:50:10"], ["shape cannot be combined with sweep-rate"]),
        (["--shape", "ramp:-10:50"], ["shape 'ramp:-10:50'", ">= 0"]),
        (["--shape", "spike:10:50@100+5"], ["shape", "spike", "within the duration"]),
        (["--late-ms", "-5"], ["late-ms must not be negative"]),
        (["--stability-pct", "-5"], ["stability-pct must not be negative"]),
        (["--max-lag-p99-ms", "0"], ["max-lag-p99-ms must be at least"]),
        (["--workers", "100000"], ["workers must be at most", "per usable CPU"]),
        (["--concurrency", "10000000"], ["concurrency must be at most 100,000"]),
        (["--payloads", "100000000"], ["payloads must be at most 100,000"]),
        (["--sweep-rate", "100:200", "--search", "binary", "--precision", "1e-300"], ["at most 40", "precision"]),
        (["--metrics-url", "notaurl"], ["metrics-url must be an http:// or https:// URL", "'notaurl'"]),
        (["--metrics-url", "http:///metrics"], ["metrics-url must be"]),
        (["--metrics-url", "ftp://bob:s3cret@host/m"], ["metrics-url must be", "'ftp://bob:***@host/m'"]),
        (["--metrics-url", "http://[::1/m"], ["metrics-url must be", "'http://[::1/m'"]),  # was a traceback
        # settings another one made meaningless: each was ignored without a word (one step at
        # --rate for a "binary search", an open-loop sweep for a closed loop)
        (["--search", "binary"], ["search binary", "sweep-rate"]),
        (["--sweep-rate", "10,20", "--precision", "5"], ["precision", "search binary"]),
        (["--sweep-rate", "10,20", "--concurrency", "4"], ["sweep-rate", "concurrency"]),
        (["--sweep-rate", "10,20", "--sweep-concurrency", "1,2"], ["sweep-rate", "sweep-concurrency"]),
    ],
)
def test_bad_settings_are_refused_with_one_line_and_exit_2(tmp_path, extra, words):
    # refused before any connection: the target need not answer
    done, _ = loadtest(tmp_path, f"127.0.0.1:{free_port()}", "--model", "echo", *QUICK, *extra, timeout=60)
    _one_line_error(done, *words)
    assert "s3cret" not in done.stderr  # a password in a URL is never quoted


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--batch-size", "1000000000"], ["batch-size 1,000,000,000", "GiB", "a smaller batch-size"]),
        (["--payloads", "100000", "--batch-size", "1000"], ["payloads 100,000", "fewer payloads"]),
    ],
)
def test_requests_too_large_for_memory_are_refused_before_they_are_made(tmp_path, testserver, extra, words):  # noqa: F811
    srv = testserver()
    done, _ = loadtest(tmp_path, srv.grpc, "--model", "echo", *QUICK, *extra, timeout=60)
    _one_line_error(done, *words)


@pytest.mark.serial
def test_a_metrics_url_that_does_not_answer_prometheus_text_is_one_warning(tmp_path, testserver):  # noqa: F811
    srv = testserver()
    for url, why in ((f"http://127.0.0.1:{free_port()}/metrics", "no answer"), (f"http://{srv.http}/v2", "")):
        out = tmp_path / (why.replace(" ", "_") or "v2")
        done, doc = loadtest(out, srv.grpc, "--model", "echo", "--metrics-url", url, *QUICK)
        assert done.returncode == 0, done.stdout + done.stderr
        warnings = [line for line in done.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1 and url in warnings[0] and "without the server view" in warnings[0], done.stderr
        assert why in warnings[0] and "Traceback" not in done.stderr
        assert step(doc)["server"] == {}


@pytest.mark.serial
def test_a_password_in_the_metrics_url_is_sent_as_basic_auth_and_shown_nowhere(tmp_path, testserver):  # noqa: F811
    """Review finding: urllib took ``user:password@`` in --metrics-url for part of the host name
    (so such a URL could never be scraped), and the warning and the report's scenario quoted the
    URL whole, password included. It now travels as HTTP basic authentication only."""
    srv = testserver()
    seen: list[str | None] = []
    expected = "Basic " + base64.b64encode(b"bob:s3cr@t").decode()

    class Guarded(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = b"# TYPE up gauge\nup 1\n"
            self.send_response(200 if seen[-1] == expected else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    guard = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Guarded)
    threading.Thread(target=guard.serve_forever, daemon=True).start()
    try:
        where = f"127.0.0.1:{guard.server_address[1]}/metrics"
        scrape = ("--metrics-url", f"http://bob:s3cr%40t@{where}")
        done, _ = loadtest(tmp_path / "good", srv.grpc, "--model", "echo", *scrape, *QUICK)
        assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
        assert seen and set(seen) == {expected}  # every scrape authenticated, the %40 decoded
        scrape = ("--metrics-url", f"http://bob:s3cret-not@{where}")
        done2, _ = loadtest(tmp_path / "bad", srv.grpc, "--model", "echo", *scrape, *QUICK)
        warnings = [line for line in done2.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1, done2.stderr
        assert f"http://bob:***@{where}" in warnings[0] and "HTTP 401" in warnings[0], warnings
    finally:
        guard.shutdown()
        guard.server_close()
    reports = [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".csv", ".txt")]
    written = "".join(p.read_text(errors="replace") for p in reports)
    assert "bob:***@" in written  # the reports name the URL, without its password
    assert "s3cr" not in done.stdout + done.stderr + done2.stdout + done2.stderr + written


@pytest.mark.serial
@pytest.mark.parametrize("workers", ["1", "3"])
def test_without_warm_up_a_constant_rate_sends_exactly_rate_times_duration(tmp_path, testserver, workers):  # noqa: F811
    srv = testserver()
    done, doc = loadtest(
        tmp_path, srv.grpc, "--model", "echo", "--rate", "10", "--duration", "1", "--warmup", "0", "--workers", workers
    )
    assert done.returncode == 0, done.stdout + done.stderr
    s = step(doc)
    assert s["stability"]["scheduled"] == 10 and s["sent"] == 10 and s["ok"] == 10, s["stability"]


@pytest.mark.serial
def test_a_step_search_that_every_rate_passes_says_the_limit_was_not_found(tmp_path, testserver):  # noqa: F811
    srv = testserver()
    done, doc = loadtest(tmp_path, srv.grpc, "--model", "echo", "--sweep-rate", "10,20", "--slo-p99-ms", "500", *QUICK)
    assert done.returncode == 0, done.stdout + done.stderr
    assert doc["sweep"]["best"] == "constant 20/s"
    assert "every rate passed, up to 20/s, so the limit was not found" in done.stderr
    assert "the sustainable throughput is at least 20/s" in done.stderr


def test_a_step_search_stopped_by_an_invalid_step_says_it_was_invalid(tmp_path, testserver):  # noqa: F811
    # The lag bound of 1 µs fails every step: the step is INVALID, whatever the server did.
    srv = testserver()
    done, doc = loadtest(
        tmp_path,
        srv.grpc,
        "--model",
        "echo",
        "--sweep-rate",
        "10,20",
        "--slo-p99-ms",
        "500",
        "--max-lag-p99-ms",
        "0.001",
        *QUICK,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert not step(doc)["valid"] and len(doc["steps"]) == 1
    assert "the sweep stops at step 1 of 2: it was INVALID (the generator fell behind)" in done.stderr
    assert "missed the SLO" not in done.stderr
