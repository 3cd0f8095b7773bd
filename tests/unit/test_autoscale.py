"""loadtest.autoscale: the HPA arithmetic on hand-worked cases, the ramp simulation on a synthetic
pod, the queue curve read back from a results.json, the target pick, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise

import pytest

from batchgate.loadtest import report
from batchgate.loadtest.autoscale import (
    HPA,
    QueueCurve,
    load_values,
    parse_ramp,
    pick_target,
    rate_at,
    simulate,
)
from batchgate.loadtest.results import Run, Step, Window

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A pod that serves 100 req/s at most; its queue climbs steeply near that.
SYNTHETIC = [(10, 0.5, 2.0), (50, 2.0, 3.0), (70, 4.0, 5.0), (80, 6.0, 8.0), (90, 10.0, 15.0), (100, 20.0, 40.0)]


def chart(**overrides) -> HPA:
    return HPA(load_values(overrides or None))


# ------------------------------------------------------------------------- the formula


def test_formula_and_tolerance():
    hpa = chart()
    assert hpa.replicas_for(4, [12] * 4) == 6  # ceil(4 x 12/8)
    assert hpa.replicas_for(4, [8.4] * 4) == 4  # ratio 1.05: inside the tolerance
    assert hpa.replicas_for(4, [7.6] * 4) == 4  # ratio 0.95
    assert hpa.replicas_for(4, [4] * 4) == 2  # ratio 0.5
    assert hpa.replicas_for(3, [10, 20, 0]) == 4  # the average counts: 10/8 x 3 = 3.75
    # a decision within the tolerance changes nothing
    d = hpa.sync(0, 4, [8.4] * 4)
    assert (d.desired, d.reason) == (4, "within tolerance")


def test_pods_without_a_metric_are_counted_conservatively():
    hpa = chart()
    # scale-up: 2 pods at 16 (ratio 2) and 2 not ready counted as 0 -> ratio 1.0: keep 4
    assert hpa.replicas_for(4, [16, 16], missing=2) == 4
    # 2 pods at 40 and 2 not ready -> (80 + 0) / 4 / 8 = 2.5 -> ceil(2.5 x 4) = 10
    assert hpa.replicas_for(4, [40, 40], missing=2) == 10
    # scale-down: 2 pods at 2 (ratio 0.25), 2 not ready counted at the target 8 -> 0.625 x 4 -> 3
    assert hpa.replicas_for(4, [2, 2], missing=2) == 3
    # ignoring them instead uses the reporting pods alone: ceil(0.25 x 2) = 1
    assert HPA(load_values(None), unready="ignored").replicas_for(4, [2, 2], missing=2) == 1
    # nobody reports: the sync does nothing
    assert hpa.sync(0, 3, [], missing=3).desired == 3


def test_keda_external_metric_divides_the_total():
    hpa = HPA(load_values({"mode": "keda"}))
    assert hpa.metric == "external"
    assert hpa.replicas_for(4, [24, 24]) == 6  # total 48 / 8, whatever the pod count
    assert hpa.replicas_for(6, [24, 24]) == 6  # 48 / (8 x 6) = 1.0: keep


# ------------------------------------------------------------------------- policies


def test_scale_up_is_limited_by_the_policies():
    assert chart().sync(0, 1, [100]).desired == 5  # max(Percent 100: 2, Pods 4: 5)
    hpa = chart(maxReplicas=100)
    d = hpa.sync(0, 10, [100] * 10)
    assert (d.proposal, d.desired, d.reason) == (125, 20, "scale-up limited by policy")  # 100%: 20 > 10 + 4
    assert hpa.sync(5, 20, [100] * 20).desired == 20  # same period: the start was 10, so 20 is the limit
    assert hpa.sync(15, 20, [100] * 20).desired == 40  # the event at t=0 is out of the 15 s period
    assert chart().sync(0, 8, [100] * 8).desired == 10  # maxReplicas
    up_min = {"behavior": {"scaleUp": {"selectPolicy": "Min"}}, "maxReplicas": 100}
    assert HPA(load_values(up_min)).sync(0, 10, [100] * 10).desired == 14  # the smaller change
    off = {"behavior": {"scaleUp": {"selectPolicy": "Disabled"}}}
    assert HPA(load_values(off)).sync(0, 2, [100] * 2).desired == 2


def test_scale_down_waits_for_the_window_then_moves_10_percent_a_minute():
    hpa = chart(maxReplicas=30)
    assert hpa.sync(0, 20, [8] * 20).desired == 20  # at the target: a recommendation of 20 is kept
    replicas, history = 20, {}
    for t in range(15, 1000, 15):
        d = hpa.sync(t, replicas, [0.5] * replicas)  # the load has gone: the proposal is 1 or 2
        replicas = d.desired
        history[t] = replicas
    assert all(history[t] == 20 for t in range(15, 300, 15))  # the 20 from t=0 holds for 300 s
    # then Percent 10 / 60 s, rounded down as Kubernetes does: 20 -> 18 -> 16 -> 14 -> 12 -> 10 -> 9
    changes = [(t, r) for t, r in sorted(history.items()) if r != history.get(t - 15, 20)]
    assert changes[:6] == [(300, 18), (360, 16), (420, 14), (480, 12), (540, 10), (600, 9)]
    assert history[990] == 3  # then 8, 7, 6, 5, 4, 3, a minute apart


def test_stabilization_keeps_the_highest_recent_recommendation():
    hpa = chart(maxReplicas=30)
    hpa.sync(0, 10, [8] * 10)
    hpa.sync(15, 10, [16] * 10)  # proposal 20, limited to 20 by Percent 100
    for t in range(30, 315, 15):
        assert hpa.sync(t, 20, [0.1] * 20).desired == 20  # the 20 of t=15 still in the window
    assert hpa.sync(315, 20, [0.1] * 20).desired == 18


# ------------------------------------------------------------------------- the simulation


def test_ramp_parsing_and_interpolation():
    ramp = parse_ramp("0:100, 300:2000,600:2000,900:200")
    assert ramp == [(0, 100), (300, 2000), (600, 2000), (900, 200)]
    assert rate_at(ramp, 150) == pytest.approx(1050)
    assert rate_at(ramp, 750) == pytest.approx(1100)
    assert rate_at(ramp, 5000) == 200
    assert rate_at(parse_ramp("0:10,60:10,60:50"), 60) == 50  # two points at one time: a step
    with pytest.raises(ValueError):
        parse_ramp("0:100,x")
    with pytest.raises(ValueError):
        parse_ramp("10:100,5:200")


def test_queue_curve_reads_and_caps():
    c = QueueCurve.from_points(SYNTHETIC)
    assert c.capacity == 100
    assert c.queue(0) == 0 and c.queue(5) == pytest.approx(0.25)  # to zero below the first step
    assert c.queue(85) == pytest.approx(8.0)
    assert c.queue(250) == 20  # beyond capacity: the capacity's value (the backlog is simulated)
    assert c.p99_ms(85) == pytest.approx(11.5) and c.p99_ms(101) is None


def test_ready_delay_holds_traffic_on_the_old_pods():
    curve = QueueCurve.from_points(SYNTHETIC)
    sim = simulate(curve, None, "0:160,120:160", ready_delay_s=30, duration_s=60)
    rows = {r["t"]: r for r in sim.rows}
    assert rows[0]["desired"] == 3 and rows[0]["ready"] == 1  # 1 -> 3 at once, nobody ready yet
    for t in range(1, 30):
        assert rows[t]["ready"] == 1 and rows[t]["rate_per_pod"] == 160  # all on the old pod
        assert rows[t]["above_capacity"]
    assert rows[29]["queue_per_pod"] == pytest.approx(20 + 29 * 60)  # backlog at 60 req/s over capacity
    assert rows[30]["ready"] == 3 and rows[30]["rate_per_pod"] == pytest.approx(160 / 3)
    # the old pod drains its backlog at (capacity - rate) once the others take their share
    assert rows[31]["queue_max"] == pytest.approx(curve.queue(160 / 3) + 30 * 60 - (100 - 160 / 3))
    assert rows[31]["queue_per_pod"] < rows[31]["queue_max"]

    late = simulate(curve, None, "0:160,120:160", ready_delay_s=50, duration_s=60)
    assert {r["t"]: r["ready"] for r in late.rows}[49] == 1


def test_connection_recycling_moves_traffic_to_a_new_pod_gradually():
    curve = QueueCurve.from_points(SYNTHETIC)
    fixed = {"minReplicas": 3, "maxReplicas": 3}  # 2 pods running, the controller adds a third at t=0
    even = {r["t"]: r for r in simulate(curve, fixed, "0:100,200:100", initial_replicas=2).rows}
    assert even[29]["rate_max"] == pytest.approx(50) and even[30]["rate_max"] == pytest.approx(100 / 3)
    # connections closed at 60 s of age: 1/60 of them reconnect each second, a third onto the new pod
    slow = {r["t"]: r for r in simulate(curve, fixed, "0:100,200:100", initial_replicas=2, rebalance_s=60).rows}
    for t, new_share in ((30, 1 / 180), (59, 30 / 180), (89, 1 / 3), (150, 1 / 3)):
        assert slow[t]["rate_max"] == pytest.approx(100 * (1 - new_share) / 2)
    assert slow[59]["rate_per_pod"] == pytest.approx(100 / 3)  # the mean does not show the imbalance


def test_queue_limit_refuses_the_excess():
    curve = QueueCurve.from_points(SYNTHETIC)
    one = {"minReplicas": 1, "maxReplicas": 1}
    sim = simulate(curve, one, "0:150,60:150", queue_limit=100)
    assert max(r["queue_max"] for r in sim.rows) == pytest.approx(100)
    assert sim.summary["refused"] == pytest.approx(60 * 50 - 80)  # 50 req/s over capacity, 80 of room
    assert sim.summary["seconds_above_capacity"] == 60


def test_simulation_follows_a_ramp_and_comes_down_slowly():
    curve = QueueCurve.from_points(SYNTHETIC)
    ramp = "0:100,300:1000,900:1000,960:100,1800:100"
    sim = simulate(curve, {"maxReplicas": 20}, ramp, ready_delay_s=30, slo_p99_ms=20)
    rows = {r["t"]: r for r in sim.rows}
    # at 1000 req/s it settles where the queue per pod is near 8: about 12 pods (83 req/s each)
    held = [rows[t] for t in range(700, 901)]
    assert all(11 <= r["ready"] <= 14 for r in held)
    assert all(abs(r["queue_per_pod"] - 8) <= 2 for r in held)
    assert not any(r["above_capacity"] for r in held)
    plateau = rows[900]["desired"]
    # after the ramp down nothing is removed for the 300 s window, then at most 10% a minute
    assert all(rows[t]["desired"] == plateau for t in range(900, 1200))
    assert rows[1800]["desired"] < plateau
    drops = [
        (t, rows[t - 1]["desired"], rows[t]["desired"])
        for t in range(901, 1801)
        if rows[t]["desired"] < rows[t - 1]["desired"]
    ]
    assert drops and drops[0][0] >= 1200
    for (t0, _, _), (t1, _, _) in pairwise(drops):
        assert t1 - t0 >= 60
    assert all(new >= int(old * 0.9) for _, old, new in drops)
    s = sim.summary
    assert s["peak_replicas"] >= 12 and s["max_queue_per_pod"] > 8
    assert s["seconds_above_capacity"] > 0 and "seconds_slo_missed" in s
    table = sim.table()
    assert "ready/desired" in table and "peak replicas" in table.splitlines()[-1]
    json.dumps(sim.to_dict(), allow_nan=False)


def test_target_override_changes_the_replica_count():
    curve = QueueCurve.from_points(SYNTHETIC)
    base = simulate(curve, {"maxReplicas": 40}, "0:1000,600:1000", initial_replicas=10)
    tight = simulate(curve, {"maxReplicas": 40}, "0:1000,600:1000", initial_replicas=10, target=2)
    assert tight.rows[-1]["desired"] > base.rows[-1]["desired"]
    assert tight.summary["target"] == 2


# ------------------------------------------------------------------------- from a load test


def _window(i: int, rate: float, ok_per_s: float, p99_us: int, queue: float | None, phase: str = "measure"):
    w = Window(index=i, start_s=5.0 * i, end_s=5.0 * (i + 1), phase=phase, target_rate=rate)
    n = int(ok_per_s * 5)
    w.corrected.record_value(1000, n - n // 20)
    w.corrected.record_value(p99_us, n // 20)  # the top 5%: the p99
    w.uncorrected.record_value(900, n)
    w.lag.record_value(50, n)
    w.ok = w.sent = n
    if queue is not None:
        w.server = {"queue_depth": queue, "inflight": queue + 2}
    return w


def _step(rate, ok_per_s, p99_ms, queues, valid=True, slo_met=None):
    windows = [_window(-1, rate, ok_per_s, int(p99_ms * 1000), 99.0, phase="warmup")]  # not counted
    windows += [_window(i, rate, ok_per_s, int(p99_ms * 1000), q) for i, q in enumerate(queues)]
    return Step(
        f"constant {rate:g}/s",
        "open",
        target_rate=rate,
        windows=windows,
        valid=valid,
        problems=[] if valid else ["generator fell behind"],
        slo_met=slo_met,
    )


def _run() -> Run:
    steps = [
        _step(50, 50, 4, [1.0, 2.0, 3.0], slo_met=True),
        _step(100, 100, 8, [5.0, 6.0, 7.0], slo_met=True),
        _step(150, 150, 30, [20.0, 24.0, 28.0], slo_met=False),
        _step(200, 120, 900, [300.0, 600.0, 900.0], slo_met=False),  # the server fell behind
        _step(250, 250, 5, [None, None], slo_met=True),  # no --metrics-url figures
        _step(300, 100, 2000, [1000.0], valid=False, slo_met=False),
    ]
    return Run(
        scenario={"name": "one pod", "model": "mlp"},
        environment={},
        steps=steps,
        sweep={"kind": "rate", "best": "constant 100/s", "slo": {"p99_ms": 10, "error_budget": 0.001}},
    )


def test_queue_curve_from_a_results_file(tmp_path):
    path = report.write_json(_run(), tmp_path / "results.json")
    curve = QueueCurve.from_results(path)
    assert [(p.rate, p.queue) for p in curve.points] == [(50, 2.0), (100, 6.0), (150, 24.0)]
    assert curve.capacity == 150
    assert [p.p99_ms for p in curve.points] == pytest.approx([4, 8, 30], rel=0.01)
    why = dict(curve.dropped)
    assert "fell behind" in why["constant 200/s"]
    assert "--metrics-url" in why["constant 250/s"]
    assert "invalid" in why["constant 300/s"]
    assert curve.queue(125) == pytest.approx(15.0)
    assert curve.knee_warning() is None  # 24 against 6: a steep curve, not a jump
    jump = QueueCurve.from_points([(800, 0.1, 5), (1100, 0.4, 13), (1400, 421, 814, "constant 1400/s")])
    assert "past the knee" in jump.knee_warning()
    assert QueueCurve.from_results(path, capacity=120).capacity == 120
    pick = pick_target(curve, 10)
    assert pick.queue_depth == 6.0 and pick.point.label == "constant 100/s"


def test_pick_target():
    c = QueueCurve.from_points(
        [(10, 1, 2, "a", True), (20, 3, 6, "b", True), (30, 9, 12, "c", False), (40, 30, 9, "d", True)]
    )  # d: a lucky step past a miss
    assert pick_target(c, 10).queue_depth == 3 and pick_target(c, 10).point.label == "b"
    assert pick_target(c, 12).queue_depth == 30  # everything meets 12 ms
    assert pick_target(c, 1) is None
    assert pick_target(c).point.label == "b"  # the run's own verdicts


def test_values_file_defaults_and_checks(tmp_path):
    f = tmp_path / "values.yaml"
    f.write_text(
        "replicaCount: 2\nautoscaling:\n  maxReplicas: 7\n  behavior:\n    scaleDown:\n"
        "      stabilizationWindowSeconds: 60\n",
        encoding="utf-8",
    )
    v = load_values(f)
    assert (v.min_replicas, v.max_replicas, v.target, v.mode) == (1, 7, 8.0, "hpa")
    assert v.scale_down.stabilization_s == 60 and v.scale_down.select == "Min"
    assert [(p.kind, p.value, p.period_s) for p in v.scale_down.policies] == [("Percent", 10, 60)]
    assert [(p.kind, p.value) for p in v.scale_up.policies] == [("Percent", 100), ("Pods", 4)]
    with pytest.raises(ValueError):
        load_values({"behavior": {"scaleUp": {"selectPolicy": "Fastest"}}})
    with pytest.raises(ValueError):
        load_values({"minReplicas": 5, "maxReplicas": 2})
    assert load_values({"targetQueueDepth": "7500m"}).target == 7.5  # a Kubernetes quantity


# ------------------------------------------------------------------------- the command line


def test_cli_prints_and_writes(tmp_path):
    results = report.write_json(_run(), tmp_path / "lt" / "results.json")
    values = tmp_path / "values.yaml"
    values.write_text("autoscaling:\n  maxReplicas: 30\n  targetQueueDepth: 6\n", encoding="utf-8")
    out = tmp_path / "sim"
    cmd = [
        sys.executable,
        "-m",
        "batchgate.loadtest.autoscale",
        "--results",
        str(results),
        "--values",
        str(values),
        "--ramp",
        "0:100,300:2000,600:2000,900:200",
        "--ready-delay",
        "30",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "capacity 150 req/s per pod" in p.stdout
    assert "largest queue per pod within the SLO (p99 <= 10 ms) is 6" in p.stdout
    assert "ready/desired" in p.stdout and "peak replicas" in p.stdout
    doc = json.loads((out / "autoscale.json").read_text())
    assert doc["format"] == "batchgate-autoscale" and doc["autoscaling"]["targetQueueDepth"] == 6
    assert len(doc["timeline"]) == 901 and doc["summary"]["peak_replicas"] <= 30
    assert (out / "autoscale.png").read_bytes()[:8] == PNG_MAGIC

    what_if = subprocess.run(
        cmd[:-2] + ["--out", str(tmp_path / "w"), "--target", "12"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert what_if.returncode == 0, what_if.stderr
    assert json.loads((tmp_path / "w" / "autoscale.json").read_text())["summary"]["target"] == 12

    bad = subprocess.run(
        cmd[:7] + ["--ramp", "nonsense"], check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert bad.returncode == 2 and "ramp" in bad.stderr


def test_the_queue_limit_is_read_from_the_charts_limits_section(tmp_path):
    from batchgate.loadtest.autoscale.controller import queue_limit_from_values

    values = tmp_path / "values.yaml"
    values.write_text("config:\n  limits:\n    max_queue_size: 256\n")
    assert queue_limit_from_values(values) == 256
    values.write_text("config:\n  server:\n    http_port: 8000\n")
    assert queue_limit_from_values(values) is None
    # the chart's own values file carries the gateway's default
    from pathlib import Path

    assert queue_limit_from_values(Path(__file__).parents[2] / "helm/batchgate/values.yaml") == 4096
