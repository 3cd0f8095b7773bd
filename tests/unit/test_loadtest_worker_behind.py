"""A generator worker that is behind its schedule: the requests it dispatches still leave as it
goes, and the CPU it spent is booked. A real Worker with a real aiohttp session, aimed at a
loopback port nobody listens on (each request fails at once: what is checked is the worker)."""

from __future__ import annotations

import asyncio
import queue
import time

import pytest

from batchgate.loadtest.payload import Encoded
from batchgate.loadtest.worker import Plan, Transport, Worker
from processes import free_port


def _behind_plan(arrivals: int, ahead_s: float, arrival: str = "constant", began_s: float = 1.0) -> Plan:
    """A step that began ``began_s`` ago at ``arrivals`` a second, ending ``ahead_s`` from now: the
    arrivals up to now are all due at once, so the worker starts behind."""
    now = time.monotonic_ns()
    return Plan(
        step=1,
        mode="open",
        start_ns=now - round(began_s * 1e9),
        warmup_s=0.0,
        duration_s=began_s + ahead_s,
        window_s=1.0,
        deadline_s=0.5,
        segments=[(0.0, began_s + ahead_s, float(arrivals), float(arrivals))],
        arrival=arrival,
    )


def _worker(out) -> Worker:
    transport = Transport(f"127.0.0.1:{free_port()}", "http", "m")
    return Worker(0, transport, [Encoded(b"{}", {"Content-Type": "application/json"})], out)


def test_a_worker_behind_its_schedule_lets_each_request_leave_before_dispatching_the_next():
    async def run() -> list[int]:
        w = _worker(queue.Queue())
        await w.connect()
        dispatched_at_first_turn: list[int] = []

        async def probe():  # the event loop's first turn once the worker has started
            dispatched_at_first_turn.append(w._k)

        asyncio.get_running_loop().create_task(probe())
        await w._open(_behind_plan(200, ahead_s=0.5))
        await asyncio.gather(*w.inflight, return_exceptions=True)
        await w.close()
        return dispatched_at_first_turn

    # Before: the loop had no turn until all 200 overdue requests were dispatched (none sent).
    assert asyncio.run(run()) == [1]


@pytest.mark.parametrize("arrival", ["constant", "poisson"])
def test_a_worker_still_behind_well_past_the_end_sends_no_more_and_counts_the_rest_scheduled(arrival):
    async def run() -> tuple[int, int]:
        w = _worker(queue.Queue())
        await w.connect()
        # (ended 1.5 s ago: more than the 1 s a worker behind may go on sending past the end)
        scheduled = await w._open(_behind_plan(200, ahead_s=-1.5, arrival=arrival, began_s=2.5))
        await asyncio.gather(*w.inflight, return_exceptions=True)
        await w.close()
        return scheduled, w._k

    scheduled, dispatched = asyncio.run(run())
    assert dispatched == 0  # the step is long over: a send now would fall well after it
    assert scheduled == 200 if arrival == "constant" else 180 <= scheduled <= 220, scheduled


def test_a_worker_a_little_behind_at_the_end_still_sends_every_request():
    async def run() -> tuple[int, int]:
        w = _worker(queue.Queue())
        await w.connect()
        scheduled = await w._open(_behind_plan(200, ahead_s=-0.05, began_s=1.05))  # ended 50 ms ago
        await asyncio.gather(*w.inflight, return_exceptions=True)
        await w.close()
        return scheduled, w._k

    assert asyncio.run(run()) == (200, 200)


def test_a_step_books_the_cpu_its_worker_spent_even_when_the_reporter_never_ran():
    out: queue.Queue = queue.Queue()

    async def run():
        w = _worker(out)
        await w.connect()
        await w.run_step(_behind_plan(200, ahead_s=0.05))
        await w.close()

    asyncio.run(run())
    msgs = []
    while not out.empty():
        msgs.append(out.get())
    cpu = sum(m[11] for m in msgs if m[0] == "window")
    assert cpu > 0, msgs
    assert msgs[-1][0] == "done"


def test_a_late_send_is_counted_late_in_the_window_where_it_is_counted_sent():
    """Late was booked in the window the request was meant for and sent in the one it left in:
    a worker behind across a window's end had windows of more late sends than sends (the
    report's "late sends" read 190 of 0, or over 100% summed over the measured windows)."""

    async def run() -> dict:
        w = _worker(queue.Queue())
        await w.connect()
        await w._open(_behind_plan(200, ahead_s=-0.05, began_s=1.05))  # window 0 is over: all leave in window 1
        await asyncio.gather(*w.inflight, return_exceptions=True)
        await w.close()
        return {i: (acc.late, acc.sent) for i, acc in w.windows.items()}

    windows = asyncio.run(run())
    assert sum(late for late, _ in windows.values()) >= 150, windows
    assert all(late <= sent for late, sent in windows.values()), windows
