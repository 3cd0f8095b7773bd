"""The threads that run models, and the cheapest hand-off to them from the event loop; on one
core, the event loop's own turns instead (:class:`LoopTurns`).

``loop.run_in_executor`` with a ``ThreadPoolExecutor`` costs about 10 µs of
event-loop time per call under load (a work item, a concurrent future, a
chained asyncio future). Here a call is one tuple on a ``SimpleQueue`` and one
``call_soon_threadsafe`` back to a callback: about 3 µs (``bench/serving.py`` measures the
whole path). Model execution releases the GIL, so these threads run in parallel.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

_STOP = object()


class InferenceThreads:
    """The threads that run local models (not to be confused with worker processes)."""

    def __init__(self, threads: int, name: str = "batchgate-infer", turn_us: int = 0):
        """``turn_us``: with it, ``turns`` runs the executions handed to it on the event loop, at
        most this long of them a loop turn (:class:`LoopTurns`); 0 = no turns (all on threads)."""
        self.turns = LoopTurns(turn_us) if turn_us > 0 else None
        # Requests whose batch is out at an upstream (remote models): this process has nothing to
        # do for them until the answer comes. Shadow work runs while every request in flight is
        # one of these (route_table.py).
        self.away = 0
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        get = self._q.get
        while True:
            item = get()
            if item is _STOP:
                return
            loop, fn, arg, done, more = item
            while True:
                try:
                    result = fn(arg)
                except BaseException as e:  # handed to ``done`` like any result
                    result = e
                # Asked before the result goes back, so the scheduler learns of both at once;
                # only while nothing else waits for a thread: a model with a backlog must not
                # keep a thread from other models' work (or from its own earlier dispatches).
                nxt = None
                if more is not None and self._q.empty():
                    try:
                        nxt = more()
                    except RuntimeError:  # the loop is closed: nobody is waiting any more
                        nxt = None
                try:  # noqa: SIM105 - a try costs nothing here; contextlib.suppress would, once per execution
                    loop.call_soon_threadsafe(done, result)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    break
                if nxt is None:
                    break
                arg, done = nxt
            # Nothing of the last job stays referenced while the thread waits for the next (a
            # request's shared-memory region closes when the last request holding it is answered).
            item = arg = result = done = fn = more = nxt = None

    def call(self, fn: Callable, arg, done: Callable, more: Callable | None = None) -> None:
        """Run ``fn(arg)`` on a worker thread, then ``done(result)`` on the running loop
        (``done(exception)`` if ``fn`` raised). With ``more``, the thread then asks
        ``more()`` for another ``(arg, done)`` and runs it at once, until it answers None."""
        self._q.put((asyncio.get_running_loop(), fn, arg, done, more))

    def shutdown(self) -> None:
        for _ in self._threads:
            self._q.put(_STOP)


class LoopTurns:
    """Executions run on the event loop itself, between its reads of the sockets: at most
    ``turn_us`` of them in one loop turn, the rest in the next ones, oldest first.

    For a process with one core. There an inference thread runs on the same core as the loop, and
    the kernel shares it between them by time slices of milliseconds: a request that could be
    refused in a few microseconds waits, runnable, for the thread's slice to end (the loop was off
    the core 37-47% of every phase of ``bench/overload.py``). Run here instead, the executions
    come in turns no longer than ``turn_us``, after each of which the loop reads and admits or
    refuses whatever arrived meanwhile: no second thread competes for the core, and no hand-off
    to a thread and back is paid."""

    def __init__(self, turn_us: int):
        self.turn_ns = turn_us * 1000
        self._q: deque[tuple[Callable, object, Callable]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = False  # a turn is scheduled

    def add(self, fn: Callable, arg: object, done: Callable) -> None:
        """Run ``fn(arg)`` in a coming turn of the running loop, then ``done(result)`` at once
        (``done(exception)`` if ``fn`` raised, as on a thread)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # (another loop than the last: what waited with that one is gone)
            self._q.clear()
            self._due = False
            self._loop = loop
        self._q.append((fn, arg, done))
        if not self._due:
            loop.call_soon(self._turn)
            self._due = True

    def later(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` in a coming turn, counted in it as an execution is (an admitted HTTP
        request's parsing, transport/http_defer.py); what it raises goes to the loop's handler."""
        self.add(_call, fn, _raise)

    def _turn(self) -> None:
        q = self._q
        end = time.perf_counter_ns() + self.turn_ns
        try:
            # (``done`` may add the next execution: a scheduler dispatches its next request there)
            while q:
                fn, arg, done = q.popleft()
                try:
                    result = fn(arg)
                except BaseException as e:  # handed to ``done`` like any result (its instance is freed)
                    result = e
                done(result)
                if time.perf_counter_ns() >= end:
                    break
        finally:  # (an error out of ``done`` goes to the loop's handler; the queue goes on)
            if q:
                self._loop.call_soon(self._turn)  # type: ignore[union-attr]
            else:
                self._due = False


def _call(fn: Callable[[], None]) -> None:
    fn()


def _raise(result: object) -> None:
    if isinstance(result, BaseException):
        raise result
