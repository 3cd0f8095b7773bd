"""PerSecond (the one-second windows behind the reset-flood guard and the log line budgets) and
Pacer (the turns of overload refusals past their rate)."""

from __future__ import annotations

import pytest

from batchgate.core.rate import PerSecond


def test_past_the_limit_in_one_second_and_a_fresh_count_the_next():
    now = [100.0]
    window = PerSecond(3, clock=lambda: now[0])
    assert [window.over() for _ in range(5)] == [False, False, False, True, True]
    now[0] += 0.99
    assert window.over()  # still the same second
    now[0] += 0.02
    assert [window.over() for _ in range(4)] == [False, False, False, True]


def test_a_credit_takes_one_event_back_and_never_goes_below_none():
    now = [100.0]
    window = PerSecond(2, clock=lambda: now[0])
    window.credit()  # nothing counted yet: nothing to take back
    assert [window.over() for _ in range(2)] == [False, False]
    window.credit()
    assert window.over() is False  # 2 again, not 3
    assert window.over() is True


def test_a_line_budget_writes_its_limit_a_second_and_tells_how_many_were_left_out():
    from batchgate.core.rate import LineBudget

    now = [0.0]
    lines = LineBudget(2, clock=lambda: now[0])
    assert [lines.take() for _ in range(5)] == [0, 0, None, None, None]
    now[0] = 1.0
    assert lines.take() == 3 and lines.take() == 0 and lines.take() is None
    assert lines.dropped == 4  # all told, for the counter
    lines.limit = 0
    now[0] = 2.0
    assert lines.take() is None and lines.limit == 0


def test_a_pacer_gives_its_burst_at_once_then_one_turn_each_a_rate_apart():
    from batchgate.core.rate import Pacer

    now = [100.0]
    pacer = Pacer(1000, burst_s=0.005, clock=lambda: now[0])
    waits = [pacer.delay() for _ in range(10)]
    assert waits[:6] == pytest.approx([0.0] * 6, abs=1e-9)  # the burst (5 ms of turns), and the turn that is due now
    assert waits[6:] == pytest.approx([0.001, 0.002, 0.003, 0.004], abs=1e-9)  # then in line, a turn each 1 ms
    now[0] += 0.004  # time passes: the turns taken are behind, the line is shorter
    assert pacer.delay() == pytest.approx(0.001, abs=1e-9)
    now[0] += 1.0  # a quiet second: the bucket is full again, no more than its burst
    assert [pacer.delay() for _ in range(6)] == pytest.approx([0.0] * 6, abs=1e-9)
    assert pacer.delay() > 0


def test_turns_hold_a_retry_at_the_retries_rate_and_anything_else_at_the_refusals_rate():
    """core/rate.Turns: a refusal read within two writing turns and 0.25 s of its connection's
    last one (or hold's end) is a retry and waits for its turn at the retries' rate; one later by
    a third writing turn, or past the window, or on a connection never refused, takes only the
    refusals' rate."""
    from batchgate.core.rate import NEVER, Turns

    now = [10.0]
    turns = Turns(1_000_000, 10)  # (the refusals' rate never holds here)
    for p in (turns.refusals, turns.retries):
        p._clock = lambda: now[0]  # (sans-IO: the pacers' clock)
    assert turns.take(5, now[0], NEVER) == (0.0, False)
    waits = [turns.take(7, now[0], (5, now[0] - 0.1)) for _ in range(4)]  # two writing turns later
    assert [w[0] for w in waits] == pytest.approx([0.0, 0.0, 0.1, 0.2], abs=1e-9)  # the bucket's, then 0.1 s apart
    assert [w[1] for w in waits] == [False, False, True, True]  # (no wait: not the retries' rate's)
    assert turns.take(8, now[0], (5, now[0])) == (0.0, False)  # three writing turns later: at its own pace
    assert turns.take(6, now[0], (5, now[0] - 0.3)) == (0.0, False)  # past the window (a quiet loop)
    assert turns.take(6, now[0], (5, now[0] - 0.2))[1]  # within both: held at the retries' rate


def test_a_restart_backoff_climbs_while_lives_are_short_and_starts_over_after_a_healthy_one():
    """The drift detector's restarts: before, the step was chosen by its restarts all told, so after
    five crashes in any span of time (a week, say) every later restart waited the longest step."""
    from batchgate.core.rate import Backoff

    now = [0.0]
    b = Backoff((1.0, 2.0, 5.0), healthy_s=60.0, clock=lambda: now[0])
    waits = []
    for _ in range(4):  # each life ends within a second of its start
        now[0] += 1.0
        waits.append(b.delay())
        b.started()
    assert waits == [1.0, 2.0, 5.0, 5.0]
    now[0] += 3600.0  # a life of an hour: the next exit is a first one again
    assert b.delay() == 1.0
    b.started()
    now[0] += 59.0
    assert b.delay() == 2.0  # (59 s: not healthy yet)
    now[0] += 3600.0  # lives that end before they say they started, an hour after the last good one
    assert [b.delay() for _ in range(3)] == [5.0, 5.0, 5.0]  # (they were all "first exits": 1 s each)
