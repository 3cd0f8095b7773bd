"""The remembering HPACK coder of the h2 gRPC engine codes exactly as a plain one does, also
when the dynamic table changes between two identical blocks."""

from __future__ import annotations

import random
import urllib.parse

import hpack
import pytest

from batchgate.transport.hpack_cache import CachingDecoder, CachingEncoder, TooManyFields, fields_over

GRPC = [(b":method", b"POST"), (b":path", b"/inference.GRPCInferenceService/ModelInfer"), (b"te", b"trailers")]


def _blocks(seed: int, n: int = 300) -> list[list[tuple[bytes, bytes]]]:
    """Header lists as a client sends them: mostly the same, sometimes a new value (which
    enters the table and evicts others), now and then a large one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        headers = list(GRPC)
        if rng.random() < 0.3:
            headers.append((b"x-request-id", b"r%d" % rng.randrange(50)))
        if rng.random() < 0.05:
            headers.append((b"x-big", b"v" * rng.randrange(500, 3000)))
        out.append(headers)
    return out


def test_decoding_with_memory_equals_decoding_without():
    for seed in range(5):
        encoder = hpack.Encoder()
        plain, caching = hpack.Decoder(), CachingDecoder(65536)
        for i, headers in enumerate(_blocks(seed)):
            if i == 150:
                encoder.header_table_size = 256  # a size update mid-stream
                plain.header_table_size = caching.header_table_size = 256
            block = encoder.encode(headers)
            assert caching.decode(block, raw=True) == plain.decode(block, raw=True)
        assert caching._memory  # it did remember blocks


def test_encoding_with_memory_decodes_as_the_headers_given():
    for seed in range(5):
        encoder, decoder = CachingEncoder(), hpack.Decoder()
        for i, headers in enumerate(_blocks(seed)):
            if i == 150:
                encoder.header_table_size = 512
            assert decoder.decode(encoder.encode(headers), raw=True) == headers
        assert encoder._memory


def test_a_remembered_block_is_not_reused_once_the_table_changed():
    caching = CachingDecoder(65536)
    caching.decode(hpack.Encoder().encode([(b"x-a", b"1")]), raw=True)  # x-a: 1 enters at index 62
    indexed = bytes([0x80 | 62])  # one byte: "the entry at index 62"
    assert caching.decode(indexed, raw=True) == [(b"x-a", b"1")]
    assert caching.decode(indexed, raw=True) == [(b"x-a", b"1")]  # (remembered)
    caching.decode(hpack.Encoder().encode([(b"x-b", b"2")]), raw=True)  # x-b: 2 enters at index 62
    assert caching.decode(indexed, raw=True) == [(b"x-b", b"2")]  # the same byte now means x-b


def test_refusals_with_changing_messages_leave_the_table_and_the_remembered_answers_alone():
    """Under overload every refusal may carry another message (the work queued, in ms). Indexed,
    each went into the connection's dynamic table, so the OK answers' remembered blocks were
    coded afresh after each one; a never-indexed grpc-message leaves the table as it was."""
    from batchgate.transport.grpc_h2_connection import OK_HEADERS
    from batchgate.transport.grpc_wire import status_fields

    encoder, decoder = CachingEncoder(), hpack.Decoder()
    ok = [*OK_HEADERS, (b"grpc-status", b"0")]
    decoder.decode(encoder.encode(ok), raw=True)
    decoder.decode(encoder.encode(OK_HEADERS + status_fields(8, "first")), raw=True)  # (grpc-status 8 goes in once)
    remembered = encoder.encode(ok)
    changes = encoder._table.changes
    for ms in range(200, 260):
        message = f"model 'mlp' has about {ms} ms of work queued, more than the 100 ms a request may wait"
        got = decoder.decode(encoder.encode(OK_HEADERS + status_fields(8, message)), raw=True)
        assert got[-1][0] == b"grpc-message" and urllib.parse.unquote(got[-1][1].decode()) == message
        assert encoder.encode(ok) is remembered  # (the very block: not coded again)
    assert encoder._table.changes == changes


def _fields(seed: int, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` header fields of every representation hpack makes: indexed, literal with a table
    name or a new one, values long enough for multi-byte lengths, never-indexed ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            out.append((b":method", b"POST"))
        elif kind == 1:
            out.append((b"user-agent", bytes(rng.randrange(256) for _ in range(rng.randrange(300)))))
        elif kind == 2:
            out.append((b"x-%d" % i, b"v" * rng.randrange(200)))
        else:
            out.append(hpack.NeverIndexedHeaderTuple(b"authorization", b"t%d" % i))
    return out


def test_a_block_of_more_fields_than_allowed_is_refused_before_it_is_decoded():
    """Each field costs microseconds of Python to decode, a one-byte indexed one as much as any:
    a 3 KB block of 3,000 of them held the loop 15 ms, and one connection sending such blocks
    took other clients' median answer from 0.8 ms to 1.8 s. Fields are counted from their
    prefixes first (without decoding them); past ``max_fields`` the block is refused whole."""
    limit = CachingDecoder(1 << 20).max_fields
    for seed in range(20):
        encoder = hpack.Encoder()
        headers = _fields(seed, limit)
        block = encoder.encode(headers)
        decoder = CachingDecoder(1 << 20)
        assert len(decoder.decode(block, raw=True)) == limit  # the most allowed
        over = encoder.encode([*_fields(seed + 100, limit), (b"te", b"trailers")])
        with pytest.raises(TooManyFields):
            decoder.decode(over, raw=True)
    with pytest.raises(TooManyFields):
        CachingDecoder(1 << 20).decode(b"\x82" * (limit + 1), raw=True)


def test_fields_are_counted_exactly_from_their_prefixes():
    for seed in range(30):
        encoder = hpack.Encoder()
        for n in (1, 5, 40, 129):
            block = encoder.encode(_fields(seed * 7 + n, n), huffman=bool(seed % 2))
            assert not fields_over(block, n) and (n == 1 or fields_over(block, n - 1)), (seed, n)


def test_a_table_size_update_is_not_a_field_and_a_remembered_block_is_not_counted_again():
    """A block may start with up to two dynamic table size updates, which are no fields: a block of
    exactly the fields allowed that started with one closed the connection. And a block the
    decoder remembers was counted when first decoded: counting it again on every call cost a
    repeated 200-byte block 5.7 us where a remembered one costs 0.3."""
    for seed in range(10):
        encoder = hpack.Encoder()
        encoder.header_table_size = 2048  # (the next block starts with the size update)
        block = encoder.encode(_fields(seed, 10))
        assert block[0] & 0xE0 == 0x20
        assert not fields_over(block, 10) and fields_over(block, 9)
    assert fields_over(b"\x3f\xe1\x1f" * 3 + b"\x82" * 10, 10)  # (past two, updates count)
    assert not fields_over(b"\x3f\xe1\x1f" * 2 + b"\x82" * 10, 10)
    decoder, encoder = CachingDecoder(1 << 20), hpack.Encoder()
    headers = [(b"x-a%d" % i, b"v" * 10) for i in range(12)]
    decoder.decode(encoder.encode(headers), raw=True)  # (enters the table)
    again = encoder.encode(headers)  # (12 indexed fields: remembered once decoded)
    decoder.decode(again, raw=True)
    decoder.max_fields = 4  # (as if the block had been counted once: a hit is not counted again)
    assert len(decoder.decode(again, raw=True)) == 12
