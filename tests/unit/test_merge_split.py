"""merge/split: for every datatype and any mix of batch sizes, each caller gets exactly its
own rows, in order, exactly once."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batchgate.core.batching import merge, split
from batchgate.core.types import DATATYPES


def _rows(dt, n, width, seed):
    rng = np.random.default_rng(seed)
    if dt.v2 == "BYTES":
        arr = np.empty((n, width), dtype=object)
        for i in range(n):
            for j in range(width):
                arr[i, j] = f"s{seed}-{i}-{j}".encode() * int(rng.integers(0, 3))
        return arr
    if dt.v2 == "BOOL":
        return rng.integers(0, 2, (n, width)).astype(bool)
    return rng.integers(0, 100, (n, width)).astype(dt.np_dtype)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(DATATYPES)), st.lists(st.integers(1, 5), min_size=1, max_size=8), st.integers(1, 3))
def test_merge_then_split_gives_each_caller_its_rows(dtype, sizes, width):
    dt = DATATYPES[dtype]
    parts = [{"x": _rows(dt, n, width, i), "y": _rows(dt, n, 1, 100 + i)} for i, n in enumerate(sizes)]
    merged = merge(parts)
    assert merged["x"].shape == (sum(sizes), width)
    back = split([merged["x"], merged["y"]], sizes)
    assert len(back) == len(sizes)
    for part, (x, y) in zip(parts, back):
        assert x.dtype == part["x"].dtype
        np.testing.assert_array_equal(x, part["x"])
        np.testing.assert_array_equal(y, part["y"])


def test_split_refuses_outputs_with_the_wrong_number_of_rows():
    import pytest

    with pytest.raises(ValueError):
        split([np.zeros((3, 2))], [1, 1])


def test_merge_of_one_request_is_that_request():
    part = {"x": np.ones((2, 2))}
    assert merge([part]) is part
