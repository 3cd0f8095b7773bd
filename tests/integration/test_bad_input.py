"""Bad input over gRPC and HTTP: each is refused with the right status and a message that says
what was wrong, and the server keeps serving (also while bad requests run beside good ones).

tritonclient is used where it will send the bad thing; raw sockets (``http.client``, a bare gRPC
channel, hand-built protobufs) where it would refuse to.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import struct

import aiohttp
import grpc
import numpy as np
import pytest
from protocol_support import FLAVOURS, QUICK, Client, raw_http, simple_feeds
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(params=FLAVOURS)
async def client(request, server):
    c = Client(request.param, server)
    yield c
    await c.close()


# ------------------------------------------------------------------ helpers


def http_error(
    running, body: bytes, headers: dict | None = None, path: str = "/v2/models/simple/infer", method: str = "POST"
) -> tuple[int, str]:
    """Send a raw request that must fail; return its status and the JSON error message."""
    status, hdrs, data = raw_http(running, method, path, body, headers)
    assert status != 200, data
    assert hdrs.get("content-type", "").startswith("application/json"), hdrs
    doc = json.loads(data)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc
    return status, doc["error"]


def grpc_stub(running):
    channel = grpc.insecure_channel(running.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def grpc_error(running, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    channel, stub = grpc_stub(running)
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    return info.value


def simple_request(**overrides) -> service_pb2.ModelInferRequest:
    """A correct raw-contents request for 'simple'; tests then break one thing in it."""
    req = service_pb2.ModelInferRequest(model_name="simple")
    feeds = simple_feeds(1)
    for name, arr in feeds.items():
        req.inputs.add(name=name, datatype="INT32", shape=list(arr.shape))
        req.raw_input_contents.append(arr.tobytes())
    for k, v in overrides.items():
        setattr(req, k, v)
    return req


def json_body(inputs: list, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def json_input(name="INPUT0", datatype="INT32", shape=(1, 16), data=None) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": list(range(16)) if data is None else data}


GOOD_JSON = json_body([json_input("INPUT0"), json_input("INPUT1")])


def binary_body(parts: list[tuple[dict, bytes]]) -> tuple[bytes, dict]:
    """A binary-extension body: JSON header, then each input's raw bytes."""
    head = json.dumps({"inputs": [p[0] for p in parts]}).encode()
    body = head + b"".join(p[1] for p in parts)
    return body, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def assert_still_serving(running) -> None:
    feeds = simple_feeds(2, seed=77)
    for flavour in ("grpc", "http"):
        c = Client(flavour, running)
        try:
            inputs = [c.input(n, a) for n, a in feeds.items()]
            r = c.raw.infer("simple", inputs)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])
        finally:
            c.raw.close()


# ------------------------------------------------------------------ through tritonclient, all flavours
async def test_unknown_model(client):
    e = await client.error_of("infer", "no_such_model", [client.input(n, a) for n, a in simple_feeds().items()])
    assert e.status() == client.status("NOT_FOUND")
    assert "no_such_model" in e.message()


async def test_unknown_version(client):
    inputs = [client.input(n, a) for n, a in simple_feeds().items()]
    e = await client.error_of("infer", "simple", inputs, model_version="9")
    assert e.status() == client.status("NOT_FOUND")
    assert "9" in e.message() and "simple" in e.message()


async def test_wrong_input_name(client):
    feeds = simple_feeds()
    inputs = [client.input("INPUT0", feeds["INPUT0"]), client.input("INPUTX", feeds["INPUT1"])]
    e = await client.error_of("infer", "simple", inputs)
    assert e.status() == client.status("INVALID_ARGUMENT")
    assert "INPUTX" in e.message() and "INPUT1" in e.message(), e.message()


async def test_wrong_datatype(client):
    feeds = simple_feeds()
    inputs = [client.input("INPUT0", feeds["INPUT0"].astype(np.float32)), client.input("INPUT1", feeds["INPUT1"])]
    e = await client.error_of("infer", "simple", inputs)
    assert e.status() == client.status("INVALID_ARGUMENT")
    assert "INPUT0" in e.message() and "FP32" in e.message() and "INT32" in e.message(), e.message()


async def test_wrong_shape(client):
    a = np.zeros((1, 15), np.int32)
    e = await client.error_of("infer", "simple", [client.input("INPUT0", a), client.input("INPUT1", a)])
    assert e.status() == client.status("INVALID_ARGUMENT")
    msg = e.message()
    assert "INPUT0" in msg and "[1, 15]" in msg and "16" in msg, msg


async def test_wrong_rank(client):
    a = np.zeros((16,), np.int32)
    e = await client.error_of("infer", "simple", [client.input("INPUT0", a), client.input("INPUT1", a)])
    assert e.status() == client.status("INVALID_ARGUMENT")
    assert "INPUT0" in e.message() and "batch" in e.message(), e.message()


async def test_batch_too_large(client):
    feeds = simple_feeds(9)  # max_batch_size is 8
    e = await client.error_of("infer", "simple", [client.input(n, a) for n, a in feeds.items()])
    assert e.status() == client.status("INVALID_ARGUMENT")
    assert "9" in e.message() and "8" in e.message(), e.message()


async def test_inputs_disagree_on_batch(client):
    inputs = [client.input("INPUT0", np.zeros((2, 16), np.int32)), client.input("INPUT1", np.zeros((3, 16), np.int32))]
    e = await client.error_of("infer", "simple", inputs)
    assert e.status() == client.status("INVALID_ARGUMENT")
    assert "batch" in e.message()


async def test_missing_input(client):
    e = await client.error_of("infer", "simple", [client.input("INPUT0", simple_feeds()["INPUT0"])])
    assert e.status() == client.status("INVALID_ARGUMENT")
    assert "INPUT1" in e.message(), e.message()


async def test_duplicate_input(client):
    a = simple_feeds()["INPUT0"]
    e = await client.error_of(
        "infer", "simple", [client.input("INPUT0", a), client.input("INPUT0", a), client.input("INPUT1", a)]
    )
    assert e.status() == client.status("INVALID_ARGUMENT")
    assert "INPUT0" in e.message()


async def test_unknown_requested_output(client):
    inputs = [client.input(n, a) for n, a in simple_feeds().items()]
    e = await client.error_of("infer", "simple", inputs, outputs=[client.output("OUTPUT9")])
    assert e.status() == client.status("INVALID_ARGUMENT")
    assert "OUTPUT9" in e.message() and "OUTPUT0" in e.message(), e.message()


async def test_unknown_model_metadata_and_config(client):
    for method in ("get_model_metadata", "get_model_config", "get_inference_statistics"):
        e = await client.error_of(method, "no_such_model")
        assert e.status() == client.status("NOT_FOUND"), method
        assert "no_such_model" in e.message()


def test_grpc_bad_schedule_parameters(server):
    """tritonclient refuses to send these (reserved names), so build them by hand."""
    req = simple_request()
    req.parameters["timeout"].string_param = "soon"
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout" in err.details()
    req = simple_request()
    req.parameters["priority"].int64_param = -3
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority" in err.details()


@pytest.mark.parametrize("name", ["tag", "priority", "timeout", "sequence_id"])
def test_grpc_a_request_parameter_with_no_value_says_so(server, name):
    """An InferParameter with none of its fields set (which Triton refuses too) was refused as
    "must be a string, a number or a boolean, not None": Python's word for it, not the client's."""
    req = simple_request()
    req.parameters[name].CopyFrom(service_pb2.InferParameter())
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"parameter '{name}' has no value: none of its InferParameter fields is set", err.details()


def test_triton_reserved_and_nested_request_parameters_are_refused(server):
    """Names starting with 'triton_' are the server's, as on Triton (tritonclient will not send
    them, so by hand); HTTP parameter values must be scalars, as Triton requires. The one reserved
    name tritonclient sends itself, on streams, is accepted."""
    req = simple_request()
    req.parameters["triton_sequence_hint"].bool_param = True
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'triton_sequence_hint'" in err.details() and "reserved" in err.details()
    req = simple_request()
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    channel, stub = grpc_stub(server)
    with channel:
        assert stub.ModelInfer(req, timeout=10).outputs[0].name == "OUTPUT0"
    for params, text in (
        ({"triton_x": 1}, "'triton_x'"),
        ({"tag": {"nested": 1}}, "parameter 'tag' must be a string, a number or a boolean"),
        ({"tag": [1, 2]}, "parameter 'tag' must be"),
        ({"priority": 2**64}, "parameter 'priority' must be a non-negative integer"),  # (JSON past 64 bits: a float)
        ({"sequence_id": 2**64}, "parameter 'sequence_id' must be an unsigned 64-bit integer or a string"),
        ({"sequence_id": -1}, "parameter 'sequence_id' must be an unsigned 64-bit integer or a string, not -1"),
        ({"sequence_start": "yes"}, "parameter 'sequence_start' must be a boolean, not 'yes'"),
        ({"k" * 129: 1}, "names are at most 128 characters"),  # (a name was bounded by the body alone)
    ):
        status, msg = http_error(server, json_body([json_input("INPUT0"), json_input("INPUT1")], parameters=params))
        assert status == 400 and text in msg, (params, msg)
    assert_still_serving(server)


async def test_bytes_that_are_not_utf8(client):
    arr = np.array([[b"\xff\xfe not utf-8", b"ok"]], dtype=object)
    e = await client.error_of("infer", "identity_bytes", [client.input("INPUT", arr, "BYTES")])
    assert e.status() == client.status("INVALID_ARGUMENT"), (e.status(), e.message())
    assert "INPUT" in e.message() and "UTF-8" in e.message().upper()


# ------------------------------------------------------------------ gRPC: hand-built and unparsable messages
def test_grpc_raw_byte_count_mismatch(server):
    req = simple_request()
    req.raw_input_contents[1] = req.raw_input_contents[1][:-4]
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT1" in err.details() and "60" in err.details() and "64" in err.details(), err.details()


def test_grpc_raw_contents_for_some_inputs_only(server):
    req = simple_request()
    del req.raw_input_contents[1]
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in err.details()


def test_grpc_raw_and_typed_contents_together(server):
    req = simple_request()
    req.inputs[0].contents.int_contents.extend(range(16))
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.details()


def test_grpc_typed_contents_count_mismatch(server):
    req = service_pb2.ModelInferRequest(model_name="simple")
    for name, n in (("INPUT0", 16), ("INPUT1", 12)):
        t = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        t.contents.int_contents.extend(range(n))
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT1" in err.details() and "16" in err.details() and "12" in err.details(), err.details()


def test_grpc_typed_contents_out_of_range(server):
    req = service_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        t = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        t.contents.int_contents.extend([0] * 16)
    # int_contents is int32 on the wire, so it cannot overflow INT32; INT8 through it can:
    req.inputs[0].datatype = "INT8"
    req.inputs[0].contents.int_contents[3] = 300
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.details() and "range" in err.details(), err.details()


def test_grpc_fp16_has_no_typed_contents(server):
    req = service_pb2.ModelInferRequest(model_name="simple")
    req.inputs.add(name="INPUT0", datatype="FP16", shape=[1, 16])
    req.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16]).contents.int_contents.extend(range(16))
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FP16" in err.details() and "raw_input_contents" in err.details()


def test_grpc_unknown_datatype_and_negative_dims(server):
    req = simple_request()
    req.inputs[0].datatype = "FP8"
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FP8" in err.details() and "INT32" in err.details()
    req = simple_request()
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend([1, -16])
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.details()


def test_grpc_non_numeric_version(server):
    err = grpc_error(server, simple_request(model_version="latest"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "latest" in err.details()


def test_grpc_bytes_element_truncated(server):
    req = service_pb2.ModelInferRequest(model_name="identity_bytes")
    req.inputs.add(name="INPUT", datatype="BYTES", shape=[1, 2])
    req.raw_input_contents.append(struct.pack("<I", 3) + b"abc" + struct.pack("<I", 10) + b"short")
    err = grpc_error(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT" in err.details() and "10" in err.details(), err.details()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint that never ends
        b"\x0a\x64simple",  # a field that claims 100 bytes and has 6
        b"\x2a\x05\x0a\x03abc" + b"\x07" * 9,  # an input, then a bad wire type
    ],
)
def test_grpc_unparsable_protobuf(server, garbage):
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(garbage, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "not a valid inference.ModelInferRequest" in info.value.details()
    assert_still_serving(server)


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("ModelReady", "inference.ModelReadyRequest"),
        ("ModelMetadata", "inference.ModelMetadataRequest"),
        ("RepositoryModelLoad", "inference.RepositoryModelLoadRequest"),
        ("SystemSharedMemoryRegister", "inference.SystemSharedMemoryRegisterRequest"),
    ],
)
@pytest.mark.parametrize("garbage", [b"\xff" * 10, b"\x0a\x05\xff\xfe\xed\xa0\x80"])  # (the second: a name not UTF-8)
def test_grpc_unparsable_protobuf_on_other_methods_is_invalid_argument(server, method, kind, garbage):
    """Every method, not ModelInfer alone, on both engines: bad bytes are the caller's error (was
    INTERNAL; on grpc.aio UNKNOWN "Unexpected <class DecodeError>" until 2026-12-06)."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}", None, None)
        with pytest.raises(grpc.RpcError) as info:
            call(garbage, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert info.value.details() == f"the request is not a valid {kind} (protobuf)"
    assert_still_serving(server)


def test_grpc_valid_protobuf_but_nonsense(server):
    """Messages that parse but ask for nothing sensible: no model, then a model and no inputs."""
    err = grpc_error(server, service_pb2.ModelInferRequest())
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = grpc_error(server, service_pb2.ModelInferRequest(model_name="simple"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.details() and "INPUT1" in err.details(), err.details()


def test_a_request_without_inputs_is_refused_and_counted_alike_on_both_protocols(server):
    def failures() -> int:
        status, _, data = raw_http(server, "GET", "/v2/models/simple/stats", b"")
        return json.loads(data)["model_stats"][0]["inference_stats"]["fail"]["count"]

    before = failures()
    err = grpc_error(server, service_pb2.ModelInferRequest(model_name="simple"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "INPUT0" in err.details()
    status, msg = http_error(server, b'{"inputs": []}')
    assert status == 400 and "INPUT0" in msg and "INPUT1" in msg, msg
    assert failures() == before + 2


def test_grpc_a_version_in_another_scripts_digits_is_refused(server):
    msg = service_pb2.ModelInferRequest(model_name="simple", model_version="\u0661")  # ARABIC-INDIC DIGIT ONE
    err = grpc_error(server, msg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "whole number" in err.details(), err.details()
    with grpc.insecure_channel(server.grpc_url) as channel, pytest.raises(grpc.RpcError) as info:
        ready = service_pb2.ModelReadyRequest(name="simple", version="+1")
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelReady(ready, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "whole number" in info.value.details()


@pytest.mark.parametrize("version", ["%C2%B9", "%D9%A1", "%2B1", "1" * 40])  # superscript one, Arabic-Indic one, +1
def test_http_a_version_that_is_no_plain_number_is_a_json_400(server, version):
    for path in (f"/v2/models/simple/versions/{version}/infer", f"/v2/models/simple/versions/{version}/ready"):
        status, msg = http_error(server, GOOD_JSON, path=path, method="POST" if path.endswith("infer") else "GET")
        assert status == 400 and "model version must be a whole number" in msg, (path, msg)
    assert_still_serving(server)


def test_a_version_of_too_many_digits_is_told_the_bound_on_both_protocols(server):
    """A 19-digit version was refused as "must be a whole number", which it is; the bound is said."""
    version = "9" * 19
    err = grpc_error(server, service_pb2.ModelInferRequest(model_name="simple", model_version=version))
    want = f"model version must be a whole number of at most 18 digits, not '{version}'"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == want, err.details()
    status, msg = http_error(server, GOOD_JSON, path=f"/v2/models/simple/versions/{version}/infer")
    assert status == 400 and msg == want, msg


def test_grpc_unknown_method(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/NoSuchRpc", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------ HTTP: raw requests
def test_http_json_element_count_mismatch(server):
    body = json_body([json_input("INPUT0"), json_input("INPUT1", data=list(range(15)))])
    status, msg = http_error(server, body)
    assert status == 400
    assert "INPUT1" in msg and "16" in msg and "15" in msg, msg


def test_http_binary_byte_count_mismatch(server):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    body, headers = binary_body(
        [
            (
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
                a.tobytes(),
            ),
            (
                {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 60}},
                a.tobytes()[:60],
            ),
        ]
    )
    status, msg = http_error(server, body, headers)
    assert status == 400
    assert "INPUT1" in msg and "60" in msg and "64" in msg, msg


def test_http_truncated_binary(server):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    body, headers = binary_body(
        [
            (
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
                a.tobytes(),
            ),
            (
                {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
                a.tobytes()[:20],
            ),
        ]
    )
    status, msg = http_error(server, body, headers)
    assert status == 400
    assert "INPUT1" in msg and "64" in msg, msg


def test_http_binary_bytes_nobody_claims(server):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    parts = [
        ({"name": n, "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}, a.tobytes())
        for n in ("INPUT0", "INPUT1")
    ]
    body, headers = binary_body(parts)
    status, msg = http_error(server, body + b"\x00" * 8, headers)
    assert status == 400 and "8" in msg, msg


@pytest.mark.parametrize(
    "value,words",
    [
        ("abc", "integer"),
        ("-5", "-5"),
        ("99999", "99999"),
        ("0", "0"),
    ],
)
def test_http_bad_inference_header_content_length(server, value, words):
    status, msg = http_error(server, GOOD_JSON, {"Inference-Header-Content-Length": value})
    assert status == 400
    assert "Inference-Header-Content-Length" in msg and words in msg, msg


@pytest.mark.parametrize(
    "name,values",
    [("Inference-Header-Content-Length", (str(len(GOOD_JSON)), "5")), ("Content-Encoding", ("identity", "gzip"))],
)
def test_http_a_framing_header_given_twice_is_refused(server, name, values):
    """Two values that frame the body differently: the last one won."""
    import http.client

    conn = http.client.HTTPConnection(server.http_url, timeout=20)
    try:
        conn.putrequest("POST", "/v2/models/simple/infer")
        conn.putheader("Content-Length", str(len(GOOD_JSON)))
        for v in values:
            conn.putheader(name, v)
        conn.endheaders(GOOD_JSON)
        answer = conn.getresponse()
        assert answer.status == 400
        assert json.loads(answer.read())["error"] == f"the {name} header is given more than once"
    finally:
        conn.close()


@pytest.mark.parametrize(
    "body,words",
    [
        (b"{not json", "JSON"),
        (b"", "JSON"),
        (b"\xff\xfe\x00", "JSON"),
        (b"[1, 2, 3]", "object"),
        (b'"inputs"', "object"),
        (b"null", "object"),
        (b"{}", "inputs"),
        (b'{"inputs": []}', "inputs"),
        (b'{"inputs": {"name": "INPUT0"}}', "inputs"),
        (b'{"inputs": [42]}', "inputs"),
    ],
)
def test_http_malformed_body(server, body, words):
    status, msg = http_error(server, body, {"Content-Type": "application/json"})
    assert status == 400
    assert words in msg, msg


@pytest.mark.parametrize(
    "mutate,words",
    [
        (lambda i: i.pop("datatype"), "datatype"),
        (lambda i: i.update(datatype="FP8"), "FP8"),
        (lambda i: i.update(shape="1x16"), "shape"),
        (lambda i: i.update(shape=[1, -16]), "shape"),
        (lambda i: i.update(shape=[1, True]), "shape"),
        (lambda i: i.pop("data"), "data"),
        (lambda i: i.update(data=["a"] * 16), "INT32"),
        (lambda i: i.update(data=[1.5] * 16), "INPUT0"),
        (lambda i: i.update(data=[2**40] * 16), "INPUT0"),
        (lambda i: i.update(data=[True] * 16), "INT32"),
        (lambda i: i.update(data=[1, True] * 8), "INT32"),
        (lambda i: i.update(data=["7"] * 16), "INT32"),
        (lambda i: i.update(data=[1, [2, 3]] + [0] * 13), "INPUT0"),
        (lambda i: i.update(data=list(range(15))), "15"),
        (lambda i: i.update(parameters="binary"), "parameters"),
        (lambda i: i.update(parameters={"binary_data_size": 64}), "INPUT0"),
        (lambda i: i.update(parameters={"binary_data_size": -1}), "binary_data_size"),
    ],
)
def test_http_bad_input_entry(server, mutate, words):
    entry = json_input("INPUT0")
    mutate(entry)
    status, msg = http_error(server, json_body([entry, json_input("INPUT1")]))
    assert status == 400
    assert words in msg and "INPUT0" in msg, msg


@pytest.mark.parametrize(
    "extra,words",
    [
        ({"outputs": {"name": "OUTPUT0"}}, "outputs"),
        ({"outputs": [{"nombre": "OUTPUT0"}]}, "outputs"),
        ({"outputs": [{"name": "OUTPUT0", "parameters": 3}]}, "parameters"),
        ({"outputs": [{"name": "OUTPUT0", "parameters": {f"p{i}": 1 for i in range(17)}}]}, "at most 16 parameters"),
        ({"parameters": [1]}, "parameters"),
        # A falsy value that is no object is refused too, as on an input (it was read as none).
        ({"parameters": []}, "parameters"),
        ({"parameters": ""}, "parameters"),
        ({"parameters": False}, "parameters"),
        ({"parameters": 0}, "parameters"),
        ({"outputs": [{"name": "OUTPUT0", "parameters": []}]}, "parameters"),
        ({"outputs": [{"name": "OUTPUT0", "parameters": ""}]}, "parameters"),
        ({"outputs": [{"name": "OUTPUT0", "parameters": False}]}, "parameters"),
        ({"id": 17}, "id"),
        ({"parameters": {"priority": -1}}, "priority"),
        ({"parameters": {"timeout": "soon"}}, "timeout"),
    ],
)
def test_http_bad_request_fields(server, extra, words):
    status, msg = http_error(server, json_body([json_input("INPUT0"), json_input("INPUT1")], **extra))
    assert status == 400
    assert words in msg, msg


def test_http_bytes_json_data_must_be_strings(server):
    entry = {"name": "INPUT", "datatype": "BYTES", "shape": [1, 2], "data": ["ok", 5]}
    status, msg = http_error(server, json_body([entry]), path="/v2/models/identity_bytes/infer")
    assert status == 400 and "INPUT" in msg and "string" in msg, msg


def test_http_unknown_model_and_version(server):
    status, msg = http_error(server, GOOD_JSON, path="/v2/models/no_such_model/infer")
    assert status == 404 and "no_such_model" in msg
    status, msg = http_error(server, GOOD_JSON, path="/v2/models/simple/versions/9/infer")
    assert status == 404 and "9" in msg
    status, msg = http_error(server, b"", path="/v2/models/no_such_model/config", method="GET")
    assert status == 404 and "no_such_model" in msg


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("GET", "/v2/models/simple/infer", "POST"),
        ("PUT", "/v2/models/simple/infer", "POST"),
        ("DELETE", "/v2", "GET, HEAD"),
        ("POST", "/v2/health/live", "GET, HEAD"),
        ("POST", "/v2/models/simple", "GET, HEAD"),
        ("POST", "/v2/models/simple/config", "GET, HEAD"),
        ("GET", "/v2/repository/index", "POST"),
        ("HEAD", "/v2/models/simple/infer", "POST"),
    ],
)
def test_http_wrong_method(server, method, path, allowed):
    status, headers, data = raw_http(server, method, path)
    assert status == 405
    assert method == "HEAD" or json.loads(data)["error"]
    assert headers.get("allow") == allowed  # RFC 9110: a 405 says which methods would work


@pytest.mark.parametrize(
    "path", ["/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/simple", "/v2/models/simple/ready"]
)
def test_http_head_is_a_get_without_its_body(server, path):
    """Load balancers' health checks may use HEAD: it was a 405. Same status and headers as
    the GET, no body (the GET after it on the same connection would not parse otherwise)."""
    import http.client

    conn = http.client.HTTPConnection(server.http_url, timeout=20)
    try:
        conn.request("HEAD", path)
        head = conn.getresponse()
        assert head.read() == b""
        conn.request("GET", path)
        get = conn.getresponse()
        body = get.read()
        assert head.status == get.status == 200
        assert head.getheader("content-length") == get.getheader("content-length") == str(len(body)), body
    finally:
        conn.close()


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/nope",
        "/v2/models",
        "/v2/models/simple/versions/1/explode",
        "/v2/models/simple/versions/1/infer/more",
        "/v3/health/live",
    ],
)
def test_http_unknown_path(server, path):
    status, msg = http_error(server, b"", path=path, method="GET")
    assert status == 404
    assert path in msg, msg


# ------------------------------------------------------------------ size limits
LIMIT = 700  # bytes: a batch-1 request to 'simple' fits (about 400), a batch-8 one (over 1 KiB) does not


@pytest.fixture
def small(serve, demo_repo):
    return serve(demo_repo, max_request_bytes=LIMIT, **QUICK)


def big_simple_feeds() -> dict:
    """More than LIMIT bytes on the wire, a valid request otherwise: 2 inputs x 8 x 16 x 4 bytes = 1 KiB."""
    return simple_feeds(8, seed=1)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_oversized_request_refused(small, flavour):
    c = Client(flavour, small)
    try:
        e = await c.error_of("infer", "simple", [c.input(n, a) for n, a in big_simple_feeds().items()])
        if c.grpc:
            assert e.status() == "StatusCode.RESOURCE_EXHAUSTED", e
        else:
            assert e.status() in ("400", "413"), e
        assert str(LIMIT) in e.message(), e.message()
        # a request under the limit on the same gateway is served
        feeds = simple_feeds(1)
        r = await c.infer("simple", feeds)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])
    finally:
        await c.close()


def test_oversized_http_by_content_length_and_by_chunks(small):
    body = b'{"inputs": [' + b" " * (LIMIT + 100) + b"]}"
    status, msg = http_error(small, body)
    assert status in (400, 413) and str(LIMIT) in msg, msg

    # no Content-Length: chunked transfer, counted as it arrives
    conn = http.client.HTTPConnection(small.http_url, timeout=20)
    try:
        conn.request(
            "POST",
            "/v2/models/simple/infer",
            body=iter([body[i : i + 1000] for i in range(0, len(body), 1000)]),
            encode_chunked=True,
            headers={"Transfer-Encoding": "chunked"},
        )
        resp = conn.getresponse()
        assert resp.status in (400, 413)
        assert str(LIMIT) in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_compressed_request_that_expands_past_the_limit(small):
    body = b'{"inputs": [' + b" " * (LIMIT * 20) + b"]}"
    packed = gzip.compress(body)
    assert len(packed) < LIMIT
    status, msg = http_error(small, packed, {"Content-Encoding": "gzip"})
    assert status in (400, 413) and str(LIMIT) in msg, msg


# ------------------------------------------------------------------ the server survives, and good traffic is untouched
def test_server_serves_after_a_barrage_of_bad_requests(server):
    for body in (b"{", b"[]", b"\x00" * 100, GOOD_JSON[:-5]):
        http_error(server, body)
    http_error(server, GOOD_JSON, {"Inference-Header-Content-Length": "-1"})
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
        for garbage in (b"\xff" * 12, b"\x0a\xff\xff\xff\xff\x0f", b"\x32" * 50):
            with pytest.raises(grpc.RpcError):
                call(garbage, timeout=10)
    assert_still_serving(server)


async def test_good_requests_beside_bad_ones_are_undisturbed(server):
    gclient = Client("grpc.aio", server)
    hclient = Client("http.aio", server)
    channel = grpc.aio.insecure_channel(server.grpc_url)
    raw_infer = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
    session = aiohttp.ClientSession()
    url = f"http://{server.http_url}/v2/models/simple/infer"

    async def good(i):
        c = (gclient, hclient)[i % 2]
        feeds = simple_feeds(1 + i % 8, seed=1000 + i)
        r = await c.infer("simple", feeds, request_id=f"good-{i}")
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), feeds["INPUT0"] - feeds["INPUT1"])
        return "ok"

    async def bad(i):
        kind = i % 5
        if kind == 0:  # wrong shape, gRPC
            a = np.zeros((1, 15), np.int32)
            with pytest.raises(InferenceServerException):
                await gclient.call("infer", "simple", [gclient.input("INPUT0", a), gclient.input("INPUT1", a)])
        elif kind == 1:  # unknown model, HTTP
            with pytest.raises(InferenceServerException):
                await hclient.infer("no_such_model", simple_feeds())
        elif kind == 2:  # garbage protobuf
            with pytest.raises(grpc.aio.AioRpcError):
                await raw_infer(b"\xff" * 16, timeout=10)
        elif kind == 3:  # malformed JSON
            async with session.post(url, data=b"{oops") as resp:
                assert resp.status == 400
        else:  # truncated binary
            async with session.post(
                url, data=GOOD_JSON + b"\x00" * 3, headers={"Inference-Header-Content-Length": str(len(GOOD_JSON) + 99)}
            ) as resp:
                assert resp.status == 400
        return "refused"

    try:
        jobs = []
        for i in range(40):
            jobs.append(good(i))
            jobs.append(bad(i))
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        problems = [o for o in outcomes if isinstance(o, BaseException)]
        assert not problems, problems[:3]
        assert outcomes.count("ok") == 40 and outcomes.count("refused") == 40
    finally:
        await session.close()
        await channel.close()
        await gclient.close()
        await hclient.close()
    assert_still_serving(server)
