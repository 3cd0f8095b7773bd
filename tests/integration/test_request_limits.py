"""Bounds on what one request may make the gateway do (issue: safe to expose).

Each case was a hole: a few bytes that made the gateway allocate gigabytes, shapes and nesting
that crashed numpy or the JSON reader into a 500, outputs asked for so often that the answer
was amplified. Every one must now be a 400 / INVALID_ARGUMENT naming what is wrong, and the
gateway must go on serving."""

from __future__ import annotations

import json
import struct
import tracemalloc
import urllib.request

import grpc
import numpy as np
import pytest
from protocol_support import Client, raw_http, simple_feeds
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.types import DATATYPES, RequestLimits, from_raw
from batchgate.transport import grpc_codec, http_codec

HUGE = 1 << 30  # elements a 122-byte request used to claim


def grpc_refusal(running, request: service_pb2.ModelInferRequest) -> str:
    channel = grpc.insecure_channel(running.grpc_url)
    with channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


def http_refusal(running, body: bytes, headers: dict | None = None, path: str = "/v2/models/simple/infer") -> str:
    status, _headers, data = raw_http(running, "POST", path, body, headers or {"Content-Type": "application/json"})
    assert status == 400, data[:300]
    return json.loads(data)["error"]


def still_serving(running) -> None:
    feeds = simple_feeds(1, seed=5)
    for flavour in ("grpc", "http"):
        c = Client(flavour, running)
        try:
            r = c.raw.infer("simple", [c.input(n, a) for n, a in feeds.items()])
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])
        finally:
            c.raw.close()


# ------------------------------------------------------------------ BYTES: count before allocating
def test_bytes_elements_are_counted_against_the_data_before_anything_is_allocated():
    tracemalloc.start()
    try:
        with pytest.raises(GatewayError) as info:
            from_raw(b"\x01\x00\x00\x00a", DATATYPES["BYTES"], (1, HUGE), "input 'x'")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert f"claims {HUGE} BYTES elements" in info.value.message and "hold at most 1" in info.value.message
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse a 5-byte tensor"


def test_a_bytes_bomb_is_refused_over_grpc_and_http(server):
    req = service_pb2.ModelInferRequest(model_name="identity_bytes")
    req.inputs.add(name="INPUT", datatype="BYTES", shape=[1, HUGE])
    req.raw_input_contents.append(struct.pack("<I", 1) + b"a")
    # (past max_bytes_elements now, before the data is looked at; below it the data decides:
    # test_bytes_elements_are_counted_against_the_data_before_anything_is_allocated)
    assert f"BYTES elements to {HUGE}" in grpc_refusal(server, req)
    head = json.dumps(
        {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, HUGE], "parameters": {"binary_data_size": 5}}]}
    ).encode()
    body = head + struct.pack("<I", 1) + b"a"
    msg = http_refusal(
        server, body, {"Inference-Header-Content-Length": str(len(head))}, path="/v2/models/identity_bytes/infer"
    )
    assert f"BYTES elements to {HUGE}" in msg and "(max_bytes_elements)" in msg
    still_serving(server)


def bytes_input(name: str, count: int) -> tuple[dict, bytes]:
    """A BYTES input of ``count`` one-byte strings: its JSON description and binary data."""
    data = (struct.pack("<I", 1) + b"s") * count
    return {"name": name, "datatype": "BYTES", "shape": [1, count], "parameters": {"binary_data_size": len(data)}}, data


def test_bytes_elements_of_a_request_are_bounded_on_every_path(demo_repo, serve):
    """max_bytes_elements, all of a request's BYTES inputs together, on HTTP (binary and JSON) and
    gRPC. Before, only the body's size bounded them: each element costs hundreds of bytes of
    Python objects and microseconds of the event loop, so 57 MB of 2-byte strings took 4 GB and
    held every other request 17 s."""
    running = serve(demo_repo, max_bytes_elements=100)
    path = "/v2/models/identity_bytes/infer"
    for count, ok in ((100, True), (101, False)):
        spec, data = bytes_input("INPUT", count)
        head = json.dumps({"inputs": [spec]}).encode()
        headers = {"Inference-Header-Content-Length": str(len(head))}
        as_json = json.dumps({"inputs": [{**spec, "parameters": {}, "data": ["s"] * count}]}).encode()
        req = service_pb2.ModelInferRequest(model_name="identity_bytes")
        req.inputs.add(name="INPUT", datatype="BYTES", shape=[1, count])
        req.raw_input_contents.append(data)
        if ok:
            assert raw_http(running, "POST", path, head + data, headers)[0] == 200
            assert raw_http(running, "POST", path, as_json, {"Content-Type": "application/json"})[0] == 200
            with grpc.insecure_channel(running.grpc_url) as ch:
                got = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=20)
            assert got.raw_output_contents[0] == data
            continue
        for msg in (
            http_refusal(running, head + data, headers, path=path),
            http_refusal(running, as_json, path=path),
            grpc_refusal(running, req),
        ):
            assert "input 'INPUT' brings the request's BYTES elements to 101; at most 100" in msg, msg
            assert "(max_bytes_elements)" in msg
    # two inputs count together (refused before the model is asked about the second)
    (a, da), (b, db) = bytes_input("INPUT", 60), bytes_input("OTHER", 60)
    head = json.dumps({"inputs": [a, b]}).encode()
    msg = http_refusal(running, head + da + db, {"Inference-Header-Content-Length": str(len(head))}, path=path)
    assert "input 'OTHER' brings the request's BYTES elements to 120" in msg
    still_serving(running)


# ------------------------------------------------------------------ shapes, counts, nesting
def test_too_many_dimensions_is_a_400_not_a_numpy_crash(server):
    shape = [1] * 65
    req = service_pb2.ModelInferRequest(model_name="simple")
    req.inputs.add(name="INPUT0", datatype="INT32", shape=shape)
    req.raw_input_contents.append(b"\0\0\0\0")
    assert "65 dimensions; at most 32 are accepted (max_tensor_dims)" in grpc_refusal(server, req)
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": shape, "data": [1]}]}).encode()
    assert "(max_tensor_dims)" in http_refusal(server, body)
    still_serving(server)


def test_json_nested_a_thousand_deep_is_a_400_not_a_recursion_crash(server):
    def body(datatype: str, leaf: str, depth: int = 1020) -> bytes:
        data = "[" * depth + leaf + "]" * depth  # too deep for Python's own json module to write
        head = f'{{"inputs": [{{"name": "INPUT", "datatype": "{datatype}", "shape": [1, 1], "data": '
        return (head + data + "}]}").encode()

    msg = http_refusal(server, body("BYTES", '"x"'), path="/v2/models/identity_bytes/infer")
    assert "nested more than 2 lists deep" in msg, msg
    msg = http_refusal(server, body("BYTES", '"x"', depth=3), path="/v2/models/identity_bytes/infer")
    assert "nested more than 2 lists deep" in msg, msg
    http_refusal(server, body("INT32", "1"), path="/v2/models/identity_bytes/infer")
    still_serving(server)


def test_outputs_may_not_be_repeated_or_endless(server):
    good = [{"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))} for n in ("INPUT0", "INPUT1")]
    twice = [{"name": "OUTPUT0"}, {"name": "OUTPUT0"}]
    msg = http_refusal(server, json.dumps({"inputs": good, "outputs": twice}).encode())
    assert msg == "output 'OUTPUT0' is requested more than once"
    endless = [{"name": "OUTPUT0"}] * 10_000
    msg = http_refusal(server, json.dumps({"inputs": good, "outputs": endless}).encode())
    assert msg == "the request names 10000 outputs; at most 64 are accepted (max_outputs)"
    req = service_pb2.ModelInferRequest(model_name="simple")
    for name, arr in simple_feeds(1).items():
        req.inputs.add(name=name, datatype="INT32", shape=list(arr.shape))
        req.raw_input_contents.append(arr.tobytes())
    req.outputs.add(name="OUTPUT1")
    req.outputs.add(name="OUTPUT1")
    assert grpc_refusal(server, req) == "output 'OUTPUT1' is requested more than once"
    for _ in range(100):
        req.outputs.add(name="OUTPUT1")
    assert grpc_refusal(server, req) == "the request names 102 outputs; at most 64 are accepted (max_outputs)"
    still_serving(server)


def test_too_many_inputs_are_refused_before_any_is_decoded(server):
    req = service_pb2.ModelInferRequest(model_name="simple")
    for i in range(65):
        req.inputs.add(name=f"in{i}", datatype="INT32", shape=[1])
        req.raw_input_contents.append(b"\0\0\0\0")
    assert grpc_refusal(server, req) == "the request has 65 inputs; at most 64 are accepted (max_inputs)"
    body = json.dumps(
        {"inputs": [{"name": f"in{i}", "datatype": "INT32", "shape": [1], "data": [0]} for i in range(65)]}
    ).encode()
    assert http_refusal(server, body) == "the request has 65 inputs; at most 64 are accepted (max_inputs)"


def test_the_limits_are_settings(demo_repo, serve):
    running = serve(demo_repo, max_tensor_dims=2, max_inputs=1, max_outputs=1)
    limits = running.gateway.dataplane.limits
    assert (limits.max_tensor_dims, limits.max_inputs, limits.max_outputs) == (2, 1, 1)
    body = json.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 1, 16], "data": list(range(16))}]}
    ).encode()
    assert http_refusal(running, body).endswith("3 dimensions; at most 2 are accepted (max_tensor_dims)")


@pytest.mark.parametrize("codec", ["grpc", "http"])
def test_the_codecs_check_counts_with_the_limits_they_are_given(codec):
    limits = RequestLimits(max_inputs=1)
    if codec == "grpc":
        msg = service_pb2.ModelInferRequest(model_name="m")
        msg.inputs.add(name="a", datatype="INT32", shape=[1])
        msg.inputs.add(name="b", datatype="INT32", shape=[1])
        with pytest.raises(GatewayError, match=r"\(max_inputs\)"):
            grpc_codec.decode_request(msg, 0.0, limits)
    else:
        body = json.dumps(
            {"inputs": [{"name": n, "datatype": "INT32", "shape": [1], "data": [1]} for n in "ab"]}
        ).encode()
        with pytest.raises(GatewayError, match=r"\(max_inputs\)"):
            http_codec.decode_request(body, None, "m", "", 0.0, limits)


# ------------------------------------------------------------------ echoes and logs
def test_a_request_id_over_the_limit_is_refused_and_one_at_the_limit_is_echoed(server):
    feeds = simple_feeds(1)
    for flavour in ("grpc", "http"):
        c = Client(flavour, server)
        try:
            inputs = [c.input(n, a) for n, a in feeds.items()]
            assert (
                c.raw.infer("simple", inputs, request_id="r" * 256).get_response(
                    **({"as_json": True} if c.grpc else {})
                )["id"]
                == "r" * 256
            )
            with pytest.raises(Exception) as info:
                c.raw.infer("simple", inputs, request_id="r" * 257)
            assert "the request id is 257 bytes; at most 256 are accepted (max_request_id_bytes)" in str(info.value)
        finally:
            c.raw.close()


def test_a_stream_error_echoes_no_id_past_the_limit_and_no_long_name(server):
    """A stream answers each failed request with an error that carries its id, name and version
    (tritonclient matches them so): an id refused for its length, a name or a version of 100,000
    characters came back whole, each failure on a stream echoing its request's bulk."""
    big = "i" * 100_000
    reqs = [service_pb2.ModelInferRequest(model_name="simple", id=big), service_pb2.ModelInferRequest(model_name=big)]
    reqs.append(service_pb2.ModelInferRequest(model_name="simple", model_version=big, id="\U0001f600" * 100))
    reqs.append(service_pb2.ModelInferRequest(model_name="simple", id="r" * 256))  # at the limit: echoed whole
    channel = grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", 1 << 24)])
    with channel:
        answers = list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(reqs), timeout=20))
    assert len(answers) == 4 and all(a.error_message for a in answers), answers
    for a in answers:
        head = a.infer_response
        assert len(a.error_message) < 600 and len(head.model_name) <= 131 and len(head.model_version) <= 131, head
        assert len(head.id.encode()) <= 256, len(head.id)
    assert answers[0].infer_response.id == "i" * 256 and answers[2].infer_response.id == "\U0001f600" * 64
    assert answers[3].infer_response.id == "r" * 256


def test_echoed_names_are_cut_short(server):
    name = "n" * 100_000
    req = service_pb2.ModelInferRequest(model_name=name)
    channel = grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", 1 << 24)])
    with channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=20)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(info.value.details()) < 300, len(info.value.details())
    body = json.dumps(
        {"inputs": [{"name": "i" * 100_000, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}]}
    ).encode()
    assert len(http_refusal(server, body)) < 400


def test_unknown_model_paths_are_not_cached(server):
    app = server.gateway._http.app
    before = len(app._infer_paths)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}]}).encode()
    for i in range(50):
        status, _h, _d = raw_http(server, "POST", f"/v2/models/nobody-{i}/infer", body)
        assert status == 404
    assert len(app._infer_paths) == before


def test_a_client_cannot_forge_log_lines(server, caplog):
    import logging

    from batchgate.logs import PlainFormatter

    evil = "simple\n2026-12-01 00:00:00,000 INFO batchgate: forged line"
    req = service_pb2.ModelInferRequest(model_name=evil, id="id\r\nforged")
    caplog.set_level(logging.INFO, logger="batchgate")
    channel = grpc.insecure_channel(server.grpc_url)
    with channel, pytest.raises(grpc.RpcError):
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=20)
    records = [r for r in caplog.records if "failed" in r.getMessage() and "forged" in r.getMessage()]
    assert records, [r.getMessage() for r in caplog.records]
    line = PlainFormatter().format(records[-1])
    assert "\n" not in line and "\r" not in line
    assert "simple\\x0a2026-12-01" in line and "[request_id=id\\x0d\\x0aforged]" in line


def test_overload_refusals_are_not_logged_at_info(server, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="batchgate")
    dp = server.gateway.dataplane
    dp.log_failure("http", "m", "r1", GatewayError(ErrorCode.RESOURCE_EXHAUSTED, "queue full"))
    dp.log_failure("http", "m", "r2", GatewayError(ErrorCode.INVALID_ARGUMENT, "bad shape"))
    messages = [r.getMessage() for r in caplog.records]
    assert any("bad shape" in m for m in messages) and not any("queue full" in m for m in messages)


def test_gzip_member_bound_is_a_setting_and_a_400(demo_repo, serve):
    import gzip

    running = serve(demo_repo, max_gzip_members=2)
    good = json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
                for n in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()
    three = gzip.compress(b"") + gzip.compress(b"") + gzip.compress(good)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    assert http_refusal(running, three, headers) == "the gzip request body has more than 2 members (max_gzip_members)"
    status, _h, _d = raw_http(
        running, "POST", "/v2/models/simple/infer", gzip.compress(b"") + gzip.compress(good), headers
    )
    assert status == 200


def test_every_refusal_is_counted_by_the_limit_that_refused_it(server):
    def counts() -> dict:
        return dict(server.gateway.metrics.snapshot().values.get("batchgate_request_errors", {}))

    before = counts()
    good = [{"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))} for n in ("INPUT0", "INPUT1")]
    http_refusal(server, json.dumps({"inputs": good, "outputs": [{"name": "OUTPUT0"}] * 65}).encode())
    req = service_pb2.ModelInferRequest(model_name="simple")
    for i in range(65):
        req.inputs.add(name=f"in{i}", datatype="INT32", shape=[1])
    grpc_refusal(server, req)
    http_refusal(server, json.dumps({"inputs": [{"name": "INPUT0"}]}).encode())  # no limit: reason none
    after = counts()

    def grew(key) -> int:
        return after.get(key, 0) - before.get(key, 0)

    assert grew(("http", "INVALID_ARGUMENT", "max_outputs")) == 1
    assert grew(("grpc", "INVALID_ARGUMENT", "max_inputs")) == 1
    assert grew(("http", "INVALID_ARGUMENT", "none")) == 1
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'batchgate_request_errors_total{code="INVALID_ARGUMENT",protocol="grpc",reason="max_inputs"}' in text


def test_an_empty_tensor_with_enormous_dimensions_is_a_400(server):
    req = service_pb2.ModelInferRequest(model_name="simple")
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[0, 2**62, 2**62])
    req.raw_input_contents.append(b"")
    assert "is too large" in grpc_refusal(server, req)
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [0, 2**62, 2**62], "data": []}]})
    assert "is too large" in http_refusal(server, body.encode())
    still_serving(server)


def test_echoes_in_malformed_input_errors_are_bounded(server):
    body = json.dumps({"inputs": [{"name": "i" * 100_000, "datatype": "INT32", "shape": "x" * 100_000}]}).encode()
    assert len(http_refusal(server, body)) < 500
    body = json.dumps({"inputs": [{"name": "a", "datatype": "Q" * 100_000, "shape": [1], "data": [1]}]}).encode()
    assert len(http_refusal(server, body)) < 500


def test_an_empty_outputs_list_asks_for_every_output_as_on_grpc(server):
    """``"outputs": []`` names no output: Triton and MLServer answer every output, as an empty
    gRPC list (no different on the wire from none) is answered here; it was refused 400 over
    HTTP alone."""
    good = [{"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))} for n in ("INPUT0", "INPUT1")]
    status, _headers, data = raw_http(
        server, "POST", "/v2/models/simple/infer", json.dumps({"inputs": good, "outputs": []}).encode(), {}
    )
    assert status == 200, data[:300]
    answer = json.loads(data)
    assert [o["name"] for o in answer["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    assert answer["outputs"][0]["data"] == [2 * i for i in range(16)]


def test_a_client_cannot_split_json_log_lines(server, caplog):
    """JSON leaves C1 controls (U+0085), U+2028 / U+2029 and the bidirectional controls raw, and
    str.splitlines (and log shippers) break a line at the first three: a JSON log line quoting a
    client's model name or request id wrote them raw (until 2026-12-06), so one record read as
    several lines. They are written as escapes that read back as the same text."""
    import logging

    from batchgate.logs import JsonFormatter

    evil = "simple\u2028forged\u202e"
    rid = "id\u0085forged\u2029x"
    req = service_pb2.ModelInferRequest(model_name=evil, id=rid)
    caplog.set_level(logging.INFO, logger="batchgate")
    channel = grpc.insecure_channel(server.grpc_url)
    with channel, pytest.raises(grpc.RpcError):
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=20)
    records = [r for r in caplog.records if "failed" in r.getMessage() and "forged" in r.getMessage()]
    assert records, [r.getMessage() for r in caplog.records]
    line = JsonFormatter().format(records[-1])
    assert len(line.splitlines()) == 1, line
    assert not any(c in line for c in "\u0085\u2028\u2029\u202e"), line
    obj = json.loads(line)
    assert evil in obj["msg"] and obj["request_id"] == rid
