"""The grpc.aio-like ``context`` a handler on batchgate's own gRPC engine is given: the methods of
grpc.aio's ServicerContext that the services here use, over a call's state (``grpc_h2_call._Call``
takes them from ``CallContext``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from .grpc_h2_connection import _Connection

_monotonic = time.monotonic


class CallContext:
    """The context half of a call: the status a handler sets; the call holds the rest named here."""

    __slots__ = ("_code", "_details", "_trailing")
    conn: _Connection
    md: Any
    deadline: float | None
    gone: bool
    done: bool
    _code: grpc.StatusCode | None
    _details: str
    _trailing: tuple

    def invocation_metadata(self):
        return self.md

    def peer(self) -> str:
        return self.conn.peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.conn.auth

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - _monotonic())

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, md) -> None:
        self._trailing = tuple(md)

    def trailing_metadata(self):
        return self._trailing

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise Abort()

    def cancelled(self) -> bool:
        return self.gone

    def is_active(self) -> bool:
        return not self.done

    def disable_next_message_compression(self) -> None:
        pass


class Abort(grpc.aio.AbortError):
    """Raised by ``abort``: the status is already set on the call. A grpc.aio.AbortError, so the
    services' ``except grpc.aio.AbortError`` treat it as they treat grpc.aio's own."""
