"""loadtest.report: the table, live line, JSON/CSV/hlog/hgrm files and plots, on synthetic runs."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
from hdrh.log import HistogramLogReader

from batchgate.loadtest import report
from batchgate.loadtest.results import (
    Run,
    Step,
    Window,
    above,
    decode,
    histogram,
    percentiles_ms,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def window(
    index,
    start,
    end,
    *,
    phase="measure",
    target=100.0,
    corrected=(),
    shift_us=500,
    lag_us=50,
    errors=None,
    server=None,
    sent=None,
    late=0,
    cpu_s=0.5,
):
    """A window whose histograms hold ``corrected`` (µs); uncorrected is ``shift_us`` lower."""
    w = Window(index=index, start_s=start, end_s=end, phase=phase, target_rate=target)
    for v in corrected:
        w.corrected.record_value(v)
        w.uncorrected.record_value(max(1, v - shift_us))
        w.lag.record_value(lag_us)
    w.ok = len(corrected)
    w.errors = dict(errors or {})
    w.sent = sent if sent is not None else w.ok + sum(w.errors.values())
    w.late = late
    w.cpu_s = cpu_s
    w.server = dict(server or {})
    return w


# 1,000 samples per window: 980 at 1.0 ms, 15 at 1.5 ms, 5 at 2.0 ms (all exact in the histogram)
GOOD = [1000] * 980 + [1500] * 15 + [2000] * 5


def good_step() -> Step:
    windows = [window(0, -5.0, 0.0, phase="warmup", corrected=[50_000] * 100)]  # must not count
    windows += [
        window(
            i + 1,
            5.0 * i,
            5.0 * (i + 1),
            corrected=GOOD,
            server={"queue_depth": 2 + i, "inflight": 10, "batch_size_mean": 4.2},
        )
        for i in range(3)
    ]
    return Step(
        "r100",
        "open",
        target_rate=100.0,
        windows=windows,
        valid=True,
        stable=True,
        stability={"throughput_spread": 0.01},
        slo_met=True,
        server={"batch_size_mean": 4.2},
    )


def invalid_step() -> Step:
    windows = [
        window(
            i,
            5.0 * i,
            5.0 * (i + 1),
            target=200.0,
            corrected=[80_000] * 700 + [120_000] * 50,
            errors={"UNAVAILABLE": 5, "503": 2} if i == 0 else {},
            sent=760,
            late=40,
        )
        for i in range(2)
    ]
    return Step(
        "r200",
        "open",
        target_rate=200.0,
        windows=windows,
        valid=False,
        problems=["achieved 152.0 req/s < 99% of target 200"],
        stable=False,
        slo_met=False,
        slo_problems=["p99 120 ms > 50 ms"],
    )


def dead_step() -> Step:
    """Nothing succeeded: no latency samples at all."""
    windows = [window(i, 5.0 * i, 5.0 * (i + 1), target=400.0, errors={"DEADLINE_EXCEEDED": 2000}) for i in range(2)]
    return Step(
        "r400",
        "open",
        target_rate=400.0,
        windows=windows,
        valid=True,
        stable=None,
        slo_met=False,
        slo_problems=["error rate 100% > 0.1%"],
    )


def sweep_run() -> Run:
    return Run(
        scenario={"name": "demo sweep", "transport": "grpc", "model": "resnet"},
        environment={"git_sha": "abc123", "host": "test"},
        steps=[good_step(), invalid_step(), dead_step()],
        sweep={"kind": "rate", "best": "r100", "slo": {"p99_ms": 50, "error_budget": 0.001}, "method": "step"},
    )


def closed_run() -> Run:
    steps = []
    for c in (4, 8):
        ws = [
            window(
                i,
                2.0 * i,
                2.0 * (i + 1),
                target=None,
                corrected=[c * 300] * 200,
                server={"queue_depth": c / 2, "inflight": c},
            )
            for i in range(2)
        ]
        steps.append(Step(f"c{c}", "closed", concurrency=c, windows=ws, stable=None, slo_met=True))
    return Run(
        scenario={"name": "closed"},
        environment={},
        steps=steps,
        sweep={"kind": "concurrency", "best": "c8", "slo": {"p99_ms": 50}, "method": "step"},
    )


def empty_runs() -> list[Run]:
    lonely = Step("only", "open", target_rate=10.0, windows=[window(0, 0.0, 1.0, target=10.0)])
    no_windows = Step("nothing", "open", target_rate=5.0)
    odd_server = Step(
        "odd",
        "closed",
        concurrency=2,
        windows=[
            window(0, 0.0, 1.0, target=None, corrected=[1000], server={"queue_depth": float("nan"), "inflight": None})
        ],
    )
    return [
        Run(scenario={}, environment={}),
        Run(scenario={}, environment={}, steps=[no_windows]),
        Run(scenario={}, environment={}, steps=[lonely]),
        Run(
            scenario={"name": "mixed"},
            environment={},
            steps=[lonely, no_windows, odd_server],
            sweep={"kind": "rate", "best": None, "slo": {"p99_ms": 10}},
        ),
    ]


# --------------------------------------------------------------------------------------------


def test_table_shows_percentiles_counts_and_verdicts():
    text = report.table(sweep_run())
    assert "corrected" in text and "intended" in text  # the legend
    r100 = text[text.index("== r100") : text.index("== r200")]
    # corrected: p50 1.00, p90 1.00, p99 1.50, p99.9 2.00, max 2.00 (warm-up's 50 ms excluded)
    corrected = next(line for line in r100.splitlines() if line.strip().startswith("corrected ms")).split()
    assert corrected[2:7] == ["1.00", "1.00", "1.50", "2.00", "2.00"]
    uncorrected = next(line for line in r100.splitlines() if line.strip().startswith("uncorrected ms")).split()
    assert uncorrected[2:5] == ["0.500", "0.500", "1.00"]
    assert "1,500 of 3,000" in r100 and "30 of 3,000" in r100
    assert f"{above(3000, 99.9)} of 3,000" in r100
    assert "thin tail: p99.9" in r100
    assert "VALID | stable" in r100 and "SLO met" in r100 and "[best]" in r100
    assert "server: batch_size_mean 4.2" in r100

    r200 = text[text.index("== r200") : text.index("== r400")]
    assert "INVALID: achieved 152.0 req/s < 99% of target 200" in r200
    assert "unstable" in r200 and "SLO missed: p99 120 ms > 50 ms" in r200
    assert "UNAVAILABLE 5" in r200 and "HTTP 503 2" in r200
    assert "late sends 80" in r200

    r400 = text[text.index("== r400") :]
    assert "no latency samples" in r400 and "n/a" in r400 and "DEADLINE_EXCEEDED 4,000" in r400

    overview = text.splitlines()
    header = next(line for line in overview if line.startswith("step "))
    for col in ("sent/s", "ok/s", "p99 ms", "p99 uncorr ms", "validity", "stability", "SLO"):
        assert col in header
    row = next(line for line in overview if line.startswith("r100 "))
    assert "open loop" in row and "<- best" in row
    assert "sustainable throughput: r100" in text
    assert "run: INVALID (1 of 3 steps invalid: r200)" in text


def test_table_labels_closed_loop():
    text = report.table(closed_run())
    assert "closed loop" in text and "concurrency 8" in text
    assert "sustainable throughput: c8" in text


def test_progress_line():
    w = good_step().windows[2]
    w.errors = {"UNAVAILABLE": 3}
    line = report.progress_line(w, "r100")
    assert line.startswith("[r100 #2 5..10s]")
    assert "send 200.0/100.0 req/s" in line and "ok 200.0/s" in line  # 1,000 in 5 s
    assert "p50 1.00 p99 1.50 ms" in line and "err 3 (UNAVAILABLE 3)" in line
    assert "lag p99 0.050 ms" in line and "queue 3" in line
    warm = report.progress_line(good_step().windows[0], "r100")
    assert "warmup" in warm
    empty = report.progress_line(window(0, 0.0, 1.0, target=None), "c1")
    assert "p50 - p99 - ms" in empty and "send 0.0 req/s" in empty


def _strict_load(path):
    def bad(token):
        raise AssertionError(f"non-strict JSON constant {token}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=bad)


def test_json_round_trips_histograms(tmp_path):
    run = sweep_run()
    path = report.write_json(run, tmp_path / "r.json")
    doc = _strict_load(path)
    assert doc["verdict"] == {"valid": False, "slo_met": True, "best": "r100", "interrupted": None}
    assert doc["sweep"]["slo"]["p99_ms"] == 50 and doc["scenario"]["name"] == "demo sweep"
    assert [s["label"] for s in doc["steps"]] == ["r100", "r200", "r400"]

    for step, sd in zip(run.steps, doc["steps"]):
        for which in report.HISTS:
            merged = step.hist(which)
            back = decode(sd["histograms"][which])
            assert back.get_total_count() == merged.get_total_count()
            assert percentiles_ms(back) == percentiles_ms(merged)
        assert len(sd["windows"]) == len(step.windows)
        for w, wd in zip(step.windows, sd["windows"]):
            assert wd["phase"] == w.phase and wd["sent"] == w.sent
            for which in report.HISTS:
                assert decode(wd["histograms"][which]).get_total_count() == getattr(w, which).get_total_count()
    assert doc["steps"][0]["corrected_ms"]["p99"] == 1.5
    assert doc["steps"][2]["corrected_ms"]["p99"] is None

    again = report.read_json(path)
    assert report.table(again) == report.table(run)


def test_json_never_contains_nan(tmp_path):
    run = sweep_run()
    run.scenario["weird"] = float("nan")
    run.steps[0].windows[1].server["queue_depth"] = float("inf")
    run.steps[0].stability["p99_spread"] = float("nan")
    doc = _strict_load(report.write_json(run, tmp_path / "nan.json"))
    assert doc["scenario"]["weird"] is None
    assert doc["steps"][0]["windows"][1]["server"]["queue_depth"] is None


def test_csv_one_row_per_step(tmp_path):
    path = report.write_csv(sweep_run(), tmp_path / "r.csv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert tuple(reader.fieldnames) == report.CSV_COLUMNS
    assert [r["label"] for r in rows] == ["r100", "r200", "r400"]
    for col in (
        "target_rate",
        "concurrency",
        "seconds",
        "sent",
        "ok",
        "errors",
        "error_rate",
        "sent_rate",
        "throughput",
        "corrected_p50_ms",
        "corrected_p90_ms",
        "corrected_p99_ms",
        "corrected_p999_ms",
        "corrected_max_ms",
        "corrected_mean_ms",
        "uncorrected_p50_ms",
        "uncorrected_p99_ms",
        "uncorrected_max_ms",
        "lag_p99_ms",
        "generator_cores",
        "valid",
        "stable",
        "slo_met",
    ):
        assert col in rows[0]
    r100, r200, r400 = rows
    assert r100["mode"] == "open" and r100["target_rate"] == "100" and r100["concurrency"] == ""
    assert r100["seconds"] == "15" and r100["ok"] == "3000" and r100["errors"] == "0"
    assert float(r100["throughput"]) == pytest.approx(200.0)
    assert r100["corrected_p99_ms"] == "1.5" and r100["corrected_p999_ms"] == "2"
    assert r100["uncorrected_p99_ms"] == "1" and r100["lag_p99_ms"] == "0.05"
    assert r100["valid"] == "true" and r100["stable"] == "true" and r100["slo_met"] == "true"
    assert r200["errors"] == "7" and r200["valid"] == "false" and r200["stable"] == "false"
    assert r200["errors_by_code"] == "503:2;UNAVAILABLE:5"
    assert r400["corrected_p99_ms"] == "" and r400["stable"] == "" and r400["error_rate"] == "1"


def test_intervals_read_back(tmp_path):
    run = sweep_run()
    paths = report.write_intervals(run, tmp_path / "run")
    assert len(paths) == 3 * len(run.steps)
    assert paths[0] == str(tmp_path / "run-r100.hlog")

    reader = HistogramLogReader(paths[0], histogram())
    got = []
    while (h := reader.get_next_interval_histogram()) is not None:
        got.append(
            (
                h.get_start_time_stamp() / 1000,
                h.get_end_time_stamp() / 1000,
                h.get_total_count(),
                h.get_value_at_percentile(99),
            )
        )
    reader.close()
    # the three measurement windows only (the warm-up is not logged), at their own times
    assert got == [(0.0, 5.0, 1000, 1500), (5.0, 10.0, 1000, 1500), (10.0, 15.0, 1000, 1500)]

    with open(paths[1], encoding="utf-8") as f:
        hgrm = f.read()
    assert "Percentile" in hgrm and "TotalCount     =     3000" in hgrm
    assert "#[Max     =        2.000" in hgrm  # ms, not µs
    # the standard deviation too (hdrh writes it unscaled: it read 500.250, in µs, beside ms)
    stddev = float(re.search(r"StdDeviation   = +([0-9.]+)", hgrm).group(1))
    assert stddev == pytest.approx(run.steps[0].hist("corrected").get_stddev() / 1000, abs=1e-3)
    assert paths[2].endswith("run-r100.uncorrected.hgrm")

    # the dead step still gets files: an hlog of empty intervals and an empty distribution
    reader = HistogramLogReader(paths[6], histogram())
    counts = []
    while (h := reader.get_next_interval_histogram()) is not None:
        counts.append(h.get_total_count())
    assert counts == [0, 0]


def test_interval_file_names_stay_unique(tmp_path):
    run = closed_run()
    run.steps[1].label = "c4"  # same label twice
    run.steps[0].label = "a/b c"
    paths = report.write_intervals(run, tmp_path / "x_")
    names = [p.rsplit("/", 1)[-1] for p in paths if p.endswith(".hlog")]
    assert names == ["x_a_b_c.hlog", "x_c4.hlog"]


def _png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_plots_are_written(tmp_path):
    run = sweep_run()
    _png(report.plot_timeline(run, tmp_path / "t.png"))
    _png(report.plot_sweep(run, tmp_path / "s.png"))
    _png(report.plot_spectrum(run, tmp_path / "p.png"))
    closed = closed_run()
    _png(report.plot_timeline(closed, tmp_path / "ct.png"))
    _png(report.plot_sweep(closed, tmp_path / "cs.png"))


def _many_steps(n: int, best: str) -> Run:
    steps = [
        Step(
            f"r{i}",
            "open",
            target_rate=float(i),
            windows=[window(0, 0.0, 1.0, target=float(i), corrected=[1000 + i] * 10)],
        )
        for i in range(1, n + 1)
    ]
    return Run(scenario={}, environment={}, steps=steps, sweep={"kind": "rate", "best": best})


def _texts(fig) -> str:
    return "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_the_spectrum_draws_every_step_it_can_and_names_the_ones_it_does_not():
    run = _many_steps(8, "r7")
    choice = report.spectrum_steps(run)
    assert [s.label for s in choice.shown] == [f"r{i}" for i in range(1, 9)] and not choice.left_out
    assert "not drawn" not in _texts(report.spectrum_figure(run))

    run = _many_steps(11, "r7")
    choice = report.spectrum_steps(run)
    labels = [s.label for s in choice.shown]
    assert len(labels) == 8 and {"r7", "r8", "r1", "r11"} <= set(labels)
    assert sorted(s.label for s in choice.shown + choice.left_out) == sorted(s.label for s in run.steps)
    note = _texts(report.spectrum_figure(run)).replace("\n", " ")
    assert "8 of 11 steps drawn" in note
    for s in choice.left_out:
        assert s.label in note
    legend = [t.get_text() for t in report.spectrum_figure(run).axes[0].get_legend().get_texts()]
    assert "r7 (best)" in legend and "corrected (solid)" in legend and "uncorrected (dashed)" in legend


def test_the_spectrum_names_steps_without_samples():
    choice = report.spectrum_steps(sweep_run())
    assert [s.label for s in choice.shown] == ["r100", "r200"] and [s.label for s in choice.empty] == ["r400"]
    text = _texts(report.spectrum_figure(sweep_run()))
    assert "no curve: r400" in text
    legend = [t.get_text() for t in report.spectrum_figure(sweep_run()).axes[0].get_legend().get_texts()]
    assert "r200 [INVALID, unstable]" in legend and "r100 (best)" in legend


def _drawn(line) -> list[float]:
    return [float(v) for v in line.get_ydata() if math.isfinite(v)]


def _line(ax, label: str):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_the_sweep_plot_rings_unstable_steps_and_uses_a_log_axis_for_concurrency():
    closed_x, points = report.plots._sweep_points(sweep_run())
    assert [s.label for _, s in report.plots.unstable_points(points)] == ["r200"]  # stable None is not marked
    fig = report.sweep_figure(sweep_run())
    lat, thr = fig.axes
    for ax in (lat, thr):
        ring = _line(ax, "unstable step (ringed): its last windows disagree")
        assert list(ring.get_xdata()) == [200.0]
    assert list(_line(thr, "unstable step (ringed): its last windows disagree").get_ydata()) == [150.0]
    assert not closed_x and thr.get_xscale() == "linear"

    run = closed_run()
    run.steps[0].stable = False
    fig = report.sweep_figure(run)
    lat, thr = fig.axes
    assert thr.get_xscale() == "log" and lat.get_xscale() == "log"  # shared
    assert [t.get_text() for t in thr.get_xticklabels()] == ["4", "8"]  # a tick at each level
    assert list(_line(lat, "unstable step (ringed): its last windows disagree").get_xdata()) == [4.0]
    one = Run(scenario={}, environment={}, steps=run.steps[:1], sweep={"kind": "concurrency"})
    assert report.sweep_figure(one).axes[1].get_xscale() == "linear"  # one level: nothing to spread


def test_the_server_panel_gives_batch_size_its_own_axis_and_tells_queue_from_in_flight():
    assert report.plots.server_panel_keys(sweep_run()) == (["queue_depth", "inflight"], ["batch_size_mean"])
    fig = report.timeline_figure(sweep_run())
    requests = next(ax for ax in fig.axes if ax.get_ylabel().startswith("requests (server"))
    batches = next(ax for ax in fig.axes if ax.get_ylabel() == "batch size (rows)")
    assert batches is not requests and batches.get_shared_x_axes().joined(batches, requests)
    queue, inflight = _line(requests, "queue depth (waiting)"), _line(requests, "in flight (accepted, unanswered)")
    assert (queue.get_linestyle(), queue.get_marker()) != (inflight.get_linestyle(), inflight.get_marker())
    assert queue.get_color() != inflight.get_color()
    assert _drawn(queue) == [2, 3, 4] and _drawn(inflight) == [10, 10, 10]  # the warm-up window has no gauges
    batch = _line(batches, "mean batch size (rows)")
    assert _drawn(batch) == [4.2, 4.2, 4.2]
    assert "mean batch size (rows)" not in [line.get_label() for line in requests.get_lines()]
    legend = [t.get_text() for t in requests.get_legend().get_texts()]  # one legend for both axes
    assert legend == ["queue depth (waiting)", "in flight (accepted, unanswered)", "mean batch size (rows)"]
    assert "r200 [INVALID, unstable]" in _texts(fig)  # the step's label above the timeline
    # no batch figure: no second axis
    closed = report.timeline_figure(closed_run())
    assert not any(ax.get_ylabel() == "batch size (rows)" for ax in closed.axes)


def test_write_all(tmp_path):
    paths = report.write_all(sweep_run(), tmp_path / "out")
    for kind in (
        "table",
        "json",
        "csv",
        "timeline",
        "sweep",
        "spectrum",
        "hlog:r100",
        "hgrm:r200",
        "hgrm_uncorrected:r400",
    ):
        assert kind in paths
    for kind in ("timeline", "sweep", "spectrum"):
        _png(paths[kind])
    with open(paths["table"], encoding="utf-8") as f:
        assert "sustainable throughput" in f.read()

    single = Run(scenario={}, environment={}, steps=[good_step()])
    paths = report.write_all(single, tmp_path / "one")
    assert "sweep" not in paths and "timeline" in paths and "spectrum" in paths
    # the same folder again: nothing of the sweep is left beside a one-step run's files
    paths = report.write_all(single, tmp_path / "out")
    left = {p.name for p in (tmp_path / "out").iterdir()}
    assert "sweep.png" not in left and not [n for n in left if "r400" in n], left


@pytest.mark.parametrize("index", range(4))
def test_empty_data_does_not_crash(tmp_path, index):
    run = empty_runs()[index]
    text = report.table(run)
    assert text.strip()
    for s in run.steps:
        for w in s.windows:
            assert report.progress_line(w, s.label)
    paths = report.write_all(run, tmp_path / "out")
    _png(report.plot_sweep(run, tmp_path / "sweep.png"))
    doc = _strict_load(paths["json"])
    assert len(doc["steps"]) == len(run.steps)
    with open(paths["csv"], newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(run.steps)
    for kind in ("timeline", "spectrum"):
        _png(paths[kind])


def test_no_steps_table():
    assert "no steps were run" in report.table(Run(scenario={}, environment={}))


def test_csv_cells():
    assert report.files._csv_cell(float("nan")) == "" and report.files._csv_cell(None) == ""
    assert report.files._csv_cell(0.1 + 0.2) == "0.3" and report.files._csv_cell(True) == "true"
    assert not math.isnan(float(report.files._csv_cell(-0.0000001)))


@pytest.mark.parametrize("n", [1, 2, 7, 10, 99, 100, 101, 195, 999, 1000, 1001])
def test_a_percentile_has_its_share_at_or_below_it_and_the_count_above_it_that_is_printed(n):
    """By hand: of 195 samples 1..195 ms, the p99 is the 194th (nearest rank; 193.05 rounds up).
    hdrh's own rounding gave the 193rd, with 2 samples above it where the report printed 1."""
    h = histogram()
    values = [i * 1000 for i in range(1, n + 1)]  # 1 ms apart: each in a bucket of its own
    for v in values:
        h.record_value(v)
    got = percentiles_ms(h)
    for p in (50.0, 90.0, 99.0, 99.9):
        v = got["p" + f"{p:g}".replace(".", "")]
        at_or_below = sum(x / 1000 <= v for x in values)
        assert at_or_below * 100 >= p * n, (p, v)  # p% of the samples at or below it
        assert at_or_below - 1 < p * n / 100, (p, v)  # and it is the first such value
        assert n - at_or_below == above(n, p), (p, v)  # what "samples above" prints
    assert int(got["max"]) == n  # (each value is its bucket's highest: 195 ms reads 195.071)
    if n == 195:
        assert (int(got["p50"]), int(got["p90"]), int(got["p99"])) == (98, 176, 194)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_histogram_statistics_are_hdrhs_own_figures_computed_at_once(seed):
    """``results.Histogram`` computes the mean and standard deviation, and ``values_at`` the
    percentiles, over the whole counts array; hdrh walks it bucket by bucket in Python (20 s of a
    six-step sweep's reports).
    The figures must be hdrh's, bucket for bucket: compared with hdrh's own walk on the same data,
    including values near the range's ends and a bucket boundary."""
    import random
    from fractions import Fraction

    from hdrh.histogram import HdrHistogram

    from batchgate.loadtest.results import HIGHEST_US, LOWEST_US, SIGNIFICANT, Histogram, values_at

    rng = random.Random(seed)
    fast, slow = histogram(), HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT)
    assert isinstance(fast, Histogram)
    values = [int(rng.lognormvariate(8, 2)) + 1 for _ in range(5_000)] + [1, 2047, 2048, 2049, HIGHEST_US]
    for v in values:
        fast.record_value(v)
        slow.record_value(v)
    assert fast.get_mean_value() == pytest.approx(slow.get_mean_value(), rel=1e-12)
    assert fast.get_stddev() == pytest.approx(slow.get_stddev(), rel=1e-9)
    ps = (0.001, 1.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0)
    # the nearest rank, walked through hdrh's recorded values as the reports once did
    walked = {}
    for p in ps:
        rank = max(1, math.ceil(Fraction(repr(p)) * len(values) / 100))
        walked[p] = next(
            it.value_iterated_to for it in slow.get_recorded_iterator() if it.total_count_to_this_value >= rank
        )
    assert values_at(fast, ps) == values_at(slow, ps) == walked
    # and merged, and decoded from the report's blob
    back = decode(fast.encode())
    assert isinstance(back, Histogram) and back.get_mean_value() == fast.get_mean_value()
    empty = histogram()
    assert empty.get_mean_value() == 0.0 and empty.get_stddev() == 0.0 and values_at(empty, ps) == {}
