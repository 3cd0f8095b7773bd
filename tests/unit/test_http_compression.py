"""Infer body compression helpers: decompress (with a size limit), pick_encoding, compress.

Compressed responses are read back the way tritonclient.http does it
(``parse_response_body(..., content_encoding=...)``)."""

import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.types import InferResponse, Tensor
from batchgate.transport.http_codec import OutputOptions, compress, decompress, encode_response, pick_encoding

PAYLOAD = b'{"inputs": []}' * 50


def refused(body, encoding, limit=1 << 20) -> str:
    with pytest.raises(GatewayError) as ei:
        decompress(body, encoding, limit)
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT
    return ei.value.message


@pytest.mark.parametrize(
    "encoding,packed",
    [
        ("gzip", gzip.compress(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)),  # tritonclient's "deflate" is zlib-wrapped
        (" GZip ", gzip.compress(PAYLOAD)),
    ],
    ids=["gzip", "deflate", "gzip-spaced-mixed-case"],
)
def test_decompress(encoding, packed):
    assert decompress(packed, encoding, 1 << 20) == PAYLOAD


@pytest.mark.parametrize("encoding", [None, "", "identity"])
def test_no_encoding_passes_the_body_through(encoding):
    assert decompress(b"\x00raw", encoding, 2) == b"\x00raw"  # no limit applies to a plain body here


def test_output_exactly_at_the_limit_is_accepted():
    assert decompress(gzip.compress(b"a" * 1000), "gzip", 1000) == b"a" * 1000


def test_decompression_bomb_over_the_limit_is_refused():
    bomb = gzip.compress(b"\x00" * (50 * 1024 * 1024))  # ~50 KB that expands to 50 MiB
    assert len(bomb) < 100_000
    msg = refused(bomb, "gzip", limit=1024 * 1024)
    assert str(1024 * 1024) in msg
    msg = refused(zlib.compress(b"\x00" * 2_000_001), "deflate", limit=2_000_000)
    assert "2000000" in msg


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "x-gzip"])
def test_unknown_encoding_is_refused(encoding):
    msg = refused(b"whatever", encoding)
    assert repr(encoding) in msg or encoding in msg
    assert "gzip" in msg and "deflate" in msg


def test_corrupt_body_is_refused():
    assert "corrupt" in refused(b"this is not gzip", "gzip")
    assert "corrupt" in refused(b"nor zlib", "deflate")


@pytest.mark.parametrize(
    "encoding,packed", [("gzip", gzip.compress(PAYLOAD)), ("deflate", zlib.compress(PAYLOAD))], ids=["gzip", "deflate"]
)
def test_truncated_body_is_refused(encoding, packed):
    refused(packed[:-6], encoding)


def test_multi_member_gzip_is_not_silently_cut():
    body = gzip.compress(b"first-") + gzip.compress(b"second")
    try:
        out = decompress(body, "gzip", 1 << 20)
    except GatewayError:
        return  # refusing is also acceptable
    assert out == b"first-second"


def test_identity_is_case_insensitive():
    assert decompress(b"{}", "Identity", 10) == b"{}"


# ---------------------------------------------------------------- pick_encoding
@pytest.mark.parametrize(
    "accept,expected",
    [
        (None, None),
        ("", None),
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("gzip, deflate, br", "gzip"),  # what aiohttp sends: first on a tie
        ("deflate, gzip", "deflate"),
        ("br", None),
        ("identity", None),
        ("identity, gzip", None),
        ("gzip;q=0.5, deflate;q=0.8", "deflate"),
        ("gzip;q=0, deflate;q=0", None),
        ("deflate;q=0.1, identity;q=0.5", None),
        ("GZIP", "gzip"),
        ("gzip ; q=0.9 , deflate ; q=1.0", "deflate"),
        ("gzip;q=bogus, deflate;q=0.2", "deflate"),
    ],
)
def test_pick_encoding(accept, expected):
    assert pick_encoding(accept) == expected


# ---------------------------------------------------------------- compress
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compress_round_trips_with_standard_decoders(encoding):
    packed = compress(PAYLOAD, encoding)
    assert len(packed) < len(PAYLOAD)
    assert (gzip.decompress(packed) if encoding == "gzip" else zlib.decompress(packed)) == PAYLOAD
    assert decompress(packed, encoding, len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_binary_response_parses_in_tritonclient(encoding):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    req = OutputOptions(binary_default=True)
    body, n = encode_response(InferResponse("m", "1", [Tensor("y", "FP32", (3, 4), arr)]), req)
    assert n is not None and json.loads(body[:n])["outputs"][0]["parameters"]["binary_data_size"] == 48
    result = httpclient.InferenceServerClient.parse_response_body(
        compress(body, encoding), header_length=n, content_encoding=encoding
    )
    np.testing.assert_array_equal(result.as_numpy("y"), arr)


def test_gzip_members_are_bounded():
    many = b"".join(gzip.compress(b"") for _ in range(100_000)) + gzip.compress(b"end")
    msg = refused(many, "gzip")
    assert msg == "the gzip request body has more than 64 members (max_gzip_members)"
    # under a raised bound the same body inflates (in chunks: no copy of the rest of the body per member)
    assert decompress(many, "gzip", 1 << 20, max_members=200_000) == b"end"
    two = gzip.compress(b"a") + gzip.compress(b"b")
    assert decompress(two, "gzip", 10, max_members=2) == b"ab"
    with pytest.raises(GatewayError, match=r"\(max_gzip_members\)"):
        decompress(two, "gzip", 10, max_members=1)


def test_members_spanning_chunk_boundaries_inflate_exactly():
    from batchgate.transport.http_codec import DECOMPRESS_CHUNK

    rng = np.random.default_rng(3)
    pieces = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (10, DECOMPRESS_CHUNK + 7, 3, 200_000)]
    body = b"".join(gzip.compress(p) for p in pieces)
    assert decompress(body, "gzip", 1 << 22) == b"".join(pieces)
    with pytest.raises(GatewayError, match="truncated"):
        decompress(body[:-5], "gzip", 1 << 22)
