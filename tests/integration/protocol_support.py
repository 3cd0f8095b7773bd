"""Shared pieces of the protocol tests: one interface over the four tritonclient flavours.

``Client`` wraps ``tritonclient.grpc``, ``tritonclient.grpc.aio``, ``tritonclient.http``
and ``tritonclient.http.aio`` so one async test body drives all four; the sync clients
simply block inside the coroutine (the gateway runs on its own loop in another thread).
Nothing here stands in for server code: every call goes over a real socket.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

FLAVOURS = ("grpc", "grpc.aio", "http", "http.aio")
_MODULES = {"grpc": grpcclient, "grpc.aio": grpcclient_aio, "http": httpclient, "http.aio": httpclient_aio}

# The gRPC status and the HTTP status each error kind must come back with.
STATUS = {
    "NOT_FOUND": ("StatusCode.NOT_FOUND", "404"),
    "INVALID_ARGUMENT": ("StatusCode.INVALID_ARGUMENT", "400"),
    "UNAVAILABLE": ("StatusCode.UNAVAILABLE", "503"),
}


class Client:
    """One tritonclient client of the given flavour, with a uniform async surface."""

    def __init__(self, flavour: str, running):
        self.flavour = flavour
        self.protocol = "grpc" if flavour.startswith("grpc") else "http"
        self.aio = flavour.endswith(".aio")
        self.mod = _MODULES[flavour]
        self.running = running
        url = running.grpc_url if self.protocol == "grpc" else running.http_url
        self.raw = self.mod.InferenceServerClient(url)

    @property
    def grpc(self) -> bool:
        return self.protocol == "grpc"

    async def call(self, method: str, *args, **kwargs):
        result = getattr(self.raw, method)(*args, **kwargs)
        if self.aio:
            result = await result
        return result

    async def as_json(self, method: str, *args, **kwargs):
        """Metadata-style calls as plain dicts (gRPC asks the client for its JSON form)."""
        if self.grpc:
            kwargs["as_json"] = True
        return await self.call(method, *args, **kwargs)

    async def close(self) -> None:
        if self.aio:
            await self.raw.close()
        else:
            self.raw.close()

    def input(self, name: str, array: np.ndarray, datatype: str | None = None, binary: bool = True):
        dt = datatype or np_to_triton_dtype(array.dtype)
        t = self.mod.InferInput(name, list(array.shape), dt)
        if self.grpc:
            t.set_data_from_numpy(array)
        else:
            t.set_data_from_numpy(array, binary_data=binary)
        return t

    def output(self, name: str, binary: bool = True):
        if self.grpc:
            return self.mod.InferRequestedOutput(name)
        return self.mod.InferRequestedOutput(name, binary_data=binary)

    async def infer(self, model: str, feeds: dict, *, binary: bool = True, outputs=None, **kwargs):
        """``feeds``: input name -> array. ``outputs``: names (binary per ``binary``) or ready objects."""
        inputs = [self.input(n, a, binary=binary) for n, a in feeds.items()]
        if outputs is not None:
            outputs = [self.output(o, binary) if isinstance(o, str) else o for o in outputs]
        return await self.call("infer", model, inputs, outputs=outputs, **kwargs)

    async def error_of(self, method: str, *args, **kwargs) -> InferenceServerException:
        """Call ``method`` and return the error it must raise."""
        with pytest.raises(InferenceServerException) as info:
            await self.call(method, *args, **kwargs)
        return info.value

    def status(self, kind: str) -> str:
        """The status string tritonclient reports for an error of ``kind``."""
        grpc_status, http_status = STATUS[kind]
        return grpc_status if self.grpc else http_status


def open_client(flavour: str, running) -> Client:
    return Client(flavour, running)


def int_list(xs) -> list[int]:
    """gRPC's JSON form writes 64-bit integers as strings; compare as numbers."""
    return [int(x) for x in xs]


def onnx_outputs(model_path: str, feeds: dict, names=None) -> dict:
    """Run the model file directly in ONNX Runtime: the reference answer."""
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    wanted = names or [o.name for o in sess.get_outputs()]
    return dict(zip(wanted, sess.run(wanted, feeds)))


def model_file(repo: str, name: str, version: int = 1) -> str:
    return os.path.join(repo, name, str(version), "model.onnx")


def simple_feeds(batch: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "INPUT0": rng.integers(-1000, 1000, (batch, 16), dtype=np.int32),
        "INPUT1": rng.integers(-1000, 1000, (batch, 16), dtype=np.int32),
    }


def as_bytes(v) -> bytes:
    """A BYTES element as bytes (tritonclient gives str for JSON BYTES outputs)."""
    return v.encode() if isinstance(v, str) else bytes(v)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got is not None, "output missing from the response"
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    if want.dtype == object:
        assert [as_bytes(v) for v in got.reshape(-1)] == [as_bytes(v) for v in want.reshape(-1)]
    else:
        assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype}"
        np.testing.assert_array_equal(got, want)


# Settings for the gateways tests start for themselves: no metrics endpoint (its HTTP server
# takes half a second to shut down, and these tests do not read it).
QUICK = {"metrics_port": -1}


def raw_http(running, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One HTTP request with the standard library, for what tritonclient refuses to send.
    Returns (status, lower-cased headers, body)."""
    import http.client

    conn = http.client.HTTPConnection(running.http_url, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# V2 datatype -> (ONNX element type, numpy dtype): every datatype ONNX Runtime serves
ALL_DATATYPES = {
    "BOOL": (onnx.TensorProto.BOOL, np.bool_),
    "UINT8": (onnx.TensorProto.UINT8, np.uint8),
    "UINT16": (onnx.TensorProto.UINT16, np.uint16),
    "UINT32": (onnx.TensorProto.UINT32, np.uint32),
    "UINT64": (onnx.TensorProto.UINT64, np.uint64),
    "INT8": (onnx.TensorProto.INT8, np.int8),
    "INT16": (onnx.TensorProto.INT16, np.int16),
    "INT32": (onnx.TensorProto.INT32, np.int32),
    "INT64": (onnx.TensorProto.INT64, np.int64),
    "FP16": (onnx.TensorProto.FLOAT16, np.float16),
    "FP32": (onnx.TensorProto.FLOAT, np.float32),
    "FP64": (onnx.TensorProto.DOUBLE, np.float64),
    "BYTES": (onnx.TensorProto.STRING, np.object_),
}
