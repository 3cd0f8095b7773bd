"""Start-up against a stop signal, and leaving a process whose model load is still running.

A model load runs in ONNX Runtime's native code on a thread of its own and cannot be called
off. A SIGTERM during start-up therefore must not wait for it: the server stops before it
listens, and the process leaves without joining the load's thread (Python's exit would wait
for it, as it waits for every executor thread, for as long as the load takes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable

log = logging.getLogger("batchgate")

# Threads that end on their own once their pool is shut down get this long; a thread still
# alive after it is a load (or a close) inside a model engine.
JOIN_S = 1.0


async def start_unless_stopped(starting: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``starting`` unless ``stop`` is set first. True once started (what start-up
    raised is raised here); False when the stop came first: start-up is cancelled, and what
    it had opened is for the caller's ``stop`` to close."""
    start = asyncio.ensure_future(starting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([start, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if start.done():
        start.result()
        return True
    log.info("shutdown signal received while starting: stopping before serving")
    start.cancel()
    with contextlib.suppress(BaseException):  # (the cancellation itself, or a failure it met)
        await start
    return False


def leave(code: int) -> int:
    """``code``, once every thread but daemons has ended; if one is still busy after
    ``JOIN_S`` (a load inside ONNX Runtime), the process exits at once with ``code``."""
    end = time.monotonic() + JOIN_S
    for t in _waited():
        t.join(max(0.0, end - time.monotonic()))
    busy = [t.name for t in _waited() if t.is_alive()]
    if not busy:
        return code
    log.warning("exiting without waiting for %s (a model load or close still in its engine)", ", ".join(busy))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _waited() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
