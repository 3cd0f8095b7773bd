"""The scorer's window of requests out at a server (score/remote.py): it grows while answers
come back as fast as the fastest, is cut when they slow down (the server's queue grows) and
halved at a refusal, once per round trip."""

from __future__ import annotations

import asyncio
import time

from batchgate.score.remote import Window


def test_grows_on_quick_answers_and_is_cut_when_they_slow_down():
    w = Window(start=4)
    for _ in range(40):
        w.answered(time.monotonic() - 0.005)
    grown = w.size
    assert grown > 8  # about one more per window of answers
    time.sleep(0.02)
    w.answered(time.monotonic() - 0.05)  # ten times the fastest: the queue is growing
    assert w.size == grown * 0.8
    w.answered(time.monotonic() - 0.05)  # the same round trip's answers: one cut only
    assert w.size == grown * 0.8


def test_a_refusal_halves_it_once_per_round_trip_never_below_one():
    w = Window(start=16)
    w.answered(time.monotonic() - 0.01)
    w.refused()
    w.refused()
    assert 8 <= w.size < 9
    for _ in range(20):
        time.sleep(0.011)
        w.refused()
    assert w.size == 1.0


def test_take_waits_for_a_free_place():
    async def main():
        w = Window(start=2)
        await w.take()
        await w.take()
        third = asyncio.ensure_future(w.take())
        await asyncio.sleep(0.01)
        assert not third.done() and w.out == 2
        w.give()
        await asyncio.wait_for(third, 1)
        assert w.out == 2

    asyncio.run(main())


def test_refusals_before_any_answer_still_shrink_it():
    """No answer yet (no round trip measured): a refusal halves the window (once for a burst)."""
    w = Window(start=8)
    w.refused()
    w.refused()
    assert w.size == 4
