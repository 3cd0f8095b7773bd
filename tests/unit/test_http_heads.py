"""The plain infer request the quick overload refusal judges from its bytes alone
(``transport/http_heads.plain_head``): a head that some parser could frame otherwise is not plain."""

from __future__ import annotations

import pytest

from batchgate.transport.http_heads import declared_length, plain_head

LINE = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"


def test_a_plain_head_gives_its_model_and_length():
    assert plain_head(LINE + b"Content-Length: 42") == ("mlp", 42)
    # the binary extension's header frames nothing for a proxy: still plain
    assert plain_head(LINE + b"Inference-Header-Content-Length: 30\r\nContent-Length: 42") == ("mlp", 42)


def test_with_cors_a_head_with_an_origin_is_not_plain():
    """Its answer carries the CORS headers of its origin, judged on the usual way (cors.py)."""
    head = LINE + b"Origin: https://app.example.com\r\nContent-Length: 42"
    assert plain_head(head) == ("mlp", 42)
    assert plain_head(head, cors=True) is False
    assert plain_head(head.replace(b"Origin", b"ORIGIN"), cors=True) is False
    assert plain_head(LINE + b"Content-Length: 42", cors=True) == ("mlp", 42)


@pytest.mark.parametrize(
    "headers",
    [
        b"Transfer-Encoding: chunked\r\nContent-Length: 42",
        b"Transfer-Encoding : chunked\r\nContent-Length: 42",
        b"Transfer-Encoding\t: chunked\r\nContent-Length: 42",
        b"X: y\r\nTransfer-encoding\x0b: chunked\r\nContent-Length: 42",
        b"Content-Length: 42\r\nContent-Length: 42",
        b"Content-Length: 42\r\nContent-Length : 3",
        b"Content-Length\t: 3\r\nContent-Length: 42",
        b"Content-Length: 42\r\n folded",
        b"Content-Length: 42\nX: bare LF",
    ],
)
def test_a_head_another_parser_could_frame_otherwise_is_not_plain(headers):
    """Until 2026-12-06 a framing header's name spelt with a space or tab before its colon went
    unseen here: the request was refused 429 from its line, its body cut by Content-Length, where
    httptools refuses the head (400) and a proxy in front may take it as chunked (smuggling)."""
    assert plain_head(LINE + headers) is False


@pytest.mark.parametrize("digits", [b"9" * 5000, b"0" * 5000 + b"42", b"1" * 19])
def test_a_content_length_of_more_digits_than_any_body_is_not_plain(digits):
    """Python refuses to read an integer of more than 4,300 digits (ValueError): a head with such
    a Content-Length, sent while the model was shedding, failed the protocol's data_received
    (the connection dropped without an answer, an ERROR traceback logged for each). httptools
    judges such a head instead."""
    assert plain_head(LINE + b"Content-Length: " + digits) is False


def test_the_declared_length_of_a_parsed_head():
    """What a refused request's body is judged by (close, or read and drop it): leading zeros
    read as a number, more than 18 digits as past any limit, none (chunked) as -1."""
    assert declared_length([(b"host", b"x"), (b"content-length", b"0042 ")]) == 42
    assert declared_length([(b"content-length", b"0" * 5000 + b"7")]) == 7
    assert declared_length([(b"content-length", b"9" * 30)]) > 1 << 61
    assert declared_length([(b"transfer-encoding", b"chunked")]) == -1
