"""Fuzz: a small request never makes a decoder allocate much. Inputs of at most 4 KiB are
decoded under ``tracemalloc`` (numpy registers its buffers with it) and the peak must stay
under 64 MiB: a shape, a count or a length field in a few bytes must never size an allocation
by itself."""

from __future__ import annotations

import tracemalloc

import pytest
from fuzz_support import budget, compressed_bodies, http_bodies, refused_or_ok, wire_messages
from google.protobuf.message import DecodeError
from hypothesis import assume, example, given
from tritonclient.grpc import service_pb2 as pb

from batchgate.core.types import RequestLimits
from batchgate.transport import grpc_codec, http_codec

SMALL = 4096
PEAK_LIMIT = 64 * 1024 * 1024
LIMITS = RequestLimits()


@pytest.fixture(scope="module")
def traced():
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    yield
    if started:
        tracemalloc.stop()


def peak_of(fn, *args) -> int:
    """Bytes allocated at the peak of ``fn(*args)``, above what was allocated before it."""
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    refused_or_ok(fn, *args)
    _, peak = tracemalloc.get_traced_memory()
    return peak - before


def http_decode(body: bytes, header_length: str | None) -> None:
    http_codec.decode_request(body, header_length, "m", "", 1.0, LIMITS)


def grpc_decode(data: bytes) -> None:
    try:
        msg = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return
    grpc_codec.decode_request(msg, 1.0, LIMITS)


@budget(0.04)
@given(case=http_bodies(huge=False))
@example(case=(b'{"inputs":[{"name":"a","datatype":"BYTES","shape":[1000000000],"data":[]}]}', None))
@example(case=(b'{"inputs":[{"name":"a","datatype":"FP32","shape":[0,4611686018427387904,4],"data":[]}]}', None))
@example(
    case=(
        b'{"inputs":[{"name":"a","datatype":"BYTES","shape":[1000000],"parameters":{"binary_data_size":4}}]}\xff\xff\xff\x7f',
        "88",
    )
)
def test_http_decode_small_input_small_peak(traced, case):
    body, header_length = case
    assume(len(body) <= SMALL and len(header_length or "") <= SMALL)
    assert peak_of(http_decode, body, header_length) < PEAK_LIMIT


@budget(0.04)
@given(data=wire_messages())
def test_grpc_decode_small_input_small_peak(traced, data):
    assume(len(data) <= SMALL)
    assert peak_of(grpc_decode, data) < PEAK_LIMIT


@budget(0.04)
@given(case=compressed_bodies())
def test_decompress_small_input_small_peak(traced, case):
    """Inflating at most 4 KiB, with the limit a server has by default (64 MiB), stays under it."""
    body, encoding = case
    assume(len(body) <= SMALL)
    assert peak_of(http_codec.decompress, body, encoding, 64 * 1024 * 1024, 64) < PEAK_LIMIT
