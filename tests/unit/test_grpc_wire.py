"""gRPC's HTTP/2 conventions as batchgate's own engine reads and writes them (grpc_wire.py)."""

from __future__ import annotations

import base64
import gzip
import struct
import zlib

import pytest

from batchgate.transport import grpc_wire
from batchgate.transport.grpc_wire import WireError


@pytest.mark.parametrize(
    "text, seconds",
    [(b"100m", 0.1), (b"5S", 5.0), (b"2M", 120.0), (b"1H", 3600.0), (b"250u", 250e-6), (b"99999999n", 0.099999999)],
)
def test_timeouts_in_every_unit(text, seconds):
    assert grpc_wire.parse_timeout(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [b"", b"S", b"10", b"10s", b"-1S", b"1.5S", b"123456789S", b"1 S"])
def test_malformed_timeouts_are_none(text):
    assert grpc_wire.parse_timeout(text) is None


@pytest.mark.parametrize(
    "seconds, text",
    [(0.0001, b"1m"), (2.5, b"2500m"), (99_999.999, b"99999999m"), (100_000.0, b"100000S"), (7 * 86_400.0, b"604800S"),
     (1e8, b"1666667M"), (1e10, b"2777778H"), (1e20, b"99999999H")],
)  # fmt: skip
def test_a_timeout_is_written_in_the_finest_unit_within_eight_digits(seconds, text):
    assert grpc_wire.encode_timeout(seconds) == text
    assert grpc_wire.parse_timeout(text) >= min(seconds, 99_999_999 * 3600) - 0.001  # never shorter


def test_messages_split_at_their_prefixes_and_a_partial_one_waits():
    buf = bytearray(grpc_wire.frame(b"abc") + grpc_wire.frame(b"") + grpc_wire.frame(b"xyz")[:6])
    messages, used = grpc_wire.split_messages(buf, 100)
    assert messages == [(False, b"abc"), (False, b"")]
    assert used == 8 + 5
    del buf[:used]
    buf += grpc_wire.frame(b"xyz")[6:]
    assert grpc_wire.split_messages(buf, 100) == ([(False, b"xyz")], 8)


def test_a_message_over_the_limit_is_refused_from_its_prefix_alone():
    prefix = struct.pack(">BI", 0, 1 << 30)  # claims a GiB, sends 5 bytes
    with pytest.raises(WireError) as e:
        grpc_wire.split_messages(bytearray(prefix), 1 << 20)
    assert e.value.code == "RESOURCE_EXHAUSTED" and "1073741824 vs. 1048576" in e.value.message


def test_a_bad_compressed_flag_is_an_error():
    with pytest.raises(WireError, match="compressed flag is 7"):
        grpc_wire.split_messages(bytearray(b"\x07\x00\x00\x00\x00"), 10)


def test_gzip_and_deflate_messages_decompress():
    data = b"tensor bytes " * 100
    assert grpc_wire.decompress(gzip.compress(data), b"gzip", 10_000) == data
    assert grpc_wire.decompress(zlib.compress(data), b"deflate", 10_000) == data


def test_a_small_message_that_inflates_past_the_limit_is_refused():
    bomb = gzip.compress(b"\0" * (10 << 20))  # ~10 KB on the wire
    with pytest.raises(WireError) as e:
        grpc_wire.decompress(bomb, b"gzip", 1 << 20)
    assert e.value.code == "RESOURCE_EXHAUSTED"


def test_corrupt_or_undeclared_compression_is_an_error():
    with pytest.raises(WireError, match="could not be decompressed"):
        grpc_wire.decompress(b"not gzip", b"gzip", 100)
    with pytest.raises(WireError, match="no grpc-encoding"):
        grpc_wire.decompress(b"x", b"", 100)


def test_a_compressed_message_cut_short_or_with_bytes_after_its_end_is_an_error():
    """Both had passed: the part inflated so far was taken as the message, and a second gzip
    member (or anything after the first) was dropped."""
    data = b"tensor bytes " * 100
    for packed, encoding in ((gzip.compress(data), b"gzip"), (zlib.compress(data), b"deflate")):
        with pytest.raises(WireError, match="ends before"):
            grpc_wire.decompress(packed[:-6], encoding, 10_000)
        with pytest.raises(WireError, match="bytes after the end"):
            grpc_wire.decompress(packed + packed, encoding, 10_000)


def test_metadata_leaves_out_grpc_s_own_headers_and_decodes_binary_values():
    headers = [
        (b":path", b"/a/b"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-timeout", b"1S"),
        (b"authorization", b"Bearer t"),
        (b"trace-bin", base64.b64encode(b"\x00\x01\xff").rstrip(b"=")),
        (b"bad-bin", b"!!!not base64"),
    ]
    assert grpc_wire.metadata(headers) == (("authorization", "Bearer t"), ("trace-bin", b"\x00\x01\xff"))


def test_metadata_round_trips_through_encode():
    pairs = (("x-batchgate-variant", "canary"), ("blob-bin", b"\x00\xfe"))
    assert grpc_wire.metadata(grpc_wire.encode_metadata(pairs)) == pairs


def test_status_messages_are_percent_encoded():
    fields = dict(grpc_wire.status_fields(3, "bad 'x'\n100% wrong: ü"))
    assert fields[b"grpc-status"] == b"3"
    assert fields[b"grpc-message"] == b"bad 'x'%0A100%25 wrong: %C3%BC"
    assert grpc_wire.status_fields(0, "") == [(b"grpc-status", b"0")]
