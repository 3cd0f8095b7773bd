"""A large JSON body (past 1 MiB) is decoded on a thread, and each input's name, datatype and
shape are checked against the model before its values are read: a 61 MB body whose batch the
model refuses took the event loop for 1.9 s (4.9 s with a `true` in it) before being refused,
0.8 s since (the JSON parse itself). transport/http_app.py, dataplane.PRECHECK_BYTES."""

from __future__ import annotations

import http.client
import json

import pytest


def post(port: int, model: str, doc: dict) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", f"/v2/models/{model}/infer", json.dumps(doc).encode(), {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


PAD = {"pad": "p" * (2 << 20)}  # (a body past the 1 MiB at which decoding moves to a thread)


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        ({"name": "input", "datatype": "FP32", "shape": [120000, 256]}, "batch size 120000 must be between 1 and 64"),
        ({"name": "input", "datatype": "INT64", "shape": [1, 256]}, "has datatype INT64, but model 'mlp' expects FP32"),
        ({"name": "nope", "datatype": "FP32", "shape": [1, 256]}, "model 'mlp' has no input 'nope'"),
        ({"name": "input", "datatype": "FP32", "shape": [1, 255]}, "has shape [1, 255], but model 'mlp' expects"),
    ],
)
def test_a_large_body_the_model_refuses_is_refused_before_its_values_are_read(server, tensor, words):
    # values that could not be read at all: only a check before them names the shape
    doc = {"inputs": [{**tensor, "data": ["not a number"]}], "parameters": PAD}
    status, answer = post(server.gateway.http_port, "mlp", doc)
    assert status == 400 and words in answer["error"], answer


def test_a_large_body_is_answered(server):
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 256], "data": [0.5] * 512}], "parameters": PAD}
    status, answer = post(server.gateway.http_port, "mlp", doc)
    assert status == 200 and answer["outputs"][0]["shape"] == [2, 16], answer


def test_a_large_grpc_request_the_model_refuses_is_refused_before_its_values_are_read(server):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    msg = service_pb2.ModelInferRequest(model_name="mlp")
    t = msg.inputs.add(name="input", datatype="FP32", shape=[120000, 256])
    t.contents.fp32_contents.extend([0.0] * 300_000)  # 1.2 MB: too few values, but read first they would be named
    with grpc.insecure_channel(server.grpc_url) as channel, pytest.raises(grpc.RpcError) as e:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(msg, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch size 120000 must be between 1 and 64" in e.value.details(), e.value.details()
