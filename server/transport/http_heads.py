"""Raw HTTP/1.1 request heads, read before httptools sees them (``http_limits.py``): the plain
infer request the quick overload refusal may answer from its bytes alone, and the Upgrade header
renamed so that httptools serves such a request as HTTP/1.1."""

from __future__ import annotations

import re
from typing import Literal

QUICK_PREFIX = b"POST /v2/models/"
_QUICK_SUFFIX = b"/infer HTTP/1.1"
# headers that make a request more than a plain one: such a request takes the usual way
# (besides Transfer-Encoding, refused wherever its name appears: see plain_head)
_NOT_PLAIN = (b"\nexpect:", b"\nconnection:", b"\nupgrade:")
# batchgate upgrades no connection (no WebSocket, no h2c), but httptools stops at a request that
# offers an upgrade and never reads its body (uvicorn then hands the app an empty one): Java's
# HttpClient offers h2c on every http:// POST. The header is renamed before httptools sees it.
_UPGRADE_NAME = b"\r\nupgrade:"
_UPGRADE = re.compile(re.escape(_UPGRADE_NAME), re.IGNORECASE)
_RENAMED = b"\r\nx-upgrd:"  # (as long as the name it replaces)


def rename_upgrade(data: bytes, stop: int) -> bytes:
    """``data`` with every Upgrade header in its first ``stop`` bytes (a request head) renamed.
    The name in any case, as httptools reads it (a pre-check for "pgrade" or "PGRADE" let
    "UpGrade" through until 2026-12-06, and was slower than this search)."""
    if _UPGRADE.search(data, 0, stop) is None:
        return data
    return _UPGRADE.sub(_RENAMED, data[:stop]) + data[stop:]


def cut_upgrade(data: bytes) -> int:
    """How many bytes at the end of ``data`` may begin an Upgrade header line that the next read
    ends (``\\r``, ``\\r\\nUpg``...): they wait for it, so that the renaming sees the name whole."""
    tail = data[-(len(_UPGRADE_NAME) - 1) :].lower()
    for k in range(len(tail), 0, -1):
        if _UPGRADE_NAME.startswith(tail[-k:]):
            return k
    return 0


def plain_head(head: bytes, cors: bool = False) -> tuple[str, int] | Literal[False]:
    """The model and Content-Length of a plain infer request's head (its request line and
    headers, without the blank line): HTTP/1.1, ``POST /v2/models/NAME/infer``, one
    Content-Length, no Transfer-Encoding, Expect, Connection or Upgrade header, strict framing
    (CRLF line ends, no folded lines, so that no parser in front of us can cut these bytes into
    requests differently: smuggling). False for any other head: it takes the usual way. With
    ``cors``, a head with an Origin header is not plain: its answer carries the CORS headers of
    its origin (``cors.py``), which are judged on the usual way."""
    line_end = head.find(b"\r\n")
    if line_end < 0 or not head.endswith(_QUICK_SUFFIX, 0, line_end):
        return False
    name = head[len(QUICK_PREFIX) : line_end - len(_QUICK_SUFFIX)]
    rest = head[line_end:].lower() + b"\r\n"
    i = rest.find(b"\ncontent-length:")
    # The framing headers' names anywhere else, spelt as httptools refuses them but a parser in
    # front may take them ("Transfer-Encoding : chunked", "Content-Length\t:"), make the head
    # not plain: only one way to cut it into requests is judged from the request line. (The
    # binary extension's Inference-Header-Content-Length frames nothing for a proxy.)
    lengths = rest.count(b"content-length") - rest.count(b"inference-header-content-length")
    if b"/" in name or i < 0 or lengths != 1 or b"transfer-encoding" in rest:
        return False
    if _NOT_PLAIN[0] in rest or _NOT_PLAIN[1] in rest or _NOT_PLAIN[2] in rest:
        return False
    if cors and b"\norigin:" in rest:
        return False
    crlf = rest.count(b"\r\n")
    if rest.count(b"\n") != crlf or rest.count(b"\r") != crlf or b"\n " in rest or b"\n\t" in rest:
        return False
    length = rest[i + 16 : rest.find(b"\r", i)].strip()
    # (at most 18 digits: no body is longer, and int() refuses more than 4,300, ValueError)
    if not length.isdigit() or len(length) > 18 or not name.isascii():
        return False
    return name.decode("ascii"), int(length)


def declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The Content-Length of a parsed head (its names in lower case, as uvicorn keeps them), -1
    when there is none (chunked). httptools has checked it is digits; any number of leading zeros
    is allowed, and a number past 18 digits is read as larger than any limit (int() refuses
    past 4,300 digits)."""
    for name, value in headers:
        if name == b"content-length":
            return content_length(value)
    return -1


def content_length(value: bytes) -> int:
    """A Content-Length value as a number: any number of leading zeros is allowed, and past 18
    digits it is read as larger than any limit (int() refuses past 4,300 digits); ValueError
    when it is not a number."""
    digits = value.strip().lstrip(b"0")
    return 1 << 62 if len(digits) > 18 and digits.isdigit() else int(digits or b"0")
