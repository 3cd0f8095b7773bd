"""Reading an HTTP request body from its ASGI messages, within the limits on it: its own size
(``max_request_bytes``) and the bytes of bodies still arriving, all connections together
(``max_buffered_request_bytes``, a ``ByteBudget`` shared with the h2 gRPC engine's unfinished
messages).

Without the second bound every admitted request could hold ``max_request_bytes`` while its client
took its time (up to ``http_body_timeout_s``): before 2026-12-06, ten connections that each sent
60 MiB of a body and waited held 600 MiB, and ``max_inflight_requests`` of them 240 GiB."""

from __future__ import annotations

from ..core.errors import ErrorCode, GatewayError, invalid
from .byte_budget import ByteBudget
from .http_codec import BodyRefused
from .http_heads import content_length


class BodyReader:
    __slots__ = ("limit", "budget")

    def __init__(self, limit: int, budget: ByteBudget):
        self.limit = limit  # max_request_bytes
        self.budget = budget  # bytes of bodies read and not yet whole count against it

    async def more(self, first, receive) -> bytes:
        """A body from its first ASGI message on, read to its end within the limits."""
        chunks, size, held, msg = [], 0, 0, first
        try:
            while True:
                if msg["type"] == "http.disconnect":
                    raise GatewayError(ErrorCode.CANCELLED, "client disconnected")
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    raise BodyRefused(f"request body exceeds the limit of {self.limit} bytes (max_request_bytes)")
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    return b"".join(chunks)
                if not self.budget.take(len(chunk)):
                    raise BodyRefused(
                        f"the server holds more than {self.budget.limit} bytes of requests still "
                        "arriving; retry later or on another replica (max_buffered_request_bytes)",
                        ErrorCode.RESOURCE_EXHAUSTED,
                        retry_after_s=1.0,
                    )
                held += len(chunk)
                msg = await receive()
        finally:
            self.budget.give(held)

    async def read(self, receive, scope) -> bytes:
        """A whole body, its Content-Length checked against the limit first."""
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    n = content_length(v)
                except ValueError:
                    raise invalid("Content-Length is not a number") from None
                if n > self.limit:
                    raise invalid(
                        f"request body of {n} bytes exceeds the limit of {self.limit} bytes (max_request_bytes)"
                    )
                break
        return await self.more(await receive(), receive)
