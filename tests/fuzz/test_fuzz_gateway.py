"""Fuzz end to end: generated requests against a real gateway serving the demo models.

HTTP bodies are POSTed with ``http.client`` (headers, encodings and framing as generated);
gRPC ModelInfer messages go as raw bytes through a generic unary call, so bytes that are not
a ModelInferRequest reach the server too. Property: bad input is never a 5xx (a 504 only for a
request that set a timeout) and never gRPC INTERNAL / UNKNOWN / UNAVAILABLE; and the gateway
still answers a good request correctly afterwards.
"""

from __future__ import annotations

import gzip
import http.client
import json
import time
import zlib
from urllib.parse import quote

import grpc
import numpy as np
import pytest
from fuzz_support import (
    DEMO,
    budget,
    http_bodies,
    known_marker,
    one_in,
    outcome,
    plain_names,
    server_recursion_limit,
    wire_messages,
)
from hypothesis import example, given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from gateway_support import start_gateway

INFER = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFIER_1E300 = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1e300, 0, 0, 0]}]}
# Answered by the HTTP layer before the application, in plain text: 400 from the parser (e.g. a
# control character in a header value), 408 / 413 / 431 from the connection limits.
PROTOCOL_REFUSALS = {400, 408, 413, 431}
BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}


@pytest.fixture(scope="module")
def gateway(demo_repo):
    """A gateway of this module's own: what the fuzzing does to it never reaches other tests."""
    running = start_gateway(demo_repo, metrics_port=-1)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(gateway.grpc_url) as ch:
        yield ch


# ------------------------------------------------------------------ good requests


def good_http(gateway) -> None:
    a = np.arange(16, dtype=np.int32)
    body = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": a.tolist()},
                {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
            ]
        }
    ).encode()
    status, data = post(gateway, "/v2/models/simple/infer", body, {"Content-Type": "application/json"})
    assert status == 200, data
    out = {o["name"]: o["data"] for o in json.loads(data)["outputs"]}
    assert out["OUTPUT0"] == (a + 1).tolist() and out["OUTPUT1"] == (a - 1).tolist()
    status, data = post(
        gateway,
        "/v2/models/identity_bytes/infer",
        json.dumps({"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "é"]}]}).encode(),
        {},
    )
    assert status == 200, data
    assert json.loads(data)["outputs"][0]["data"] == ["a", "é"]


def good_grpc(channel) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    m = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        m.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        m.raw_input_contents.append(a.tobytes())
    call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString)
    resp = call(m.SerializeToString(), timeout=10)
    got = {o.name: np.frombuffer(r, np.int32) for o, r in zip(resp.outputs, resp.raw_output_contents)}
    assert got["OUTPUT0"].tolist() == (2 * a).reshape(-1).tolist()
    assert got["OUTPUT1"].tolist() == [0] * 16


# ------------------------------------------------------------------ HTTP


def post(gateway, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(gateway.http_url, timeout=30)
    try:
        with server_recursion_limit():
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
    finally:
        conn.close()


def header_value(text: str) -> bytes:
    """``text`` as a header value http.client sends (raw bytes; no line breaks)."""
    return text.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")


x_header_names = st.from_regex(r"x-[a-z0-9-]{1,16}", fullmatch=True)
good_x_header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20), st.sampled_from(["1", "true"])
)
x_header_values = st.one_of(good_x_header_values, st.builds(lambda n: "v" * n, st.integers(4000, 9000)))
good_paths = st.sampled_from(["", "", "/versions/1"])
paths = st.sampled_from(["", "", "", "/versions/1", "/versions/2", "/versions/x", "/versions/-1", "/versions/01"])
good_encodings = st.sampled_from([None, None, None, "gzip", "deflate", "identity"])
encodings = st.sampled_from([None, None, None, None, "gzip", "deflate", "identity", "br", "gzip, deflate"])


@st.composite
def http_requests(draw) -> tuple[str, bytes, dict]:
    """(path, body, headers) of an infer call, to a demo model mostly: a third wholly correct,
    the others wrong somewhere (body, headers, encoding, version, model)."""
    clean = one_in(draw, 3)
    if not clean and one_in(draw, 8):
        model, sig = draw(plain_names), None
    else:
        sig = draw(st.sampled_from(DEMO))
        model = sig.model
    body, header_length = draw(http_bodies(sig, clean=clean))
    path = f"/v2/models/{quote(model, safe='')}{draw(good_paths if clean else paths)}/infer"
    headers: dict = {}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_value(header_length)
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(["application/json", "application/octet-stream", "text/plain"]))
    enc = draw(good_encodings if clean else encodings)
    if enc is not None:
        headers["Content-Encoding"] = enc
        if enc == "gzip" and (clean or not one_in(draw, 5)):
            body = gzip.compress(body)
        elif enc == "deflate" and (clean or not one_in(draw, 5)):
            body = zlib.compress(body)
    if one_in(draw, 4):
        headers["Accept-Encoding"] = draw(st.sampled_from(["gzip", "deflate;q=0.5, gzip", "br", "identity", "x;q=z"]))
    count = draw(st.sampled_from([0, 0, 1, 3] if clean else [0, 0, 0, 1, 3, 40]))
    for name in draw(st.lists(x_header_names, min_size=count, max_size=count, unique=True)):
        headers[name] = draw(good_x_header_values if clean else x_header_values)
    return path, body, headers


def simple_body(shape0=(1, 16), data0=None, tail: bytes = b"") -> bytes:
    """A JSON body for 'simple' ending in ``tail`` (before the closing brace)."""
    data0 = [0] * 16 if data0 is None else data0
    return (
        b'{"inputs":['
        + json.dumps({"name": "INPUT0", "datatype": "INT32", "shape": list(shape0), "data": data0}).encode()
        + b',{"name":"INPUT1","datatype":"INT32","shape":[1,16],"data":'
        + json.dumps([0] * 16).encode()
        + b"}]"
        + tail
        + b"}"
    )


@budget(0.25)
@given(case=http_requests())
# Found by this harness, fixed since: an empty tensor with enormous dimensions was a 500.
@example(case=("/v2/models/simple/infer", simple_body((0, 2**62, 4), []), {}))
# Open findings (test_fuzz_findings.py): a parameter nested ~1,000 deep; an FP32 value past its range.
@example(
    case=(
        "/v2/models/simple/infer",
        simple_body(tail=b',"parameters":{"priority":' + b"[" * 1000 + b"]" * 1000 + b"}"),
        {},
    )
)
@example(case=("/v2/models/classifier/infer", json.dumps(CLASSIFIER_1E300).encode(), {}))
# Empty batches: refused, or answered with empty outputs. A control character in a header: the parser's 400.
@example(case=("/v2/models/identity_bytes/infer", b"{}", {"Inference-Header-Content-Length": b"\x08"}))
@example(
    case=("/v2/models/mlp/infer", b'{"inputs":[{"name":"input","datatype":"FP32","shape":[0,256],"data":[]}]}', {})
)
@example(
    case=(
        "/v2/models/identity_bytes/infer",
        b'{"inputs":[{"name":"INPUT","datatype":"BYTES","shape":[2,0],"data":[]}]}',
        {},
    )
)
def test_http_infer(gateway, case):
    path, body, headers = case
    status, data = post(gateway, path, body, headers)
    if status >= 500:
        text = data.decode("utf-8", "replace")
        timed = status == 504 and b'"timeout"' in body  # the caller's own timeout passed
        found = known_marker(text)
        assert timed or found is not None, f"{status} for {path} {headers}: {text[:500]}"
        if found is not None:
            outcome(f"known finding: {found.key}")
        return
    outcome(f"HTTP {status}")
    if status != 200 and (status not in PROTOCOL_REFUSALS or data.startswith(b"{")):  # the app's: JSON
        doc = json.loads(data)
        assert isinstance(doc.get("error"), str) and doc["error"], doc


def test_http_still_serves(gateway):
    """Run after the fuzzing above (same module gateway): it still answers correctly."""
    good_http(gateway)


# ------------------------------------------------------------------ gRPC

metadata_keys = st.from_regex(r"[a-z][a-z0-9_.-]{0,12}", fullmatch=True).filter(
    lambda k: not k.startswith("grpc-") and k not in ("te", "content-type", "user-agent")
)
metadata = st.lists(
    st.one_of(
        st.tuples(x_header_names, st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)),
        st.tuples(metadata_keys.map(lambda k: k + "-bin"), st.binary(max_size=8)),
        st.tuples(st.just("x-request-id"), st.builds(lambda n: "r" * n, st.integers(1, 400))),
    ),
    max_size=4,
)


@st.composite
def grpc_requests(draw) -> bytes:
    """A third wholly correct ModelInferRequest bytes to a demo model, the others wrong somewhere."""
    clean = one_in(draw, 3)
    sig = None if not clean and one_in(draw, 8) else draw(st.sampled_from(DEMO))
    return draw(wire_messages(sig, clean))


@budget(0.25)
@given(data=grpc_requests(), md=metadata)
def test_grpc_infer(channel, data, md):
    call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
    start = time.monotonic()
    try:
        with server_recursion_limit():
            call(data, timeout=20, metadata=md)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        assert not (code is grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start > 19), "no answer"
        if code in BAD_GRPC:
            found = known_marker(details)
            assert found is not None, f"{code} for {len(data)} bytes: {details[:500]}"
            outcome(f"known finding: {found.key}")
            return
        outcome(f"gRPC {code.name}")
        return
    outcome("gRPC OK")


def test_grpc_still_serves(channel):
    """Run after the fuzzing above (same module gateway): it still answers correctly."""
    good_grpc(channel)
