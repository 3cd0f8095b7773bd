"""Every V2 datatype, at the edges of its values and in an empty tensor, sent the same way
through every path a request can take: gRPC typed ``contents``, gRPC ``raw_input_contents``,
HTTP JSON and HTTP binary (answered both ways), and system shared memory over both protocols.
Every path must give back the same bytes, datatype and shape as were sent (identity models run
by ONNX Runtime); one that casts, wraps or rounds differs from the others.
"""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from protocol_support import ALL_DATATYPES, QUICK
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from batchgate.demo import _save, identity_model

# Typed-contents fields, written out here as the protocol names them (an oracle independent of
# the codec's own table); FP16 has none.
TYPED = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def model(v2: str) -> str:
    return f"edge_{v2.lower()}"


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """Identity models that do not batch (so an empty first dimension is a valid shape)."""
    from gateway_support import start_gateway

    repo = str(tmp_path_factory.mktemp("edge_models"))
    for v2, (onnx_type, _) in ALL_DATATYPES.items():
        cfg_type = "TYPE_STRING" if v2 == "BYTES" else f"TYPE_{v2}"
        config = (
            "max_batch_size: 0\n"
            f'input [{{ name: "INPUT" data_type: {cfg_type} dims: [-1, -1] }}]\n'
            f'output [{{ name: "OUTPUT" data_type: {cfg_type} dims: [-1, -1] }}]\n'
        )
        _save(identity_model(model(v2), dtype=onnx_type, shape=("a", "b")), repo, model(v2), config=config)
    r = start_gateway(repo, **QUICK)
    yield r
    r.stop()


def edges(v2: str) -> np.ndarray:
    """A [2, 4] tensor at the corners of ``v2``: the integer bounds (UINT64 past 2**63), NaN,
    both infinities, -0.0, the largest and smallest finite values and the subnormals, empty
    strings and strings holding NUL."""
    dt = ALL_DATATYPES[v2][1]
    if v2 == "BOOL":
        return np.array([[True, False, True, False], [False, False, True, True]])
    if v2 == "BYTES":
        return np.array([[b"", b"a\x00b", "é✓".encode(), b"\x00"], [b" ", b"", b"x" * 300, b"0"]], dtype=object)
    if np.issubdtype(dt, np.integer):
        i = np.iinfo(dt)
        return np.array([[i.min, i.max, 0, i.max - 1], [i.min + 1, 1, i.max // 2 + 1, 7]], dtype=dt)
    f = np.finfo(dt)
    tiny = f.smallest_subnormal
    return np.array([[np.nan, np.inf, -np.inf, -0.0], [f.max, f.min, tiny, -tiny]], dtype=dt)


def empty(v2: str) -> np.ndarray:
    return np.empty((0, 4), dtype=ALL_DATATYPES[v2][1])


def grpc_raw(r, v2, arr):
    inp = grpcclient.InferInput("INPUT", list(arr.shape), v2)
    inp.set_data_from_numpy(arr)
    res = grpcclient.InferenceServerClient(r.grpc_url).infer(model(v2), [inp])
    return res.as_numpy("OUTPUT"), res.get_output("OUTPUT").datatype


def grpc_typed(r, v2, arr):
    req = service_pb2.ModelInferRequest(model_name=model(v2))
    t = req.inputs.add(name="INPUT", datatype=v2, shape=list(arr.shape))
    getattr(t.contents, TYPED[v2]).extend(arr.reshape(-1).tolist())
    with grpc.insecure_channel(r.grpc_url) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    return grpcclient.InferResult(resp).as_numpy("OUTPUT"), resp.outputs[0].datatype


def http(r, v2, arr, binary_in: bool, binary_out: bool):
    inp = httpclient.InferInput("INPUT", list(arr.shape), v2)
    inp.set_data_from_numpy(arr, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("OUTPUT", binary_data=binary_out)
    res = httpclient.InferenceServerClient(r.http_url).infer(model(v2), [inp], outputs=[out])
    return res.as_numpy("OUTPUT"), res.get_output("OUTPUT")["datatype"]


def shared(r, v2, arr, mod, url):
    """The input read from one region, the output written to another."""
    data = serialize_byte_tensor(arr).item() if v2 == "BYTES" and arr.size else arr.tobytes()
    names, handles = [], []
    try:
        for size in (max(len(data), 1), max(2 * len(data), 1)):
            key = f"/batchgate_{uuid.uuid4().hex[:12]}"
            handles.append(shm.create_shared_memory_region(key[1:], key, size))
            names.append((key[1:], key, size))
        if data:
            shm.set_shared_memory_region(handles[0], [np.frombuffer(data, np.uint8)])
        client = mod.InferenceServerClient(url)
        for name, key, size in names:
            client.register_system_shared_memory(name, key, size)
        inp = mod.InferInput("INPUT", list(arr.shape), v2)
        inp.set_shared_memory(names[0][0], len(data))
        out = mod.InferRequestedOutput("OUTPUT")
        out.set_shared_memory(names[1][0], names[1][2])
        entry = client.infer(model(v2), [inp], outputs=[out]).get_output("OUTPUT")
        datatype = entry.datatype if mod is grpcclient else entry["datatype"]
        shape = list(entry.shape) if mod is grpcclient else entry["shape"]
        if v2 == "BYTES" and 0 in shape:
            got = np.empty(shape, dtype=object)
        else:
            dtype = np.object_ if v2 == "BYTES" else arr.dtype
            got = np.array(shm.get_contents_as_numpy(handles[1], dtype, shape), copy=True)  # before it goes
        for name, _, _ in names:
            client.unregister_system_shared_memory(name)
        return got, datatype
    finally:
        for h in handles:
            shm.destroy_shared_memory_region(h)


def same(got: np.ndarray, want: np.ndarray) -> bool:
    if got.shape != want.shape:
        return False
    if want.dtype == object:
        as_bytes = [v.encode() if isinstance(v, str) else bytes(v) for v in got.reshape(-1)]
        return as_bytes == list(want.reshape(-1))
    return got.dtype == want.dtype and got.tobytes() == want.tobytes()  # bit for bit: -0.0, NaN


@pytest.mark.parametrize("v2", list(ALL_DATATYPES))
def test_every_path_gives_back_the_same_bytes(running, v2):
    failures = []
    for arr in (edges(v2), empty(v2)):
        paths = {
            "grpc raw": lambda a=arr: grpc_raw(running, v2, a),
            "http binary in, binary out": lambda a=arr: http(running, v2, a, True, True),
            "http binary in, JSON out": lambda a=arr: http(running, v2, a, True, False),
            "shm over grpc": lambda a=arr: shared(running, v2, a, grpcclient, running.grpc_url),
            "shm over http": lambda a=arr: shared(running, v2, a, httpclient, running.http_url),
        }
        if v2 in TYPED:
            paths["grpc typed"] = lambda a=arr: grpc_typed(running, v2, a)
        if v2 != "BYTES" or arr.size == 0:  # (tritonclient writes JSON strings only from text)
            paths["http JSON in, JSON out"] = lambda a=arr: http(running, v2, a, False, False)
            paths["http JSON in, binary out"] = lambda a=arr: http(running, v2, a, False, True)
        for path, call in paths.items():
            try:
                got, datatype = call()
            except Exception as e:  # collect: one run names every path that fails
                failures.append(f"{path} {list(arr.shape)}: {type(e).__name__}: {e}")
                continue
            if datatype != v2 or not same(got, arr):
                failures.append(f"{path} {list(arr.shape)}: answered {datatype} {got!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("v2", list(ALL_DATATYPES))
def test_metadata_names_the_datatype_and_shape_on_both_protocols(running, v2):
    h = httpclient.InferenceServerClient(running.http_url).get_model_metadata(model(v2))
    g = grpcclient.InferenceServerClient(running.grpc_url).get_model_metadata(model(v2))
    for entry in (*h["inputs"], *h["outputs"]):
        assert (entry["datatype"], entry["shape"]) == (v2, [-1, -1])
    for entry in (*g.inputs, *g.outputs):
        assert (entry.datatype, list(entry.shape)) == (v2, [-1, -1])
