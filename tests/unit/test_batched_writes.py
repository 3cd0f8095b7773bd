"""transport/batched_writes.py: an answer written now goes after what the connection keeps, and
the loop's turn still counts as a writing one (the retry rule of http_limits.py reads it)."""

from __future__ import annotations

import asyncio

from batchgate.transport.batched_writes import BatchedWrites, WriteBatch


class Transport:
    """A socket's transport that records what it is asked to write."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def test_a_write_now_goes_out_at_once_after_what_was_kept_and_the_turn_still_counts():
    async def main() -> None:
        batch = WriteBatch()
        batch.loop = asyncio.get_running_loop()
        t = Transport()
        w = BatchedWrites(t, batch)
        w.write(b"kept-1 ")
        w.write(b"kept-2 ")
        assert t.written == []  # (kept for the end of the turn)
        w.write_now(b"now")
        assert t.written == [b"kept-1 kept-2 ", b"now"]  # in order, before the turn ends
        rounds = batch.rounds
        await asyncio.sleep(0)  # the end of the turn
        assert batch.rounds == rounds + 1
        assert t.written == [b"kept-1 kept-2 ", b"now"]  # nothing written twice
        w.write(b"later")
        await asyncio.sleep(0)
        assert t.written[-1] == b"later" and batch.rounds == rounds + 2

    asyncio.run(main())
