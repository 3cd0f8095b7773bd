"""Tensors, requests and responses as the gateway sees them, whatever the wire.

One table (:data:`DATATYPES`) maps each V2 datatype name to its numpy dtype,
its ONNX tensor type string, its ``model_config`` enum name and its size.
BYTES tensors are numpy ``object`` arrays of ``bytes``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import invalid


@dataclass(frozen=True, slots=True)
class DataType:
    v2: str  # V2 protocol name, e.g. "FP32"
    np_dtype: np.dtype  # little-endian numpy dtype (object for BYTES)
    onnx: str  # onnxruntime type string, e.g. "tensor(float)"
    config: str  # model_config DataType enum name, e.g. "TYPE_FP32"
    itemsize: int  # bytes per element; 0 = variable (BYTES)


def _dt(v2: str, np_name: str, onnx: str, config: str, itemsize: int) -> DataType:
    return DataType(v2, np.dtype(np_name), onnx, config, itemsize)


DATATYPES: dict[str, DataType] = {
    d.v2: d
    for d in (
        _dt("BOOL", "bool", "tensor(bool)", "TYPE_BOOL", 1),
        _dt("UINT8", "<u1", "tensor(uint8)", "TYPE_UINT8", 1),
        _dt("UINT16", "<u2", "tensor(uint16)", "TYPE_UINT16", 2),
        _dt("UINT32", "<u4", "tensor(uint32)", "TYPE_UINT32", 4),
        _dt("UINT64", "<u8", "tensor(uint64)", "TYPE_UINT64", 8),
        _dt("INT8", "<i1", "tensor(int8)", "TYPE_INT8", 1),
        _dt("INT16", "<i2", "tensor(int16)", "TYPE_INT16", 2),
        _dt("INT32", "<i4", "tensor(int32)", "TYPE_INT32", 4),
        _dt("INT64", "<i8", "tensor(int64)", "TYPE_INT64", 8),
        _dt("FP16", "<f2", "tensor(float16)", "TYPE_FP16", 2),
        _dt("FP32", "<f4", "tensor(float)", "TYPE_FP32", 4),
        _dt("FP64", "<f8", "tensor(double)", "TYPE_FP64", 8),
        _dt("BYTES", "object", "tensor(string)", "TYPE_STRING", 0),
    )
}
BY_ONNX: dict[str, DataType] = {d.onnx: d for d in DATATYPES.values()}
BY_CONFIG: dict[str, DataType] = {d.config: d for d in DATATYPES.values()}
BY_NUMPY: dict[np.dtype, DataType] = {d.np_dtype: d for d in DATATYPES.values() if d.v2 != "BYTES"}


def datatype(name: str, what: str = "tensor") -> DataType:
    try:
        return DATATYPES[name]
    except KeyError:
        raise invalid(
            f"{what}: unsupported datatype {name!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


def element_count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def decode_bytes_tensor(buf: bytes | memoryview, count: int, what: str) -> np.ndarray:
    """Decode ``count`` BYTES elements, each a 4-byte little-endian length then the bytes."""
    out = np.empty(count, dtype=object)
    mv = memoryview(buf)
    pos, end = 0, len(mv)
    for i in range(count):
        if pos + 4 > end:
            raise invalid(f"{what}: BYTES data ends after {i} of {count} elements")
        (n,) = struct.unpack_from("<I", mv, pos)
        pos += 4
        if pos + n > end:
            raise invalid(f"{what}: BYTES element {i} claims {n} bytes but only {end - pos} remain")
        out[i] = bytes(mv[pos : pos + n])
        pos += n
    if pos != end:
        raise invalid(f"{what}: {end - pos} bytes left over after {count} BYTES elements")
    return out


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.reshape(-1):
        if isinstance(v, str):
            v = v.encode()
        elif not isinstance(v, (bytes, bytearray)):
            v = str(v).encode()
        parts.append(struct.pack("<I", len(v)))
        parts.append(v)
    return b"".join(parts)


def from_raw(buf: bytes | memoryview, dt: DataType, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Numpy view of raw little-endian bytes, checked against the declared shape."""
    count = element_count(shape)
    if dt.itemsize == 0:
        return decode_bytes_tensor(buf, count, what).reshape(shape)
    expected = count * dt.itemsize
    if len(buf) != expected:
        raise invalid(
            f"{what}: got {len(buf)} bytes of data but shape {list(shape)} of {dt.v2} "
            f"needs {expected} bytes"
        )
    arr = np.frombuffer(buf, dtype=dt.np_dtype)
    return arr.reshape(shape)


def to_raw(arr: np.ndarray, dt: DataType) -> bytes:
    if dt.itemsize == 0:
        return encode_bytes_tensor(arr)
    if arr.dtype != dt.np_dtype:
        arr = arr.astype(dt.np_dtype)
    return arr.tobytes()  # C order


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # HTTP only: binary_data on this output (None = request default)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str  # "" = let the policy choose
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None  # None = every output
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    timeout_us: int = 0  # V2 "timeout" parameter; 0 = none
    deadline: float | None = None  # absolute, on the gateway's monotonic clock
    arrival: float = 0.0  # monotonic clock at arrival
    arrival_ns: int = 0  # perf-counter ns at arrival (statistics)
    protocol: str = ""  # "grpc" | "http" (metrics label)
    binary_output_default: bool = False  # HTTP only: binary_data_output
    checked: Any = None  # the signature check's result (core.signature.Checked)
    dispatched: float = 0.0  # monotonic clock when a scheduler handed it to the backend
    execution: Any = None  # the running execution it belongs to, where a caller can cancel it (remote models)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
