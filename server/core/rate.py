"""Events counted over one-second windows (reset floods, log lines) and refusals paced in turns
(overload backpressure): sans-IO, clock injected."""

from __future__ import annotations

import math
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

    __slots__ = ("_rate", "_left_out", "dropped")

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic):
        self._rate = PerSecond(limit, clock)
        self._left_out = 0
        self.dropped = 0  # lines left out, all told (a counter's value)

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
            self.dropped += 1
            return None
        left_out, self._left_out = self._left_out, 0
        return left_out


class Pacer:
    """Overload refusals paid for in turns, ``rate`` turns a second (a token bucket kept as the
    time its next turn is free).

    :meth:`delay` takes a turn: 0 while the bucket (``burst_s`` seconds of turns) holds one,
    else the seconds until the turn comes. A connection whose refusal got a delay is not read
    until then: the refusals that reach the core stay at about ``rate`` a second however many
    clients retry at once, and a held connection waits only for the turns taken before its own
    (about the held connections over ``rate``), not for a fixed pause."""

    __slots__ = ("rate", "_burst", "_clock", "_next")

    def __init__(self, rate: float, burst_s: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self._burst = burst_s
        self._clock = clock
        self._next = float("-inf")  # when the next turn is free

    def delay(self) -> float:
        now = self._clock()
        turn = max(self._next, now - self._burst)
        self._next = turn + 1.0 / self.rate
        return turn - now if turn > now else 0.0


# A connection's overload refusal is a *retry* when its request was read within RETRY_ROUNDS of
# the event loop's writing turns and RETRY_WINDOW_S after that connection's last overload refusal
# went out, or after its hold ended: its client sent it again at once, as a closed loop does. The
# refusal goes out at the end of its turn, the client's next request arrives during the next and
# is read by the one after; a client back at its own pace is read turns later (at 3x capacity the
# loop turns every 10-20 ms on the 2-core VM, and an open-loop client of bench/overload.py asks
# every ~140 ms). A quiet loop has few writing turns: the window bounds the rule in time.
RETRY_ROUNDS = 2
RETRY_WINDOW_S = 0.25
NEVER = (-RETRY_ROUNDS - 1, float("-inf"))  # (writing turn, loop time) of a connection never refused


class Turns:
    """The overload refusals' turns of one listener: each refusal takes one at ``refusals_per_s``,
    a retry one at ``retries_per_s`` as well, and its connection waits for the later."""

    __slots__ = ("refusals", "retries")

    def __init__(self, refusals_per_s: float, retries_per_s: float):
        self.refusals = Pacer(refusals_per_s)
        self.retries = Pacer(retries_per_s)

    def take(self, rounds: int, now: float, last: tuple[int, float]) -> tuple[float, bool]:
        """The turn of a refusal read at writing turn ``rounds`` and loop time ``now`` on a
        connection whose last refusal, or hold's end, was at ``last`` (``NEVER``): the seconds to
        leave the connection unread (0: not at all), and whether the retries' rate set them."""
        wait = self.refusals.delay()
        if rounds - last[0] <= RETRY_ROUNDS and now - last[1] <= RETRY_WINDOW_S:
            again = self.retries.delay()
            if again > wait:
                return again, True
        return wait, False


class Backoff:
    """The wait before a process that exited is started again: ``steps`` in turn while it keeps
    exiting soon after it started, back to the first once a life has lasted ``healthy_s`` (a
    process that crashed a few times in a week must not wait the longest step for good)."""

    __slots__ = ("steps", "healthy_s", "_clock", "_started", "_failed")

    def __init__(self, steps: tuple[float, ...], healthy_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.steps = steps
        self.healthy_s = healthy_s
        self._clock = clock
        self._started = clock()
        self._failed = 0  # exits in a row, each before healthy_s

    def started(self) -> None:
        """A new life began (its process says it is up)."""
        self._started = self._clock()

    def delay(self) -> float:
        """The process exited: seconds to wait before starting it again."""
        if self._clock() - self._started >= self.healthy_s:
            self._failed = 0
        wait = self.steps[min(self._failed, len(self.steps) - 1)]
        self._failed += 1
        # (a life that ends before it says it started was no life: judged from the next start)
        self._started = math.inf
        return wait
