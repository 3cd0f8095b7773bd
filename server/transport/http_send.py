"""The sending side of a guarded HTTP/1.1 connection (http_limits.py): answers its client does
not take.

An answer its client does not take (the transport's ``pause_writing``), or a connection closed
with bytes still to write, must drain ``MIN_SEND_BYTES_PER_S`` a second, judged every
``body_timeout_s``, or the connection is aborted (``send_timeout``). Meanwhile nothing more is
read from it, and the bytes it holds count in the process's ``max_unsent_answer_bytes``
(``byte_budget.UnsentAnswers``): past that, the connections holding the most are aborted
(``unsent_answers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
from collections.abc import Callable
from typing import NamedTuple

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .byte_budget import UnsentAnswers
from .sockets import MIN_SEND_BYTES_PER_S

SEND_TIMEOUT = "send_timeout"  # an answer its client took too little of in time: the connection aborted
UNSENT_ANSWERS = "unsent_answers"  # aborted: it held the most of the process's unsent answer bytes


class SendLimits(NamedTuple):
    timeout_s: float  # body_timeout_s: how often what waits is judged
    refused: Callable[[str], None]  # counts a connection refused, by reason
    unsent: UnsentAnswers | None  # the process's bound on unsent answer bytes (None: none)


class SendSide(HttpToolsProtocol):
    """The methods of the sending side; the guarded protocol's class sets ``_send_limits``."""

    _send_limits: SendLimits
    _send_timer: asyncio.TimerHandle | None = None  # the clock of an answer waiting for its client
    _send_mark = 0  # bytes waiting to be written when that clock started
    _write_held = False  # not read while the client takes nothing of what is written
    _holding = False  # not read until its turn (past the overload refusals' rate)
    _evicting = False  # aborted for max_unsent_answer_bytes (at the end of this turn)
    _lost = False  # the connection is gone

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send()
        # Nothing more is read while the client does not take what is written: answers the
        # gate writes itself (a 404, a 429) would otherwise pile up for every request a
        # client sends without reading (436 MB in 30 s in a probe).
        self._write_held = True
        self.flow.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.transport.is_closing():
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            self._hold_unsent(0)
        if self._write_held:
            self._write_held = False
            if not self._holding and not self.pipeline:  # (else their own ends resume it)
                self.flow.resume_reading()

    def _send_lost(self) -> None:
        """The connection is gone: its clock stops, its bytes are no longer held."""
        self._lost = True
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._hold_unsent(0)

    def _hold_unsent(self, n: int) -> None:
        unsent = self._send_limits.unsent
        if unsent is not None and not self._evicting and (n or self in unsent.held):
            unsent.hold(self, n)

    def evict_unsent(self) -> None:
        """Its bytes are the process's largest past ``max_unsent_answer_bytes``: aborted, once the
        write that may be running (another connection's, which passed the bound) is done."""
        if not self._evicting:
            self._evicting = True
            self.loop.call_soon(self._evict)

    def _evict(self) -> None:
        if not self._lost:
            self._send_limits.refused(UNSENT_ANSWERS)
            self.transport.abort()

    def _watch_send(self) -> None:
        """Start the clock of what waits to be written (its client does not read, or reads
        slowly): within ``body_timeout_s`` the client must take ``MIN_SEND_BYTES_PER_S``
        a second of it, else the connection is aborted (a close would wait for ever)."""
        if self._send_timer is None:
            self._send_mark = self._unsent()
            self._send_timer = self.loop.call_later(self._send_limits.timeout_s, self._send_check)
        self._hold_unsent(self.transport.get_write_buffer_size())

    def _unsent(self) -> int:
        """Bytes written and not yet acknowledged by the client: the transport's buffer and
        the kernel's send queue (which takes megabytes from the buffer only once much of it
        has drained: the buffer alone stands still for seconds while a client reads)."""
        t = self.transport
        queued = 0
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return t.get_write_buffer_size() + queued

    def _send_check(self) -> None:
        self._send_timer = None
        t = self.transport
        limits = self._send_limits
        if not t.get_write_buffer_size() or (not t.is_closing() and not self.flow.write_paused):
            self._hold_unsent(0)
            return  # taken, or below the transport's high-water mark again
        left = self._unsent()
        if self._send_mark - left >= limits.timeout_s * MIN_SEND_BYTES_PER_S:
            self._send_mark = left  # it reads, fast enough: another round
            self._send_timer = self.loop.call_later(limits.timeout_s, self._send_check)
            self._hold_unsent(t.get_write_buffer_size())
            return
        limits.refused(SEND_TIMEOUT)
        self._hold_unsent(0)
        t.abort()
