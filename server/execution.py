"""How a model version's batches execute: :class:`LocalExecution` runs them with a local
backend (on an inference thread, or inline on the event loop for batches measured fast enough)
and :class:`RemoteExecution` sends them to remote V2 servers (a coroutine on the loop, cancelled
once every caller of its batch has gone). Split from model.py, which builds one per version."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .backends.base import LocalBackend, RemoteBackend
from .core.errors import ErrorCode, GatewayError, batch_may_go_alone, invalid
from .core.rate import LineBudget
from .core.scheduler import Done, More, Ticket
from .core.signature import forwarded_parameters
from .core.types import REQUESTS_HEADER, clip, printable
from .monitoring import tracing
from .monitoring.trace_context import carried
from .monitoring.tracing import BatchTrace, batch_trace
from .threads import InferenceThreads

if TYPE_CHECKING:
    from .model import ModelVersion

log = logging.getLogger("batchgate.model")


def _log_failure(budget: LineBudget, message: str, *args: Any) -> None:
    """A model's failure line within ``budget`` (``Metrics.model_failure_lines``, all the gateway's
    models): values that make a model fail write no line per request; the next says how many were
    left out. (Inference threads take from it too: a race costs a line, no more.)"""
    left_out = budget.take()
    if left_out is None:
        return
    if left_out:
        message += " (and %d such lines left out before this one: failure_log_max_lines_per_s)"
        args = (*args, left_out)
    log.warning(message, *args)


_perf_ns = time.perf_counter_ns
_INLINE_AFTER = 16  # executions of a batch size timed before that size may run inline
_INLINE_KEYS = 256  # batch sizes and shapes timed at most (past it, the timings start again)


def _cost_key(batch: list, rows: int) -> tuple:
    """What an execution's time is kept under: its rows and the shapes of its first request's inputs
    (keyed by rows alone, a sequence or an image measured fast at one size ran inline at any)."""
    return (rows, *(a.shape for a in batch[0].checked.feeds.values()))


INLINE_MAX_ADMITTED = 4  # a pass-through version with more requests admitted runs them on threads


class _Execution:
    """A running remote execution: cancelled when every caller of its batch has gone."""

    __slots__ = ("task", "waiting")

    def __init__(self, task: asyncio.Future, waiting: int):
        self.task = task
        self.waiting = waiting


class LocalExecution:
    """Batches run by a local backend: on an inference thread, unless this version's recent
    executions of batches of that many rows and those input shapes were measured faster than
    ``inline_max_us``;
    then the hand-off to a thread and back would cost the event loop more than the
    execution itself (``bench/serving.py``), so it runs on the loop, bounded by that
    threshold. With one core (``one_core_turn_us``), those measured faster than a loop turn's
    bound run in the loop's turns instead of on a thread (``threads.LoopTurns``)."""

    def __init__(self, version: ModelVersion, backend: LocalBackend, threads: InferenceThreads, inline_max_us: int):
        self._v = version
        self._run = backend.run
        self._threads = threads
        self._inline_max_ns = inline_max_us * 1000
        self.inline_runs = 0  # executions that ran on the event loop
        # Per batch size (rows) and input shapes (_cost_key): the recent execution times, and the
        # fastest of them.
        self._recent_ns: dict[tuple, deque[float]] = {}
        self._fastest_ns: dict[tuple, float] = {}

    def execute(self, batch: list[Ticket], done: Done, more: More | None = None) -> None:
        """Run ``batch``; with ``more`` (the pass-through scheduler's), a thread that finishes
        it goes straight on to the next waiting request (an inline run leaves that to the
        scheduler, which dispatches the next one as soon as ``done`` returns)."""
        rows = batch[0].checked.batch_size if len(batch) == 1 else sum(t.checked.batch_size for t in batch)
        fastest = self._fastest_ns.get(_cost_key(batch, rows), math.inf)
        if (
            self._inline_max_ns
            and fastest <= self._inline_max_ns
            # Many requests admitted at once (a busy loop's turn): on a thread, the executions of
            # the turn run together between the loop's turns, not each between two requests'
            # Python (HTTP at 32 connections: 10% more answers; at one, inline saves the hand-off).
            and (more is None or self._v.admitted <= INLINE_MAX_ADMITTED)
        ):
            self.inline_runs += 1
            done(self._run_batch(batch))
        elif (turns := self._threads.turns) is not None and fastest <= turns.turn_ns:
            self.inline_runs += 1
            turns.add(self._run_batch, batch, done)
        else:
            self._threads.call(self._run_batch, batch, done, more)

    def _run_batch(self, batch: list[Ticket], quiet: bool = False) -> list:
        """Prepare inputs, execute, collect outputs, record figures (on an inference thread,
        or on the loop). A batch of several requests is merged along the batch dimension and
        each caller gets back exactly its own rows."""
        v = self._v
        trace = batch_trace([t.request for t in batch], v.name, v.version) if tracing.LIVE else None
        try:
            t0 = _perf_ns()
            feeds, names = v.inputs(batch)
            t1 = _perf_ns()
            arrays = self._run(feeds, names)
            t2 = _perf_ns()
            answers, rows = v.answers(batch, names, arrays)
            t3 = _perf_ns()
        except Exception as e:  # noqa: BLE001 - each caller gets the error; the model serves on
            if trace is not None:
                trace.finish(0, 0, 0, 0, 0, str(e))
            if len(batch) > 1 and (not isinstance(e, GatewayError) or batch_may_go_alone(e)):
                # One caller's values (text that is not UTF-8, an index the model cannot take) may
                # have failed the merged batch: each runs again alone, so only its caller fails
                # (said once here; one past its deadline meanwhile is answered so, not run).
                _log_failure(
                    v.metrics.failure_lines,
                    "model '%s' version %s: a batch of %d requests failed (%s); running them one at a time",
                    v.name,
                    v.version,
                    len(batch),
                    str(e)[:256],
                )
                now = time.monotonic()
                return [
                    _EXPIRED if t.request.deadline is not None and t.request.deadline <= now else
                    self._run_batch([t], quiet=True)[0]
                    for t in batch
                ]  # fmt: skip
            return v.failure(batch, e, quiet)
        if trace is not None:
            trace.finish(t0, t1, t2, t3, rows)
        took = t3 - t0
        with v.stats_lock:
            v.record(rows, len(batch), t0, t1, t2, t3)
            # The fastest of the recent executions: timings on an inference thread include
            # waits for the GIL while the loop is busy, which say nothing of the model's cost.
            recent = self._recent_ns.get(key := _cost_key(batch, rows))
            if recent is None:
                if len(self._recent_ns) >= _INLINE_KEYS:  # (callers choose the shapes: kept bounded)
                    self._recent_ns.clear()
                    self._fastest_ns.clear()
                recent = self._recent_ns[key] = deque(maxlen=_INLINE_AFTER)
            recent.append(took)
            if len(recent) == _INLINE_AFTER:  # decide only once a size has been timed enough
                self._fastest_ns[key] = min(recent)
        return answers


_EXPIRED = GatewayError(ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded while its batch failed and was run again")


class RemoteExecution:
    """Batches sent to remote V2 servers: a task on the event loop per batch, whose timeout
    is the latest deadline of the batch's callers (none if any caller has none)."""

    def __init__(self, version: ModelVersion, backend: RemoteBackend, threads: InferenceThreads):
        self._v = version
        self._backend = backend
        self._threads = threads  # counts the requests out at an upstream (threads.away)
        self.inline_runs = 0
        spec = getattr(backend, "spec", None)
        self._tells = spec is not None and spec.tells_requests

    def admit(self) -> None:
        """No upstream in rotation: refuse at once, not after a wait in the queue."""
        if not self._backend.ready():
            raise self._backend.unavailable()

    def execute(self, batch: list[Ticket], done: Done) -> None:
        task = asyncio.ensure_future(self._run(batch))
        ex = _Execution(task, len(batch))
        for t in batch:
            t.execution = ex

        def finished(f: asyncio.Future) -> None:
            for t in batch:
                t.execution = None
            if f.cancelled():
                done([GatewayError(ErrorCode.CANCELLED, "cancelled: every caller of the batch went away")] * len(batch))
            else:
                done(f.result())

        task.add_done_callback(finished)

    async def _run(self, batch: list[Ticket]) -> list:
        v = self._v
        trace = batch_trace([t.request for t in batch], v.name, v.version) if tracing.LIVE else None
        try:
            answers, times = await self._call(batch, trace)
        except BaseException as e:
            if trace is not None:
                trace.finish(0, 0, 0, 0, 0, str(e) or type(e).__name__)
            raise
        if trace is not None:
            failed = next((a.message for a in answers if isinstance(a, GatewayError)), "")
            t0, t1, t2, t3, rows = times
            trace.finish(t0, t1, t2, t3, rows, error=failed)
        return answers

    async def _call(self, batch: list[Ticket], trace: BatchTrace | None) -> tuple[list, tuple[int, int, int, int, int]]:
        """Each caller's answer, and the execution's times (t0..t3, rows; zeros when it failed)."""
        v = self._v
        headers = trace.headers() if trace is not None else None
        if headers is None and len(batch) == 1:  # (several callers' batch: no one parent to carry)
            headers = carried(batch[0].request.headers)
        if len(batch) > 1 and self._tells:  # (front mode: the owner counts the requests merged)
            headers = (headers or ()) + ((REQUESTS_HEADER, str(len(batch))),)
        deadlines = [t.request.deadline for t in batch]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        try:
            t0 = _perf_ns()
            feeds, names = v.inputs(batch)
            t1 = _perf_ns()
            threads = self._threads
            threads.away += len(batch)
            forwards = v.metrics.forwards
            forwards["decoded"] = forwards.get("decoded", 0) + len(batch)
            rid = batch[0].request.id if len(batch) == 1 else ""
            types = None
            # Requests of one batch share their parameters (their group): the upstream may read
            # them (MLServer's content_type, Triton's sequence_id).
            first = batch[0].request
            params, own = forwarded_parameters(first)
            answered: dict = {}  # the upstream answer's parameters, passed on to each caller
            try:
                if v.signature.open:
                    # ... and input names and datatypes
                    given = {t.name: t.datatype for t in first.inputs}
                    got = await self._backend.infer_open(
                        feeds, given, names, deadline, rid, headers, params, own, answered
                    )
                    names = names or tuple(got)
                    missing = [n for n in names if n not in got]
                    if missing:  # names the caller chose (no signature to check them against)
                        raise invalid(
                            f"the upstream has no output '{printable(clip(missing[0]))}' (it answered "
                            f"{printable(clip(', '.join(got)))}); ask for outputs the model has"
                        )
                    types = {n: got[n][0] for n in names}
                    arrays = [got[n][1] for n in names]
                else:
                    arrays = await self._backend.infer(feeds, names, deadline, rid, headers, params, own, answered)
            finally:
                threads.away -= len(batch)
            t2 = _perf_ns()
            answers, rows = v.answers(batch, names, arrays, types, answered)
            t3 = _perf_ns()
        except Exception as e:  # noqa: BLE001 - each caller gets the error; the model serves on
            if len(batch) > 1 and batch_may_go_alone(e):
                # Nothing checked these requests' values: one caller's may have failed the batch
                # (an index past a table). Each goes again alone: only its caller gets its error.
                alone = await asyncio.gather(*(self._run([t]) for t in batch))
                return [answer for (answer,) in alone], (0, 0, 0, 0, 0)
            return v.failure(batch, e), (0, 0, 0, 0, 0)
        with v.stats_lock:
            v.record(rows, len(batch), t0, t1, t2, t3)
        return answers, (t0, t1, t2, t3, rows)
