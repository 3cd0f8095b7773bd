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
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

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

    def fail_queued(self, error: GatewayError) -> int:
        """Answer every request still queued with ``error``, never executing it (its version is
        going away: the backend is about to close); those executing run on. How many it answered."""
        raise NotImplementedError


PUMP_BATCH = 32  # waiters dispatched in one callback before the loop gets a turn


class _Waiter:
    """A request waiting for an instance. ``taken`` is set, under the scheduler's lock, by
    whoever takes it out of the queue: a dispatcher (to run it, or to fail it for its deadline)
    or the waiter itself (cancelled, or its deadline passed)."""

    __slots__ = ("ticket", "future", "taken", "timer")

    def __init__(self, ticket: Ticket, future: asyncio.Future[Sequence[InferResponse | GatewayError]]):
        self.ticket = ticket
        self.future = future  # the results of its execution, or the error that ended its wait
        self.taken = False
        self.timer: asyncio.TimerHandle | None = None


# more(): called on an inference thread that has just finished one execution; the next
# (batch, done) for that thread to run at once, or None when nothing waits (or not chaining).
More = Callable[[], "tuple[list[Ticket], Done] | None"]
# execute_chained(batch, done, more): like Execute, and a thread that finishes ``batch`` calls
# ``more()`` for the next batch before handing the results back.
ExecuteChained = Callable[[list[Ticket], Done, More], None]


class PassThroughScheduler(_SchedulerBase):
    """No batching: each request executes alone, ``instances`` at a time, in arrival order.

    Queued work moves ahead of new reads: when an execution finishes, the next waiting request
    is dispatched in the same callback (not when its caller's task next runs), and with
    ``chain`` (an ``execute`` that takes ``more``) the inference thread that finished one request takes the next
    one itself, before the event loop has even heard of the first. A loop busy reading
    thousands of connections therefore cannot hold back a model that has work waiting; without
    this the model ran at most one request per loop turn."""

    def __init__(
        self,
        execute: Execute | ExecuteChained,
        instances: int = 1,
        max_queue_size: int = 0,
        clock: Clock = time.monotonic,
        name: str = "",
        refused: Refused | None = None,
        chain: bool = False,
    ):
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self._execute = cast(Execute, execute)
        self._chained_execute = cast(ExecuteChained, execute) if chain else None
        self._free = self._instances = instances
        # Waiting requests, oldest first. Inference threads take from it when chaining, so it
        # is read and changed under the lock (a few hundred nanoseconds, never contended long).
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()
        self._chained = 0  # executions a thread took on that the loop has not yet accounted for
        self._handing = False  # dispatching from _pump (re-entered by inline executions)
        self._pump_due = False  # a _pump is scheduled for the next loop turn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_queue = max_queue_size
        self._clock = clock
        self._name = name
        self._executing = 0
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain = DrainRate(clock)
        self._refused = refused or _ignore

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def queued_requests(self) -> int:
        """The client requests queued (a front worker's call counts as those it merged)."""
        with self._lock:
            return sum(w.ticket.request.weight for w in self._waiters)

    @property
    def max_queue_size(self) -> int:
        return self._max_queue

    @property
    def round_size(self) -> int:
        """Requests that one round of executions takes: one per instance."""
        return self._instances

    @property
    def drain_rate(self) -> DrainRate:
        return self._drain

    def oldest_age_s(self) -> float:
        """How long the longest-waiting queued request has waited (0 when none)."""
        with self._lock:
            oldest = min((w.ticket.request.arrival for w in self._waiters), default=None)
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    def _check_idle(self) -> None:
        if not self._waiters and self._executing == 0:
            self._idle.set()

    async def submit(self, ticket: Ticket) -> InferResponse:
        if self._closed:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"model '{self._name}' is shutting down")
        request = ticket.request
        deadline = request.deadline
        loop = self._loop
        if loop is None:  # (asyncio's lookup costs a getpid call a request)
            loop = self._loop = asyncio.get_running_loop()
        w = _Waiter(ticket, loop.create_future())
        if self._free and not self._waiters:  # fast path: an instance is idle and nobody is ahead
            if deadline is not None and self._clock() >= deadline:
                self._refused(EXPIRED)
                raise deadline_error(request)
            self._free -= 1
            w.taken = True
            self._dispatch(w)
        else:
            if self._max_queue and len(self._waiters) >= self._max_queue:
                self._refused(QUEUE_FULL)
                raise GatewayError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"model '{self._name}' queue is full: {self._max_queue} requests waiting (max_queue_size)",
                    retry_after_s=self._drain.seconds_to_drain(len(self._waiters)),
                )
            if deadline is not None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self._refused(EXPIRED)
                    raise deadline_error(request)
                w.timer = loop.call_later(remaining, self._expire, w)
            with self._lock:
                self._waiters.append(w)
            self._idle.clear()
        try:
            (result,) = await w.future
        except asyncio.CancelledError:
            # A caller that goes away while queued leaves the queue and never executes; one
            # whose request is executing leaves it to finish (the instance stays busy until done).
            self._leave(w)
            raise
        finally:
            if w.timer is not None:
                w.timer.cancel()
            # An exception from the future (a deadline passed, a cancellation) is kept by the
            # future, and its traceback holds this frame, which held the waiter and so the future:
            # a cycle that kept the request, and the shared-memory regions it named (open, their
            # memory held after being unregistered and deleted), until a full collection.
            del w
        if isinstance(result, GatewayError):
            try:
                raise result
            finally:
                del result  # (the same cycle: this frame's local and the error's traceback)
        return result

    def take_slot(self) -> bool:
        """Take an instance for work run outside the queue (a forwarded request), only when
        one is idle and nobody waits; the taker calls :meth:`give_slot` exactly once."""
        if self._closed or not self._free or self._waiters:
            return False
        self._free -= 1
        self._executing += 1
        self._idle.clear()
        return True

    def give_slot(self) -> None:
        """The instance :meth:`take_slot` took is free again: the oldest waiter gets it."""
        self._drain.done(1, bool(self._waiters))
        self._executing -= 1
        self._release()
        self._check_idle()

    def _leave(self, w: _Waiter) -> bool:
        """Take ``w`` out of the queue if nobody has taken it yet; whether it was still there."""
        with self._lock:
            if w.taken:
                return False
            w.taken = True
            self._waiters.remove(w)
        self._check_idle()
        return True

    def fail_queued(self, error: GatewayError) -> int:
        with self._lock:
            gone = list(self._waiters)
            self._waiters.clear()
            for w in gone:
                w.taken = True
        for w in gone:
            if not w.future.done():
                w.future.set_exception(error)
        self._check_idle()
        return len(gone)

    def _expire(self, w: _Waiter) -> None:
        """Its deadline passed while it waited (the timer set at submit)."""
        w.timer = None
        if self._leave(w):
            self._expired_when_taken(w)

    def _expired_when_taken(self, w: _Waiter) -> None:
        """``w`` was taken out of the queue with its deadline past: it never runs."""
        self._refused(EXPIRED)
        if not w.future.done():
            w.future.set_exception(deadline_error(w.ticket.request))
        self._check_idle()

    def _take(self) -> tuple[_Waiter | None, list[_Waiter]]:
        """The oldest waiter whose deadline has not passed (marked taken), and those taken
        because it had."""
        expired = []
        now = self._clock()
        with self._lock:
            waiters = self._waiters
            while waiters:
                w = waiters.popleft()
                w.taken = True
                d = w.ticket.request.deadline
                if d is not None and now >= d:
                    expired.append(w)
                    continue
                return w, expired
        return None, expired

    def _dispatch(self, w: _Waiter) -> None:
        self._executing += 1
        self._idle.clear()
        w.ticket.dispatched = self._clock()
        if self._chained_execute is not None:
            self._chained_execute([w.ticket], partial(self._finished, w), self._more)
        else:
            self._execute([w.ticket], partial(self._finished, w))

    def _release(self) -> None:
        """One instance is free: hand it to the oldest waiter, here and now."""
        self._free += 1
        if not self._handing and not self._pump_due:  # else a _pump in progress or due goes on
            self._pump()

    def _pump(self) -> None:
        """Dispatch waiters while instances are free, at most PUMP_BATCH in one go: inline
        executions finish inside this loop, and a long queue of them must not hold the event
        loop (the rest continue in the next loop turn)."""
        self._pump_due = False
        self._handing = True
        try:
            for _ in range(PUMP_BATCH):
                if not (self._free and self._waiters):
                    return
                w, expired = self._take()
                for e in expired:
                    self._expired_when_taken(e)
                if w is None:
                    return
                self._free -= 1
                self._dispatch(w)
            if self._free and self._waiters and self._loop is not None:
                self._pump_due = True
                self._loop.call_soon(self._pump)
        finally:
            self._handing = False

    def _more(self) -> tuple[list[Ticket], Done] | None:
        """On an inference thread that has just finished one request: the next one to run
        there at once (its instance stays taken), or None."""
        w, expired = self._take()
        loop = self._loop
        if loop is not None:
            for e in expired:
                loop.call_soon_threadsafe(self._expired_when_taken, e)
        if w is None:
            return None
        with self._lock:
            self._chained += 1
        w.ticket.dispatched = self._clock()
        return [w.ticket], partial(self._finished, w)

    def _finished(self, w: _Waiter, results: Results) -> None:
        handed_on = False
        if self._chained:  # a thread went straight on to a waiting request (it counted it first)
            with self._lock:
                handed_on = self._chained > 0
                if handed_on:
                    self._chained -= 1
        self._drain.done(1, handed_on or bool(self._waiters))
        if not handed_on:
            self._executing -= 1
            self._release()
        if not w.future.done():
            if isinstance(results, BaseException):
                w.future.set_result([GatewayError(ErrorCode.INTERNAL, f"model '{self._name}' failed: {results}")])
            else:
                w.future.set_result(results)
        self._check_idle()


class DrainRate:
    """How fast a scheduler gets through work when it has work waiting: completions per second
    of *busy* time (time during which something was queued), so a spike after a quiet spell
    is judged by the capacity measured under load, not by the low traffic before it.

    ``done(n, backlog)`` is called once per finished execution (n requests; ``backlog``: was
    anything still waiting; for the dynamic batcher, was every instance at work again at once).
    Figures decay by half every ``window_s`` of busy time."""

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
