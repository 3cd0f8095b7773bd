"""Schedulers: the one place a request waits between validation and the backend.

A scheduler owns a bounded queue per model version and decides when and with
what company a request runs. It knows nothing of gRPC, HTTP or ONNX Runtime: it
is given ``execute(batch, done)`` and a clock.

This module holds the :class:`Ticket` of one submission, the base every scheduler
shares, and :class:`PassThroughScheduler` (each request runs on its own, at most
``instances`` at once, first come first served). The dynamic batcher
(``batching.py``) is the other scheduler: both offer ``submit``, ``queue_depth``,
``executing``, ``oldest_age_s``, ``drain`` and ``close``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from .errors import ErrorCode, GatewayError
from .signature import Checked
from .types import InferRequest, InferResponse


class Ticket:
    """One submission of a request: what the scheduler and the execution note about it.

    The request itself is immutable and may be submitted again (a shadow copy, a retry):
    each submission gets its own ticket, so nothing done to one is seen by another."""

    __slots__ = ("request", "checked", "dispatched", "execution")

    def __init__(self, request: InferRequest, checked: Checked):
        self.request = request
        self.checked = checked  # the signature check's result: feeds, outputs, rows
        self.dispatched = 0.0  # monotonic clock when the scheduler handed it to the backend
        self.execution: Any = None  # the running remote execution, which a caller can cancel

    @property
    def id(self) -> str:
        return self.request.id


# execute(batch, done): start executing ``batch`` and return at once; call
# ``done(results)`` on the event loop when the execution has finished, with one
# InferResponse or GatewayError per ticket, in order (or an exception for all).
# The scheduler keeps the instance busy until ``done``, whatever the callers do.
Results = Sequence[InferResponse | GatewayError] | BaseException
Done = Callable[[Results], None]
Execute = Callable[[list[Ticket], Done], None]
Clock = Callable[[], float]
# refused(reason): told of every request a scheduler turns away or drops unexecuted.
Refused = Callable[[str], None]
QUEUE_FULL = "queue_full"  # refused at once: the queue is at its bound
UNMEETABLE = "deadline_unmeetable"  # refused at once: the queue ahead outlasts the deadline
EXPIRED = "deadline_expired"  # its deadline passed while it waited
QUEUE_TIMEOUT = "queue_timeout"  # the queue policy's timeout (REJECT) passed while it waited


def _ignore(_reason: str) -> None:
    pass


def deadline_error(request: InferRequest) -> GatewayError:
    rid = f"[request id: {request.id}] " if request.id else ""
    return GatewayError(
        ErrorCode.DEADLINE_EXCEEDED,
        f"{rid}deadline exceeded while queued for model '{request.model_name}'; it was not executed",
    )


class _SchedulerBase:
    """What every scheduler keeps alike: closing, draining, and the count of executing requests
    (requests, not batches)."""

    _closed: bool
    _executing: int
    _idle: asyncio.Event

    @property
    def executing(self) -> int:
        return self._executing

    def close(self) -> None:
        self._closed = True

    async def drain(self) -> None:
        await self._idle.wait()


class PassThroughScheduler(_SchedulerBase):
    """No batching: each request executes alone, ``instances`` at a time, in arrival order."""

    def __init__(
        self,
        execute: Execute,
        instances: int = 1,
        max_queue_size: int = 0,
        clock: Clock = time.monotonic,
        name: str = "",
        refused: Refused | None = None,
    ):
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self._execute = execute
        self._free = instances
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._arrivals: dict[asyncio.Future[None], float] = {}  # waiting slot -> its request's arrival
        self._max_queue = max_queue_size
        self._clock = clock
        self._name = name
        self._waiting = 0
        self._executing = 0
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain = DrainRate(clock)
        self._refused = refused or _ignore

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def max_queue_size(self) -> int:
        return self._max_queue

    @property
    def drain_rate(self) -> DrainRate:
        return self._drain

    def oldest_age_s(self) -> float:
        """How long the longest-waiting queued request has waited (0 when none)."""
        oldest = min(list(self._arrivals.values()), default=None)
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    def _check_idle(self) -> None:
        if self._waiting == 0 and self._executing == 0:
            self._idle.set()

    def _hand_slot(self) -> None:
        """Give a free instance to the oldest waiter still waiting, else mark it free."""
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return
        self._free += 1

    async def submit(self, ticket: Ticket) -> InferResponse:
        if self._closed:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"model '{self._name}' is shutting down")
        request = ticket.request
        deadline = request.deadline
        waiters = self._waiters
        while waiters and waiters[0].done():
            waiters.popleft()
        if self._free and not waiters:  # fast path: an instance is idle and nobody is ahead
            if deadline is not None and self._clock() >= deadline:
                raise deadline_error(request)
            self._free -= 1
        else:
            if self._max_queue and self._waiting >= self._max_queue:
                self._refused(QUEUE_FULL)
                raise GatewayError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"model '{self._name}' queue is full: {self._max_queue} requests waiting (max_queue_size)",
                    retry_after_s=self._drain.seconds_to_drain(self._waiting),
                )
            await self._wait_for_slot(request)
        self._executing += 1
        self._idle.clear()
        ticket.dispatched = self._clock()
        out: asyncio.Future[Sequence[InferResponse | GatewayError]] = asyncio.get_running_loop().create_future()
        self._execute([ticket], partial(self._finished, out))
        # A caller that goes away cancels only ``out``; the instance stays busy until done.
        (result,) = await out
        if isinstance(result, GatewayError):
            raise result
        return result

    async def _wait_for_slot(self, request: InferRequest) -> None:
        deadline = request.deadline
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        self._arrivals[slot] = request.arrival
        self._waiting += 1
        self._idle.clear()
        try:
            if deadline is None:
                await slot
            else:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise deadline_error(request)
                try:
                    async with asyncio.timeout(remaining):
                        await slot
                except TimeoutError:
                    self._refused(EXPIRED)
                    raise deadline_error(request) from None
                if self._clock() >= deadline:  # the instance came, but too late
                    self._refused(EXPIRED)
                    raise deadline_error(request)
        except BaseException:
            self._arrivals.pop(slot, None)
            if slot.done() and not slot.cancelled():
                self._hand_slot()  # it was handed to us as we left: pass it on
            else:
                slot.cancel()
            self._waiting -= 1
            self._check_idle()
            raise
        self._arrivals.pop(slot, None)
        self._waiting -= 1

    def _finished(self, out: asyncio.Future[Sequence[InferResponse | GatewayError]], results: Results) -> None:
        self._executing -= 1
        self._drain.done(1, self._waiting > 0)
        self._hand_slot()
        if not out.done():
            if isinstance(results, BaseException):
                out.set_result([GatewayError(ErrorCode.INTERNAL, f"model '{self._name}' failed: {results}")])
            else:
                out.set_result(results)
        self._check_idle()


class DrainRate:
    """How fast a scheduler gets through work when it has work waiting: completions per second
    of *busy* time (time during which something was queued), so a spike after a quiet spell
    is judged by the capacity measured under load, not by the low traffic before it.

    ``done(n, backlog)`` is called once per finished execution (n requests; ``backlog``: was
    anything still waiting). Figures decay by half every ``window_s`` of busy time."""

    __slots__ = ("_clock", "_window", "_last", "_busy", "_busy_s", "_busy_n", "completed")

    def __init__(self, clock: Clock, window_s: float = 2.0):
        self._clock = clock
        self._window = window_s
        self._last = clock()
        self._busy = False  # whether work was waiting at the last completion
        self._busy_s = 0.0
        self._busy_n = 0.0
        self.completed = 0

    def done(self, n: int, backlog: bool) -> None:
        now = self._clock()
        if self._busy:  # work waited all along since the last completion: that time was busy
            self._busy_s += now - self._last
            self._busy_n += n
            if self._busy_s > self._window:
                self._busy_s *= 0.5
                self._busy_n *= 0.5
        self._last = now
        self._busy = backlog
        self.completed += n

    def rate(self) -> float | None:
        """Requests per second while busy; None until enough busy time was seen to judge."""
        if self._busy_s < 0.02 or self._busy_n < 1:
            return None
        return self._busy_n / self._busy_s

    def seconds_to_drain(self, depth: int) -> float:
        rate = self.rate()
        if rate is None:
            return 1.0
        return max(0.001, depth / rate)
