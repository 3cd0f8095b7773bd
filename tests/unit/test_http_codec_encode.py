"""http_codec.encode_response, read back with tritonclient.http's own response parser
(``InferenceServerClient.parse_response_body``)."""

import json

import numpy as np
import pytest
import tritonclient.http as httpclient

from batchgate.core.types import DATATYPES, InferResponse, Tensor
from batchgate.transport.http_codec import OutputOptions, encode_response

parse = httpclient.InferenceServerClient.parse_response_body


def resp(*tensors, rid="") -> InferResponse:
    return InferResponse("m", "2", [Tensor(n, dt, tuple(a.shape), a) for n, dt, a in tensors], id=rid)


def rq(binary=None, binary_default=False) -> OutputOptions:
    """The HTTP output options: per output binary_data (name -> bool), and the default."""
    return OutputOptions(binary_default, binary or {})


def every_type():
    outs = []
    for name, d in DATATYPES.items():
        if name == "BYTES":
            outs.append(("o_BYTES", name, np.array([[b"ab", b""], [b"c", "é".encode()]], dtype=object)))
        elif name == "BOOL":
            outs.append(("o_BOOL", name, np.array([[True, False], [False, True]])))
        else:
            outs.append(
                (f"o_{name}", name, (np.arange(4) * 3 - 2 * (d.np_dtype.kind != "u")).astype(d.np_dtype).reshape(2, 2))
            )
    return outs


def check(result, outs):
    for name, datatype, arr in outs:
        got = result.as_numpy(name)
        assert got.shape == arr.shape, name
        if datatype == "BYTES":
            assert [v.encode() if isinstance(v, str) else v for v in got.reshape(-1)] == list(arr.reshape(-1))
        else:
            assert got.dtype == arr.dtype, name
            np.testing.assert_array_equal(got, arr)


def test_all_json_response():
    outs = every_type()
    body, header_length = encode_response(resp(*outs), rq())
    assert header_length is None
    obj = json.loads(body)
    assert obj["model_name"] == "m" and obj["model_version"] == "2"
    assert "id" not in obj
    assert [o["name"] for o in obj["outputs"]] == [o[0] for o in outs]
    for o in obj["outputs"]:
        assert o["shape"] == [2, 2] and "parameters" not in o and len(o["data"]) == 4
    bytes_out = next(o for o in obj["outputs"] if o["datatype"] == "BYTES")
    assert bytes_out["data"] == ["ab", "", "c", "é"]
    check(parse(body), outs)


def test_all_binary_response_with_binary_data_output():
    outs = every_type()
    body, header_length = encode_response(resp(*outs, rid="q"), rq(binary_default=True))
    assert header_length is not None
    head = json.loads(body[:header_length])
    assert head["id"] == "q"
    total = 0
    for (_name, datatype, arr), o in zip(outs, head["outputs"]):
        assert "data" not in o
        size = o["parameters"]["binary_data_size"]
        expected = sum(4 + len(v) for v in arr.reshape(-1)) if datatype == "BYTES" else arr.nbytes
        assert size == expected
        total += size
    assert len(body) == header_length + total
    check(parse(body, header_length=header_length), outs)


def test_per_output_binary_data_overrides_the_default():
    a = ("a", "FP32", np.array([1.5, 2.5], dtype=np.float32))
    b = ("b", "INT64", np.array([7, 8], dtype=np.int64))
    c = ("c", "BYTES", np.array([b"z"], dtype=object))
    req = rq({"a": False, "b": True}, binary_default=True)
    body, n = encode_response(resp(a, b, c), req)
    head = json.loads(body[:n])
    kinds = {o["name"]: ("data" in o, o.get("parameters", {}).get("binary_data_size")) for o in head["outputs"]}
    assert kinds == {"a": (True, None), "b": (False, 16), "c": (False, 5)}
    check(parse(body, header_length=n), [a, b, c])

    req = rq({"a": True}, binary_default=False)
    body, n = encode_response(resp(a, b), req)
    head = json.loads(body[:n])
    assert "data" not in head["outputs"][0] and head["outputs"][1]["data"] == [7, 8]
    assert len(body) == n + 8
    check(parse(body, header_length=n), [a, b])


def test_empty_binary_output_adds_no_bytes_but_keeps_the_framing():
    e = ("e", "FP32", np.zeros((0, 3), dtype=np.float32))
    body, n = encode_response(resp(e), rq(binary_default=True))
    assert n == len(body)
    head = json.loads(body)
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 0}
    assert parse(body, header_length=n).as_numpy("e").shape == (0, 3)


def test_json_output_of_a_non_contiguous_array_is_row_major():
    arr = np.arange(6, dtype=np.int32).reshape(2, 3).T
    body, n = encode_response(resp(("t", "INT32", arr)), rq())
    assert n is None
    assert json.loads(body)["outputs"][0]["data"] == [0, 3, 1, 4, 2, 5]


def test_json_output_with_data_of_another_dtype():
    body, _ = encode_response(resp(("t", "FP32", np.array([0.5, 1.0], dtype=np.float64))), rq())
    assert json.loads(body)["outputs"][0]["data"] == [0.5, 1.0]


def test_response_id_only_when_set():
    body, _ = encode_response(resp(("a", "INT8", np.array([1], np.int8)), rid="abc"), rq())
    assert json.loads(body)["id"] == "abc"
    assert parse(body).get_response()["id"] == "abc"


@pytest.mark.parametrize("binary", [False, True])
def test_fp16_output(binary):
    h = ("h", "FP16", np.array([0.5, -2.0, 65504.0], dtype=np.float16))
    body, n = encode_response(resp(h), rq(binary_default=binary))
    got = parse(body, header_length=n).as_numpy("h")
    assert got.dtype == np.float16
    assert got.tolist() == [0.5, -2.0, 65504.0]


def test_bytes_that_are_not_utf8_are_refused_as_json_and_sent_whole_as_binary():
    """A BYTES output holding b'\\xff\\xfe' (an upstream's answer) was written to JSON as two
    U+FFFD characters, 200 OK: the caller got other data than the model's."""
    from batchgate.core.errors import ErrorCode, GatewayError

    outs = [("out", "BYTES", np.array([b"\xff\xfe", b"ok"], dtype=object))]
    with pytest.raises(GatewayError) as e:
        encode_response(resp(*outs), rq())
    assert e.value.code is ErrorCode.INVALID_ARGUMENT and "'out'" in e.value.message
    assert "binary_data" in e.value.message
    body, json_len = encode_response(resp(*outs), rq({"out": True}))
    got = parse(body, header_length=json_len).as_numpy("out")
    assert got.tolist() == [b"\xff\xfe", b"ok"]
