"""Regressions from a re-check of online drift detection with data unlike the other tests':
constant features, float64 profiles of float32 traffic, INT64, BOOL and BYTES features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batchgate.core.drift import build_profile, build_tensor, profile_from_json
from batchgate.core.drift_monitors import parse_monitors
from batchgate.core.drift_window import Scorer

BASE = {"model": "m", "inputs": ["x"], "reference": "p.json"}


# ---------------------------------------------------------------- constant features
@pytest.mark.parametrize("value", [0.1, 1 / 3, 2.7, 100000.1])
def test_a_constant_feature_is_not_drift_when_it_stays_the_same_constant(value):
    """Summing a constant in float64 leaves a rounding residue: the std of 5,000 copies of 0.1 was
    1.4e-17 (and the mean one ulp off), so ADWIN, dividing by that std, flagged every window of the
    very values the profile was made from (a constant CSV column, an FP64 input)."""
    ref = np.full((5000, 2), value)
    ref[:, 1] = np.random.default_rng(0).normal(0, 1, 5000)
    feature = build_tensor("x", ref)[0]
    assert feature.std == 0.0 and feature.mean == value
    spec = parse_monitors([{**BASE, "window": {"samples": 2000}}])[0]
    for profile in (build_profile("m", {"x": build_tensor("x", ref)}), _with_residue(ref, value)):
        scorer = Scorer(spec, profile)
        for live in (ref[:2000], ref[:2000].astype(np.float32)):  # float32 traffic too
            r = scorer.score({("input", "x"): live})
            assert not r.drifted, (live.dtype, r.features["x[0]"].scores)
            if live.dtype == np.float64:  # (float32 rounds 100000.1 by 0.0016: a shift in raw units)
                assert r.features["x[0]"].scores["adwin"] < 1e-3
            assert not r.features["x[0]"].alarms, (live.dtype, r.features["x[0]"].quality)  # 0.1f is in range


def _with_residue(ref: np.ndarray, value: float):
    """The profile as a release before the fix wrote it: the constant's std a rounding residue."""
    data = build_profile("m", {"x": build_tensor("x", ref)}).to_json()
    first = data["inputs"]["x"][0]
    first["std"], first["mean"] = float(np.full(5000, value).std()) or 1e-17, value * (1 - 1e-16)
    return profile_from_json(data)


def test_a_constant_feature_that_moves_is_still_flagged():
    ref = np.full((5000, 1), 0.1)
    scorer = Scorer(
        parse_monitors([{**BASE, "window": {"samples": 2000}}])[0], build_profile("m", {"x": build_tensor("x", ref)})
    )
    r = scorer.score({("input", "x"): np.full((2000, 1), 0.2, dtype=np.float32)})
    assert r.drifted == ["x[0]"] and "out_of_range" in r.features["x[0]"].alarms


# ---------------------------------------------------------------- values near the float64 limit
def test_values_near_the_float64_limit_keep_every_score_finite_and_the_status_readable():
    """A chunk of values near DBL_MAX (a sentinel some pipelines write for missing) overflowed its
    sum: ADWIN's score was inf (fed to ADWIN too), and the drift status could not be written as
    JSON (GetDrift over HTTP failed, and so did ``batchgate drift status``)."""
    from batchgate.admin.api import drift_message
    from batchgate.admin.http import to_json

    rng = np.random.default_rng(0)
    profile = build_profile("m", {"x": build_tensor("x", rng.normal(0, 1, (5000, 3)))})
    scorer = Scorer(parse_monitors([{**BASE, "window": {"samples": 128}}])[0], profile)
    live = rng.normal(0, 1, (128, 3))
    live[:, 0] = np.finfo(np.float64).max
    live[::2, 1], live[1::2, 1] = np.finfo(np.float64).max, -np.finfo(np.float64).max  # a sum that is undefined
    r = scorer.score({("input", "x"): live})
    scores = [v for fs in r.features.values() for v in fs.scores.values()]
    assert all(np.isfinite(scores)), r.features
    assert "x[0]" in r.drifted and {"adwin", "ks"} <= r.features["x[0]"].decided
    status = to_json(drift_message({"model": "m", "last_window": {"result": r.summary()}}))
    assert status["last_window"]["result"]["features"]["x[0]"]["scores"]["adwin"] > 1e6
    for _ in range(3):  # ADWIN goes on working on ordinary values after them
        r = scorer.score({("input", "x"): rng.normal(0, 1, (128, 3))})
        assert all(np.isfinite(v) for fs in r.features.values() for v in fs.scores.values())


def test_a_profile_of_values_near_the_float64_limit_is_one_a_server_reads():
    """Their sums overflowed: ``drift profile`` wrote a mean and std of Infinity, and the server
    refused the profile at start (as would a restart read a rebaselined one)."""
    big = np.finfo(np.float64).max
    ref = np.array([[big, 1.0], [-big, 2.0], [1e308, 3.0], [0.5, 4.0]])
    data = json.loads(json.dumps(build_profile("m", {"x": build_tensor("x", ref)}).to_json()))
    first = profile_from_json(data).inputs["x"][0]
    assert np.isfinite([first.mean, first.std]).all() and first.std > 1e307
    assert first.mean == pytest.approx(np.mean(ref[:, 0] / 4) * 4)


# ---------------------------------------------------------------- a profile that does not fit the model
def test_a_profile_taking_a_bytes_output_as_numbers_is_refused_at_start():
    """The check made for inputs was not made for outputs: the monitor started, and every window
    of it was then refused (its samples counted invalid, nothing ever scored)."""
    from batchgate.core.errors import ConfigError
    from batchgate.core.signature import ModelSignature, TensorSpec
    from batchgate.core.types import DATATYPES
    from batchgate.monitoring.drift_checks import check_monitor

    rng = np.random.default_rng(0)
    profile = build_profile(
        "m",
        {"x": build_tensor("x", rng.normal(0, 1, (500, 2)))},
        {"label": build_tensor("label", rng.normal(0, 1, (500, 1)))},  # numbers, where the model answers text
    )
    sig = ModelSignature(
        "m",
        "onnxruntime_onnx",
        8,
        (TensorSpec("x", DATATYPES["FP32"], (2,)),),
        (TensorSpec("label", DATATYPES["BYTES"], (1,)),),
    )
    spec = parse_monitors([{**BASE, "outputs": True}])[0]
    with pytest.raises(ConfigError, match="output 'label' holds BYTES, but the profile takes feature 'label.0.' as"):
        check_monitor(spec, profile, sig, 512)
    check_monitor(parse_monitors([BASE])[0], profile, sig, 512)  # (outputs not watched: not checked)


# ---------------------------------------------------------------- PSI at small windows
@pytest.mark.parametrize(
    "kind, rows",
    [("binary", 32), ("normal", 200)],  # (just past PSI_MIN_ROWS_PER_CELL: 2 + other cells, 20 bins)
)
def test_psi_at_small_windows_raises_few_false_alarms_and_still_sees_a_large_shift(kind, rows):
    """A fixed PSI threshold is reached by chance at few rows a cell: 32 binary INT64 features in
    windows of 32 rows alarmed 8 windows in 10, 32 normal ones in windows of 200 rows 1 in 10
    (alpha 0.01). PSI now decides only past its chance level at alpha / features."""
    rng = np.random.default_rng(21)

    def draw(n: int, shift: float = 0.0) -> np.ndarray:
        if kind == "binary":
            return (rng.random((n, 32)) < np.r_[0.5 + shift, [0.5] * 31]).astype(np.int64)
        return rng.standard_normal((n, 32)) + np.r_[shift, [0.0] * 31]

    profile = build_profile("m", {"x": build_tensor("x", draw(50_000))})
    spec = parse_monitors([{**BASE, "tests": ["psi"], "alpha": 0.01, "window": {"samples": rows, "min_samples": 10}}])
    scorer = Scorer(spec[0], profile)
    alarmed = sum(scorer.score({("input", "x"): draw(rows)}).drifted_window for _ in range(200))
    assert alarmed <= 4, f"{alarmed} of 200 windows"
    shifted = [scorer.score({("input", "x"): draw(rows, 0.45 if kind == "binary" else 1.5)}) for _ in range(5)]
    assert sum(r.drifted == ["x[0]"] for r in shifted) >= 4, [r.features["x[0]"].scores for r in shifted]


# ---------------------------------------------------------------- webhook URLs
@pytest.mark.parametrize(
    "url, message",
    [
        ("http://user:secret@hooks.example/drift", "must not hold credentials"),
        ("http://hooks.example:99999/drift", "a port from 1 to 65535"),
        ("http://hooks.example:http/drift", "a port from 1 to 65535"),
        ("http://hooks.example:0/drift", "a port from 1 to 65535"),
        ("http://:8080/drift", "needs a host"),
    ],
)
def test_a_webhook_url_no_delivery_could_use_is_refused_at_start(url, message):
    """Such a URL was taken, and each of its events failed and went to the dead letter for ever:
    urllib takes ``user:secret@hooks.example`` for a host name (and the secret was kept
    in the dead-letter file), and a port out of range failed each attempt."""
    from batchgate.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_monitors([{**BASE, "webhook": {"url": url}}])
    for fine in ("http://[::1]:8080/drift", "https://hooks.example/a?b=c", "http://10.0.0.7:65535"):
        assert parse_monitors([{**BASE, "webhook": {"url": fine}}])[0].webhook.url == fine


# ---------------------------------------------------------------- quality alarms at small windows
def test_quality_alarms_at_small_windows_need_more_than_chance_and_still_fire_on_a_real_change():
    """At 10 rows one value is 10%: one category of a reference's 3% tail (unseen), or one NaN of
    a 2% missing rate, passed its threshold by chance, and windows of 10 rows over 32 such
    features raised a data-quality alarm in most windows (alpha 0.01)."""
    rng = np.random.default_rng(5)
    p = np.r_[[0.97 / 50] * 50, [0.03 / 200] * 200]  # 50 categories kept; a 3% tail of 200 more: 'other'

    def draw(n: int) -> dict:
        x = rng.standard_normal((n, 16))
        x[rng.random((n, 16)) < 0.02] = np.nan
        return {("input", "x"): x, ("input", "ids"): rng.choice(250, size=(n, 16), p=p).astype(np.int64)}

    ref = draw(50_000)
    profile = build_profile(
        "m", {"x": build_tensor("x", ref["input", "x"]), "ids": build_tensor("ids", ref["input", "ids"])}
    )
    assert profile.inputs["ids"][0].other == pytest.approx(0.03, abs=0.005)
    spec = parse_monitors([{**BASE, "inputs": ["x", "ids"], "alpha": 0.01, "window": {"samples": 10}}])[0]
    scorer = Scorer(spec, profile)
    alarmed = sum(any(fs.alarms for fs in scorer.score(draw(10)).features.values()) for _ in range(200))
    assert alarmed <= 4, f"{alarmed} of 200 windows of 10 rows raised a quality alarm"
    window = draw(10)
    window["input", "x"][:6, 3] = np.nan  # 6 of 10 missing where the reference has 2%
    window["input", "ids"][:, 2] = 249  # every row an unseen category
    window["input", "x"][:5, 4] = 1e9  # half the rows far out of range
    r = scorer.score(window)
    assert r.features["x[3]"].alarms == {"missing"} and r.features["ids[2]"].alarms == {"unseen"}
    assert r.features["x[4]"].alarms == {"out_of_range"}


# ---------------------------------------------------------------- the events' source
@pytest.mark.parametrize("source", ["pod-1\r\nX-Injected: 1", "/batchgate/\u6f22", "x" * 1025])
def test_an_event_source_no_json_delivery_could_carry_is_refused_at_start(tmp_path, source):
    """It is each ``format: json`` event's ``ce-source`` header: a control character (urllib:
    'Invalid header value') or one outside Latin-1 failed every delivery, to the dead letter."""
    from batchgate.config import load_settings
    from batchgate.core.errors import ConfigError

    with pytest.raises(ConfigError, match="drift_event_source must be 1 to 1024 printable ASCII"):
        load_settings(None, {"model_repository": str(tmp_path), "drift_event_source": source}, environ={})


def test_an_accepted_event_source_reaches_a_real_receiver_in_both_formats(tmp_path):
    from batchgate.config import load_settings
    from batchgate.monitoring.drift_events import make_event, post
    from drift_support import Receiver

    receiver = Receiver()
    try:
        for source in ("/batchgate/pod-1", "https://ml.example/drift?zone=a b"):
            s = load_settings(None, {"model_repository": str(tmp_path), "drift_event_source": source}, environ={})
            event = make_event("io.batchgate.drift.detected", s.drift_detector.drift_event_source, "m", {"a": 1})
            post(receiver.url, event, "json", 5.0)
            post(receiver.url, event, "cloudevents", 5.0)
            assert receiver.headers[-2]["ce-source"] == source and receiver.events[-1]["source"] == source
    finally:
        receiver.close()


# ---------------------------------------------------------------- ADWIN and windows under 32 rows
def test_adwin_is_refused_for_windows_it_would_never_see_and_left_out_of_the_default_tests():
    """ADWIN takes one value per 32 rows: in windows of fewer it never ran, so a monitor with
    ``tests: [adwin]`` and ``window.samples: 20`` never flagged even a 3 sigma shift, and its
    status listed a test that did nothing."""
    from batchgate.core.errors import ConfigError

    with pytest.raises(ConfigError, match="'adwin' takes one value per 32 rows, so window.samples must be at least 32"):
        parse_monitors([{**BASE, "tests": ["adwin", "ks"], "window": {"samples": 20}}])
    assert parse_monitors([{**BASE, "window": {"samples": 20}}])[0].tests == ("psi", "ks", "chi2")
    assert "adwin" in parse_monitors([{**BASE, "tests": ["adwin"], "window": {"samples": 32}}])[0].tests


# ---------------------------------------------------------------- a webhook URL changed across a restart
def test_events_kept_for_a_webhook_url_no_longer_configured_go_to_the_models_webhook_now(tmp_path):
    """The dead letter keeps each event's receiver. After the monitor's webhook URL was changed (its
    old receiver gone), the events kept for the old URL were retried there for ever and, as a
    model's events stay in order, every new event of the model waited behind them: none was
    delivered again until the dead letter filled up."""
    from batchgate.monitoring.drift_detector import Detector, Plan
    from batchgate.monitoring.drift_events import make_event
    from drift_support import Receiver, wait_until

    dead = tmp_path / "dead.jsonl"
    old_hook = {"url": "http://127.0.0.1:9/gone", "format": "cloudevents", "timeout_s": 1.0, "retries": 0}
    kept = make_event("io.batchgate.drift.detected", "/t", "m", {"state": "detected"})
    dead.write_text(json.dumps({"event": kept, "webhook": old_hook}) + "\n")
    receiver = Receiver()
    try:
        spec = parse_monitors([{**BASE, "webhook": {"url": receiver.url, "timeout_s": 2, "retries": 0}}])[0]
        profile = build_profile("m", {"x": build_tensor("x", np.random.default_rng(0).normal(0, 1, (500, 2)))})
        detector = Detector(Plan([(spec, profile, None)], "/t", "", str(dead), 100, 0.2), [].append)
        try:
            new = make_event("io.batchgate.drift.recovered", "/t", "m", {"state": "recovered"})
            detector.sender.send(new, {"url": receiver.url, "format": "cloudevents", "timeout_s": 2.0, "retries": 0})
            got = receiver.wait_for(lambda e: e["id"] == new["id"], timeout=20)
            assert got, f"the new event waited behind the old URL's ({len(detector.sender.dead)} in the dead letter)"
            assert [e["id"] for e in receiver.events] == [kept["id"], new["id"]]  # in the model's order
            assert wait_until(lambda: not detector.sender.dead.events, 10)
        finally:
            detector.sender.close()
    finally:
        receiver.close()


# ---------------------------------------------------------------- chi-square against an estimated reference
@pytest.mark.parametrize("kind", ["uniform200", "six"])
def test_chi_square_counts_the_references_own_sampling_error(kind):
    """Pearson's statistic read the reference frequencies as exact: a categorical feature profiled
    from 20,000 rows (200 categories; 6 categories: 5,000 rows), scored in windows of 2,000 from the
    same distribution, alarmed 3.8% (3.5%) of windows at alpha 0.01. The statistic is now the
    two-sample one (divided by 1 + n / m), as KS already takes the two-sample size."""
    rng = np.random.default_rng(9)

    def draw(n: int) -> np.ndarray:
        if kind == "six":
            return rng.choice(6, size=(n, 1), p=[0.4, 0.25, 0.15, 0.1, 0.07, 0.03]).astype(np.int64)
        return rng.integers(0, 200, (n, 1))

    profile = build_profile("m", {"x": build_tensor("x", draw(5000 if kind == "six" else 20_000))})
    spec = parse_monitors([{**BASE, "tests": ["chi2"], "alpha": 0.01, "window": {"samples": 2000}}])[0]
    scorer = Scorer(spec, profile)
    alarmed = sum(scorer.score({("input", "x"): draw(2000)}).drifted_window for _ in range(1000))
    assert alarmed <= 20, f"{alarmed} of 1000 windows (alpha 0.01)"


def test_a_profile_made_for_another_model_is_used_with_a_warning(caplog):
    """A profile's own model name was never looked at: a monitor given another model's file (a
    copied monitor entry) took it silently when its tensors fit. Now it says so at start."""
    import logging

    from batchgate.core.signature import ModelSignature, TensorSpec
    from batchgate.core.types import DATATYPES
    from batchgate.monitoring.drift_checks import check_monitor

    rng = np.random.default_rng(0)
    sig = ModelSignature("m", "onnxruntime_onnx", 8, (TensorSpec("x", DATATYPES["FP32"], (2,)),), ())
    spec = parse_monitors([BASE])[0]
    with caplog.at_level(logging.WARNING, logger="batchgate.drift"):
        check_monitor(spec, build_profile("m", {"x": build_tensor("x", rng.normal(0, 1, (100, 2)))}), sig, 512)
        assert not caplog.records
        check_monitor(spec, build_profile("fraud", {"x": build_tensor("x", rng.normal(0, 1, (100, 2)))}), sig, 512)
    (record,) = caplog.records
    assert "made for model 'fraud'" in record.getMessage() and "drift monitor of 'm'" in record.getMessage()
