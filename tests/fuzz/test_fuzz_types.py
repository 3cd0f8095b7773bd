"""Fuzz: ``caller_headers`` and ``new_request`` (both wires' last step) accept what their limits
allow, refuse the rest with INVALID_ARGUMENT and a bounded message, and nothing else."""

from __future__ import annotations

import numpy as np
from fuzz_support import CHARS, budget, json_values, limits, refused_or_ok, repeated
from hypothesis import example, given
from hypothesis import strategies as st

from batchgate.core.types import (
    DATATYPES,
    EMPTY,
    REQUEST_ID_HEADER,
    SYNTHETIC_HEADER,
    RequestLimits,
    Tensor,
    caller_headers,
    new_request,
)

LIMITS = RequestLimits()

header_names = st.one_of(
    st.sampled_from([REQUEST_ID_HEADER, SYNTHETIC_HEADER, "x-", "x-a", "content-type", "X-Upper", "grpc-timeout"]),
    st.from_regex(r"x-[a-z0-9_.-]{0,12}", fullmatch=True),
    st.text(max_size=12),
    repeated(st.sampled_from(["x-", "a"]), 100, 10_000).map(lambda s: "x-" + s),
)
header_values = st.one_of(
    st.text(max_size=20),
    st.binary(max_size=10),  # gRPC -bin metadata arrives as bytes: never kept
    st.sampled_from(["1", "true", " YES ", "0", ""]),
    repeated(CHARS, 100, 10_000),
)
header_pairs = st.one_of(
    st.lists(st.tuples(header_names, header_values), max_size=8),
    st.lists(st.tuples(st.from_regex(r"x-[a-z]{1,3}", fullmatch=True), st.just("v")), min_size=30, max_size=60),
)


@budget(0.25)
@given(pairs=header_pairs, lim=limits)
@example(pairs=[("x-a", "1"), ("x-a", "2")], lim=RequestLimits(max_caller_headers=1))
@example(pairs=[("x-" + "a" * 5000, "")], lim=LIMITS)
def test_caller_headers(pairs, lim):
    out = refused_or_ok(caller_headers, pairs, lim)
    kept = [(n, v) for n, v in pairs if n.startswith("x-") and type(v) is str]
    if out is None:  # refused: some header was too long, or there were too many
        assert kept
        assert any(len(n) + len(v) > lim.max_caller_header_bytes for n, v in kept) or (
            len({n for n, _ in kept}) > lim.max_caller_headers
        )
        return
    first: dict[str, str] = {}
    for n, v in kept:
        first.setdefault(n, v)
    assert dict(out) == first
    assert len(out) <= lim.max_caller_headers
    assert all(len(n) + len(v) <= lim.max_caller_header_bytes for n, v in kept)
    if not first:
        assert out is EMPTY


@st.composite
def tensors(draw) -> Tensor:
    dtname = draw(st.sampled_from(list(DATATYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    arr = np.zeros(shape, dtype=DATATYPES[dtname].np_dtype)
    if dtname == "BYTES":
        arr[...] = b""
    if draw(st.booleans()):
        arr.flags.writeable = False
    return Tensor(draw(st.text(max_size=8)), dtname, shape, arr)


def nested(depth: int) -> list:
    """A list nested ``depth`` deep, built without recursion (what orjson returns for one)."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


parameter_values = st.one_of(
    st.builds(nested, st.one_of(st.integers(0, 5), st.integers(900, 1024))),
    st.integers(-5, 10**7),
    st.integers(-(2**63), 2**64),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=10),
    json_values,
)
parameters = st.one_of(
    st.none(),
    st.dictionaries(
        st.one_of(st.sampled_from(["priority", "timeout", "sequence_id"]), st.text(max_size=8)),
        parameter_values,
        max_size=5,
    ),
    st.dictionaries(st.text(max_size=6), st.integers(), min_size=60, max_size=80),
)
request_ids = st.one_of(
    st.text(max_size=20),
    repeated(st.sampled_from(["a", "é", "名", "𝄞"]), 50, 2000),  # 1 to 4 bytes a character
)
headers = st.one_of(
    st.just(EMPTY),
    st.dictionaries(
        st.sampled_from([REQUEST_ID_HEADER, SYNTHETIC_HEADER, "x-other"]),
        st.one_of(st.text(max_size=10), request_ids, st.sampled_from(["1", "true", " Yes ", "no"])),
        max_size=3,
    ),
)


@budget(0.25)
@given(
    inputs=st.lists(tensors(), max_size=3),
    outputs=st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "c", ""]), max_size=4)),
    request_id=request_ids,
    params=parameters,
    hdrs=headers,
    arrival=st.floats(0, 1e9),
    deadline=st.one_of(st.none(), st.floats(0, 1e9)),
    lim=limits,
)
@example(
    inputs=[],
    outputs=None,
    request_id="",
    params={"priority": [[[]]], "timeout": 2**64},
    hdrs=EMPTY,
    arrival=0.0,
    deadline=None,
    lim=LIMITS,
)
@example(
    inputs=[],
    outputs=None,
    request_id="名" * 86,  # 258 bytes in 86 characters: the quick length test must not let it through
    params=None,
    hdrs=EMPTY,
    arrival=0.0,
    deadline=None,
    lim=LIMITS,
)
def test_new_request(inputs, outputs, request_id, params, hdrs, arrival, deadline, lim):
    req = refused_or_ok(
        new_request, "m", "", list(inputs), outputs, request_id, params, hdrs, arrival, "http", lim, deadline
    )
    if req is None:
        return
    assert all(not t.data.flags.writeable for t in req.inputs)
    assert req.outputs is None or len(set(req.outputs)) == len(req.outputs)
    assert type(req.priority) is int and req.priority >= 0
    assert type(req.timeout_us) is int and req.timeout_us >= 0
    assert len(req.id.encode()) <= lim.max_request_id_bytes
    assert req.id == (request_id or (hdrs.get(REQUEST_ID_HEADER, "") if hdrs else ""))
    assert len(req.parameters) <= lim.max_request_parameters
    if deadline is not None:
        assert req.deadline is not None and req.deadline <= deadline
    if req.timeout_us:
        assert req.deadline is not None and req.deadline <= arrival + req.timeout_us / 1e6
    assert req.synthetic == (bool(hdrs) and hdrs.get(SYNTHETIC_HEADER, "").strip().lower() in ("1", "true", "yes"))
