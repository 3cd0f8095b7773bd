"""The datatype table in core/types.py, checked against an independent list and
against the tables that tritonclient, model_config.proto and ONNX publish."""

import numpy as np
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.types import BY_CONFIG, BY_NUMPY, BY_ONNX, DATATYPES, datatype

# name: (numpy dtype, onnxruntime type string, model_config enum name, bytes per element)
EXPECTED = {
    "BOOL": (np.dtype(np.bool_), "tensor(bool)", "TYPE_BOOL", 1),
    "UINT8": (np.dtype("<u1"), "tensor(uint8)", "TYPE_UINT8", 1),
    "UINT16": (np.dtype("<u2"), "tensor(uint16)", "TYPE_UINT16", 2),
    "UINT32": (np.dtype("<u4"), "tensor(uint32)", "TYPE_UINT32", 4),
    "UINT64": (np.dtype("<u8"), "tensor(uint64)", "TYPE_UINT64", 8),
    "INT8": (np.dtype("<i1"), "tensor(int8)", "TYPE_INT8", 1),
    "INT16": (np.dtype("<i2"), "tensor(int16)", "TYPE_INT16", 2),
    "INT32": (np.dtype("<i4"), "tensor(int32)", "TYPE_INT32", 4),
    "INT64": (np.dtype("<i8"), "tensor(int64)", "TYPE_INT64", 8),
    "FP16": (np.dtype("<f2"), "tensor(float16)", "TYPE_FP16", 2),
    "FP32": (np.dtype("<f4"), "tensor(float)", "TYPE_FP32", 4),
    "FP64": (np.dtype("<f8"), "tensor(double)", "TYPE_FP64", 8),
    "BYTES": (np.dtype(object), "tensor(string)", "TYPE_STRING", 0),
}


def test_table_has_exactly_the_expected_names():
    assert set(DATATYPES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry_matches_expected(name):
    np_dtype, onnx_name, config_name, size = EXPECTED[name]
    d = DATATYPES[name]
    assert d.v2 == name
    assert d.np_dtype == np_dtype
    assert d.onnx == onnx_name
    assert d.config == config_name
    assert d.itemsize == size
    if size:
        assert d.np_dtype.itemsize == size


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_numpy_dtype_agrees_with_tritonclient(name):
    d = DATATYPES[name]
    assert np.dtype(triton_to_np_dtype(name)) == d.np_dtype
    if name != "BYTES":
        assert np_to_triton_dtype(d.np_dtype) == name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_onnx_string_agrees_with_onnx_tensor_proto(name):
    d = DATATYPES[name]
    onnx_enum = helper.np_dtype_to_tensor_dtype(d.np_dtype)
    assert d.onnx == f"tensor({TensorProto.DataType.Name(onnx_enum).lower()})"


def test_config_names_are_model_config_enum_values():
    enum_names = set(mc.DataType.keys())
    for d in DATATYPES.values():
        assert d.config in enum_names, d
    # Every real type in model_config.proto is covered, except BF16 (no numpy dtype).
    covered = {d.config for d in DATATYPES.values()}
    assert enum_names - covered == {"TYPE_INVALID", "TYPE_BF16"}


def test_reverse_indexes():
    for name, d in DATATYPES.items():
        assert BY_ONNX[d.onnx] is d
        assert BY_CONFIG[d.config] is d
        if name != "BYTES":
            assert BY_NUMPY[d.np_dtype] is d
    assert len(BY_ONNX) == len(BY_CONFIG) == 13
    assert len(BY_NUMPY) == 12
    assert BY_NUMPY[np.dtype(np.float32)].v2 == "FP32"


def test_datatype_lookup():
    assert datatype("INT64").np_dtype == np.dtype(np.int64)


@pytest.mark.parametrize("bad", ["BF16", "fp32", "FLOAT", ""])
def test_unknown_datatype_is_invalid_argument_naming_the_tensor(bad):
    with pytest.raises(GatewayError) as ei:
        datatype(bad, "input 'images'")
    e = ei.value
    assert e.code is ErrorCode.INVALID_ARGUMENT
    assert "input 'images'" in e.message
    assert repr(bad) in e.message
    assert "FP32" in e.message  # lists what is allowed
