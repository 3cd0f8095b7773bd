"""Admission: how much work the process takes on, decided before a request is decoded.

A request is admitted (or refused) from what is known before its tensors are: the model it
names, and the state of that model's queue. Admitted work is bounded four ways, each a
setting, and each refusal is RESOURCE_EXHAUSTED / 429 with a Retry-After and the setting
named at the end of the message (so it is counted under that reason):

- ``max_inflight_requests``: requests admitted and not yet answered, all models together;
- ``max_queue_size``: a model version's admitted requests not yet executing (its queue, plus
  requests still being read or decoded on their way to it);
- ``max_queue_wait_ms``: the wait that queue is expected to impose on one more request, judged
  from the rate at which the version gets through work while it has work waiting; a hard
  ceiling, which a burst may reach;
- ``queue_target_ms``: a *standing* queue. A burst may queue up to the ceiling and drain, but
  once the expected wait has stayed above the target for a whole ``queue_interval_ms`` the
  version is overloaded, and from then on a request is admitted only while the expected wait is
  within the target, until it has stayed within it for an interval again, time the version spent
  with no work at all included (CoDel's rule, Nichols and Jacobson: a delay that persists for an interval is a
  standing queue, not a burst, applied at the door instead of at the head of the queue). Under
  sustained overload answers then wait about the target while the model stays busy, and the
  excess is refused at once. The target is never less than one round of executions (full
  batches on every instance), so a model that batches, or a slow one, keeps the queue that keeps
  it busy; nor less than what lately kept the version from running dry between the event loop's
  reads (``Capacity.floor``: a queue that empties while shedding left the model idle until the
  loop came back to read, so the wait admitted while shedding goes up, and it comes back down
  through intervals in which the queue did not empty).

The expected wait is the requests admitted and not yet executing (queued, or still being read
and decoded) over the version's capacity: the most answers per second it has given in an
interval of ``queue_interval_ms`` while work was waiting (decaying slowly). Its capacity, not
its current rate: under overload the event loop's time goes partly to refusals, and judging by
the current rate would refuse more, which lowers the rate again, down to nothing.

Refusing here costs a dictionary lookup and a few comparisons; the body is never read (HTTP)
and no tensor is decoded (gRPC), so under overload a refusal is far cheaper than an answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.errors import ErrorCode, GatewayError

if TYPE_CHECKING:
    from ..model import ModelVersion


# Reasons in batchgate_refusals_total (with the scheduler's queue_full and deadline reasons).
INFLIGHT_LIMIT = "inflight_limit"
QUEUE_FULL = "queue_full"
QUEUE_WAIT = "queue_wait"
QUEUE_TARGET = "queue_target"

_monotonic = time.monotonic
FLOOR_GROWTH = 1.25  # the shedding's floor, each time the queue runs dry while shedding
FLOOR_DECAY = 0.95  # the floor, each interval in which it did not


class Capacity:
    """One version's capacity (answers per second at its busiest) and its standing-queue state
    under the ``queue_target_ms`` rule (see the module text)."""

    __slots__ = ("peak", "answered", "window_end", "shedding", "since", "message", "floor", "emptied")

    def __init__(self) -> None:
        self.peak = 0.0  # answers per second in the busiest recent interval; 0 = not yet measured
        self.answered = 0  # answers in the current interval
        self.window_end = 0.0
        self.shedding = False  # overloaded: admit only within the target
        self.since: float | None = None  # when the expected wait last crossed the target (either way)
        self.message: tuple[int, GatewayError] | None = None  # the refusal and the target in its words (ms)
        # The least wait admitted while shedding that keeps the version from running dry between
        # the event loop's reads (seconds; see Admission.release): raised when the queue empties
        # while shedding (once an interval at most), decayed through every interval of time in
        # which it did not, idle time included.
        self.floor = 0.0
        self.emptied = False  # the queue emptied while shedding in the current interval

    def starved(self, target: float, ceiling: float) -> None:
        """The queue emptied while shedding: admitting ``target`` of work was too little to
        last until the loop read the next requests. Raised once an interval, so a run of drains
        in one interval (or the last requests draining when the load stops) counts once."""
        if self.emptied:
            return
        self.emptied = True
        self.floor = min(ceiling, max(self.floor, target) * FLOOR_GROWTH)

    def answer(self, now: float, interval: float, backlog: bool) -> None:
        """One more answer; at an interval's end, the capacity from it if work was waiting."""
        self.answered += 1
        if now < self.window_end:
            return
        if self.window_end and backlog:
            rate = self.answered / (interval + now - self.window_end)
            # The busiest interval sets it; it decays by half a percent per busy interval, so a
            # version that got slower is judged by what it does now within seconds.
            self.peak = max(rate, self.peak * 0.995)
        if self.floor:
            # one decay for every interval of time since the last window ended (a version idle
            # for seconds comes back with its floor gone), but the one in which it ran dry
            periods = 0 if self.emptied else 1
            if self.window_end:
                periods += int((now - self.window_end) / interval)
            self.floor = self.floor * FLOOR_DECAY**periods if periods < 1000 else 0.0
        self.emptied = False
        self.answered = 0
        self.window_end = now + interval


class Held(GatewayError):
    """An overload refusal not counted (:meth:`Admission.admit` with ``count`` False): the
    request may wait and be judged again."""


class Admission:
    __slots__ = (
        "max_inflight",
        "max_wait_s",
        "target_s",
        "interval_s",
        "inflight",
        "_clock",
        "on_idle",
        "last_refusal",
    )

    def __init__(
        self,
        max_inflight: int,
        max_queue_wait_s: float,
        queue_target_s: float = 0.0,
        queue_interval_s: float = 0.1,
        clock=_monotonic,
    ):
        self.max_inflight = max_inflight
        self.max_wait_s = max_queue_wait_s  # 0 = no bound on the expected wait
        self.target_s = queue_target_s  # 0 = no standing-queue rule
        self.interval_s = queue_interval_s
        self.inflight = 0  # admitted and not yet released, all versions together
        self._clock = clock
        self.on_idle: Callable[[], None] | None = None  # called when the last request in flight is released
        self.last_refusal = float("-inf")  # when a request was last refused (see ``shedding``)

    def admit(self, version: ModelVersion, count: bool = True) -> None:
        """Count one request in on ``version``, or raise RESOURCE_EXHAUSTED. Every admitted
        request must be released exactly once (:meth:`release`), whatever becomes of it.
        ``count`` False: a refusal is raised as :class:`Held` and counted nowhere (a caller that
        waits for its own earlier requests and asks again, a gRPC stream's)."""
        refused = self.refusal(version, count)
        if refused is not None:  # (one of its own: the refusal may be one object kept and returned again)
            raise (GatewayError if count else Held)(refused.code, refused.message, refused.retry_after_s)
        self.take(version)

    def take(self, version: ModelVersion) -> None:
        """Count in one request that :meth:`refusal` just found admissible (nothing judged
        again); released as :meth:`admit`'s."""
        version.admitted += 1
        self.inflight += 1

    def shedding(self, within_s: float = 1.0) -> bool:
        """Whether a request was refused in the last ``within_s`` seconds: only then is a refusal
        judged before a request is parsed (``DataPlane.quick_refusal``), so that an admitted
        request never pays for the check twice while nothing is refused."""
        return self._clock() - self.last_refusal < within_s

    def refusal(self, version: ModelVersion, count: bool = True) -> GatewayError | None:
        """The refusal of one more request on ``version`` (counted by reason), or None when it
        would be admitted; nothing is admitted here. Returned, not raised: the fast refusal
        (``DataPlane.quick_refusal``) answers it without an exception."""
        refused = self._refusal(version)
        if refused is None:
            return None
        reason, error = refused
        if count:
            version.metrics.refused(reason)
            self.last_refusal = self._clock()
        return error

    def _refusal(self, version: ModelVersion) -> tuple[str, GatewayError] | None:
        """The reason and the refusal of one more request on ``version``, nothing counted."""
        if self.inflight >= self.max_inflight:
            return INFLIGHT_LIMIT, GatewayError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the server is at its limit of {self.max_inflight} requests in flight; "
                "retry later or on another replica (max_inflight_requests)",
                retry_after_s=1.0,
            )
        sched = version.scheduler
        waiting = version.admitted - sched.executing
        if waiting > 0:
            bound = sched.max_queue_size
            if bound and waiting >= bound:
                return QUEUE_FULL, GatewayError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"model '{version.name}' queue is full: {bound} requests waiting (max_queue_size)",
                    retry_after_s=sched.drain_rate.seconds_to_drain(waiting),
                )
            rate = sched.drain_rate.rate()
            if rate is not None and self.max_wait_s and waiting / rate > self.max_wait_s:
                wait = waiting / rate
                return QUEUE_WAIT, GatewayError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"model '{version.name}' has about {wait * 1000:.0f} ms of work queued, more than "
                    f"the {self.max_wait_s * 1000:.0f} ms a request may be made to wait (max_queue_wait_ms)",
                    retry_after_s=wait - self.max_wait_s,
                )
        cap = version.capacity
        if (
            self.target_s
            and cap.peak
            and (waiting > 0 or cap.shedding or cap.since is not None)
            and self._standing(cap, max(0, waiting) / cap.peak, target := self._target(cap, sched.round_size))
        ):
            # The target in force, which the floor or a round of executions may have raised above
            # the setting; the words are made again only when its whole milliseconds change.
            target_ms = round(target * 1000)
            message = cap.message
            if message is None or message[0] != target_ms:
                setting = round(self.target_s * 1000)
                raised = "" if target_ms == setting else f" (the {setting} ms set, raised to keep the model busy)"
                text = (
                    f"model '{version.name}' is overloaded: its queue has held more than {target_ms} ms of "
                    f"work{raised} for {self.interval_s * 1000:.0f} ms; retry later or on another replica "
                    "(queue_target_ms)"
                )
                # (the refusal itself made once too: under overload most requests get it)
                message = cap.message = (target_ms, GatewayError(ErrorCode.RESOURCE_EXHAUSTED, text, retry_after_s=1.0))
            return QUEUE_TARGET, message[1]
        return None

    def _target(self, cap: Capacity, round_size: int) -> float:
        """The target: the setting, at least one round of executions, and while shedding at
        least what kept the version from running dry lately (``Capacity.floor``; the onset of
        shedding is judged without it)."""
        target = max(self.target_s, round_size / cap.peak)
        return max(target, cap.floor) if cap.shedding else target

    def _standing(self, cap: Capacity, wait: float, target: float) -> bool:
        """Whether to refuse one more request whose expected wait is ``wait``."""
        above = wait > target
        if above == cap.shedding:  # what is seen agrees with the state
            cap.since = None
        else:  # a crossing: the state follows once it has lasted a whole interval
            now = self._clock()
            if cap.since is None:
                cap.since = now
            elif now - cap.since >= self.interval_s:
                cap.shedding, cap.since = above, None
        return cap.shedding and above  # overloaded: admitted only within the target

    def move(self, old: ModelVersion, new: ModelVersion) -> None:
        """Move one admitted request from ``old`` to ``new`` (a route's variant chosen after
        decoding): judged on ``new``'s queue as a new arrival, without counting twice against
        the process's bound, and without counting as an answer of ``old``. Raises as
        :meth:`admit` does; then the request stays admitted on ``old``."""
        self.inflight -= 1
        old.admitted -= 1
        try:
            self.admit(new)
        except GatewayError:
            old.admitted += 1
            self.inflight += 1
            raise

    def release(self, version: ModelVersion) -> None:
        version.admitted -= 1
        self.inflight -= 1
        if not self.inflight and self.on_idle is not None:  # shadow copies wait for this
            self.on_idle()
        if self.target_s:
            cap = version.capacity
            now = self._clock()
            if not version.admitted and cap.shedding:
                # The version ran out of work while shedding. Its wait is within the target from
                # now on, and the recovery's interval counts from here, idle time included:
                # synchronised clients whose bursts drain before the next one comes an interval
                # later find it recovered, each burst a burst again, while a version that empties
                # its queue for a moment under sustained overload (arrivals milliseconds apart)
                # stays shedding (ending the shedding at once here let each such moment admit a
                # whole interval of overload: queues of 150-280 requests, a 0.1-0.2 s tail). And
                # what it admits while shedding was too little to last until the event loop read
                # more: the floor of the wait it admits goes up (on HTTP the loop's turns outlast
                # 20 ms of work, and the model sat idle between them).
                if cap.since is None:
                    cap.since = now
                if cap.peak:
                    cap.starved(self._target(cap, version.scheduler.round_size), self.max_wait_s or 1.0)
            cap.answer(now, self.interval_s, version.admitted > version.scheduler.executing)
