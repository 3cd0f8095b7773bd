"""Connections are accepted many a turn of the event loop (transport/accept.py).

Under uvloop, ``loop.create_server`` accepts one connection per turn of the loop (libuv's
choice since 2022). A loop busy serving takes long turns, so clients connecting at once waited
in the kernel's accept queue, one turn each: at three times capacity on the demo ``mlp`` (15 ms
turns), 600 HTTP clients waited up to 3.4 s for their first answer. These tests count the
gateway's loop turns, not time: with ``create_server`` the 300 connections below took a turn
each (300 turns or more); they now take a handful.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

N = 300


class TurnCounter:
    """A callback on the gateway's loop that runs once a turn, each time holding the loop for a
    moment, as requests being served do, and counting the turns. It sleeps rather than spins:
    the test's clients share the process, and a spinning loop thread would keep them waiting
    for the interpreter's lock."""

    def __init__(self, loop: asyncio.AbstractEventLoop, busy_s: float = 0.002):
        self.loop, self.busy_s, self.turns = loop, busy_s, 0
        self._stop = threading.Event()
        loop.call_soon_threadsafe(self._turn)

    def _turn(self) -> None:
        self.turns += 1
        time.sleep(self.busy_s)
        if not self._stop.is_set():
            self.loop.call_soon(self._turn)

    def stop(self) -> None:
        self._stop.set()


def first_bytes(port: int, hello: bytes) -> tuple[int, list[socket.socket]]:
    """N connections opened at once, each sending ``hello``; how many got bytes back."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(N)]
    for s in socks:
        s.sendall(hello)
    got = sum(1 for s in socks if s.recv(1))
    return got, socks


HTTP_HELLO = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_connections_arriving_together_are_accepted_in_a_few_turns(serve, demo_repo, protocol):
    running = serve(demo_repo, uvloop=True)
    port = running.gateway.http_port if protocol == "http" else running.gateway.grpc_port
    counter = TurnCounter(running.loop)
    try:
        while counter.turns < 3:  # the counter runs
            time.sleep(0.01)
        start = counter.turns
        got, socks = first_bytes(port, HTTP_HELLO if protocol == "http" else H2_PREFACE)
        turns = counter.turns - start
    finally:
        counter.stop()
    for s in socks:
        s.close()
    assert got == N
    # one accept a turn needs N turns; accepting up to 128 a turn, a few dozen at most
    assert turns < N // 3, f"{turns} turns of the loop for {N} connections"


EMFILE_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, resource, socket, sys
    from batchgate.transport import accept

    accept.RETRY_AFTER_S = 0.05
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")

    async def main():
        loop = asyncio.get_running_loop()
        made = []

        class P(asyncio.Protocol):
            def connection_made(self, t):
                made.append(t)

        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        listener = await accept.listen(loop, P, lsock)
        calls = [0]
        ready = listener._ready

        def counted():
            calls[0] += 1
            ready()

        listener._ready = counted
        loop.remove_reader(lsock.fileno())
        loop.add_reader(lsock.fileno(), listener._ready)
        port = lsock.getsockname()[1]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        clients = [socket.socket() for _ in range(10)]
        for c in clients:
            c.setblocking(False)
        # room for no more descriptors: every accept fails with EMFILE
        import os
        top = max(int(f) for f in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        for c in clients:
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
        turns = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            turns += 1
        print("accepted while out of descriptors:", len(made))
        print("readiness calls:", calls[0])
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for _ in range(200):
            if len(made) == len(clients):
                break
            await asyncio.sleep(0.01)
        print("accepted after:", len(made))
        listener.close()

    asyncio.run(main())
    """
)


def test_running_out_of_descriptors_pauses_accepting_and_it_resumes(tmp_path):
    """EMFILE leaves the connection queued and the socket readable: polled again at once, the
    loop would spin on it. The listener stops polling for a moment, says so once, and accepts
    the queued connections once descriptors are free again."""
    script = tmp_path / "emfile.py"
    script.write_text(EMFILE_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    during = int(next(line for line in lines if line.startswith("accepted while")).split(": ")[1])
    assert during < 10  # (a descriptor below the limit may still be free for one)
    assert "accepted after: 10" in lines
    # paused, the socket is polled again every RETRY_AFTER_S (50 ms here): a few calls in 0.2 s,
    # where polling it at once would call it on every turn of the loop
    calls = int(next(line for line in lines if line.startswith("readiness calls")).split(": ")[1])
    assert calls < 50, lines
    warnings = [line for line in lines if line.startswith("cannot accept connections (EMFILE)")]
    assert 1 <= len(warnings) <= 2, lines  # at most one a second, not one per readiness


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_an_accepted_connection_sends_small_answers_at_once(loop_kind):
    """TCP_NODELAY on every accepted connection: asyncio's connect_accepted_socket leaves Nagle's
    algorithm on (uvloop's sets it off), and a small answer written in two parts then waits
    for the client's delayed acknowledgement."""
    import uvloop

    from batchgate.transport import accept

    async def main() -> int:
        loop = asyncio.get_running_loop()
        got: list[int] = []

        class Probe(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                sock = transport.get_extra_info("socket")
                got.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        listener = await accept.listen(loop, Probe, lsock)
        _, writer = await asyncio.open_connection(*lsock.getsockname())
        for _ in range(500):
            if got:
                break
            await asyncio.sleep(0.01)
        writer.close()
        listener.close()
        return got[0]

    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(main()) != 0
