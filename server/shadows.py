"""Shadows: a copy of a route's request sent to another model, whose answer is compared with the
primary's and never reaches the caller.

A copy is taken after the primary's admission, at the shadow's ``percent``, while fewer than its
``max_inflight`` copies wait or run; past that it is dropped and counted. It never goes ahead of
primary work: shadow work (starting copies, comparing answers) waits in :class:`ShadowScheduler`
until no primary request is in flight, and the copies that gathered meanwhile start together, in
batches of the model's ``max_batch_size`` rows. For a model that batches, a copy also waits up to
``shadow_gather_ms`` (or until half its budget or a full batch waits) for others to start with: one
remote call, or one run, for several copies costs the gateway far less than one each. A local
shadow runs on a second ONNX Runtime session of its model (one intra-op thread) on the shadow
threads (``shadow_threads``, nice 19), not on the inference threads and not through the model's
scheduler; a remote shadow is a blocking call to the model's upstreams on the sender threads
(``shadow_send_threads``, SCHED_IDLE), off the event loop. A shadow's failure is counted, never
answered. Drain cancels the copies still waiting or running.

The comparison (the part a service mesh's mirror cannot do: it drops the shadow's answer) looks at
one output of both answers: for ``regression``, the largest |primary - shadow| of each row, a row
agreeing within ``atol``; for ``classification``, the top-1 class of each row (a flip disagrees)
and the largest probability change. A request agrees when every row does. Disagreements are
sampled into a bounded, rotating JSONL file for debugging.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import Any

import numpy as np
import orjson

from .core.batching import merge, split
from .core.errors import GatewayError, batch_may_go_alone
from .core.rate import LineBudget
from .core.routing import Compare, Shadow
from .core.signature import forwarded_parameters, parameters_key
from .core.types import InferRequest, InferResponse, Tensor, clip, printable
from .execution import LocalExecution
from .logs import PrivateRotatingFileHandler
from .model import ModelVersion
from .monitoring.metrics import ShadowMetrics
from .monitoring.tracing import Tracing

log = logging.getLogger("batchgate.shadows")
_perf = time.perf_counter
SUMMARY_VALUES = 16  # values of each tensor written to the disagreement log
SUMMARY_INPUTS = 8  # inputs written there, at most
MAX_LINE = 16 << 10  # characters of a disagreement line past which its inputs' values are left out
RECHECK_S = 0.002  # while primary work runs, waiting shadow work looks again this often


class Outcome:
    """What one copy gave: its answer's compared output and its latency, or its failure."""

    __slots__ = ("output", "latency_s", "error")

    def __init__(self, output: np.ndarray | None, latency_s: float, error: str | None = None):
        self.output, self.latency_s, self.error = output, latency_s, error


def lowest_priority() -> None:
    """Initializer of the shadow threads: the lowest scheduling priority (nice 19) for this
    thread alone, so a shadow's computation gets a core only when primary work leaves it idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):  # not Linux, or not allowed: the threads still run apart
        log.debug("shadow threads run at normal priority")


def idle_priority() -> None:
    """Initializer of the remote shadows' sender threads: SCHED_IDLE for this thread alone (it
    runs only when nothing else on its core wants to), or nice 19 where that is not allowed."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
    except (OSError, AttributeError):
        lowest_priority()


class ShadowScheduler:
    """Shadow work (starting a copy, comparing its answer) runs only while no primary request is
    in flight (``busy()`` false): queued here, and woken when the last one is answered. On a busy
    server shadows take only the time primary work leaves; copies that wait count against their
    shadow's budget, so past it they are dropped, not piled up. One item a turn of the loop by
    default: a request that arrives meanwhile is read and admitted before the next item, and
    pauses the rest (with 8 a turn the primary p99 under a remote shadow rose by a further ~0.15x)."""

    def __init__(self, busy: Callable[[], bool], per_turn: int = 1, gather_s: float = 0.0):
        self._busy = busy
        self.gather_s = gather_s  # how long a shadow's first waiting copy waits for others
        self._per_turn = per_turn
        self._work: deque[Callable[[], None]] = deque()
        self._soon = False  # a run is due on the next turn of the loop
        self._timer: asyncio.TimerHandle | None = None  # a recheck while primary work runs

    def later(self, work: Callable[[], None]) -> None:
        self._work.append(work)
        self.wake()

    def wake(self) -> None:
        if not self._work or self._soon:
            return
        loop = asyncio.get_running_loop()
        if not self._busy():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._soon = True
            loop.call_soon(self._run)
        elif self._timer is None:  # looked at again soon, and at once when the last request is answered
            self._timer = loop.call_later(RECHECK_S, self._recheck)

    def _recheck(self) -> None:
        self._timer = None
        self.wake()

    def _run(self) -> None:
        self._soon = False
        work, done = self._work, 0
        while work and done < self._per_turn and not self._busy():
            item = work.popleft()
            try:
                item()
            except Exception:  # one item's bug must not strand the rest
                log.exception("shadow work failed")
            done += 1
        self.wake()  # more waiting: after another turn of the loop


class ShadowRunner:
    """One shadow of one route: its budget, its way of running, its figures."""

    def __init__(
        self,
        route: str,
        spec: Shadow,
        version: ModelVersion,
        backend: Any,  # a local backend's twin session, or the remote model's backend
        pool: Executor | None,  # a local shadow's threads; a remote one's sender threads (None: the event loop)
        metrics: ShadowMetrics,
        compare: Compare | None,
        disagreements: DisagreementLog | None,
        rng: random.Random,
        scheduler: ShadowScheduler,
    ):
        self.route, self.spec, self.version = route, spec, version
        self._scheduler = scheduler
        self._waiting: deque[tuple[InferRequest, asyncio.Future]] = deque()  # copies not started
        self._start_queued = False  # a start of the waiting copies is queued with the scheduler
        self._gather: asyncio.TimerHandle | None = None  # the copies waiting wait for more until then
        limit = version.signature.max_batch_size
        # Copies gather only for a model that batches; a full batch, or half the budget, starts at once.
        self._gather_s = scheduler.gather_s if limit > 1 else 0.0
        self._gather_full = max(1, min(limit, spec.max_inflight // 2))
        self._tasks: set[asyncio.Future] = set()  # executions running
        self.closed = False
        self._backend = backend
        self._local = isinstance(version.execution, LocalExecution)
        self._pool = pool
        self.metrics = metrics
        self.compare = compare
        self._log = disagreements
        self._rng = rng
        self._failure_lines = LineBudget(1)  # a failed copy's reason: one WARNING a second at most
        self.inflight = 0
        self.pending: set[asyncio.Future] = set()
        self._spans: dict[asyncio.Future, Any] = {}  # the copies of traced requests: their spans
        # The outputs a copy asks for: the compared one, or (nothing to compare) the first.
        self._outputs = (compare.output,) if compare is not None else (version.signature.outputs[0].name,)

    def offer(self, request: InferRequest) -> asyncio.Future | None:
        """Send a copy of ``request`` now, or not: not picked by ``percent`` (None, uncounted);
        the budget full (None, counted as dropped); this runner closed (None, counted as skipped:
        its model was reloaded and the route is building its shadow again, or the gateway drains)."""
        spec = self.spec
        if spec.percent < 100 and self._rng.random() * 100 >= spec.percent:
            return None
        if self.closed:
            self.metrics.outcome("skipped")
            return None
        if self.inflight >= spec.max_inflight:
            self.metrics.outcome("dropped")
            return None
        self.inflight += 1  # waiting, running or being compared: all count against the budget
        fut = asyncio.get_running_loop().create_future()
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)
        self._waiting.append((request, fut))
        note = request.note
        if note is not None and note.span is not None:
            self._spans[fut] = note.tracing.shadow_span(note.span, self.route, spec.name, self.version.name)
        if self._gather is not None and len(self._waiting) >= self._gather_full:
            self._gathered()
        elif not self._start_queued and self._gather is None:
            if self._gather_s > 0:
                self._gather = asyncio.get_running_loop().call_later(self._gather_s, self._gathered)
            else:
                self._start_queued = True
                self._scheduler.later(self._start)
        return fut

    def _gathered(self) -> None:
        """The gathering time is up, or enough copies wait: they start when primary work allows."""
        if self._gather is not None:
            self._gather.cancel()
            self._gather = None
        if not self._start_queued:
            self._start_queued = True
            self._scheduler.later(self._start)

    def _start(self) -> None:
        """Start every copy waiting, as few executions as the model's batches allow: copies
        gather while primary work runs, and one call for several of them costs far less (a
        remote shadow's gRPC call costs the gateway about as much as answering a request)."""
        self._start_queued = False
        copies = []
        while self._waiting:
            request, fut = self._waiting.popleft()
            if not fut.done():  # else cancelled while it waited
                copies.append((request, fut))
        if not copies:
            return
        task = asyncio.ensure_future(self._run_all([r for r, _ in copies]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(partial(_settle_futures, [f for _, f in copies]))

    async def _run_all(self, requests: list[InferRequest]) -> list[Outcome]:
        """Each copy's outcome: the copies in batches of at most the model's max_batch_size
        rows (one at a time for a model that does not batch, or whose shapes do not stack)."""
        t0 = _perf()
        checked: list = []
        outcomes: list[Outcome | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                checked.append((i, self.version.signature.check(r._replace(outputs=self._outputs))))
            except GatewayError as e:
                outcomes[i] = Outcome(None, 0.0, e.message[:512])
        limit = self.version.signature.max_batch_size
        if getattr(self._backend, "sequences", False):  # each step of a sequence goes as the caller sent it
            limit = 0
        chunk: list = []
        rows, key = 0, None
        for i, c in [*checked, (-1, None)]:
            # an upstream reads parameters (a Python model's own, Triton's sequence_id): copies
            # share a call only with copies of the same ones, as the model's own batches do
            mine = parameters_key(requests[i]) if c is not None and not self._local else None
            if chunk and (c is None or not limit or rows + c.batch_size > limit or mine != key):
                await self._run_chunk(chunk, requests, outcomes, t0)
                chunk, rows = [], 0
            if c is not None:
                chunk.append((i, c))
                rows += c.batch_size
                key = mine
        return [o if o is not None else Outcome(None, 0.0, "not run") for o in outcomes]

    async def _run_chunk(self, chunk: list, requests: list[InferRequest], outcomes: list, t0: float) -> None:
        try:
            try:
                feeds = merge([c.feeds for _, c in chunk])
            except ValueError:  # shapes that do not stack: one at a time
                if len(chunk) == 1:
                    raise
                for one in chunk:
                    await self._run_chunk([one], requests, outcomes, t0)
                return
            first = requests[chunk[0][0]]
            if self._local:
                loop = asyncio.get_running_loop()
                arrays = await loop.run_in_executor(self._pool, self._backend.run, feeds, self._outputs)
            else:  # the caller's parameters go on, as they do to a remote variant
                params, own = forwarded_parameters(first)
                deadline = _copy_deadline([requests[i] for i, _ in chunk])
                if self._pool is None:  # (shadow_send_threads 0) on the event loop, the model's own client
                    arrays = await self._backend.infer(feeds, self._outputs, deadline, params=params, input_params=own)
                else:
                    arrays = await self._backend.infer_apart(feeds, self._outputs, deadline, self._pool, params, own)
            took = _perf() - t0
            if len(chunk) == 1:
                outcomes[chunk[0][0]] = Outcome(np.asarray(arrays[0]), took)
                return
            for (i, _), part in zip(chunk, split([np.asarray(arrays[0])], [c.batch_size for _, c in chunk])):
                outcomes[i] = Outcome(part[0], took)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a shadow's failure is counted, never answered
            if len(chunk) > 1 and (batch_may_go_alone(e) or (self._local and not isinstance(e, GatewayError))):
                # One copy's values may have failed the run, as they may a primary batch (and as
                # there, execution.py): each goes again alone, so only that copy fails and the
                # others are compared (all failed with it, counted as the shadow's errors).
                for one in chunk:
                    await self._run_chunk([one], requests, outcomes, t0)
                return
            message = e.message if isinstance(e, GatewayError) else f"{type(e).__name__}: {e}"
            for i, _ in chunk:
                outcomes[i] = Outcome(None, _perf() - t0, message[:512])

    def cancel(self) -> None:
        """Drain or a replaced route: no new copies; those waiting or running are cancelled."""
        self.closed = True
        self._waiting.clear()
        if self._gather is not None:
            self._gather.cancel()
            self._gather = None
        for task in list(self._tasks):
            task.cancel()
        for fut in list(self.pending):
            fut.cancel()

    # ---------------------------------------------------------------- comparison
    def settle(
        self,
        fut: asyncio.Future,
        request: InferRequest,
        primary: InferResponse | None,
        primary_latency_s: float,
        counted: bool,
        on_compared: Callable[[bool], None] | None,
    ) -> None:
        """Once both answers are in: count the copy, compare it with the primary's answer
        (``primary`` None: the primary failed). ``counted``: the request counts in comparisons
        (not synthetic, not pinned); ``on_compared(disagreed)`` feeds the rollout's gate."""

        span = self._spans.pop(fut, None)

        def done(f: asyncio.Future) -> None:
            if f.cancelled():
                self.inflight -= 1
                self.metrics.outcome("cancelled")
                if span is not None:
                    Tracing.end_shadow(span, "cancelled")
            else:  # the comparison's arithmetic waits for idle time too, within the budget
                self._scheduler.later(partial(compare_once, f.result()))

        def compare_once(outcome: Outcome) -> None:
            try:
                compare(outcome)
            finally:
                self.inflight -= 1

        def compare(outcome: Outcome) -> None:
            sm = self.metrics
            if outcome.error is not None or primary is None:
                if outcome.error is not None and primary is not None:
                    sm.error_delta["shadow_only"] = sm.error_delta.get("shadow_only", 0) + 1
                elif outcome.error is None:
                    sm.error_delta["primary_only"] = sm.error_delta.get("primary_only", 0) + 1
                kind = "failed" if outcome.error is not None else "answered"
                sm.outcome(kind)
                if outcome.error is not None:
                    self._say_failed(outcome.error)
                if span is not None:
                    Tracing.end_shadow(span, kind, error=outcome.error or "")
                return
            sm.latency_delta.observe(outcome.latency_s - primary_latency_s)
            mine = _output(primary, self.compare.output) if self.compare is not None else None
            if not counted or mine is None or outcome.output is None:
                sm.outcome("answered")
                if span is not None:
                    Tracing.end_shadow(span, "answered")
                return
            disagreed = self._compare(mine, outcome.output)
            sm.outcome("compared")
            if span is not None:
                Tracing.end_shadow(span, "compared", disagreed)
            if on_compared is not None:
                on_compared(disagreed)
            if disagreed and self._log is not None:
                self._log.write(self, request, primary, mine, outcome.output)

        fut.add_done_callback(done)

    def _say_failed(self, error: str) -> None:
        """Counted, a failure's reason is otherwise only in a trace: one line a second says it."""
        left_out = self._failure_lines.take()
        if left_out is None:
            return
        more = f" ({left_out} more failed copies since the last such line)" if left_out else ""
        log.warning(
            "shadow %s of route %s (model %s): a copy failed: %s%s",
            self.spec.name,
            self.route,
            self.version.name,
            printable(error[:512]),
            more,
        )

    def _compare(self, primary: np.ndarray, shadow: np.ndarray) -> bool:
        """Count one compared answer; True when it disagrees."""
        sm, c = self.metrics, self.compare
        assert c is not None
        if primary.shape != shadow.shape:
            sm.rows += 1
            sm.delta.observe(float("inf"))
            return True
        batched = self.version.signature.max_batch_size > 0
        a = _rows(primary, batched)
        b = _rows(shadow, batched)
        rows = a.shape[0]
        sm.rows += rows
        if a.dtype.kind not in "biuf" or b.dtype.kind not in "biuf":  # BYTES: equal or not
            # (ONNX Runtime gives str elements, a remote upstream bytes: compared as bytes)
            differ = [[_as_bytes(v) for v in x] != [_as_bytes(v) for v in y] for x, y in zip(a, b)]
            for differs in differ:
                sm.delta.observe(1.0 if differs else 0.0)
            if c.kind == "classification":  # a text label a row: a changed one is a top-1 flip
                sm.flips += sum(differ)
            agreed = not any(differ)
        else:
            delta = _abs_delta(a, b).max(axis=1) if a.shape[1] else np.zeros(rows)
            for d in delta.tolist():  # floats
                sm.delta.observe(d)
            if c.kind == "classification" and a.shape[1] >= 1:
                # scores: the top class of each row; one value a row (a label): the label itself
                if a.shape[1] > 1:
                    flips = int(np.count_nonzero(a.argmax(axis=1) != b.argmax(axis=1)))
                else:
                    flips = int(np.count_nonzero(_abs_delta(a[:, :1], b[:, :1])))
                sm.flips += flips
                agreed = flips == 0
            else:
                agreed = bool(np.all(delta <= c.atol))
        if agreed:
            sm.agreements += 1
        return not agreed


def _copy_deadline(requests: list[InferRequest]) -> float | None:
    """A remote shadow call's deadline: as long from now as the copies' callers gave their
    requests (the longest of them; None when one set none). A copy starts once primary work
    leaves time, later than its request; sent with the caller's own deadline, that wait (the
    gateway's) failed it as the shadow's error."""
    spans = [r.deadline - r.arrival for r in requests if r.deadline is not None]
    return time.monotonic() + max(spans) if spans and len(spans) == len(requests) else None


def _settle_futures(futs: list[asyncio.Future], task: asyncio.Future) -> None:
    error = None if task.cancelled() else task.exception()
    outcomes = None if task.cancelled() or error is not None else task.result()
    for k, fut in enumerate(futs):
        if fut.done():
            continue
        if task.cancelled():
            fut.cancel()
        elif outcomes is None:  # a bug in the runner: every copy of the batch failed
            fut.set_result(Outcome(None, 0.0, f"{type(error).__name__}: {error}"[:512]))
        else:
            fut.set_result(outcomes[k])


def _output(resp: InferResponse, name: str) -> np.ndarray | None:
    for t in resp.outputs:
        if t.name == name:
            return np.asarray(t.data)
    return None


def _rows(a: np.ndarray, batched: bool) -> np.ndarray:
    """Rows of an output: for a model that batches the first dimension is the batch (a 1-D
    output is one value a row: a label, a score); else, and for a scalar, the output is one row."""
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(-1, 1) if batched else a.reshape(1, -1)
    return a.reshape(a.shape[0], -1)


def _abs_delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| element by element, where NaN on both sides (and the same infinity) is no
    difference and NaN on one side only is the largest (inf): NaN itself would fall in the
    histogram's smallest bucket, turn its sum into NaN for good, and make two models that
    answer NaN alike disagree."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        d = np.abs(x - y)
    d[(x == y) | (np.isnan(x) & np.isnan(y))] = 0.0
    d[np.isnan(d)] = np.inf
    return d


def _as_bytes(v: Any) -> bytes:
    return (
        v.encode("utf-8") if isinstance(v, str) else bytes(v) if isinstance(v, bytes | bytearray) else repr(v).encode()
    )


def _summary(t: Tensor | np.ndarray, name: str = "") -> dict[str, Any]:
    """A tensor in a disagreement line: its name, shape and first values (text cut to 64
    characters, control and bidirectional characters escaped)."""
    data = np.asarray(t.data if isinstance(t, Tensor) else t)
    flat = data.reshape(-1)[:SUMMARY_VALUES]
    values = [_text(v) if isinstance(v, bytes | str) else v for v in flat.tolist()]
    label = printable(clip(t.name)) if isinstance(t, Tensor) else name
    return {"name": label, "shape": list(data.shape), "first": values}


def _text(v: bytes | str) -> str:
    return printable((v.decode("utf-8", "replace") if isinstance(v, bytes) else v)[:64])


class DisagreementLog:
    """Sampled disagreements as JSON lines: at most ``per_s`` a second, the file rotated past
    ``max_bytes`` with one old file kept (logging's rotating handler)."""

    def __init__(
        self,
        path: str,
        max_bytes: int,
        per_s: float,
        clock: Callable[[], float] = time.monotonic,
        send: Callable[[str], None] | None = None,
    ):
        """``send``: a worker process's lines go to the supervisor, the file's one writer (a
        rotating file written by several processes would lose lines)."""
        self._send = send
        self._handler: logging.Handler | None = None
        if send is None:
            self._handler = PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=1, encoding="utf-8")
            self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._per_s = per_s
        self._clock = clock
        self._window = 0.0
        self._written = 0
        self.skipped = 0

    def _allowed(self) -> bool:
        now = self._clock()
        if now - self._window >= 1.0:
            self._window, self._written = now, 0
        if self._written >= self._per_s:
            self.skipped += 1
            return False
        self._written += 1
        return True

    def emit(self, text: str) -> None:
        """A line a worker process sent (the supervisor's log): the pod's rate applies."""
        if self._handler is not None and self._allowed():
            self._handler.handle(logging.LogRecord("batchgate.disagreements", logging.INFO, "", 0, text, None, None))

    def write(
        self, runner: ShadowRunner, request: InferRequest, primary: InferResponse, mine: np.ndarray, theirs: np.ndarray
    ) -> None:
        if not self._allowed():
            return
        inputs = [_summary(t) for t in request.inputs[:SUMMARY_INPUTS]]
        line: dict[str, Any] = {
            "time": time.time(),
            "route": runner.route,
            "shadow": runner.spec.name,
            "primary": {"model": primary.model_name, "version": primary.model_version},
            "request_id": printable(request.id[:128]),
            "inputs": inputs,
            "output": runner.compare.output if runner.compare else "",
            "primary_output": _summary(mine, "primary"),
            "shadow_output": _summary(theirs, "shadow"),
        }
        text = orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        if len(text) > MAX_LINE:  # long text values: the inputs' names and shapes only
            line["inputs"] = [{"name": i["name"], "shape": i["shape"]} for i in inputs]
            text = orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        if self._send is not None:
            self._send(text)
        elif self._handler is not None:
            self._handler.handle(logging.LogRecord("batchgate.disagreements", logging.INFO, "", 0, text, None, None))

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
