"""LoopTurns: executions run on the event loop in turns of at most ``turn_us``, and whatever the
loop has to do meanwhile (a read, a refusal) runs between two turns, not after all of them."""

from __future__ import annotations

import asyncio
import time

import pytest

from batchgate.threads import InferenceThreads, LoopTurns


def _spin(ms: float):
    def run(tag):
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass
        return tag

    return run


def test_executions_yield_the_loop_between_turns():
    order: list[str] = []

    async def main():
        turns = LoopTurns(1500)
        done_all = asyncio.get_running_loop().create_future()
        for i in range(6):

            def done(result, i=i):
                order.append(result)
                if i == 5:
                    done_all.set_result(None)

            turns.add(_spin(1.0), f"run{i}", done)
        # Something the loop does between turns (as it reads a socket between them).
        asyncio.get_running_loop().call_soon(order.append, "between")
        await done_all

    asyncio.run(main())
    assert sorted(o for o in order if o != "between") == [f"run{i}" for i in range(6)]
    at = order.index("between")
    # 1 ms each, turns of 1.5 ms: one or two executions before the loop's other work, never all six.
    assert 1 <= at <= 2, order
    assert order[at + 1 :] == [f"run{i}" for i in range(at, 6)], order


def test_one_turn_runs_what_fits_and_the_order_is_kept():
    order: list[str] = []

    async def main():
        turns = LoopTurns(1_000_000)  # a second: every one fits in the first turn
        for i in range(20):
            turns.add(_spin(0.01), i, lambda r: order.append(f"run{r}"))
        asyncio.get_running_loop().call_soon(order.append, "between")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert order == [f"run{i}" for i in range(20)] + ["between"]


def test_an_error_from_a_callback_does_not_stop_the_others():
    got: list[object] = []
    errors: list[BaseException] = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
        turns = LoopTurns(1_000_000)

        def bad(_result):
            raise RuntimeError("a caller's callback failed")

        turns.add(lambda a: a, 1, bad)
        turns.add(lambda a: a, 2, got.append)
        turns.add(lambda a: a, 3, got.append)
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert got == [2, 3]
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)


@pytest.mark.parametrize("turn_us", [0, 500])
def test_inference_threads_have_turns_only_when_asked(turn_us):
    threads = InferenceThreads(1, turn_us=turn_us)
    try:
        assert (threads.turns is not None) == (turn_us > 0)
        if turn_us:
            assert threads.turns.turn_ns == turn_us * 1000
    finally:
        threads.shutdown()


def test_an_execution_that_raises_is_handed_to_its_callback_as_a_thread_would():
    got: list[object] = []

    def boom(_arg):
        raise ValueError("the model failed outside its own error handling")

    async def main():
        turns = LoopTurns(1_000_000)
        turns.add(boom, 1, got.append)
        turns.add(lambda a: a, 2, got.append)
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert isinstance(got[0], ValueError) and got[1:] == [2]


def test_turns_follow_the_running_loop():
    """A second loop (another server started in the same process) gets its own turns."""
    got: list[object] = []
    turns = LoopTurns(1_000_000)

    async def main(tag):
        turns.add(lambda a: a, tag, got.append)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main("first"))
    asyncio.run(main("second"))
    assert got == ["first", "second"]
