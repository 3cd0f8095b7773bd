"""Listening sockets accepted many connections a turn of the event loop, not one.

libuv, under uvloop, accepts a single connection each time the loop polls a listening socket
(libuv pull request 3696, 2022; uvloop 0.23, installed here, does so): a loop whose turns take
15 ms under load accepts 65 connections a second, and the rest wait in the kernel's accept
queue, already connected in their clients' eyes, their requests sent and unread. Measured on
the demo ``mlp`` at three times capacity, 600 HTTP clients connecting at once waited up to
3.4 s for their first answer (the accept queue drained about 100 a second); 5,000 clients
connecting at once would wait most of a minute. asyncio's own loop accepts up to its backlog
a turn; :func:`listen` does that on either loop: the listening socket is polled with
``add_reader`` and each readiness accepts up to :data:`ACCEPT_PER_TURN` connections, each handed
to the protocol with ``connect_accepted_socket``. What a connection costs past
``max_connections`` is unchanged: the protocol each listener uses answers it and closes it, as
before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

from ..core.rate import LineBudget

log = logging.getLogger("batchgate")

ACCEPT_PER_TURN = 128  # connections accepted per readiness: bounds the turn, and 128 a turn is thousands a second
RETRY_AFTER_S = 1.0  # after the process ran out of file descriptors, the socket is polled again after this
# accept() errors of one connection (it went before it was accepted), not of the socket
_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENOPROTOOPT, errno.EHOSTUNREACH, errno.ENETUNREACH}


class Listener:
    """One listening socket served eagerly; ``close`` stops accepting and closes the socket
    (connections already accepted carry on), as ``asyncio.Server.close`` does."""

    def __init__(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], sock: socket.socket):
        self.loop, self.factory, self.sock = loop, factory, sock
        self.sockets = [sock]
        self._pending: set[asyncio.Task] = set()  # connections being handed to their protocol
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._errors = LineBudget(1)  # at most one log line a second about the socket's own errors
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(ACCEPT_PER_TURN):
            try:
                conn, _peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                # out of file descriptors or memory: the socket stays readable, so it is left
                # alone for a moment instead of being polled again at once
                self._pause(exc)
                return
            conn.setblocking(False)
            with contextlib.suppress(OSError):  # answers go out at once (uvloop's transports set it, asyncio's not)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._hand_over(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _hand_over(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, sock=conn)
        except Exception as exc:  # the protocol's factory failed, or the socket went meanwhile
            conn.close()
            if self._errors.take() is not None:
                log.warning("an accepted connection could not be served: %s", type(exc).__name__)

    def _pause(self, exc: OSError) -> None:
        if self._errors.take() is not None:
            reason = errno.errorcode.get(exc.errno or 0, "error")
            log.warning("cannot accept connections (%s): trying again in %g s", reason, RETRY_AFTER_S)
        self.loop.remove_reader(self.sock.fileno())
        self._retry = self.loop.call_later(RETRY_AFTER_S, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for: accepted connections are their protocols' to close."""


async def listen(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], sock: socket.socket, backlog: int = 2048
) -> Listener:
    """What ``loop.create_server(factory, sock=sock, backlog=backlog)`` does, accepting eagerly."""
    sock.setblocking(False)
    sock.listen(backlog)
    return Listener(loop, factory, sock)
