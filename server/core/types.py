"""Tensors, requests and responses as the gateway sees them, whatever the wire.

One table (:data:`DATATYPES`) maps each V2 datatype name to its numpy dtype,
its ONNX tensor type string, its ``model_config`` enum name and its size.
BYTES tensors are numpy ``object`` arrays of ``bytes``.
"""

from __future__ import annotations

import math
import re
import reprlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

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
            f"{what}: unsupported datatype '{printable(clip(str(name)))}'; expected one of {', '.join(DATATYPES)}"
        ) from None


def element_count(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_UINT32 = struct.Struct("<I")  # a BYTES element's length
_LENGTH, _U32 = _UINT32.unpack_from, _UINT32.pack
SMALL_BYTES_TENSOR = 64  # elements framed one by one below this


def decode_bytes_tensor(buf: bytes | memoryview, count: int, what: str) -> np.ndarray:
    """Decode ``count`` BYTES elements, each a 4-byte little-endian length then the bytes.

    Every element takes at least its 4-byte length, so a shape that claims more elements
    than the data can hold is refused before anything is allocated for them (a few bytes
    must never make the gateway allocate gigabytes)."""
    data = buf if type(buf) is bytes else bytes(buf)  # (a slice of bytes is made in one step)
    pos, end = 0, len(data)
    if count * 4 > end:
        raise invalid(
            f"{what}: the shape claims {count} BYTES elements, but {end} bytes of data hold at most {end // 4}"
        )
    items: list[bytes] = [b""] * count
    length = _LENGTH
    for i in range(count):
        if pos + 4 > end:
            raise invalid(f"{what}: BYTES data ends after {i} of {count} elements")
        (n,) = length(data, pos)
        pos += 4
        stop = pos + n
        if stop > end:
            raise invalid(f"{what}: BYTES element {i} claims {n} bytes but only {end - pos} remain")
        items[i] = data[pos:stop]
        pos = stop
    if pos != end:
        raise invalid(f"{what}: {end - pos} bytes left over after {count} BYTES elements")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


# An answer is encoded on a thread, not on the event loop, past either: elements written one by one
# (JSON values, BYTES elements: 100,000 took 5-60 ms) or bytes of fixed-size data copied (tens of
# MB a second of the loop); below, the thread's hop costs more than it saves.
OFF_LOOP_ELEMENTS = 32_768
OFF_LOOP_BYTES = 8 << 20


def heavy(elements: int, nbytes: int) -> bool:
    """Whether an answer of ``elements`` written one by one and ``nbytes`` copied is encoded on a thread."""
    return elements > OFF_LOOP_ELEMENTS or nbytes > OFF_LOOP_BYTES


def _element_bytes(v: Any) -> bytes:
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    return str(v).encode()


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    """Each element as a 4-byte little-endian length, then its bytes (a str as UTF-8, any other
    value as its str()). The lengths and the bytes are laid side by side with numpy, not in a
    Python loop of packs (bench/large_answers.py --codec: 1,000,000 elements 533 -> 258 ms)."""
    flat = arr.reshape(-1)
    items = [
        v if type(v) is bytes else _element_bytes(v) for v in (flat.tolist() if flat.dtype.kind in "OSU" else flat)
    ]
    n = len(items)
    if n < SMALL_BYTES_TENSOR:  # (numpy's set-up costs more than a few packs: a label, a short text)
        return b"".join([b for v in items for b in (_U32(len(v)), v)])
    lengths = np.fromiter(map(len, items), dtype="<u4", count=n)
    starts = np.arange(n, dtype=np.int64) * 4  # where each element's length goes
    starts[1:] += np.cumsum(lengths[:-1], dtype=np.int64)
    data = np.ones(4 * n + int(lengths.sum(dtype=np.int64)), bool)
    for k in range(4):
        data[starts + k] = False
    out = np.empty(len(data), np.uint8)
    out[~data] = lengths.view(np.uint8)
    out[data] = np.frombuffer(b"".join(items), np.uint8)
    return out.tobytes()


def from_raw(buf: bytes | memoryview, dt: DataType, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Numpy view of raw little-endian bytes, checked against the declared shape."""
    count = element_count(shape)
    if dt.itemsize == 0:
        return shaped(decode_bytes_tensor(buf, count, what), shape, what)
    expected = count * dt.itemsize
    if len(buf) != expected:
        raise invalid(f"{what}: got {len(buf)} bytes of data but shape {list(shape)} of {dt.v2} needs {expected} bytes")
    arr = np.frombuffer(buf, dtype=dt.np_dtype)
    if arr.dtype == np.bool_ and count:
        # A BOOL is one byte, 0 or 1. Another value would pass as a numpy bool yet reach the
        # model as that byte (ONNX Runtime's Not of 2 is 253: true, as 2 was), so is refused.
        octets = np.frombuffer(buf, dtype=np.uint8)
        if octets.max() > 1:
            i = int(np.argmax(octets > 1))
            raise invalid(f"{what}: BOOL element {i} is the byte {octets[i]}; a BOOL is 0 or 1")
    return shaped(arr, shape, what)


def shaped(arr: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``arr`` in ``shape``; a shape numpy cannot make (an empty tensor whose other dimensions
    multiply past 2**63) is the caller's mistake, not a crash."""
    try:
        return arr.reshape(shape)
    except ValueError:
        raise invalid(f"{what}: shape {list(shape)[:8]}{'...' if len(shape) > 8 else ''} is too large") from None


def to_raw(arr: np.ndarray, dt: DataType) -> bytes:
    if dt.itemsize == 0:
        return encode_bytes_tensor(arr)
    if arr.dtype != dt.np_dtype:
        arr = arr.astype(dt.np_dtype)
    return arr.tobytes()  # C order


class Tensor(NamedTuple):
    """A named tensor; its array is read-only once it belongs to a request. ``parameters``: the
    caller's own parameters of an input (MLServer's ``content_type``, say), beyond those the wire
    uses up (binary sizes, shared memory); None when there are none."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: Mapping[str, Any] | None = None


MAX_PARAMETER_NAME = 128  # characters of a request parameter's name
MAX_TENSOR_PARAMETERS = 16  # an input's own parameters, at most (each a scalar; a string of at most 1 KiB)


def tensor_parameters(params: Mapping[str, Any], what: str) -> dict[str, Any] | None:
    """An input's own parameters, checked (None when there are none)."""
    if not params:
        return None
    if len(params) > MAX_TENSOR_PARAMETERS:
        raise invalid(f"{what}: at most {MAX_TENSOR_PARAMETERS} parameters")
    for k, v in params.items():
        if len(k) > 64 or type(v) not in (str, int, float, bool) or (type(v) is str and len(v) > 1024):
            raise invalid(f"{what}: parameter '{printable(clip(k))}' must be a short name with a scalar value")
    return dict(params)


def check_output(name: str, params: Mapping[str, Any], classification: bool) -> None:
    """An output a request names: as many parameters as an input may have at most, and not the
    classification extension (``classification``: the request asks for it). The same check on
    every path: HTTP, gRPC decoded, gRPC forwarded raw."""
    if len(params) > MAX_TENSOR_PARAMETERS:
        raise invalid(f"output '{printable(clip(name))}': at most {MAX_TENSOR_PARAMETERS} parameters")
    if classification:
        raise invalid(f"output '{printable(clip(name))}': the classification extension is not supported")


def check_grpc_outputs(outputs: Iterable[Any]) -> None:
    """``check_output`` for each output of a gRPC ModelInferRequest (its ``outputs`` field)."""
    for o in outputs:
        p = o.parameters
        if p:
            c = p.get("classification")
            choice = c.WhichOneof("parameter_choice") if c is not None else None
            check_output(o.name, p, bool(choice and getattr(c, choice)))  # (given in any type, not 0)


EMPTY: Mapping[str, Any] = MappingProxyType({})
SYNTHETIC_HEADER = "x-batchgate-synthetic"
OFFLINE_HEADER = "x-batchgate-offline"  # batch scoring's requests (batchgate score --target)
# Front mode (``workers_mode: front``): a worker's call to the model-owning process carries the
# number of client requests it merged, so that the owner counts requests, not calls. Read only by
# the owner, which only the pod's own workers can reach (a Unix socket in a private folder).
REQUESTS_HEADER = "x-batchgate-requests"
MAX_WEIGHT = 1 << 16
REQUEST_ID_HEADER = "x-request-id"
# Request parameters whose names start with "triton_" are Triton's own: refused, as Triton refuses
# them, except the one tritonclient sends on streams (``enable_empty_final_response=True``), which
# asks for ``triton_final_response`` on each answer of the stream.
TRITON_PREFIX = "triton_"
FINAL_RESPONSE_REQUESTED = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"
_PARAMETER_TYPES = (str, int, float, bool)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on what a caller attaches to a request besides its tensors."""

    max_caller_headers: int = 32  # x-* headers (HTTP) or metadata entries (gRPC) kept on a request
    max_caller_header_bytes: int = 4096  # name + value of one of them
    max_request_parameters: int = 64  # V2 request parameters
    max_inputs: int = 64  # input tensors on one request
    max_outputs: int = 64  # outputs one request may name
    max_tensor_dims: int = 32  # dimensions of one tensor's shape (numpy's own ceiling is 64)
    max_request_id_bytes: int = 256  # the V2 id (or x-request-id) a request is answered with
    # BYTES elements of one request, all its inputs together: each becomes Python objects several
    # times over (decoded, as str for the engine, the answer's), some 450 bytes and ~2 µs of the
    # event loop apiece, so the body's size bound alone allowed 16 M of them (GBs, seconds)
    max_bytes_elements: int = 65536


def check_tensors(inputs: int, outputs: int, limits: RequestLimits) -> None:
    """Refuse a request that names more tensors than the limits allow, before decoding any."""
    if inputs > limits.max_inputs:
        raise invalid(f"the request has {inputs} inputs; at most {limits.max_inputs} are accepted (max_inputs)")
    if outputs > limits.max_outputs:
        raise invalid(f"the request names {outputs} outputs; at most {limits.max_outputs} are accepted (max_outputs)")


def check_shape(name: str, shape: tuple[int, ...], limits: RequestLimits, datatype: str = "", strings: int = 0) -> int:
    """Refuse a shape with too many dimensions, or a BYTES input that takes the request's BYTES
    elements past ``max_bytes_elements`` (``strings``: those of its earlier inputs), before
    anything is allocated for it. Returns the request's BYTES elements with this input's."""
    if len(shape) > limits.max_tensor_dims:
        raise invalid(
            f"input '{clip(name)}' has {len(shape)} dimensions; at most {limits.max_tensor_dims} are accepted "
            "(max_tensor_dims)"
        )
    if datatype == "BYTES":
        strings += math.prod(shape)
        if strings > limits.max_bytes_elements:
            raise invalid(
                f"input '{clip(name)}' brings the request's BYTES elements to {strings}; at most "
                f"{limits.max_bytes_elements} are accepted (max_bytes_elements)"
            )
    return strings


class InferRequest(NamedTuple):
    """One decoded inference request, the same whatever the wire, and never changed after
    it is built: a shadow copy or a retry submits the same object again, and what happens
    to it on one submission lives in that submission's ticket (``core.scheduler.Ticket``).
    Build it with :func:`new_request`, which makes its arrays read-only and its
    collections immutable. (A named tuple rather than a frozen dataclass: it is built once
    per request, and a tuple builds several times faster.)"""

    model_name: str
    model_version: str  # "" = let the policy choose
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...] | None = None  # requested outputs; None = every output
    id: str = ""  # the V2 id, else the caller's x-request-id
    parameters: Mapping[str, Any] = EMPTY  # V2 request parameters
    headers: Mapping[str, str] = EMPTY  # the caller's x-* headers / metadata and trace context, lower-case names
    priority: int = 0
    timeout_us: int = 0  # V2 "timeout" parameter; 0 = none
    deadline: float | None = None  # absolute, on the gateway's monotonic clock
    arrival: float = 0.0  # monotonic clock at arrival
    protocol: str = ""  # "grpc" | "http" (metrics label)
    synthetic: bool = False  # marked x-batchgate-synthetic: load-test traffic
    offline: bool = False  # marked x-batchgate-offline: batch scoring, kept out of drift and rollout figures
    note: Any = None  # the access log's and tracing's notes on this request (monitoring/access_log.Note)
    # called with the answer before the request counts as answered (shm.OutputWriter: outputs
    # written to shared memory, so a write that fails fails the request); None: nothing to do
    sink: Any = None
    # the client requests this one stands for: 1, but for a front worker's call to the model owner
    weight: int = 1


def weight_of(value: str | None) -> int:
    """The weight a ``x-batchgate-requests`` value gives (1 when absent or not a count)."""
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 6:
        return 1
    return min(max(int(value), 1), MAX_WEIGHT)


def check_parameter_name(name: str) -> None:
    """Refuse a request parameter name reserved for the server (``triton_...``), as Triton does,
    or longer than ``MAX_PARAMETER_NAME``."""
    if len(name) > MAX_PARAMETER_NAME:
        raise invalid(f"parameter '{printable(clip(name))}': names are at most {MAX_PARAMETER_NAME} characters")
    if name.startswith(TRITON_PREFIX) and name != FINAL_RESPONSE_REQUESTED:
        raise invalid(f"parameter '{printable(clip(name))}': names starting with 'triton_' are reserved for the server")


TRACE_CONTEXT = ("traceparent", "tracestate")  # W3C trace context: kept apart from the x-* limits
_TRACE_VALUE_MAX = 512  # (a longer traceparent is no valid one; a longer tracestate is not sent on)


def caller_headers(pairs: Iterable[tuple[str, str]], limits: RequestLimits) -> Mapping[str, str]:
    """The caller's ``x-*`` headers from (name, value) pairs with lower-case names, checked
    against ``limits``; other headers, and values that are not text (gRPC ``-bin`` metadata),
    are not kept. A repeated name keeps its first value.

    The W3C trace context is kept too, outside those limits, as W3C reads it: a repeated
    ``traceparent`` is none (kept empty), repeated ``tracestate`` values are one list. A remote
    model's call carries it when the gateway does not trace the request itself, so the
    caller's trace is not cut at the hop (``execution.RemoteExecution``)."""
    out: dict[str, str] = {}
    trace: dict[str, str] | None = None
    for name, value in pairs:
        if name[:2] != "x-" or type(value) is not str:
            if name in TRACE_CONTEXT and type(value) is str:
                _trace_header(trace := trace or {}, name, value)
            continue
        if len(name) + len(value) > limits.max_caller_header_bytes:
            raise invalid(
                f"header '{clip(name)}' is {len(name) + len(value)} bytes; at most "
                f"{limits.max_caller_header_bytes} are accepted (max_caller_header_bytes)"
            )
        if name not in out:
            if len(out) >= limits.max_caller_headers:
                raise invalid(
                    f"the request carries more than {limits.max_caller_headers} x-* headers (max_caller_headers)"
                )
            out[name] = value
    if trace:
        out.update(trace)
    return MappingProxyType(out) if out else EMPTY


def _trace_header(out: dict[str, str], name: str, value: str) -> None:
    had = out.get(name)
    if name == "traceparent":
        out[name] = "" if had is not None or len(value) > _TRACE_VALUE_MAX else value
    elif had is None or len(had) <= _TRACE_VALUE_MAX:  # (past the bound it is dropped on sending)
        out[name] = (value if had is None else f"{had},{value}")[: _TRACE_VALUE_MAX + 1]


# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators, as escapes.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
# ... and the bidirectional controls, which can make a line read otherwise than it is written
_CONTROL.update({c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))})
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MODEL_NAME_RULE = "model names are one of [A-Za-z0-9_] then up to 127 of [A-Za-z0-9_.-]"


def is_host_port(address: str) -> bool:
    """Whether ``address`` is HOST:PORT with a port from 1 to 65535, in ASCII digits (str.isdigit()
    also takes '²', which int() refuses, and '٣', which it reads as 3; gRPC takes a port past
    65535 modulo 65536: another port). No host holds "/": a URL (``http://h:8001``) is not one."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and "/" not in host and port.isascii() and port.isdigit() and 0 < int(port) < 65536)


def printable(text: str) -> str:
    """``text`` with every control character written as an escape: one line, whatever it holds."""
    return text.translate(_CONTROL)


def is_version_text(text: str) -> bool:
    """Whether ``text`` is a version a client can name: at most 18 ASCII digits (int64 holds it;
    int() would also take " 1", "+1", "1_0" and other scripts' digits)."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def version_number(version: str) -> int:
    """A model version as a client names it (``is_version_text``); INVALID_ARGUMENT otherwise."""
    if not is_version_text(version):
        raise invalid(f"model version must be a whole number of at most 18 digits, not '{printable(clip(version))}'")
    return int(version)


def check_model_name(name: str) -> None:
    """Refuse a name that could not be a model's: it becomes a directory name, a metric label
    and part of log lines, so only a small safe alphabet is allowed, everywhere."""
    if MODEL_NAME.fullmatch(name) is None:
        raise invalid(f"model name '{printable(clip(name))}' is not allowed: {MODEL_NAME_RULE}")


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = 3, 6, 6, 60, 60


def brief(value: object) -> str:
    """A client's JSON value quoted in an error: bounded in length and in nesting (``repr`` of
    a value nested a thousand deep would recurse out of the stack)."""
    return clip(printable(_BRIEF.repr(value)))


def clip(text: str, limit: int = 128) -> str:
    """Client text quoted in an error or a log line, cut to a bounded length."""
    return text if len(text) <= limit else text[:limit] + "..."


_SEQUENCE_PARAMETERS = frozenset(("sequence_id", "sequence_start", "sequence_end"))


def _check_sequence(params: Mapping[str, Any]) -> None:
    """Triton's sequence parameters, of the types Triton takes (an upstream is sent them as they
    are): ``sequence_id`` an unsigned 64-bit integer or a string, start and end booleans."""
    if "sequence_id" in params:
        v = params["sequence_id"]
        if type(v) is not str and (type(v) is not int or not 0 <= v < 1 << 64):
            raise invalid(f"parameter 'sequence_id' must be an unsigned 64-bit integer or a string, not {brief(v)}")
    for k in ("sequence_start", "sequence_end"):
        if k in params and type(params[k]) is not bool:
            raise invalid(f"parameter '{k}' must be a boolean, not {brief(params[k])}")


def new_request(
    model_name: str,
    model_version: str,
    inputs: list[Tensor],
    outputs: list[str] | None,
    request_id: str,
    parameters: dict[str, Any] | None,
    headers: Mapping[str, str],
    arrival: float,
    protocol: str,
    limits: RequestLimits,
    transport_deadline: float | None = None,
    note: Any = None,
) -> InferRequest:
    """Freeze a decoded request. The id is the V2 ``id``, else the caller's ``x-request-id``;
    the deadline is the earliest of the V2 ``timeout`` parameter and the transport's own
    (a gRPC deadline); ``priority`` and ``timeout`` are checked here, once for both wires."""
    for t in inputs:
        flags = t.data.flags
        if flags.writeable:  # raw wire data is read-only already: reading is cheaper than setting
            flags.writeable = False
    params: Mapping[str, Any] = EMPTY
    priority = timeout_us = 0
    deadline = transport_deadline
    if parameters:
        if len(parameters) > limits.max_request_parameters:
            raise invalid(
                f"the request has {len(parameters)} parameters; at most {limits.max_request_parameters} "
                "are accepted (max_request_parameters)"
            )
        params = MappingProxyType(dict(parameters))
        for k, v in params.items():
            if type(v) not in _PARAMETER_TYPES:  # (a JSON object or list; a gRPC parameter with no value)
                name = printable(clip(k))
                if v is None:  # (HTTP reads a JSON null as not given: it never gets here)
                    raise invalid(f"parameter '{name}' has no value: none of its InferParameter fields is set")
                raise invalid(f"parameter '{name}' must be a string, a number or a boolean, not {brief(v)}")
            check_parameter_name(k)
        if FINAL_RESPONSE_REQUESTED in params:  # the stream's business (its transport reads it), not a model's
            if type(v := params[FINAL_RESPONSE_REQUESTED]) is not bool:  # (Triton: "expected bool_param")
                raise invalid(f"parameter '{FINAL_RESPONSE_REQUESTED}' must be a boolean, not {brief(v)}")
            params = MappingProxyType({k: v for k, v in params.items() if k != FINAL_RESPONSE_REQUESTED})
        if params.keys() & _SEQUENCE_PARAMETERS:
            _check_sequence(params)
        if "priority" in params:
            v = params["priority"]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise invalid(f"parameter 'priority' must be a non-negative integer, not {brief(v)}")
            priority = v
        if "timeout" in params:
            v = params["timeout"]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise invalid(f"parameter 'timeout' must be a non-negative integer of microseconds, not {brief(v)}")
            timeout_us = v
            if v:
                dl = arrival + v / 1e6
                deadline = dl if deadline is None else min(deadline, dl)
    if outputs is not None and len(set(outputs)) != len(outputs):
        seen: set[str] = set()
        for o in outputs:
            if o in seen:
                raise invalid(f"output '{clip(o)}' is requested more than once")
            seen.add(o)
    rid = request_id or (headers.get(REQUEST_ID_HEADER, "") if headers else "")
    if len(rid) > limits.max_request_id_bytes >> 2 and len(rid.encode()) > limits.max_request_id_bytes:
        raise invalid(
            f"the request id is {len(rid.encode())} bytes; at most {limits.max_request_id_bytes} are accepted "
            "(max_request_id_bytes)"
        )
    synthetic = bool(headers) and headers.get(SYNTHETIC_HEADER, "").strip().lower() in ("1", "true", "yes")
    offline = bool(headers) and headers.get(OFFLINE_HEADER, "").strip().lower() in ("1", "true", "yes")
    return InferRequest(
        model_name,
        model_version,
        tuple(inputs),
        None if outputs is None else tuple(outputs),
        rid,
        params,
        headers,
        priority,
        timeout_us,
        deadline,
        arrival,
        protocol,
        synthetic,
        offline,
        note,
    )


class InferResponse(NamedTuple):
    """One caller's answer (a named tuple, like the request: one is built per request)."""

    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str = ""
    parameters: Mapping[str, Any] = EMPTY
