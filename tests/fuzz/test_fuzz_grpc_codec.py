"""Fuzz: the gRPC codec (``grpc_codec.decode_request``) refuses bad ModelInferRequest messages
with INVALID_ARGUMENT and a bounded message, and never raises anything else; whatever bytes
parse as a ModelInferRequest are decoded the same way."""

from __future__ import annotations

import math

import numpy as np
from fuzz_support import (
    CONTENTS_FOR,
    budget,
    element_values,
    infer_messages,
    limits,
    raw_bytes_for,
    refused_or_ok,
    wire_messages,
)
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from batchgate.core.types import DATATYPES, RequestLimits
from batchgate.transport import grpc_codec

LIMITS = RequestLimits()


def decode(msg: pb.ModelInferRequest, lim: RequestLimits = LIMITS, deadline: float | None = None):
    return refused_or_ok(grpc_codec.decode_request, msg, 1.0, lim, deadline=deadline)


def check_request(req, lim: RequestLimits, deadline: float | None = None) -> None:
    """What an accepted request must satisfy, whatever its message held."""
    if req is None:
        return
    assert len(req.inputs) <= lim.max_inputs
    for t in req.inputs:
        assert t.datatype in DATATYPES
        assert len(t.shape) <= lim.max_tensor_dims and all(d >= 0 for d in t.shape)
        assert t.data.shape == t.shape
        assert not t.data.flags.writeable
        assert t.data.dtype == DATATYPES[t.datatype].np_dtype
    if req.outputs is not None:
        assert len(req.outputs) <= lim.max_outputs and len(set(req.outputs)) == len(req.outputs)
    assert len(req.parameters) <= lim.max_request_parameters
    assert len(req.id.encode()) <= lim.max_request_id_bytes
    assert req.priority >= 0 and req.timeout_us >= 0
    if deadline is not None:
        assert req.deadline is not None and req.deadline <= deadline


def message(name="x", datatype="FP32", shape=(1,), raw: bytes | None = None, **fields) -> pb.ModelInferRequest:
    m = pb.ModelInferRequest(model_name="m")
    t = m.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        m.raw_input_contents.append(raw)
    for field, values in fields.items():
        getattr(t.contents, field).extend(values)
    return m


@budget(0.5)
@given(msg=infer_messages(), lim=limits, deadline=st.one_of(st.none(), st.floats(0, 1e6)))
# Found by this harness, fixed since: an empty tensor whose other dimensions multiply past
# numpy's limit raised ValueError from reshape (raw and typed contents).
@example(msg=message(shape=[0, 2**62, 2**62], raw=b""), lim=LIMITS, deadline=None)
@example(msg=message(shape=[0, 2**62, 2**62]), lim=LIMITS, deadline=None)
@example(msg=message(datatype="BYTES", shape=[0, 2**63 - 1, 2], raw=b""), lim=LIMITS, deadline=None)
@example(msg=message(datatype="X" * 100_000), lim=LIMITS, deadline=None)  # the message quoted it whole
@example(msg=message(shape=[-1] * 32), lim=LIMITS, deadline=None)
@example(msg=message(datatype="FP16", fp32_contents=[1.0]), lim=LIMITS, deadline=None)
@example(msg=message(datatype="UINT64", uint64_contents=[2**64 - 1]), lim=LIMITS, deadline=None)
@example(msg=message(datatype="INT8", int_contents=[300]), lim=LIMITS, deadline=None)
def test_decode_request_messages(msg, lim, deadline):
    check_request(decode(msg, lim, deadline), lim, deadline)


@budget(0.5)
@given(data=wire_messages())
def test_decode_request_parsed_bytes(data):
    """Whatever bytes protobuf parses as a ModelInferRequest, the codec decodes or refuses."""
    try:
        msg = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return
    check_request(decode(msg), LIMITS)


@budget(0.1)
@given(
    name=st.text(min_size=1, max_size=20),
    dtname=st.sampled_from(list(DATATYPES)),
    shape=st.lists(st.integers(0, 3), max_size=3),
    raw=st.booleans(),
    data=st.data(),
)
def test_decode_request_round_trip(name, dtname, shape, raw, data):
    """A correct message (raw or typed contents) decodes to the values it holds: the properties
    above must not pass by refusing everything."""
    values = data.draw(element_values(dtname, math.prod(shape)))
    m = pb.ModelInferRequest(model_name="m")
    t = m.inputs.add(name=name, datatype=dtname, shape=shape)
    if raw or dtname == "FP16":
        m.raw_input_contents.append(raw_bytes_for(dtname, values))
    else:
        getattr(t.contents, CONTENTS_FOR[dtname]).extend(v.encode() if dtname == "BYTES" else v for v in values)
    req = grpc_codec.decode_request(m, 1.0, LIMITS)
    (got,) = req.inputs
    assert (got.name, got.datatype, got.shape) == (name, dtname, tuple(shape))
    if dtname == "BYTES":
        assert got.data.reshape(-1).tolist() == [v.encode() for v in values]
    else:
        np.testing.assert_array_equal(got.data.reshape(-1), np.asarray(values, dtype=DATATYPES[dtname].np_dtype))
