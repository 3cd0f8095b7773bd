"""One process's bound on the bytes of requests still arriving (``max_buffered_request_bytes``):
HTTP bodies not yet whole and the h2 gRPC engine's unfinished messages draw on the same budget.

Until 2026-12-06 each protocol had a budget of its own, so a process could hold twice the setting:
a client that half-sent large bodies on both ports held 2 GiB under a 1 GiB setting. Its users all
run on the process's event loop, so a plain count suffices."""

from __future__ import annotations


class ByteBudget:
    __slots__ = ("limit", "held")

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        """Count ``n`` more bytes held; False (nothing counted) if that would pass the limit."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n
