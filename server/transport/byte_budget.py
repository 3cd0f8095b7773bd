"""One process's bounds on bytes held for its clients: requests still arriving (below), and
answers that clients do not take (:class:`UnsentAnswers`).

The bound on the bytes of requests still arriving (``max_buffered_request_bytes``):
HTTP bodies not yet whole and the h2 gRPC engine's unfinished messages draw on the same budget.

Until 2026-12-06 each protocol had a budget of its own, so a process could hold twice the setting:
a client that half-sent large bodies on both ports held 2 GiB under a 1 GiB setting. Its users all
run on the process's event loop, so a plain count suffices."""

from __future__ import annotations

from typing import Protocol


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


class Holder(Protocol):
    def evict_unsent(self) -> None:
        """Let go of the answer bytes held (abort the connection): the process holds too many."""


class UnsentAnswers:
    """One process's bound on answer bytes written for clients that do not take them
    (``max_unsent_answer_bytes``): HTTP connections whose transport has more than its high-water
    mark to write, or that were closed with bytes left, and on the h2 gRPC engine the answers
    that wait for a client's flow-control window plus a paused connection's buffer.

    Each holder's count is set as it changes (:meth:`hold`). Past the limit, the holder of the
    most goes, then the next, until the rest fit: its connection is aborted (a proxy's overload
    manager resets the streams with the largest buffers the same way). A client that takes its
    answers as they come holds little; one that leaves large answers unread holds the most and
    goes first. Without this, a client that asked
    for large answers on many connections and read none held them, every one, until
    ``http_body_timeout_s`` (and for ever at 16 KiB a second each)."""

    __slots__ = ("limit", "total", "held", "evicted")

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0
        self.held: dict[Holder, int] = {}
        self.evicted = 0

    def hold(self, holder: Holder, n: int) -> None:
        """``holder`` now holds ``n`` unsent bytes (0: none)."""
        before = self.held.pop(holder, 0)
        self.total -= before
        if n <= 0:
            return
        self.held[holder] = n
        self.total += n
        while self.total > self.limit and self.held:
            worst = max(self.held, key=self.held.__getitem__)
            self.release(worst)
            self.evicted += 1
            worst.evict_unsent()

    def release(self, holder: Holder) -> None:
        self.total -= self.held.pop(holder, 0)
