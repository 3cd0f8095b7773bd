"""The h2 gRPC engine's timeouts, enforced on each connection by the server's sweep (about every
second): the handshake (``http_header_timeout_s``), a request message that stalls part-way
(``http_body_timeout_s``), an answer its client takes too little of for as long (each
``MIN_SEND_BYTES_PER_S`` taken buys a second more), idle connections
(``grpc_idle_timeout_s``), and a closed connection whose client reads nothing of what is left."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from .sockets import MIN_SEND_BYTES_PER_S

if TYPE_CHECKING:
    from .grpc_h2_connection import _Connection

log = logging.getLogger("batchgate.grpc")

CLOSE_GRACE_S = 5.0  # a connection closed with bytes left to write is aborted after this


def sweep(conn: _Connection, now: float) -> None:
    """Close, fail or drop on ``conn`` what overstayed its timeout."""
    server = conn.server
    if not conn.h2.started:
        if now - conn.opened > server.handshake_timeout_s:
            _timed_out(conn, "grpc_handshake_timeout", "sent no HTTP/2 preface and SETTINGS in time")
        return
    if conn.closed_at is not None:  # closed, and its client takes nothing of what is left to write
        if now - conn.closed_at > CLOSE_GRACE_S and conn.transport is not None:
            conn.transport.abort()
        return
    if conn.calls:
        body = server.body_timeout_s
        reading = not conn.paused  # (else we keep its bytes from coming)
        for call in list(conn.calls.values()):
            since = call.partial_since
            # (a stream whose messages wait for its handler is not credited: the client cannot send)
            if reading and since is not None and now - since > body and not (call.requests and call.inbox):
                server.refused("grpc_body_timeout")
                call.fail(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request message did not arrive within http_body_timeout_s ({body:g} s)",
                )
            elif call.out_since is not None and now - call.out_since > body + call.out_taken / MIN_SEND_BYTES_PER_S:
                # its client took too little of the answer for that long: a window opened a byte
                # at a time no longer holds an answer, and its memory, for ever
                server.refused("grpc_send_timeout")
                call.drop_answer()
    elif 0 < server.idle_timeout_s < now - conn.idle_since and not conn.closing:
        server.refused("grpc_idle_timeout")
        conn.go_away()


def _timed_out(conn: _Connection, reason: str, what: str) -> None:
    log.debug("closing a gRPC connection from %s: it %s", conn.peer, what)
    conn.server.refused(reason)
    conn.abandon_all()
    conn.close()
