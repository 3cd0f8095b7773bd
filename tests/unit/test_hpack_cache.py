"""The remembering HPACK coder of the h2 gRPC engine codes exactly as a plain one does, also
when the dynamic table changes between two identical blocks."""

from __future__ import annotations

import random
import urllib.parse

import hpack

from batchgate.transport.hpack_cache import CachingDecoder, CachingEncoder

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
