"""Running a call's handler at once: its first step taken when the call arrives (a refusal is
answered without a task ever being made), the rest in a task. Python 3.12 does this itself
(asyncio's eager start); on 3.11 the first step is taken outside a task and a task drives the
rest through :func:`_resume`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any


def start_eagerly(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> asyncio.Task | None:
    """Take ``coro``'s first step now; the task that runs the rest (None: it ended at once)."""
    if sys.version_info >= (3, 12):
        # In a task already: since 3.12 asyncio.wait_for needs one, and the remote backend's
        # first call waits in it.
        return asyncio.Task(coro, loop=loop, eager_start=True)
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    resume = _resume(coro, waiting)
    resume.send(None)  # to its first yield: a cancel before the task's first step reaches ``coro``
    return loop.create_task(_Driven(resume))


class _Driven(Coroutine):
    """:func:`_resume`'s generator as a coroutine a task takes: asyncio takes no generator for
    a task since Python 3.12 ("a coroutine was expected"), however it is decorated."""

    __slots__ = ("_gen",)

    def __init__(self, gen):
        self._gen = gen

    def send(self, value):
        return self._gen.send(value)

    def throw(self, *exc):
        try:
            return self._gen.throw(*exc)
        finally:
            # What was thrown (a cancellation) mostly comes back out, with this frame in its
            # traceback: held here too, it made a cycle that kept the call's request (and any
            # shared-memory region it named) until a full collection.
            del exc

    def close(self) -> None:
        self._gen.close()

    def __await__(self):
        return self._gen


def _resume(coro, waiting):
    """Drive on, in a task, a coroutine whose first step was taken outside one: hand the task
    what the coroutine waits on, then pass what the task sends or throws through to it.

    Primed to its first (bare) yield before the task takes it, so that a task cancelled before
    its first step throws CancelledError here, into a started generator, and on into ``coro``
    (cancelling the future it awaits, as a task's cancel would, so that a queued request is
    dropped, not run for no one).
    (Thrown into an unstarted generator it ends it at once: ``coro`` never heard of the
    cancellation, later met GeneratorExit, and its request was counted a success, or stayed
    in flight while anything held it.) The task's first step sends None: on to ``waiting``."""
    try:
        yield
    except GeneratorExit:
        coro.close()
        raise
    except BaseException as e:  # noqa: BLE001 - the early cancellation, passed through
        try:
            if isinstance(e, asyncio.CancelledError) and isinstance(waiting, asyncio.Future) and waiting.cancel():
                waiting = coro.send(None)  # as a task's cancel does: what it awaits is cancelled with it
            else:
                waiting = None  # (see below)
                waiting = coro.throw(e)
        except StopIteration as done:
            return done.value
    while True:
        try:
            sent = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # noqa: BLE001 - passed through (cancellation among them)
            # What failed is what ``coro`` awaited (a thread's future, say): kept here, it held its
            # exception, whose traceback holds this frame and ``coro``'s, and their request: a
            # cycle, freed only by a full collection (a large refused request held ~3 copies).
            waiting = None
            try:
                waiting = coro.throw(e)
            except StopIteration as done:
                return done.value
            continue
        try:
            waiting = coro.send(sent)
        except StopIteration as done:
            return done.value
