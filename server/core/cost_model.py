"""What a model's batches cost, learned from its executions, for the dynamic batcher's admission
of requests with deadlines (``batching.py``)."""

from __future__ import annotations

import math
from collections import deque

RECENT = 8  # executions of one batch size the lower bound looks at
PROBE_S = 1.0  # with no execution for this long, one request a period goes in whatever the estimate


class CostModel:
    """Execution time by batch size, learned online: a moving average per size seen (the
    expected time) and the last :data:`RECENT` executions (their least, a lower bound)."""

    def __init__(self, weight: float = 0.2):
        self._by_rows: dict[int, float] = {}
        self._recent: dict[int, deque[float]] = {}
        self._least: dict[int, float] = {}
        self._w = weight
        self._last_at = -float("inf")  # when an execution last ended, or a probe went in

    def known(self) -> bool:
        return bool(self._by_rows)

    def observe(self, rows: int, seconds: float, now: float) -> None:
        old = self._by_rows.get(rows)
        self._by_rows[rows] = seconds if old is None else old + (seconds - old) * self._w
        recent = self._recent.get(rows)
        if recent is None:
            recent = self._recent[rows] = deque(maxlen=RECENT)
        recent.append(seconds)
        self._least[rows] = min(recent)
        self._last_at = now

    def probe(self, now: float) -> bool:
        """Whether a request the estimates would refuse goes in anyway, to be timed: a refused
        request is never timed, so an estimate nothing refreshes (a slow first execution, a
        pause) refused every request with a short deadline for ever. At most one a
        :data:`PROBE_S`, and only while nothing has executed for as long."""
        if now - self._last_at < PROBE_S:
            return False
        self._last_at = now
        return True

    def seconds(self, rows: int) -> float:
        """The time of a batch of ``rows``: the nearest size measured at or above it, else
        the largest measured, scaled up in proportion."""
        sizes = self._by_rows
        if rows in sizes:
            return sizes[rows]
        above = [k for k in sizes if k >= rows]
        if above:
            return sizes[min(above)]
        k = max(sizes)
        return sizes[k] * rows / k

    def at_least(self, rows: int) -> float:
        """A lower bound on the time of a batch of ``rows``, from the least of each size's recent
        executions (one slow execution does not refuse requests until many fast ones outweigh
        it): a batch takes no less than a smaller one (the nearest size measured at or below
        it), nor less per row than a larger one (the smallest size measured above it, scaled
        down in proportion). Nor more than any size at or above it took: a slow execution of a
        small batch (a cold start) must not outweigh larger batches timed fast since, or a lone
        request is refused where one with requests queued ahead is admitted."""
        sizes = self._least
        below = [k for k in sizes if k <= rows]
        if below:
            cap = min((t for k, t in sizes.items() if k >= rows), default=math.inf)
            return min(sizes[max(below)], cap)
        k = min(sizes)
        return sizes[k] * rows / k
