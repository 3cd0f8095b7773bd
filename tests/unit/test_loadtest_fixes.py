"""Load-test fixes that stand alone: scenario checks and bounds, shape labels, the exact
schedule, binary-search labels, the metrics probe, the plots' labels and notes, and the help."""

from __future__ import annotations

import argparse
import http.server
import threading

import pytest

from batchgate.loadtest import payload
from batchgate.loadtest.cli import add_parser
from batchgate.loadtest.report.plots import sweep_figure, timeline_figure
from batchgate.loadtest.results import Run, Step, Window
from batchgate.loadtest.runner import Runner
from batchgate.loadtest.scenario import (
    MAX_PAYLOAD_BYTES,
    LoadTestError,
    Scenario,
    max_workers,
    mean_rate,
    rate_label,
    rate_sweep,
    segments,
)
from batchgate.loadtest.server_view import ScrapeError, fetch
from batchgate.loadtest.worker import Schedule


@pytest.mark.parametrize(
    "given, words",
    [
        ({"shape": "ramp:10:50", "sweep_rate": "10:50:10"}, "shape cannot be combined with sweep-rate"),
        ({"shape": "ramp:10:50", "sweep_concurrency": "1,2"}, "shape cannot be combined with sweep-concurrency"),
        ({"shape": "ramp:-10:50"}, "every rate must be a finite number >= 0"),
        ({"shape": "step:10@0,nan@1"}, "every rate must be"),
        ({"shape": "ramp:0:0"}, "every rate is 0"),
        ({"shape": "spike:10:50@100+5", "duration_s": 1}, "the spike .* must lie within the duration"),
        ({"shape": "spike:10:50@0.5+0", "duration_s": 1}, "must lie within the duration"),
        ({"shape": "step:10@0,50@20", "duration_s": 10}, r"lie in \[0, duration 10 s\)"),
        ({"late_ms": -5}, "late-ms must not be negative"),
        ({"seed": -1}, "seed must not be negative, not -1"),
        ({"stability_pct": -5}, "stability-pct must not be negative"),
        ({"stability_pct": float("nan")}, "stability-pct must be a finite number"),
        ({"max_lag_p99_ms": 0}, "max-lag-p99-ms must be at least 0.001"),
        ({"workers": 100_000}, "workers must be at most"),
        ({"concurrency": 10_000_000}, "concurrency must be at most 100,000"),
        ({"payloads": 100_000_000}, "payloads must be at most 100,000"),
        ({"connections": 10**6}, "connections must be at most 10,000"),
        ({"sweep_concurrency": "1,1000000"}, "a level must be at most 100,000"),
        ({"duration_s": 3600, "window_s": 0.001}, "windows a step"),
        ({"metrics_url": "notaurl"}, "metrics-url must be an http:// or https:// URL with a host"),
        ({"metrics_url": "ftp://h/metrics"}, "metrics-url must be"),
        ({"sweep_rate": "100:200", "search": "binary", "precision": 1e-300}, "at most 40"),
    ],
)
def test_bad_values_are_refused_naming_the_key(given, words):
    with pytest.raises(LoadTestError, match=words):
        Scenario("h:1", "m", **given).check()


def test_the_workers_bound_follows_the_cpus_and_stops_at_256():
    assert 4 <= max_workers() <= 256
    Scenario("h:1", "m", workers=max_workers()).check()
    with pytest.raises(LoadTestError, match=f"at most {max_workers()} "):
        Scenario("h:1", "m", workers=max_workers() + 1).check()


def test_good_shapes_and_urls_pass():
    for shape in ("ramp:0:50", "step:10@0,0@2,5@4", "spike:1:9@2+8", "constant"):
        Scenario("h:1", "m", shape=shape, duration_s=10).check()
    Scenario("h:1", "m", metrics_url="https://h:9/metrics", max_lag_p99_ms=0.001, late_ms=0).check()


def test_a_shape_is_named_and_offered_by_its_schedule():
    def sc(shape, **kw):
        return Scenario("h:1", "m", shape=shape, duration_s=10, **kw)

    assert rate_label(sc("ramp:10:50")) == "ramp 10→50/s"
    assert rate_label(sc("step:100@0,500@4,50@8")) == "step 100→500→50/s"
    assert rate_label(sc("spike:200:2000@3+2", arrival="poisson")) == "poisson spike 200→2000/s at 3+2 s"
    assert rate_label(sc("")) == "constant 100/s" and rate_label(sc(""), 250.5) == "constant 250.5/s"
    assert mean_rate(segments(sc("ramp:10:50")), 10) == 30
    assert mean_rate(segments(sc("step:100@2,300@6")), 10) == (6 * 100 + 4 * 300) / 10  # 100 before the first time
    assert mean_rate(segments(sc("spike:200:2000@3+2")), 10) == (8 * 200 + 2 * 2000) / 10


def _arrivals(rate: float, duration: float, warmup: float, workers: int, shape: str = "") -> int:
    """Requests the workers schedule inside the measurement, as worker.Worker._open counts them."""
    sc = Scenario("h:1", "m", rate=rate, duration_s=duration, warmup_s=warmup, shape=shape)
    segs = [(t0, t1, r0 / workers, r1 / workers) for t0, t1, r0, r1 in segments(sc)]
    end, count = round(duration * 1e9), 0
    for i in range(workers):
        schedule, k = Schedule(segs, -warmup, duration), 0
        while (at := schedule.time_of(k + i / workers)) is not None and round(at * 1e9) < end:
            count += round(at * 1e9) >= 0
            k += 1
    return count


@pytest.mark.parametrize("warmup", [0, 0.25, 0.3, 2])
@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_a_constant_rate_schedules_exactly_rate_times_duration(warmup, workers):
    for rate, duration in ((10, 1), (3, 1), (400, 3), (33, 0.7 * 10), (1234, 1.5), (2.5, 2)):
        assert _arrivals(rate, duration, warmup, workers) == round(rate * duration), (rate, duration)
    assert _arrivals(100, 4, warmup, workers, "ramp:100:400") == 1000  # a shape too: its integral


def test_a_binary_search_caps_its_steps_and_its_labels_stay_unique():
    assert rate_sweep(Scenario("h:1", "m", sweep_rate="100:200", search="binary", precision=1e-9)).most_steps == 39
    sc = Scenario("h:1", "m", sweep_rate="100:200", search="binary", precision=1e-9, slo_p99_ms=10)
    runner = Runner(sc, say=lambda _: None)
    knee = 165.6251234567

    def fake_step(label, mode, rate=None, concurrency=None):  # passes below the knee
        return Step(label, mode, target_rate=rate, valid=True, slo_met=rate < knee)

    runner.run_step = fake_step  # type: ignore[method-assign]
    run = Run({}, {})
    runner._sweep_rate(run)
    labels = [s.label for s in run.steps]
    assert len(labels) == len(set(labels)) <= 39
    best = next(s for s in run.steps if s.label == run.sweep["best"])
    assert knee - 1e-8 < best.target_rate < knee


class _Page(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 - the name http.server calls
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "body, words",
    [(b'{"name": "batchgate", "version": "1"}', "not Prometheus text"), (b"", "no Prometheus samples")],
)
def test_a_metrics_page_that_is_not_prometheus_text_is_a_scrape_error(body, words):
    handler = type("Page", (_Page,), {"body": body})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ScrapeError, match=words):
            fetch(f"http://127.0.0.1:{server.server_port}/v2")
        handler.body = b"# TYPE up gauge\nup 1\n"
        assert fetch(f"http://127.0.0.1:{server.server_port}/metrics") == {"up": [({}, 1.0)]}
    finally:
        server.shutdown()
        server.server_close()


def test_payload_sizes_are_checked_before_any_is_made():
    inputs = [("x", "FP32", [-1, 256]), ("s", "BYTES", [-1])]
    assert payload.request_bytes(inputs, 2, 8, as_json=False) == 2 * 256 * 4 + 2 * 8
    assert payload.request_bytes(inputs, 2, 8, as_json=True) == 2 * 256 * 24 + 2 * 8
    payload.check_size(inputs, 1024, 8, 16, False, MAX_PAYLOAD_BYTES)
    with pytest.raises(payload.PayloadError, match="a smaller batch-size"):
        payload.check_size(inputs, 10**9, 8, 1, False, MAX_PAYLOAD_BYTES)
    with pytest.raises(payload.PayloadError, match="fewer payloads"):
        payload.check_size(inputs, 1024, 8, 2000, False, MAX_PAYLOAD_BYTES)


def _steps(n: int, label: str, *, closed: bool) -> list[Step]:
    steps = []
    for i in range(n):
        w = Window(0, 0.0, 0.4, "measure", None if closed else 100.0 * (i + 1), sent=40, ok=40)
        for v in range(1000, 1000 + 400 * (i + 1), 10):
            w.corrected.record_value(v)
            w.uncorrected.record_value(v)
        level = 2**i
        steps.append(
            Step(
                label.format(level),
                "closed" if closed else "open",
                target_rate=None if closed else 100.0 * (i + 1),
                concurrency=level if closed else None,
                windows=[w],
                stable=False,
                slo_met=True,
            )
        )
    return steps


def test_timeline_step_labels_do_not_overlap():
    steps = _steps(6, "concurrency {} (closed loop)", closed=True)
    fig = timeline_figure(Run({}, {}, steps, {"kind": "concurrency", "best": steps[-1].label}))
    fig.canvas.draw()
    texts = [t for t in fig.axes[0].texts if "closed loop" in t.get_text()]
    assert len(texts) == 6
    boxes = [t.get_window_extent() for t in texts]
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), [(b.x0, b.x1) for b in boxes]


@pytest.mark.parametrize("closed", [False, True])
def test_the_best_note_stays_off_the_legend_when_the_best_step_is_the_last(closed):
    steps = _steps(5, "concurrency {} (closed loop)" if closed else "constant {}/s", closed=closed)
    kind = "concurrency" if closed else "rate"
    fig = sweep_figure(Run({}, {}, steps, {"kind": kind, "best": steps[-1].label, "slo": {"p99_ms": 50}}))
    fig.canvas.draw()
    lat = fig.axes[0]
    (note,) = [t for t in lat.texts if t.get_text().startswith("best: ")]
    box = note.get_bbox_patch().get_window_extent()
    legend = lat.get_legend().get_window_extent()
    assert not box.overlaps(legend)
    assert box.x1 <= lat.get_window_extent().x1  # inside the plot, on the point's left


def _loadtest_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    add_parser(sub)
    return sub.choices["loadtest"]


def test_every_flag_has_help_that_gives_its_default():
    flags = [a for a in _loadtest_parser()._actions if a.option_strings and a.dest != "help"]
    missing = [a.option_strings[0] for a in flags if not a.help]
    assert not missing, missing
    no_default = [a.option_strings[0] for a in flags if a.dest != "scenario" and "default" not in a.help]
    assert no_default == ["--model"], no_default  # (required: it has none)


def test_file_and_folder_flags_are_named_for_path_completion():
    metavars = {a.dest: a.metavar for a in _loadtest_parser()._actions}
    assert (metavars["scenario"], metavars["data"], metavars["out"]) == ("FILE", "FILE", "DIR")


def test_bash_completion_completes_paths_for_the_file_and_folder_flags():
    import subprocess
    import sys

    pytest.importorskip("shtab")
    script = subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "completion", "bash"], capture_output=True, text=True, timeout=60
    ).stdout
    for name, kind in (("scenario", "files"), ("data", "files"), ("out", "dirs")):
        assert f"_shtab_batchgate_loadtest___{name}_COMPGEN=_shtab_compgen_{kind}" in script, name


class _Silent:
    """A target that takes connections and never answers: gRPC (the HTTP/2 handshake done, the
    call never answered) or a bare socket for HTTP."""

    def __init__(self, protocol: str):
        import socket

        import grpc

        self.release = threading.Event()
        self.grpc = self.sock = None
        if protocol == "grpc":

            def hang(request, context):
                self.release.wait(60)

            handler = grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ModelMetadata": grpc.unary_unary_rpc_method_handler(hang)},
            )
            from concurrent.futures import ThreadPoolExecutor

            self.grpc = grpc.server(ThreadPoolExecutor(2), handlers=(handler,))
            self.port = self.grpc.add_insecure_port("127.0.0.1:0")
            self.grpc.start()
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(8)  # the kernel completes connections; nothing reads them
            self.port = self.sock.getsockname()[1]

    def close(self):
        self.release.set()
        if self.grpc is not None:
            self.grpc.stop(0)
        if self.sock is not None:
            self.sock.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_target_that_never_answers_the_metadata_read_is_an_error_not_a_hang(protocol, monkeypatch):
    """gRPC had no deadline on the metadata read: the run hung at its start for good (HTTP: 60 s).
    (The bound is shortened here, as the runner reads it: without one, this test hangs.)"""
    monkeypatch.setattr(payload, "METADATA_TIMEOUT_S", 0.5, raising=False)
    silent = _Silent(protocol)
    try:
        with pytest.raises(payload.PayloadError, match=f"over {protocol} \\(waited at most 0.5 s\\)"):
            payload.model_inputs(f"127.0.0.1:{silent.port}", protocol, "m")
    finally:
        silent.close()
