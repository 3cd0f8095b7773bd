"""The dynamic batcher: requests queued for one model version join batches.

Triton's semantics (``dynamic_batching`` in ``config.pbtxt``): batches up to
``max_batch_size`` rows; a batch goes at once when it meets a preferred size
exactly, or reaches or passes the largest preferred size (max_batch_size when none
is given; cut before the request that would take it past that size, even when the
queue holds a full max_batch_size), else when the oldest request in it has waited
``max_queue_delay_microseconds`` (an absolute deadline on an injectable monotonic
clock), or sooner when a member's own deadline (its gRPC deadline or V2 ``timeout``) would
otherwise pass before the batch could finish; requests whose non-batch shapes differ never share a batch; at most
``instances`` batches execute at once, and the next batch forms meanwhile.

Beside Triton's policy, a work-conserving one: an idle instance takes whatever is
queued at once, so batches grow only while every instance is busy.

Within the queue, higher priority levels go first; within a level, earlier
deadlines go first, then arrival order. A request whose deadline passes while it
waits is answered DEADLINE_EXCEEDED and never executed; a caller that goes away
leaves the queue. Pure asyncio: no gRPC, HTTP or ONNX Runtime here.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left, insort
from collections import deque
from functools import partial

import numpy as np

from .batcher_config import WORK_CONSERVING, BatcherConfig
from .cost_model import CostModel
from .errors import ErrorCode, GatewayError, invalid
from .scheduler import (
    EXPIRED,
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    UNMEETABLE,
    Clock,
    DrainRate,
    Execute,
    Refused,
    Results,
    Ticket,
    _ignore,
    _SchedulerBase,
    deadline_error,
)
from .types import InferRequest, InferResponse

# What requests must share to share a batch: (input name, datatype, non-batch dims) per input.
ShapeKey = tuple[tuple[str, str, tuple[int, ...]], ...]
# A queued entry's place within its priority level: (0, or 1 once delayed by the queue policy;
# its deadline, inf when none; its submission number).
Order = tuple[int, float, int]
Answer = InferResponse | GatewayError
MAX_COST_SHAPES = 256  # shapes whose batch costs are learned at once (past it, learning starts again)


# ------------------------------------------------------------------ merge and split (pure)
def merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack the inputs of several requests along the batch dimension, in order."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def check_rows(arrays: list[np.ndarray], total: int) -> None:
    """Each batched output has ``total`` rows, as many as the batch sent (ValueError if not)."""
    for a in arrays:
        if a.shape[:1] != (total,):
            raise ValueError(f"an output has {a.shape[0] if a.ndim else 'no'} rows, expected {total}")


def split(arrays: list[np.ndarray], rows: list[int]) -> list[list[np.ndarray]]:
    """Cut each batched output back into the callers' rows, in order: caller i gets
    rows[sum(rows[:i]) : sum(rows[:i+1])] of every output."""
    check_rows(arrays, sum(rows))
    out, start = [], 0
    for r in rows:
        out.append([a[start : start + r] for a in arrays])
        start += r
    return out


def shape_key(request: InferRequest) -> ShapeKey:
    """Requests may share a batch only if this is equal: the same inputs, datatypes and
    non-batch dimensions."""
    return tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in request.inputs))


class _Entry:
    __slots__ = (
        "ticket",
        "request",
        "rows",
        "key",
        "shape",
        "level",
        "deadline",
        "soft_deadline",
        "delayed",
        "order",
        "future",
        "answer",
    )

    def __init__(
        self,
        ticket: Ticket,
        rows: int,
        key: object,  # a ShapeKey, or the group an open signature chose
        shape: ShapeKey,
        level: int,
        deadline: float | None,
        soft_deadline: float | None,
        order: Order,
        future: asyncio.Future[Answer],
    ):
        self.ticket = ticket
        self.request = ticket.request
        self.rows = rows
        self.key = key
        self.shape = shape  # what its batch's cost is learned under
        self.level = level
        self.deadline = deadline  # hard: gRPC deadline / V2 timeout
        self.soft_deadline = soft_deadline  # queue policy timeout (REJECT or DELAY)
        self.delayed = False
        self.order = order  # sort key within the level
        self.future = future
        self.answer: Answer | None = None  # held until earlier requests are answered (preserve_ordering)


class DynamicBatcher(_SchedulerBase):
    def __init__(
        self,
        execute: Execute,
        config: BatcherConfig,
        clock: Clock = time.monotonic,
        name: str = "",
        refused: Refused | None = None,
    ):
        self._execute = execute
        self._refused = refused or _ignore
        # Batch costs by shape of the non-batch dims (a long sequence's time says nothing of a short one's)
        self.costs: dict[ShapeKey, CostModel] = {}
        self.config = config
        self._clock = clock
        self._name = name
        levels = max(1, config.priority_levels)
        self._levels: list[list[tuple[Order, _Entry]]] = [[] for _ in range(levels)]  # sorted (order, entry) per level
        self._policies = [config.policy_of(i + 1 if config.priority_levels else 0) for i in range(levels)]
        self._seq = 0
        self._depth = 0
        self._timed = 0  # queued entries with a deadline or a policy timeout
        self._free = config.instances
        self._executing = 0
        self._running: dict[int, tuple[float, int, CostModel]] = {}  # executing: (started, rows, cost), by number
        self._launched = 0
        self._closed = False
        self._pumping = False
        self._again = False
        self._soon: asyncio.Handle | None = None  # work-conserving: a pump at the end of this loop turn
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain = DrainRate(clock)
        self._owed = 0  # requests of finished batches the drain rate has not been told of yet
        self._preferred_set = frozenset(config.preferred_batch_sizes)
        # (as Triton, which takes max_batch_size for the preferred size when a config gives none)
        self._largest_preferred = max(self._preferred_set, default=config.max_batch_size)
        self._arrival_order: deque[_Entry] = deque()  # preserve_ordering: entries not yet answered

    # -------------------------------------------------------------- Scheduler interface
    @property
    def queue_depth(self) -> int:
        return self._depth

    def queued_requests(self) -> int:
        """The client requests queued (a front worker's call counts as those it merged)."""
        return sum(e.ticket.request.weight for lvl in self._levels for _, e in lvl)

    @property
    def max_queue_size(self) -> int:
        return self.config.max_queue_size

    @property
    def round_size(self) -> int:
        """Requests that one round of executions takes: full batches on every instance (rows,
        so at least as many requests)."""
        return self.config.max_batch_size * self.config.instances

    @property
    def drain_rate(self) -> DrainRate:
        return self._drain

    def oldest_age_s(self) -> float:
        """How long the longest-waiting queued request has waited (0 when none)."""
        oldest = min((e.request.arrival for lvl in self._levels for _, e in lvl), default=None)
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    async def submit(self, ticket: Ticket) -> InferResponse:
        cfg = self.config
        if self._closed:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"model '{self._name}' is shutting down")
        request = ticket.request
        rows = ticket.checked.batch_size
        if rows > cfg.max_batch_size:
            raise invalid(f"batch size {rows} must be <= {cfg.max_batch_size} for model '{self._name}'")
        level = self._level_of(request)
        now = self._clock()
        if request.deadline is not None and now >= request.deadline:
            self._refused(EXPIRED)
            raise deadline_error(request)
        if cfg.max_queue_size and self._depth >= cfg.max_queue_size:
            self._refused(QUEUE_FULL)
            raise GatewayError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"model '{self._name}' queue is full: {cfg.max_queue_size} requests waiting (max_queue_size)",
                retry_after_s=self._drain.seconds_to_drain(self._depth),
            )
        policy = self._policies[level]
        if policy.max_queue_size and len(self._levels[level]) >= policy.max_queue_size:
            self._refused(QUEUE_FULL)
            raise GatewayError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"model '{self._name}' queue for priority level {level + 1} is full: {policy.max_queue_size} "
                "requests waiting (its priority_queue_policy's max_queue_size)",
                retry_after_s=self._drain.seconds_to_drain(self._depth),
            )
        group = ticket.checked.group
        shape = shape_key(request)
        key = shape if group is None else group
        cost = self.costs.get(shape) if request.deadline is not None else None
        if cost is not None and request.deadline is not None:  # (nothing learned of a shape never run)
            wait = self._expected_wait(rows, key, cost, level, request.deadline, now)
            # (refused unless it goes in as the probe: asked only then, since asking takes it)
            if wait is not None and now + wait > request.deadline and (self._executing or not cost.probe(now)):
                self._refused(UNMEETABLE)
                rid = f"[request id: {request.id}] " if request.id else ""
                raise GatewayError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"{rid}deadline cannot be met: model '{self._name}' has about {wait * 1000:.1f} ms of work "
                    f"queued ahead, and {max(0.0, request.deadline - now) * 1000:.1f} ms remain; refused at once",
                )
        soft = request.arrival + policy.timeout_s if policy.timeout_s else None
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._seq += 1
        order: Order = (0, request.deadline if request.deadline is not None else math.inf, self._seq)
        entry = _Entry(ticket, rows, key, shape, level, request.deadline, soft, order, future)
        insort(self._levels[level], (order, entry), key=lambda x: x[0])
        if cfg.preserve_ordering:
            self._arrival_order.append(entry)
        self._depth += 1
        if entry.deadline is not None or entry.soft_deadline is not None:
            self._timed += 1
        self._idle.clear()
        if cfg.policy == WORK_CONSERVING:
            # Dispatch at the end of this loop turn, not now: requests whose handlers run in
            # the same turn (a burst read off the sockets) leave together. It costs no waiting.
            if self._soon is None:
                self._soon = asyncio.get_running_loop().call_soon(self._pump_soon)
        else:
            self._pump()
        try:
            result = await future
        except asyncio.CancelledError:
            # The caller went away: leave the queue if still in it; a running batch goes on.
            if self._remove(entry):
                self._check_idle()
                self._pump()
            if self.config.preserve_ordering:  # a gone caller must not hold back later answers
                self._answer(entry, GatewayError(ErrorCode.CANCELLED, "cancelled"))
            raise
        if isinstance(result, GatewayError):
            raise result
        return result

    def close(self) -> None:
        """Admit nothing more, and send what is queued now: no request can join its batch any
        more, so waiting out the delay would only hold a shutdown back. (To refuse what is
        queued instead, call ``fail_queued`` first: ``ModelVersion.retire`` does.)"""
        self._closed = True
        self._pump()

    def fail_queued(self, error: GatewayError) -> int:
        gone = [e for lvl in self._levels for _, e in lvl]
        for e in gone:
            self._fail(e, error)
        self._check_idle()
        return len(gone)

    def cost_of(self, shape: ShapeKey) -> CostModel:
        """The learned cost of batches of ``shape`` (non-batch dims), made when one first runs."""
        cost = self.costs.get(shape)
        if cost is None:
            if len(self.costs) >= MAX_COST_SHAPES:
                self.costs.clear()
            cost = self.costs[shape] = CostModel()
        return cost

    def _expected_wait(
        self, rows: int, key: object, cost_model: CostModel, level: int, deadline: float, now: float
    ) -> float | None:
        """Seconds until a new request would finish at the soonest, from the work of its group
        (``key``) queued ahead of it (higher levels, and earlier deadlines in its own) and the
        learned cost of its shape; None while none is known. A lower bound, so that a refusal is
        sure: a busy instance frees when its batch's least time has passed since it started, the
        rows ahead make full batches but for the last, its own, and other shapes count nothing."""
        if not cost_model.known():
            return None
        cfg = self.config
        ahead = rows
        for i, lvl in enumerate(self._levels):
            if i > level:
                break
            for order, e in lvl:
                if e.key == key and (i < level or order[0] == 0 and order[1] <= deadline):
                    ahead += e.rows
        full, rest = divmod(ahead, cfg.max_batch_size)
        waves = -(-(full + (rest > 0)) // cfg.instances)
        # (A refusal must be sure: taking the nearest larger size measured refused a lone row on an
        # idle model because a full batch had once been timed, and kept refusing it.)
        cost = cost_model.at_least
        busy = 0.0
        if self._free <= 0 and self._running:
            busy = min(
                max(0.0, c.at_least(r) - (now - started)) if c.known() else 0.0
                for started, r, c in self._running.values()
            )
        return busy + (waves - 1) * cost(cfg.max_batch_size) + cost(rest or cfg.max_batch_size)

    # -------------------------------------------------------------- queue
    def _level_of(self, request: InferRequest) -> int:
        levels = self.config.priority_levels
        if not levels:
            return 0
        p = request.priority
        if p == 0 or p > levels:  # as Triton: 0 or a level the model does not have is its default level
            p = self.config.default_priority_level
        return p - 1

    def _remove(self, entry: _Entry) -> bool:
        lvl = self._levels[entry.level]
        i = bisect_left(lvl, entry.order, key=lambda x: x[0])
        if i < len(lvl) and lvl[i][1] is entry:
            del lvl[i]
            self._depth -= 1
            if entry.deadline is not None or entry.soft_deadline is not None:
                self._timed -= 1
            return True
        return False

    def _fail(self, entry: _Entry, error: GatewayError) -> None:
        self._remove(entry)
        self._answer(entry, error)

    def _answer(self, entry: _Entry, answer: Answer) -> None:
        """Give ``entry`` its answer, or, with preserve_ordering, hold it until every request
        that arrived earlier has been answered."""
        if not self.config.preserve_ordering:
            if not entry.future.done():
                entry.future.set_result(answer)
            return
        entry.answer = answer
        order = self._arrival_order
        while order and (order[0].answer is not None or order[0].future.done()):
            e = order.popleft()
            if e.answer is not None and not e.future.done():  # not done: it was answered (the loop's test)
                e.future.set_result(e.answer)

    def _expire(self, now: float) -> None:
        """Answer queued requests whose deadline has passed; apply the queue policy timeout."""
        if not self._timed:
            return
        for lvl in self._levels:
            for _, e in list(lvl):
                if e.deadline is not None and now >= e.deadline:
                    self._refused(EXPIRED)
                    self._fail(e, deadline_error(e.request))
                elif e.soft_deadline is not None and now >= e.soft_deadline and not e.delayed:
                    if self._policies[e.level].delay:
                        # DELAY: behind every request of this level that has not timed out.
                        self._remove(e)
                        e.delayed = True
                        e.order = (1,) + e.order[1:]
                        insort(lvl, (e.order, e), key=lambda x: x[0])
                        self._depth += 1
                        self._timed += 1
                    else:
                        self._refused(QUEUE_TIMEOUT)
                        rid = f"[request id: {e.request.id}] " if e.request.id else ""
                        self._fail(
                            e,
                            GatewayError(
                                ErrorCode.DEADLINE_EXCEEDED,
                                f"{rid}queue timeout of model '{self._name}' expired; the request was not executed",
                            ),
                        )

    def _groups(self) -> list[list[_Entry]]:
        """The queued requests by group (one shape, ``_Entry.key``), each in queue order (higher
        levels first), the groups in the order of their first request: one pass over the queue."""
        groups: dict[object, list[_Entry]] = {}
        for lvl in self._levels:
            for _, e in lvl:
                group = groups.get(e.key)
                if group is None:
                    groups[e.key] = [e]
                else:
                    group.append(e)
        return list(groups.values())

    def _candidates(self, group: list[_Entry]) -> tuple[list[_Entry], int]:
        """The batch a group's first request would lead: its requests in queue order, as many rows
        as fit; and how many of them come before the first request that did not fit (-1 when
        none was left out)."""
        room = self.config.max_batch_size
        picked: list[_Entry] = []
        blocked = -1
        for e in group:
            if e.rows > room:
                if blocked < 0:
                    blocked = len(picked)
                continue
            picked.append(e)
            room -= e.rows
            if room == 0:
                return picked, -1
        return picked, blocked

    def _ready(self, picked: list[_Entry], blocked: int, now: float) -> tuple[list[_Entry] | None, float]:
        """The entries to dispatch now, or None and when to look again. As Triton's dynamic
        batcher: walking the candidates in queue order, a batch that has reached the largest
        preferred size (max_batch_size when none is set) goes at once; where the next request
        would take it past that size (or does not fit at all: ``blocked``), the batch is cut before
        that request and goes at once, and the rest waits for a batch of its own; a preferred size
        met exactly on the way is the batch; otherwise wait until the oldest candidate has waited
        max_queue_delay, and then send every candidate."""
        cfg = self.config
        if cfg.policy == WORK_CONSERVING:
            return picked, math.inf
        rows = sum(e.rows for e in picked)
        oldest = min(e.request.arrival for e in picked)
        due = oldest + cfg.max_queue_delay_s
        if self._timed:
            due = min(due, self._latest_start(picked, rows))
        waited = cfg.max_queue_delay_s > 0 and (now >= due or self._closed)
        cut = _cut(picked, blocked, self._preferred_set, self._largest_preferred)
        if cut and not waited:
            return picked[:cut], math.inf
        if cfg.max_queue_delay_s <= 0 or waited or rows >= self._largest_preferred:
            return picked, math.inf
        return None, due

    def _latest_start(self, picked: list[_Entry], rows: int) -> float:
        """When the batch must leave for its earliest deadline to be met (beyond Triton, whose
        batch waits out the delay and lets such a member expire): that deadline less the learned
        time of a batch this size, or, before any is learned, half the time its request was given."""
        first: _Entry | None = None
        at = math.inf
        for e in picked:
            if e.deadline is not None and e.deadline < at:
                first, at = e, e.deadline
        if first is None:
            return math.inf
        cost = self.costs.get(picked[0].shape)
        if cost is not None and cost.known():
            return at - cost.seconds(rows)
        return at - (at - first.request.arrival) / 2

    def _pump(self) -> None:
        """Expire, dispatch what is ready, and arm the timer for the next due time. An
        execution that finishes inline calls back in here: that call only asks the running
        pump to look again, so the stack does not grow with the queue."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._pump_once()
        finally:
            self._pumping = False
        if self._owed:  # finished, and no batch went next: the instance it freed is idle
            self._drain.done(self._owed, False)
            self._owed = 0  # (and just before a launch: the time since was busy)

    def _pump_soon(self) -> None:
        self._soon = None
        self._pump()

    def _pump_once(self) -> None:
        now = self._clock()
        self._expire(now)
        wake = math.inf
        while self._free > 0 and self._depth > 0:
            # A group (requests of one shape) still waiting out its delay does not hold back the
            # groups queued behind it: a full batch of another shape goes now. (The groups are
            # made in one pass: a client sending many shapes must not make each pump quadratic.)
            wake = math.inf
            batch = None
            for group in self._groups():
                picked, blocked = self._candidates(group)
                if not picked:
                    continue
                batch, due = self._ready(picked, blocked, now)
                if batch is not None:
                    break
                wake = min(wake, due)
            if batch is None:
                break
            if self._owed:
                self._drain.done(self._owed, True)
                self._owed = 0
            self._launch(batch)
        for lvl in self._levels if self._timed else ():  # the next deadline or policy timeout
            for _, e in lvl:
                if e.deadline is not None:
                    wake = min(wake, e.deadline)
                if e.soft_deadline is not None and not e.delayed:
                    wake = min(wake, e.soft_deadline)
        self._arm(wake)
        self._check_idle()

    def _arm(self, at: float) -> None:
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at < math.inf:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, at - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._pump()

    def tick(self) -> None:
        """Look at the queue again now. The batcher's own timer does this when a delay or a
        deadline falls due; tests that drive a fake clock call it after moving the clock."""
        self._pump()

    def _launch(self, batch: list[_Entry]) -> None:
        for e in batch:
            self._remove(e)
        self._free -= 1
        self._executing += len(batch)
        now = self._clock()
        tickets = []
        for e in batch:
            e.ticket.dispatched = now
            tickets.append(e.ticket)
        rows = sum(e.rows for e in batch)
        self._launched += 1
        self._running[self._launched] = (now, rows, self.cost_of(batch[0].shape))
        self._execute(tickets, partial(self._finished, batch, rows, now, self._launched))

    def _finished(self, batch: list[_Entry], rows: int, started: float, number: int, results: Results) -> None:
        running = self._running.pop(number, None)
        if not isinstance(results, BaseException) and running is not None:
            now = self._clock()
            running[2].observe(rows, now - started, now)
        self._free += 1
        self._executing -= len(batch)
        if isinstance(results, BaseException):
            results = [GatewayError(ErrorCode.INTERNAL, f"model '{self._name}' failed: {results}")] * len(batch)
        for e, r in zip(batch, results):
            self._answer(e, r)
        # Told the drain rate by the pump: busy if another batch goes at once (requests waiting out
        # the delay beside an idle instance had measured a fast model at a few requests a second).
        self._owed += len(batch)
        self._pump()

    def _check_idle(self) -> None:
        if self._depth == 0 and self._executing == 0:
            self._idle.set()


def _cut(picked: list[_Entry], blocked: int, preferred: frozenset[int], largest: int) -> int:
    """How many of ``picked`` make a batch to send now without waiting (0: none), as Triton
    walks its queue: the batch reached by the last preferred size met exactly, else the one
    before the request that would take it past the largest preferred size (or that did not fit:
    the candidates from ``blocked`` on came after a request left out)."""
    total, cut = 0, 0
    for i, e in enumerate(picked):
        if i == blocked or (i and total + e.rows > largest):
            return cut or i
        total += e.rows
        if total in preferred:
            cut = i + 1
    return cut or (len(picked) if blocked == len(picked) else 0)
