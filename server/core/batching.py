"""Schedulers: the one place a request waits between validation and the backend.

A scheduler owns a bounded queue per model version and decides when and with
what company a request runs. It knows nothing of gRPC, HTTP or ONNX Runtime: it
is given ``execute(batch) -> list[InferResponse | GatewayError]`` and a clock.

This module holds the scheduler interface and :class:`PassThroughScheduler`
(each request runs on its own, at most ``instances`` at once, first come first
served). The dynamic batcher implements the same interface.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from .errors import ErrorCode, GatewayError
from .types import InferRequest, InferResponse

# execute(batch) -> awaitable of one InferResponse or GatewayError per request, in order.
# It may return a Future (cheapest: no task is made) or a coroutine.
Execute = Callable[[list[InferRequest]], Awaitable[list["InferResponse | GatewayError"]]]
Clock = Callable[[], float]


class Scheduler(Protocol):
    @property
    def queue_depth(self) -> int:
        """Requests accepted and waiting to execute."""

    @property
    def executing(self) -> int:
        """Requests executing now."""

    async def submit(self, request: InferRequest) -> InferResponse:
        """Queue, run and answer one request; raise GatewayError on refusal or failure."""

    async def drain(self) -> None:
        """Return once nothing is queued or executing."""

    def close(self) -> None:
        """Refuse new work from now on (what is accepted still runs)."""


def deadline_error(request: InferRequest) -> GatewayError:
    rid = f"[request id: {request.id}] " if request.id else ""
    return GatewayError(
        ErrorCode.DEADLINE_EXCEEDED,
        f"{rid}deadline exceeded while queued for model '{request.model_name}'; it was not executed",
    )


class PassThroughScheduler:
    """No batching: each request executes alone, ``instances`` at a time, in arrival order."""

    def __init__(
        self,
        execute: Execute,
        instances: int = 1,
        max_queue_size: int = 0,
        clock: Clock = time.monotonic,
        name: str = "",
    ):
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self._execute = execute
        self._slots = asyncio.Semaphore(instances)
        self._max_queue = max_queue_size
        self._clock = clock
        self._name = name
        self._waiting = 0
        self._executing = 0
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_rate = _RateMeter(clock)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def executing(self) -> int:
        return self._executing

    def close(self) -> None:
        self._closed = True

    async def drain(self) -> None:
        await self._idle.wait()

    def _check_idle(self) -> None:
        if self._waiting == 0 and self._executing == 0:
            self._idle.set()

    def _release(self, _fut=None) -> None:
        self._executing -= 1
        self._slots.release()
        self._drain_rate.tick()
        self._check_idle()

    async def submit(self, request: InferRequest) -> InferResponse:
        if self._closed:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"model '{self._name}' is shutting down")
        if self._max_queue and self._waiting >= self._max_queue:
            raise GatewayError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"model '{self._name}' queue is full ({self._max_queue} requests waiting)",
                retry_after_s=self._drain_rate.seconds_to_drain(self._waiting),
            )
        self._idle.clear()
        self._waiting += 1
        try:
            if request.deadline is None:
                await self._slots.acquire()
            else:
                remaining = request.deadline - self._clock()
                if remaining <= 0:
                    raise deadline_error(request)
                try:
                    async with asyncio.timeout(remaining):
                        await self._slots.acquire()
                except TimeoutError:
                    raise deadline_error(request) from None
                if self._clock() >= request.deadline:  # the slot came, but too late
                    self._slots.release()
                    raise deadline_error(request)
        except BaseException:
            self._waiting -= 1
            self._check_idle()
            raise
        self._waiting -= 1
        self._executing += 1
        request.dispatched = self._clock()
        task = asyncio.ensure_future(self._execute([request]))
        task.add_done_callback(self._release)
        # A caller that goes away must not free the slot while the backend still runs.
        (result,) = await asyncio.shield(task)
        if isinstance(result, GatewayError):
            raise result
        return result


class _RateMeter:
    """Completions per second, smoothed; used to suggest a Retry-After."""

    def __init__(self, clock: Clock, half_life_s: float = 2.0):
        self._clock = clock
        self._last = clock()
        self._rate = 0.0
        self._half_life = half_life_s

    def tick(self) -> None:
        now = self._clock()
        dt = max(now - self._last, 1e-6)
        self._last = now
        alpha = 1.0 - 0.5 ** (dt / self._half_life)
        self._rate += alpha * (1.0 / dt - self._rate)

    def seconds_to_drain(self, depth: int) -> float:
        if self._rate <= 0:
            return 1.0
        return max(0.001, depth / self._rate)
