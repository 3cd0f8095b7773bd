"""Pure conversions between the V2 gRPC messages and the gateway's core types."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
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
    check_shape,
    check_tensors,
    clip,
    datatype,
    element_count,
    from_raw,
    new_request,
    shaped,
    to_raw,
)

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


def param_value(p: pb.InferParameter) -> bool | int | float | str | None:
    kind: str | None = p.WhichOneof("parameter_choice")
    value: bool | int | float | str | None = getattr(p, kind) if kind else None  # the oneof's one field
    return value


def decode_request(
    msg: pb.ModelInferRequest,
    arrival: float,
    limits: RequestLimits,
    headers: Mapping[str, str] = EMPTY,
    deadline: float | None = None,
) -> InferRequest:
    """The request in ``msg``; ``headers`` are the caller's x-* metadata, ``deadline`` the
    call's gRPC deadline on the monotonic clock (None when it has none)."""
    # Each protobuf field is read once: with upb every attribute read builds an object.
    raw = msg.raw_input_contents
    tensors = msg.inputs
    n_raw = len(raw)
    outs = msg.outputs
    check_tensors(len(tensors), len(outs), limits)
    if n_raw and n_raw != len(tensors):
        raise invalid(
            f"raw_input_contents has {n_raw} entries but the request has {len(tensors)} inputs; "
            "give raw data for every input or for none"
        )
    inputs = []
    for i, t in enumerate(tensors):
        name, dtname = t.name, t.datatype
        dt = DATATYPES.get(dtname) or datatype(dtname, f"input '{clip(name)}'")
        shape = tuple(t.shape)
        check_shape(name, shape, limits)
        if shape and min(shape) < 0:
            raise invalid(f"input '{clip(name)}': shape {list(shape)} has a negative dimension")
        if n_raw:
            if t.HasField("contents"):
                raise invalid(f"input '{clip(name)}': give its data in raw_input_contents or in contents, not both")
            data = from_raw(raw[i], dt, shape, f"input '{clip(name)}'")
        else:
            data = _from_contents(t, dt, shape, f"input '{clip(name)}'")
        inputs.append(Tensor(name, dtname, shape, data))
    outputs = [o.name for o in outs] if outs else None
    params = msg.parameters
    return new_request(
        msg.model_name,
        msg.model_version,
        inputs,
        outputs,
        msg.id,
        {k: param_value(v) for k, v in params.items()} if params else None,
        headers,
        arrival,
        "grpc",
        limits,
        deadline,
    )


def _from_contents(t: pb.InferInputTensor, dt: DataType, shape: tuple[int, ...], what: str) -> np.ndarray:
    field = CONTENTS_FIELD.get(dt.v2)
    if field is None:
        raise invalid(f"{what}: {dt.v2} data has no typed contents field; send it in raw_input_contents")
    values = getattr(t.contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise invalid(f"{what}: shape {list(shape)} needs {count} elements but contents.{field} has {len(values)}")
    if dt.v2 == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
    else:
        info = np.iinfo(dt.np_dtype) if dt.np_dtype.kind in "iu" else None
        # uint64_contents can exceed int64 (and float64 loses precision): read it as uint64.
        # The narrower integer types go through int64 so the range check below sees the true value.
        wide = None if info is None else (np.uint64 if dt.v2 == "UINT64" else np.int64)
        arr = np.asarray(values, dtype=wide)
        if info is not None and count and (arr.min() < info.min or arr.max() > info.max):
            raise invalid(f"{what}: a value in contents.{field} is out of range for {dt.v2}")
        arr = arr.astype(dt.np_dtype)
    return shaped(arr, shape, what)


def encode_response(resp: InferResponse) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id)
    add = out.outputs.add
    raws = []
    for t in resp.outputs:
        add(name=t.name, datatype=t.datatype, shape=t.shape)
        raws.append(to_raw(t.data, DATATYPES[t.datatype]))
    out.raw_output_contents.extend(raws)
    for k, v in resp.parameters.items():  # a route's answer: parameter "variant"
        out.parameters[k].string_param = str(v)
    return out
