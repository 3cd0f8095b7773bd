"""core/rollout.py on a fake clock: gate arithmetic per interval (minimum counts, error rate,
p99 ratio, disagreement), transitions (step, promote, rollback or pause), weights for each
state, manual actions, and the state's round trip."""

from __future__ import annotations

import numpy as np
import pytest

from batchgate.core import rollout as ro
from batchgate.core.errors import ConfigError
from batchgate.core.routing import parse_routes

ROUTE = {
    "name": "fraud",
    "variants": [
        {"name": "stable", "model": "fraud_v1", "weight": 100},
        {"name": "canary", "model": "fraud_v2", "weight": 0},
    ],
    "rollout": {
        "canary": "canary",
        "baseline": "stable",
        "steps": [10, 50, 100],
        "interval_s": 60,
        "min_requests": 100,
        "gates": {"max_error_rate": 0.01, "max_p99_ratio": 1.25, "max_disagreement": 0.05},
    },
}
GOOD = ro.Figures(requests=500, server_errors=2, p99_s=0.011)
BASE = ro.Figures(requests=4500, server_errors=5, p99_s=0.010)


def spec(**rollout_changes):
    route = {**ROUTE, "rollout": {**ROUTE["rollout"], **rollout_changes}}
    (r,) = parse_routes([route])
    return r


def test_gates_pass_fail_and_wait_on_one_interval():
    r = spec().rollout
    assert ro.judge(r, GOOD, BASE).outcome == "pass"
    few = ro.judge(r, ro.Figures(requests=99, server_errors=50), BASE)
    assert few.outcome == "wait" and "fewer than min_requests 100" in few.reasons[0]
    errors = ro.judge(r, ro.Figures(requests=500, server_errors=6, p99_s=0.011), BASE)
    assert errors.outcome == "fail" and errors.reasons == ("error rate 0.0120 > max_error_rate 0.01",)
    slow = ro.judge(r, ro.Figures(requests=500, p99_s=0.013), BASE)
    assert slow.outcome == "fail" and "p99 ratio 1.300 > max_p99_ratio 1.25" in slow.reasons
    assert slow.figures["p99_ratio"] == pytest.approx(1.3)
    shadowed = ro.judge(r, ro.Figures(requests=500, p99_s=0.01, compared=200, disagreed=11), BASE)
    assert shadowed.outcome == "fail" and "disagreement 0.0550 > max_disagreement 0.05" in shadowed.reasons
    # No baseline latency in the interval: that gate is not judged, the others are.
    assert ro.judge(r, GOOD, ro.Figures()).outcome == "pass"


def test_the_p99_gate_waits_for_a_baseline_p99_of_at_least_100_answers():
    """At a late step (90% and more) the baseline answers a few dozen requests an interval, and
    their p99 is their slowest: by chance lower than the canary's p99 over hundreds, by 25% often
    enough to roll an equal canary back. Under 100 baseline answers the gate is not judged."""
    r = spec().rollout
    canary = ro.Figures(requests=500, p99_s=0.013)
    late = ro.judge(r, canary, ro.Figures(requests=40, p99_s=0.010))
    assert late.outcome == "pass" and "p99_ratio" not in late.figures
    refused = ro.judge(r, canary, ro.Figures(requests=120, refused=30, p99_s=0.010))  # 90 answered
    assert refused.outcome == "pass" and "p99_ratio" not in refused.figures
    enough = ro.judge(r, canary, ro.Figures(requests=ro.MIN_P99_ANSWERS, p99_s=0.010))
    assert enough.outcome == "fail" and enough.figures["p99_ratio"] == pytest.approx(1.3)


def test_a_good_canary_steps_through_to_promotion():
    r = spec()
    state = ro.start(r.rollout, now=0.0)
    assert ro.weights(r.rollout, state, r.weights) == {"stable": 90, "canary": 10}
    assert ro.tick(r.rollout, state, 30.0, GOOD, BASE) is None  # the interval has not ended
    assert ro.tick(r.rollout, state, 60.0, GOOD, BASE).outcome == "pass"
    assert ro.weights(r.rollout, state, r.weights) == {"stable": 50, "canary": 50}
    assert ro.tick(r.rollout, state, 120.0, GOOD, BASE).outcome == "pass"
    assert ro.canary_weight(r.rollout, state) == 100 and state.state == ro.RUNNING
    assert ro.tick(r.rollout, state, 180.0, GOOD, BASE).outcome == "pass"
    assert state.state == ro.PROMOTED and state.last == "step 100% passed: promoted"
    assert ro.weights(r.rollout, state, r.weights) == {"stable": 0, "canary": 100}
    assert ro.tick(r.rollout, state, 240.0, GOOD, BASE) is None  # finished


def test_a_failing_canary_is_rolled_back_or_paused():
    bad = ro.Figures(requests=500, server_errors=50, p99_s=0.01)
    r = spec()
    state = ro.start(r.rollout, now=0.0)
    ro.tick(r.rollout, state, 60.0, GOOD, BASE)
    assert ro.tick(r.rollout, state, 120.0, bad, BASE).outcome == "fail"
    assert state.state == ro.ROLLED_BACK and "step 50% failed (error rate 0.1000" in state.last
    assert ro.weights(r.rollout, state, r.weights) == {"stable": 100, "canary": 0}

    p = spec(on_fail="pause")
    state = ro.start(p.rollout, now=0.0)
    ro.tick(p.rollout, state, 60.0, bad, BASE)
    assert state.state == ro.PAUSED and ro.weights(p.rollout, state, p.weights) == {"stable": 90, "canary": 10}
    assert ro.tick(p.rollout, state, 500.0, GOOD, BASE) is None  # paused: no judging
    ro.resume(state, p.rollout, now=500.0)
    assert state.state == ro.RUNNING and state.next_at == 560.0
    assert ro.tick(p.rollout, state, 560.0, GOOD, BASE).outcome == "pass" and state.step == 1


def test_too_few_requests_wait_without_moving():
    r = spec()
    state = ro.start(r.rollout, now=0.0)
    verdict = ro.tick(r.rollout, state, 60.0, ro.Figures(requests=10), BASE)
    assert verdict.outcome == "wait" and state.step == 0 and state.next_at == 120.0


def test_manual_actions():
    r = spec()
    state = ro.start(r.rollout, now=0.0)
    ro.pause(state)
    assert state.state == ro.PAUSED
    ro.promote(state, r.rollout)
    assert state.state == ro.PROMOTED and ro.canary_weight(r.rollout, state) == 100
    ro.rollback(state)
    assert state.state == ro.ROLLED_BACK and ro.canary_weight(r.rollout, state) == 0


def test_other_variants_keep_their_weight_and_the_pair_splits_its_own():
    (r,) = parse_routes(
        [
            {
                "name": "three",
                "variants": [
                    {"name": "stable", "model": "a", "weight": 70},
                    {"name": "canary", "model": "b", "weight": 0},
                    {"name": "legacy", "model": "c", "weight": 30},
                ],
                "rollout": {"canary": "canary", "baseline": "stable", "steps": [20, 100]},
            }
        ]
    )
    state = ro.start(r.rollout, now=0.0)
    # The canary takes 20% of the pair's 70: legacy keeps its 30% of the route, and no user of
    # legacy moves to stable (it used to give the pair 100 beside legacy's 30: legacy fell to 23%).
    assert ro.weights(r.rollout, state, r.weights) == {"stable": 56, "canary": 14, "legacy": 30}
    ro.promote(state, r.rollout)
    assert ro.weights(r.rollout, state, r.weights) == {"stable": 0, "canary": 70, "legacy": 30}
    ro.rollback(state)
    assert ro.weights(r.rollout, state, r.weights) == {"stable": 70, "canary": 0, "legacy": 30}


def test_relative_weights_are_stepped_in_percent_of_the_route():
    (r,) = parse_routes(
        [
            {
                "name": "rel",
                "variants": [
                    {"name": "stable", "model": "a", "weight": 1},
                    {"name": "canary", "model": "b", "weight": 0},
                ],
                "rollout": {"canary": "canary", "baseline": "stable", "steps": [10, 100]},
            }
        ]
    )
    state = ro.start(r.rollout, now=0.0)
    assert ro.weights(r.rollout, state, r.weights) == {"stable": 90, "canary": 10}


def test_a_rollout_whose_pair_weighs_nothing_is_refused():
    with pytest.raises(ConfigError, match="both weigh 0"):
        parse_routes(
            [
                {
                    "name": "zero",
                    "variants": [
                        {"name": "stable", "model": "a", "weight": 0},
                        {"name": "canary", "model": "b", "weight": 0},
                        {"name": "legacy", "model": "c", "weight": 100},
                    ],
                    "rollout": {"canary": "canary", "baseline": "stable", "steps": [10, 100]},
                }
            ]
        )


def test_the_state_round_trips_and_a_bad_one_is_refused():
    r = spec()
    state = ro.start(r.rollout, now=5.0)
    ro.tick(r.rollout, state, 65.0, GOOD, BASE)
    again = ro.RolloutState.from_state(state.to_state(), r.rollout)
    assert again == state
    good = state.to_state()
    for broken in (
        {},
        [],  # not a mapping at all
        {**good, "state": "exploded"},
        {**good, "step": 7},
        {**good, "step": float("inf")},  # 1e400 in the file: int() overflows
        {**good, "next_at": float("nan")},
    ):
        with pytest.raises(ValueError):
            ro.RolloutState.from_state(broken, r.rollout)


def test_the_output_psi_gate_compares_the_canarys_answers_with_the_baselines():
    from batchgate.core.routing import Gates, Rollout

    rollout = Rollout("canary", "stable", (50, 100), 1.0, 10, Gates(max_p99_ratio=1000, max_output_psi=0.2), "rollback")
    rng = np.random.default_rng(0)
    same = ro.Figures(200, outputs=rng.random((500, 3)))
    base = ro.Figures(200, outputs=rng.random((500, 3)))
    verdict = ro.judge(rollout, same, base)
    assert verdict.outcome == "pass" and verdict.figures["output_psi"] < 0.1
    moved = ro.Figures(200, outputs=rng.random((500, 3)) ** 3)  # answers pushed towards 0
    verdict = ro.judge(rollout, moved, base)
    assert verdict.outcome == "fail" and "output PSI" in verdict.reasons[0]
    few = ro.Figures(200, outputs=rng.random((20, 3)) ** 3)  # too few rows to judge: not judged
    assert "output_psi" not in ro.judge(rollout, few, base).figures
    off = Rollout("canary", "stable", (50, 100), 1.0, 10, Gates(max_p99_ratio=1000), "rollback")
    assert ro.judge(off, moved, base).outcome == "pass"


def test_the_output_psi_gate_fails_only_beyond_chance_and_judges_a_bounded_number_of_columns():
    """Two samples of 100 rows from one distribution have a PSI of about 0.18 over deciles by
    chance alone, and the gate took the largest over every column: an equal canary with 8 output
    columns failed max_output_psi 0.2 in about 9 intervals of 10. A wide answer (an image, an
    embedding) was judged column by column, all of them, on the event loop."""
    from batchgate.core.psi import MAX_PSI_COLUMNS, two_sample_psi
    from batchgate.core.routing import Gates, Rollout

    rollout = Rollout("canary", "stable", (50, 100), 1.0, 10, Gates(max_p99_ratio=1000, max_output_psi=0.2), "rollback")
    rng = np.random.default_rng(11)
    verdicts = [
        ro.judge(rollout, ro.Figures(200, outputs=rng.random((100, 8))), ro.Figures(200, outputs=rng.random((100, 8))))
        for _ in range(50)
    ]
    assert sum(v.figures["output_psi"] > 0.2 for v in verdicts) > 25  # what the gate used to fail on
    assert sum(v.outcome == "fail" for v in verdicts) <= 2
    moved = ro.judge(
        rollout, ro.Figures(200, outputs=rng.random((100, 8)) ** 4), ro.Figures(200, outputs=rng.random((100, 8)))
    )
    assert moved.outcome == "fail" and "chance allows at 100 and 100 rows" in moved.reasons[0], moved
    wide = rng.random((120, 50_000)).astype(np.float32)
    assert len(two_sample_psi(wide, rng.random((120, 50_000)))) == MAX_PSI_COLUMNS


def test_the_output_psi_gate_counts_nan_answers_as_a_bin_of_their_own():
    from batchgate.core.routing import Gates, Rollout

    rollout = Rollout("canary", "stable", (50, 100), 1.0, 10, Gates(max_p99_ratio=1000, max_output_psi=0.2), "rollback")
    rng = np.random.default_rng(1)
    base = ro.Figures(200, outputs=rng.random((500, 3)))
    for broken in (np.full((500, 3), np.nan), np.where(rng.random((500, 3)) < 0.5, np.nan, rng.random((500, 3)))):
        verdict = ro.judge(rollout, ro.Figures(200, outputs=broken), base)
        assert verdict.outcome == "fail" and "output PSI" in verdict.reasons[0]
    both = rng.random((500, 3))
    both[:50] = np.nan  # as many NaN answers on both sides: no drift
    base_nan = rng.random((500, 3))
    base_nan[:50] = np.nan
    assert ro.judge(rollout, ro.Figures(200, outputs=both), ro.Figures(200, outputs=base_nan)).outcome == "pass"


def test_a_canary_refusing_more_than_its_baseline_fails_the_error_gate():
    from batchgate.core.routing import Gates, Rollout

    rollout = Rollout(
        "canary", "stable", (50, 100), 1.0, 10, Gates(max_error_rate=0.01, max_p99_ratio=1000), "rollback"
    )
    verdict = ro.judge(rollout, ro.Figures(100, refused=100), ro.Figures(100))  # refuses everything
    assert verdict.outcome == "fail" and "refused" in verdict.reasons[0]
    verdict = ro.judge(rollout, ro.Figures(100, refused=30), ro.Figures(200, refused=60))  # as often as the baseline
    assert verdict.outcome == "pass" and verdict.figures["refused_excess"] == 0
    assert ro.judge(rollout, ro.Figures(100, refused=15), ro.Figures(100, refused=2)).outcome == "fail"
    # more than the baseline, by as much as chance makes of clients' bad values falling on either
    # side (a few dozen requests an interval: this rolled back an equal canary now and then)
    assert ro.judge(rollout, ro.Figures(100, refused=5), ro.Figures(100, refused=2)).outcome == "pass"
    assert ro.judge(rollout, ro.Figures(16, refused=4), ro.Figures(14, refused=2)).outcome == "pass"
    # refused requests neither make min_requests nor dilute the error rate (both did)
    assert ro.judge(rollout, ro.Figures(100, refused=100), ro.Figures(900, refused=900)).outcome == "wait"
    diluted = ro.judge(rollout, ro.Figures(1000, server_errors=8, refused=485), ro.Figures(1000, refused=485))
    assert diluted.outcome == "fail" and diluted.figures["error_rate"] == 8 / 515
    assert ro.judge(rollout, ro.Figures(12, refused=11), ro.Figures(14, refused=3)).outcome == "fail"
    # no baseline answers to compare with (a step of 100%): not judged
    assert ro.judge(rollout, ro.Figures(100, refused=20), ro.Figures()).outcome == "pass"
