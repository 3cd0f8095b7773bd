"""Pieces of the load-test harness that stand alone: schedules, shapes, request encoding."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from batchgate.loadtest import payload
from batchgate.loadtest.cli import add_parser, exit_status, scenario_from
from batchgate.loadtest.results import Run, Step, above
from batchgate.loadtest.scenario import LoadTestError, Scenario, segments
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
    ],
)
def test_bad_scenarios_are_refused(field, value, words):
    with pytest.raises(LoadTestError, match=words):
        Scenario("h:1", "m", **{field: value}).check()


def _args(*argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    add_parser(sub)
    return ap.parse_args(["loadtest", *argv])


def test_a_scenario_file_is_read_and_flags_win(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("target: h:8001\nmodel: m\nrate: 50\nshape: ramp:50:500\nslo_p99_ms: 20\n")
    sc = scenario_from(_args("--scenario", str(f), "--rate", "70"))
    assert (sc.target, sc.model, sc.rate, sc.shape, sc.slo_p99_ms) == ("h:8001", "m", 70, "ramp:50:500", 20)
    assert scenario_from(_args("h:1", "--model", "m", "--concurrency", "4")).mode == "closed"
    f.write_text("target: h:1\nmodel: m\nspeed: 3\n")
    with pytest.raises(LoadTestError, match="unknown key"):
        scenario_from(_args("--scenario", str(f)))


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


@pytest.mark.parametrize("arrival", ["constant", "poisson"])
def test_the_schedule_follows_the_shape_including_stretches_at_rate_zero(arrival):
    from batchgate.loadtest.worker import Plan, Worker

    def schedule(shape: str, duration: float) -> list[float]:
        sc = Scenario("h:1", "m", shape=shape, duration_s=duration)
        plan = Plan(
            step=1,
            mode="open",
            start_ns=0,
            warmup_s=0,
            duration_s=duration,
            window_s=1,
            deadline_s=1,
            segments=segments(sc),
            arrival=arrival,
            seed=3,
        )
        rng = __import__("random").Random(plan.seed)
        t, out, end = 0, [], int(duration * 1e9)
        need = 0.0 if arrival == "constant" else rng.expovariate(1.0)
        while True:
            t = Worker._advance(plan, t, max(need, 1e-9), end)
            if t >= end:
                return out
            out.append(t / 1e9)
            need = 1.0 if arrival == "constant" else rng.expovariate(1.0)

    step = schedule("step:0@0,100@1", 2)
    assert not [t for t in step if t < 1] and abs(len(step) - 100) <= (2 if arrival == "constant" else 30)
    ramp = schedule("ramp:0:200", 2)  # 200 requests in all, three quarters in the second half
    assert abs(len(ramp) - 200) <= (2 if arrival == "constant" else 45)
    assert sum(t >= 1 for t in ramp) > 2 * sum(t < 1 for t in ramp)
    spike = schedule("spike:0:200@1+1", 3)
    assert all(1 <= t < 2 for t in spike) and abs(len(spike) - 200) <= (2 if arrival == "constant" else 45)
