"""from_raw / to_raw: little-endian, row-major raw tensor bytes, and the BYTES framing."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.types import DATATYPES, from_raw, to_raw

FIXED = [n for n, d in DATATYPES.items() if d.itemsize]
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def fixed_arrays(draw):
    name = draw(st.sampled_from(FIXED))
    arr = draw(hnp.arrays(DATATYPES[name].np_dtype, shapes))
    return name, arr


@st.composite
def bytes_arrays(draw):
    shape = draw(shapes)
    n = int(np.prod(shape, dtype=np.int64))
    items = draw(st.lists(st.binary(max_size=12), min_size=n, max_size=n))
    arr = np.empty(n, dtype=object)
    arr[:] = items
    return arr.reshape(shape)


@settings(max_examples=150, deadline=None)
@given(fixed_arrays())
def test_fixed_size_round_trip(case):
    name, arr = case
    dt = DATATYPES[name]
    raw = to_raw(arr, dt)
    assert len(raw) == arr.size * dt.itemsize
    # the wire format is little-endian, row-major: what numpy writes for '<' dtypes
    assert raw == np.ascontiguousarray(arr, dtype=dt.np_dtype.newbyteorder("<")).tobytes()
    back = from_raw(raw, dt, arr.shape, "input 'x'")
    assert back.shape == arr.shape
    assert back.dtype == dt.np_dtype
    assert back.tobytes() == arr.tobytes()  # bitwise, so NaNs compare equal


@settings(max_examples=150, deadline=None)
@given(bytes_arrays())
def test_bytes_round_trip_and_tritonclient_framing(arr):
    dt = DATATYPES["BYTES"]
    raw = to_raw(arr, dt)
    # tritonclient's own parser reads the same elements back
    assert list(deserialize_bytes_tensor(raw)) == list(arr.reshape(-1))
    assert len(raw) == sum(4 + len(v) for v in arr.reshape(-1))
    back = from_raw(raw, dt, arr.shape, "input 'x'")
    assert back.shape == arr.shape
    assert back.dtype == object
    assert list(back.reshape(-1)) == list(arr.reshape(-1))


def test_bytes_framing_is_four_byte_little_endian_length():
    arr = np.array([b"ab", b"", b"xyz"], dtype=object)
    raw = to_raw(arr, DATATYPES["BYTES"])
    assert raw == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x03\x00\x00\x00xyz"
    decoded = deserialize_bytes_tensor(raw)
    assert list(decoded) == [b"ab", b"", b"xyz"]
    assert (
        to_raw(np.array([b"hello", b"x"], dtype=object), DATATYPES["BYTES"])
        == serialize_byte_tensor(np.array([b"hello", b"x"], dtype=object)).item()
    )


def test_to_raw_encodes_str_elements_as_utf8():
    arr = np.array(["é", "a"], dtype=object)
    assert to_raw(arr, DATATYPES["BYTES"]) == struct.pack("<I", 2) + "é".encode() + struct.pack("<I", 1) + b"a"


def test_to_raw_casts_to_the_declared_dtype():
    raw = to_raw(np.array([1, 2], dtype=np.int64), DATATYPES["INT16"])
    assert raw == b"\x01\x00\x02\x00"


def test_to_raw_is_row_major_for_non_contiguous_input():
    arr = np.arange(6, dtype=np.int32).reshape(2, 3).T  # Fortran-ordered view
    raw = to_raw(arr, DATATYPES["INT32"])
    assert np.frombuffer(raw, "<i4").tolist() == [0, 3, 1, 4, 2, 5]


def test_from_raw_reads_little_endian():
    out = from_raw(b"\x01\x00\x00\x00\x00\x00\x80\x3f", DATATYPES["FP32"], (2,), "input 'x'")
    assert out.dtype == np.dtype("<f4")
    assert out[1] == 1.0
    out = from_raw(b"\x00\x01", DATATYPES["UINT16"], (1,), "input 'x'")
    assert out[0] == 256


@pytest.mark.parametrize("name", FIXED)
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_byte_count_names_tensor_and_sizes(name, delta):
    dt = DATATYPES[name]
    need = 6 * dt.itemsize
    with pytest.raises(GatewayError) as ei:
        from_raw(b"\x00" * (need + delta), dt, (2, 3), "input 'pixels'")
    e = ei.value
    assert e.code is ErrorCode.INVALID_ARGUMENT
    assert "input 'pixels'" in e.message
    assert str(need + delta) in e.message
    assert str(need) in e.message
    assert name in e.message


def _bytes_error(buf, shape):
    with pytest.raises(GatewayError) as ei:
        from_raw(buf, DATATYPES["BYTES"], shape, "input 'text'")
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT
    assert "input 'text'" in ei.value.message
    return ei.value.message


def test_bytes_missing_elements():
    # every element takes at least its 4-byte length: 5 bytes cannot hold 3 of them
    msg = _bytes_error(struct.pack("<I", 1) + b"a", (3,))
    assert "claims 3 BYTES elements, but 5 bytes of data hold at most 1" in msg


def test_bytes_truncated_length_prefix():
    # 8 bytes could hold 2 elements, but the first takes 5 and leaves 3: no room for a length
    msg = _bytes_error(struct.pack("<I", 1) + b"a" + b"\x02\x00\x00", (2,))
    assert "1 of 2" in msg


def test_bytes_element_longer_than_buffer():
    msg = _bytes_error(struct.pack("<I", 10) + b"abc", (1,))
    assert "10" in msg and "3" in msg


def test_bytes_left_over_data():
    msg = _bytes_error(struct.pack("<I", 1) + b"a" + b"zz", (1,))
    assert "2 bytes left over" in msg


def test_bytes_empty_tensor_with_data_is_refused():
    _bytes_error(struct.pack("<I", 0), (0,))


def _framed_one_by_one(arr: np.ndarray) -> bytes:
    """The BYTES framing element by element (what to_raw did before it laid them out with numpy)."""
    out = b""
    for v in arr.reshape(-1):
        v = v.encode() if isinstance(v, str) else bytes(v) if isinstance(v, bytes | bytearray) else str(v).encode()
        out += struct.pack("<I", len(v)) + v
    return out


@pytest.mark.parametrize(
    "arr",
    [
        np.array([], dtype=object),
        np.array([[b"", b"a"], [b"xyz" * 100, "é"]], dtype=object),
        np.array([bytearray(b"zz"), b"q", 7, 1.5, np.float32(0.1), None, True], dtype=object),
        np.array(["ab", "ç"]),  # numpy str and bytes arrays, not object
        np.array([b"ab", b"c\x00"]),
        np.array([0.1, 2.5], dtype=np.float32),  # numbers keep numpy's str(): 0.1, not 0.10000000149
        np.array([[1, -2]], dtype=np.int64),
    ],
)
def test_bytes_elements_of_every_kind_are_framed_as_one_by_one(arr):
    assert to_raw(arr, DATATYPES["BYTES"]) == _framed_one_by_one(arr)


@given(st.lists(st.one_of(st.binary(max_size=300), st.text(max_size=40)), max_size=200))
@settings(max_examples=50, deadline=None)
def test_bytes_framing_of_mixed_lengths_matches_one_by_one(values):
    arr = np.array(values + [b""], dtype=object)[:-1]  # (an object array even when every value is the same kind)
    assert to_raw(arr, DATATYPES["BYTES"]) == _framed_one_by_one(arr)
