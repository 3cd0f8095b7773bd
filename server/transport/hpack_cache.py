"""HPACK with memory, for batchgate's own HTTP/2 (``http2.py``: the gRPC engine and the
remote-model client): a gRPC client sends the same header block again and again, and a server
answers with the same few; decoding or encoding each afresh was a fifth of a refused call's time
(py-spy on the h2 engine).

A block's meaning depends on the dynamic table, so a result is reused only while the table has
not changed since it was made (the table counts its changes), and only a block whose own coding
left the table as it was is remembered: a block that inserts into the table must be coded
afresh each time."""

from __future__ import annotations

from typing import Any

import hpack
from hpack.table import HeaderTable

_MAX_BLOCK = 1024  # larger blocks are coded as usual (and never remembered)
_MAX_ENTRIES = 64  # per connection and direction; the memory is emptied when full
# Header fields one block may hold by default (the gRPC engine's: max_header_fields; a gRPC call
# sends 10 to 20). Decoding costs microseconds of Python a field, a one-byte indexed one as much
# as any: max_header_bytes alone let a 3 KB block of 3,000 such fields hold the loop 15 ms.
MAX_FIELDS = 128


class _CountedTable(HeaderTable):
    """A header table that counts its changes (insertions, evictions, size updates)."""

    changes = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.changes += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, new_max: int) -> None:
        self.changes += 1
        HeaderTable.maxsize.fset(self, new_max)  # type: ignore[attr-defined]


class OversizedList(Exception):
    """A header list past the decoder's ``allowed`` size, decoded whole (the dynamic table kept in
    step with the peer's): the one stream is refused, the connection goes on."""


class TooManyFields(Exception):
    """A header block of more than ``max_fields`` fields, refused before it was decoded (the
    dynamic table out of step: the connection must close)."""


def _integer(data: bytes, pos: int, bits: int) -> tuple[int, int]:
    """An HPACK integer with a ``bits``-bit prefix at ``pos`` (RFC 7541 5.1): its value and the
    position after it (past the end for a cut one)."""
    mask = (1 << bits) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift, n = 0, len(data)
    while pos < n:
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return value, pos


def fields_over(data: bytes, limit: int) -> bool:
    """Whether the header block ``data`` holds more than ``limit`` representations, read from
    their prefixes and lengths alone (RFC 7541 6), a tenth of what decoding them costs. A
    malformed block is left for the decoder to refuse."""
    if len(data) <= limit:  # (each takes a byte at least)
        return False
    pos, n, count, updates = 0, len(data), 0, 0
    while pos < n:
        count += 1
        if count > limit:
            return True
        b = data[pos]
        if b & 0x80:  # indexed field
            pos = _integer(data, pos, 7)[1]
            continue
        if b & 0x40:  # literal, indexed
            bits = 6
        elif b & 0x20:  # dynamic table size update: no field (the two a block may start with)
            updates += 1
            count -= updates <= 2
            pos = _integer(data, pos, 5)[1]
            continue
        else:  # literal, not indexed or never indexed
            bits = 4
        index, pos = _integer(data, pos, bits)
        if not index and pos < n:  # a new name: its string first
            length, pos = _integer(data, pos, 7)
            pos += length
        if pos < n:  # the value
            length, pos = _integer(data, pos, 7)
            pos += length
    return False


def _list_size(headers: Any) -> int:
    return sum(len(n) + len(v) + 32 for n, v in headers)  # (HPACK's measure, RFC 7541 4.1)


class CachingDecoder(hpack.Decoder):
    """``max_header_list_size``: past it decoding stops (the table out of step: the connection
    must close); ``allowed``: past it a list decoded whole raises :class:`OversizedList`;
    ``max_fields``: a block of more fields raises :class:`TooManyFields`, undecoded."""

    def __init__(self, max_header_list_size: int, allowed: int | None = None, max_fields: int = MAX_FIELDS):
        super().__init__(max_header_list_size=max_header_list_size)
        self.allowed = max_header_list_size if allowed is None else allowed
        self.max_fields = max_fields
        self.header_table = self._table = _CountedTable()
        self._memory: dict[tuple[bytes, bool], tuple[int, list[Any]]] = {}

    def decode(self, data: bytes, raw: bool = False) -> Any:
        large = len(data) > _MAX_BLOCK
        if not large:
            key = (bytes(data), raw)
            seen = self._memory.get(key)
            if seen is not None and seen[0] == self._table.changes:
                return list(seen[1])  # (measured and its fields counted when it was remembered)
        if len(data) > self.max_fields and fields_over(data, self.max_fields):
            raise TooManyFields
        if large:
            headers = super().decode(data, raw)
            if _list_size(headers) > self.allowed:
                raise OversizedList
            return headers
        table = self._table
        before = table.changes
        headers = super().decode(data, raw)
        if _list_size(headers) > self.allowed:  # (a small block may name large fields of the table)
            raise OversizedList
        if table.changes == before:
            if len(self._memory) >= _MAX_ENTRIES:
                self._memory.clear()
            self._memory[key] = (before, list(headers))
        return headers


class CachingEncoder(hpack.Encoder):
    def __init__(self) -> None:
        super().__init__()
        self.header_table = self._table = _CountedTable()
        self._memory: dict[tuple, tuple[int, bytes]] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        try:
            key = (tuple(headers), huffman)
            hash(key)
        except TypeError:  # not a list of plain tuples: coded as usual
            return super().encode(headers, huffman)
        table = self._table
        seen = self._memory.get(key)
        pending_resize = table.resized  # a size update is due at the front of the next block
        if seen is not None and seen[0] == table.changes and not pending_resize:
            return seen[1]
        before = table.changes
        block = super().encode(key[0], huffman)
        if table.changes == before and not pending_resize and len(block) <= _MAX_BLOCK:
            if len(self._memory) >= _MAX_ENTRIES:
                self._memory.clear()
            self._memory[key] = (before, block)
        return block
