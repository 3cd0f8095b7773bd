"""The process's own stalls, as histograms: how late the event loop runs (a request that arrives
waits at least that long before it is read, whatever admission decides) and how long the cyclic
garbage collector stops everything.

The loop's lateness is a timer due every ``LOOP_LAG_PERIOD_S``: the time between when it was
due and when it ran is what any callback ready at that moment waited (the loop's turns, the
inference threads' share of the core, the collector). Ten wake-ups a second cost nothing a
request would notice; the timer's resolution is the loop's (about a millisecond with uvloop).
Collections are timed by ``gc.callbacks`` (two calls per collection).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from .families import STALL_BUCKETS_S
from .metrics import Histogram

LOOP_LAG_PERIOD_S = 0.1


class RuntimeStalls:
    """The loop-lag histogram and one collection-pause histogram per generation, with what keeps
    them: :meth:`start` on the serving loop, :meth:`stop` when it stops (idempotent)."""

    def __init__(self) -> None:
        self.loop_lag = Histogram(STALL_BUCKETS_S)
        self.gc_pauses = {generation: Histogram(STALL_BUCKETS_S) for generation in (0, 1, 2)}
        self._task: asyncio.Task | None = None
        self._gc_started = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        """The loop's timer, with the collector's callback registered for as long as it runs
        (removed however it ends: cancelled, or closed with its loop unstopped)."""
        loop = asyncio.get_running_loop()
        lag = self.loop_lag
        gc.callbacks.append(self._on_gc)
        try:
            while True:
                due = loop.time() + LOOP_LAG_PERIOD_S
                await asyncio.sleep(LOOP_LAG_PERIOD_S)
                lag.observe(max(0.0, loop.time() - due))
        finally:
            if self._on_gc in gc.callbacks:
                gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        started, self._gc_started = self._gc_started, 0.0  # (a stop without its start: not timed)
        pauses = self.gc_pauses.get(info.get("generation", -1))
        if pauses is not None and started:
            pauses.observe(time.perf_counter() - started)
