"""HTTP/1.1 answers written at the end of the event loop's turn, all at once.

uvicorn writes an answer to its socket as soon as the app sends it: the head at
``http.response.start``, the body at ``http.response.body``, each a ``send`` system call. With
many connections busy, the loop runs one request's Python, then the kernel's TCP work for its
answer (and the wake-up of its reader), then the next request's Python, and so on: the kernel's
work between them leaves the caches cold, and each request's Python runs two to three times
slower than it would back to back (``bench/http_cost.py`` in process against the server).

:class:`BatchedWrites` stands in for a connection's transport: small writes are kept, and once
per loop turn :class:`WriteBatch` writes each connection's kept bytes in one call, after every
request of the turn has run. Measured on the 2-core VM (``bench/serving.py``'s request, 3 s runs
alternating): at 32 connections 10,448 answers a second against 7,645, p99 4.3 against 8.0 ms;
at 256, 8,788 against 6,229; at one connection the same (4,459 against 4,329, p50 218 against
235 µs): the answer waits for the end of its own turn, which comes at once when nothing else
is ready.

An answer the protocol makes while the loop reads (a refusal from the request's head, see
http_limits.py) is written at once instead (:meth:`BatchedWrites.write_now`): uvloop sends it
when the read callbacks of that poll are done, not after the next turn's ready callbacks (a turn
of executions on one core, the admitted requests' first steps). Measured at 3x overload on one
core (bench/overload.py's HTTP phase, 4 alternating rounds of 10 s, medians): refusal p99 after
the first second 7.6 ms against 9.3.

A write of ``BATCH_MAX_BYTES`` or more is not kept (what is kept goes first, then it): it costs
far more than the system call saved, and a large body must not be copied to be joined. Closing,
a half-close and ``writelines`` write what is kept first; an aborted or lost connection drops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("batchgate.http")

BATCH_MAX_BYTES = 64 * 1024  # kept bytes of one connection past this are written at once


class WriteBatch:
    """The connections of one event loop with bytes kept for the end of this turn."""

    __slots__ = ("loop", "_due", "rounds")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # (bound by the first connection)
        self._due: list[BatchedWrites] = []
        # Turns of the loop that wrote something, so far: a connection tells from them whether its
        # client sent a request again at once after an answer (http_limits.py, retries)
        self.rounds = 0

    def add(self, writes: BatchedWrites) -> None:
        due = self._due
        if not due:
            assert self.loop is not None
            self.loop.call_soon(self.flush)  # after the callbacks already ready: the turn's requests
        due.append(writes)

    def flush(self) -> None:
        due, self._due = self._due, []
        self.rounds += 1
        for writes in due:
            try:
                writes.flush()
            except Exception:  # noqa: BLE001 - one broken connection must not keep the others' answers
                log.debug("writing a connection's answers failed", exc_info=True)


class BatchedWrites:
    """A connection's transport, its small writes kept until the end of the loop's turn."""

    __slots__ = ("_t", "_batch", "_kept", "_size", "_closed_unsent")

    def __init__(self, transport: Any, batch: WriteBatch, closed_unsent: Callable[[], None] | None = None):
        """``closed_unsent()``: called when the connection is closed with bytes still to write
        (its client has yet to take them; it bounds how long it may take)."""
        self._t = transport
        self._batch = batch
        self._kept: list[bytes] = []
        self._size = 0
        self._closed_unsent = closed_unsent

    def write(self, data: bytes) -> None:
        n = len(data)
        if n >= BATCH_MAX_BYTES or self._size + n > BATCH_MAX_BYTES:
            self.flush()
            if n >= BATCH_MAX_BYTES:
                self._t.write(data)
                return
        if not self._kept:
            self._batch.add(self)
        self._kept.append(data if type(data) is bytes else bytes(data))
        self._size += n

    def flush(self) -> None:
        kept = self._kept
        if kept:
            self._kept, self._size = [], 0
            if not self._t.is_closing():  # (the peer went away meanwhile: nobody to answer)
                self._t.write(kept[0] if len(kept) == 1 else b"".join(kept))

    def write_now(self, data: bytes) -> None:
        """``data`` written ahead of the end of the turn (after what is kept), for an answer made
        while the loop reads its sockets: uvloop sends it once the read callbacks of this poll
        are done, before the ready callbacks (a turn of executions, admitted requests) that an
        end-of-turn write waits behind. The turn still counts as a writing one (``rounds``)."""
        self.flush()
        self._t.write(data)
        self._batch.add(self)

    def writelines(self, lines: Any) -> None:
        self.flush()
        self._t.writelines(lines)

    def write_eof(self) -> None:
        self.flush()
        self._t.write_eof()

    def close(self) -> None:
        self.flush()
        # Measured before close: asyncio's TLS transport, closed a second time, lets go of its
        # protocol and cannot say its buffer size any more (AttributeError in connection_lost).
        unsent = self._closed_unsent is not None and not self._t.is_closing() and self._t.get_write_buffer_size()
        self._t.close()
        if unsent and self._closed_unsent is not None:
            self._closed_unsent()

    def abort(self) -> None:
        self._kept, self._size = [], 0
        self._t.abort()

    def lost(self) -> None:
        """The connection is gone: let go of ``closed_unsent`` (a method of the protocol, which
        holds this: a cycle per connection left for the garbage collector otherwise)."""
        self._closed_unsent = None

    def is_closing(self) -> bool:
        return self._t.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._t.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:  # the rest as the transport has it
        return getattr(self._t, name)
