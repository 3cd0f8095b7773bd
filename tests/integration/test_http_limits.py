"""HTTP connection limits (issue: safe to expose): the request head's size, the time a head and
a body may take to arrive, and the number of connections. Each refusal answers at once, closes
the connection and is counted; the server goes on serving."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from protocol_support import raw_http

from batchgate.demo import build_demo_repository
from batchgate.transport import batched_writes
from batchgate.transport.http_limits import MAX_HEADER_FIELDS
from gateway_support import eventually

GOOD = json.dumps(
    {
        "inputs": [
            {"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))} for n in ("INPUT0", "INPUT1")
        ]
    }
).encode()

JSON = "application/json"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return build_demo_repository(str(tmp_path_factory.mktemp("models")))


@pytest.fixture
def guarded(repo, serve):
    return serve(
        repo,
        max_header_bytes=4096,
        http_header_timeout_s=0.5,
        http_body_timeout_s=0.5,
        max_connections=8,
    )


_opened: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_what_was_opened():
    """The client sockets a test made are closed when it ends (they were left to the collector,
    whose ResourceWarnings surfaced in later tests)."""
    yield
    while _opened:
        _opened.pop().close()


def connect(running) -> socket.socket:
    host, port = running.http_url.split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    _opened.append(s)
    return s


def read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    chunks = []
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def refusals(running) -> dict:
    return dict(running.gateway.metrics.snapshot().values.get("batchgate_http_connections_refused", {}))


def answers(running) -> bool:
    try:
        status, _h, _d = raw_http(
            running, "POST", "/v2/models/simple/infer", GOOD, {"Content-Type": "application/json"}
        )
    except OSError:
        return False
    return status == 200


def serves(running) -> None:
    assert answers(running)


def test_a_huge_request_head_is_431_and_closed(guarded):
    s = connect(guarded)
    s.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n")
    try:
        for i in range(200):
            s.sendall(b"x-filler-%d: " % i + b"a" * 100 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server has answered and closed
    answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert b"(max_header_bytes)" in answer
    assert refusals(guarded) == {("header_bytes",): 1}
    serves(guarded)


def test_a_request_head_of_too_many_fields_is_431_and_closed(guarded):
    """Each header field is a call into Python (httptools hands them over one by one): a 50 KB
    head of 10,000 fields ``a:b``, within max_header_bytes, cost about 5 ms of the loop, and one
    connection sending them took other clients' median answer from 0.7 to 20 ms. At most
    MAX_HEADER_FIELDS (128) fields, as Apache's LimitRequestFields (100)."""
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
    s = connect(guarded)
    s.sendall(head + b"a:b\r\n" * (MAX_HEADER_FIELDS - 1) + b"\r\n")  # the most allowed, Host too
    assert _read_answer(s).startswith(b"HTTP/1.1 200")
    s.sendall(head + b"a:b\r\n" * MAX_HEADER_FIELDS + b"\r\n")
    answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert b"more than 128 fields" in answer
    assert refusals(guarded) == {("header_fields",): 1}
    serves(guarded)


def test_max_header_fields_bounds_the_head_at_the_value_set(repo, serve):
    """max_header_fields is a setting: at its minimum (16) a head of 16 fields is served, and
    tritonclient's requests are; a 17th field is 431, closed and counted."""
    running = serve(repo, max_header_fields=16)
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
    s = connect(running)
    s.sendall(head + b"a:b\r\n" * 15 + b"\r\n")
    assert _read_answer(s).startswith(b"HTTP/1.1 200")
    s.sendall(head + b"a:b\r\n" * 16 + b"\r\n")
    answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert b"more than 16 fields (max_header_fields)" in answer
    assert refusals(running) == {("header_fields",): 1}
    client = httpclient.InferenceServerClient(running.http_url)
    inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
    got = client.infer("simple", inputs, headers={"x-request-id": "abc"})
    assert got.as_numpy("OUTPUT0").tolist() == [list(range(0, 32, 2))]
    client.close()


def test_a_content_length_with_thousands_of_leading_zeros_is_served(server):
    """HTTP allows any number of leading zeros in Content-Length (httptools reads them); Python's
    int() refuses more than 4,300 digits, and the size check took the header so: a 500 and an
    ERROR traceback for each such request."""
    s = connect(server)
    s.sendall(
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + b"0" * 5000 + str(len(GOOD)).encode() + b"\r\n\r\n" + GOOD
    )
    got = _read_answer(s)
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    s.close()


def _trickle_one_line(s: socket.socket, start: bytes) -> bytes:
    """``start``, then one line of 64 KiB that never ends, in 4 KiB pieces; the answer."""
    s.sendall(start)
    time.sleep(0.05)
    try:
        for _ in range(16):
            s.sendall(b"a" * 4096)
            time.sleep(0.005)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server has answered and closed
    return read_all(s)


@pytest.mark.parametrize(
    "start",
    [
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nx-big: ",
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n",  # (a header name)
        # a trailer after the last chunk
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(GOOD)
        + GOOD
        + b"\r\n0\r\nx-trailer: ",
    ],
    ids=["value", "name", "trailer"],
)
def test_one_header_or_trailer_line_past_max_header_bytes_is_431_at_once(guarded, start):
    """httptools gathers a header's value by concatenation and hands it over only whole: one line
    that never ended was held in memory until the head's (or the body's) timeout, 408, and its
    quadratic gathering held every other client (300 MiB in 10 s: health answers 5 s late)."""
    t0 = time.monotonic()
    answer = _trickle_one_line(connect(guarded), start)
    assert answer.startswith(b"HTTP/1.1 431") and b"(max_header_bytes)" in answer, answer[:150]
    assert time.monotonic() - t0 < 0.45, "answered only at the timeout"
    assert refusals(guarded) == {("header_bytes",): 1}
    serves(guarded)


@pytest.mark.parametrize(
    "head,status,reason",
    [
        # a coding the server does not know: the body would have been taken for plain JSON
        (b"Transfer-Encoding: gzip, chunked\r\n", b"501", "transfer_encoding"),
        (b"Transfer-Encoding: gzip\r\n", b"501", "transfer_encoding"),
        (b"Bad Header\r\n", b"400", "malformed"),  # not HTTP/1.1
    ],
)
def test_what_http_cannot_frame_is_answered_in_json_counted_and_not_logged_each(guarded, head, status, reason, caplog):
    """A transfer coding other than chunked was read as chunked and its bytes served as the
    body; bytes httptools cannot parse got uvicorn's plain-text 400 and a warning line each."""
    import json
    import logging

    caplog.set_level(logging.INFO)
    for _ in range(3):
        s = connect(guarded)
        s.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n0\r\n\r\n")
        answer = read_all(s)
        s.close()
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
        assert b"content-type: application/json" in answer and json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert refusals(guarded) == {(reason,): 3}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    serves(guarded)


def test_a_slowloris_head_is_cut_off(guarded):
    s = connect(guarded)
    s.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    try:
        while time.monotonic() - start < 5:
            s.sendall(b"x-a: b\r\n")  # a header line every 100 ms: never finishes its head
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = read_all(s)
    assert time.monotonic() - start < 3, "the trickling head was not cut off"
    assert answer.startswith(b"HTTP/1.1 408") and b"(http_header_timeout_s)" in answer, answer[:120]
    assert refusals(guarded).get(("header_timeout",)) == 1
    serves(guarded)


def test_empty_lines_after_an_answer_do_not_hold_a_keep_alive_connection(guarded):
    """An empty line begins no request, but stopped uvicorn's keep-alive clock, and the head's
    clock starts with a request: one CRLF after an answer held the connection for ever."""
    s = connect(guarded)
    s.sendall(
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(GOOD)).encode() + b"\r\n\r\n" + GOOD
    )
    assert _read_answer(s).startswith(b"HTTP/1.1 200")
    s.sendall(b"\r\n")
    start = time.monotonic()
    s.settimeout(3)
    try:
        answer = s.recv(1000)
    except TimeoutError:
        answer = None
    assert answer is not None, "the connection was still open 3 s later"
    assert answer.startswith(b"HTTP/1.1 408") and b"(http_header_timeout_s)" in answer, answer[:120]
    assert time.monotonic() - start < 1.5
    assert refusals(guarded).get(("header_timeout",)) == 1


def test_a_body_that_never_arrives_is_cut_off(guarded):
    s = connect(guarded)
    s.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + GOOD[:10])
    answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 408") and b"(http_body_timeout_s)" in answer, answer[:120]
    assert refusals(guarded).get(("body_timeout",)) == 1
    serves(guarded)


def test_connections_past_the_cap_are_refused_at_once(guarded):
    held = [connect(guarded) for _ in range(8)]
    time.sleep(0.2)
    extra = connect(guarded)
    answer = read_all(extra)
    assert answer.startswith(b"HTTP/1.1 503") and b"(max_connections)" in answer, answer[:120]
    head, _, body = answer.partition(b"\r\n\r\n")  # the V2 error shape, as every answer's
    assert b"content-type: application/json" in head and "max_connections" in json.loads(body)["error"]
    assert refusals(guarded).get(("connections",)) == 1
    for s in held:
        s.close()
    eventually(lambda: answers(guarded), "the places of closed connections were not given back")


def _answer_length(got: bytes) -> int:
    """Head and body of the answer at the front of ``got`` (its head read), by its Content-Length."""
    head, _, _ = got.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    return len(head) + 4 + length


def test_keep_alive_requests_each_get_a_fresh_head_timer(guarded):
    s = connect(guarded)
    request = (
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(GOOD)).encode() + b"\r\n\r\n" + GOOD
    )
    for _ in range(3):
        s.sendall(request)
        got = _read_answer(s)
        assert got.startswith(b"HTTP/1.1 200"), got[:100]
        time.sleep(0.4)  # idle between requests is not the head's time
    s.close()
    assert refusals(guarded) == {}


def test_a_post_offering_an_h2c_upgrade_is_served_with_its_body(guarded):
    """Java's HttpClient offers h2c on every http:// request; batchgate upgrades nothing, and the
    request (its body too) is served as HTTP/1.1."""
    s = connect(guarded)
    s.sendall(
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(GOOD)).encode() + b"\r\n\r\n" + GOOD
    )
    got = _read_answer(s)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    body = json.loads(got.partition(b"\r\n\r\n")[2])
    assert {o["name"] for o in body["outputs"]} == {"OUTPUT0", "OUTPUT1"}
    s.close()


def test_trailer_fields_never_join_the_request_head(guarded):
    """A chunked body's trailer fields are read and dropped (RFC 9110 6.5.1: never merged into
    the head). They were added to the request's headers after its head: a trailer
    ``Content-Encoding: gzip`` made the plain body be inflated (400), and one
    ``Inference-Header-Content-Length`` cut the body as the binary extension's, headers that a
    proxy in front checks in the head and seldom in trailers."""
    s = connect(guarded)
    for trailer in (b"Content-Encoding: gzip\r\n", b"Inference-Header-Content-Length: 5\r\n", b"X-T: 1\r\n"):
        s.sendall(
            b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n%s\r\n" % (len(GOOD), GOOD, trailer)
        )
        got = _read_answer(s)
        assert got.startswith(b"HTTP/1.1 200"), (trailer, got[:300])
        body = json.loads(got.partition(b"\r\n\r\n")[2])
        assert {o["name"] for o in body["outputs"]} == {"OUTPUT0", "OUTPUT1"}
    s.close()
    assert refusals(guarded) == {}


def _upgrade_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn") and "upgrade" in r.getMessage()]


@pytest.mark.parametrize("cut", [b"", b"\r", b"\r\nUpg", b"\r\nUpGrade"])
def test_an_h2c_upgrade_header_cut_between_two_reads_is_served_with_its_body(guarded, caplog, cut):
    """The Upgrade header is renamed before httptools sees it; a head that arrives in pieces with
    the header's name cut between two of them was missed: httptools then took the request for an
    upgrade, skipped its body (the model was run on an empty one: 400), and uvicorn wrote two
    WARNING lines for each such request, none counted (a client could fill the log)."""
    head = (
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(GOOD)).encode()
    )
    rest = b"\r\nUpGrade: h2c\r\n\r\n" + GOOD  # (any case: httptools reads it so)
    first, second = head + cut, rest[len(cut) :]
    s = connect(guarded)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(2):  # twice: the connection stays usable
        s.sendall(first)
        time.sleep(0.2)  # (so that the server reads the two pieces apart)
        s.sendall(second)
        got = _read_answer(s)
        assert got.startswith(b"HTTP/1.1 200"), got[:300]
        assert {o["name"] for o in json.loads(got.partition(b"\r\n\r\n")[2])["outputs"]} == {"OUTPUT0", "OUTPUT1"}
    assert _upgrade_warnings(caplog) == []


def test_an_upgrade_the_parser_still_sees_is_refused_and_counted_without_a_log_line(guarded, caplog):
    """A request offering an upgrade pipelined behind another in the same read is past the part
    of the read that is renamed: httptools stops at it and would skip its body and every byte
    after. It is refused (counted, ``upgrade``), never served on an empty body."""
    upgrade = (
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(GOOD)).encode() + b"\r\n\r\n" + GOOD
    )
    s = connect(guarded)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + upgrade)
    got = read_all(s)
    assert b"request body is not valid JSON" not in got, got
    assert got.count(b"HTTP/1.1 200") <= 1, got  # the live answer at most: never the upgrade's
    eventually(lambda: refusals(guarded).get(("upgrade",)) == 1, "the refusal counted")
    assert _upgrade_warnings(caplog) == []


def test_an_http_1_0_client_gets_answers_with_a_length_and_health_answers_in_json(guarded):
    for path, want in (("/v2", None), ("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})):
        s = connect(guarded)
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = read_all(s)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower(), head
        assert int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) == len(body)
        if want is not None:
            assert json.loads(body) == want


def test_binary_data_parameters_must_be_true_or_false(guarded):
    for params in ({"binary_data_output": "false"}, {}):
        request = json.loads(GOOD)
        request["parameters"] = params
        if not params:
            request["outputs"] = [{"name": "OUTPUT0", "parameters": {"binary_data": "false"}}]
        status, _h, data = raw_http(
            guarded,
            "POST",
            "/v2/models/simple/infer",
            json.dumps(request).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 400 and "must be true or false" in json.loads(data)["error"]


def test_a_body_refused_before_it_arrived_gets_one_answer_and_the_connection_closes(repo, serve):
    # chunked, so the size is known only as it comes: refused past max_request_bytes while the
    # rest is still on its way; one answer, then the connection closes (no later 408, and the rest
    # of the body is never read as a next request). (A 1 MiB bound and a generous body timeout:
    # 70 MiB against the default bound and a 0.5 s timeout met the timeout first on a busy machine.)
    s = connect(serve(repo, max_request_bytes=1 << 20, http_body_timeout_s=30))
    s.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % (1 << 18) + b"x" * (1 << 18) + b"\r\n"
    try:
        for _ in range(12):
            s.sendall(chunk)
    except OSError:  # closed under us once answered
        pass
    answer = read_all(s, timeout=3)
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1, answer[:200]
    assert b"max_request_bytes" in answer and b"connection: close" in answer.lower()


def _read_answer(s: socket.socket, head_only: bool = False) -> bytes:
    """One answer from ``s``: its head, and its body by its Content-Length (none for HEAD)."""
    s.settimeout(5)
    got = b""
    while b"\r\n\r\n" not in got or (not head_only and len(got) < _answer_length(got)):
        more = s.recv(1 << 20)
        assert more, got[:200]
        got += more
    return got


@pytest.fixture
def recorded_writes(monkeypatch) -> list[bytes]:
    """What connections made from now on write to their sockets (the real transport's writes)."""
    writes: list[bytes] = []

    class Recorder:
        def __init__(self, transport):
            self._t = transport

        def write(self, data):
            writes.append(bytes(data))
            self._t.write(data)

        def __getattr__(self, name):
            return getattr(self._t, name)

    class Recording(batched_writes.BatchedWrites):
        def __init__(self, transport, batch, closed_unsent=None):
            super().__init__(Recorder(transport), batch, closed_unsent)

    monkeypatch.setattr(batched_writes, "BatchedWrites", Recording)
    return writes


def test_answers_are_written_whole_at_the_end_of_the_loop_turn_and_nothing_is_held(
    guarded, recorded_writes, monkeypatch
):
    """An answer's head and body leave in one write (uvicorn alone makes two), pipelined answers
    of one turn together; a head with no body after it (HEAD), 100 Continue, a large answer and
    an answer that closes the connection are not held back."""
    writes = recorded_writes
    s = connect(guarded)
    post = (
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(GOOD)).encode() + b"\r\n\r\n"
    )
    s.sendall(post + GOOD)
    answer = _read_answer(s)
    assert answer.startswith(b"HTTP/1.1 200") and b'"OUTPUT0"' in answer, answer[:200]
    assert writes == [answer]  # the whole answer, in one write

    # HEAD: uvicorn writes the head and no body; the client must not wait for one
    writes.clear()
    s.sendall(b"HEAD /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    head = _read_answer(s, head_only=True)
    assert head.startswith(b"HTTP/1.1 ") and head.endswith(b"\r\n\r\n") and writes == [head], head

    # Expect: 100-continue: the interim answer goes out before the body comes
    writes.clear()
    s.sendall(post.replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n"))
    s.settimeout(5)
    interim = s.recv(65536)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
    s.sendall(GOOD)
    answer = _read_answer(s)
    assert answer.startswith(b"HTTP/1.1 200") and writes == [interim, answer], writes

    # a write past the batch bound (lowered here to a size an answer passes) is not kept: what
    # is kept goes first, then it, whole
    writes.clear()
    monkeypatch.setattr(batched_writes, "BATCH_MAX_BYTES", 256)
    big = json.loads(GOOD)
    for i in big["inputs"]:
        i["shape"], i["data"] = [8, 16], list(range(16)) * 8
    data = json.dumps(big).encode()
    s.sendall(post.replace(str(len(GOOD)).encode(), str(len(data)).encode()) + data)
    answer = _read_answer(s)
    assert answer.startswith(b"HTTP/1.1 200") and b"".join(writes) == answer, writes
    assert len(writes) == 2 and len(writes[0]) < 256 <= len(writes[1]), [len(w) for w in writes]
    monkeypatch.undo()

    # the connection goes on, and an answer that closes it is written before the close
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert read_all(s).endswith(b'{"live":true}')
    s.close()


def test_a_connection_gone_before_its_answer_is_written_costs_the_others_nothing(guarded, recorded_writes):
    """Requests from many connections answered in one turn; those whose clients have gone by
    then are dropped, and every other connection still gets its answer."""
    post = (
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(GOOD)).encode() + b"\r\n\r\n" + GOOD
    )
    for _ in range(3):
        socks = [connect(guarded) for _ in range(6)]
        for i, s in enumerate(socks):
            s.sendall(post)
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()  # (a reset: gone before its answer)
        for s in socks[::2]:
            assert _read_answer(s).startswith(b"HTTP/1.1 200")
            s.close()
    s = connect(guarded)
    s.sendall(post)
    assert _read_answer(s).startswith(b"HTTP/1.1 200")
    s.close()


def test_bodies_still_arriving_are_bounded_all_connections_together(repo, serve):
    """Each admitted request could hold up to max_request_bytes while its client took its time:
    ten connections that sent 60 MiB of a body each and waited held 600 MiB until the body
    timeout. Past max_buffered_request_bytes (all connections together) the request that would
    pass it is refused 429 at once and its connection closed; the others are served."""
    running = serve(repo, max_buffered_request_bytes=1 << 20, http_body_timeout_s=5)
    head = b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    first = connect(running)
    first.sendall(head + b"Content-Length: 900000\r\n\r\n" + b" " * 700_000)
    time.sleep(0.3)
    second = connect(running)
    second.sendall(head + b"Content-Length: 900000\r\n\r\n")
    try:
        for _ in range(10):
            second.sendall(b" " * 70_000)
            time.sleep(0.01)
    except OSError:
        pass  # answered and closed
    answer = read_all(second, timeout=3)
    assert answer.startswith(b"HTTP/1.1 429") and b"(max_buffered_request_bytes)" in answer, answer[:200]
    assert b"retry-after: 1" in answer.lower() and b"connection: close" in answer.lower()
    # the first one is still served once the rest of its body comes
    first.sendall(b" " * (900_000 - 700_000 - len(GOOD)) + GOOD)
    assert _read_answer(first).startswith(b"HTTP/1.1 200")
    first.close()
    # what both held is given back: one more such body fits again
    third = connect(running)
    third.sendall(head + b"Content-Length: 900000\r\n\r\n" + b" " * (900_000 - len(GOOD)) + GOOD)
    assert _read_answer(third).startswith(b"HTTP/1.1 200")
    serves(running)


def test_http_bodies_and_grpc_messages_still_arriving_share_one_budget(repo, serve):
    """max_buffered_request_bytes bounds the process: until 2026-12-06 HTTP bodies and the h2 gRPC
    engine's unfinished messages each had a budget of their own, so a client that half-sent
    large requests on both ports held twice the setting."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    running = serve(repo, max_buffered_request_bytes=1 << 20, http_body_timeout_s=5)
    head = b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    first = connect(running)
    first.sendall(head + b"Content-Length: 900000\r\n\r\n" + b" " * 700_000)
    time.sleep(0.3)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    inp = grpcclient.InferInput("input", [400, 256], "FP32")  # 410 KB: with the body's 700 KB, past 1 MiB
    inp.set_data_from_numpy(np.zeros((400, 256), np.float32))
    with pytest.raises(InferenceServerException) as refused:
        c.infer("mlp", [inp])
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED", refused.value
    assert "max_buffered_request_bytes" in refused.value.message()
    assert refusals(running).get(("grpc_buffered_bytes",)) == 1
    first.sendall(b" " * (900_000 - 700_000 - len(GOOD)) + GOOD)
    assert _read_answer(first).startswith(b"HTTP/1.1 200")
    first.close()
    # the body's bytes are given back: the same message is now read whole (and judged: a batch
    # of 400 is past the model's 64)
    with pytest.raises(InferenceServerException) as judged:
        c.infer("mlp", [inp])
    assert judged.value.status() == "StatusCode.INVALID_ARGUMENT", judged.value
    c.close()
    serves(running)


@pytest.mark.parametrize("trailers", ["fields", "bytes"])
def test_trailers_past_a_limit_after_the_answer_close_without_a_second_answer(guarded, trailers):
    """A request refused from its head (an unknown model: 404) is answered before its chunked body
    is read; trailers that then pass max_header_fields or max_header_bytes were answered with a
    431 as well, which a keep-alive client or a proxy would take for the answer to its next
    request. The connection is closed instead, and the refusal counted."""
    s = connect(guarded)
    s.sendall(b"POST /v2/models/nosuch/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert _read_answer(s).startswith(b"HTTP/1.1 404")
    if trailers == "fields":
        many = b"".join(b"X-T%d: 1\r\n" % i for i in range(200))
    else:
        many = b"X-T: " + b"v" * 3000 + b"\r\nX-U: " + b"w" * 3000 + b"\r\n"
    with contextlib.suppress(OSError):
        s.sendall(b"0\r\n" + many + b"\r\n")
    assert read_all(s) == b""
    assert refusals(guarded) == {("header_fields" if trailers == "fields" else "header_bytes",): 1}
