"""grpc_codec: ModelInferRequest -> InferRequest, InferResponse -> ModelInferResponse.

Responses are read back with tritonclient's own ``InferResult``; one request is
built with the helper tritonclient.grpc itself uses to build what it sends.
"""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import _utils as client_utils
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import serialize_byte_tensor

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.types import DATATYPES, InferResponse, RequestLimits, Tensor
from batchgate.transport import grpc_codec
from batchgate.transport.grpc_codec import encode_response


def decode_request(msg, arrival=0.0, **kw):
    return grpc_codec.decode_request(msg, arrival, RequestLimits(), **kw)


def refused(msg, arrival=0.0) -> str:
    with pytest.raises(GatewayError) as ei:
        decode_request(msg, arrival)
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT
    return ei.value.message


def typed(datatype, shape, field, values) -> pb.ModelInferRequest:
    m = pb.ModelInferRequest(model_name="m")
    t = m.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(t.contents, field).extend(values)
    return m


def raw(*tensors) -> pb.ModelInferRequest:
    m = pb.ModelInferRequest(model_name="m", model_version="2", id="req-1")
    for name, datatype, arr in tensors:
        m.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        if datatype == "BYTES":
            m.raw_input_contents.append(serialize_byte_tensor(arr).item())
        else:
            m.raw_input_contents.append(arr.astype(DATATYPES[datatype].np_dtype).tobytes())
    return m


# ---------------------------------------------------------------- raw contents
def test_raw_contents_every_fixed_type_and_metadata():
    tensors = []
    for name, d in DATATYPES.items():
        if d.itemsize:
            tensors.append((f"in_{name}", name, (np.arange(6) % 2).astype(d.np_dtype).reshape(2, 3)))
    req = decode_request(raw(*tensors), arrival=7.5)
    assert req.model_name == "m" and req.model_version == "2" and req.id == "req-1"
    assert req.protocol == "grpc" and req.arrival == 7.5
    assert req.outputs is None  # no outputs named: every output
    for (name, datatype, arr), t in zip(tensors, req.inputs):
        assert t.name == name and t.datatype == datatype and t.shape == (2, 3)
        assert t.data.dtype == DATATYPES[datatype].np_dtype
        np.testing.assert_array_equal(t.data, arr)


def test_raw_bytes_input():
    arr = np.array([[b"hi", b""], [b"\x00\xff", "é".encode()]], dtype=object)
    (t,) = decode_request(raw(("s", "BYTES", arr)), 0.0).inputs
    assert t.shape == (2, 2)
    assert t.data.tolist() == arr.tolist()


def test_as_tritonclient_sends_it():
    x = grpcclient.InferInput("x", [2, 2], "FP16")
    x.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.float16))
    s = grpcclient.InferInput("s", [1], "BYTES")
    s.set_data_from_numpy(np.array([b"abc"], dtype=object))
    msg = client_utils._get_inference_request(
        model_name="m",
        inputs=[x, s],
        model_version="",
        request_id="r9",
        outputs=[grpcclient.InferRequestedOutput("y")],
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=2,
        timeout=1500,
        parameters=None,
    )
    req = decode_request(msg, arrival=10.0)
    assert req.id == "r9"
    np.testing.assert_array_equal(req.inputs[0].data, np.array([[1, 2], [3, 4]], dtype=np.float16))
    assert req.inputs[1].data.tolist() == [b"abc"]
    assert req.outputs == ("y",)
    assert req.priority == 2
    assert req.timeout_us == 1500
    assert req.deadline == pytest.approx(10.0015)


def test_raw_count_must_match_inputs():
    m = raw(("a", "INT32", np.zeros(2, np.int32)), ("b", "INT32", np.zeros(2, np.int32)))
    del m.raw_input_contents[1]
    msg = refused(m)
    assert "raw_input_contents has 1" in msg and "2 inputs" in msg


def test_raw_and_typed_contents_together_are_refused():
    m = raw(("a", "INT32", np.zeros(2, np.int32)))
    m.inputs[0].contents.int_contents.extend([1, 2])
    msg = refused(m)
    assert "input 'a'" in msg and "not both" in msg


def test_raw_with_wrong_byte_count_names_the_input():
    m = raw(("a", "FP32", np.zeros(3, np.float32)))
    m.raw_input_contents[0] = b"\x00" * 11
    msg = refused(m)
    assert "input 'a'" in msg and "11" in msg and "12" in msg


def test_negative_dimension_is_refused():
    m = pb.ModelInferRequest(model_name="m")
    m.inputs.add(name="a", datatype="FP32", shape=[2, -1])
    m.raw_input_contents.append(b"")
    msg = refused(m)
    assert "input 'a'" in msg and "[2, -1]" in msg


def test_unknown_datatype_is_refused():
    m = pb.ModelInferRequest(model_name="m")
    m.inputs.add(name="a", datatype="FLOAT32", shape=[1])
    m.raw_input_contents.append(b"\x00" * 4)
    msg = refused(m)
    assert "input 'a'" in msg and "'FLOAT32'" in msg


# ---------------------------------------------------------------- typed contents
TYPED = [
    ("BOOL", "bool_contents", [True, False, True]),
    ("INT8", "int_contents", [-128, 0, 127]),
    ("INT16", "int_contents", [-32768, 1, 32767]),
    ("INT32", "int_contents", [-(2**31), 2, 2**31 - 1]),
    ("INT64", "int64_contents", [-(2**63), 3, 2**63 - 1]),
    ("UINT8", "uint_contents", [0, 1, 255]),
    ("UINT16", "uint_contents", [0, 1, 65535]),
    ("UINT32", "uint_contents", [0, 1, 2**32 - 1]),
    ("UINT64", "uint64_contents", [0, 1, 2**40]),
    ("FP32", "fp32_contents", [-1.5, 0.0, 3.25]),
    ("FP64", "fp64_contents", [-1e300, 0.0, 1e-300]),
    ("BYTES", "bytes_contents", [b"a", b"", b"\x00\x01"]),
]


@pytest.mark.parametrize("datatype,field,values", TYPED, ids=[c[0] for c in TYPED])
def test_typed_contents(datatype, field, values):
    (t,) = decode_request(typed(datatype, [1, 3], field, values), 0.0).inputs
    assert t.shape == (1, 3)
    if datatype == "BYTES":
        assert t.data.dtype == object
        assert t.data.reshape(-1).tolist() == values
    else:
        assert t.data.dtype == DATATYPES[datatype].np_dtype
        assert t.data.reshape(-1).tolist() == values


@pytest.mark.parametrize("value", [2**53 + 1, 2**63 + 1, 2**64 - 1])
def test_typed_uint64_keeps_large_values(value):
    (t,) = decode_request(typed("UINT64", [2], "uint64_contents", [value, 1]), 0.0).inputs
    assert t.data.dtype == np.uint64
    assert int(t.data[0]) == value


@pytest.mark.parametrize(
    "datatype,field,value",
    [
        ("INT8", "int_contents", 128),
        ("INT8", "int_contents", -129),
        ("INT16", "int_contents", 32768),
        ("INT16", "int_contents", -32769),
        ("UINT8", "uint_contents", 256),
        ("UINT16", "uint_contents", 65536),
    ],
)
def test_typed_out_of_range_ints_are_refused(datatype, field, value):
    msg = refused(typed(datatype, [2], field, [0, value]))
    assert "input 'x'" in msg and "out of range" in msg and datatype in msg


def test_typed_fp16_is_refused():
    msg = refused(typed("FP16", [2], "fp32_contents", [1.0, 2.0]))
    assert "input 'x'" in msg and "FP16" in msg and "raw_input_contents" in msg


def test_typed_count_mismatch():
    msg = refused(typed("FP32", [2, 2], "fp32_contents", [1.0, 2.0, 3.0]))
    assert "input 'x'" in msg and "4" in msg and "3" in msg and "fp32_contents" in msg


def test_typed_contents_in_the_wrong_field_count_as_missing():
    msg = refused(typed("INT32", [2], "fp32_contents", [1.0, 2.0]))
    assert "int_contents has 0" in msg


def test_typed_empty_tensor():
    (t,) = decode_request(typed("UINT8", [0, 4], "uint_contents", []), 0.0).inputs
    assert t.data.shape == (0, 4) and t.data.dtype == np.uint8


@pytest.mark.parametrize(
    ("datatype", "shape", "field", "values", "stray", "stray_values"),
    [
        ("FP32", [1], "fp32_contents", [1.0], "int_contents", [5]),  # the right field full as well
        ("FP32", [0, 4], "fp32_contents", [], "int_contents", [1, 2, 3]),  # an empty tensor
        ("INT64", [2], "int64_contents", [1, 2], "int_contents", [1, 2]),
        ("BYTES", [1], "bytes_contents", [b"a"], "uint_contents", [7]),
    ],
)
def test_typed_values_in_a_field_the_datatype_does_not_use_are_refused(
    datatype, shape, field, values, stray, stray_values
):
    """Values in another typed field than the datatype's were dropped without a word whenever the
    datatype's own field held the element count (always, for an empty tensor)."""
    msg_in = typed(datatype, shape, field, values)
    getattr(msg_in.inputs[0].contents, stray).extend(stray_values)
    msg = refused(msg_in)
    assert "input 'x'" in msg and f"contents.{stray}" in msg and f"contents.{field}" in msg


# ---------------------------------------------------------------- parameters
def with_params(**params) -> pb.ModelInferRequest:
    m = typed("FP32", [1], "fp32_contents", [1.0])
    for k, (kind, v) in params.items():
        setattr(m.parameters[k], kind, v)
    return m


def test_priority_and_timeout_become_fields_and_deadline():
    req = decode_request(with_params(priority=("uint64_param", 4), timeout=("int64_param", 250_000)), arrival=3.0)
    assert req.priority == 4
    assert req.timeout_us == 250_000
    assert req.deadline == pytest.approx(3.25)


def test_zero_timeout_means_no_deadline():
    req = decode_request(with_params(timeout=("int64_param", 0)), arrival=3.0)
    assert req.timeout_us == 0 and req.deadline is None


def test_no_parameters_defaults():
    req = decode_request(typed("FP32", [1], "fp32_contents", [1.0]), 0.0)
    assert req.priority == 0 and req.timeout_us == 0 and req.deadline is None and req.parameters == {}


def test_custom_parameters_are_kept():
    req = decode_request(with_params(my_flag=("bool_param", True), tag=("string_param", "x")), 0.0)
    assert req.parameters == {"my_flag": True, "tag": "x"}


@pytest.mark.parametrize(
    "name,kind,value",
    [
        ("priority", "string_param", "1"),
        ("priority", "bool_param", True),
        ("priority", "int64_param", -1),
        ("priority", "double_param", 1.0),
        ("timeout", "int64_param", -5),
        ("timeout", "string_param", "100"),
    ],
)
def test_bad_schedule_parameters(name, kind, value):
    msg = refused(with_params(**{name: (kind, value)}))
    assert f"'{name}'" in msg and repr(value) in msg


# ---------------------------------------------------------------- encode_response
def response(*tensors, rid="r1") -> InferResponse:
    return InferResponse("m", "3", [Tensor(n, dt, tuple(a.shape), a) for n, dt, a in tensors], id=rid)


def test_encode_uses_raw_output_contents_readable_by_tritonclient():
    outs = []
    for name, d in DATATYPES.items():
        if d.itemsize:
            outs.append((f"o_{name}", name, np.arange(6).astype(d.np_dtype).reshape(3, 2)))
    outs.append(("o_BYTES", "BYTES", np.array([[b"x", b""], [b"yz", b"\xff"]], dtype=object)))
    msg = encode_response(response(*outs))
    assert msg.model_name == "m" and msg.model_version == "3" and msg.id == "r1"
    assert len(msg.raw_output_contents) == len(outs)
    result = grpcclient.InferResult(msg)
    for (name, datatype, arr), o in zip(outs, msg.outputs):
        assert o.name == name and o.datatype == datatype and list(o.shape) == list(arr.shape)
        assert not o.HasField("contents")
        got = result.as_numpy(name)
        assert got.shape == arr.shape
        if datatype == "BYTES":
            assert got.tolist() == arr.tolist()
        else:
            assert got.dtype == arr.dtype
            np.testing.assert_array_equal(got, arr)


def test_encode_casts_data_to_the_declared_type():
    msg = encode_response(response(("y", "INT32", np.array([1, 2], dtype=np.int64))))
    assert msg.raw_output_contents[0] == np.array([1, 2], "<i4").tobytes()


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([n for n, d in DATATYPES.items() if d.itemsize]).flatmap(
        lambda n: st.tuples(
            st.just(n), hnp.arrays(DATATYPES[n].np_dtype, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4))
        )
    )
)
def test_encode_round_trips_through_tritonclient(case):
    datatype, arr = case
    got = grpcclient.InferResult(encode_response(response(("y", datatype, arr)))).as_numpy("y")
    assert got.shape == arr.shape
    assert got.tobytes() == arr.tobytes()


@pytest.mark.parametrize(("datatype", "field"), [("FP32", "fp32_contents"), ("FP64", "fp64_contents")])
def test_typed_float_contents_read_as_one_buffer_keep_every_bit(datatype, field):
    """Float contents are read from the packed buffer the message holds: the values and their
    order are those sent, a length past 127 bytes (a varint of two bytes and more) included, and
    a field the reader does not know (a newer client's) changes nothing."""
    dtype = DATATYPES[datatype].np_dtype
    sent = np.array([np.nan, -0.0, np.inf, -np.inf, np.finfo(dtype).smallest_subnormal, 1.5] * 50, dtype)
    msg = pb.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name="x", datatype=datatype, shape=[len(sent)])
    getattr(t.contents, field).extend(sent.tolist())
    t.contents.MergeFromString(b"\xf8\x06\x01")  # field 111, a varint: unknown to InferTensorContents
    got = decode_request(msg).inputs[0].data
    assert got.dtype == dtype and got.tobytes() == sent.tobytes()
    empty = pb.ModelInferRequest(model_name="m")
    empty.inputs.add(name="x", datatype=datatype, shape=[0])
    assert decode_request(empty).inputs[0].data.dtype == dtype
