"""The process's bound on answer bytes its clients have not taken (byte_budget.UnsentAnswers)."""

from __future__ import annotations

from batchgate.transport.byte_budget import UnsentAnswers


class Conn:
    def __init__(self, name: str, evicted: list[str]):
        self.name, self.evicted = name, evicted

    def evict_unsent(self) -> None:
        self.evicted.append(self.name)


def test_counts_follow_each_holder_and_the_largest_goes_first_past_the_limit():
    evicted: list[str] = []
    b = UnsentAnswers(100)
    a, c, d = (Conn(n, evicted) for n in "acd")
    b.hold(a, 40)
    b.hold(c, 30)
    b.hold(a, 50)  # a's figure is replaced, not added to
    assert b.total == 80 and evicted == []
    b.hold(d, 45)  # 125: a (50) goes; 75 left
    assert evicted == ["a"] and b.total == 75 and a not in b.held
    b.hold(c, 90)  # 135: c (90) goes, then d (45) fits
    assert evicted == ["a", "c"] and b.total == 45
    b.hold(d, 0)
    assert b.total == 0 and not b.held
    b.release(d)  # (twice is harmless)
    assert b.total == 0 and b.evicted == 2


def test_one_holder_alone_past_the_limit_goes():
    evicted: list[str] = []
    b = UnsentAnswers(10)
    b.hold(Conn("x", evicted), 11)
    assert evicted == ["x"] and b.total == 0
