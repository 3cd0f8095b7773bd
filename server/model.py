"""One loaded model version: its config, backend, scheduler, statistics and metrics.

A ``ServedModel`` is what a request holds on to from the moment it is resolved
until it is answered. Replacing a version never touches the old object: new
requests resolve to the new one, and :meth:`retire` closes the old backend only
after the requests already on it have finished.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Executor

from tritonclient.grpc import model_config_pb2 as mc

from .backends.base import Backend
from .core.batching import BatcherConfig, DynamicBatcher, merge, split
from .core.scheduler import PassThroughScheduler
from .core.errors import ErrorCode, GatewayError
from .core.stats import ModelStats
from .core.types import InferRequest, InferResponse, Tensor
from .monitoring.metrics import ModelMetrics
from .repository.config import signature_of
from .workers import WorkerPool

log = logging.getLogger("batchgate.model")
_perf_ns = time.perf_counter_ns
_INLINE_AFTER = 16  # executions of a batch size timed before that size may run inline


class _Execution:
    """A running remote execution: cancelled when every caller of its batch has gone."""

    __slots__ = ("task", "waiting")

    def __init__(self, task: asyncio.Future, waiting: int):
        self.task = task
        self.waiting = waiting


class ServedModel:
    def __init__(
        self,
        config: mc.ModelConfig,
        version: str,
        backend: Backend,
        pool: Executor,
        workers: WorkerPool,
        metrics: ModelMetrics,
        max_queue_size: int,
        inline_max_us: int = 0,
        batching_policy: str = "triton",
    ):
        self.name = config.name
        self.version = version
        self.config = config
        self.signature = signature_of(config)
        self.backend = backend
        # A remote backend's infer() is a coroutine: it runs on the loop, never on a worker.
        self.remote = bool(getattr(backend, "is_async", False))
        self.stats = ModelStats(self.name, version)
        self._output_types = {t.name: t.dtype.v2 for t in self.signature.outputs}
        self._stats_lock = threading.Lock()  # executions are recorded from worker threads
        self._pool = pool  # for blocking housekeeping (closing the backend)
        self._workers = workers  # for executions
        self._metrics = metrics
        self.instances = max(1, sum(g.count or 1 for g in config.instance_group) or 1)
        policy = config.dynamic_batching.default_queue_policy
        if config.HasField("dynamic_batching") and config.max_batch_size > 0:
            db = config.dynamic_batching
            self.scheduler = DynamicBatcher(self._execute, BatcherConfig(
                max_batch_size=config.max_batch_size,
                max_queue_delay_s=db.max_queue_delay_microseconds / 1e6,
                preferred_batch_sizes=tuple(db.preferred_batch_size),
                instances=self.instances,
                max_queue_size=policy.max_queue_size or max_queue_size,
                priority_levels=db.priority_levels,
                default_priority_level=db.default_priority_level,
                default_timeout_s=policy.default_timeout_microseconds / 1e6,
                timeout_action_delay=policy.timeout_action == mc.ModelQueuePolicy.DELAY,
                preserve_ordering=db.preserve_ordering,
                policy=batching_policy,
            ), name=self.name, refused=metrics.refused)
        else:
            self.scheduler = PassThroughScheduler(
                self._execute,
                instances=self.instances,
                max_queue_size=policy.max_queue_size or max_queue_size,
                name=self.name,
                refused=metrics.refused,
            )
        self._inline_max_ns = inline_max_us * 1000
        self._timed = 0
        self.inline_runs = 0  # executions that ran on the event loop
        # Per batch size (rows): the recent execution times, and the fastest of them.
        self._recent_ns: dict[int, deque[float]] = {}
        self._fastest_ns: dict[int, float] = {}
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.track(self, lambda: self.scheduler.queue_depth, lambda: self.in_flight,
                      lambda: self.scheduler.oldest_age_s(), self.ready if self.remote else None)

    def ready(self) -> bool:
        """Whether this version can serve now (a remote model needs an upstream in rotation)."""
        backend = self.backend
        return backend is not None and (not self.remote or backend.ready())

    async def infer(self, request: InferRequest) -> InferResponse:
        if self.remote and not self.backend.ready():
            e = self.backend.unavailable()  # at once, not after a wait in the queue
            self.reject(request, e)
            raise e
        self.in_flight += 1
        if self.in_flight == 1:
            self._idle.clear()
        start = _perf_ns()
        status = "OK"
        try:
            return await self.scheduler.submit(request)
        except GatewayError as e:
            status = e.code.value
            raise
        except asyncio.CancelledError:
            status = ErrorCode.CANCELLED.value
            ex = request.execution
            if ex is not None:  # a remote call: cancel it once none of its callers waits
                ex.waiting -= 1
                if ex.waiting <= 0:
                    ex.task.cancel()
            raise
        finally:
            # Request figures are written only here, on the event loop, so they need no lock
            # (executions, which may finish on worker threads, write other fields under one).
            elapsed = _perf_ns() - start
            m = self._metrics
            if request.dispatched:
                queued = request.dispatched - request.arrival
                self.stats.record_request(status == "OK", elapsed, int(queued * 1e9))
                m.queue.observe(queued)
            else:
                self.stats.record_request(status == "OK", elapsed)
            m.request_done(request.protocol, status, elapsed / 1e9)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def idle(self) -> None:
        """Return once no request is in flight on this version."""
        await self._idle.wait()

    def reject(self, request: InferRequest, error: GatewayError) -> None:
        """Count a request refused before it was queued (e.g. it failed validation)."""
        self.stats.record_request(False, 0)
        self._metrics.request_done(request.protocol, error.code.value, 0.0)

    def _execute(self, batch: list[InferRequest], done) -> None:
        """Run a batch; ``done(answers)`` is called on the loop when it has finished.

        A batch runs on a worker thread, unless this version's recent executions of batches
        of this many rows have been measured to take less than ``inline_max_us``: then the hand-off
        to a thread and back would cost the event loop more than the execution itself
        (``bench/serving.py``), so it runs here, on the loop, bounded by that threshold."""
        if self.remote:
            self._execute_remote(batch, done)
            return
        rows = batch[0].checked.batch_size if len(batch) == 1 else sum(r.checked.batch_size for r in batch)
        if self._inline_max_ns and self._fastest_ns.get(rows, math.inf) <= self._inline_max_ns:
            self.inline_runs += 1
            done(self._run_batch(batch))
        else:
            self._workers.call(self._run_batch, batch, done)

    def _execute_remote(self, batch: list[InferRequest], done) -> None:
        task = asyncio.ensure_future(self._run_remote(batch))
        ex = _Execution(task, len(batch))
        for r in batch:
            r.execution = ex

        def finished(t: asyncio.Future) -> None:
            for r in batch:
                r.execution = None
            if t.cancelled():
                done([GatewayError(ErrorCode.CANCELLED, "cancelled: every caller of the batch went away")]
                     * len(batch))
            else:
                done(t.result())

        task.add_done_callback(finished)

    @staticmethod
    def _inputs(batch: list[InferRequest]) -> tuple[dict, tuple[str, ...]]:
        """The feeds and output names of a batch: several requests are merged along the batch
        dimension (the codecs hand over C-contiguous arrays: a lone request needs nothing)."""
        if len(batch) == 1:
            return batch[0].checked.feeds, batch[0].checked.output_names
        return (merge([r.checked.feeds for r in batch]),
                tuple(dict.fromkeys(n for r in batch for n in r.checked.output_names)))

    def _answers(self, batch: list[InferRequest], names: tuple[str, ...], arrays: list) -> tuple[list, int]:
        """Each caller's answer, exactly its own rows; and the rows of the batch."""
        types = self._output_types
        if len(batch) == 1:
            request = batch[0]
            return [InferResponse(self.name, self.version,
                                  [Tensor(n, types[n], a.shape, a) for n, a in zip(names, arrays)],
                                  id=request.id)], request.checked.batch_size
        sizes = [r.checked.batch_size for r in batch]
        answers = []
        for r, parts in zip(batch, split(arrays, sizes)):
            got = dict(zip(names, parts))
            answers.append(InferResponse(
                self.name, self.version,
                [Tensor(n, types[n], got[n].shape, got[n]) for n in r.checked.output_names], id=r.id))
        return answers, sum(sizes)

    def _failure(self, batch: list[InferRequest], e: Exception) -> list:
        if isinstance(e, GatewayError):
            return [e] * len(batch)
        # the engine refused or crashed: this batch fails, the model serves on
        log.warning("model '%s' version %s failed to execute: %s", self.name, self.version, e)
        return [GatewayError(ErrorCode.INTERNAL, f"model '{self.name}' version {self.version} failed: {e}")] * len(batch)

    async def _run_remote(self, batch: list[InferRequest]) -> list:
        """A remote model's batch: the upstream call runs on the loop. Its timeout is the
        latest deadline of the batch's callers (none if any caller has none)."""
        deadlines = [r.deadline for r in batch]
        deadline = None if None in deadlines else max(deadlines)
        try:
            t0 = _perf_ns()
            feeds, names = self._inputs(batch)
            t1 = _perf_ns()
            arrays = await self.backend.infer(feeds, names, deadline, batch[0].id if len(batch) == 1 else "")
            t2 = _perf_ns()
            answers, rows = self._answers(batch, names, arrays)
            t3 = _perf_ns()
        except Exception as e:  # noqa: BLE001 - each caller gets the error; the model serves on
            return self._failure(batch, e)
        with self._stats_lock:
            self._record(rows, len(batch), t0, t1, t2, t3)
        return answers

    def _record(self, rows: int, requests: int, t0: int, t1: int, t2: int, t3: int) -> None:
        """Statistics and metrics of one execution (the caller holds the statistics lock)."""
        self.stats.record_execution(rows, requests, t1 - t0, t2 - t1, t3 - t2)
        m = self._metrics
        m.executions += 1
        m.inferences += rows
        m.batch_rows[rows] = m.batch_rows.get(rows, 0) + 1
        m.compute.observe((t3 - t0) / 1e9)

    def _run_batch(self, batch: list[InferRequest]) -> list:
        """Prepare inputs, execute, collect outputs, record figures (on a worker thread, or
        on the loop for a model measured fast enough). A batch of several requests is merged
        along the batch dimension and each caller gets back exactly its own rows."""
        try:
            t0 = _perf_ns()
            feeds, names = self._inputs(batch)
            t1 = _perf_ns()
            arrays = self.backend.run(feeds, names)
            t2 = _perf_ns()
            answers, rows = self._answers(batch, names, arrays)
            t3 = _perf_ns()
        except Exception as e:  # noqa: BLE001
            return self._failure(batch, e)
        took = t3 - t0
        with self._stats_lock:
            self._record(rows, len(batch), t0, t1, t2, t3)
            # The fastest of the recent executions: timings on a worker thread include waits
            # for the GIL while the loop is busy, which say nothing of the model's own cost.
            recent = self._recent_ns.get(rows)
            if recent is None:
                recent = self._recent_ns[rows] = deque(maxlen=_INLINE_AFTER)
            recent.append(took)
            if len(recent) == _INLINE_AFTER:  # decide only once a size has been timed enough
                self._fastest_ns[rows] = min(recent)
            self._timed += 1
        return answers

    async def retire(self, grace_s: float | None = None) -> None:
        """Wait for the requests on this version to finish, then free the backend."""
        self.scheduler.close()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.warning("model '%s' version %s retired with %d requests still running",
                        self.name, self.version, self.in_flight)
        self._metrics.retired(self)
        backend, self.backend = self.backend, None
        if backend is not None:
            if self.remote:
                await backend.aclose()
                return
            # Close in a thread: a run may still hold the session if the grace period ran out.
            await asyncio.get_running_loop().run_in_executor(self._pool, backend.close)
