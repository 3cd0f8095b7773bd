"""Limits on HTTP connections, enforced in the protocol before any request reaches the app.

uvicorn's httptools protocol reads a request head of any size, waits for it (and for a body)
for ever, and accepts any number of connections. :func:`guarded_protocol` makes a subclass
that bounds all of these:

- the request head (URL and headers together) is at most ``max_header_bytes``: more is
  answered 431 and the connection closed;
- the head must arrive within ``header_timeout_s`` of the connection (or of the first byte of a
  keep-alive connection's next request), the body within ``body_timeout_s`` of the head:
  otherwise 408 and close
  (a slow client cannot hold a connection, and its file descriptor, by trickling bytes);
- at most ``max_connections`` connections at once: one more is closed as soon as it is made;
- at most ``max_pipelined`` requests read and queued behind the one being answered (HTTP/1.1
  pipelining; reading stops while any wait): one more closes the connection;
- an answer its client does not take, or a connection closed with bytes still to write, must
  drain ``MIN_SEND_BYTES_PER_S`` a second, or the connection is aborted (``send_timeout``); its
  bytes count in ``max_unsent_answer_bytes`` (``unsent``; the sending side is http_send.py).

Each refusal is counted by ``refused(reason)``. Keep-alive idle time is uvicorn's own
``timeout_keep_alive``.

Infer requests are admitted here too, as soon as their head is parsed (``gate``, which is
:meth:`HttpApp.admit_early`): a refusal (429 under overload, 401/403 for keys, 404 for an
unknown model, 503 while draining) is written straight to the socket, and the body that follows
is parsed and dropped (one past ``max_body_bytes``, max_request_bytes, closes the connection
instead); no ASGI scope, task or cycle is made for it, so under overload a refusal
costs a small fraction of an answer. An admitted request goes on to the app with its admission
in the scope. Before that, a plain infer request whose whole bytes are at hand is refused for
overload from its request line alone when the model is shedding (``quick``, which is
:meth:`HttpApp.quick_refusal`): not even its head is parsed. On one core one it would admit is
admitted there, and parsed in a turn of the event loop (http_defer.py). Every overload refusal takes a turn
(``core/rate.Pacer``: turns at ``refusals_per_s``, one after another); past the rate, a
connection just refused is not read until its turn, so its client's next request waits in its
own socket instead of taking the core from admitted work (TCP backpressure), for about the held
connections over the rate. A *retry* (``core/rate.RETRY_ROUNDS``: its client sent it again at
once after a refusal, as a closed loop does) takes a turn at ``retries_per_s`` as well, and waits
for the later. Clients that come back at their own pace are answered as they come up to
``refusals_per_s``; thousands that retry at once cost the core ``retries_per_s`` refusals a
second.


On a TLS connection each request's scope also carries the ASGI TLS extension
(``scope["extensions"]["tls"]``, with the client certificate's subject as ``client_cert_name``;
see ``security/tls.py``), made once per connection after its handshake.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Literal

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.rate import NEVER, Turns
from ..security.tls import tls_extension
from . import batched_writes
from .byte_budget import UnsentAnswers
from .http_defer import ADMITTED, Admitted, DeferredRead
from .http_heads import QUICK_PREFIX, cut_upgrade, declared_length, plain_head, rename_upgrade
from .http_scope import WAITERS, Waiters, encoded_separator
from .http_send import SendLimits, SendSide

HEAD_TOO_LARGE = "header_bytes"
TOO_MANY_FIELDS = "header_fields"
# Header (and trailer) fields of one request by default (max_header_fields): each is a call into
# Python as httptools reads it, so a head of 10,000 tiny fields within max_header_bytes cost ~5 ms
# of the loop (Apache's LimitRequestFields is 100; the h2 engine allows as many a header block).
MAX_HEADER_FIELDS = 128
HEAD_TIMEOUT = "header_timeout"
BODY_TIMEOUT = "body_timeout"
TOO_MANY_CONNECTIONS = "connections"
OVERLOAD_HOLD = "overload_hold"  # a connection not read until its turn (past the overload refusals' rate)
RETRY_HOLD = "overload_retry_hold"  # ... a retry's, until its later turn at the retries' rate
NOT_HTTP = "malformed"  # bytes httptools cannot parse as HTTP/1.1 (400)
TRANSFER_CODING = "transfer_encoding"  # a transfer coding other than chunked alone (501)
PIPELINE = "pipeline"  # more requests queued behind the one being answered than max_pipelined_requests
UPGRADE = "upgrade"  # a request httptools took for an upgrade (its Upgrade header not renamed): 400

LINGER_S = 1.0  # how long a refused connection's further input is read and dropped
_STATUS = {
    400: b"400 Bad Request",
    431: b"431 Request Header Fields Too Large",
    408: b"408 Request Timeout",
    501: b"501 Not Implemented",
    503: b"503 Service Unavailable",
}
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

# What the gate says of a request whose head is parsed: None = on to the app; otherwise the
# answer to write now (status, headers, body) and whether it is an overload refusal (it takes a
# turn, and the connection may be left unread until then).
Verdict = tuple[int, list[tuple[bytes, bytes]], bytes, bool] | None
Gate = Callable[[str, str, dict], Verdict]
# (model, peer): an overload refusal judged from the request line; on one core (``later``
# given) the admission of a request it would not refuse, its parsing left for a turn (http_defer.py)
Quick = Callable[[str, str], Verdict | Admitted]
_CLOSE = (b"connection", b"close")
HEAD_CACHE_ENTRIES = 64  # request heads the quick refusal keeps judged (a client repeats its own)
HEAD_CACHE_MAX_BYTES = 2048  # ... each at most this long


def guarded_protocol(
    max_header_bytes: int,
    header_timeout_s: float,
    body_timeout_s: float,
    max_connections: int,
    refused: Callable[[str], None],
    gate: Gate | None = None,
    max_pipelined: int = 128,
    quick: Quick | None = None,
    shedding: Callable[[], bool] | None = None,
    max_header_fields: int = MAX_HEADER_FIELDS,
    max_body_bytes: int = 64 << 20,
    cors: bool = False,
    unsent: UnsentAnswers | None = None,
    refusals_per_s: float = float("inf"),
    retries_per_s: float = float("inf"),
    later: Callable[[Callable[[], None]], None] | None = None,
    release: Callable[[Any], None] | None = None,
) -> type[HttpToolsProtocol]:
    """An httptools protocol class with the limits above (one class per gateway). ``later``
    (run a function in a coming turn of the event loop, on one core) and ``release`` (give back
    an admission): see http_defer.py."""
    writes = batched_writes.WriteBatch()  # (a gateway serves from one event loop)
    turns = Turns(refusals_per_s, retries_per_s)  # overload refusals' turns
    # request heads _quick has judged: their model and Content-Length, or False (not plain)
    heads: dict[bytes, tuple[str, int] | Literal[False]] = {}
    answer: list[Any] = [None, None, None, 0, b""]  # the last quick refusal's headers, body, defaults, status, bytes

    class GuardedHttpToolsProtocol(DeferredRead, SendSide):
        _head_bytes = 0
        _fields = 0  # header and trailer fields of this request so far
        _dropped = 0  # bytes of the body of a request the gate answered, read and dropped so far
        _timer: asyncio.TimerHandle | None = None
        _refused = False  # answered and closing: what is still parsed from the buffer is ignored
        _behind = False  # this request was pipelined behind an answer still in progress
        _tls: dict[Any, Any] | None = None  # the ASGI TLS extension of this connection; None = plaintext
        _answered = False  # this request was answered by the gate: its body is parsed and dropped
        _keep_alive = True  # whether the connection stays open after the gate's answer
        _pause_s = 0.0  # after the gate's answer, how long the connection is left unread
        _pause_reason = OVERLOAD_HOLD  # ... counted under this reason
        _in_message = False  # httptools has begun a request and not yet ended it
        _in_head = False  # ... and not yet read all of its head
        _send_limits = SendLimits(body_timeout_s, refused, unsent)
        _progress = False  # the parser called us back while it read the last data
        _silent = 0  # bytes read since it last did
        _held = b""  # the end of the last read, which may begin an Upgrade header's line
        _last_refusal = NEVER  # (writes.rounds, loop time) of its last overload refusal, or its hold's end
        _waiters: Waiters | None = None  # its requests awaiting answers, cancelled if it is lost

        def data_received(self, data: bytes) -> None:
            if self._refused or self._keep(data):
                return
            if self._held:
                data = self._held + data
                self._held = b""
            if not self._in_message or self._in_head:
                end = data.find(b"\r\n\r\n")
                stop = len(data) if end < 0 else end + 2  # (the head only: the body may be long)
                if end < 0:
                    # A head comes in pieces as its client writes it (or as TCP cuts it): an
                    # Upgrade header's name cut between two reads was not renamed, and httptools
                    # then skipped the request's body (served empty) and every byte after it.
                    cut = cut_upgrade(data)
                    if cut:
                        self._held = data[-cut:]
                        data = data[:-cut]
                        stop -= cut
                data = rename_upgrade(data, stop)
            idle = self.cycle is None or self.cycle.response_complete
            if not data:  # all of it held: the head's clock starts as for any other byte
                if idle and not self._in_message and self._timer is None:
                    self._arm(header_timeout_s, HEAD_TIMEOUT)
                return
            if (
                quick is not None
                and idle
                and not self._in_message
                and not self.pipeline
                and (shedding is None or shedding())
            ):
                data = self._quick(data)
                if not data:
                    return
            self._read(data)

        def _read(self, data: bytes) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self._in_message and self._timer is None:
                # the first byte of a keep-alive connection's next request starts its head's
                # clock, whether or not the parser begins a message with it: empty lines before a
                # request begin none, and uvicorn's keep-alive clock stops at any byte (before,
                # one CRLF after an answer held the connection for ever)
                self._arm(header_timeout_s, HEAD_TIMEOUT)
            self._progress = False
            super().data_received(data)
            if self._progress or self._refused:
                self._silent = 0
            else:
                # Bytes the parser took without a word to us: a header or trailer line still
                # arriving (httptools gathers its value by concatenation, quadratic, and hands it
                # over only whole), or chunk extensions. Bounded as the head is.
                self._silent += len(data)
                if self._silent > max_header_bytes:
                    self._too_long()

        def _quick(self, data: bytes) -> bytes:
            """Answer at once each whole, plain infer request at the front of ``data`` that
            ``quick`` refuses for overload, from its request line and Content-Length alone,
            without httptools, a scope or the gate (a tenth of an answer's cost matters when
            most requests are refused); what is left goes to httptools as usual. Plain: HTTP/1.1,
            ``POST /v2/models/NAME/infer``, a Content-Length and its whole body already here, no
            Transfer-Encoding, Expect, Connection or Upgrade header."""
            pos, n = 0, len(data)
            answered = False
            assert quick is not None
            while data.startswith(QUICK_PREFIX, pos):
                end = data.find(b"\r\n\r\n", pos, pos + max_header_bytes)
                if end < 0:
                    break
                head = data[pos:end]
                plain = heads.get(head)
                if plain is None:  # (a client sends the same head request after request: read once)
                    plain = plain_head(head, cors)  # (cors: one with an Origin is answered on the usual way)
                    if len(head) <= HEAD_CACHE_MAX_BYTES:
                        if len(heads) >= HEAD_CACHE_ENTRIES:
                            heads.clear()
                        heads[head] = plain
                if not plain:
                    break
                name, length = plain
                if end + 4 + length > n:
                    break
                verdict = quick(name, self.client[0] if self.client else "")
                if verdict is None:
                    break
                if type(verdict) is Admitted:  # (on one core: parsed in a turn, http_defer.py)
                    if answered:
                        self.on_response_complete()
                    self._defer(data[pos:], verdict)
                    return b""
                status, headers, body, overload = verdict  # type: ignore[misc]
                dh = self.server_state.default_headers
                if headers is not answer[0] or body is not answer[1] or dh is not answer[2] or status != answer[3]:
                    # (a refusal's words come back the same objects: its bytes are made once)
                    answer[:] = headers, body, dh, status, self._answer_bytes(status, headers, body, True)
                self.transport.write_now(answer[4])  # type: ignore[attr-defined]
                self._disarm()  # (the next request's head clock starts with its first byte)
                pos = end + 4 + length
                answered = True
                if overload:
                    pause_s, reason = self._turn()
                    if pause_s > 0:  # past the refusals' rate: unread until its turn, as below
                        self._hold(pause_s, reason)
                        return data[pos:]
            if answered:
                self.on_response_complete()  # keep-alive clock, as after any answer
            return data[pos:] if pos else data

        def _answer_bytes(self, status: int, headers, body: bytes, keep_alive: bool) -> bytes:
            out = [_STATUS_LINES[status]]
            for name, value in (*self.server_state.default_headers, *headers):
                out += [name, b": ", value, b"\r\n"]
            if not keep_alive and _CLOSE not in headers:
                out.append(b"connection: close\r\n")
            out += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body]
            return b"".join(out)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            # Every write from here on (uvicorn's request cycles, the gate's answers, refusals)
            # waits for the end of the loop's turn (batched_writes.py).
            if writes.loop is None:
                writes.loop = self.loop
            self.transport = batched_writes.BatchedWrites(transport, writes, self._watch_send)  # type: ignore[assignment]
            if len(self.connections) > max_connections:
                refused(TOO_MANY_CONNECTIONS)
                self._refuse(503, f"more than {max_connections} connections (max_connections)")
                return
            if self.scheme == "https":
                self._tls = tls_extension(transport)
            self._arm(header_timeout_s, HEAD_TIMEOUT)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._send_lost()
            if self._waiters is not None:
                self._waiters.lose()
            super().connection_lost(exc)
            if type(self.transport) is batched_writes.BatchedWrites:
                self.transport.lost()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Requests read ahead wait already, or the client takes nothing of what is written:
            # read no more until they are answered, or it reads (uvicorn resumed reading).
            if self.pipeline or self._write_held:
                self.flow.pause_reading()

        def on_message_begin(self) -> None:
            self._progress = True
            self._in_message = self._in_head = True
            self._behind = self.cycle is not None and not self.cycle.response_complete
            super().on_message_begin()
            waiters = self._waiters
            if waiters is None:
                waiters = self._waiters = Waiters()
            self.scope[WAITERS] = waiters  # type: ignore[literal-required]
            if self._tls is not None:
                self.scope["extensions"] = {"tls": self._tls}
            self._head_bytes = self._fields = self._dropped = 0
            if self._timer is None and not self._behind:  # a keep-alive connection's next request
                self._arm(header_timeout_s, HEAD_TIMEOUT)

        def on_url(self, url: bytes) -> None:
            self._progress = True
            if self._count(len(url)):
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._progress = True
            self._fields += 1
            if self._fields > max_header_fields and not self._refused:
                what = "the request head" if self._in_head else "the request head with its trailers"
                self._head_refused(
                    TOO_MANY_FIELDS, f"{what} has more than {max_header_fields} fields (max_header_fields)"
                )
                return
            if self._count(len(name) + len(value) + 4):
                if not self._in_head:
                    # A chunked body's trailer field: counted with the head, never merged into it
                    # (RFC 9110 6.5.1). uvicorn added it to the request's headers, so a trailer
                    # could set Content-Encoding or Inference-Header-Content-Length after a proxy
                    # had checked the head.
                    return
                if len(name) == 17 and name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
                    # RFC 9112 6.1: a coding the server does not know (gzip, chunked: the body
                    # would be taken for plain bytes) is a 501, and the framing is lost with it
                    refused(TRANSFER_CODING)
                    self._refuse(501, "only Transfer-Encoding: chunked is served")
                    return
                super().on_header(name, value)

        def _unsupported_upgrade_warning(self) -> None:
            """httptools stopped at an upgrade (refused in ``on_headers_complete``): uvicorn's two
            WARNING lines for each are not written."""
            if not self._refused:  # (cannot happen: every upgrade is refused as its head ends)
                self._refuse_upgrade()

        def _refuse_upgrade(self) -> None:
            refused(UPGRADE)
            self._refuse(400, "batchgate upgrades no connection: send the request without Upgrade")

        def send_400_response(self, msg: str) -> None:
            """Bytes that are not HTTP/1.1: a JSON error as every other answer's, counted
            (uvicorn wrote plain text and logged a warning line for each)."""
            if self._refused:  # answered already (the parser stops at what we refused)
                return
            refused(NOT_HTTP)
            self._refuse(400, "the request is not valid HTTP/1.1")

        def on_headers_complete(self) -> None:
            self._progress = True
            self._in_head = False
            if not self._refused:
                if self.parser.should_upgrade():
                    # An Upgrade header renaming did not reach (a request pipelined behind
                    # another in one read): httptools has stopped at it, its body and what
                    # follows unread, so it can only be refused (uvicorn would serve it on an
                    # empty body and write two WARNING lines a request).
                    self._refuse_upgrade()
                    return
                # A pipelined request waits behind the answer in progress (uvicorn stops reading
                # for it): its time starts only when that answer is done.
                if self._behind:
                    self._disarm()
                else:
                    self._arm(body_timeout_s, BODY_TIMEOUT)
                    if gate is not None and self._gate():
                        return
                if self._behind and len(self.pipeline) >= max_pipelined:
                    # A client that sends request after request without reading the answers:
                    # one read holds thousands of small ones, each a request cycle kept.
                    refused(PIPELINE)
                    self._refused = True  # (what is still parsed of this read is dropped)
                    self._disarm()
                    self.transport.close()  # (behind an answer in progress: no words of ours)
                    return
                super().on_headers_complete()

        def _gate(self) -> bool:
            """Ask the gate about this request; True when it was answered here."""
            early = self.take_admission()
            if early is not None:  # (admitted from its request line already)
                self.scope[ADMITTED] = early  # type: ignore[literal-required]
                return False
            if self.parser.get_method() != b"POST":  # only infer requests are admitted early
                return False
            url = self.url
            if b"?" in url or b"%" in url or b"#" in url or url[:1] != b"/":
                raw = httptools.parse_url(url).path
                path = raw.decode("ascii")
                if "%" in path:
                    if encoded_separator(raw):
                        return False  # the app refuses the request (http_scope.check_raw_path)
                    path = urllib.parse.unquote(path)
            else:  # a plain path, as clients send it: no need to parse
                path = url.decode("ascii")
            assert gate is not None
            verdict = gate("POST", path, self.scope)  # type: ignore[arg-type]
            if verdict is None:
                return False
            status, headers, body, overload = verdict
            self._answered = True
            closing = _CLOSE in headers  # the answer closes the connection (the server drains)
            # A client that asked "Expect: 100-continue" and gets a final answer instead may or
            # may not send its body; the connection cannot tell, so it closes after the answer. So
            # does one whose body is past max_request_bytes (max_body_bytes): read and dropped, it
            # held the connection, and the loop's reads, for up to http_body_timeout_s.
            self._keep_alive = (
                not closing
                and not self.expect_100_continue
                and self.parser.should_keep_alive()
                and declared_length(self.headers) <= max_body_bytes
            )
            self.transport.write_now(self._answer_bytes(status, headers, body, self._keep_alive))  # type: ignore[attr-defined]
            if not self._keep_alive:  # closed now (what the client still sends is read and dropped)
                self._disarm()
                self._refuse_close()
                return True
            if overload:
                # Past the refusals' rate the connection is not read again until its turn: its
                # client's next request waits in its own socket instead of taking the core from
                # admitted work (a client that waits its Retry-After loses nothing), and held
                # connections come back one turn after another, not all at once.
                self._pause_s, self._pause_reason = self._turn()
            return True

        def _turn(self) -> tuple[float, str]:
            """An overload refusal's turn (``core/rate.Turns``), taken as it is written: how long
            the connection is then left unread (0: not at all), and the reason a hold is counted
            under (the rate that set it)."""
            last, self._last_refusal = self._last_refusal, (writes.rounds, self.loop.time())
            wait, retry = turns.take(*self._last_refusal, last)
            return wait, RETRY_HOLD if retry else OVERLOAD_HOLD

        def _hold(self, seconds: float, reason: str) -> None:
            """Leave the connection unread for ``seconds`` (its turn), counted."""
            refused(reason)
            self._holding = True
            self.flow.pause_reading()
            self.loop.call_later(seconds, self._resume)

        def _resume(self) -> None:
            self._holding = False
            # what its client sent meanwhile (at once, as a rule) is read now: a retry
            self._last_refusal = (writes.rounds, self.loop.time())
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                # A request read with the refused one (pipelined) is being answered: its end
                # resumes reading and starts the next in line. Ending it here would start that
                # next one beside it, and its answer could overtake this one's.
                return
            self.on_response_complete()  # keep-alive timer, reading resumed

        def on_body(self, body: bytes) -> None:
            self._progress = True
            if self._refused:
                return
            if not self._answered:
                super().on_body(body)
                return
            self._dropped += len(body)
            if self._dropped > max_body_bytes:  # a chunked body past it: closed, as a declared one
                self._disarm()
                self._refuse_close()

        def on_message_complete(self) -> None:
            self._progress = True
            self._in_message = False
            if self._refused:
                return
            self._disarm()
            if not self._answered:
                super().on_message_complete()
                return
            # The gate's answer is complete with its request: keep-alive goes on as after any
            # answer, or the connection closes.
            self._answered = False
            if self._pause_s > 0:
                # Past the refusals' rate: this client's next request stays in its socket until
                # its turn (TCP backpressure), and the keep-alive clock waits with it.
                self._hold(self._pause_s, self._pause_reason)
                self._pause_s = 0.0
                return
            self.on_response_complete()

        # ------------------------------------------------------------------ helpers
        def _count(self, n: int) -> bool:
            """Add to the head's size; False once the connection has been refused."""
            if self._refused:
                return False
            self._head_bytes += n
            if self._head_bytes > max_header_bytes:
                what = "the request head" if self._in_head else "the request head with its trailers"
                self._head_refused(HEAD_TOO_LARGE, f"{what} exceeds {max_header_bytes} bytes (max_header_bytes)")
                return False
            return True

        def _too_long(self) -> None:
            """More than ``max_header_bytes`` of a line the parser holds (the head's or a trailer's)."""
            what = "the request head" if self._in_head else "a trailer or chunk line"
            self._head_refused(HEAD_TOO_LARGE, f"{what} exceeds {max_header_bytes} bytes (max_header_bytes)")

        def _head_refused(self, reason: str, message: str) -> None:
            """431 for a head past a limit, counted; for trailers that pass it once the request
            was answered, the connection is closed without a second answer (a keep-alive client
            would read that 431 as the answer to its next request)."""
            refused(reason)
            cycle = self.cycle
            if not self._in_head and (self._answered or (cycle is not None and cycle.response_started)):
                self._refused = True
                self.transport.close()
                return
            self._refuse(431, message)

        def _arm(self, seconds: float, reason: str) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._expired, reason)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self, reason: str) -> None:
            self._timer = None
            if self._refused or self.transport.is_closing():
                return
            cycle = self.cycle
            idle = not self._in_message and (cycle is None or cycle.response_complete)  # (empty lines came)
            if not idle and (self._answered or (cycle is not None and cycle.response_started)):
                # answered already (by the gate, or the app refused it before its body came):
                # a second answer would be out of place
                self._refused = True
                self.transport.close()
                return
            refused(reason)
            setting = "http_header_timeout_s" if reason == HEAD_TIMEOUT else "http_body_timeout_s"
            self._refuse(408, f"the request was not received in time ({setting})")

        def _refuse(self, status: int, message: str) -> None:
            self._refused = True
            self._disarm()
            if self._behind:  # our words must not come before the earlier answer: just close
                self.transport.close()
                return
            body = orjson.dumps({"error": message})  # (the V2 error shape, as every other answer's)
            self.transport.write(
                b"HTTP/1.1 " + _STATUS[status] + b"\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )
            self._refuse_close()

        def _refuse_close(self) -> None:
            self._refused = True
            # A lingering close: the answer and a FIN go out now, and what the client still sends
            # is read and dropped for a moment, so the close does not reset the connection (a
            # reset can make the client lose the answer it has not read yet).
            if self.transport.is_closing():
                return
            try:
                if not self.transport.can_write_eof():
                    raise OSError
                self.transport.write_eof()
            except OSError:  # no half-close here, or the peer is gone already
                self.transport.close()
                return
            self.loop.call_later(LINGER_S, self.transport.close)

    if later is not None and release is not None:
        GuardedHttpToolsProtocol._later = staticmethod(later)
        GuardedHttpToolsProtocol._release = staticmethod(release)
    return GuardedHttpToolsProtocol
