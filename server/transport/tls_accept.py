"""TLS connections counted against ``max_connections`` from the moment they are accepted.

With ``loop.create_server(ssl=...)`` a listener's protocol sees a connection only once its TLS
handshake is done, and a handshake that fails is never shown to it at all: connections still
shaking hands were counted nowhere, so a client opening sockets that never finish (or never
start) a handshake held a file descriptor each, up to the handshake timeout, past any cap.

Here the listener accepts plain TCP, counts the connection at once (refused, closed and counted
if the cap is reached, connections in handshake included) and runs the handshake itself with
``loop.start_tls``, which says exactly when it succeeds or fails; the model's protocol then
gets the TLS transport as if the listener had made it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from .eager import start_eagerly

_FAILED = (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError, RuntimeError)


class TlsAccept:
    """One listener's accepting side: ``factory`` is its protocol factory for ``create_server``
    (without ``ssl``). ``established()`` counts the connections past their handshake, which the
    protocol keeps; a new one is taken while those and the ones in handshake are fewer than
    ``max_connections`` (0: no cap here), else ``refused()`` and closed. ``make_protocol`` makes
    a plain ``asyncio.Protocol`` (what arrived with the handshake's end is handed to its
    ``data_received``)."""

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext],
        make_protocol: Callable[[], asyncio.Protocol],
        handshake_timeout_s: float,
        max_connections: int,
        established: Callable[[], int],
        refused: Callable[[], None],
    ):
        self.context = context
        self.make_protocol = make_protocol
        self.handshake_timeout_s = handshake_timeout_s if handshake_timeout_s > 0 else None
        self.max_connections = max_connections
        self.established = established
        self.refused = refused
        self.handshaking = 0  # accepted, handshake not yet over
        self._tasks: set[asyncio.Task] = set()

    def factory(self) -> asyncio.Protocol:
        return _Accepted(self)

    def room(self) -> bool:
        return not self.max_connections or self.established() + self.handshaking < self.max_connections

    def take(self, raw: asyncio.Transport) -> None:
        if not self.room():
            self.refused()
            raw.abort()
            return
        self.handshaking += 1
        # Its first step now, inside connection_made: start_tls hands the transport to the TLS
        # protocol before the loop reads from it (uvloop starts reading as soon as
        # connection_made returns, whatever it paused), so the ClientHello reaches TLS.
        task = start_eagerly(asyncio.get_running_loop(), self._handshake(raw))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handshake(self, raw: asyncio.Transport) -> None:
        # What the client sends with the end of its handshake (a gRPC client's preface, in the
        # same packet) is read before start_tls returns: it waits in _Early until the protocol
        # has its transport.
        early = _Early()
        loop = asyncio.get_running_loop()
        context = self.context()  # the newest: a session from before a reload is not resumed
        try:
            tls = await loop.start_tls(
                raw, early, context, server_side=True, ssl_handshake_timeout=self.handshake_timeout_s
            )
        except asyncio.CancelledError:
            raw.abort()
            raise
        except _FAILED:  # (a failed handshake: asyncio has logged it as create_server would, at debug)
            raw.abort()
            return
        finally:
            self.handshaking -= 1
        if tls is None or tls.is_closing():
            # Gone while shaking hands: uvloop's start_tls returns the transport closed, without
            # an error, when the client's FIN came before its ClientHello (a TCP probe, a port
            # scan), and a protocol handed it would never hear connection_lost: its place in
            # the connection count would be kept for ever.
            raw.abort()
            return
        if context is not self.context() and getattr(tls.get_extra_info("ssl_object"), "session_reused", False):
            # Accepted before a reload, its session resumed from the context of then (whose
            # client CA may be gone): refused; the client's next connection shakes hands anew.
            tls.abort()
            return
        protocol = self.make_protocol()
        tls.set_protocol(protocol)
        protocol.connection_made(tls)
        early.hand_over(protocol, tls)

    def close(self) -> None:
        """Give up the handshakes in progress (the listener is closing)."""
        for task in list(self._tasks):
            task.cancel()


class _Accepted(asyncio.Protocol):
    """A connection until ``start_tls`` takes it over (it replaces this protocol)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: TlsAccept):
        self._owner = owner

    def connection_made(self, transport) -> None:
        self._owner.take(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - start_tls took it over
        pass


class _Early(asyncio.Protocol):
    """The TLS side's protocol from the end of the handshake until the model's protocol has the
    transport: keeps what arrives, then passes it on in order."""

    __slots__ = ("_data", "_eof", "_lost")

    def __init__(self) -> None:
        self._data: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self._data.append(data)

    def eof_received(self) -> bool:
        self._eof = True
        return True  # (closing is left to the protocol it is handed to)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = (exc,)

    def hand_over(self, protocol: asyncio.Protocol, transport: asyncio.BaseTransport) -> None:
        if self._lost is None and transport.is_closing():  # (refused in connection_made)
            return
        if self._data:
            protocol.data_received(b"".join(self._data))
        if self._eof and not protocol.eof_received():
            transport.close()  # (as the transport does itself when a protocol answers falsy)
        if self._lost is not None:
            protocol.connection_lost(self._lost[0])
