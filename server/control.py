"""The control channel between the supervisor and one worker process (``supervisor.py``,
``worker.py``): calls both ways over one Unix socket pair, answered by id.

A message is a 4-byte length and a pickled dict. Pickle is safe here only because both ends are
this program: the socket pair is made by the supervisor and handed to the worker it spawns; no
client ever reaches it. A call's handler raises :class:`GatewayError` to answer with an error
the caller re-raises as such (code and message kept); any other exception answers INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from .core.errors import ErrorCode, GatewayError

log = logging.getLogger("batchgate")

_LEN = struct.Struct("!I")
MAX_MESSAGE_BYTES = 2**31 - 1  # uploads of a model load travel here (bounded by max_request_bytes before)

Handler = Callable[..., Awaitable[Any]]


class ChannelClosed(GatewayError):
    def __init__(self, what: str):
        super().__init__(ErrorCode.UNAVAILABLE, what)


class Channel:
    """One end of the control socket: :meth:`call` the other end, answer its calls with the
    handlers given (by operation name), until it closes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handlers: dict[str, Handler]):
        self.reader, self.writer, self.handlers = reader, writer, handlers
        self._next = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()

    @classmethod
    async def over(cls, sock, handlers: dict[str, Handler]) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**20)
        return cls(reader, writer, handlers)

    def _send(self, msg: dict) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_MESSAGE_BYTES:
            raise GatewayError(
                ErrorCode.INVALID_ARGUMENT,
                f"'{msg.get('op', 'an answer')}' is too large to hand to the other worker processes "
                f"({len(data)} bytes, at most {MAX_MESSAGE_BYTES})",
            )
        self.writer.write(_LEN.pack(len(data)) + data)

    async def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Ask the other end to run ``op``; its answer, or its error re-raised."""
        if self.closed.is_set():
            raise ChannelClosed("the other process is gone")
        self._next += 1
        cid = self._next
        fut = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut
        try:
            self._send({"call": cid, "op": op, "args": args})
            # The timeout covers the sending too: behind a large message (a load's upload) to a
            # process that stopped reading, a call would wait for room in the socket for ever.
            async with asyncio.timeout(timeout):
                try:
                    await self.writer.drain()
                except (ConnectionError, OSError):  # (gone while the message waited to be sent)
                    raise ChannelClosed("the other process went away during the call") from None
                return await fut
        finally:
            self._waiting.pop(cid, None)

    def tell(self, op: str, **args: Any) -> None:
        """A call nobody waits for the answer of."""
        if not self.closed.is_set():
            self._send({"call": 0, "op": op, "args": args})

    async def serve(self) -> None:
        """Read until the other end closes; then every waiting call fails with ChannelClosed."""
        try:
            while True:
                head = await self.reader.readexactly(_LEN.size)
                (n,) = _LEN.unpack(head)
                if n > MAX_MESSAGE_BYTES:  # not what the other end sends: the channel is broken
                    log.error("control channel: a message of %d bytes announced; closing the channel", n)
                    break
                msg = pickle.loads(await self.reader.readexactly(n))
                if "call" in msg:
                    t = asyncio.ensure_future(self._answer(msg))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
                else:
                    fut = self._waiting.get(msg["reply"])
                    if fut is not None and not fut.done():
                        if "error" in msg:
                            code, text = msg["error"]
                            fut.set_exception(GatewayError(ErrorCode(code), text))
                        else:
                            fut.set_result(msg.get("result"))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ChannelClosed("the other process went away during the call"))
            for t in list(self._tasks):
                t.cancel()

    async def _answer(self, msg: dict) -> None:
        cid, op = msg["call"], msg["op"]
        handler = self.handlers.get(op)
        try:
            if handler is None:
                raise GatewayError(ErrorCode.INTERNAL, f"control operation '{op}' is not known here")
            out: dict = {"result": await handler(**msg["args"])}
        except GatewayError as e:
            out = {"error": (e.code.value, e.message)}
        except Exception as e:  # noqa: BLE001 - a handler's bug answers the call, never ends the channel
            log.exception("control operation '%s' failed", op)
            out = {"error": (ErrorCode.INTERNAL.value, f"{type(e).__name__}: {e}")}
        if cid and not self.closed.is_set():
            out["reply"] = cid
            try:
                self._send(out)
            except GatewayError as e:  # an answer too large to send: its error instead
                self._send({"reply": cid, "error": (e.code.value, e.message)})
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.drain()

    async def settle(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) for the answers to this end's calls in progress:
        a draining worker's pod-wide change (a load) is answered by the supervisor's verdict,
        not by the channel closing under it. True if there were any."""
        waiting = [f for f in self._waiting.values() if not f.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        return bool(waiting)

    def backlog(self) -> int:
        """Bytes written but not yet sent to the other end."""
        return self.writer.transport.get_write_buffer_size()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
