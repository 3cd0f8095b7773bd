"""Events counted over one-second windows (refusal budgets, reset floods): sans-IO, clock injected."""

from __future__ import annotations

import time
from collections.abc import Callable


class PerSecond:
    """How many events came since the current second began; :meth:`over` counts one more and
    says whether the second's ``limit`` is passed."""

    __slots__ = ("limit", "_clock", "_start", "_count")

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self._clock = clock
        self._start = 0.0
        self._count = 0

    def over(self) -> bool:
        now = self._clock()
        if now - self._start >= 1.0:
            self._start, self._count = now, 0
        self._count += 1
        return self._count > self.limit

    def credit(self) -> None:
        """Take one event back from the current second (never below none)."""
        if self._count > 0:
            self._count -= 1


class LineBudget:
    """Log lines of one kind, at most ``limit`` a second: :meth:`take` says whether one more may
    be written, and how many were left out since the last one written (to say so in it)."""

    __slots__ = ("_rate", "_left_out")

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic):
        self._rate = PerSecond(limit, clock)
        self._left_out = 0

    @property
    def limit(self) -> int:
        return self._rate.limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._rate.limit = value

    def take(self) -> int | None:
        """None when this second's lines are spent (this one is counted as left out); else the
        number left out before it."""
        if self._rate.over():
            self._left_out += 1
            return None
        left_out, self._left_out = self._left_out, 0
        return left_out
