"""The access log: one JSON line per logged inference request.

Which requests are logged (``access_log``):

- ``off``: none;
- ``sampled`` (the default): every error and every request slower than ``access_log_slow_ms``,
  and of the rest a share of ``access_log_sample_ratio``, chosen on the request id (the same id
  is logged or not on every replica and after a retry: a hash of it, not a coin), or at random
  for a request without an id;
- ``all``: every request.

Whatever the mode, at most ``access_log_max_lines_per_s`` lines a second are written: under
overload thousands of refusals a second are errors, and a line for each would turn the overload
into a logging storm. Lines past it, or past a full write queue, are dropped and counted
(``batchgate_access_log_dropped_total{reason}``).

The line is built only once the request is decided to be logged; the decision itself costs a
clock read and, for sampled requests with an id, a CRC. Lines are written by a thread of their
own (to stdout, or ``access_log_file``), never on the event loop.

Field names follow OpenTelemetry's semantic conventions where they have one (``client.address``,
``http.request.method``, ``url.path``, ``http.response.status_code``, ``rpc.system``,
``rpc.method``, ``rpc.response.status_code``, ``error.type``, ``user.id``, ``trace_id``,
``span_id``); batchgate's own fields are prefixed ``batchgate.``. Client text (ids, names) is
cut to a bounded length; the JSON encoder escapes it. The API key's id is logged, never its token.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from random import random
from select import PIPE_BUF
from typing import Any

import orjson

from ..logs import one_line, open_private

log = logging.getLogger("batchgate.access")

MODES = ("off", "sampled", "all")
QUEUE_LINES = 65_536  # lines waiting for the writer thread at most
OVERLOAD = "RESOURCE_EXHAUSTED"  # the error of a refusal for overload: sampled, not kept (see _request)
_CRC_SCALE = 1.0 / (1 << 32)


def _escaped(line: bytes) -> bytes:
    if line.isascii():  # (nearly every line: nothing to look at)
        return line
    return one_line(line.decode("utf-8")).encode("utf-8")


class Note:
    """What the serving path notes about one request for its access line (and its trace): the
    time it waited in the queue and the rows of the batch that ran it. Made by the transport,
    filled by the model version that serves the request."""

    __slots__ = (
        "start",
        "queue_s",
        "batch_rows",
        "span",
        "model",
        "request_id",
        "version",
        "variant",
        "error",
        "bytes_in",
        "bytes_out",
        "answer",
        "tracing",
    )

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.queue_s: float | None = None
        self.batch_rows = 0
        self.span: Any = None  # the request's tracing span, when it is traced
        self.model = ""
        self.request_id = ""
        self.error = ""  # the V2 error code the request was answered with ("": answered)
        self.version = ""  # the version that answered
        self.variant = ""  # a route's variant that answered
        self.bytes_in = 0
        self.bytes_out = 0
        self.answer: Any = None  # a gRPC answer, measured only for a line that is written
        self.tracing: Any = None  # the gateway's tracing (monitoring/tracing.Tracing) when this request is traced


WRITE_EVERY_S = 0.1  # how often the writer thread takes the lines queued


class AccessLog:
    """Decides which requests are logged and writes their lines (see the module's docstring)."""

    def __init__(
        self,
        mode: str = "sampled",
        sample_ratio: float = 0.01,
        slow_ms: float = 1000.0,
        max_lines_per_s: int = 1000,
        path: str = "",
        worker: str | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"access_log must be one of {', '.join(MODES)}")
        self.mode = mode
        self.ratio = 1.0 if mode == "all" else sample_ratio
        self.slow_s = slow_ms / 1000.0
        self.max_per_s = max_lines_per_s
        self.path = path
        self.worker = worker
        self.lines = 0  # lines written (by the writer thread)
        self.dropped = {"rate": 0, "queue": 0, "error": 0}  # (written on the event loop)
        self.unwritten = 0  # lines a write failed to put out (the writer thread's; counted as "error")
        self._write_failing = False
        self._second = 0.0
        self._this_second = 0
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._out: Any = None
        self._followed_at = time.monotonic()  # when the path was last checked for a rotation
        self._thread: threading.Thread | None = None
        self._failed_once = False
        if path:  # opened now: a file that cannot be written stops the start, never a request
            try:
                self._out = open_private(path, binary=True)  # kept open by the writer thread
            except OSError as e:
                raise ValueError(f"access_log_file {path}: cannot be opened for writing: {e.strerror}") from None

    @property
    def on(self) -> bool:
        return self.mode != "off"

    # ------------------------------------------------------------------ the decision
    def wanted(self, failed: bool, elapsed_s: float, request_id: str) -> bool:
        """Whether a request answered after ``elapsed_s`` (``failed``: with an error) is logged."""
        if failed or elapsed_s >= self.slow_s:
            return True
        ratio = self.ratio
        if ratio >= 1.0:
            return True
        if ratio <= 0.0:
            return False
        if request_id:
            return zlib.crc32(request_id.encode("utf-8", "replace")) * _CRC_SCALE < ratio
        return random() < ratio

    def overload_wanted(self) -> bool:
        """Whether an overload refusal answered at the door (no request id known yet) is logged:
        drawn at the sample ratio. Overload refusals are sampled as quick answers are, not kept
        as other errors are: under overload they come in thousands a second, and
        batchgate_refusals_total counts each one."""
        return self.wanted(False, 0.0, "")

    def request(self, *args: Any, **kw: Any) -> None:
        """Log one answered request if it is wanted (see :meth:`_request`); never raises: a line
        that cannot be made is counted as dropped (``error``), and said once in the log."""
        try:
            self._request(*args, **kw)
        except Exception as e:  # noqa: BLE001 - the access log must never fail a request
            self.dropped["error"] += 1
            if not self._failed_once:
                self._failed_once = True
                log.error("an access log line could not be made (counted from now on): %s", e)

    def _request(
        self,
        note: Note | None,
        protocol: str,
        model: str,
        status: int | str,
        error: str,
        who: Callable[[], tuple[str, str | None]],
        http_method: str = "",
        path: str = "",
        sampled: bool = False,
    ) -> None:
        """Log one answered request if it is wanted: ``status`` is the HTTP status (int) or the
        gRPC status name; ``error`` the V2 error code ("" when answered); ``who`` gives the
        caller's address and key id (asked only for a line that is written: reading a TLS peer
        costs more than deciding). Errors are kept, but for overload refusals (sampled as quick
        answers are; ``sampled``: the caller drew it already, :meth:`overload_wanted`)."""
        elapsed = time.perf_counter() - note.start if note is not None else 0.0
        rid = note.request_id if note is not None else ""
        kept = bool(error) and error != OVERLOAD
        if not (sampled or self.wanted(kept, elapsed, rid)) or not self._room():
            return
        peer, user = who()
        now = time.time()
        line: dict[str, Any] = {
            "timestamp": epoch_iso(now - elapsed),
            "event.name": "batchgate.access",
            "client.address": client_address(peer),
        }
        if protocol == "http":
            line["http.request.method"] = http_method
            line["url.path"] = path[:256]
            line["http.response.status_code"] = status
        else:
            line["rpc.system"] = "grpc"
            line["rpc.method"] = path
            line["rpc.response.status_code"] = status
        if error:
            line["error.type"] = error
        line["batchgate.model"] = model[:128]
        if note is not None:
            if note.version:
                line["batchgate.model.version"] = note.version[:64]
            if note.variant:
                line["batchgate.variant"] = note.variant[:128]
            if rid:
                line["batchgate.request.id"] = rid[:128]
            span = note.span
            if span is not None:
                ctx = span.get_span_context()
                line["trace_id"] = f"{ctx.trace_id:032x}"
                line["span_id"] = f"{ctx.span_id:016x}"
            line["batchgate.duration_ms"] = round(elapsed * 1000, 3)
            if note.queue_s is not None:
                line["batchgate.queue_ms"] = round(note.queue_s * 1000, 3)
            if note.batch_rows:
                line["batchgate.batch_size"] = note.batch_rows
            line["batchgate.request.bytes"] = note.bytes_in
            answer = note.answer
            if answer is not None:
                note.bytes_out = len(answer) if type(answer) is bytes else answer.ByteSize()
            line["batchgate.response.bytes"] = note.bytes_out
        if user:
            line["user.id"] = user
        self._put(line)

    # ------------------------------------------------------------------ writing
    def _room(self) -> bool:
        """Whether one more line fits this second's bound and the queue (else it is counted as
        dropped, before anything of it is built)."""
        now = time.monotonic()
        if now - self._second >= 1.0:
            self._second, self._this_second = now, 0
        if self._this_second >= self.max_per_s:
            self.dropped["rate"] += 1
            return False
        if len(self._queue) >= QUEUE_LINES:
            self.dropped["queue"] += 1
            return False
        self._this_second += 1
        return True

    def _put(self, fields: dict[str, Any]) -> None:
        if self._closed:  # a request answered while the gateway stops, after the file was closed
            self.dropped["error"] += 1
            return
        if self.worker is not None:
            fields["batchgate.worker"] = self.worker
        self._queue.append(_escaped(orjson.dumps(fields)))
        if self._thread is None:
            self._start()
        # The writer is not woken per line: it takes what is queued every WRITE_EVERY_S. Waking
        # it cost the loop more than the set() itself: the writer took the GIL, and the Event's
        # lock, from a busy loop (py-spy at gRPC 3x capacity: 5% of the loop's samples in
        # Event.set; bench/observability.py, access_log all over gRPC: 0.80x -> 0.87x of off).

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._writer, name="batchgate-access-log", daemon=True)
        self._thread.start()

    def _writer(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(WRITE_EVERY_S)  # (set only by close)
            chunk = []
            while queue:
                chunk.append(queue.popleft())
            if chunk:
                if self._out is not None:
                    try:
                        self._follow()
                    except OSError as e:  # (the new file cannot be opened: the lines go on where they went)
                        log.warning("the access log file could not be opened again after a rotation: %s", e)
                left = len(chunk)  # lines not written yet
                try:
                    out = self._out
                    if out is None:  # stdout, looked up each time (it may be replaced: a test's capture)
                        out = getattr(sys.stdout, "buffer", None)
                    # To a pipe, whole lines at most PIPE_BUF bytes a write: worker processes
                    # share stdout (or a pipe named as the file, /dev/stdout), and a longer write
                    # to a full pipe was cut and another worker's lines put in the middle of a
                    # line. A file takes the chunk in one write (appends are not interleaved).
                    for piece in _pieces(chunk) if _is_pipe(out) else (b"\n".join(chunk) + b"\n",):
                        if out is not None:
                            out.write(piece)
                            out.flush()
                        else:  # a stdout without bytes
                            sys.stdout.write(piece.decode())
                            sys.stdout.flush()
                        n = piece.count(b"\n")  # (a line holds no raw newline: JSON escapes it)
                        self.lines += n
                        left -= n
                    if self._write_failing:
                        self._write_failing = False
                        log.warning("the access log is written again")
                except (OSError, ValueError) as e:  # a full disk, a closed pipe: the service goes on
                    # Counted, not said every 0.1 s: until 2026-12-06 such lines counted as written
                    # (batchgate_access_log_lines_total) and a warning came with each chunk.
                    self.unwritten += left
                    if not self._write_failing:
                        self._write_failing = True
                        log.warning(
                            "the access log could not be written (%s); lines are counted in "
                            'batchgate_access_log_dropped_total{reason="error"} until it can',
                            e,
                        )
            if self._closed and not queue:
                return

    def _follow(self) -> None:
        """At most once a second, before a write: a file renamed or removed by rotation (logrotate
        without copytruncate) is left, and the path opened afresh (writer thread)."""
        now = time.monotonic()
        if now - self._followed_at < 1.0:
            return
        self._followed_at = now
        try:
            st = os.stat(self.path)
            same = os.path.samestat(st, os.fstat(self._out.fileno()))
        except FileNotFoundError:
            same = False
        if not same:
            old, self._out = self._out, open_private(self.path, binary=True)
            old.close()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._closed = True
        if self._thread is not None:
            self._wake.set()
            self._thread.join(5)
            if self._thread.is_alive():  # a stuck write (a full pipe): leave the file to it
                return
        if self._out is not None:  # the file opened at start, written to or not
            with contextlib.suppress(OSError):  # (what a failed write left in its buffer: counted already)
                self._out.close()


def _is_pipe(out: Any) -> bool:
    """Whether ``out`` writes to a pipe (a stdout without a file descriptor counts as one)."""
    try:
        return stat.S_ISFIFO(os.fstat((out if out is not None else sys.stdout).fileno()).st_mode)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return True


def _pieces(lines: list[bytes]) -> Iterator[bytes]:
    """``lines`` as newline-ended runs of whole lines, each within PIPE_BUF bytes (what one write
    to a pipe sends whole: past it the kernel may split it where the pipe is full and put another
    process's write in between) where its lines allow (a longer line goes alone)."""
    run: list[bytes] = []
    size = 0
    for line in lines:
        if run and size + len(line) + 1 > PIPE_BUF:
            yield b"\n".join(run) + b"\n"
            run, size = [], 0
        run.append(line)
        size += len(line) + 1
    if run:
        yield b"\n".join(run) + b"\n"


def epoch_iso(t: float) -> str:
    """``t`` (seconds since the epoch) as RFC 3339 UTC with microseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def client_address(peer: str) -> str:
    """The address of a gRPC peer (``ipv4:10.0.0.1:5000``, ``ipv6:[::1]:5000``) or an
    ``host:port`` pair, without the port."""
    if peer.startswith(("ipv4:", "ipv6:")):
        peer = peer[5:]
    host, sep, _port = peer.rpartition(":")
    host = host if sep else peer
    return host.strip("[]")[:64]


def open_log(settings: Any, worker: str | None = None) -> AccessLog | None:
    """The access log the settings ask for (None: off). ``settings``: the observability section."""
    if settings.access_log == "off":
        return None
    path = settings.access_log_file
    if path:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"access_log_file {path}: the folder {parent} does not exist")
    return AccessLog(
        settings.access_log,
        settings.access_log_sample_ratio,
        settings.access_log_slow_ms,
        settings.access_log_max_lines_per_s,
        path,
        worker,
    )
