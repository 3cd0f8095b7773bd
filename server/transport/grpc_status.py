"""gRPC statuses of batchgate's errors, shared by the V2 and admin services: the one table
(:data:`GRPC_STATUS`), ending a unary call with an error, and who is calling."""

from __future__ import annotations

import math

import grpc

from ..core.errors import ErrorCode, GatewayError
from ..security.access import Caller, credentials
from ..security.tls import grpc_peer_subject

GRPC_STATUS = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


def retry_metadata(e: GatewayError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that tells a refused caller when to try again (whole seconds)."""
    return () if e.retry_after_s is None else (("retry-after", str(max(1, math.ceil(e.retry_after_s)))),)


async def abort(context, e: GatewayError) -> None:
    """End a unary call with ``e``'s status (``return await abort(...)``). The status is set,
    not raised: grpc.aio's ``abort`` raises inside the handler's ``except``, and the raised
    error's traceback, chained to ``e``, left the handler's frames and grpcio's in a reference
    cycle for every call answered with an error (38 objects a call; refusals under overload
    are thousands a second)."""
    md = retry_metadata(e)
    if md:
        context.set_trailing_metadata(md)
    context.set_code(GRPC_STATUS[e.code])
    context.set_details(e.message)


def caller_of(context) -> Caller:
    """Who is calling: the authorization metadata entry, the client certificate's subject and
    the peer address."""
    md = context.invocation_metadata() or ()
    return Caller(credentials(md, "authorization"), grpc_peer_subject(context), context.peer() or "")
