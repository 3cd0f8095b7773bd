"""grpc_codec.peek_model_name: the model a serialized ModelInferRequest names, from its first
bytes, for the h2 engine's refusal before parsing; None whenever a glance cannot be sure."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from batchgate.transport.grpc_codec import peek_model_name


def request(name: str = "", version: str = "", rid: str = "") -> bytes:
    req = pb.ModelInferRequest(model_name=name, model_version=version, id=rid)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
    return req.SerializeToString()


@pytest.mark.parametrize("name", ["mlp", "a", "fraud-model_v2.onnx", "é-ü", "x" * 127])
def test_the_name_of_every_serialized_request_is_read(name):
    assert peek_model_name(request(name)) == name
    assert peek_model_name(request(name, rid="some id")) == name


@pytest.mark.parametrize(
    "raw",
    [
        request("mlp", version="1"),  # a version named: the full path decides
        request("x" * 128),  # a two-byte length
        request(""),  # no name at all (field 1 absent)
        b"",
        b"\x0a",
        b"\x0a\x05ab",  # shorter than it says
        b"\x0a\x02\xff\xfe",  # not UTF-8
        b"\x12\x01\x31\x0a\x03mlp",  # the version first: not the order serializers write
    ],
)
def test_anything_a_glance_cannot_be_sure_of_is_left_to_the_parser(raw):
    assert peek_model_name(raw) is None


def test_an_empty_version_is_no_version():
    raw = b"\x0a\x03mlp\x12\x00"
    assert peek_model_name(raw) == "mlp"
