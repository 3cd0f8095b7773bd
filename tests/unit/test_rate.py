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
