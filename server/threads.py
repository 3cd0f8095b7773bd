"""The threads that run models, and the cheapest hand-off to them from the event loop.

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
from collections.abc import Callable

_STOP = object()


class InferenceThreads:
    """The threads that run local models (not to be confused with worker processes)."""

    def __init__(self, threads: int, name: str = "batchgate-infer"):
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
