"""Admitted HTTP requests parsed in the event loop's turns, on one core (http_limits.py).

While a model sheds load, the guarded protocol judges each plain infer request from its request
line alone (``quick``). A refusal is written at once. On one core (``threads.LoopTurns``), a
request it would admit is admitted right there too, and the rest of its reading (httptools'
parse of the head and body, the app's task made) waits for a turn of the loop, with the executions,
instead of running while the loop reads: a burst of requests read in one poll then costs the
loop about a refusal's work each, and the refusals of that burst go out as soon as it is read
(with 75 requests a burst at 3x overload, a poll's reads took 2.5 ms, most of it the admitted
requests'). The admission counts at once, so the requests read after it are judged with it.
The app decodes the body in its task, after the turn, as for any request (decoding it in the
turn was measured worse: at 5,000 HTTP connections goodput 0.62-0.63 against 0.70-0.80 in three
alternating rounds of bench/overload.py, the model's executions waiting behind the decoding).

A connection's reading pauses while its request waits (bytes already read behind it go after
it, the usual way). A request that never reaches the app (its connection closed meanwhile, by
a drain; its head refused) has its admission released.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

ADMITTED = "batchgate.admitted"  # scope key: (version, model, version label) admitted by the protocol


class Admitted(NamedTuple):
    """An infer request admitted before its head was parsed: what the app serves it with."""

    served: Any  # the model version admitted (``DataPlane.release`` takes it back)
    model: str
    version: str  # the version asked for ("": the latest)


class DeferredRead(HttpToolsProtocol):
    """The turn-waiting part of the guarded protocol. Its class sets ``_later`` (run a
    function in a coming turn of the loop) and ``_release`` (give back an admission), and
    provides ``_read`` (its usual reading of bytes) and ``_refused``."""

    _later: Callable[[Callable[[], None]], None]
    _release: Callable[[Any], None]
    _refused: bool
    _deferred: bytes | None = None  # bytes read and judged, waiting for their turn to be parsed
    _more = b""  # bytes that arrived meanwhile, not judged yet
    _early: Admitted | None = None  # the admission of the first request of ``_deferred``
    _paused_here = False  # reading was paused by the wait (and is resumed after it)

    def _read(self, data: bytes) -> None:  # (the guarded protocol's)
        raise NotImplementedError

    def _defer(self, data: bytes, admitted: Admitted) -> None:
        """Parse ``data`` (its first request admitted as ``admitted``) in a coming turn."""
        self._deferred, self._early = data, admitted
        self._unset_keepalive_if_required()  # (a request has come: the idle clock stops)
        if not self.flow.read_paused:
            self.flow.pause_reading()
            self._paused_here = True
        self._later(self._parse_deferred)

    def _keep(self, data: bytes) -> bool:
        """Keep ``data`` for after the request that waits, if one does."""
        if self._deferred is None:
            return False
        self._more += data
        return True

    def _parse_deferred(self) -> None:
        data, more = self._deferred or b"", self._more
        self._deferred, self._more = None, b""
        try:
            if self._paused_here:
                self._paused_here = False
                self.flow.resume_reading()
            if not self._refused and not self.transport.is_closing():
                self._read(data)
                if more and not self._refused and not self.transport.is_closing():
                    self.data_received(more)
        finally:
            self.unused_admission()

    def take_admission(self) -> Admitted | None:
        """The early admission of the request whose head was just parsed, handed over once."""
        early, self._early = self._early, None
        return early

    def unused_admission(self) -> None:
        """An admission taken for a request that did not reach the app: released."""
        early, self._early = self._early, None
        if early is not None:
            self._release(early.served)
