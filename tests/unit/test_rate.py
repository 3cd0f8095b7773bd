"""PerSecond: the one-second event windows behind the refusal budgets and the reset-flood guard."""

from __future__ import annotations

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
    lines.limit = 0
    now[0] = 2.0
    assert lines.take() is None and lines.limit == 0
