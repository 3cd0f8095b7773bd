"""One loaded model version: its config, backend, scheduler, statistics and metrics.

A ``ModelVersion`` is what a request holds on to from the moment it is resolved
until it is answered. Replacing a version never touches the old object: new
requests resolve to the new one, and :meth:`ModelVersion.retire` closes the old
backend only after the requests already on it have finished.

How a batch executes is decided once, when the version is built, by the kind of
its backend: :class:`LocalExecution` (an inference thread, or inline on the event
loop for batch sizes measured fast enough) or :class:`RemoteExecution` (a
coroutine on the loop, cancelled once every caller of its batch has gone).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from .backends.base import Backend, RemoteBackend
from .backends.v2_messages import string_field
from .core.batcher_config import BatcherConfig
from .core.batching import DynamicBatcher, check_rows, merge, split
from .core.errors import ErrorCode, GatewayError, cancelled_code, engine_message
from .core.scheduler import PassThroughScheduler, Ticket
from .core.signature import ModelSignature, with_parameters
from .core.stats import ModelStats
from .core.types import InferRequest, InferResponse, Tensor
from .execution import LocalExecution, RemoteExecution, _log_failure
from .monitoring.metrics import ModelMetrics
from .monitoring.tracing import TraceHeaders
from .security.limits import Capacity
from .threads import InferenceThreads

log = logging.getLogger("batchgate.model")


_perf_ns = time.perf_counter_ns


class ModelVersion:
    def __init__(
        self,
        config: mc.ModelConfig,
        signature: ModelSignature,
        version: str,
        backend: Backend,
        schedule: BatcherConfig | None,
        instances: int,
        max_queue_size: int,
        threads: InferenceThreads,
        metrics: ModelMetrics,
        inline_max_us: int = 0,
    ):
        """``schedule`` is the dynamic batcher's configuration, or None for no batching
        (``repository/config.py`` derives both from the model config)."""
        self.name = config.name
        self.version = version
        self.config = config
        self.signature = signature
        self.backend: Backend | None = backend
        # (an upstream reads parameters: Triton's sequence_id, a Python model's own; an open
        # signature groups by them already)
        self._forwards_parameters = backend.kind == "remote" and not signature.open
        self.stats = ModelStats(self.name, version)
        self.metrics = metrics
        self.instances = instances
        self.stats_lock = threading.Lock()  # executions are recorded from inference threads
        # Protocols are structural: the backend's declared kind says which one it implements.
        if backend.kind == "remote":
            self.execution: LocalExecution | RemoteExecution = RemoteExecution(self, backend, threads)  # type: ignore[arg-type]
        else:
            self.execution = LocalExecution(self, backend, threads, inline_max_us)  # type: ignore[arg-type]
        # Whether the version can take work now: a remote model refuses at once while no
        # upstream is in rotation; a local one always can (no call at all on its requests).
        self._admit = self.execution.admit if isinstance(self.execution, RemoteExecution) else None
        execute = self.execution.execute
        if schedule is not None:
            self.scheduler: DynamicBatcher | PassThroughScheduler = DynamicBatcher(
                execute, schedule, name=self.name, refused=metrics.refused
            )
        else:
            self.scheduler = PassThroughScheduler(
                execute,
                instances=instances,
                max_queue_size=max_queue_size,
                name=self.name,
                refused=metrics.refused,
                chain=isinstance(self.execution, LocalExecution),
            )
        # A remote model that does not batch at the gateway may forward a caller's serialized
        # gRPC request as it came (``forward``); None otherwise.
        self.forwarder: RemoteBackend | None = None
        if (
            backend.kind == "remote"
            and isinstance(self.scheduler, PassThroughScheduler)
            and getattr(backend, "raw_forwarding", False)
        ):
            self.forwarder = backend  # type: ignore[assignment]
        self._threads = threads
        self._answer_suffix = string_field(1, self.name) + string_field(2, version)
        self.in_flight = 0  # submitted and not yet answered (client requests: see InferRequest.weight)
        self.weighted = False  # some request stood for several (front mode's model owner)
        self.admitted = 0  # admitted by the data plane (security/limits.py) and not yet released
        self.capacity = Capacity()  # for the queue_target_ms rule (security/limits.py)
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.track(
            self,
            self.stats,
            self.queue_depth,
            lambda: max(self.in_flight, self.admitted),
            self.scheduler.oldest_age_s,
            self.ready if backend.kind == "remote" else None,
        )

    def queue_depth(self) -> int:
        """Requests admitted and not yet executing, whatever the scheduler: those in its queue,
        and those admitted whose body is still being read or decoded. (The model owner of front
        mode counts each queued call as the client requests it merged.)"""
        sched = self.scheduler
        queued = sched.queued_requests() if self.weighted else sched.queue_depth
        return max(queued, self.admitted - sched.executing)

    def ready(self) -> bool:
        """Whether this version can serve now (a remote model needs an upstream in rotation)."""
        backend = self.backend
        return backend is not None and backend.ready()

    def not_ready_reason(self) -> str:
        backend = self.backend
        return "retired" if backend is None else backend.not_ready_reason()

    def loaded_in(self, seconds: float) -> None:
        self.metrics.load_seconds = seconds

    async def submit(self, request: InferRequest) -> InferResponse:
        """Check ``request`` against the signature, queue it and await its answer. Each call
        is a submission of its own (its own ticket): the same request may be submitted again."""
        try:
            checked = self.signature.check(request)
            if self._forwards_parameters:
                checked = with_parameters(request, checked)
            if self._admit is not None:
                self._admit()
        except GatewayError as e:
            if request.weight == 1 or not e.resent_alone():  # (else each of its requests comes again)
                self.reject(request, e)
            raise
        ticket = Ticket(request, checked)
        weight = request.weight
        if weight != 1:  # (a front worker's call to the model owner: counted as its requests)
            self.weighted = True
        self._started(weight)
        start = _perf_ns()
        status, counted = "OK", True
        try:
            resp = await self.scheduler.submit(ticket)
            sink = request.sink
            if sink is not None:  # outputs to shared memory: part of the request, counted with it
                sink(resp)
            return resp
        except GatewayError as e:
            status = e.code.value
            counted = weight == 1 or not e.resent_alone()  # (the owner: a front worker's call, sent again)
            raise
        except asyncio.CancelledError:
            status = cancelled_code(request.deadline, request.arrival).value
            ex = ticket.execution
            if ex is not None:  # a remote call: cancel it once none of its callers waits
                ex.waiting -= 1
                if ex.waiting <= 0:
                    ex.task.cancel()
            raise
        finally:
            queued = ticket.dispatched - request.arrival if ticket.dispatched else None
            self._answered(request.protocol, status, _perf_ns() - start, queued, weight, counted)
            note = request.note
            if note is not None:  # the access log's (and the trace's) figures of this request
                note.queue_s = queued

    def _started(self, weight: int = 1) -> None:
        if not self.in_flight:
            self._idle.clear()
        self.in_flight += weight

    def _answered(self, protocol: str, status: str, ns: int, queued_s: float | None, weight=1, count=True) -> None:
        """A request's figures (``queued_s``: its wait in the queue, None if it never left it; ``weight``:
        the client requests it stands for; ``count`` False: none, they come again). Only on the event
        loop: no lock (executions, which may finish on inference threads, write others under one)."""
        m = self.metrics
        if count:
            self.stats.record_request(status == "OK", ns, None if queued_s is None else int(queued_s * 1e9), weight)
            if queued_s is not None:
                m.queue.observe(queued_s, weight)
            m.request_done(protocol, status, ns / 1e9, weight)
        self.in_flight -= weight
        if self.in_flight == 0:
            self._idle.set()

    def forward(
        self, raw: bytes, rows: int, deadline: float | None, trace: TraceHeaders | None = None
    ) -> Awaitable[bytes] | None:
        """Forward a caller's serialized ModelInferRequest to the upstream without decoding its
        tensors, and answer the upstream's serialized response as it came (under this model's
        name and version); None when it cannot go that way now (no forwarder, or every instance
        busy: the request then queues on the ordinary path). ``rows``: the request's batch size,
        for the statistics. Not a coroutine: the refusal is known at once."""
        if self.forwarder is None or not self.scheduler.take_slot():  # type: ignore[union-attr]
            return None
        return self._forward(raw, rows, deadline, trace)

    async def _forward(self, raw: bytes, rows: int, deadline: float | None, trace: TraceHeaders | None) -> bytes:
        backend = self.forwarder
        assert backend is not None
        forwards = self.metrics.forwards
        forwards["raw"] = forwards.get("raw", 0) + 1
        self._started()
        threads = self._threads
        threads.away += 1
        start = _perf_ns()
        status = "OK"
        try:
            return await backend.forward(raw, deadline, trace) + self._answer_suffix
        except GatewayError as e:
            status = e.code.value
            raise
        except asyncio.CancelledError:
            status = cancelled_code(deadline).value
            raise
        finally:
            end = _perf_ns()
            threads.away -= 1
            self.scheduler.give_slot()  # type: ignore[union-attr]
            if status == "OK":  # a remote model's executions are all recorded on the event loop: no lock
                self.record(rows, 1, start, start, end, end)
            self._answered("grpc", status, end - start, 0.0)

    async def idle(self) -> None:
        """Return once no request is in flight on this version."""
        await self._idle.wait()

    def reject(self, request: InferRequest, error: GatewayError) -> None:
        """Count a request refused before it was queued (e.g. it failed validation)."""
        self.stats.record_request(False, 0)
        self.metrics.request_done(request.protocol, error.code.value, 0.0)

    # ------------------------------------------------------------------ shared by both executions
    def inputs(self, batch: list[Ticket]) -> tuple[dict, tuple[str, ...]]:
        """The feeds and output names of a batch: several requests are merged along the batch
        dimension (the codecs hand over C-contiguous arrays: a lone request needs nothing)."""
        if len(batch) == 1:
            return batch[0].checked.feeds, batch[0].checked.output_names
        return (
            merge([t.checked.feeds for t in batch]),
            tuple(dict.fromkeys(n for t in batch for n in t.checked.output_names)),
        )

    def answers(
        self,
        batch: list[Ticket],
        names: tuple[str, ...],
        arrays: list,
        types: dict[str, str] | None = None,
        params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[list, int]:
        """Each caller's answer, exactly its own rows; and the rows of the batch. ``types``: the
        outputs' V2 datatypes when the signature declares none (as the upstream answered them);
        ``params``: parameters of a remote answer ("": its own, else by output), each caller's."""
        if types is None:
            types = self.signature.output_types
        if params:
            return _with_parameters(self.answers(batch, names, arrays, types), params)
        if len(batch) == 1:
            ticket = batch[0]
            if self.signature.max_batch_size > 0 and not self.signature.open:  # its own rows, as split checks
                check_rows(arrays, ticket.checked.batch_size)
            note = ticket.request.note
            if note is not None:
                note.batch_rows = ticket.checked.batch_size
            return [
                InferResponse(
                    self.name,
                    self.version,
                    [Tensor(n, types[n], a.shape, a) for n, a in zip(names, arrays)],
                    id=ticket.request.id,
                )
            ], ticket.checked.batch_size
        sizes = [t.checked.batch_size for t in batch]
        rows = sum(sizes)
        answers = []
        for t, parts in zip(batch, split(arrays, sizes)):
            got = dict(zip(names, parts))
            note = t.request.note
            if note is not None:
                note.batch_rows = rows
            answers.append(
                InferResponse(
                    self.name,
                    self.version,
                    [Tensor(n, types[n], got[n].shape, got[n]) for n in t.checked.output_names or names],
                    id=t.request.id,
                )
            )
        return answers, rows

    def failure(self, batch: list[Ticket], e: Exception, quiet: bool = False) -> list:
        if isinstance(e, GatewayError):
            return [e] * len(batch)
        name, version = self.name, self.version  # (the engine failed: this batch fails, the model serves on)
        if not quiet:
            lines, text = self.metrics.failure_lines, str(e)[:1024]
            _log_failure(lines, "model '%s' version %s failed to execute: %s", name, version, text)
        said = GatewayError(ErrorCode.INTERNAL, f"model '{name}' version {version} failed: {engine_message(e)}")
        return [said] * len(batch)

    def record(self, rows: int, requests: int, t0: int, t1: int, t2: int, t3: int) -> None:
        """Statistics and metrics of one execution (the caller holds the statistics lock)."""
        self.stats.record_execution(rows, requests, t1 - t0, t2 - t1, t3 - t2)
        m = self.metrics
        m.executions += 1
        m.inferences += rows
        m.batch_rows[rows] = m.batch_rows.get(rows, 0) + 1
        m.compute.observe((t3 - t0) / 1e9)

    async def retire(self, grace_s: float | None = None) -> None:
        """Wait for the requests on this version to finish, those admitted whose body is still
        arriving included (a reload swapped them out: the scheduler still takes them), then
        free the backend. Nothing new is admitted to a version the repository swapped out."""
        try:
            await asyncio.wait_for(self._quiet(), grace_s)
            late = None
        except TimeoutError:
            busy = max(self.in_flight, self.admitted)
            log.warning("model '%s' version %s retired with %d requests running", self.name, self.version, busy)
            late = f"model '{self.name}' version {self.version} was unloaded or replaced while this request was queued"
        if late is not None:  # those still queued would else go to the backend closed below, and fail on it
            # (before close, which sends at once whatever is still queued)
            self.scheduler.fail_queued(GatewayError(ErrorCode.UNAVAILABLE, f"{late}; it was not executed"))
        self.scheduler.close()
        self.metrics.retired(self)
        backend, self.backend = self.backend, None
        if backend is not None:
            await backend.close()

    async def _quiet(self) -> None:
        while self.admitted > 0 or self.in_flight:  # (admissions end in security/limits.py)
            await asyncio.sleep(0.01)

    async def close_now(self) -> None:
        """Stop taking work and close the backend without waiting (shutdown after drain)."""
        self.scheduler.close()
        await self.scheduler.drain()
        backend, self.backend = self.backend, None
        if backend is not None:
            await backend.close()


def _with_parameters(done: tuple[list, int], params: Mapping[str, Mapping[str, Any]]) -> tuple[list, int]:
    answers, rows = done
    own = params.get("")
    return [
        a._replace(
            outputs=[t._replace(parameters=params.get(t.name) or t.parameters) for t in a.outputs],
            parameters=own or a.parameters,
        )
        for a in answers
    ], rows
