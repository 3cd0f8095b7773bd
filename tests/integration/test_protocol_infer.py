"""Inference through all four tritonclient flavours, checked against ONNX Runtime run
directly on the same model file with the same inputs."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from protocol_support import (
    ALL_DATATYPES,
    FLAVOURS,
    QUICK,
    Client,
    as_bytes,
    assert_same,
    model_file,
    onnx_outputs,
    simple_feeds,
)
from tritonclient.grpc import InferResult as GrpcInferResult
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchgate.demo import _save, identity_model


def dtype_model_name(v2: str) -> str:
    return f"identity_{v2.lower()}"


@pytest.fixture(scope="session")
def dtype_repo(tmp_path_factory) -> str:
    """One identity model per V2 datatype, each batching along its first dimension."""
    repo = str(tmp_path_factory.mktemp("dtype_models"))
    for v2, (onnx_type, _) in ALL_DATATYPES.items():
        name = dtype_model_name(v2)
        _save(identity_model(name, dtype=onnx_type), repo, name, config="max_batch_size: 8\n")
    return repo


def sample(v2: str, json_safe: bool = False) -> np.ndarray:
    """A [2, 5] tensor of ``v2`` that reaches the corners of the type."""
    np_dtype = ALL_DATATYPES[v2][1]
    if v2 == "BOOL":
        return np.array([[True, False, True, True, False], [False, False, True, False, True]])
    if v2 == "BYTES":
        return np.array(
            [["", "plain", "héllo wörld", "日本語 ☃", "x" * 300], ["a b", "\t tab", "", "emoji 🚀", "0"]], dtype=object
        )
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        return np.array(
            [[info.min, info.max, 0, 1, info.max - 1], [info.min + 1, 7, 42, info.max // 3, 100 % (int(info.max) + 1)]],
            dtype=np_dtype,
        )
    info = np.finfo(np_dtype)
    row2 = [np.inf, -np.inf, np.nan, 1.5, -0.0] if not json_safe else [1e-3, -2.5, 3.25, 1.5, -0.0]
    return np.array([[info.min, info.max, info.tiny, 0.1, -1 / 3], row2], dtype=np_dtype)


def reference(repo: str, model: str, feeds: dict) -> dict:
    """ONNX Runtime on the model file; BYTES travel to it as str and come back as bytes."""
    ort_feeds = {}
    for name, arr in feeds.items():
        if arr.dtype == object:
            arr = np.array([v.decode() if isinstance(v, bytes) else v for v in arr.reshape(-1)], dtype=object).reshape(
                arr.shape
            )
        ort_feeds[name] = arr
    outs = onnx_outputs(model_file(repo, model), ort_feeds)
    for name, arr in outs.items():
        if arr.dtype == object:
            outs[name] = np.array([v.encode() for v in arr.reshape(-1)], dtype=object).reshape(arr.shape)
    return outs


@pytest.fixture(params=FLAVOURS)
async def client(request, server):
    c = Client(request.param, server)
    yield c
    await c.close()


@pytest.fixture(params=[f for f in FLAVOURS if f.startswith("http")])
async def http_client(request, server):
    c = Client(request.param, server)
    yield c
    await c.close()


def response_of(client, result):
    """The decoded response: a dict for HTTP, the protobuf for gRPC."""
    return result.get_response()


# ------------------------------------------------------------------ the demo models
@pytest.mark.parametrize("batch", [1, 3, 8])
async def test_simple_matches_onnxruntime(client, demo_repo, batch):
    feeds = simple_feeds(batch, seed=batch)
    result = await client.infer("simple", feeds)
    want = reference(demo_repo, "simple", feeds)
    assert set(want) == {"OUTPUT0", "OUTPUT1"}
    for name, arr in want.items():
        assert_same(result.as_numpy(name), arr)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])


@pytest.mark.parametrize("batch", [1, 4])
async def test_classifier_matches_onnxruntime(client, demo_repo, batch):
    rng = np.random.default_rng(batch)
    feeds = {"features": rng.standard_normal((batch, 4)).astype(np.float32)}
    result = await client.infer("classifier", feeds)
    want = reference(demo_repo, "classifier", feeds)["probabilities"]
    got = result.as_numpy("probabilities")
    assert got.shape == (batch, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


async def test_identity_bytes_matches_onnxruntime(client, demo_repo):
    strings = ["", "ascii", "héllo", "日本語テキスト", "emoji 🚀🚀", "", "x" * 1000, "nul\x00inside"]
    feeds = {"INPUT": np.array([s.encode() for s in strings], dtype=object).reshape(2, 4)}
    result = await client.infer("identity_bytes", feeds)
    want = reference(demo_repo, "identity_bytes", feeds)["OUTPUT"]
    got = result.as_numpy("OUTPUT")
    assert_same(got, want)
    assert [bytes(v).decode() for v in got.reshape(-1)] == strings


async def test_identity_bytes_json(http_client, demo_repo):
    strings = ["", "ünïcödé", "plain", "☃"]
    feeds = {"INPUT": np.array(strings, dtype=object).reshape(1, 4)}
    result = await http_client.infer("identity_bytes", feeds, binary=False, outputs=["OUTPUT"])
    entry = response_of(http_client, result)["outputs"][0]
    assert entry["data"] == strings
    assert [as_bytes(v).decode() for v in result.as_numpy("OUTPUT").reshape(-1)] == strings


# ------------------------------------------------------------------ every datatype
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_every_datatype_round_trips(serve, dtype_repo, flavour):
    running = serve(dtype_repo, **QUICK)
    client = Client(flavour, running)
    modes = [True] if flavour.startswith("grpc") else [True, False]  # HTTP: binary, then JSON
    failures = []
    try:
        for binary in modes:
            for v2 in ALL_DATATYPES:
                name = dtype_model_name(v2)
                arr = sample(v2, json_safe=not binary)
                try:
                    result = await client.infer(name, {"INPUT": arr}, binary=binary, outputs=["OUTPUT"])
                    got = result.as_numpy("OUTPUT")
                    want = reference(dtype_repo, name, {"INPUT": arr})["OUTPUT"]
                    assert_same(got, want)
                    out_meta = response_of(client, result)
                    dt = out_meta.outputs[0].datatype if client.grpc else out_meta["outputs"][0]["datatype"]
                    assert dt == v2
                except Exception as e:  # collect: one run names every datatype that fails
                    failures.append(f"{v2} ({'binary' if binary else 'JSON'}): {type(e).__name__}: {e}")
    finally:
        await client.close()
    assert not failures, "\n".join(failures)


# gRPC typed contents: for every datatype that has a typed field.
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def typed_request(model: str, v2: str, arr: np.ndarray) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model, id=f"typed-{v2}")
    t = req.inputs.add(name="INPUT", datatype=v2, shape=list(arr.shape))
    values = arr.reshape(-1).tolist()
    if v2 == "BYTES":
        values = [v if isinstance(v, bytes) else v.encode() for v in values]
    getattr(t.contents, TYPED_FIELDS[v2]).extend(values)
    return req


def test_grpc_typed_contents_every_datatype(serve, dtype_repo):
    running = serve(dtype_repo, **QUICK)
    with grpc.insecure_channel(running.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for v2 in TYPED_FIELDS:
            arr = sample(v2)
            if v2 == "BYTES":
                arr = np.array([v.encode() for v in arr.reshape(-1)], dtype=object).reshape(arr.shape)
            resp = stub.ModelInfer(typed_request(dtype_model_name(v2), v2, arr), timeout=10)
            assert resp.id == f"typed-{v2}"
            assert len(resp.raw_output_contents) == 1, f"{v2}: answer must use raw_output_contents"
            assert not resp.outputs[0].HasField("contents")
            assert list(resp.outputs[0].shape) == list(arr.shape)
            got = GrpcInferResult(resp).as_numpy("OUTPUT")
            want = reference(dtype_repo, dtype_model_name(v2), {"INPUT": arr})["OUTPUT"]
            assert_same(got, want)


def test_a_bool_byte_other_than_0_or_1_is_refused_on_both_protocols(serve, dtype_repo):
    """Raw BOOL bytes (HTTP binary, gRPC raw contents) are 0 or 1: a 2 passed before as a numpy
    True yet reached the model as the byte 2, and ONNX Runtime's Not of it was true as well."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    running = serve(dtype_repo, **QUICK)
    bad = np.array([[0, 1, 2, 1]], np.uint8).view(np.bool_)  # numpy keeps the byte 2 under the view
    for mod, url, status in (
        (httpclient, running.http_url, "400"),
        (grpcclient, running.grpc_url, "StatusCode.INVALID_ARGUMENT"),
    ):
        inp = mod.InferInput("INPUT", [1, 4], "BOOL")
        inp.set_data_from_numpy(bad)  # binary on HTTP, raw contents on gRPC
        with pytest.raises(InferenceServerException) as e:
            mod.InferenceServerClient(url).infer(dtype_model_name("BOOL"), [inp])
        assert str(e.value.status()) == status
        assert "BOOL element 2 is the byte 2" in e.value.message()
        good = mod.InferInput("INPUT", [1, 4], "BOOL")
        good.set_data_from_numpy(bad.view(np.uint8) == 1)
        got = mod.InferenceServerClient(url).infer(dtype_model_name("BOOL"), [good]).as_numpy("OUTPUT")
        assert got.tolist() == [[False, True, False, True]]


def test_grpc_typed_contents_simple(server, demo_repo):
    feeds = simple_feeds(2, seed=5)
    req = service_pb2.ModelInferRequest(model_name="simple", model_version="1")
    for name, arr in feeds.items():
        t = req.inputs.add(name=name, datatype="INT32", shape=list(arr.shape))
        t.contents.int_contents.extend(arr.reshape(-1).tolist())
    req.outputs.add(name="OUTPUT1")
    with grpc.insecure_channel(server.grpc_url) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    assert [o.name for o in resp.outputs] == ["OUTPUT1"]
    assert resp.model_name == "simple" and resp.model_version == "1"
    got = np.frombuffer(resp.raw_output_contents[0], dtype="<i4").reshape(2, 16)
    np.testing.assert_array_equal(got, reference(demo_repo, "simple", feeds)["OUTPUT1"])


# ------------------------------------------------------------------ request shapes and options
async def test_requested_output_subset(client, demo_repo):
    feeds = simple_feeds(2, seed=11)
    result = await client.infer("simple", feeds, outputs=["OUTPUT1"])
    assert result.as_numpy("OUTPUT0") is None
    assert_same(result.as_numpy("OUTPUT1"), reference(demo_repo, "simple", feeds)["OUTPUT1"])
    resp = response_of(client, result)
    names = [o.name for o in resp.outputs] if client.grpc else [o["name"] for o in resp["outputs"]]
    assert names == ["OUTPUT1"]


async def test_requested_outputs_in_any_order(client, demo_repo):
    feeds = simple_feeds(1, seed=12)
    result = await client.infer("simple", feeds, outputs=["OUTPUT1", "OUTPUT0"])
    want = reference(demo_repo, "simple", feeds)
    for name in ("OUTPUT0", "OUTPUT1"):
        assert_same(result.as_numpy(name), want[name])


@pytest.mark.parametrize("in_binary,out_binary", [(False, False), (True, False), (False, True)])
async def test_http_json_and_binary_tensors(http_client, demo_repo, in_binary, out_binary):
    feeds = simple_feeds(2, seed=13)
    outputs = [http_client.output("OUTPUT0", out_binary), http_client.output("OUTPUT1", out_binary)]
    result = await http_client.infer("simple", feeds, binary=in_binary, outputs=outputs)
    resp = response_of(http_client, result)
    for o in resp["outputs"]:
        if out_binary:
            assert "data" not in o and o["parameters"]["binary_data_size"] == 2 * 16 * 4
        else:
            assert "data" in o and len(o["data"]) == 32
    want = reference(demo_repo, "simple", feeds)
    for name in ("OUTPUT0", "OUTPUT1"):
        assert_same(result.as_numpy(name), want[name])


async def test_http_mixed_binary_and_json(http_client, demo_repo):
    feeds = simple_feeds(3, seed=14)
    inputs = [
        http_client.input("INPUT0", feeds["INPUT0"], binary=True),
        http_client.input("INPUT1", feeds["INPUT1"], binary=False),
    ]
    outputs = [http_client.output("OUTPUT0", binary=False), http_client.output("OUTPUT1", binary=True)]
    result = await http_client.call("infer", "simple", inputs, outputs=outputs)
    by_name = {o["name"]: o for o in response_of(http_client, result)["outputs"]}
    assert "data" in by_name["OUTPUT0"]
    assert by_name["OUTPUT1"]["parameters"]["binary_data_size"] == 3 * 16 * 4
    want = reference(demo_repo, "simple", feeds)
    for name in ("OUTPUT0", "OUTPUT1"):
        assert_same(result.as_numpy(name), want[name])


async def test_request_id_round_trip(client):
    result = await client.infer("simple", simple_feeds(1), request_id="req-Ω-42")
    resp = response_of(client, result)
    assert (resp.id if client.grpc else resp["id"]) == "req-Ω-42"
    model = resp.model_name if client.grpc else resp["model_name"]
    version = resp.model_version if client.grpc else resp["model_version"]
    assert (model, version) == ("simple", "1")


async def test_no_request_id_means_none_back(client):
    result = await client.infer("simple", simple_feeds(1))
    resp = response_of(client, result)
    assert (resp.id if client.grpc else resp.get("id", "")) == ""


async def test_explicit_version(client, demo_repo):
    feeds = simple_feeds(1, seed=3)
    result = await client.infer("simple", feeds, model_version="1")
    assert_same(result.as_numpy("OUTPUT1"), reference(demo_repo, "simple", feeds)["OUTPUT1"])


async def test_priority_and_timeout_accepted(client, demo_repo):
    feeds = simple_feeds(2, seed=21)
    result = await client.infer("simple", feeds, priority=1, timeout=30_000_000)
    want = reference(demo_repo, "simple", feeds)
    assert_same(result.as_numpy("OUTPUT0"), want["OUTPUT0"])
    result = await client.infer("simple", feeds, priority=0, timeout=0)
    assert_same(result.as_numpy("OUTPUT1"), want["OUTPUT1"])


async def test_custom_parameters_accepted(client):
    result = await client.infer("simple", simple_feeds(1), parameters={"tag": "abc", "n": 3, "flag": True})
    assert result.as_numpy("OUTPUT0").shape == (1, 16)


async def test_many_concurrent_requests_answer_their_own_caller(server, demo_repo):
    """gRPC and HTTP aio requests in flight together each get their own answer."""
    import asyncio

    clients = [Client("grpc.aio", server), Client("http.aio", server)]
    try:

        async def one(i):
            c = clients[i % 2]
            feeds = simple_feeds(1 + i % 4, seed=100 + i)
            result = await c.infer("simple", feeds, request_id=f"c{i}")
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), feeds["INPUT0"] - feeds["INPUT1"])
            resp = result.get_response()
            assert (resp.id if c.grpc else resp["id"]) == f"c{i}"

        await asyncio.gather(*(one(i) for i in range(40)))
    finally:
        for c in clients:
            await c.close()


def test_http_keep_alive_requests_are_not_held_back(server):
    import statistics
    import time

    c = Client("http", server)
    try:
        feeds = simple_feeds(1)
        inputs = [c.input(n, a) for n, a in feeds.items()]
        c.raw.infer("simple", inputs)  # connection made
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            c.raw.infer("simple", inputs)
            times.append(time.perf_counter() - t0)
    finally:
        c.raw.close()
    # a 16-element add on loopback takes about a millisecond; 40 ms is the delayed-ACK timer
    assert statistics.median(times) < 0.025, [round(t * 1000, 1) for t in times]


def test_json_tensors_carry_nan_and_infinities_both_ways(tmp_path, serve):
    """JSON has no NaN or infinity; Triton reads and writes the tokens NaN, Infinity and -Infinity,
    as tritonclient (Python's json) sends and reads them (they were refused in, and null out)."""
    import tritonclient.http as httpclient
    from onnx import TensorProto

    _save(identity_model("same", TensorProto.FLOAT), str(tmp_path), "same", config="max_batch_size: 4\n")
    running = serve(str(tmp_path))
    c = httpclient.InferenceServerClient(running.http_url)
    x = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
    inp = httpclient.InferInput("INPUT", [1, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    got = c.infer("same", [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT", binary_data=False)])
    np.testing.assert_array_equal(got.as_numpy("OUTPUT"), x)  # (NaN equals NaN here)


@pytest.mark.parametrize("algorithm", ("gzip", "deflate"))
def test_grpc_compressed_requests_small_and_large(server, algorithm):
    """tritonclient's gRPC ``compression_algorithm``, on ModelInfer and on a stream: a request
    small enough to be inflated as it arrives, and one large enough to be inflated on a thread
    (the h2 engine: past 4 KiB compressed), each answered as it is uncompressed."""
    import queue

    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.grpc_url)
    rng = np.random.default_rng(5)
    answers: queue.Queue = queue.Queue()
    for rows in (1, 64):  # 1 KB and 64 KB of random floats
        inp = grpcclient.InferInput("input", [rows, 256], "FP32")
        inp.set_data_from_numpy(rng.standard_normal((rows, 256)).astype(np.float32))
        want = c.infer("mlp", [inp]).as_numpy("output")
        got = c.infer("mlp", [inp], compression_algorithm=algorithm).as_numpy("output")
        np.testing.assert_array_equal(got, want)
        c.start_stream(lambda result, error: answers.put((result, error)), compression_algorithm=algorithm)
        try:
            for _ in range(3):
                c.async_stream_infer("mlp", [inp])
            for _ in range(3):
                result, error = answers.get(timeout=30)
                assert error is None, error
                np.testing.assert_array_equal(result.as_numpy("output"), want)
        finally:
            c.stop_stream()
    c.close()
