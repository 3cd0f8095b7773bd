"""Pure conversions between the V2 gRPC messages and the gateway's core types."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from ..core.errors import invalid
from ..core.types import (
    DATATYPES,
    EMPTY,
    DataType,
    InferRequest,
    InferResponse,
    RequestLimits,
    Tensor,
    check_grpc_outputs,
    check_shape,
    check_tensors,
    clip,
    datatype,
    element_count,
    from_raw,
    heavy,
    new_request,
    shaped,
    tensor_parameters,
    to_raw,
)
from ..shm import BYTE_SIZE as SHM_BYTE_SIZE
from ..shm import REGION as SHM_REGION
from ..shm import OutputWriter, Place, RegionView, fixed_bytes, grpc_params

# Typed-contents field for each datatype (FP16 has none: it must travel raw).
CONTENTS_FIELD = {
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


def peek_model_name(raw: bytes) -> str | None:
    """The model a serialized ModelInferRequest names, read from its first bytes without parsing
    it, when it names no version; None when that cannot be told at a glance (the request then
    goes the whole way). Serializers write fields in number order, so ``model_name`` (1) comes
    first and ``model_version`` (2) right after it; a name under 128 bytes has a one-byte length."""
    n = len(raw)
    if n < 2 or raw[0] != 0x0A or raw[1] >= 0x80:
        return None
    end = 2 + raw[1]
    if end > n or (end + 1 < n and raw[end] == 0x12 and raw[end + 1]):
        return None
    try:
        return raw[2:end].decode()
    except UnicodeDecodeError:
        return None


def set_parameters(into: Any, params: Mapping[str, Any]) -> None:
    """V2 parameters into a protobuf map of InferParameter (a value of another kind is sent as text)."""
    for k, v in params.items():
        p = into[k]
        if type(v) is bool:
            p.bool_param = v
        elif type(v) is int and -(1 << 63) <= v < (1 << 63):
            p.int64_param = v
        elif k == "sequence_id" and type(v) is int and v < 1 << 64:
            p.int64_param = v - (1 << 64)  # Triton reads an int64 sequence_id as the uint64 of the same bits
        elif type(v) is float:
            p.double_param = v
        else:
            p.string_param = v if type(v) is str else str(v)


def param_value(p: pb.InferParameter) -> bool | int | float | str | None:
    kind: str | None = p.WhichOneof("parameter_choice")
    value: bool | int | float | str | None = getattr(p, kind) if kind else None  # the oneof's one field
    return value


def parameters_of(params: Any) -> dict[str, Any]:
    """A protobuf parameters map as plain values."""
    return {k: param_value(v) for k, v in params.items()}


def decode_request(
    msg: pb.ModelInferRequest,
    arrival: float,
    limits: RequestLimits,
    headers: Mapping[str, str] = EMPTY,
    deadline: float | None = None,
    shm: RegionView | None = None,
    note: Any = None,
    precheck: Callable[[str, str, tuple[int, ...]], None] | None = None,
) -> InferRequest:
    """The request in ``msg``; ``headers`` are the caller's x-* metadata, ``deadline`` the
    call's gRPC deadline on the monotonic clock (None when it has none); ``shm``: the registered
    shared-memory regions an input may name (its data then comes from there)."""
    # Each protobuf field is read once: with upb every attribute read builds an object.
    raw = msg.raw_input_contents
    tensors = msg.inputs
    n_raw = len(raw)
    outs = msg.outputs
    check_tensors(len(tensors), len(outs), limits)
    shared = [i for i, t in enumerate(tensors) if SHM_REGION in t.parameters]
    if n_raw and n_raw != len(tensors) - len(shared):
        raise invalid(
            f"raw_input_contents has {n_raw} entries but the request has {len(tensors) - len(shared)} inputs "
            "outside shared memory; give raw data for every one of them or for none"
        )
    inputs = []
    j = strings = 0
    for i, t in enumerate(tensors):
        name, dtname = t.name, t.datatype
        what = f"input '{clip(name)}'"
        dt = DATATYPES.get(dtname) or datatype(dtname, what)
        shape = tuple(t.shape)
        strings = check_shape(name, shape, limits, dtname, strings)
        if shape and min(shape) < 0:
            raise invalid(f"{what}: shape {list(shape)} has a negative dimension")
        if precheck is not None:  # (a large request: the model's own check before any value is read)
            precheck(name, dt.v2, shape)
        if shared and i in shared:
            if shm is None:
                raise invalid(f"{what}: shared memory is not served here")
            if _holds_contents(t):
                raise invalid(f"{what}: give its data in shared memory or in contents, not both")
            place = shm.place_input(grpc_params(t.parameters), what, fixed_bytes(dt, shape))
            data = from_raw(shm.read(place, what), dt, shape, what)
        elif n_raw:
            if _holds_contents(t):
                raise invalid(f"{what}: give its data in raw_input_contents or in contents, not both")
            data = from_raw(raw[j], dt, shape, what)
            j += 1
        else:
            data = from_contents(t, dt, shape, what)
        own = None
        if t.parameters and not (shared and i in shared):
            own = tensor_parameters(parameters_of(t.parameters), what)
        inputs.append(Tensor(name, dtname, shape, data, own))
    check_grpc_outputs(outs)
    outputs = [o.name for o in outs] if outs else None
    params = parameters_of(msg.parameters) if msg.parameters else None
    if params and type(params.get("sequence_id")) is int and params["sequence_id"] < 0:
        params["sequence_id"] += 1 << 64  # as Triton takes an int64_param sequence_id: a uint64's bits
    req = new_request(
        msg.model_name,
        msg.model_version,
        inputs,
        outputs,
        msg.id,
        params,
        headers,
        arrival,
        "grpc",
        limits,
        deadline,
        note,
    )
    if shm is not None and outs:
        places = output_places(msg, shm)
        if places is not None:  # outputs to shared memory: written as the request's last step
            req = req._replace(sink=OutputWriter(places, shm))
    return req


def _holds_contents(t: Any) -> bool:
    """Whether an input carries values in ``contents``. An empty ``contents {}`` holds none: MLServer's
    gRPC client (``use_raw=True``) writes one beside each input's raw data, and MLServer takes it."""
    return bool(t.HasField("contents")) and t.contents.ByteSize() > 0


def from_contents(t: Any, dt: DataType, shape: tuple[int, ...], what: str) -> np.ndarray:
    field = CONTENTS_FIELD.get(dt.v2)
    if field is None:
        raise invalid(f"{what}: {dt.v2} data has no typed contents field; send it in raw_input_contents")
    values = getattr(t.contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise invalid(f"{what}: shape {list(shape)} needs {count} elements but contents.{field} has {len(values)}")
    fields = t.contents.ListFields()  # (the fields holding values; one, unless the caller is confused)
    if len(fields) > (1 if count else 0):
        stray = next(f.name for f, _ in fields if f.name != field)
        # Values in another field than the datatype's would be dropped without a word.
        raise invalid(f"{what}: contents.{stray} holds values, but {dt.v2} data goes in contents.{field} only")
    packed = _packed(t.contents, dt.v2, count)
    arr: np.ndarray
    if packed is not None:
        arr = packed
    elif dt.v2 == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
    else:
        info = np.iinfo(dt.np_dtype) if dt.np_dtype.kind in "iu" else None
        # uint64_contents can exceed int64 (and float64 loses precision): read it as uint64.
        # The narrower integer types go through int64 so the range check below sees the true value.
        wide = dt.np_dtype if info is None else (np.uint64 if dt.v2 == "UINT64" else np.int64)
        arr = np.fromiter(values, dtype=wide, count=count)  # (a few times faster than asarray)
        if info is not None and count and (arr.min() < info.min or arr.max() > info.max):
            raise invalid(f"{what}: a value in contents.{field} is out of range for {dt.v2}")
        arr = arr.astype(dt.np_dtype)
    return shaped(arr, shape, what)


# Float contents fields: their tag byte (field number, wire type 2) and the values' dtype.
_PACKED: dict[str, tuple[int, np.dtype]] = {"FP32": (0x32, np.dtype("<f4")), "FP64": (0x3A, np.dtype("<f8"))}


def _packed(contents: Any, v2: str, count: int) -> np.ndarray | None:
    """The ``count`` values of a float contents field that holds them alone, read as the one buffer
    the message packs them into (little-endian, after the field's tag and length), not one Python
    float at a time: 12M values took the event loop 2.8 s so. None where that does not apply."""
    tagged = _PACKED.get(v2)
    if tagged is None or not count:
        return None
    tag, dtype = tagged
    packed = contents.SerializeToString()
    pos, size, shift = 1, 0, 0
    while pos < len(packed) and shift < 64:  # the length, a varint
        size |= (packed[pos] & 0x7F) << shift
        shift += 7
        pos += 1
        if not packed[pos - 1] & 0x80:
            break
    if packed[0] != tag or size != count * dtype.itemsize or pos + size > len(packed):
        return None  # (not one packed field: read value by value)
    arr: np.ndarray = np.frombuffer(packed, dtype=dtype, count=count, offset=pos)
    return arr


def output_places(msg: pb.ModelInferRequest, shm: RegionView | None) -> dict[str, Place] | None:
    """Where the requested outputs that name a shared-memory region go (None: none does);
    checked before the request runs."""
    places = None
    for o in msg.outputs:
        if SHM_REGION in o.parameters:
            what = f"output '{clip(o.name)}'"
            if shm is None:
                raise invalid(f"{what}: shared memory is not served here")
            if places is None:
                places = {}
            places[o.name] = shm.place(grpc_params(o.parameters), what)
    return places


def many_values(msg: pb.ModelInferRequest) -> bool:
    """Whether a request's values read one by one pass OFF_LOOP_ELEMENTS (its BYTES elements, and
    every value of typed contents): 65,536 one-byte BYTES elements, 330 KB, took ~30 ms to read."""
    raw = bool(msg.raw_input_contents)
    return heavy(sum(element_count(t.shape) for t in msg.inputs if t.datatype == "BYTES" or not raw), 0)


def heavy_answer(resp: InferResponse, written: Mapping[str, tuple[str, int]] | None = None) -> bool:
    """Whether :func:`encode_response` runs on a thread (``core.types.heavy``): BYTES elements
    framed one by one (1,000,000 took ~600 ms of the event loop), or many MB copied."""
    elements = nbytes = 0
    for t in resp.outputs:
        if written and t.name in written:
            continue
        if t.datatype == "BYTES":
            elements += t.data.size
        else:
            nbytes += t.data.nbytes
    return heavy(elements, nbytes)


def encode_response(resp: InferResponse, written: Mapping[str, tuple[str, int]] | None = None) -> pb.ModelInferResponse:
    """The response; an output in ``written`` (output name -> region, bytes: what the request's
    ``shm.OutputWriter`` wrote to shared memory) is answered with its name, datatype, shape and
    region only (an empty raw entry keeps the other outputs' raw contents at their index)."""
    out = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id)
    add = out.outputs.add
    raws = []
    for t in resp.outputs:
        entry = add(name=t.name, datatype=t.datatype, shape=t.shape)
        if t.parameters:  # (an upstream's, passed on: MLServer's content_type)
            set_parameters(entry.parameters, t.parameters)
        shared = written.get(t.name) if written else None
        if shared is not None:
            entry.parameters[SHM_REGION].string_param = shared[0]
            entry.parameters[SHM_BYTE_SIZE].int64_param = shared[1]
            raws.append(b"")
        else:
            raws.append(to_raw(t.data, DATATYPES[t.datatype]))
    out.raw_output_contents.extend(raws)
    set_parameters(out.parameters, resp.parameters)  # a route's answer: parameter "variant"
    return out


def call_deadline(context: Any) -> float | None:
    """A gRPC call's deadline on ``time.monotonic``, None without one (read while the call is alive)."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


def parsed_by_us(impl: Callable[[Any, Any], Any], message: Any) -> Callable[[Any, Any], Any]:
    """A unary handler taking the request's raw bytes: it parses them as ``message`` itself and
    answers INVALID_ARGUMENT when they are not one. grpc.aio, given the parser as the method's
    deserializer, answers a parse failure UNKNOWN ("Unexpected <class DecodeError>"), a server
    error for a client's bad bytes, where the h2 engine says INVALID_ARGUMENT (grpc_h2_call.py)."""
    kind = message.DESCRIPTOR.full_name

    async def handler(raw: bytes, context: Any) -> Any:
        try:
            request = message.FromString(raw)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {kind} (protobuf)")
        return await impl(request, context)

    return handler


def echoed_id(request_id: str, limit: int) -> str:
    """The id a stream's error answer carries: the request's own, or, when it was refused for
    being over ``limit`` bytes (max_request_id_bytes), its first ``limit`` bytes, not all of it."""
    if len(request_id) <= limit >> 2 or len(request_id.encode()) <= limit:
        return request_id
    return request_id.encode()[:limit].decode("utf-8", "ignore")
