"""Drift's parts that need no server: monitor and profile checking (a profile is a file an
operator hands in, and its feature names become metric labels), the dead letter, event delivery
to a real HTTP receiver, and the bounded sample queue on the request path."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from batchgate.core.drift import build_profile, build_tensor, profile_from_json
from batchgate.core.drift_monitors import parse_monitors
from batchgate.core.errors import ConfigError
from batchgate.core.types import InferResponse, Tensor, new_request
from batchgate.monitoring.drift import DriftService, Tap
from batchgate.monitoring.drift_events import DeadLetter, EventSender, make_event
from batchgate.monitoring.metrics import Metrics
from batchgate.settings_sections import DriftSettings
from drift_support import Receiver, wait_until

BASE = {"model": "m", "inputs": ["x"], "reference": "p.json"}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": "m"}, "'inputs' must list"),
        ({**BASE, "colour": 1}, "unknown field 'colour'"),
        ({**BASE, "model": "../etc"}, "is not a valid name"),
        ({**BASE, "tests": ["ks", "t-test"]}, "'tests' must list some of psi, ks, chi2, adwin"),
        ({**BASE, "correction": "holm"}, "'correction' must be one of bonferroni, bh"),
        ({**BASE, "sample_rate": 1.5}, "sample_rate: must be a number from 0 to 1"),
        ({**BASE, "window": {"samples": 5}}, "window.samples: must be a whole number from 10"),
        ({**BASE, "webhook": {"url": "file:///etc/passwd"}}, "'url' must be an http:// or https:// URL"),
        ({**BASE, "webhook": {"url": "http://a/\nb"}}, "'url' must be an http:// or https:// URL"),
        ({**BASE, "webhook": {"url": "http://a/", "format": "xml"}}, "'format' must be one of cloudevents, json"),
        ({**BASE, "reference": ""}, "'reference' must be the path of a profile file"),
    ],
)
def test_a_bad_monitor_is_refused_naming_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_monitors([raw])


def test_two_monitors_of_one_model_are_refused():
    with pytest.raises(ConfigError, match="monitored model name 'm' is used twice"):
        parse_monitors([BASE, BASE])


def _profile() -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 3))
    cats = rng.choice(4, size=(1000, 1)).astype(np.int64)
    p = build_profile(
        "m",
        {"x": build_tensor("x", x, ["a", "b", "c"]), "kind": build_tensor("kind", cats)},
        source={"file": "t.csv", "rows": 1000},
    )
    return p.to_json()


def test_a_profile_round_trips_and_its_id_depends_only_on_the_distributions():
    data = _profile()
    p = profile_from_json(json.loads(json.dumps(data)))
    assert p.id == data["id"]
    assert [f.kind for f in p.inputs["x"]] == ["numeric"] * 3
    assert p.inputs["kind"][0].kind == "categorical" and p.inputs["kind"][0].name == "kind[0]"
    assert set(p.inputs["kind"][0].categories) == {"0", "1", "2", "3"}
    data["source"] = {"file": "elsewhere.csv"}
    assert profile_from_json(data).id == p.id


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format="other"), "not a batchgate drift profile"),
        (lambda d: d["inputs"]["x"][0].update(name='a"} 1\nfake_metric{x="'), "is not allowed"),
        (lambda d: d["inputs"]["x"][0].update(name="é"), "is not allowed"),
        (lambda d: d["inputs"]["x"][0].update(kind="text"), "'kind' must be numeric or categorical"),
        (lambda d: d["inputs"]["x"][0].update(mean=float("nan")), "must be a finite number"),
        (lambda d: d["inputs"]["x"][0].update(missing_rate=3), "must be a share from 0 to 1"),
        (lambda d: d["inputs"]["x"][0]["bins"].update(edges=[2.0, 1.0] + [0.0] * 17), "must rise"),
        (lambda d: d["inputs"]["x"][0]["bins"].update(freqs=[1.0]), "one frequency more than edges"),
        (lambda d: d["inputs"]["x"][0]["cdf"].update(points=list(range(20000))), "at most 10000 numbers"),
        (lambda d: d["inputs"].update(x=[]), "must be a non-empty list of features"),
        (lambda d: d["inputs"]["x"][1].update(name="a"), "profile feature name 'a' is used twice"),
        (lambda d: d.update(inputs={}), "describes no input tensor"),
    ],
)
def test_a_bad_profile_is_refused(change, message):
    data = _profile()
    change(data)
    with pytest.raises(ConfigError, match=message):
        profile_from_json(data)


def test_the_dead_letter_is_bounded_and_coalesced_to_the_latest_state_per_model(tmp_path):
    path = str(tmp_path / "dead.jsonl")
    dl = DeadLetter(path, max_events=3)
    hook = {"url": "http://127.0.0.1:9/", "format": "cloudevents", "timeout_s": 1, "retries": 0}
    events = [make_event("io.batchgate.drift.detected", "/t", m, {"n": i}) for i, m in enumerate("aabab")]
    for e in events:
        dl.add(e, hook)
    kept = [e["event"]["id"] for e in dl.events]
    # the 4th event overflowed a,a,b: coalesced to the newest of each model (b, a), then the 5th
    assert kept == [events[2]["id"], events[3]["id"], events[4]["id"]]
    assert dl.coalesced == 2
    with open(path, "a") as f:
        f.write('{"event": {"id": "cut')  # a line a crash cut short
    again = DeadLetter(path, max_events=3)
    assert [e["event"]["id"] for e in again.events] == kept
    again.remove(again.events[0])
    assert [e["event"]["id"] for e in DeadLetter(path, max_events=3).events] == kept[1:]


def test_events_reach_a_real_receiver_in_both_formats_and_wait_while_it_is_down(tmp_path):
    receiver = Receiver()
    counts: dict[str, int] = {}
    sender = EventSender(
        DeadLetter(str(tmp_path / "dead.jsonl"), 100), 0.3, lambda o: counts.__setitem__(o, counts.get(o, 0) + 1)
    )
    try:
        structured = {"url": receiver.url, "format": "cloudevents", "timeout_s": 2, "retries": 0}
        binary = {**structured, "format": "json"}
        e1 = make_event("io.batchgate.drift.detected", "/batchgate/test", "m", {"state": "detected"})
        sender.send(e1, structured)
        assert receiver.wait_for(lambda e: e.get("id") == e1["id"])
        e2 = make_event("io.batchgate.drift.recovered", "/batchgate/test", "m", {"state": "recovered"})
        sender.send(e2, binary)
        assert receiver.wait_for(lambda e: e.get("state") == "recovered")  # the body is the data alone
        headers = receiver.headers[-1]
        assert headers["ce-id"] == e2["id"] and headers["ce-type"] == "io.batchgate.drift.recovered"
        assert headers["ce-specversion"] == "1.0" and headers["content-type"] == "application/json"

        receiver.up = False
        e3 = make_event("io.batchgate.drift.detected", "/batchgate/test", "m", {"state": "detected", "n": 3})
        e4 = make_event("io.batchgate.drift.recovered", "/batchgate/test", "m", {"state": "recovered", "n": 4})
        sender.send(e3, {**structured, "retries": 1})
        sender.send(e4, structured)
        assert wait_until(lambda: len(sender.dead) == 2 and counts.get("dead_lettered") == 2)
        assert counts["retried"] >= 1
        time.sleep(0.5)
        receiver.up = True
        assert wait_until(lambda: len(sender.dead) == 0, timeout=10)
        ids = [e.get("id") for e in receiver.events]
        assert ids.index(e3["id"]) < ids.index(e4["id"])  # in order, each once
        assert ids.count(e3["id"]) == 1 and ids.count(e4["id"]) == 1
    finally:
        sender.close()
        receiver.close()


def test_the_sample_queue_is_bounded_and_samples_are_copies():
    spec = parse_monitors([{**BASE, "sample_rate": 1.0, "max_rows_per_sample": 2}])[0]
    metrics = Metrics()
    service = DriftService((spec,), DriftSettings(drift_queue_samples=2), metrics, lambda *a: None)  # type: ignore[arg-type, return-value]
    tap = Tap(spec, metrics.drift("m"))
    data = np.arange(12, dtype=np.float32).reshape(4, 3)
    data.flags.writeable = False
    from batchgate.core.types import RequestLimits

    req = new_request("m", "", [Tensor("x", "FP32", (4, 3), data)], None, "", None, {}, 0.0, "grpc", RequestLimits())
    resp = InferResponse("m", "1", [])
    for _ in range(3):
        service.offer(tap, req, resp)
    assert len(service.queue) == 2 and tap.metrics.samples["dropped"] == 1
    _, _, tensors = service.queue[0]
    kept = tensors[("input", "x")]
    assert kept.shape == (2, 3)  # max_rows_per_sample
    assert not np.shares_memory(kept, data)


def test_a_sample_of_another_width_than_the_profiles_is_refused_before_it_is_copied():
    """A dynamic-width input let one client queue megabytes a sample (copied, pickled to the
    detector, refused only there): 60 requests of [32, 40000] took 320 MB."""
    import asyncio

    from batchgate.core.types import RequestLimits

    spec = parse_monitors([{**BASE, "sample_rate": 1.0}])[0]
    metrics = Metrics()
    service = DriftService((spec,), DriftSettings(), metrics, lambda *a: None)  # type: ignore[arg-type, return-value]
    tap = Tap(spec, metrics.drift("m"), frozenset(), {("input", "x"): 3})
    wide = np.ones((32, 40_000), np.float32)
    req = new_request(
        "m", "", [Tensor("x", "FP32", wide.shape, wide)], None, "", None, {}, 0.0, "grpc", RequestLimits()
    )

    async def answer():
        return InferResponse("m", "1", [])

    asyncio.run(service._sampled(answer(), req, tap))
    assert not service.queue and tap.metrics.samples["invalid"] == 1
    fits = np.ones((4, 3), np.float32)
    req = new_request(
        "m", "", [Tensor("x", "FP32", fits.shape, fits)], None, "", None, {}, 0.0, "grpc", RequestLimits()
    )
    asyncio.run(service._sampled(answer(), req, tap))
    assert len(service.queue) == 1


def _detector(**over):
    from batchgate.monitoring.drift_detector import Detector, Plan

    spec = parse_monitors([{**BASE, "window": {"samples": 100, "max_s": 5, "min_samples": 20}, **over}])[0]
    profile = profile_from_json(_profile())
    sent: list = []
    detector = Detector(Plan([(spec, profile, None)], "/t"), sent.append)
    return detector, sent


def test_a_rebaseline_too_late_for_its_caller_is_not_kept(tmp_path):
    """A command read just before its caller's deadline was carried out after it (the profile
    takes a while to build): the caller was told 504 / DEADLINE_EXCEEDED and the rebaseline
    happened. A command is now carried out only with the time its answer takes back still left
    (checked as it is read and again before the rebaselined profile is kept)."""
    from batchgate.monitoring.drift_detector import COMMIT_RESERVE_S, Detector, Plan

    spec = parse_monitors([{**BASE, "window": {"samples": 100, "max_s": 5, "min_samples": 20}, "inputs": ["x"]}])[0]
    detector = Detector(Plan([(spec, profile_from_json(_profile()), None)], "/t", str(tmp_path)), [].append)
    rng = np.random.default_rng(4)
    for _ in range(30):
        detector.add("m", 0.0, 0.0, {("input", "x"): rng.standard_normal((10, 3)) + 2.0}, 1, now=0.0)
    configured = detector.watches["m"].profile.id
    for name in ("rebaseline", "reset"):
        with pytest.raises(TimeoutError, match=f"the {name} came too late for its caller"):
            detector.command(name, {"model": "m", "rows": 200}, until=time.monotonic() + COMMIT_RESERVE_S / 2)
    assert detector.watches["m"].profile.id == configured and not os.listdir(tmp_path)
    result = detector.command("rebaseline", {"model": "m", "rows": 200}, until=time.monotonic() + 60)
    assert detector.watches["m"].profile.id == result["profile_id"] != configured and os.listdir(tmp_path)
    detector.sender.close()


def test_the_detector_counts_samples_that_do_not_fit_and_closes_windows_by_size_and_time():
    detector, sent = _detector(inputs=["x", "kind"])
    rng = np.random.default_rng(2)
    kinds = rng.choice(4, size=(10, 1))
    detector.add("m", 0.0, 0.0, {("input", "x"): rng.standard_normal((10, 5)), ("input", "kind"): kinds}, 1, now=0.0)
    assert detector.watches["m"].invalid == 1 and detector.watches["m"].rows == 0  # 5 columns, not 3
    for _k in range(10):  # 100 rows: the window closes by size
        detector.add(
            "m", 1.0, 1.0, {("input", "x"): rng.standard_normal((10, 3)), ("input", "kind"): kinds}, 1, now=1.0
        )
    windows = [m for m in sent if m[0] == "window"]
    assert len(windows) == 1 and windows[0][2]["rows"] == 100
    detector.add("m", 2.0, 2.0, {("input", "x"): rng.standard_normal((10, 3)), ("input", "kind"): kinds}, 1, now=2.0)
    detector.tick(10.0)  # past max_s with 10 rows, fewer than min_samples: it waits
    assert len([m for m in sent if m[0] == "window"]) == 1
    detector.add("m", 10.0, 10.0, {("input", "x"): rng.standard_normal((10, 3)), ("input", "kind"): kinds}, 1, now=10.0)
    detector.tick(10.5)
    windows = [m for m in sent if m[0] == "window"]
    assert len(windows) == 2 and windows[1][2]["rows"] == 20
    assert detector.counts()["samples"]["m"] == {"used": 12, "invalid": 1}
    detector.sender.close()


def test_a_rebaseline_needs_rows_and_replaces_the_profile_keeping_feature_kinds():
    detector, _ = _detector(inputs=["x", "kind"])
    with pytest.raises(ValueError, match="only 0 live rows"):
        detector.command("rebaseline", {"model": "m", "rows": 0})
    rng = np.random.default_rng(3)
    for _ in range(30):
        x = rng.standard_normal((10, 3)) + 2.0
        detector.add("m", 0.0, 0.0, {("input", "x"): x, ("input", "kind"): rng.choice(4, size=(10, 1))}, 1, now=0.0)
    configured = detector.watches["m"].configured.id
    # fewer rows than a scored window (min_samples 20): refused, though 300 are kept (it took the
    # last one alone, and every window after it drifted)
    with pytest.raises(ValueError, match="takes at least 20 rows"):
        detector.command("rebaseline", {"model": "m", "rows": 1})
    result = detector.command("rebaseline", {"model": "m", "rows": 200})
    w = detector.watches["m"]
    assert result["rows"] == 200 and w.profile.id == result["profile_id"] != configured
    assert w.profile.source["based_on"] == configured
    assert w.profile.inputs["x"][0].mean == pytest.approx(2.0, abs=0.3)
    assert w.profile.inputs["kind"][0].kind == "categorical"
    assert detector.command("reset", {"model": "m", "reference": True})["profile_id"] == configured
    with pytest.raises(KeyError, match="no drift monitor for model 'other'"):
        detector.command("reset", {"model": "other"})
    detector.sender.close()


def test_a_stacked_batch_fills_windows_to_their_exact_size():
    from batchgate.monitoring.drift_samples import stacked

    rng = np.random.default_rng(4)
    batch = [("m", float(t), {("input", "x"): rng.standard_normal((15, 3))}) for t in range(10)]
    batch.append(("m", 10.0, {("input", "x"): rng.standard_normal((2, 5))}))  # another width: its own group
    groups = stacked(batch)
    assert [(g[0], g[1], g[2], g[3][("input", "x")].shape, g[4]) for g in groups] == [
        ("m", 0.0, 9.0, (150, 3), 10),
        ("m", 10.0, 10.0, (2, 5), 1),
    ]
    detector, sent = _detector()
    for model, first, last, tensors, count in groups:
        detector.add(model, first, last, tensors, count, now=11.0)
    windows = [m[2] for m in sent if m[0] == "window"]
    assert [w["rows"] for w in windows] == [100] and detector.watches["m"].rows == 50
    assert windows[0]["span_s"] == 9.0 and windows[0]["lag_s"] >= 0
    assert detector.counts()["samples"]["m"] == {"used": 10, "invalid": 1}
    detector.sender.close()


# ---------------------------------------------------------------- regressions from the review
def test_bool_features_match_their_profile_whatever_the_tensor_type():
    from batchgate.core.drift_window import Scorer

    rng = np.random.default_rng(7)
    profile = build_profile("m", {"x": build_tensor("x", rng.random((5000, 1)) < 0.3)})
    assert set(profile.inputs["x"][0].categories) == {"0", "1"}
    scorer = Scorer(parse_monitors([BASE])[0], profile)
    r = scorer.score({("input", "x"): rng.random((2000, 1)) < 0.3})
    assert not r.drifted and r.features["x[0]"].quality["unseen"] == 0.0
    texts = build_tensor("x", np.array([["True"], ["False"], ["True"]], dtype=object))
    assert set(texts[0].categories) == {"0", "1"}  # a text column of booleans: the same keys


def test_psi_does_not_decide_on_a_window_too_small_for_its_bins():
    from batchgate.core.drift_window import Scorer

    rng = np.random.default_rng(8)
    profile = build_profile("m", {"x": build_tensor("x", rng.standard_normal((20_000, 4)))})
    scorer = Scorer(parse_monitors([{**BASE, "tests": ["psi"]}])[0], profile)
    for rows in (5, 30, 100):
        r = scorer.score({("input", "x"): rng.standard_normal((rows, 4))})
        assert not r.drifted, rows
    r = scorer.score({("input", "x"): rng.standard_normal((400, 4)) + 1.0})  # enough rows: decided
    assert len(r.drifted) == 4


def test_the_event_sender_survives_a_receiver_that_answers_garbage(tmp_path):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def garbage():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"garbage\r\n\r\n")
            conn.close()

    threading.Thread(target=garbage, daemon=True).start()
    counts: dict[str, int] = {}
    sender = EventSender(DeadLetter("", 10), 30.0, lambda o: counts.__setitem__(o, counts.get(o, 0) + 1))
    try:
        hook = {"url": f"http://127.0.0.1:{server.getsockname()[1]}/", "format": "cloudevents", "timeout_s": 2}
        for i in range(2):
            sender.send(make_event("io.batchgate.drift.detected", "/t", "m", {"n": i}), {**hook, "retries": 0})
        assert wait_until(lambda: counts.get("dead_lettered") == 2), counts
        assert all(lane.thread is not None and lane.thread.is_alive() for lane in sender.lanes.values())
    finally:
        sender.close()
        server.close()


def test_the_output_psi_window_keeps_only_answers_it_can_compare():
    import random

    from batchgate.routes import Window

    w = Window()
    rng = random.Random(0)
    w.keep(np.zeros((0, 3), np.float32), rng)  # a batch of no rows
    w.keep(np.float32(1.0).reshape(()), rng)  # a scalar
    w.keep(np.ones((2, 3), np.float32), rng)
    w.keep(np.ones((2, 5), np.float32), rng)  # another width than the first kept
    assert w.figures().outputs.shape == (2, 3)


def test_a_sample_is_cut_to_bounded_bytes_and_never_fails_the_request():
    import asyncio

    from batchgate.core.types import RequestLimits

    spec = parse_monitors([{**BASE, "sample_rate": 1.0, "outputs": True}])[0]
    metrics = Metrics()
    service = DriftService((spec,), DriftSettings(), metrics, lambda *a: None)  # type: ignore[arg-type, return-value]
    tap = Tap(spec, metrics.drift("m"), frozenset({"y"}))
    big = np.array([[b"x" * 5_000_000, b"ok"]], dtype=object)
    req = new_request("m", "", [Tensor("x", "BYTES", (1, 2), big)], None, "", None, {}, 0.0, "grpc", RequestLimits())
    service.offer(tap, req, InferResponse("m", "1", [Tensor("y", "FP32", (1, 1), np.ones((1, 1), np.float32))]))
    kept = service.queue[-1][2]
    assert len(kept[("input", "x")][0, 0]) == 256 and kept[("input", "x")][0, 1] == b"ok"

    async def answer():
        return InferResponse("m", "1", [Tensor("y", "FP32", (), np.float32(1.0).reshape(()))])

    resp = asyncio.run(service._sampled(answer(), req, tap))  # a 0-d output cannot be sampled
    assert resp.model_name == "m" and tap.metrics.samples["invalid"] == 1


def test_samples_a_profile_cannot_take_are_counted_and_the_window_starts_again():
    detector, _ = _detector(inputs=["x", "kind"])
    text = np.array([[b"a", b"b", b"c"]] * 100, dtype=object)  # a whole window: scored at once
    with pytest.raises(ValueError):
        detector.add("m", 0.0, 0.0, {("input", "x"): text, ("input", "kind"): np.zeros((100, 1))}, 1, now=0.0)
    detector.refused("m", 1, ValueError("text in a numeric feature"))
    assert detector.watches["m"].invalid == 1 and detector.watches["m"].rows == 0
    detector.sender.close()


def test_a_profile_taking_a_bytes_input_as_numbers_is_refused_at_start():
    from batchgate.core.signature import ModelSignature, TensorSpec
    from batchgate.core.types import DATATYPES
    from batchgate.monitoring.drift import check_monitor

    profile = profile_from_json(_profile())
    sig = ModelSignature(
        "m",
        "onnxruntime_onnx",
        8,
        (TensorSpec("x", DATATYPES["BYTES"], (3,)), TensorSpec("kind", DATATYPES["INT64"], (1,))),
        (),
    )
    spec = parse_monitors([{**BASE, "inputs": ["x", "kind"]}])[0]
    with pytest.raises(ConfigError, match="input 'x' holds BYTES, but the profile takes feature 'a' as numeric"):
        check_monitor(spec, profile, sig, 512)
    spec = parse_monitors([{**BASE, "inputs": ["x", "kind"], "min_drifted_features": 9}])[0]
    sig = ModelSignature("m", "onnxruntime_onnx", 8, (TensorSpec("x", DATATYPES["FP32"], (3,)), sig.inputs[1]), ())
    with pytest.raises(ConfigError, match="min_drifted_features 9 is more than the 4 features watched"):
        check_monitor(spec, profile, sig, 512)


def test_one_models_receiver_down_does_not_hold_back_another_models_events(tmp_path):
    import socket

    receiver = Receiver()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    down = {"url": f"http://127.0.0.1:{closed.getsockname()[1]}/", "format": "cloudevents", "timeout_s": 1}
    up = {"url": receiver.url, "format": "cloudevents", "timeout_s": 2, "retries": 0}
    counts: dict[str, int] = {}
    sender = EventSender(DeadLetter("", 100), 0.2, lambda o: counts.__setitem__(o, counts.get(o, 0) + 1))
    try:
        a1 = make_event("io.batchgate.drift.detected", "/t", "a", {})
        sender.send(a1, {**down, "retries": 0})
        assert wait_until(lambda: sender.dead.holds("a"))
        b1 = make_event("io.batchgate.drift.detected", "/t", "b", {})
        a2 = make_event("io.batchgate.drift.recovered", "/t", "a", {})
        sender.send(a2, up)  # behind a1: waits for it, in order
        sender.send(b1, up)
        assert receiver.wait_for(lambda e: e["id"] == b1["id"])
        time.sleep(0.5)
        assert not [e for e in receiver.events if e["id"] == a2["id"]] and sender.dead.holds("a")
    finally:
        sender.close()
        receiver.close()
        closed.close()
    assert [e["event"]["id"] for e in sender.dead.events] == [a1["id"], a2["id"]]


def test_boolean_words_in_any_case_are_keyed_as_bools_live_and_in_an_older_profile():
    from batchgate.core.drift import PROFILE_FORMAT, category_key

    assert {category_key(w) for w in ("true", "TRUE", b"True", True, 1)} == {"1"}
    assert {category_key(w) for w in ("false", "FALSE", b"False", False, 0)} == {"0"}
    assert category_key("truer") == "truer" and category_key("yes") == "yes"
    # a profile written before, whose CSV gave the categories "true" / "false": read as live values are keyed
    feature = {"name": "f", "kind": "categorical", "count": 4, "categories": {"true": 0.75, "false": 0.25}}
    profile = profile_from_json({"format": PROFILE_FORMAT, "model": "m", "inputs": {"x": [feature]}})
    assert profile.inputs["x"][0].categories == {"1": 0.75, "0": 0.25}


def test_a_detected_events_adwin_entry_carries_its_threshold():
    """An event's drifted features carry each deciding test's score and its threshold or p-value:
    ADWIN's came with its score alone, so a receiver could not tell how far past its bound it was."""
    import math

    detector, sent = _detector(tests=["adwin"], debounce_windows=1, alpha=0.01)
    rng = np.random.default_rng(4)
    for _ in range(2):
        x = rng.standard_normal((100, 3)) + np.array([3.0, 0.0, 0.0])  # feature a moved by 3 sigma
        detector.add("m", 0.0, 0.0, {("input", "x"): x}, 1, 0.0)
    (event,) = [m[2] for m in sent if m[0] == "event"]
    (entry,) = [d for d in event["data"]["drifted_features"] if d["feature"] == "a"]
    adwin = entry["tests"]["adwin"]
    watched = len(detector.watches["m"].scorer.layout)  # (ADWIN's delta: alpha / features watched)
    assert adwin["threshold"] == pytest.approx(math.sqrt(2 * math.log(2 / (0.01 / watched))))
    assert adwin["score"] > adwin["threshold"]
