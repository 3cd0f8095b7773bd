"""Pieces of the load-test harness that stand alone: schedules, shapes, request encoding."""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from batchgate.loadtest import payload
from batchgate.loadtest.cli import add_parser, exit_status, scenario_from
from batchgate.loadtest.results import Run, Step, Window, above
from batchgate.loadtest.scenario import LoadTestError, Scenario, concurrency_levels, rate_sweep, segments
from batchgate.loadtest.verdicts import best_closed_step, eta_text, invalid_advice
from batchgate.loadtest.worker import rate_at


def test_the_id_spliced_in_front_is_the_request_id_and_nothing_else_changes():
    msg = pb.ModelInferRequest(model_name="m", model_version="3")
    msg.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    msg.raw_input_contents.append(b"\x00" * 8)
    got = pb.ModelInferRequest.FromString(payload.with_id(msg.SerializeToString(), "w0-" + "9" * 200))
    assert got.id == "w0-" + "9" * 200 and got.model_version == "3" and got.raw_input_contents == [b"\x00" * 8]


def test_shapes_become_rate_segments():
    sc = Scenario("h:1", "m", rate=100, duration_s=10)
    assert segments(sc) == [(0.0, 10, 100, 100)]
    ramp = segments(Scenario("h:1", "m", shape="ramp:100:300", duration_s=10))
    assert rate_at(ramp, 0) == 100 and rate_at(ramp, 5) == 200 and rate_at(ramp, -1) == 100
    steps = segments(Scenario("h:1", "m", shape="step:100@0,500@4,50@8", duration_s=10))
    assert [rate_at(steps, t) for t in (1, 5, 9)] == [100, 500, 50]
    spike = segments(Scenario("h:1", "m", shape="spike:200:2000@3+2", duration_s=10))
    assert [rate_at(spike, t) for t in (1, 3.5, 6)] == [200, 2000, 200]
    with pytest.raises(LoadTestError, match="ramp:R0:R1"):
        segments(Scenario("h:1", "m", shape="wave:1"))


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("protocol", "udp", "protocol must be one of grpc, http"),
        ("rate", 0, "rate must be greater than 0"),
        ("workers", 0, "workers must be at least 1"),
        ("shape", "ramp:x", "shape 'ramp:x' must be"),
        # named as the flag (and scenario key) is, not as the field
        ("duration_s", 0, "duration must be greater than 0"),
        ("warmup_s", -1, "warmup must not be negative"),
        ("http_encoding", "xml", "http-encoding must be one of json, binary"),
        ("sweep_rate", "10:5:1", "sweep-rate for a step search is START:END:STEP"),
        ("sweep_concurrency", "1,x", "sweep-concurrency is a comma-separated list"),
        # past any generator: its schedule was always late, it never yielded, and grew without end
        ("rate", 1e30, "a rate of 1e[+]30/s is past what a load generator can send"),
        ("shape", "spike:10:1e9@0+1", "a rate of 1e[+]09/s is past"),
        ("sweep_rate", "10,2e6", "every rate must be at most 1,000,000/s"),
        # NaN passed every bound: a traceback, or a step run at "nan/s"
        ("sweep_rate", "nan:50:10", "sweep-rate: every number must be finite"),
        ("sweep_rate", "10,nan", "sweep-rate: every number must be finite"),
        ("sweep_rate", "10:inf:10", "sweep-rate: every number must be finite"),
    ],
)
def test_bad_scenarios_are_refused(field, value, words):
    with pytest.raises(LoadTestError, match=words):
        Scenario("h:1", "m", **{field: value}).check()


@pytest.mark.parametrize(
    "target",
    # (a URL as tritonclient users write one: taken, then unresolvable, "Misformatted domain name")
    ["127.0.0.1:99999999", "127.0.0.1:0", "127.0.0.1", ":80", "h:８０", "http://h:8001", "grpc://h:8001", "h/x:1"],
)
def test_a_target_s_port_is_one_a_socket_can_have(target):
    """gRPC took port 99999999 modulo 65536: another port, load-tested and reported VALID."""
    with pytest.raises(LoadTestError, match="target must be HOST:PORT with a port from 1 to 65535"):
        Scenario(target, "m").check()


def _args(*argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    add_parser(sub)
    return ap.parse_args(["loadtest", *argv])


def test_a_scenario_file_is_read_and_flags_win(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("target: h:8001\nmodel: m\nrate: 50\nconcurrency: 3\nslo_p99_ms: 20\n")
    sc = scenario_from(_args("--scenario", str(f), "--rate", "70"))
    assert (sc.target, sc.model, sc.rate, sc.mode, sc.slo_p99_ms) == ("h:8001", "m", 70, "open", 20)
    assert scenario_from(_args("h:1", "--model", "m", "--concurrency", "4")).mode == "closed"
    # the file's rate, under the flags' shape: the flag wins (the other way round, see below)
    f.write_text("target: h:8001\nmodel: m\nrate: 50\n")
    assert scenario_from(_args("--scenario", str(f), "--shape", "ramp:50:500")).shape == "ramp:50:500"
    f.write_text("target: h:1\nmodel: m\nspeed: 3\n")
    with pytest.raises(LoadTestError, match="unknown key"):
        scenario_from(_args("--scenario", str(f)))


@pytest.mark.parametrize(
    "argv, file, words",
    [
        (["--rate", "70", "--shape", "ramp:1:5"], "", "rate cannot be combined with shape: a shape sets its own rates"),
        ([], "rate: 50\nshape: ramp:50:500\n", "rate cannot be combined with shape"),
        (["--rate", "70"], "shape: ramp:50:500\n", "rate cannot be combined with shape"),
        (["--rate", "70", "--sweep-rate", "10,20"], "", "rate cannot be combined with sweep-rate"),
        (["--rate", "70", "--concurrency", "4"], "", "rate cannot be combined with concurrency: rate is an open loop"),
        (["--rate", "70", "--sweep-concurrency", "1,2"], "", "rate cannot be combined with sweep-concurrency"),
        (["--concurrency", "4", "--sweep-concurrency", "1,2"], "", "concurrency cannot be combined with sweep-conc"),
        (["--concurrency", "4", "--shape", "ramp:1:5"], "", "shape cannot be combined with concurrency"),
        (["--concurrency", "4", "--arrival", "poisson"], "", "arrival cannot be combined with concurrency"),
        (["--concurrency", "4", "--precise-timing"], "", "precise-timing cannot be combined with concurrency"),
        (["--protocol", "http", "--channels", "2"], "", "channels is a setting of gRPC only, and protocol is http"),
        ([], "protocol: http\nstreams-per-channel: 4\n", "streams-per-channel is a setting of gRPC only"),
        (["--connections", "8"], "", "connections is a setting of HTTP only, and protocol is grpc"),
        (["--http-encoding", "binary"], "", "http-encoding is a setting of HTTP only"),
        (["--data", "x.jsonl", "--batch-size", "4"], "", "batch-size cannot be combined with data"),
        (["--data", "x.jsonl", "--payloads", "4"], "", "payloads cannot be combined with data"),
        (["--cooldown", "2"], "", "cooldown is the pause between the steps of a sweep"),
    ],
)
def test_a_setting_the_run_would_not_use_is_refused(tmp_path, argv, file, words):
    """Each of these was ignored without a word (a --rate beside a --shape measured the shape)."""
    f = tmp_path / "s.yaml"
    f.write_text("target: h:8001\nmodel: m\n" + file)
    with pytest.raises(LoadTestError, match=re.escape(words)):
        scenario_from(_args("--scenario", str(f), *argv))


@pytest.mark.parametrize(
    "argv, file",
    [
        (["--protocol", "grpc"], "protocol: http\nconnections: 8\n"),  # the flag overrides the file's protocol
        (["--concurrency", "4"], "rate: 50\n"),  # the flag makes a closed loop over the file's rate
        (["--sweep-rate", "10,20", "--cooldown", "0.5"], ""),
        (["--concurrency", "4", "--arrival", "constant", "--no-precise-timing", "--cooldown", "0"], ""),
        (["--protocol", "http", "--http-encoding", "binary", "--connections", "2"], ""),
        (["--data", "x.jsonl", "--seed", "3", "--arrival", "poisson"], ""),
    ],
)
def test_settings_the_run_uses_are_taken(tmp_path, argv, file):
    f = tmp_path / "s.yaml"
    f.write_text("target: h:8001\nmodel: m\n" + file)
    scenario_from(_args("--scenario", str(f), *argv))


def test_requests_encode_for_each_transport():
    types = {"x": "FP32", "s": "BYTES"}
    req = {"x": np.arange(4, dtype=np.float32).reshape(1, 4), "s": np.array([[b"ab"]], dtype=object)}
    g = pb.ModelInferRequest.FromString(payload.encode_grpc("m", "", req, types).body)
    assert [t.name for t in g.inputs] == ["x", "s"] and g.raw_input_contents[1] == b"\x02\x00\x00\x00ab"
    j = json.loads(payload.encode_http(req, types, binary=False).body)
    assert j["inputs"][0]["data"] == [0.0, 1.0, 2.0, 3.0] and j["inputs"][1]["data"] == ["ab"]
    b = payload.encode_http(req, types, binary=True)
    n = int(b.headers["Inference-Header-Content-Length"])
    header = json.loads(b.body[:n])
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 16 and len(b.body) == n + 16 + 6
    assert b.headers[payload.SYNTHETIC_HEADER] == "1"


def test_exit_status_and_percentile_support():
    assert above(3000, 99.9) == 3 and above(100, 50) == 50
    ok, bad = Step("a", "open"), Step("b", "open", valid=False)
    assert exit_status(Run({}, {}, [ok])) == 0 and exit_status(Run({}, {}, [ok, bad])) == 3
    ok.slo_met = False
    assert exit_status(Run({}, {}, [ok])) == 1
    # With no SLO, a step whose requests all failed is not a pass either.
    failing = Step("c", "open", windows=[Window(0, 0.0, 1.0, "measure", 10.0, sent=10, errors={"UNAVAILABLE": 10})])
    assert exit_status(Run({}, {}, [failing])) == 1
    failing.windows[0].ok = 1
    assert exit_status(Run({}, {}, [failing])) == 0


@pytest.mark.parametrize("arrival", ["constant", "poisson"])
def test_the_schedule_follows_the_shape_including_stretches_at_rate_zero(arrival):
    from batchgate.loadtest.worker import Schedule

    def schedule(shape: str, duration: float) -> list[float]:
        """The send times a worker's open loop uses: arrival k where the integral reaches k."""
        sc = Scenario("h:1", "m", shape=shape, duration_s=duration)
        sched, rng = Schedule(segments(sc), 0.0, duration), __import__("random").Random(3)
        out, k, target = [], 0, 0.0 if arrival == "constant" else rng.expovariate(1.0)
        while (at := sched.time_of(target)) is not None and at < duration:
            out.append(at)
            k += 1
            target = k if arrival == "constant" else target + rng.expovariate(1.0)
        return out

    step = schedule("step:0@0,100@1", 2)
    assert not [t for t in step if t < 1] and abs(len(step) - 100) <= (2 if arrival == "constant" else 30)
    ramp = schedule("ramp:0:200", 2)  # 200 requests in all, three quarters in the second half
    assert abs(len(ramp) - 200) <= (2 if arrival == "constant" else 45)
    assert sum(t >= 1 for t in ramp) > 2 * sum(t < 1 for t in ramp)
    spike = schedule("spike:0:200@1+1", 3)
    assert all(1 <= t < 2 for t in spike) and abs(len(spike) - 200) <= (2 if arrival == "constant" else 45)


@pytest.mark.parametrize("warmup", [0.0, 1.0])
def test_the_first_arrival_of_a_ramp_up_from_zero_is_at_its_start(warmup):
    # (worker 0's constant schedule starts at target 0: it divided 0 by 0 and the worker died)
    from batchgate.loadtest.worker import Schedule

    sched = Schedule(segments(Scenario("h:1", "m", shape="ramp:0:200", duration_s=2)), -warmup, 2.0)
    assert sched.time_of(0.0) == 0.0 and 0 < sched.time_of(1.0) < 1


def test_a_window_longer_than_the_step_is_the_step():
    sc = Scenario("h:1", "m", duration_s=0.5, window_s=5)
    sc.check()
    assert sc.window_s == 0.5


def test_a_data_file_is_bounded_before_it_is_read(tmp_path, monkeypatch):
    inputs = [("x", "FP32", [-1, 4])]
    bomb = tmp_path / "zeros.npz"  # 8 MiB of zeros, a few KiB on disk
    np.savez_compressed(bomb, x=np.zeros((1 << 19, 4), np.float32))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(payload.PayloadError, match="holds 8.0 MiB, more than the 1.0 MiB"):
        payload.from_file(str(bomb), inputs, 1 << 20)
    assert payload.from_file(str(bomb), inputs, 16 << 20)[0]["x"].shape == (1 << 19, 4)
    lines = tmp_path / "reqs.jsonl"
    one = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    lines.write_text((json.dumps(one) + "\n") * 100)
    with pytest.raises(payload.PayloadError, match="more than the 1,000 bytes"):
        payload.from_file(str(lines), inputs, 1000)
    assert len(payload.from_file(str(lines), inputs, 1 << 20)) == 100
    monkeypatch.setattr(payload, "MAX_DATA_LINE", 50)
    with pytest.raises(payload.PayloadError, match="reqs.jsonl:1: a request longer than 50 bytes"):
        payload.from_file(str(lines), inputs, 1 << 20)
    with pytest.raises(payload.PayloadError, match="cannot be read"):
        payload.from_file(str(tmp_path / "absent.jsonl"), inputs, 1 << 20)


def test_a_data_line_asking_for_more_than_inputs_is_refused_naming_what_would_not_be_sent(tmp_path):
    """A JSON line's outputs and parameters were dropped without a word: the test sent other
    requests than the file's (every output instead of the one asked for, no priority)."""
    inputs = [("x", "FP32", [-1, 4])]
    one = {"id": "a", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    lines = tmp_path / "reqs.jsonl"
    lines.write_text(json.dumps(one) + "\n")
    assert len(payload.from_file(str(lines), inputs, 1 << 20)) == 1
    lines.write_text(json.dumps(one) + "\n" + json.dumps({**one, "outputs": [{"name": "y"}], "parameters": {}}) + "\n")
    with pytest.raises(payload.PayloadError, match=r"reqs.jsonl:2: 'outputs', 'parameters': the load test sends"):
        payload.from_file(str(lines), inputs, 1 << 20)


def test_rate_sweeps_list_their_steps_and_bound_a_binary_search():
    def sweep(spec, search="step", precision=0.0):
        return rate_sweep(Scenario("h:1", "m", sweep_rate=spec, search=search, precision=precision))

    # a range is expanded by multiplication: no drift from adding 0.1 again and again
    assert sweep("0.1:0.7:0.1").rates == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert sweep("40:160:40").rates == [40, 80, 120, 160] and sweep("40:170:40").most_steps == 4
    assert sweep("300,100,200,100").rates == [100, 200, 300]  # explicit rates, from the lowest up
    assert sweep("500").rates == [500] and sweep("500,").rates == [500]  # one rate: a list of one
    b = sweep("20:200", "binary", 8)  # 180 -> 90 -> 45 -> 22.5 -> 11.25 -> 5.6: five halvings to within 8
    assert (b.method, b.rates, b.most_steps) == ("binary", [20, 200], 2 + 5)
    assert sweep("100:900", "binary").most_steps == 2 + 5  # default precision: 1/32 of the bracket
    assert sweep("100:101", "binary", 5).most_steps == 2
    for spec, search in (("100,200", "binary"), ("200:100", "binary"), ("1:2", "step"), ("0,10", "step")):
        with pytest.raises(LoadTestError, match="sweep-rate"):
            sweep(spec, search)
    with pytest.raises(LoadTestError, match="1,000,000 steps"):
        sweep("1:1000000:1")
    assert concurrency_levels("1,2,4") == [1, 2, 4]
    with pytest.raises(LoadTestError, match="whole numbers >= 1"):
        concurrency_levels("0,2")


def _closed(c: int, ok: int, slo_met: bool | None = True, valid: bool = True) -> Step:
    w = Window(0, 0.0, 1.0, "measure", None, sent=ok, ok=ok)
    return Step(f"c{c}", "closed", concurrency=c, windows=[w], slo_met=slo_met, valid=valid)


def test_the_closed_loop_best_step_is_the_highest_throughput_that_met_the_slo():
    # past the knee throughput falls while the SLO still holds: the best is 8, not the last pass (32)
    steps = [_closed(1, 100), _closed(8, 700), _closed(16, 650), _closed(32, 600), _closed(64, 900, slo_met=False)]
    assert best_closed_step(steps).label == "c8"
    # a tie goes to the fewer callers
    assert best_closed_step([_closed(4, 500), _closed(8, 500)]).label == "c4"
    # a sweep's steps are always judged on an SLO (the default error budget when none is given):
    # a step never judged, or one that missed, is not the best, however valid
    steps = [_closed(2, 300, None), _closed(4, 800, slo_met=False), _closed(8, 400)]
    assert best_closed_step(steps).label == "c8"
    assert best_closed_step([_closed(1, 10, slo_met=False)]) is None


def test_eta_text():
    now = 1_000_000.0
    when = time.strftime("%H:%M:%S", time.localtime(now + 95))
    assert eta_text(95.2, upper_bound=False, now=now) == f"about 1m 35s left, done by {when}"
    assert eta_text(12, upper_bound=True, now=now).startswith("at most 12 s left")
    assert eta_text(3 * 3600 + 125, upper_bound=False, now=now).startswith("about 3h 02m left")


@pytest.mark.parametrize(
    "settings, behind, lag, cores, cpus, want, not_want",
    [
        # busy workers, cores to spare: more workers (or a lower rate)
        ({}, True, 40.0, 0.97, 8, ["short of CPU", "more --workers (1 now", "a lower --rate"], ["--precise-timing"]),
        # busy because precise timing spins: drop it first
        ({"precise_timing": True}, False, 12.0, 1.0, 8, ["drop --precise-timing", "more --workers"], []),
        # every core already has a worker
        ({"workers": 4}, True, 50.0, 0.95, 4, ["more cores", "a lower --rate"], ["more --workers"]),
        # not busy, lag just over a tight bound: the timer's resolution, which --precise-timing fixes
        ({"max_lag_p99_ms": 1.0}, False, 1.6, 0.2, 8, ["--precise-timing", "--max-lag-p99-ms (now 1)"], ["workers"]),
        # not busy and yet behind over gRPC / HTTP: other load on the machine; spread the sends
        ({}, True, 30.0, 0.3, 8, ["only 0.30 of a core", "more --workers", "more --channels per worker (1 now)"], []),
        ({"protocol": "http"}, True, 30.0, 0.3, 8, ["more --connections per worker (64 now)"], ["--channels"]),
        ({"sweep_rate": "100:900:100"}, True, 30.0, 0.9, 8, ["a lower --sweep-rate"], []),
    ],
)
def test_an_invalid_step_says_what_to_change(settings, behind, lag, cores, cpus, want, not_want):
    sc = Scenario("h:1", "m", **settings)
    text = invalid_advice(sc, behind=behind, lag_p99_ms=lag, cores_per_worker=cores, cpus=cpus)
    for words in want:
        assert words in text, (words, text)
    for words in not_want:
        assert words not in text, (words, text)


@pytest.mark.parametrize(
    "given, words",
    [
        ({"duration_s": float("inf")}, "must be a finite number"),
        ({"deadline_ms": float("inf")}, "must be a finite number"),
        ({"rate": float("inf")}, "must be a finite number"),
        ({"streams_per_channel": -1}, "must not be negative"),
        ({"min_achieved": 5.0}, "above 0, at most 1"),
        ({"slo_p99_ms": -1.0}, "greater than 0"),
        ({"error_budget": -1.0}, "from 0 to 1"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_flag(given, words):
    with pytest.raises(LoadTestError, match=words):
        Scenario("h:1", "m", **given).check()


def test_stability_leaves_out_a_last_window_the_duration_cuts_short():
    """--duration 2.05 --window 0.5: the last window is 2.0-2.05 s, with a few requests; its
    throughput spread was always near 100%, so every step on any server read unstable."""
    from batchgate.loadtest.verdicts import stability_spread

    def window(i, start, end, ok):
        w = Window(i, start, end, "measure", 100.0, sent=ok, ok=ok)
        for _ in range(ok):
            w.corrected.record_value(5000)
        return w

    ws = [window(i, i * 0.5, (i + 1) * 0.5, 50) for i in range(4)] + [window(4, 2.0, 2.05, 1)]
    spread = stability_spread(ws, 0.5)
    assert spread is not None and spread["throughput"] < 1 and spread["p99"] < 1
    assert stability_spread(ws[3:], 0.5) is None  # one whole window: too few to judge
    uneven = [window(0, 0.0, 0.5, 50), window(1, 0.5, 1.0, 50), window(2, 1.0, 1.5, 10)]
    assert stability_spread(uneven, 0.5)["throughput"] == pytest.approx(80)


def test_an_npz_array_that_cannot_be_read_is_an_error_naming_the_input(tmp_path):
    objects = tmp_path / "objects.npz"  # a list of bytes as numpy keeps it: Python objects, pickled
    np.savez(objects, s=np.array([[b"ab", b"\xff\x00"]], dtype=object))
    with pytest.raises(payload.PayloadError, match=r"objects.npz: input 's' cannot be read: .*dtype=bytes"):
        payload.from_file(str(objects), [("s", "BYTES", [-1, -1])], 1 << 20)
    words = tmp_path / "words.npz"
    np.savez(words, x=np.array([["a", "b", "c", "d"]]))
    with pytest.raises(payload.PayloadError, match="words.npz: input 'x' cannot be read: could not convert"):
        payload.from_file(str(words), [("x", "FP32", [-1, 4])], 1 << 20)
    fixed = tmp_path / "fixed.npz"  # the form that works
    np.savez(fixed, s=np.array([[b"ab", b"\xff\x00"]]))
    assert payload.from_file(str(fixed), [("s", "BYTES", [-1, -1])], 1 << 20)[0]["s"].shape == (1, 2)
