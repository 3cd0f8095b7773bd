"""Admission: how much work the process takes on, decided before a request is decoded.

A request is admitted (or refused) from what is known before its tensors are: the model it
names, and the state of that model's queue. Admitted work is bounded three ways, each a
setting, and each refusal is RESOURCE_EXHAUSTED / 429 with a Retry-After and the setting
named at the end of the message (so it is counted under that reason):

- ``max_inflight_requests``: requests admitted and not yet answered, all models together;
- ``max_queue_size``: a model version's admitted requests not yet executing (its queue, plus
  requests still being read or decoded on their way to it);
- ``max_queue_wait_ms``: the wait that queue is expected to impose on one more request, judged
  from the rate at which the version gets through work while it has work waiting.

Refusing here costs a dictionary lookup and a few comparisons; the body is never read (HTTP)
and no tensor is decoded (gRPC), so under overload a refusal is far cheaper than an answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.errors import ErrorCode, GatewayError

if TYPE_CHECKING:
    from ..model import ModelVersion


# Reasons in batchgate_refusals_total (with the scheduler's queue_full and deadline reasons).
INFLIGHT_LIMIT = "inflight_limit"
QUEUE_FULL = "queue_full"
QUEUE_WAIT = "queue_wait"


class Admission:
    __slots__ = ("max_inflight", "max_wait_s", "inflight")

    def __init__(self, max_inflight: int, max_queue_wait_s: float):
        self.max_inflight = max_inflight
        self.max_wait_s = max_queue_wait_s  # 0 = no bound on the expected wait
        self.inflight = 0  # admitted and not yet released, all versions together

    def admit(self, version: ModelVersion) -> None:
        """Count one request in on ``version``, or raise RESOURCE_EXHAUSTED. Every admitted
        request must be released exactly once (:meth:`release`), whatever becomes of it."""
        if self.inflight >= self.max_inflight:
            version.metrics.refused(INFLIGHT_LIMIT)
            raise GatewayError(
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
                version.metrics.refused(QUEUE_FULL)
                raise GatewayError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"model '{version.name}' queue is full: {bound} requests waiting (max_queue_size)",
                    retry_after_s=sched.drain_rate.seconds_to_drain(waiting),
                )
            if self.max_wait_s:
                rate = sched.drain_rate.rate()
                if rate is not None and waiting / rate > self.max_wait_s:
                    wait = waiting / rate
                    version.metrics.refused(QUEUE_WAIT)
                    raise GatewayError(
                        ErrorCode.RESOURCE_EXHAUSTED,
                        f"model '{version.name}' has about {wait * 1000:.0f} ms of work queued, more than "
                        f"the {self.max_wait_s * 1000:.0f} ms a request may be made to wait (max_queue_wait_ms)",
                        retry_after_s=wait - self.max_wait_s,
                    )
        version.admitted += 1
        self.inflight += 1

    def release(self, version: ModelVersion) -> None:
        version.admitted -= 1
        self.inflight -= 1
