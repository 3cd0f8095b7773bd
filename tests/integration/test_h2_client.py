"""batchgate's HTTP/2 client for remote models (``backends/h2_client.py``) against upstreams that
behave as real servers may: a small server built on the ``h2`` library (a third-party HTTP/2
stack, as hypercorn and others use) where batchgate's own server never would, and a real
batchgate server otherwise. Each test is a defect once found."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings

from batchgate.backends import h2_client
from batchgate.backends.h2_client import H2Channel, H2RpcError
from batchgate.backends.upstream_tls import UpstreamSecurity
from batchgate.config import RemoteModel
from batchgate.transport import http2
from tls_support import make_pki

LIVE = "/inference.GRPCInferenceService/ServerLive"


class Upstream(asyncio.Protocol):
    """An HTTP/2 server that answers each call by ``answer(self, sid, body)``; the default echoes
    the request message after ``delay`` seconds."""

    settings: dict = {}
    delay = 0.0
    connections: list

    def connection_made(self, transport):
        self.transport = transport
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        if self.settings:
            self.h2.update_settings(dict(self.settings))
        self.bodies: dict[int, bytearray] = {}
        self.connections.append(self)
        transport.write(self.h2.data_to_send())

    def data_received(self, data):
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                self.bodies[ev.stream_id] = bytearray()
                self.on_request(ev.stream_id)
            elif isinstance(ev, h2.events.DataReceived):
                if ev.stream_id in self.bodies:
                    self.bodies[ev.stream_id] += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in self.bodies:
                body = bytes(self.bodies.pop(ev.stream_id))
                asyncio.get_running_loop().call_later(self.delay, self.answer, ev.stream_id, body)
        self.transport.write(self.h2.data_to_send())

    def on_request(self, sid: int) -> None:
        pass

    def answer(self, sid: int, body: bytes) -> None:
        self.reply(sid, body[5:])

    def reply(self, sid: int, message: bytes, status: bytes = b"0", http_status: bytes = b"200") -> None:
        if sid not in self.h2.streams:
            return
        self.h2.send_headers(sid, [(b":status", http_status), (b"content-type", b"application/grpc")])
        self.h2.send_data(sid, struct.pack(">BI", 0, len(message)) + message)
        self.h2.send_headers(sid, [(b"grpc-status", status)], end_stream=True)
        self.transport.write(self.h2.data_to_send())


async def _serve(**behaviour) -> tuple[asyncio.AbstractServer, int, type[Upstream]]:
    cls = type("U", (Upstream,), {"connections": [], **behaviour})
    server = await asyncio.get_running_loop().create_server(cls, "127.0.0.1", 0)
    _upstreams.append(cls)
    return server, server.sockets[0].getsockname()[1], cls


_open: list[H2Channel] = []
_upstreams: list[type[Upstream]] = []  # their accepted connections outlive Server.close()


def _channel(address: str, max_message_bytes: int) -> H2Channel:
    _open.append(H2Channel(address, max_message_bytes))
    return _open[-1]


def _run(main):
    """``main()`` on a new loop; the channels it made are closed before the loop ends."""

    async def closing():
        try:
            return await main()
        finally:
            for channel in _open:
                await channel.close()
            _open.clear()
            for cls in _upstreams:
                for conn in cls.connections:
                    conn.transport.close()
            _upstreams.clear()
            await asyncio.sleep(0.05)

    return asyncio.run(closing())


def _code(outcome) -> str:
    return "OK" if isinstance(outcome, bytes) else outcome.code().name


def test_calls_past_the_upstreams_stream_limit_wait_for_a_slot():
    async def main():
        server, port, _ = await _serve(settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10}, delay=0.1)
        call = _channel(f"127.0.0.1:{port}", 1 << 20).unary("/x/Y")
        await call(b"warm", timeout=5)  # (the upstream's SETTINGS are known)
        got = await asyncio.gather(*(call(b"%d" % i, timeout=5) for i in range(35)), return_exceptions=True)
        server.close()
        return got

    got = _run(main)
    assert got == [b"%d" % i for i in range(35)]  # as grpc.aio queues them: none refused


def test_a_call_waiting_for_a_slot_keeps_its_deadline_and_leaves_nothing_behind():
    async def main():
        server, port, _ = await _serve(settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2}, delay=1.0)
        channel = _channel(f"127.0.0.1:{port}", 1 << 20)
        call = channel.unary("/x/Y")
        await call(b"warm", timeout=5)
        got = await asyncio.gather(*(call(b"x", timeout=0.3) for _ in range(6)), return_exceptions=True)
        p = channel._protocol
        left = (len(p.calls), len(p.waiting))
        server.close()
        return got, left

    got, left = _run(main)
    assert [_code(g) for g in got] == ["DEADLINE_EXCEEDED"] * 6 and left == (0, 0)


class LateSettings(Upstream):
    """Its SETTINGS (at most 2 streams) reach the client a round trip late, after the first calls
    of a new connection have gone out (as over a network); a stream past the limit is refused
    (REFUSED_STREAM), as batchgate's own server and RFC 9113 5.1.2 refuse it."""

    settings = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2}
    delay = 0.1
    rtt = 0.3

    def connection_made(self, transport):
        self.held: list[bytes] | None = []
        self.refused = 0
        asyncio.get_running_loop().call_later(self.rtt, self._late, transport)

    def _late(self, transport):
        held, self.held = self.held or [], None
        super().connection_made(transport)
        for data in held:
            self.data_received(data)

    def data_received(self, data):
        if self.held is not None:
            self.held.append(data)
        else:
            super().data_received(data)

    def on_request(self, sid):
        if self.h2.open_inbound_streams > 2:
            self.bodies.pop(sid)
            self.refused += 1
            self.h2.reset_stream(sid, http2.REFUSED_STREAM)


def test_a_burst_on_a_new_connection_past_the_upstreams_stream_limit_waits_for_a_slot():
    """Calls opened before the upstream's SETTINGS arrived, past its MAX_CONCURRENT_STREAMS, were
    refused (REFUSED_STREAM) and failed UNAVAILABLE as calls never sent, each counted against the
    upstream (three of them eject a remote model's only one). They go again on the connection,
    as gRPC core's transparent retry sends them, and wait for a slot."""

    async def main():
        cls = type("L", (LateSettings,), {"connections": []})
        server = await asyncio.get_running_loop().create_server(cls, "127.0.0.1", 0)
        _upstreams.append(cls)
        call = _channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", 1 << 20).unary("/x/Y")
        got = await asyncio.gather(*(call(b"%d" % i, timeout=10) for i in range(6)), return_exceptions=True)
        server.close()
        return got, sum(c.refused for c in cls.connections), len(cls.connections)

    got, refused, connections = _run(main)
    assert got == [b"%d" % i for i in range(6)], [g if isinstance(g, bytes) else g.details() for g in got]
    assert refused == 4 and connections == 1  # (refused on the first try, then each waited for a slot)


class ResetMidAnswer(Upstream):
    """Answers the headers and part of a message, then resets the stream with ``code``."""

    code = http2.INTERNAL_ERROR

    def answer(self, sid, body):
        self.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        self.h2.send_data(sid, struct.pack(">BI", 0, 10) + b"abc")
        self.h2.reset_stream(sid, self.code)
        self.transport.write(self.h2.data_to_send())


def test_a_reset_mid_answer_fails_with_the_code_grpc_aio_gives():
    """Every RST_STREAM code failed the call UNAVAILABLE, where grpc.aio's channel (client=grpcio)
    reads INTERNAL_ERROR as INTERNAL, CANCEL as CANCELLED, ENHANCE_YOUR_CALM as RESOURCE_EXHAUSTED:
    the same upstream gave the caller 503 or 500 by the client chosen, and a refusal after the
    answer had begun was taken for a call never sent (REFUSED_STREAM: grpc.aio's UNAVAILABLE, not
    sent again)."""
    codes = (http2.NO_ERROR, http2.PROTOCOL_ERROR, http2.INTERNAL_ERROR, http2.REFUSED_STREAM, http2.CANCEL)
    codes += (http2.ENHANCE_YOUR_CALM, 0xC)

    async def main():
        got = []
        for code in codes:
            cls = type("R", (ResetMidAnswer,), {"connections": [], "code": code})
            server = await asyncio.get_running_loop().create_server(cls, "127.0.0.1", 0)
            _upstreams.append(cls)
            address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            outcome = []
            for call in (_channel(address, 1 << 20).unary("/x/Y"), None):
                try:
                    if call is None:
                        async with grpc.aio.insecure_channel(address) as channel:
                            await channel.unary_unary("/x/Y")(b"x", timeout=5)
                    else:
                        await call(b"x", timeout=5)
                    outcome.append("OK")
                except grpc.aio.AioRpcError as e:
                    outcome.append(e.code().name)
                    if call is not None:
                        outcome.append(getattr(e, "unsent", None))
            got.append(outcome)
            server.close()
        return got

    got = _run(main)
    h2 = [(code, sent) for code, sent, _ in got]
    assert h2 == [(aio, False) for _, _, aio in got], got
    assert [aio for _, _, aio in got] == [
        *("INTERNAL",) * 3,
        *("UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"),
    ]


def test_a_call_handed_a_connection_lost_meanwhile_fails_at_once_as_unsent():
    """A caller that waited for a connection (being made for another call) could be handed it after
    the upstream had closed it: its call went onto a connection that nothing fails any more, and
    waited out its deadline. An upstream killed under traffic gave such HTTP callers 504 after the
    remote model's 30 s instead of UNAVAILABLE at once. Now it fails at once, unsent (so the call
    goes again on a new connection)."""

    async def main():
        server, port, cls = await _serve()
        channel = _channel(f"127.0.0.1:{port}", 1 << 20)
        await channel.unary("/x/Y")(b"warm", timeout=5)
        p = channel._protocol
        server.close()
        for conn in cls.connections:
            conn.transport.close()
        while not p.lost:
            await asyncio.sleep(0.01)
        c = h2_client._Call(asyncio.get_running_loop().create_future(), b"/x/Y", b"x", None, time.monotonic() + 5)
        p.submit(c)  # (what the caller does once _connection returns it)
        return c.future.done() and c.future.exception(), len(p.calls)

    error, calls = _run(main)
    assert isinstance(error, H2RpcError) and error.unsent and error.code().name == "UNAVAILABLE" and calls == 0


def test_an_answer_before_the_request_is_sent_frees_the_stream():
    # The upstream refuses on the headers alone (trailers-only) and sends no RST_STREAM, which
    # RFC 9113 8.1 allows: the client must stop sending and let the stream go.
    class Early(Upstream):
        def on_request(self, sid):
            self.h2.send_headers(
                sid,
                [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"8")],
                end_stream=True,
            )
            self.bodies.pop(sid, None)

    async def streams_after():
        cls = type("E", (Early,), {"connections": [], "settings": {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 4}})
        server = await asyncio.get_running_loop().create_server(cls, "127.0.0.1", 0)
        channel = _channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", 64 << 20)
        call = channel.unary("/x/Y")
        codes = []
        for _ in range(12):  # three times the upstream's stream limit
            try:
                await call(b"x" * (1 << 20), timeout=5)
            except H2RpcError as e:
                codes.append(e.code().name)
        await asyncio.sleep(0.1)
        p = channel._protocol
        server.close()
        return codes, len(p.h2.streams), len(p.calls)

    codes, streams, calls = _run(streams_after)
    assert codes == ["RESOURCE_EXHAUSTED"] * 12 and streams == 0 and calls == 0


def test_http_answers_without_a_grpc_status_are_mapped_as_grpc_maps_them():
    answers = iter([(b"503", b"0"), (b"404", b"0"), (b"200", b"abc"), (b"200", b"0")])

    class Odd(Upstream):
        def answer(self, sid, body):
            http_status, status = next(answers)
            if http_status != b"200":
                self.h2.send_headers(
                    sid, [(b":status", http_status), (b"content-type", b"text/plain")], end_stream=True
                )
                self.transport.write(self.h2.data_to_send())
            else:
                self.reply(sid, b"fine", status=status)

    async def main():
        cls = type("O", (Odd,), {"connections": []})
        server = await asyncio.get_running_loop().create_server(cls, "127.0.0.1", 0)
        call = _channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", 1 << 20).unary("/x/Y")
        got = []
        for _ in range(4):
            try:
                got.append(await call(b"x", timeout=5))
            except H2RpcError as e:
                got.append((e.code().name, e.details()))
        server.close()
        return got, len(cls.connections)

    got, connections = _run(main)
    assert got[0][0] == "UNAVAILABLE" and "503" in got[0][1]  # a proxy's 503: retry later
    assert got[1][0] == "UNIMPLEMENTED"
    assert got[2][0] == "UNKNOWN" and "malformed grpc-status" in got[2][1]
    assert got[3] == b"fine" and connections == 1  # the connection survived all of them


def test_a_goaway_sends_the_calls_it_cut_off_again_on_a_new_connection():
    class Leaving(Upstream):
        def answer(self, sid, body):
            if len(self.connections) == 1 and sid == 1:
                # answer the first call, then GOAWAY naming it the last: the other two never started here
                self.reply(sid, body[5:])
                self.h2.close_connection(last_stream_id=1)
                self.transport.write(self.h2.data_to_send())
            elif len(self.connections) > 1:
                self.reply(sid, body[5:])

    async def main():
        cls = type("L", (Leaving,), {"connections": [], "delay": 0.05})
        server = await asyncio.get_running_loop().create_server(cls, "127.0.0.1", 0)
        call = _channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", 1 << 20).unary("/x/Y")
        got = await asyncio.gather(*(call(b"%d" % i, timeout=5) for i in range(3)), return_exceptions=True)
        server.close()
        return got, len(cls.connections)

    got, connections = _run(main)
    assert got == [b"0", b"1", b"2"] and connections == 2


def test_an_upstream_that_stops_answering_pings_is_given_up(monkeypatch):
    monkeypatch.setattr(h2_client, "KEEPALIVE_S", 0.3)
    monkeypatch.setattr(h2_client, "KEEPALIVE_TIMEOUT_S", 0.3)

    class Silent(Upstream):  # takes the call, then reads nothing more (a host gone without a FIN)
        def on_request(self, sid):
            self.transport.pause_reading()

        def answer(self, sid, body):
            pass

    async def main():
        cls = type("S", (Silent,), {"connections": []})
        server = await asyncio.get_running_loop().create_server(cls, "127.0.0.1", 0)
        _upstreams.append(cls)
        call = _channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", 1 << 20).unary("/x/Y")
        t0 = time.monotonic()
        try:
            await call(b"x", timeout=30)
        except H2RpcError as e:
            return e.code().name, e.details(), time.monotonic() - t0
        finally:
            server.close()

    code, details, took = _run(main)
    assert code == "UNAVAILABLE" and "keepalive" in details and took < 5


def test_a_deadline_is_kept_while_connecting():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    backlog = []
    for _ in range(4):  # the accept queue full: later SYNs go unanswered, as to a host that is gone
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        backlog.append(s)

    async def main():
        call = _channel(f"127.0.0.1:{port}", 1 << 20).unary("/x/Y")
        t0 = time.monotonic()
        try:
            await call(b"x", timeout=0.3)
        except H2RpcError as e:
            return e.code().name, time.monotonic() - t0

    try:
        code, took = _run(main)
    finally:
        for s in [listener, *backlog]:
            s.close()
    assert code == "DEADLINE_EXCEEDED" and took < 2  # (not the 5 s connect timeout)


def test_a_connection_whose_stream_ids_run_out_is_replaced(demo_repo, serve):
    running = serve(str(demo_repo))

    async def main():
        channel = _channel(f"127.0.0.1:{running.gateway.grpc_port}", 1 << 20)
        live = channel.unary(LIVE)
        await live(b"", timeout=5)
        first = channel._protocol
        first.h2.highest_inbound_stream_id = http2.MAX_STREAM_ID - 2  # as after 2^30 - 1 calls
        got = [await live(b"", timeout=5) for _ in range(3)]  # the last id, then a new connection
        await asyncio.sleep(0.1)
        return got, channel._protocol is not first, first.lost, channel._protocol.h2.highest_inbound_stream_id

    got, replaced, old_closed, sid = _run(main)
    assert got == [b"\x08\x01"] * 3 and replaced and old_closed and sid == 3


def test_a_long_timeout_reaches_the_upstream_in_a_unit_it_accepts(demo_repo, serve):
    running = serve(str(demo_repo))

    async def main():
        live = _channel(f"127.0.0.1:{running.gateway.grpc_port}", 1 << 20).unary(LIVE)
        return [await live(b"", timeout=t) for t in (0.05, 99_999.0, 7 * 86_400.0)]

    assert _run(main) == [b"\x08\x01"] * 3


def _tls_server(pki, alpn: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.path("server.crt"), pki.path("server.key"))
    ctx.set_alpn_protocols([alpn])
    return ctx


def test_over_tls_calls_carry_the_current_token_and_new_tls_files_take_a_new_connection(tmp_path):
    pki = make_pki(tmp_path)
    token, ca = tmp_path / "token", tmp_path / "ca.pem"
    token.write_text("first-token\n")
    ca.write_bytes(pki.ca.pem)

    class Seeing(Upstream):
        seen: list = []

        def connection_made(self, transport):
            super().connection_made(transport)
            receive = self.h2.receive_data

            def spy(data):
                events = receive(data)
                self.seen += [dict(e.headers) for e in events if isinstance(e, h2.events.RequestReceived)]
                return events

            self.h2.receive_data = spy

    async def main():
        cls = type("S", (Seeing,), {"connections": [], "seen": []})
        server = await asyncio.get_running_loop().create_server(cls, "127.0.0.1", 0, ssl=_tls_server(pki, "h2"))
        _upstreams.append(cls)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        port = address.rpartition(":")[2]
        spec = RemoteModel(
            "m", (address,), tls=True, tls_ca_file=str(ca), tls_server_name="localhost", token_file=str(token)
        )
        security = UpstreamSecurity(spec)
        _open.append(channel := H2Channel(address, 1 << 20, security))
        call = channel.unary(LIVE)
        got = [await call(b"one", timeout=10)]
        token.write_text("second-token\n")
        assert not await security.reload_if_changed()  # (read once the change stands still for a poll)
        assert not await security.reload_if_changed()  # a token alone: no new connection needed
        got.append(await call(b"two", timeout=10))
        connections = len(cls.connections)
        ca.write_bytes(pki.other_ca.pem + pki.ca.pem)
        assert not await security.reload_if_changed()
        assert await security.reload_if_changed()
        channel.renew()
        got.append(await call(b"three", timeout=10))
        server.close()
        seen = [(s[b":scheme"], s[b":authority"], s[b"authorization"]) for s in cls.seen]
        return got, connections, len(cls.connections), seen, f"localhost:{port}".encode()

    got, before, after, seen, authority = _run(main)
    assert got == [b"one", b"two", b"three"]
    assert (before, after) == (1, 2)
    tokens = [b"Bearer first-token", b"Bearer second-token", b"Bearer second-token"]
    assert seen == [(b"https", authority, t) for t in tokens]


def test_an_upstream_whose_tls_does_not_offer_h2_fails_the_call_as_never_sent(tmp_path):
    pki = make_pki(tmp_path)

    async def main():
        server = await asyncio.get_running_loop().create_server(
            lambda: asyncio.Protocol(), "127.0.0.1", 0, ssl=_tls_server(pki, "http/1.1")
        )
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        security = UpstreamSecurity(RemoteModel("m", (address,), tls=True, tls_ca_file=pki.path("ca.crt")))
        _open.append(channel := H2Channel(address, 1 << 20, security))
        try:
            await channel.unary(LIVE)(b"x", timeout=10)
        except H2RpcError as e:
            return e
        finally:
            server.close()

    e = _run(main)
    assert e.code() == grpc.StatusCode.UNAVAILABLE and e.unsent and "ALPN h2" in e.details(), e


def test_an_answer_whose_length_passes_the_limit_fails_as_its_prefix_is_read():
    """A gRPC message says its length in its first 5 bytes: an answer announcing more than
    max_message_bytes was read on, and held, until it passed the limit (64 MiB a call by
    default, with up to 256 calls at once) or the deadline came; grpc.aio refuses it at once."""

    class Boasting(Upstream):
        def answer(self, sid, body):  # announces 1 GiB, sends 100 bytes of it, then nothing more
            self.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            self.h2.send_data(sid, struct.pack(">BI", 0, 1 << 30) + b"x" * 100)
            self.transport.write(self.h2.data_to_send())

    async def main():
        server, port, _ = await _serve(answer=Boasting.answer)
        channel = _channel(f"127.0.0.1:{port}", 1 << 20)
        try:
            await channel.unary("/x/Y")(b"x", timeout=30)
        except H2RpcError as e:
            return e.code().name, e.details(), len(channel._protocol.calls)
        finally:
            server.close()

    code, details, calls = _run(main)
    assert code == "RESOURCE_EXHAUSTED" and "larger than allowed" in details and calls == 0, (code, details)
