"""DynamicBatcher timing and admission rules on a fake clock, with plain asyncio.

The backend is a recorder: it keeps each batch until the test finishes it, so the test
decides when instances free up; the clock moves only when the test moves it, and
``tick()`` asks the batcher to look again (its own timer does that in production)."""

import asyncio

import numpy as np
import pytest

from batchgate.core.batcher_config import TRITON, WORK_CONSERVING, BatcherConfig, QueuePolicy
from batchgate.core.batching import DynamicBatcher, shape_key
from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.scheduler import Ticket
from batchgate.core.signature import Checked
from batchgate.core.types import InferRequest, InferResponse, Tensor


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Recorder:
    def __init__(self):
        self.batches: list[list[InferRequest]] = []
        self._done = []

    def __call__(self, batch, done):
        self.batches.append(batch)
        self._done.append((batch, done))

    def ids(self):
        return [[r.id for r in b] for b in self.batches]

    def finish(self, i=0, fail=False):
        batch, done = self._done.pop(i)
        if fail:
            done([GatewayError(ErrorCode.INTERNAL, "backend failed")] * len(batch))
        else:
            done([InferResponse("m", "1", [], id=r.id) for r in batch])


def rq(clock, rid, rows=1, width=4, deadline=None, priority=0):
    data = np.zeros((rows, width), np.float32)
    r = InferRequest(
        "m",
        "1",
        (Tensor("x", "FP32", (rows, width), data),),
        id=rid,
        arrival=clock(),
        deadline=deadline,
        priority=priority,
    )
    return Ticket(r, Checked({"x": data}, ("y",), rows))


async def settle():
    for _ in range(10):
        await asyncio.sleep(0)


def make(**kw):
    clock, rec = Clock(), Recorder()
    cfg = dict(max_batch_size=8, max_queue_delay_s=0.010, instances=1)
    cfg.update(kw)
    return clock, rec, DynamicBatcher(rec, BatcherConfig(**cfg), clock=clock, name="m")


def go(b, r):
    return asyncio.ensure_future(b.submit(r))


async def test_waits_for_the_delay_counted_from_the_oldest_arrival():
    clock, rec, b = make()
    t1 = go(b, rq(clock, "a"))
    clock.now += 0.004
    t2 = go(b, rq(clock, "b"))
    await settle()
    assert rec.batches == []  # neither full nor due
    clock.now += 0.005  # 9 ms after "a": not yet
    b.tick()
    assert rec.batches == []
    clock.now += 0.001  # 10 ms after "a" (only 6 ms after "b"): due
    b.tick()
    assert rec.ids() == [["a", "b"]]
    rec.finish()
    assert [(await t).id for t in (t1, t2)] == ["a", "b"]


async def test_a_full_batch_goes_at_once_and_rows_never_exceed_the_maximum():
    clock, rec, b = make(max_batch_size=4)
    tasks = [go(b, rq(clock, f"r{i}", rows=2)) for i in range(3)]
    await settle()
    assert rec.ids() == [["r0", "r1"]]  # 4 rows: full; r2 would make 6
    rec.finish()
    await settle()
    clock.now += 0.010
    b.tick()
    assert rec.ids()[-1] == ["r2"]
    rec.finish()
    await asyncio.gather(*tasks)


async def test_preferred_batch_size_goes_at_once():
    clock, rec, b = make(preferred_batch_sizes=(2,))
    tasks = [go(b, rq(clock, "a")), go(b, rq(clock, "b"))]
    await settle()
    assert rec.ids() == [["a", "b"]]
    rec.finish()
    await asyncio.gather(*tasks)


# Triton's rule (dynamic_batch_scheduler.cc GetDynamicBatch), walking the queue: a batch at or
# past the largest preferred size goes at once; one the next request would take past it is cut
# before that request and goes at once; a preferred size met exactly goes; else wait the delay.
@pytest.mark.parametrize(
    "preferred, max_batch, rows, at_once",
    [
        ((4,), 16, [5], [[0]]),  # one request over the largest preferred size: alone, at once
        ((4,), 16, [8], [[0]]),
        ((4,), 16, [3, 3], [[0]]),  # 3 + 3 passes 4: the first goes, the second waits its turn
        ((4,), 16, [3, 14], [[0]]),  # the next does not fit at all: the same cut
        ((4,), 16, [5, 1], [[0]]),
        ((4,), 16, [3, 1, 2], [[0, 1]]),  # 4 exactly
        ((2, 4), 16, [2, 1, 3], [[0]]),  # the last preferred size met before passing 4
        ((), 8, [5, 4], [[0]]),  # no preferred size: max_batch_size is the largest, as in Triton
        ((4,), 16, [3], []),  # nothing preferred can be formed: waits for the delay
        ((4,), 16, [1, 2], []),
        ((), 8, [5, 3], [[0, 1]]),  # full
    ],
)
async def test_what_goes_before_the_delay_as_triton_forms_batches(preferred, max_batch, rows, at_once):
    clock, rec, b = make(max_batch_size=max_batch, preferred_batch_sizes=preferred, max_queue_delay_s=2.0)
    tasks = [go(b, rq(clock, str(i), rows=n)) for i, n in enumerate(rows)]
    await settle()
    assert rec.ids() == [[str(i) for i in batch] for batch in at_once]
    while rec._done:
        rec.finish()
        await settle()
    clock.now += 2.0  # the rest goes when its delay is up
    b.tick()
    await settle()
    sent = sorted(r for batch in rec.ids() for r in batch)
    assert sent == [str(i) for i in range(len(rows))]
    while rec._done:
        rec.finish()
        await settle()
    await asyncio.gather(*tasks)


async def test_a_cut_batch_leaves_the_rest_to_wait_its_own_delay():
    clock, rec, b = make(max_batch_size=16, preferred_batch_sizes=(4,), max_queue_delay_s=2.0, instances=2)
    first = go(b, rq(clock, "a", rows=3))
    clock.now += 1.0
    second = go(b, rq(clock, "b", rows=3))
    await settle()
    assert rec.ids() == [["a"]]  # at once, though "b" came 1 s later
    clock.now += 1.5  # 2.5 s after "a", 1.5 s after "b": not due
    b.tick()
    assert rec.ids() == [["a"]]
    clock.now += 0.5  # 2 s after "b"
    b.tick()
    assert rec.ids() == [["a"], ["b"]]
    rec.finish()
    rec.finish()
    await asyncio.gather(first, second)


async def test_past_the_delay_every_candidate_goes_together():
    clock, rec, b = make(max_batch_size=16, preferred_batch_sizes=(4,), max_queue_delay_s=2.0)
    busy = go(b, rq(clock, "busy", rows=4))
    await settle()
    queued = [go(b, rq(clock, "a", rows=3)), go(b, rq(clock, "b", rows=3))]
    await settle()
    clock.now += 2.0  # both waited the delay while the instance was busy
    rec.finish()
    await settle()
    assert rec.ids() == [["busy"], ["a", "b"]]
    rec.finish()
    await asyncio.gather(busy, *queued)


async def test_different_shapes_never_share_a_batch():
    clock, rec, b = make(max_queue_delay_s=0.0, instances=2)
    t = [go(b, rq(clock, "w4", width=4)), go(b, rq(clock, "w5", width=5))]
    await settle()
    assert sorted(rec.ids()) == [["w4"], ["w5"]]
    rec.finish()
    rec.finish()
    await asyncio.gather(*t)


async def test_next_batch_forms_while_the_instance_is_busy():
    clock, rec, b = make(max_queue_delay_s=0.0)
    first = go(b, rq(clock, "first"))
    await settle()
    later = [go(b, rq(clock, f"q{i}")) for i in range(5)]
    await settle()
    assert rec.ids() == [["first"]]
    rec.finish()
    await settle()
    assert rec.ids()[1] == ["q0", "q1", "q2", "q3", "q4"]
    rec.finish()
    await asyncio.gather(first, *later)


async def test_instances_bound_concurrent_batches():
    clock, rec, b = make(max_queue_delay_s=0.0, instances=2, max_batch_size=1)
    tasks = [go(b, rq(clock, f"r{i}")) for i in range(4)]
    await settle()
    assert len(rec.batches) == 2 and b.executing == 2 and b.queue_depth == 2
    rec.finish()
    await settle()
    assert len(rec.batches) == 3
    while rec._done:
        rec.finish()
        await settle()
    await asyncio.gather(*tasks)


async def test_higher_priority_first_and_earliest_deadline_first_within_a_level():
    clock, rec, b = make(max_queue_delay_s=0.0, max_batch_size=1, priority_levels=2, default_priority_level=2)
    block = go(b, rq(clock, "busy"))
    await settle()
    low = go(b, rq(clock, "low", priority=2))
    late = go(b, rq(clock, "high-late", priority=1, deadline=clock.now + 10))
    soon = go(b, rq(clock, "high-soon", priority=1, deadline=clock.now + 5))
    default = go(b, rq(clock, "default"))  # priority 0 = default level (2)
    await settle()
    order = []
    while rec._done:
        rec.finish()
        await settle()
    order = [ids[0] for ids in rec.ids()]
    assert order == ["busy", "high-soon", "high-late", "low", "default"]
    await asyncio.gather(block, low, late, soon, default)


async def test_a_priority_past_the_models_levels_takes_the_default_level_as_on_triton():
    clock, rec, b = make(max_queue_delay_s=0.0, max_batch_size=1, priority_levels=2, default_priority_level=2)
    block = go(b, rq(clock, "busy"))
    await settle()
    low = go(b, rq(clock, "past-the-levels", priority=1 << 30))  # (batch scoring asks for the lowest so)
    high = go(b, rq(clock, "high", priority=1))
    await settle()
    while rec._done:
        rec.finish()
        await settle()
    assert [ids[0] for ids in rec.ids()] == ["busy", "high", "past-the-levels"]
    await asyncio.gather(block, low, high)


@pytest.mark.parametrize(
    "cfg, words",
    [
        (dict(priority_levels=3, default_priority_level=0), "default_priority_level must be between 1 and"),
        (dict(priority_levels=3, default_priority_level=4), "default_priority_level must be between 1 and"),
        (dict(max_batch_size=16, preferred_batch_sizes=(32,)), "preferred_batch_size 32 must be between 1 and"),
        (dict(max_batch_size=16, preferred_batch_sizes=(0,)), "preferred_batch_size 0 must be between 1 and"),
    ],
)
def test_a_config_triton_refuses_is_refused(cfg, words):
    with pytest.raises(ValueError, match=words):
        BatcherConfig(**{"max_batch_size": 8, **cfg})


async def test_a_deadline_passing_in_the_queue_is_answered_and_never_executed():
    clock, rec, b = make(max_queue_delay_s=0.0, max_batch_size=1)
    busy = go(b, rq(clock, "busy"))
    await settle()
    doomed = go(b, rq(clock, "doomed", deadline=clock.now + 0.005))
    fine = go(b, rq(clock, "fine"))
    await settle()
    clock.now += 0.006
    b.tick()
    await settle()
    with pytest.raises(GatewayError) as e:
        await doomed
    assert e.value.code is ErrorCode.DEADLINE_EXCEEDED
    while rec._done:
        rec.finish()
        await settle()
    await asyncio.gather(busy, fine)
    assert [ids[0] for ids in rec.ids()] == ["busy", "fine"]


async def test_queue_timeout_reject_and_delay():
    clock, rec, b = make(max_queue_delay_s=0.0, max_batch_size=1, default_timeout_s=0.005)
    busy = go(b, rq(clock, "busy"))
    await settle()
    old = go(b, rq(clock, "old"))
    await settle()
    clock.now += 0.006
    b.tick()
    await settle()
    with pytest.raises(GatewayError) as e:
        await old
    assert e.value.code is ErrorCode.DEADLINE_EXCEEDED and "queue timeout" in e.value.message
    rec.finish()
    await busy

    clock, rec, b = make(max_queue_delay_s=0.0, max_batch_size=1, default_timeout_s=0.005, timeout_action_delay=True)
    busy = go(b, rq(clock, "busy"))
    await settle()
    old = go(b, rq(clock, "old"))
    await settle()
    clock.now += 0.006
    b.tick()
    new = go(b, rq(clock, "new"))
    await settle()
    while rec._done:
        rec.finish()
        await settle()
    await asyncio.gather(busy, old, new)
    assert [ids[0] for ids in rec.ids()] == ["busy", "new", "old"]  # the timed-out one waits behind


async def test_each_level_times_out_by_its_own_policy():
    # level 1 DELAYs after 5 ms, level 2 (the default policy) REJECTs after 5 ms
    policies = ((1, QueuePolicy(timeout_s=0.005, delay=True)),)
    clock, rec, b = make(
        max_queue_delay_s=0.0,
        max_batch_size=1,
        priority_levels=2,
        default_priority_level=2,
        default_timeout_s=0.005,
        level_policies=policies,
    )
    busy = go(b, rq(clock, "busy"))
    await settle()
    high_old, low_old = go(b, rq(clock, "high-old", priority=1)), go(b, rq(clock, "low-old", priority=2))
    await settle()
    clock.now += 0.006
    b.tick()
    high_new = go(b, rq(clock, "high-new", priority=1))
    await settle()
    with pytest.raises(GatewayError) as e:
        await low_old
    assert e.value.code is ErrorCode.DEADLINE_EXCEEDED and "queue timeout" in e.value.message
    while rec._done:
        rec.finish()
        await settle()
    await asyncio.gather(busy, high_old, high_new)
    assert [ids[0] for ids in rec.ids()] == ["busy", "high-new", "high-old"]  # delayed behind its level


def test_a_policy_for_a_level_the_model_does_not_have_is_refused():
    with pytest.raises(ValueError, match="level 3"):
        BatcherConfig(
            max_batch_size=4, priority_levels=2, default_priority_level=1, level_policies=((3, QueuePolicy()),)
        )


async def test_full_queue_is_refused_at_once_with_retry_after():
    clock, rec, b = make(max_queue_delay_s=0.0, max_batch_size=1, max_queue_size=2)
    busy = go(b, rq(clock, "busy"))
    await settle()
    waiting = [go(b, rq(clock, f"w{i}")) for i in range(2)]
    await settle()
    with pytest.raises(GatewayError) as e:
        await b.submit(rq(clock, "extra"))
    assert e.value.code is ErrorCode.RESOURCE_EXHAUSTED and e.value.retry_after_s > 0
    while rec._done:
        rec.finish()
        await settle()
    await asyncio.gather(busy, *waiting)


async def test_a_cancelled_caller_leaves_the_queue_and_its_batch_is_undisturbed():
    clock, rec, b = make(max_queue_delay_s=0.0)
    busy = go(b, rq(clock, "busy"))
    await settle()
    stay = go(b, rq(clock, "stay"))
    gone = go(b, rq(clock, "gone"))
    await settle()
    gone.cancel()
    await settle()
    assert b.queue_depth == 1
    rec.finish()
    await settle()
    assert rec.ids()[1] == ["stay"]
    rec.finish()
    await asyncio.gather(busy, stay)


async def test_a_failing_backend_fails_only_its_batch():
    clock, rec, b = make(max_queue_delay_s=0.0, max_batch_size=2)
    busy = go(b, rq(clock, "busy"))
    await settle()
    first = [go(b, rq(clock, "f1")), go(b, rq(clock, "f2"))]
    second = [go(b, rq(clock, "s1")), go(b, rq(clock, "s2"))]
    await settle()
    rec.finish()
    await settle()
    assert rec.ids()[1] == ["f1", "f2"]
    rec.finish(fail=True)
    await settle()
    for t in first:
        with pytest.raises(GatewayError) as e:
            await t
        assert e.value.code is ErrorCode.INTERNAL
    assert rec.ids()[2] == ["s1", "s2"]
    rec.finish()
    assert [(await t).id for t in second] == ["s1", "s2"]
    await busy


async def test_work_conserving_dispatches_at_once_when_an_instance_is_idle():
    clock, rec, b = make(policy=WORK_CONSERVING, max_queue_delay_s=1.0)
    a = go(b, rq(clock, "a"))
    await settle()
    assert rec.ids() == [["a"]]  # Triton's policy would wait up to 1 s for company
    more = [go(b, rq(clock, f"m{i}")) for i in range(3)]
    await settle()
    rec.finish()
    await settle()
    assert rec.ids()[1] == ["m0", "m1", "m2"]  # grown while the instance was busy
    rec.finish()
    await asyncio.gather(a, *more)


async def test_work_conserving_sends_a_burst_from_one_loop_turn_together():
    clock, rec, b = make(policy=WORK_CONSERVING, max_queue_delay_s=1.0)
    burst = [go(b, rq(clock, f"r{i}")) for i in range(3)]  # all submitted before the loop turns
    await settle()
    assert rec.ids() == [["r0", "r1", "r2"]]  # no clock movement: no waiting, only the same turn
    rec.finish()
    await asyncio.gather(*burst)


async def test_triton_policy_with_delay_waits_even_when_idle():
    clock, rec, b = make(policy=TRITON, max_queue_delay_s=1.0)
    a = go(b, rq(clock, "a"))
    await settle()
    assert rec.batches == []
    clock.now += 1.0
    b.tick()
    rec.finish()
    await a


async def test_drain_and_close():
    clock, rec, b = make(max_queue_delay_s=0.0)
    t = go(b, rq(clock, "a"))
    await settle()
    b.close()
    with pytest.raises(GatewayError) as e:
        await b.submit(rq(clock, "late"))
    assert e.value.code is ErrorCode.UNAVAILABLE
    drained = asyncio.ensure_future(b.drain())
    await settle()
    assert not drained.done()
    rec.finish()
    await t
    await asyncio.wait_for(drained, 1)


async def test_a_deadline_the_queue_cannot_meet_is_refused_at_once():
    reasons = []
    clock, rec = Clock(), Recorder()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_size=1, instances=1), clock=clock, name="m", refused=reasons.append)
    # Learn the cost: one batch of 1 row takes 10 ms.
    first = go(b, rq(clock, "learn"))
    await settle()
    clock.now += 0.010
    rec.finish()
    await first
    assert b.cost_of(shape_key(rq(clock, "any").request)).seconds(1) == pytest.approx(0.010)
    busy = go(b, rq(clock, "busy"))
    queued = [go(b, rq(clock, f"q{i}")) for i in range(3)]
    await settle()
    # 1 running + 3 queued + itself: about 50 ms of work; 20 ms is not enough.
    with pytest.raises(GatewayError) as e:
        await b.submit(rq(clock, "hopeless", deadline=clock.now + 0.020))
    assert e.value.code is ErrorCode.DEADLINE_EXCEEDED and "cannot be met" in e.value.message
    assert reasons == ["deadline_unmeetable"]
    assert len(rec.batches) == 2  # it never reached the backend
    ok = go(b, rq(clock, "patient", deadline=clock.now + 1.0))
    await settle()
    assert b.queue_depth == 4
    while rec._done:
        clock.now += 0.010
        rec.finish()
        await settle()
    await asyncio.gather(busy, ok, *queued)


async def test_a_request_waiting_its_delay_does_not_hold_back_a_full_batch_of_another_shape():
    """A lone 3-wide request waiting out a 2 s delay kept a full batch of 5-wide requests queued
    behind it waiting the same 2 s: only the head's group was looked at."""
    clock, rec, b = make(max_queue_delay_s=2.0, max_batch_size=4, instances=2)
    lone = go(b, rq(clock, "a", width=3))
    full = [go(b, rq(clock, f"b{i}", width=5)) for i in range(4)]
    await settle()
    assert rec.ids() == [["b0", "b1", "b2", "b3"]]
    clock.now += 2.0
    b.tick()
    await settle()
    assert rec.ids()[1:] == [["a"]]  # its own delay, on the second instance
    rec.finish()
    rec.finish()
    await asyncio.gather(lone, *full)


async def test_a_full_batchs_cost_does_not_refuse_a_lone_row_on_an_idle_model():
    """Only a full batch had been timed (80 ms for 8 rows): a 1-row request with 20 ms on an idle
    model was refused as 'about 80 ms of work queued ahead', and every later one too, since a
    refused request is never timed. Admission now takes a lower bound (10 ms a row here)."""
    reasons = []
    clock, rec = Clock(), Recorder()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_size=8, instances=1), clock=clock, name="m", refused=reasons.append)
    full = go(b, rq(clock, "full", rows=8))
    await settle()
    clock.now += 0.080
    rec.finish()
    await full
    lone = go(b, rq(clock, "lone", deadline=clock.now + 0.020))
    await settle()
    assert rec.ids()[-1:] == [["lone"]] and reasons == []
    clock.now += 0.002
    rec.finish()
    assert (await lone).id == "lone"
    # Measured at its own size now: with work queued ahead, a hopeless deadline is still refused.
    busy = go(b, rq(clock, "busy", rows=8))
    await settle()
    with pytest.raises(GatewayError) as e:
        await b.submit(rq(clock, "hopeless", rows=8, deadline=clock.now + 0.100))
    assert "cannot be met" in e.value.message and reasons == ["deadline_unmeetable"]
    rec.finish()
    await busy


async def test_a_slow_first_execution_does_not_refuse_short_deadlines_for_ever():
    """The first batch took 500 ms (a cold arena, a pause); every later request had 100 ms: each
    was refused as unmeetable, none was ever timed, so the estimate never moved and the model
    refused every such request for good. Now, once nothing has executed for a second, one request
    goes in to be timed; a fast execution then counts at once (the least of the recent ones)."""
    reasons = []
    clock, rec = Clock(), Recorder()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_size=4, instances=1), clock=clock, name="m", refused=reasons.append)
    first = go(b, rq(clock, "cold"))
    await settle()
    clock.now += 0.500
    rec.finish()
    await first
    with pytest.raises(GatewayError) as e:  # the estimate is fresh: refused
        await b.submit(rq(clock, "soon", deadline=clock.now + 0.100))
    assert "cannot be met" in e.value.message and reasons == ["deadline_unmeetable"]
    clock.now += 1.5  # a second and more with nothing executed
    probe = go(b, rq(clock, "probe", deadline=clock.now + 0.100))
    await settle()
    assert rec.ids()[-1:] == [["probe"]]
    with pytest.raises(GatewayError):  # one probe a second, and only while nothing executes
        await b.submit(rq(clock, "also", deadline=clock.now + 0.100))
    clock.now += 0.002
    rec.finish()
    assert (await probe).id == "probe"
    after = go(b, rq(clock, "after", deadline=clock.now + 0.100))  # 2 ms is what counts now
    await settle()
    assert rec.ids()[-1:] == [["after"]]
    rec.finish()
    await after
    assert reasons == ["deadline_unmeetable"] * 2


async def test_a_batch_leaves_before_the_delay_when_a_members_deadline_would_pass():
    """A lone request given less time than max_queue_delay had waited the delay out and expired
    (504 every time, and never learning the cost). The batch now leaves by its earliest
    deadline less the learned time of a batch, or half the time given before any is learned."""
    clock, rec, b = make(max_queue_delay_s=0.100)
    lone = go(b, rq(clock, "lone", deadline=clock.now + 0.050))
    await settle()
    clock.now += 0.024
    b.tick()
    await settle()
    assert rec.batches == []
    clock.now += 0.001  # half its 50 ms: nothing learned yet
    b.tick()
    await settle()
    assert rec.ids() == [["lone"]]
    clock.now += 0.010
    rec.finish()
    assert (await lone).id == "lone"
    assert b.cost_of(shape_key(rq(clock, "any").request)).seconds(1) == pytest.approx(0.010)
    # Learned: 10 ms a row (one size seen, scaled). Two requests, the second with 40 ms: they
    # leave together at 20 ms, 40 less the 20 ms two rows are expected to take.
    slack = go(b, rq(clock, "slack"))
    tight = go(b, rq(clock, "tight", deadline=clock.now + 0.040))
    await settle()
    clock.now += 0.019
    b.tick()
    await settle()
    assert len(rec.batches) == 1
    clock.now += 0.001
    b.tick()
    await settle()
    assert rec.ids()[1] == ["tight", "slack"]  # (earlier deadlines first)
    rec.finish()
    await asyncio.gather(slack, tight)
    # Without a deadline the delay is waited out as before.
    free = go(b, rq(clock, "free"))
    await settle()
    clock.now += 0.099
    b.tick()
    await settle()
    assert len(rec.batches) == 2
    clock.now += 0.001
    b.tick()
    await settle()
    assert rec.ids()[2] == ["free"]
    rec.finish()
    await free


async def test_preserve_ordering_releases_answers_in_arrival_order():
    clock, rec, b = make(max_queue_delay_s=0.0, max_batch_size=1, instances=2, preserve_ordering=True)
    first, second = go(b, rq(clock, "first")), go(b, rq(clock, "second"))
    await settle()
    assert rec.ids() == [["first"], ["second"]]
    rec.finish(1)  # "second" finishes first...
    await settle()
    assert not second.done()  # ...but waits for "first"
    rec.finish(0)
    await settle()
    assert first.done() and second.done()
    assert [(await t).id for t in (first, second)] == ["first", "second"]


async def test_without_preserve_ordering_answers_go_as_they_finish():
    clock, rec, b = make(max_queue_delay_s=0.0, max_batch_size=1, instances=2)
    first, second = go(b, rq(clock, "first")), go(b, rq(clock, "second"))
    await settle()
    rec.finish(1)
    await settle()
    assert second.done() and not first.done()
    rec.finish(0)
    await first


async def test_queued_requests_count_a_front_workers_call_as_the_requests_it_merged():
    clock, rec, b = make(max_queue_delay_s=1.0)
    heavy = rq(clock, "a", rows=3)
    heavy = Ticket(heavy.request._replace(weight=3), heavy.checked)
    tasks = [go(b, heavy), go(b, rq(clock, "b"))]
    await settle()
    assert b.queue_depth == 2 and b.queued_requests() == 4
    clock.now += 1.0
    b.tick()
    await settle()
    rec.finish()
    await asyncio.gather(*tasks)
    assert b.queued_requests() == 0


async def test_a_slow_lone_rows_time_does_not_refuse_it_while_larger_batches_run_fast():
    """A 1-row batch timed once at 500 ms (a cold start), then 4-row batches at 4 ms, back to back
    (so the model is never idle a second and no probe goes in): a lone request with 100 ms was
    refused as 'about 500 ms of work' while one with three requests queued ahead was admitted. A
    batch takes no longer than a larger one: the lower bound is capped by larger sizes' times."""
    reasons = []
    clock, rec = Clock(), Recorder()
    cfg = BatcherConfig(max_batch_size=4, max_queue_delay_s=0.010, instances=1)
    b = DynamicBatcher(rec, cfg, clock=clock, name="m", refused=reasons.append)
    cold = go(b, rq(clock, "cold"))
    await settle()
    clock.now += 0.010
    b.tick()
    clock.now += 0.500
    rec.finish()
    await cold
    for i in range(3):
        batch = [go(b, rq(clock, f"b{i}.{j}")) for j in range(4)]
        await settle()
        clock.now += 0.004
        rec.finish()
        await asyncio.gather(*batch)
    clock.now += 0.001
    lone = go(b, rq(clock, "lone", deadline=clock.now + 0.100))
    await settle()
    assert reasons == [] and rec.ids()[-1:] == [["lone"]]
    clock.now += 0.004
    rec.finish()
    assert (await lone).id == "lone"


async def test_fail_queued_answers_every_queued_request_and_executes_none():
    clock, rec, b = make(max_batch_size=2, priority_levels=2, default_priority_level=2)
    running = [go(b, rq(clock, f"r{i}")) for i in range(2)]  # a full batch: it goes at once
    queued = [go(b, rq(clock, "low")), go(b, rq(clock, "high", priority=1))]
    await settle()
    assert rec.ids() == [["r0", "r1"]] and b.queue_depth == 2
    assert b.fail_queued(GatewayError(ErrorCode.UNAVAILABLE, "gone")) == 2  # (before close, as retire does)
    b.close()
    for t in queued:
        with pytest.raises(GatewayError) as e:
            await t
        assert e.value.code is ErrorCode.UNAVAILABLE
    assert b.queue_depth == 0 and b.queued_requests() == 0
    clock.now += 1.0
    b.tick()
    rec.finish()
    await asyncio.gather(*running)
    assert rec.ids() == [["r0", "r1"]]
    await asyncio.wait_for(b.drain(), 1)


async def _learn(clock, rec, b, rows, seconds):
    """Time one batch of ``rows`` at ``seconds`` (the batcher learns it as that size's cost)."""
    t = go(b, rq(clock, f"learn{rows}", rows=rows))
    await settle()
    clock.now += seconds
    rec.finish()
    await t


async def test_admission_counts_the_running_batchs_elapsed_time_and_a_smaller_last_batch():
    """Admission must refuse only what cannot be met, yet it took a busy instance to need a whole
    batch more (however long that batch had run) and every wave to be a full batch: a request
    that would finish within its deadline was refused as unmeetable."""
    reasons = []
    clock, rec = Clock(), Recorder()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_size=4), clock=clock, name="m", refused=reasons.append)
    await _learn(clock, rec, b, 1, 0.010)
    await _learn(clock, rec, b, 4, 0.040)
    # A 1-row batch that has run 9 of its 10 ms: the new one ends by about 11 ms; it has 15.
    running = go(b, rq(clock, "running"))
    await settle()
    clock.now += 0.009
    tight = go(b, rq(clock, "tight", deadline=clock.now + 0.015))
    await settle()
    assert reasons == [] and b.queue_depth == 1
    clock.now += 0.001
    rec.finish()
    await settle()
    clock.now += 0.010
    rec.finish()
    await asyncio.gather(running, tight)
    # A 4-row batch just started, 4 rows queued ahead (an earlier deadline): 40 + 40 + 10 ms for a
    # lone row behind them, within its 100 ms (it was taken as 40 + 2 full batches: 120 ms).
    running = go(b, rq(clock, "running4", rows=4))
    await settle()
    ahead = go(b, rq(clock, "ahead", rows=4, deadline=clock.now + 0.090))
    behind = go(b, rq(clock, "behind", deadline=clock.now + 0.100))
    await settle()
    assert reasons == [] and b.queue_depth == 2
    for took in (0.040, 0.040, 0.010):
        clock.now += took
        rec.finish()
        await settle()
    await asyncio.gather(running, ahead, behind)
    # Still refused when it truly cannot be met: 40 ms of running work, 10 more for itself.
    running = go(b, rq(clock, "running4b", rows=4))
    await settle()
    with pytest.raises(GatewayError) as e:
        await b.submit(rq(clock, "hopeless", deadline=clock.now + 0.045))
    assert "cannot be met" in e.value.message and reasons == ["deadline_unmeetable"]
    rec.finish()
    await running


async def test_close_sends_what_is_queued_at_once_without_waiting_out_the_delay():
    """Nothing can join a closed batcher's batches: it had held them for the whole delay, so a
    shutdown (close, then drain) waited max_queue_delay for nothing."""
    clock, rec, b = make(max_queue_delay_s=20.0, preferred_batch_sizes=(4,))
    tasks = [go(b, rq(clock, "a")), go(b, rq(clock, "b", width=2))]  # two shapes: two batches
    await settle()
    assert rec.batches == []
    b.close()
    await settle()
    assert rec.ids() == [["a"]]  # the one instance takes the first; the second goes when it frees
    rec.finish()
    await settle()
    assert rec.ids() == [["a"], ["b"]]
    rec.finish()
    assert [(await t).id for t in tasks] == ["a", "b"]
    await asyncio.wait_for(b.drain(), 1)


async def test_the_time_of_long_inputs_does_not_refuse_a_short_input_of_the_same_rows():
    """A model with a variable dimension learned one cost per batch size: after eight 1-row
    batches of long sequences (50 ms each), a 1-row request of a short one with 20 ms on an idle
    model was refused as 'about 50 ms of work queued ahead' (found with a real ONNX model whose
    time grows with the sequence length). Costs are learned per shape of the non-batch dims."""
    reasons = []
    clock, rec = Clock(), Recorder()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_size=8), clock=clock, name="m", refused=reasons.append)
    for i in range(8):
        t = go(b, rq(clock, f"long{i}", width=4096))
        await settle()
        clock.now += 0.050
        rec.finish()
        await t
    short = go(b, rq(clock, "short", width=4, deadline=clock.now + 0.020))
    await settle()
    assert reasons == [] and rec.ids()[-1] == ["short"]
    clock.now += 0.001
    rec.finish()
    assert (await short).id == "short"
    # The long shape's own time still refuses what it cannot meet behind a running long batch.
    running = go(b, rq(clock, "long8", width=4096))
    await settle()
    with pytest.raises(GatewayError) as e:
        await b.submit(rq(clock, "hopeless", width=4096, deadline=clock.now + 0.060))
    assert "cannot be met" in e.value.message and reasons == ["deadline_unmeetable"]
    rec.finish()
    await running


async def test_the_drain_rate_counts_time_the_instances_were_busy_not_time_spent_waiting_out_the_delay():
    """The rate that max_queue_wait_ms and Retry-After are judged by counted every stretch with a
    request queued as busy, so requests waiting out max_queue_delay behind a batch cut at the
    preferred size (1 ms of work) measured the model at 10 requests a second: a burst of 40 was
    refused 429 as 'about 541 ms of work queued' (found with tritonclient against an ONNX model).
    Only stretches where every instance is busy count now."""
    clock, rec, b = make(max_batch_size=64, max_queue_delay_s=0.200, preferred_batch_sizes=(4,))
    for cycle in range(10):
        tasks = [go(b, rq(clock, f"c{cycle}-{i}")) for i in range(6)]
        await settle()
        clock.now += 0.001
        rec.finish()  # the 4 of the preferred size; 2 wait out the delay
        await settle()
        clock.now += 0.200
        b.tick()
        await settle()
        clock.now += 0.001
        rec.finish()
        await asyncio.gather(*tasks)
        clock.now += 0.100
    assert b.drain_rate.rate() is None
    # Busy all along (a full batch waits whenever one finishes): 4 requests every 10 ms.
    clock, rec, b = make(max_batch_size=4, max_queue_delay_s=0.200)
    tasks = [go(b, rq(clock, f"f{i}")) for i in range(4 * 12)]
    await settle()
    while rec._done:
        clock.now += 0.010
        rec.finish()
        await settle()
    await asyncio.gather(*tasks)
    assert b.drain_rate.rate() == pytest.approx(400)
    # The same when each batch runs inline, finishing inside the pump that launched it (1 ms each).
    clock = Clock()

    def inline(batch, done):
        clock.now += 0.001
        done([InferResponse("m", "1", [], id=t.request.id) for t in batch])

    b = DynamicBatcher(inline, BatcherConfig(max_batch_size=4, policy=WORK_CONSERVING), clock=clock, name="m")
    tasks = [go(b, rq(clock, f"i{i}")) for i in range(4 * 40)]
    await asyncio.gather(*tasks)
    assert b.drain_rate.rate() == pytest.approx(4000)


async def test_a_deadline_already_past_at_submit_counts_as_expired():
    """A request whose deadline had passed by the time it reached the queue (spent on the wire or
    being decoded) was answered DEADLINE_EXCEEDED, never executed, yet missing from the refusals
    by reason: batchgate_refusals_total{reason="deadline_expired"} counted about half the requests
    answered so by a load with 1 µs V2 timeouts (found with tritonclient)."""
    reasons = []
    clock, rec = Clock(), Recorder()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_size=8), clock=clock, name="m", refused=reasons.append)
    with pytest.raises(GatewayError) as e:
        await b.submit(rq(clock, "stale", deadline=clock.now))
    assert e.value.code is ErrorCode.DEADLINE_EXCEEDED and reasons == ["deadline_expired"]
    assert rec.batches == [] and b.queue_depth == 0
