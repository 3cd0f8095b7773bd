"""HTTP/1.1 clients that send without reading: pipelined requests are bounded per connection
(``max_pipelined_requests``), and an answer nobody takes holds its connection only so long
(``send_timeout``; transport/http_limits.py).

Before, 12 MB of tiny pipelined requests on one connection grew the server by 800 MB, and a
30 MB answer its client never read held that memory and the connection for ever.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request

from gateway_support import eventually

LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def refused(running, reason: str) -> float:
    for line in urllib.request.urlopen(running.metrics_url, timeout=5).read().decode().splitlines():
        if line.startswith(f'batchgate_http_connections_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def read_all(s: socket.socket, seconds: float = 10) -> bytes:
    """Everything until the server closes (or ``seconds`` pass)."""
    s.settimeout(seconds)
    got = bytearray()
    try:
        while chunk := s.recv(1 << 16):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return bytes(got)


def ask_for_8_mb(port: int, rcvbuf: int) -> socket.socket:
    """A connection (its receive buffer ``rcvbuf`` bytes) that asked for an 8 MB answer."""
    body = json.dumps(
        {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, 1], "data": ["a" * (8 << 20)]}]}
    ).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(
        b"POST /v2/models/identity_bytes/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    return s


def test_pipelined_requests_up_to_the_bound_are_answered_in_order(demo_repo, serve):
    running = serve(demo_repo, max_pipelined_requests=16)
    with socket.create_connection(("127.0.0.1", running.gateway.http_port), timeout=5) as s:
        s.sendall(LIVE * 10 + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = read_all(s)
    assert answers.count(b"HTTP/1.1 200") == 11
    assert refused(running, "pipeline") == 0


def test_a_client_that_pipelines_without_reading_is_closed(demo_repo, serve):
    running = serve(demo_repo, max_pipelined_requests=16)
    with socket.create_connection(("127.0.0.1", running.gateway.http_port), timeout=5) as s:
        s.sendall(LIVE * 5000)  # 205 KB: thousands of request cycles in one read
        time.sleep(0.5)  # (not reading meanwhile)
        answers = read_all(s)
    assert answers.count(b"HTTP/1.1 200") < 100, "the server queued what was pipelined without bound"
    assert refused(running, "pipeline") == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{running.gateway.http_port}/v2/health/live", timeout=5) as r:
        assert r.status == 200


def test_an_answer_its_client_does_not_read_is_given_up(demo_repo, serve):
    running = serve(demo_repo, http_body_timeout_s=1)
    s = ask_for_8_mb(running.gateway.http_port, 4096)
    try:
        end = time.monotonic() + 20  # (the timeout is 1 s: judged about every second)
        while refused(running, "send_timeout") < 1:
            assert time.monotonic() < end, "an 8 MB answer nobody reads was kept"
            time.sleep(0.2)
        assert read_all(s, 5).startswith(b"HTTP/1.1 200")  # what the kernel held, then the reset
    finally:
        s.close()


def test_a_client_that_reads_slowly_but_steadily_keeps_its_answer(demo_repo, serve):
    """64 KiB a second is well above the 16 KiB a second asked for. The kernel's send queue
    (megabytes) takes from the server's buffer only once much of it has drained, so that buffer
    alone stands still for seconds while the client reads: judged on it, such a reader was cut
    at the first check."""
    running = serve(demo_repo, http_body_timeout_s=1)
    s = ask_for_8_mb(running.gateway.http_port, 8192)
    try:
        s.settimeout(5)
        start, got = time.monotonic(), 0
        while (elapsed := time.monotonic() - start) < 4:  # four checks' worth, at 64 KiB a second
            got += len(s.recv(8192))
            time.sleep(max(0.0, got / (64 << 10) - elapsed))
        assert refused(running, "send_timeout") == 0
    finally:
        s.close()


def test_a_client_that_sends_without_reading_is_not_read_while_its_answers_wait(demo_repo, serve):
    """Requests the gate answers itself (here 404: an unknown model) make no request cycle, so
    the pipelining bound does not see them: reading stops instead while the client takes nothing
    of what is written. Before, their answers piled up in the server (436 MB in 30 s)."""
    running = serve(demo_repo)
    one = b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", running.gateway.http_port))
    s.settimeout(0.2)
    end = time.monotonic() + 4
    try:
        while time.monotonic() < end:  # as fast as the server reads, never reading an answer
            with contextlib.suppress(TimeoutError):
                s.sendall(one * 1000)

        async def waiting() -> int:
            server = running.gateway._http.server
            return max((c.transport.get_write_buffer_size() for c in server.server_state.connections), default=0)

        assert running.call(waiting()) < 4 << 20, "answers piled up for a client that reads nothing"
    finally:
        s.close()


def _unsent_gauge(running) -> float:
    for line in urllib.request.urlopen(running.metrics_url, timeout=5).read().decode().splitlines():
        if line.startswith("batchgate_unsent_answer_bytes "):
            return float(line.split()[-1])
    raise AssertionError("no batchgate_unsent_answer_bytes on /metrics")


def _read_answer(s: socket.socket) -> int | None:
    """The body length of a whole answer read from ``s``; None if the connection was cut first."""
    s.settimeout(10)
    got = bytearray()
    try:
        while b"\r\n\r\n" not in got:
            if not (chunk := s.recv(1 << 16)):
                return None
            got += chunk
        head, _, body = bytes(got).partition(b"\r\n\r\n")
        length = int(
            next(v for k, _, v in (ln.partition(b": ") for ln in head.split(b"\r\n")) if k.lower() == b"content-length")
        )
        while len(body) < length:
            if not (chunk := s.recv(1 << 20)):
                return None
            body += chunk
        return length
    except ConnectionResetError:
        return None


def test_answers_nobody_takes_are_bounded_by_max_unsent_answer_bytes(demo_repo, serve):
    """Clients that ask for large answers and read none held every answer until the send timeout
    (and for ever at 16 KiB a second each): four 8 MB answers are ~22 MB held here. Past
    max_unsent_answer_bytes the connection holding the most is aborted, counted; the others keep
    theirs, and a client that then reads gets its whole answer."""
    limit = 20 << 20
    running = serve(demo_repo, max_unsent_answer_bytes=limit)
    socks = []
    try:
        for _ in range(3):
            socks.append(ask_for_8_mb(running.gateway.http_port, 4096))
            before = _unsent_gauge(running)
            eventually(lambda before=before: _unsent_gauge(running) > before, "an unread answer is held")
        assert refused(running, "unsent_answers") == 0
        socks.append(ask_for_8_mb(running.gateway.http_port, 4096))
        eventually(lambda: refused(running, "unsent_answers") >= 1, "a connection past the bound aborted")
        assert 0 < _unsent_gauge(running) <= limit
        answers = [_read_answer(s) for s in socks]
        assert sum(a is None for a in answers) in (1, 2), answers  # one (or two) aborted, the rest whole
        assert all(a is None or a > 8 << 20 for a in answers), answers
        eventually(lambda: _unsent_gauge(running) == 0, "nothing held once read")
    finally:
        for s in socks:
            s.close()
