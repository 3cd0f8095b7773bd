"""http_codec.decode_request: JSON bodies and the binary tensor data extension.

Bodies with binary data are built by tritonclient.http's own request writer
(``InferenceServerClient.generate_request_body``), so they are what the client sends.
"""

import json
import math

import numpy as np
import pytest
import tritonclient.http as httpclient

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.types import DATATYPES, RequestLimits
from batchgate.transport.http_codec import decode_request, split_body

gen = httpclient.InferenceServerClient.generate_request_body


def decode_with_options(body, header_length=None, arrival=0.0):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return decode_request(
        body, None if header_length is None else str(header_length), "m", "1", arrival, RequestLimits()
    )


def decode(body, header_length=None, arrival=0.0):
    return decode_with_options(body, header_length, arrival)[0]


def refused(body, header_length=None) -> str:
    with pytest.raises(GatewayError) as ei:
        decode(body, header_length)
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT
    return ei.value.message


def one(name="x", datatype="FP32", shape=(2,), **extra) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), **extra}]}


# ---------------------------------------------------------------- JSON data
JSON_CASES = [
    ("BOOL", [[True, False], [False, True]]),
    ("UINT8", [[0, 255], [1, 2]]),
    ("UINT16", [[0, 65535], [1, 2]]),
    ("UINT32", [[0, 2**32 - 1], [1, 2]]),
    ("UINT64", [[0, 2**64 - 1], [1, 2]]),
    ("INT8", [[-128, 127], [0, 1]]),
    ("INT16", [[-32768, 32767], [0, 1]]),
    ("INT32", [[-(2**31), 2**31 - 1], [0, 1]]),
    ("INT64", [[-(2**63), 2**63 - 1], [0, 1]]),
    ("FP32", [[1.5, -2.25], [0.0, 1024.0]]),
    ("FP64", [[1e300, -2.5], [0.0, 1e-300]]),
]


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("datatype,data", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_json_data(datatype, data, nested):
    flat = [v for row in data for v in row]
    req = decode(one(datatype=datatype, shape=(2, 2), data=data if nested else flat))
    (t,) = req.inputs
    assert t.name == "x" and t.datatype == datatype and t.shape == (2, 2)
    assert t.data.dtype == DATATYPES[datatype].np_dtype
    assert t.data.shape == (2, 2)
    assert t.data.tolist() == data


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_json_bytes_data(nested):
    data = [["a", ""], ["é", "z z"]]
    (t,) = decode(one(datatype="BYTES", shape=(2, 2), data=data if nested else sum(data, []))).inputs
    assert t.data.dtype == object
    assert t.data.tolist() == [[b"a", b""], ["é".encode(), b"z z"]]


def test_json_bytes_must_be_strings():
    msg = refused(one(datatype="BYTES", shape=(2,), data=["a", 3]))
    assert "input 'x'" in msg and "strings" in msg


def test_json_bool_must_be_true_false():
    msg = refused(one(datatype="BOOL", shape=(2,), data=[1, 0]))
    assert "input 'x'" in msg and "BOOL" in msg


def test_json_element_count_must_match_shape():
    msg = refused(one(datatype="FP32", shape=(2, 3), data=[1, 2, 3, 4, 5]))
    assert "input 'x'" in msg and "6" in msg and "5" in msg


def test_json_ragged_nested_data_is_refused():
    msg = refused(one(datatype="FP32", shape=(2, 2), data=[[1, 2], [3]]))
    assert "input 'x'" in msg and "FP32" in msg


@pytest.mark.parametrize(
    "datatype,value",
    [("UINT8", 256), ("UINT8", -1), ("INT8", 128), ("INT16", -40000), ("UINT32", 2**32), ("INT64", 2**63)],
)
def test_json_out_of_range_ints_are_refused(datatype, value):
    msg = refused(one(datatype=datatype, shape=(2,), data=[0, value]))
    assert "input 'x'" in msg and datatype in msg


@pytest.mark.parametrize(
    "datatype,value",
    [("UINT64", 2**64), ("INT64", -(2**63) - 1), ("INT64", 10**30), ("UINT32", 2**64), ("UINT64", -(2**64))],
)
@pytest.mark.parametrize("nan_too", [False, True], ids=["json", "with-a-nan-token"])
def test_json_integers_past_64_bits_are_refused_as_out_of_range(datatype, value, nan_too):
    """orjson reads an integer past 64 bits as a float: it was refused as "must be integers",
    which an integer is; it is out of the datatype's range, and the message says so."""
    body = one(datatype=datatype, shape=(2,), data=[0, value])
    if nan_too:  # (a body with a NaN token is read by Python's json, which keeps the integer)
        body["parameters"] = {"f": math.nan}
    msg = refused(json.dumps(body).encode())
    assert "input 'x'" in msg and f"out of range for {datatype}" in msg


def test_json_non_numbers_are_refused():
    msg = refused(one(datatype="FP32", shape=(2,), data=["a", 1]))
    assert "input 'x'" in msg and "FP32" in msg


@pytest.mark.parametrize("bad", [1.5, "7", True], ids=["float", "string", "bool"])
def test_json_integer_input_refuses_non_integers(bad):
    assert "input 'x'" in refused(one(datatype="INT32", shape=(2,), data=[1, bad]))


def test_json_float_input_refuses_null():
    assert "input 'x'" in refused(one(datatype="FP32", shape=(2,), data=[1.0, None]))


# ---------------------------------------------------------------- binary data
def test_binary_framing_as_tritonclient_sends_it():
    a = httpclient.InferInput("a", [2, 2], "FP32")
    a.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.float32))
    s = httpclient.InferInput("s", [3], "BYTES")
    s.set_data_from_numpy(np.array([b"x", b"", b"\xff\x00"], dtype=object))
    j = httpclient.InferInput("j", [2], "INT64")
    j.set_data_from_numpy(np.array([5, -6], dtype=np.int64), binary_data=False)
    h = httpclient.InferInput("h", [2], "FP16")
    h.set_data_from_numpy(np.array([0.5, 2], dtype=np.float16))
    body, header_length = gen([a, s, j, h])
    assert header_length is not None
    req, options = decode_with_options(body, header_length)
    a_, s_, j_, h_ = req.inputs
    np.testing.assert_array_equal(a_.data, np.array([[1, 2], [3, 4]], dtype=np.float32))
    assert s_.data.tolist() == [b"x", b"", b"\xff\x00"]
    assert j_.data.tolist() == [5, -6] and j_.data.dtype == np.int64
    assert h_.data.dtype == np.float16 and h_.data.tolist() == [0.5, 2.0]
    # no outputs named: tritonclient asks for binary outputs for all of them
    assert req.outputs is None
    assert options.binary_default is True


def test_binary_with_request_id_outputs_priority_and_timeout():
    a = httpclient.InferInput("a", [1], "INT32")
    a.set_data_from_numpy(np.array([9], dtype=np.int32))
    outs = [httpclient.InferRequestedOutput("y", binary_data=False), httpclient.InferRequestedOutput("z")]
    body, n = gen([a], outs, request_id="q-1", priority=3, timeout=2_000_000)
    req, options = decode_request(body, str(n), "m", "4", 100.0, RequestLimits())
    assert req.model_name == "m" and req.model_version == "4" and req.protocol == "http"
    assert req.id == "q-1"
    assert req.outputs == ("y", "z")
    assert dict(options.binary) == {"y": False, "z": True}
    assert options.binary_default is False
    assert req.priority == 3 and req.timeout_us == 2_000_000
    assert req.deadline == pytest.approx(102.0)
    assert req.inputs[0].data.tolist() == [9]


def _binary_body(inputs: list[dict], blob: bytes) -> tuple[bytes, int]:
    head = json.dumps({"inputs": inputs}).encode()
    return head + blob, len(head)


def test_leftover_binary_bytes_are_refused():
    body, n = _binary_body(
        [{"name": "x", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}}], b"\x01\x02\x03"
    )
    msg = refused(body, n)
    assert "1 binary bytes" in msg


def test_binary_size_past_the_end_is_refused():
    body, n = _binary_body(
        [{"name": "x", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 4}}], b"\x01\x02"
    )
    msg = refused(body, n)
    assert "input 'x'" in msg and "4" in msg and "2" in msg


def test_binary_size_that_does_not_fit_the_shape_is_refused():
    body, n = _binary_body(
        [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}], b"\x00" * 4
    )
    msg = refused(body, n)
    assert "input 'x'" in msg and "8" in msg


@pytest.mark.parametrize("size", [-1, "8", 1.5, True])
def test_bad_binary_data_size(size):
    body, n = _binary_body(
        [{"name": "x", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": size}}], b"\x00"
    )
    msg = refused(body, n)
    assert "input 'x'" in msg and "binary_data_size" in msg


def test_both_data_and_binary_data_size_are_refused():
    body, n = _binary_body(
        [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1], "parameters": {"binary_data_size": 1}}], b"\x01"
    )
    msg = refused(body, n)
    assert "input 'x'" in msg and "exactly one" in msg


def test_neither_data_nor_binary_data_size_is_refused():
    msg = refused(one(datatype="UINT8", shape=(1,)))
    assert "input 'x'" in msg and "exactly one" in msg


def test_binary_without_header_length_is_not_json():
    body, _ = _binary_body(
        [{"name": "x", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 1}}], b"\x01"
    )
    assert "not valid JSON" in refused(body)


def test_raw_binary_request_header_zero_is_refused():
    assert "Inference-Header-Content-Length: 0" in refused(b"\x00\x00\x80?", 0)


# ---------------------------------------------------------------- split_body
def test_split_body():
    head, rest = split_body(b'{"a":1}XYZ', "7")
    assert head == b'{"a":1}' and bytes(rest) == b"XYZ"
    head, rest = split_body(b"whole", None)
    assert head == b"whole" and bytes(rest) == b""


@pytest.mark.parametrize("value", ["abc", "-1", "11", "1.5", "+3", "1_0", " 3", "3 ", "\u0663"])
def test_bad_header_length(value):
    """Digits only: Python's int() also reads a sign, underscores, spaces and other scripts'
    digits ("\u0663" is ARABIC-INDIC THREE), which no HTTP length allows."""
    with pytest.raises(GatewayError) as ei:
        split_body(b"0123456789", value)
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT
    assert "Inference-Header-Content-Length" in ei.value.message


# ---------------------------------------------------------------- structure and shapes
@pytest.mark.parametrize("shape", [[-1, 2], [2.0], ["2"], [True], "2", None, {"a": 1}])
def test_bad_shapes(shape):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [1.0, 2.0]}]}
    msg = refused(body)
    assert "input 'x'" in msg and "shape" in msg


@pytest.mark.parametrize(
    "body,words",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        ({"inputs": {}}, "an 'inputs' list"),
        ({"id": "q"}, "an 'inputs' list"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, "'name'"),
        ({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}, "'datatype'"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}]}, "'FLOAT'"),
        ({**one(data=[1.0, 2.0]), "id": 5}, "'id'"),
        ({**one(data=[1.0, 2.0]), "outputs": {"name": "y"}}, "'outputs'"),
        ({**one(data=[1.0, 2.0]), "outputs": [{"parameters": {}}]}, "'name'"),
        ({**one(data=[1.0, 2.0]), "parameters": [1]}, "'parameters'"),
        ({**one(data=[1.0, 2.0]), "outputs": [{"name": "y", "parameters": {"classification": 3}}]}, "classification"),
    ],
)
def test_malformed_requests(body, words):
    assert words in refused(body)


def test_json_request_metadata_and_custom_parameters():
    body = {
        **one(data=[1.0, 2.0]),
        "id": "abc",
        "parameters": {"my_key": "v", "binary_data_output": True},
        "outputs": [{"name": "y"}, {"name": "z", "parameters": {"binary_data": False}}],
    }
    req, options = decode_with_options(body, arrival=5.0)
    assert req.id == "abc"
    assert req.parameters["my_key"] == "v"
    assert options.binary_default is True
    assert req.outputs == ("y", "z")
    assert dict(options.binary) == {"z": False}
    assert req.arrival == 5.0 and req.deadline is None and req.priority == 0


@pytest.mark.parametrize(
    "params,words",
    [
        ({"priority": -1}, "'priority'"),
        ({"priority": 1.0}, "'priority'"),
        ({"priority": "1"}, "'priority'"),
        ({"timeout": -3}, "'timeout'"),
        ({"timeout": True}, "'timeout'"),
    ],
)
def test_bad_schedule_parameters(params, words):
    assert words in refused({**one(data=[1.0, 2.0]), "parameters": params})


def test_zero_timeout_sets_no_deadline():
    req = decode({**one(data=[1.0, 2.0]), "parameters": {"timeout": 0, "priority": 0}}, arrival=1.0)
    assert req.deadline is None and req.timeout_us == 0 and req.priority == 0


# ---------------------------------------------------------------- float range (FP16 / FP32)
@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("size", [2, 40])  # (small and large arrays take two paths)
@pytest.mark.parametrize("special", [[math.inf], [-math.inf], [math.inf, math.nan], [math.nan, -math.inf]])
def test_infinities_are_float_values_with_or_without_a_nan(datatype, size, special):
    """Infinity and -Infinity (Triton's JSON extension, which batchgate's own answers write) are
    taken as every float type's values. Before, one was refused as out of range unless a NaN came
    first (which made max() say NaN and the check pass)."""
    data = [1.0] * (size - len(special)) + special
    got = decode(one("f", datatype, (size,), data=data)).inputs[0].data
    want = np.array(data, dtype=got.dtype)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("datatype", ["FP16", "FP32"])
@pytest.mark.parametrize("size", [3, 40])
def test_a_finite_value_past_the_range_is_refused_beside_nan_and_infinity(datatype, size):
    past = 1e39 if datatype == "FP32" else 70000.0
    for special in ([math.nan, math.inf], [math.inf, math.nan]):
        msg = refused(one("big", datatype, (size,), data=special + [past] + [1.0] * (size - 3)))
        assert f"outside the range of {datatype}" in msg


@pytest.mark.parametrize(
    ("datatype", "value", "bound"),
    [
        ("FP32", 1e300, "3.4028235e+38"),
        ("FP32", -3.5e38, "3.4028235e+38"),
        ("FP16", 70000.0, "65504"),
        ("FP16", -65520.0, "65504"),  # rounds to -inf
        ("FP16", 70000, "65504"),  # an integer: also past FP16's range
        ("FP32", (2 - 2**-24) * 2.0**127, "3.4028235e+38"),  # exactly half an ulp past: rounds to inf
    ],
)
def test_json_numbers_past_the_float_range_are_refused(datatype, value, bound):
    """A cast would make them inf (with numpy's RuntimeWarning, an error under this suite's
    filter): refused with the input, the datatype and the range; small and large arrays (the
    check takes two paths)."""
    msg = refused(one("big", datatype, (2,), data=[1.0, value]))
    assert "input 'big'" in msg and f"outside the range of {datatype}" in msg and bound in msg
    msg = refused(one("big", datatype, (40,), data=[1.0] * 39 + [value]))
    assert "input 'big'" in msg and f"outside the range of {datatype}" in msg and bound in msg


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP32", [3.4028235e38, -3.4028235e38, 1e-300, 16777217]),  # the edges; underflow to 0 is fine
        ("FP16", [65504.0, -65519.0, 1e-10, 65504]),  # 65519 rounds to 65504, not to inf
        ("FP32", [np.nextafter((2 - 2**-24) * 2.0**127, 0), 1.0, -1.0, 0.0]),  # just under the tie: max
        ("FP64", [1.7e308, -1.7e308, 5e-324, 1]),
    ],
)
def test_json_numbers_at_the_float_range_edges_are_kept(datatype, values):
    arr = decode(one("x", datatype, (4,), data=values)).inputs[0].data
    expected = np.asarray(values, dtype=DATATYPES[datatype].np_dtype)
    assert arr.dtype == expected.dtype and np.array_equal(arr, expected) and np.isfinite(arr).all()


# ---------------------------------------------------------------- header length
@pytest.mark.parametrize("value", ["9" * 4300, "-" + "9" * 3000, "1" + "0" * 40])
def test_a_long_header_length_is_quoted_cut(value):
    """int() reads up to 4,300 digits; the error quotes the number cut, like any client value."""
    msg = refused(b"{}", value)
    assert "Inference-Header-Content-Length " in msg and "..." in msg and len(msg) < 200


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" + "0" * 400 + ".5"])
@pytest.mark.parametrize("token", ["", "NaN", "Infinity"])
def test_a_number_past_the_range_of_a_double_is_refused_beside_nan_or_infinity(datatype, number, token):
    """A JSON number too large for a double (1e400) is refused as orjson refuses it. A body that
    also holds a NaN or Infinity token was read again by Python's json, which makes such a number
    infinity: it reached the model as inf, silently."""
    values = ", ".join(v for v in (number, token) if v)
    body = f'{{"inputs":[{{"name":"f","datatype":"{datatype}","shape":[{2 if token else 1}],"data":[{values}]}}]}}'
    msg = refused(body.encode())
    assert "not valid JSON" in msg and "double" in msg
