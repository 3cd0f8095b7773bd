"""The access log (monitoring/access_log.py) through real tritonclient clients on both
protocols: one JSON line per logged request with the fields an SRE reads; errors and slow
requests always logged but overload refusals, the rest sampled consistently on the request id; a bound on lines a
second; client text that cannot break a line; the key's id, never its token."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import urllib.request
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from protocol_support import raw_http, simple_feeds
from tritonclient.utils import InferenceServerException

from batchgate.security.auth import hash_token, new_token
from gateway_support import eventually

TOKEN = new_token()


def _lines(path, at_least: int = 1, timeout: float = 10.0) -> list[dict]:
    """The access log's lines once at least ``at_least`` are written (the writer is a thread)."""
    end = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            lines = []
        if len(lines) >= at_least or time.monotonic() > end:
            return lines
        time.sleep(0.02)


def _client(protocol: str, running):
    mod = grpcclient if protocol == "grpc" else httpclient
    return mod, mod.InferenceServerClient(running.grpc_url if protocol == "grpc" else running.http_url)


def _infer(mod, client, model: str = "simple", rid: str = "", headers: dict | None = None):
    inputs = []
    for name, a in simple_feeds().items():
        x = mod.InferInput(name, list(a.shape), "INT32")
        x.set_data_from_numpy(a)
        inputs.append(x)
    return client.infer(model, inputs, request_id=rid, headers=headers)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_request_logged_with_its_fields_and_the_key_id_never_the_token(demo_repo, serve, tmp_path, protocol):
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"id": "frontend", "sha256": hash_token(TOKEN), "scopes": ["infer"]}]}))
    log = tmp_path / "access.log"
    running = serve(demo_repo, access_log="all", access_log_file=str(log), api_keys_file=str(keys))
    mod, client = _client(protocol, running)
    auth = {"authorization": f"Bearer {TOKEN}"}
    _infer(mod, client, rid="order-17", headers=auth)
    with pytest.raises(InferenceServerException):
        _infer(mod, client, model="no_such_model", rid="order-18", headers=auth)
    with pytest.raises(InferenceServerException):
        _infer(mod, client, rid="order-19")  # no key
    lines = _lines(log, 3)
    assert len(lines) == 3, lines
    ok, missing, anonymous = sorted(lines, key=lambda ln: ln.get("batchgate.request.id", "~"))
    assert ok["batchgate.request.id"] == "order-17" and ok["batchgate.model"] == "simple"
    assert ok["batchgate.model.version"] == "1" and ok["user.id"] == "frontend"
    assert ok["client.address"] == "127.0.0.1" and ok["batchgate.batch_size"] == 1
    assert ok["batchgate.duration_ms"] >= ok["batchgate.queue_ms"] >= 0
    assert ok["batchgate.request.bytes"] > 128 and ok["batchgate.response.bytes"] > 64
    assert "error.type" not in ok and ok["timestamp"].endswith("Z")
    if protocol == "grpc":
        assert ok["rpc.system"] == "grpc" and ok["rpc.response.status_code"] == "OK"
        assert ok["rpc.method"] == "inference.GRPCInferenceService/ModelInfer"
        assert missing["rpc.response.status_code"] == "NOT_FOUND"
    else:
        assert ok["http.request.method"] == "POST" and ok["url.path"] == "/v2/models/simple/infer"
        assert ok["http.response.status_code"] == 200 and missing["http.response.status_code"] == 404
    assert missing["error.type"] == "NOT_FOUND" and missing["user.id"] == "frontend"
    assert anonymous["error.type"] == "UNAUTHENTICATED" and "user.id" not in anonymous
    assert TOKEN not in log.read_text()


def test_sampled_logs_errors_and_slow_requests_and_picks_the_rest_by_request_id(demo_repo, serve, tmp_path):
    log = tmp_path / "access.log"
    ratio = 0.3
    running = serve(demo_repo, access_log="sampled", access_log_sample_ratio=ratio, access_log_file=str(log))
    mod, client = _client("grpc", running)
    ids = [f"req-{i}" for i in range(200)]
    for rid in ids:
        _infer(mod, client, rid=rid)
    for i in range(5):
        with pytest.raises(InferenceServerException):
            _infer(mod, client, model="no_such_model", rid=f"bad-{i}")
    # the share chosen is the one the id's hash says: the same on every replica and every retry
    want = {rid for rid in ids if zlib.crc32(rid.encode()) / 2**32 < ratio}
    lines = _lines(log, len(want) + 5)
    got = {ln["batchgate.request.id"] for ln in lines if "error.type" not in ln}
    assert got == want and 30 < len(want) < 90
    assert sorted(ln["batchgate.request.id"] for ln in lines if "error.type" in ln) == [f"bad-{i}" for i in range(5)]

    slow_log = tmp_path / "slow.log"
    running = serve(demo_repo, access_log_sample_ratio=0.0, access_log_slow_ms=0.001, access_log_file=str(slow_log))
    mod, client = _client("http", running)
    _infer(mod, client, rid="slow-one")
    assert [ln["batchgate.request.id"] for ln in _lines(slow_log)] == ["slow-one"]


def test_lines_a_second_are_bounded_and_drops_counted(demo_repo, serve, tmp_path):
    log = tmp_path / "access.log"
    running = serve(
        demo_repo, access_log_max_lines_per_s=5, access_log_file=str(log), metrics_port=0, access_log_sample_ratio=1.0
    )
    mod, client = _client("http", running)
    t0 = time.monotonic()
    for _ in range(40):
        _infer(mod, client)
    took = time.monotonic() - t0
    lines = _lines(log, 5)
    time.sleep(0.2)
    lines = _lines(log, 5)
    assert 5 <= len(lines) <= 5 * (int(took) + 2), (len(lines), took)
    text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    dropped = [ln for ln in text.splitlines() if ln.startswith('batchgate_access_log_dropped_total{reason="rate"}')]
    written = [ln for ln in text.splitlines() if ln.startswith("batchgate_access_log_lines_total")]
    assert float(dropped[0].split()[-1]) == 40 - len(lines) and float(written[0].split()[-1]) == len(lines)


def test_client_text_never_breaks_a_line_and_refusals_at_the_door_are_logged(demo_repo, serve, tmp_path):
    log = tmp_path / "access.log"
    running = serve(demo_repo, access_log="all", access_log_file=str(log))
    evil = 'x"\n{"forged": true}\r\n' + "y" * 200  # (ids are bounded: max_request_id_bytes, 256)
    body = json.dumps(
        {
            "id": evil,
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": "INT32", "data": a.reshape(-1).tolist()}
                for n, a in simple_feeds().items()
            ],
        }
    ).encode()
    status, _, _ = raw_http(running, "POST", "/v2/models/simple/infer", body, {"content-type": "application/json"})
    assert status == 200
    # refused as its head arrives (unknown model: 404 written by the protocol, no ASGI call)
    status, _, _ = raw_http(running, "POST", "/v2/models/nope/infer", b"{}", {"x-request-id": "door-1"})
    assert status == 404
    lines = _lines(log, 2)
    assert len(lines) == 2 and all("forged" not in ln for ln in lines)
    first, door = lines
    assert first["batchgate.request.id"] == evil[:128]
    assert door["batchgate.request.id"] == "door-1" and door["http.response.status_code"] == 404
    assert door["batchgate.model"] == "nope" and door["error.type"] == "NOT_FOUND"


def test_off_writes_nothing(demo_repo, serve, tmp_path):
    log = tmp_path / "access.log"
    running = serve(demo_repo, access_log="off", access_log_file=str(log))
    assert running.gateway.access_log is None
    mod, client = _client("grpc", running)
    with pytest.raises(InferenceServerException):
        _infer(mod, client, model="no_such_model")
    time.sleep(0.3)
    assert not log.exists() and running.gateway.dataplane.access_log is None


def test_a_file_that_cannot_be_written_stops_the_start_not_a_request(demo_repo, tmp_path):
    from batchgate.app import Gateway
    from batchgate.config import ConfigError, load_settings

    settings = load_settings(flags={"model_repository": demo_repo, "access_log_file": str(tmp_path)}, environ={})
    with pytest.raises(ConfigError, match="cannot be opened for writing"):
        Gateway(settings)  # a folder: refused as the gateway is built, before it serves anything


def test_an_answer_the_http_handler_gives_itself_is_logged_with_its_status(demo_repo, serve, tmp_path):
    """An unsupported Content-Encoding is answered 400 by the infer handler itself: the line says 400."""
    log = tmp_path / "access.log"
    running = serve(demo_repo, access_log="all", access_log_file=str(log))
    status, _, _ = raw_http(
        running, "POST", "/v2/models/simple/infer", b"xx", {"content-encoding": "br", "x-request-id": "enc-1"}
    )
    assert status == 400
    (line,) = _lines(log, 1)
    assert line["http.response.status_code"] == 400 and line["error.type"] == "INVALID_ARGUMENT"


def test_a_line_stays_one_line_whatever_unicode_the_client_sends(demo_repo, serve, tmp_path):
    """A V2 id with U+2028, U+0085 or a bidirectional control went into the line as it came (JSON
    allows them raw): readers that split lines at them (str.splitlines, many log shippers) saw a
    line cut in two, and a bidi control made a line read otherwise than it was written. Written as
    JSON escapes, the value reads back the same."""
    log = tmp_path / "access.log"
    running = serve(demo_repo, access_log="all", access_log_file=str(log))
    tricky = "a\u2028b\u0085c\u202ed\u2066e\u2029f-\u00e9"
    body = {"id": tricky, "inputs": [
        {"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))} for n in ("INPUT0", "INPUT1")
    ]}  # fmt: skip
    status, _, answer = raw_http(running, "POST", "/v2/models/simple/infer", json.dumps(body).encode(), {})
    assert status == 200 and json.loads(answer)["id"] == tricky  # (echoed to the caller as sent)
    (line,) = _lines(log, 1)
    assert line["batchgate.request.id"] == tricky
    text = log.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 1 and "-\u00e9" in text  # (other text stays as it is)
    assert all(ch not in text for ch in "\u2028\u0085\u202e\u2066\u2029")


def test_a_rotated_log_file_is_followed_to_its_new_file(demo_repo, serve, tmp_path):
    """Rotation by renaming (logrotate's default, without copytruncate): the file was opened once,
    so every line after the rename went on into the renamed file and the new one stayed empty.
    Now the writer notices the path names another file (or none) and opens it afresh."""
    log = tmp_path / "access.log"
    running = serve(demo_repo, access_log="all", access_log_file=str(log))
    c = httpclient.InferenceServerClient(running.http_url)
    _infer(httpclient, c, rid="before")
    assert [ln["batchgate.request.id"] for ln in _lines(log, 1)] == ["before"]
    log.rename(tmp_path / "access.log.1")
    end = time.monotonic() + 10
    while not log.exists():  # (checked at most once a second, when there is a line to write)
        assert time.monotonic() < end, "the log file was not opened again"
        _infer(httpclient, c, rid="after")
        time.sleep(0.2)
    assert {ln["batchgate.request.id"] for ln in _lines(log, 1)} == {"after"}
    assert [ln["batchgate.request.id"] for ln in _lines(tmp_path / "access.log.1", 1)][0] == "before"


def _open_on(path) -> int:
    """How many of this process's descriptors point at ``path``."""
    target = os.path.realpath(path)
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # gone since the listing
            n += os.readlink(f"/proc/self/fd/{fd}") == target
    return n


def test_a_stopped_gateway_closes_its_log_file_even_when_nothing_was_logged(demo_repo, serve, tmp_path):
    """The file is opened at start; a gateway that never wrote a line (its writer thread never
    started) still closes it when it stops (it stayed open once per start before)."""
    log = tmp_path / "quiet.log"
    umask = os.umask(0o022)  # the usual one, under which the file used to be created 0644
    try:
        running = serve(demo_repo, access_log_file=str(log))
    finally:
        os.umask(umask)
    assert _open_on(log) == 1
    # Review finding: it was created with the umask's mode (0644 here), readable by every local
    # user; it holds peer addresses and request ids, so it is created 0600, as the audit log.
    assert os.stat(log).st_mode & 0o777 == 0o600
    assert running.stop()
    assert _open_on(log) == 0


def test_a_stream_closed_with_requests_unanswered_logs_each_of_them_once(tmp_path, serve):
    """Eight requests on a stream to a model that answers one at a time (tens of ms each); the
    client cancels the stream once several are in the server: each request the server read has
    exactly one line, OK if it was answered, CANCELLED if it was still waiting."""
    from batchgate.demo import _save, slow_model

    repo = tmp_path / "repo"
    # batches of 32 rows, each request run alone (no dynamic batching)
    _save(slow_model(width=1024, layers=64), str(repo), "slow", config="max_batch_size: 32\n")
    log = tmp_path / "access.log"
    running = serve(str(repo), access_log="all", access_log_file=str(log))
    client = grpcclient.InferenceServerClient(running.grpc_url)
    client.start_stream(lambda result, error: None)
    x = np.ones((32, 1024), np.float32)
    for i in range(8):
        inp = grpcclient.InferInput("input", [32, 1024], "FP32")
        inp.set_data_from_numpy(x)
        client.async_stream_infer("slow", [inp], request_id=f"c-{i}")
    end = time.monotonic() + 30
    while running.gateway.dataplane.in_flight < 5 and time.monotonic() < end:
        time.sleep(0.005)
    assert running.gateway.dataplane.in_flight >= 5
    client.stop_stream(cancel_requests=True)
    client.close()
    _lines(log, at_least=5)
    time.sleep(0.5)  # a second line for one request, or the lines of the rest, would come now
    lines = _lines(log)
    ids = [d["batchgate.request.id"] for d in lines]
    assert len(ids) == len(set(ids)) >= 5 and set(ids) <= {f"c-{i}" for i in range(8)}, ids  # each once
    status = [d["rpc.response.status_code"] for d in lines]
    assert "CANCELLED" in status and set(status) <= {"OK", "CANCELLED"}, status
    assert all(d["error.type"] == "CANCELLED" for d in lines if d["rpc.response.status_code"] == "CANCELLED")


def test_failed_request_lines_in_the_log_are_bounded_a_second_and_the_rest_counted(demo_repo, serve, caplog):
    """One client sending bad requests in a loop cannot flood the log: past
    failure_log_max_lines_per_s the 'failed' lines are dropped, counted, and summed up in one line."""
    caplog.set_level("INFO", logger="batchgate")
    running = serve(demo_repo, failure_log_max_lines_per_s=5)
    mod, c = _client("grpc", running)
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < 0.8 or sent < 40:
        with pytest.raises(InferenceServerException):
            _infer(mod, c, model="no_such_model")
        sent += 1
    failed = [r for r in caplog.records if "request to model 'no_such_model' failed" in r.getMessage()]
    seconds = int(time.monotonic() - start) + 1
    assert 1 <= len(failed) <= 5 * seconds, len(failed)
    end = time.monotonic() + 5  # the next second's first failure sums the last one up

    def summed() -> bool:
        return any("failed requests were not logged since" in r.getMessage() for r in caplog.records)

    while not summed() and time.monotonic() < end:
        time.sleep(0.2)
        with pytest.raises(InferenceServerException):
            _infer(mod, c, model="no_such_model")
    assert summed()
    metrics = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    dropped = [line for line in metrics.splitlines() if line.startswith("batchgate_failure_log_dropped_total ")]
    assert dropped and float(dropped[0].split()[1]) >= sent - 5 * seconds, dropped


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_refused_at_the_head_is_logged_with_its_x_request_id(demo_repo, serve, caplog, protocol):
    caplog.set_level("INFO", logger="batchgate")
    running = serve(demo_repo)
    mod, c = _client(protocol, running)
    with pytest.raises(InferenceServerException):
        _infer(mod, c, model="no_such_model", headers={"x-request-id": "hdr-456"})
    failed = [r for r in caplog.records if "request to model 'no_such_model' failed" in r.getMessage()]
    assert [getattr(r, "request_id", None) for r in failed] == ["hdr-456"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode", ["sampled", "all"])
def test_overload_refusals_are_sampled_not_kept_as_other_errors(demo_repo, serve, tmp_path, protocol, mode):
    """Under overload refusals come in thousands a second: they are sampled as quick answers
    are (here at ratio 0: none), while other errors are kept; `all` logs them too."""
    import socket

    log = tmp_path / "access.log"
    running = serve(
        demo_repo, access_log=mode, access_log_sample_ratio=0.0, access_log_file=str(log), max_inflight_requests=1
    )
    body = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": "INT32", "data": a.reshape(-1).tolist()}
                for n, a in simple_feeds().items()
            ]
        }
    ).encode()
    host, port = running.http_url.split(":")
    held = socket.create_connection((host, int(port)), timeout=10)  # admitted, its body never finished
    held.sendall(
        f"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10]
    )
    end = time.monotonic() + 10
    while running.gateway.dataplane.admission.inflight != 1 and time.monotonic() < end:
        time.sleep(0.01)
    mod, c = _client(protocol, running)
    for i in range(5):
        with pytest.raises(InferenceServerException) as e:
            _infer(mod, c, rid=f"busy-{i}")
        assert "max_inflight_requests" in str(e.value)
    with pytest.raises(InferenceServerException):
        _infer(mod, c, model="no_such_model", rid="missing")
    held.close()
    lines = _lines(log, 7 if mode == "all" else 2)  # (and the held request's, CANCELLED)
    errors = sorted(ln["error.type"] for ln in lines if ln.get("error.type") != "CANCELLED")
    assert errors == ["NOT_FOUND"] + (["RESOURCE_EXHAUSTED"] * 5 if mode == "all" else []), errors


def test_lines_a_full_disk_refuses_are_counted_dropped_not_written(demo_repo, serve, caplog):
    """/dev/full refuses every write (ENOSPC, as a full disk does). Until 2026-12-06 such lines
    counted in batchgate_access_log_lines_total as written, none as dropped, and a warning came
    with each chunk (ten a second): now each is counted dropped (error), said once."""
    caplog.set_level(logging.WARNING, logger="batchgate.access")
    running = serve(demo_repo, access_log="all", access_log_file="/dev/full")
    mod, client = _client("http", running)
    for _ in range(3):
        _infer(mod, client)
        time.sleep(0.3)  # (chunks of their own: the writer takes what is queued every 0.1 s)

    def figures() -> tuple[float, float]:
        text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
        values = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln.startswith("batchgate_access_log_"))
        return (
            float(values["batchgate_access_log_lines_total"]),
            float(values['batchgate_access_log_dropped_total{reason="error"}']),
        )

    eventually(lambda: figures() == (0.0, 3.0), "the three lines counted dropped")
    said = [r for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
