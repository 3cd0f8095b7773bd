"""A large JSON body (past 1 MiB) is decoded on a thread, and each input's name, datatype and
shape are checked against the model before its values are read: a 61 MB body whose batch the
model refuses took the event loop for 1.9 s (4.9 s with a `true` in it) before being refused,
0.8 s since (the JSON parse itself). transport/http_app.py, dataplane.PRECHECK_BYTES."""

from __future__ import annotations

import http.client
import json
import time

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


def _special(dtype, n: int):
    """n values of ``dtype`` with NaN, both infinities, -0.0, the extremes and the subnormals among them."""
    import numpy as np

    f = np.finfo(dtype)
    edges = np.array([np.nan, np.inf, -np.inf, -0.0, f.max, f.min, f.smallest_subnormal, -f.tiny], dtype)
    values = np.random.default_rng(1).standard_normal(n).astype(dtype)
    values[: len(edges)] = edges
    return values


@pytest.mark.parametrize("stream", [False, True])
def test_large_typed_contents_come_back_as_sent(tmp_path, serve, stream):
    """Typed gRPC contents past 1 MiB (decoded on a thread, the float fields read as the one packed
    buffer the message holds) give back exactly the values sent, on both calls; an integer field
    past its datatype's range is still refused. The float values were read one Python object at a
    time on the event loop: 12M of them held every other caller 3 to 4 s."""
    import grpc
    import numpy as np
    from onnx import TensorProto
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from batchgate.demo import _save, identity_model

    types = {"FP32": (TensorProto.FLOAT, np.float32), "FP64": (TensorProto.DOUBLE, np.float64)}
    types["INT8"] = (TensorProto.INT8, np.int8)
    for v2, (onnx_type, _) in types.items():
        config = f'max_batch_size: 0\ninput [{{ name: "INPUT" data_type: TYPE_{v2} dims: [-1] }}]\n'
        _save(identity_model(v2.lower(), dtype=onnx_type, shape=("n",)), str(tmp_path), v2.lower(), config=config)
    running = serve(str(tmp_path))
    n = 400_000  # (1.6 MB as FP32)

    def infer(stub, msg):
        if not stream:
            return stub.ModelInfer(msg, timeout=60)
        answer = next(iter(stub.ModelStreamInfer(iter([msg]), timeout=60)))
        if answer.error_message:
            raise AssertionError(answer.error_message)
        return answer.infer_response

    with grpc.insecure_channel(running.grpc_url, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for v2, field in (("FP32", "fp32_contents"), ("FP64", "fp64_contents")):
            sent = _special(types[v2][1], n)
            msg = service_pb2.ModelInferRequest(model_name=v2.lower())
            getattr(msg.inputs.add(name="INPUT", datatype=v2, shape=[n]).contents, field).extend(sent.tolist())
            answer = infer(stub, msg)
            got = np.frombuffer(answer.raw_output_contents[0], types[v2][1])
            assert got.tobytes() == sent.tobytes(), v2  # (bit for bit: NaN, -0.0 and the subnormals too)
        msg = service_pb2.ModelInferRequest(model_name="int8")
        values = [1] * n
        values[-1] = 300
        msg.inputs.add(name="INPUT", datatype="INT8", shape=[n]).contents.int_contents.extend(values)
        if stream:
            answer = next(iter(stub.ModelStreamInfer(iter([msg]), timeout=60)))
            assert "out of range for INT8" in answer.error_message, answer.error_message
        else:
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(msg, timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "out of range for INT8" in e.value.details(), e.value.details()


@pytest.mark.parametrize("protocol", ["grpc", "grpc-stream", "http-json", "http-binary", "http-gzip"])
def test_large_answers_encoded_on_a_thread_come_back_whole(server, protocol):
    """An answer past OFF_LOOP_ELEMENTS (BYTES elements, JSON values) is encoded on a thread, not
    on the event loop (1,000,000 BYTES elements held it ~600 ms): every element comes back, in
    order, on every way of answering."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from batchgate.core.types import OFF_LOOP_ELEMENTS

    n = OFF_LOOP_ELEMENTS + 1000
    sent = np.array([[f"élément {i}".encode() for i in range(n)]], dtype=object)
    if protocol.startswith("grpc"):
        client = grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
        x = grpcclient.InferInput("INPUT", [1, n], "BYTES")
        x.set_data_from_numpy(sent)
        if protocol == "grpc":
            got = client.infer("identity_bytes", [x]).as_numpy("OUTPUT")
        else:
            answers = []
            client.start_stream(callback=lambda result, error: answers.append(error or result))
            client.async_stream_infer("identity_bytes", [x])
            while not answers:
                time.sleep(0.01)
            client.stop_stream()
            got = answers[0].as_numpy("OUTPUT")
    else:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.gateway.http_port}")
        binary = protocol != "http-json"
        x = httpclient.InferInput("INPUT", [1, n], "BYTES")
        x.set_data_from_numpy(sent, binary_data=binary)
        out = httpclient.InferRequestedOutput("OUTPUT", binary_data=binary)
        compression = "gzip" if protocol == "http-gzip" else None
        got = client.infer("identity_bytes", [x], outputs=[out], response_compression_algorithm=compression)
        got = got.as_numpy("OUTPUT")
    assert got.shape == (1, n)
    # (JSON BYTES come back as str)
    assert [v.encode() if isinstance(v, str) else bytes(v) for v in got.reshape(-1)] == list(sent.reshape(-1))
