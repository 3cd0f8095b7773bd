"""Requests, built and encoded before the load starts, so encoding never slows the generator.

Inputs come from the model's V2 metadata (shapes, datatypes; ``-1`` becomes the batch size
in the first dimension and ``dynamic_size`` elsewhere), or from a file: ``.npz`` (one array
per input, full shapes: one request) or JSON lines (one V2 JSON request body per line).

Each request is encoded for the transport it will travel on: a serialized
``ModelInferRequest`` (tensors as ``raw_input_contents``) for gRPC, a V2 JSON body, or a
body in the binary tensor extension (JSON header, then the raw bytes) for HTTP. Every
request carries ``x-batchgate-synthetic: 1`` (gRPC metadata or HTTP header); the gateway
marks such requests (``InferRequest.synthetic``), so features that keep statistics of real
traffic can leave them out.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from .secure import Secure

SYNTHETIC_HEADER = "x-batchgate-synthetic"
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
GRPC_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"

_NP = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


class PayloadError(ValueError):
    """The payload cannot be built; the message says why."""


@dataclass
class Encoded:
    """What a worker sends: the body (and, for HTTP, its headers)."""

    body: bytes
    headers: dict[str, str]


# How long the model's metadata may take to come back, connecting included. With no bound, a
# gRPC target that took the connection and never answered held the run at its start for good
# (tritonclient's gRPC call has no deadline unless given one; its HTTP client waits 60 s).
METADATA_TIMEOUT_S = 10.0


def model_inputs(
    target: str,
    protocol: str,
    model: str,
    version: str = "",
    secure: Secure | None = None,
    timeout_s: float | None = None,
) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every input, from the server's V2 metadata (waiting at most
    ``timeout_s``, by default METADATA_TIMEOUT_S)."""
    timeout_s = METADATA_TIMEOUT_S if timeout_s is None else timeout_s
    secure = secure or Secure()
    options = secure.tritonclient_options(protocol)
    headers = (dict(secure.metadata()) if protocol == "grpc" else secure.headers()) or None  # (gRPC's: lower case)
    c: Any = None
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client

            c = client.InferenceServerClient(target, **options)
            meta = c.get_model_metadata(model, version, headers=headers, as_json=True, client_timeout=timeout_s)
        else:
            import tritonclient.http as client

            c = client.InferenceServerClient(target, connection_timeout=timeout_s, network_timeout=timeout_s, **options)
            meta = c.get_model_metadata(model, version, headers=headers)
    except Exception as e:  # noqa: BLE001 - tritonclient raises its own type, or socket errors
        raise PayloadError(
            f"cannot read the metadata of model '{model}' from {target} over {protocol} "
            f"(waited at most {timeout_s:g} s): {e}"
        ) from None
    finally:
        if c is not None:
            c.close()
    return [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]]


JSON_VALUE_BYTES = 24  # a number as V2 JSON text takes at most about this much ("-0.12345678901234567, ")
BYTES_VALUE_BYTES = 8  # a made-up BYTES value: its 4-byte length and "x" and up to three digits


def _full_shape(shape: list[int], batch_size: int, dynamic_size: int) -> list[int]:
    return [batch_size if i == 0 and d == -1 else (dynamic_size if d == -1 else d) for i, d in enumerate(shape)]


def request_bytes(inputs, batch_size: int, dynamic_size: int, as_json: bool) -> int:
    """About how large one generated request is, as it is sent (JSON counted as text)."""
    total = 0
    for _, dt, shape in inputs:
        values = math.prod(max(0, d) for d in _full_shape(shape, batch_size, dynamic_size))
        if dt == "BYTES":
            each = BYTES_VALUE_BYTES
        elif as_json:
            each = JSON_VALUE_BYTES
        else:
            each = np.dtype(_NP.get(dt, np.uint8)).itemsize
        total += values * each
    return total


def check_size(inputs, batch_size: int, dynamic_size: int, count: int, as_json: bool, limit: int) -> None:
    """Refuse requests that would together take more than ``limit`` bytes, before any is made."""
    one = request_bytes(inputs, batch_size, dynamic_size, as_json)
    if one > limit:
        raise PayloadError(
            f"batch-size {batch_size:,} (dynamic-size {dynamic_size:,}) makes each request about {_size(one)}, "
            f"more than the {_size(limit)} all generated requests may take: a smaller batch-size"
        )
    if one * count > limit:
        raise PayloadError(
            f"payloads {count:,} of about {_size(one)} each make {_size(one * count)}, "
            f"more than the {_size(limit)} all generated requests may take: fewer payloads"
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""  # (not reached)


def generate(inputs, batch_size: int, dynamic_size: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` distinct requests of random data shaped as the metadata says."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        req = {}
        for name, dt, shape in inputs:
            full = _full_shape(shape, batch_size, dynamic_size)
            kind = _NP.get(dt)
            if kind is None:
                raise PayloadError(f"input '{name}' has datatype {dt}, which the load generator cannot make up")
            if dt == "BYTES":
                arr = np.array(
                    [f"x{v}".encode() for v in rng.integers(0, 1000, int(np.prod(full)))], dtype=object
                ).reshape(full)
            elif dt == "BOOL":
                arr = rng.random(full) < 0.5
            elif np.issubdtype(kind, np.integer):
                arr = rng.integers(0, 8, full).astype(kind)
            else:
                arr = rng.standard_normal(full).astype(kind)
            req[name] = arr
        out.append(req)
    return out


MAX_DATA_LINE = 64 << 20  # one JSON request of a --data file


_READ_KEYS = ("inputs", "id")  # of a JSON line's request: what the load test sends (an id is its own)


def from_file(path: str, inputs, limit: int) -> list[dict[str, np.ndarray]]:
    """The requests of a ``--data`` file: an ``.npz`` of one request's arrays, or JSON lines of
    V2 requests; together at most ``limit`` bytes (each worker holds a copy)."""
    types = {name: dt for name, dt, _ in inputs}
    try:  # (an .npz is a zip: what its arrays take once read, before they are)
        size = sum(i.file_size for i in zipfile.ZipFile(path).infolist()) if path.endswith(".npz") else 0
        size = max(size, os.path.getsize(path))
    except (OSError, zipfile.BadZipFile) as e:
        raise PayloadError(f"{path}: cannot be read: {e}") from None
    if size > limit:
        raise PayloadError(f"{path} holds {_size(size)}, more than the {_size(limit)} the requests may take")
    if path.endswith(".npz"):
        data = np.load(path, allow_pickle=False)
        missing = [n for n in types if n not in data.files]
        if missing:
            raise PayloadError(f"{path}: no array for input(s) {', '.join(missing)}")
        request = {}
        for n in types:
            try:  # (an array of Python objects, the usual form of a list of bytes, is pickled)
                request[n] = _cast(data[n], types[n])
            except ValueError as e:
                hint = " (save BYTES as a bytes array, np.array([...], dtype=bytes), or use JSON lines)"
                hint = hint if "pickle" in str(e) else ""
                raise PayloadError(f"{path}: input '{n}' cannot be read: {e}{hint}") from None
        return [request]
    requests = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if len(line) > MAX_DATA_LINE:  # (its JSON, parsed into Python objects, takes ten times that)
                raise PayloadError(f"{path}:{lineno}: a request longer than {_size(MAX_DATA_LINE)}")
            try:
                body = json.loads(line)
            except ValueError as e:
                raise PayloadError(f"{path}:{lineno}: not a V2 JSON request ({e})") from None
            ignored = sorted(k for k in body if k not in _READ_KEYS) if isinstance(body, dict) else []
            if ignored:  # (they were dropped without a word: a test of other requests than the file's)
                raise PayloadError(
                    f"{path}:{lineno}: {', '.join(repr(k[:64]) for k in ignored[:4])}: the load test sends a "
                    "request's inputs only (outputs, parameters and the rest are not sent); remove them"
                )
            try:
                req = {}
                for t in body["inputs"]:
                    arr: np.ndarray = np.asarray(
                        t["data"], dtype=object if t["datatype"] == "BYTES" else _NP[t["datatype"]]
                    )
                    req[t["name"]] = _cast(arr.reshape(t["shape"]), t["datatype"])
            except (ValueError, KeyError, TypeError) as e:
                raise PayloadError(f"{path}:{lineno}: not a V2 JSON request ({e})") from None
            requests.append(req)
    if not requests:
        raise PayloadError(f"{path}: no requests in it")
    return requests


def _cast(arr: np.ndarray, dt: str) -> np.ndarray:
    if dt == "BYTES":
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in arr.ravel()], dtype=object).reshape(
            arr.shape
        )
    return np.ascontiguousarray(arr.astype(_NP[dt]))


def _raw(arr: np.ndarray, dt: str) -> bytes:
    if dt == "BYTES":
        return b"".join(len(v).to_bytes(4, "little") + v for v in arr.ravel())
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def encode_grpc(model: str, version: str, request: dict[str, np.ndarray], types: dict[str, str]) -> Encoded:
    from tritonclient.grpc import service_pb2 as pb

    msg = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, arr in request.items():
        msg.inputs.add(name=name, datatype=types[name], shape=arr.shape)
        msg.raw_input_contents.append(_raw(arr, types[name]))
    return Encoded(msg.SerializeToString(), {SYNTHETIC_HEADER: "1"})


def encode_http(request: dict[str, np.ndarray], types: dict[str, str], binary: bool) -> Encoded:
    headers = {"Content-Type": "application/json", SYNTHETIC_HEADER: "1"}
    if not binary:
        body = {
            "inputs": [
                {
                    "name": n,
                    "shape": list(a.shape),
                    "datatype": types[n],
                    "data": [v.decode() if isinstance(v, bytes) else v for v in a.ravel().tolist()],
                }
                for n, a in request.items()
            ]
        }
        return Encoded(json.dumps(body).encode(), headers)
    raws = [_raw(a, types[n]) for n, a in request.items()]
    header = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": types[n], "parameters": {"binary_data_size": len(r)}}
                for (n, a), r in zip(request.items(), raws)
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
        SYNTHETIC_HEADER: "1",
    }
    return Encoded(header + b"".join(raws), headers)


def with_id(body: bytes, request_id: str) -> bytes:
    """A serialized ModelInferRequest with its ``id`` set: protobuf merges concatenated
    messages, so the id field is simply put in front (no re-encoding per request)."""
    raw = request_id.encode()
    return b"\x1a" + _varint(len(raw)) + raw + body  # field 3 (id), wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
