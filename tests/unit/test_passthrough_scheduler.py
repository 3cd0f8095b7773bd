"""PassThroughScheduler with plain asyncio: concurrency limit, FIFO, admission,
deadlines, cancellation, drain and close.

The backend here is a scripted stand-in for ``execute``: each request runs until
the test opens its gate, so the test decides when work finishes.
"""

import asyncio
import math
import time

import pytest

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.scheduler import DrainRate, PassThroughScheduler, Ticket
from batchgate.core.signature import Checked
from batchgate.core.types import InferRequest, InferResponse


class GatedBackend:
    def __init__(self):
        self.started: list[str] = []
        self.finished: list[str] = []
        self.running = 0
        self.peak = 0
        self._gates: dict[str, asyncio.Event] = {}

    def gate(self, rid: str) -> asyncio.Event:
        return self._gates.setdefault(rid, asyncio.Event())

    def release(self, rid: str) -> None:
        self.gate(rid).set()

    async def __call__(self, batch):
        assert len(batch) == 1
        (r,) = batch
        self.started.append(r.id)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate(r.id).wait()
        finally:
            self.running -= 1
        self.finished.append(r.id)
        if r.id.startswith("fail"):
            return [GatewayError(ErrorCode.INTERNAL, f"backend failed on {r.id}")]
        return [InferResponse(r.request.model_name, "1", [], id=r.id)]


def executor(backend):
    """The scheduler's execute(batch, done) contract over an async backend."""

    def execute(batch, done):
        task = asyncio.ensure_future(backend(batch))
        task.add_done_callback(lambda t: done(t.exception() or t.result()))

    return execute


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def settle(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def rq(rid: str, deadline: float | None = None) -> Ticket:
    return Ticket(InferRequest("m", "1", (), id=rid, deadline=deadline), Checked({}, (), 1))


def submit(s, rid, deadline=None) -> asyncio.Task:
    return asyncio.ensure_future(s.submit(rq(rid, deadline)))


async def test_at_most_instances_execute_at_once():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=2, name="m")
    tasks = [submit(s, f"r{i}") for i in range(5)]
    await settle()
    assert be.started == ["r0", "r1"]
    assert s.executing == 2 and s.queue_depth == 3
    be.release("r0")
    await settle()
    assert be.started == ["r0", "r1", "r2"]
    assert s.executing == 2 and s.queue_depth == 2
    for i in range(1, 5):
        be.release(f"r{i}")
    results = await asyncio.gather(*tasks)
    assert [r.id for r in results] == [f"r{i}" for i in range(5)]
    assert be.peak == 2
    assert s.executing == 0 and s.queue_depth == 0


async def test_first_come_first_served():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, name="m")
    ids = [f"r{i}" for i in range(6)]
    tasks = [submit(s, rid) for rid in ids]
    await settle()
    for rid in ids:
        be.release(rid)
        await settle()
    await asyncio.gather(*tasks)
    assert be.started == ids


async def test_first_come_first_served_with_and_without_deadlines():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, name="m")
    first = submit(s, "busy")
    await settle()
    far = time.monotonic() + 60
    a = submit(s, "a", deadline=far)
    b = submit(s, "b")
    await settle()
    for rid in ("busy", "a", "b"):
        be.release(rid)
    await asyncio.gather(first, a, b)
    assert be.started == ["busy", "a", "b"]


async def test_full_queue_is_refused_at_once_with_retry_after():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, max_queue_size=2, name="m")
    tasks = [submit(s, f"r{i}") for i in range(3)]  # one runs, two wait
    await settle()
    assert s.queue_depth == 2
    with pytest.raises(GatewayError) as ei:
        await s.submit(rq("extra"))
    e = ei.value
    assert e.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "'m'" in e.message and "2" in e.message
    assert e.retry_after_s is not None and e.retry_after_s > 0 and math.isfinite(e.retry_after_s)
    assert "extra" not in be.started
    for i in range(3):
        be.release(f"r{i}")
    await asyncio.gather(*tasks)
    # room again once the queue has drained
    be.release("later")
    assert (await s.submit(rq("later"))).id == "later"


async def test_retry_after_shrinks_when_the_queue_drains_faster():
    """The drain rate is measured while work waits (busy time): a version that got through a
    backlog quickly gives a shorter Retry-After than one that got through it slowly."""

    def measure(gap_s: float) -> float:
        clock = FakeClock()
        be = GatedBackend()
        s = PassThroughScheduler(executor(be), instances=1, max_queue_size=3, clock=clock, name="m")

        async def run():
            backlog = [submit(s, f"r{i}") for i in range(4)]  # one running, three waiting
            await settle()
            for i in range(4):
                clock.now += gap_s
                be.release(f"r{i}")
                await settle()
            await asyncio.gather(*backlog)
            t = [submit(s, f"f{i}") for i in range(4)]  # full again: one running, three waiting
            await settle()
            with pytest.raises(GatewayError) as ei:
                await s.submit(rq("refused"))
            for i in range(4):
                be.release(f"f{i}")
                await settle()
            await asyncio.gather(*t)
            return ei.value.retry_after_s

        return run()

    fast = await measure(0.01)
    slow = await measure(1.0)
    assert 0 < fast < slow
    assert fast == pytest.approx(0.03, rel=0.01) and slow == pytest.approx(3.0, rel=0.01)


async def test_drain_rate_ignores_quiet_time_between_requests():
    """Sequential requests with idle gaps are not a measure of capacity: no backlog, no rate
    (a spike after a quiet spell is not judged by the quiet spell's throughput)."""
    clock = FakeClock()
    rate = DrainRate(clock)
    for _ in range(10):
        clock.now += 1.0
        rate.done(1, backlog=False)
    assert rate.rate() is None
    rate.done(1, backlog=True)
    clock.now += 0.05
    rate.done(1, backlog=True)
    clock.now += 0.05
    rate.done(1, backlog=False)
    assert rate.rate() == pytest.approx(20.0)
    clock.now += 50.0  # idle: not counted
    rate.done(1, backlog=False)
    assert rate.rate() == pytest.approx(20.0)


async def test_deadline_passing_while_queued_gives_deadline_exceeded_and_never_runs():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, name="m")
    busy = submit(s, "busy")
    await settle()
    t0 = time.monotonic()
    with pytest.raises(GatewayError) as ei:
        await s.submit(rq("late", deadline=time.monotonic() + 0.05))
    waited = time.monotonic() - t0
    assert ei.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert "late" in ei.value.message and "'m'" in ei.value.message
    assert 0.03 < waited < 2
    assert s.queue_depth == 0
    be.release("busy")
    await busy
    await settle()
    assert be.started == ["busy"]


async def test_deadline_already_past_at_submit_never_runs_even_with_a_free_slot():
    """(and it counts among the refusals as deadline_expired, free slot or not: such a request was
    answered DEADLINE_EXCEEDED unexecuted without being counted)"""
    clock = FakeClock(50.0)
    be = GatedBackend()
    reasons: list[str] = []
    s = PassThroughScheduler(executor(be), instances=1, clock=clock, name="m", refused=reasons.append)
    with pytest.raises(GatewayError) as ei:
        await s.submit(rq("stale", deadline=49.0))
    assert ei.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert be.started == []
    assert s.queue_depth == 0 and s.executing == 0
    busy = submit(s, "busy")
    await settle()
    with pytest.raises(GatewayError):
        await s.submit(rq("stale2", deadline=49.0))
    assert reasons == ["deadline_expired", "deadline_expired"]
    be.release("busy")
    await busy


async def test_deadline_in_the_future_runs_normally():
    clock = FakeClock(50.0)
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, clock=clock, name="m")
    be.release("ok")
    assert (await s.submit(rq("ok", deadline=60.0))).id == "ok"


async def test_deadline_passing_on_the_injected_clock_while_queued():
    clock = FakeClock(100.0)
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, clock=clock, name="m")
    busy = submit(s, "busy")
    await settle()
    waiting = submit(s, "late", deadline=105.0)
    await settle()
    clock.now = 110.0  # the deadline passes while "late" waits for the slot
    be.release("busy")
    be.release("late")
    await busy
    with pytest.raises(GatewayError) as ei:
        await waiting
    assert ei.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert be.started == ["busy"]


@pytest.mark.parametrize("with_deadline", [False, True])
async def test_cancelled_waiting_caller_never_executes(with_deadline):
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, name="m")
    busy = submit(s, "busy")
    await settle()
    gone = submit(s, "gone", deadline=time.monotonic() + 60 if with_deadline else None)
    after = submit(s, "after")
    await settle()
    assert s.queue_depth == 2
    gone.cancel()
    await settle()
    assert gone.cancelled()
    assert s.queue_depth == 1
    be.release("busy")
    be.release("after")
    await asyncio.gather(busy, after)
    await settle()
    assert be.started == ["busy", "after"]
    assert s.queue_depth == 0 and s.executing == 0


async def test_cancelled_executing_caller_keeps_its_slot_until_the_backend_finishes():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, name="m")
    running = submit(s, "running")
    await settle()
    nxt = submit(s, "next")
    await settle()
    running.cancel()
    await settle()
    assert running.cancelled()
    assert be.started == ["running"]  # "next" must not start while the backend is busy
    assert s.executing == 1 and be.running == 1
    be.release("running")
    await settle()
    assert be.started == ["running", "next"]
    be.release("next")
    assert (await nxt).id == "next"


async def test_backend_error_fails_only_that_request():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=2, name="m")
    bad = submit(s, "fail-1")
    good = submit(s, "ok-2")
    be.release("fail-1")
    be.release("ok-2")
    res = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(res[0], GatewayError)
    assert res[0].code is ErrorCode.INTERNAL and "fail-1" in res[0].message
    assert isinstance(res[1], InferResponse) and res[1].id == "ok-2"
    # the slot of the failed request was given back
    be.release("ok-3")
    assert (await s.submit(rq("ok-3"))).id == "ok-3"
    assert s.executing == 0


async def test_drain_returns_at_once_when_idle():
    s = PassThroughScheduler(GatedBackend(), instances=1, name="m")
    await asyncio.wait_for(s.drain(), 1)


async def test_drain_waits_for_queued_and_executing_work():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, name="m")
    tasks = [submit(s, "a"), submit(s, "b")]
    await settle()
    drained = asyncio.ensure_future(s.drain())
    await settle()
    assert not drained.done()
    be.release("a")
    await settle()
    assert not drained.done()  # "b" is executing now
    be.release("b")
    await asyncio.wait_for(drained, 1)
    await asyncio.gather(*tasks)
    assert be.finished == ["a", "b"]


async def test_close_refuses_new_work_but_finishes_accepted_work():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, name="m")
    accepted = [submit(s, "a"), submit(s, "b")]
    await settle()
    s.close()
    with pytest.raises(GatewayError) as ei:
        await s.submit(rq("new"))
    assert ei.value.code is ErrorCode.UNAVAILABLE
    assert "'m'" in ei.value.message
    be.release("a")
    be.release("b")
    assert [r.id for r in await asyncio.gather(*accepted)] == ["a", "b"]
    await asyncio.wait_for(s.drain(), 1)
    assert "new" not in be.started


def test_instances_must_be_positive():
    with pytest.raises(ValueError):
        PassThroughScheduler(GatedBackend(), instances=0)


def chaining(threads, run, instances: int) -> PassThroughScheduler:
    """A scheduler whose executions run ``run(batch)`` on ``threads``, chaining as
    ``LocalExecution`` does."""

    def execute(batch, done, more=None):
        threads.call(run, batch, done, more)

    return PassThroughScheduler(execute, instances=instances, name="m", chain=True)


async def test_a_thread_goes_straight_on_to_the_next_waiting_request_while_the_loop_is_busy():
    """Queued work moves ahead of new reads: with a chaining backend, the inference thread that
    finishes one request takes the next waiting one itself. While the event loop is blocked
    (busy reading thousands of connections, say), the queue keeps draining; without chaining
    only the request already running would finish."""
    from batchgate.threads import InferenceThreads

    threads = InferenceThreads(1)
    ran: list[str] = []

    def run(batch):
        time.sleep(0.005)
        ran.append(batch[0].id)
        return [InferResponse("m", "1", [], id=batch[0].id)]

    try:
        s = chaining(threads, run, instances=1)
        tasks = [submit(s, f"r{i}") for i in range(10)]
        await settle()
        assert s.queue_depth == 9
        time.sleep(0.3)  # the loop is blocked: nothing it schedules runs meanwhile
        assert len(ran) == 10, ran  # the thread drained the queue on its own
        answers = await asyncio.gather(*tasks)
        assert [a.id for a in answers] == [f"r{i}" for i in range(10)]
        assert ran == [f"r{i}" for i in range(10)]  # in arrival order
        assert s.queue_depth == 0 and s.executing == 0
    finally:
        threads.shutdown()


async def test_chained_requests_still_expire_and_leave_when_cancelled():
    """A waiting request whose deadline passed is never run by a chaining thread, and one whose
    caller left is skipped; both are accounted for."""
    from batchgate.threads import InferenceThreads

    threads = InferenceThreads(1)
    ran: list[str] = []
    gate = __import__("threading").Event()

    def run(batch):
        if batch[0].id == "first":
            gate.wait(5)
        ran.append(batch[0].id)
        return [InferResponse("m", "1", [], id=batch[0].id)]

    try:
        s = chaining(threads, run, instances=1)
        first = submit(s, "first")
        await settle()
        late = submit(s, "late", deadline=time.monotonic() + 0.05)
        gone = submit(s, "gone")
        kept = submit(s, "kept")
        await settle()
        gone.cancel()
        await asyncio.sleep(0.1)  # "late" expires while waiting
        gate.set()
        assert (await first).id == "first" and (await kept).id == "kept"
        with pytest.raises(GatewayError) as ei:
            await late
        assert ei.value.code is ErrorCode.DEADLINE_EXCEEDED
        assert ran == ["first", "kept"]
        await settle()
        assert s.queue_depth == 0 and s.executing == 0
    finally:
        threads.shutdown()


async def test_a_chaining_thread_leaves_other_work_in_the_pool_its_turn():
    """Review finding: a model with a backlog kept chaining on a shared thread, so another
    model's request (or this model's own earlier dispatch) waited until the backlog was gone.
    A thread now goes straight on only while nothing else waits for a thread."""
    from batchgate.threads import InferenceThreads

    threads = InferenceThreads(1)
    ran: list[str] = []

    def run(batch):
        time.sleep(0.002)
        ran.append(batch[0].id)
        return [InferResponse("m", "1", [], id=batch[0].id)]

    try:
        busy = chaining(threads, run, instances=2)
        other = chaining(threads, run, instances=1)
        backlog = [submit(busy, f"x{i}") for i in range(30)]
        await settle()
        lone = submit(other, "y0")
        assert (await lone).id == "y0"
        assert ran.index("y0") < 10, ran  # not after the whole backlog
        await asyncio.gather(*backlog)
        xs = [r for r in ran if r.startswith("x")]
        assert xs == [f"x{i}" for i in range(30)], xs  # and the backlog kept its order
    finally:
        threads.shutdown()


async def test_inline_executions_do_not_drain_a_long_queue_in_one_loop_turn():
    """Review finding: with executions that run inline (on the loop), one completion dispatched
    every waiting request before the loop got a turn (a 4,096-deep queue of 50 µs runs is
    ~200 ms of stall). Dispatching now yields to the loop every few dozen requests."""
    done_at: list[int] = []

    def execute(batch, done):
        done([InferResponse("m", "1", [], id=batch[0].id)])
        done_at.append(len(done_at))

    first: list = []

    def held(batch, done):  # the first request holds the instance until the test lets it go
        if not first:
            first.append(done)
            return
        execute(batch, done)

    s = PassThroughScheduler(held, instances=1, name="m")
    tasks = [submit(s, f"r{i}") for i in range(300)]
    await settle()
    assert s.queue_depth == 299
    seen: list[int] = []
    asyncio.get_running_loop().call_soon(lambda: seen.append(len(done_at)))
    first[0]([InferResponse("m", "1", [], id="r0")])  # the instance frees: the queue starts to drain
    await settle(50)
    assert seen and seen[0] < 299, seen  # the loop had a turn before the queue was empty
    await asyncio.gather(*tasks)
    assert len(done_at) == 299 and s.queue_depth == 0 and s.executing == 0


async def test_queued_requests_count_a_front_workers_call_as_the_requests_it_merged():
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, name="m")
    running = submit(s, "r0")
    heavy = Ticket(InferRequest("m", "1", (), id="r1", weight=5), Checked({}, (), 5))
    waiting = [asyncio.ensure_future(s.submit(heavy)), submit(s, "r2")]
    await settle()
    assert s.queue_depth == 2 and s.queued_requests() == 6
    for rid in ("r0", "r1", "r2"):
        be.release(rid)
    await asyncio.gather(running, *waiting)
    assert s.queued_requests() == 0


async def test_fail_queued_answers_the_waiting_requests_and_lets_the_running_one_finish():
    """What a version's retirement does once its grace period runs out: the queued requests are
    answered with the error and never reach the backend, which is about to close."""
    be = GatedBackend()
    s = PassThroughScheduler(executor(be), instances=1, name="m")
    running = submit(s, "running")
    queued = [submit(s, f"q{i}") for i in range(2)]
    await settle()
    assert s.fail_queued(GatewayError(ErrorCode.UNAVAILABLE, "gone")) == 2  # (before close, as retire does)
    s.close()
    for t in queued:
        with pytest.raises(GatewayError) as e:
            await t
        assert e.value.code is ErrorCode.UNAVAILABLE
    assert s.queue_depth == 0
    be.release("running")
    assert (await running).id == "running"
    assert be.started == ["running"]
    await asyncio.wait_for(s.drain(), 1)
