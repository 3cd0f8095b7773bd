"""The threads that run models, and the cheapest hand-off to them from the event loop.

``loop.run_in_executor`` with a ``ThreadPoolExecutor`` costs about 10 µs of
event-loop time per call under load (a work item, a concurrent future, a
chained asyncio future). Here a call is one tuple on a ``SimpleQueue`` and one
``call_soon_threadsafe`` back: about 3 µs (``bench/serving.py`` measures the
whole path). Model execution releases the GIL, so these threads run in parallel.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

_STOP = object()


def _resolve(fut: asyncio.Future, result) -> None:
    if not fut.done():
        fut.set_result(result)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class WorkerPool:
    def __init__(self, threads: int, name: str = "batchgate-worker"):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        get = self._q.get
        while True:
            item = get()
            if item is _STOP:
                return
            loop, fut, fn, args = item
            try:
                result = fn(*args)
            except BaseException as e:  # handed back to the awaiting caller
                try:
                    loop.call_soon_threadsafe(_fail, fut, e)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass
            else:
                try:
                    loop.call_soon_threadsafe(_resolve, fut, result)
                except RuntimeError:
                    pass

    def submit(self, fn: Callable, *args) -> asyncio.Future:
        """Run ``fn(*args)`` on a worker thread; the returned future lives on the running loop."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put((loop, fut, fn, args))
        return fut

    def shutdown(self) -> None:
        for _ in self._threads:
            self._q.put(_STOP)
