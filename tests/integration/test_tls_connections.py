"""max_connections over TLS: a connection counts from its accept, its handshake included. On
uvloop's loop, as `batchgate serve` runs (its start_tls differs from asyncio's).

Before, a TLS connection was counted only once its handshake was done: clients that connected
and never said hello (or said it slowly) held a socket each, for the handshake timeout, past the
cap, and a handshake that failed was never counted at all (transport/tls_accept.py).
"""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from gateway_support import eventually
from tls_support import Pki, make_pki

CAP = 3


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def serve_tls(serve, demo_repo, pki: Pki, **extra):
    """A gateway over TLS with CAP connections, on uvloop's loop as `batchgate serve` runs."""
    tls = {"tls_cert_file": pki.path("server.crt"), "tls_key_file": pki.path("server.key")}
    return serve(demo_repo, uvloop=True, max_connections=CAP, **tls, **extra)


def refused(running, reason: str) -> float:
    for line in urllib.request.urlopen(running.metrics_url).read().decode().splitlines():
        if line.startswith(f'batchgate_http_connections_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def silent(port: int) -> socket.socket:
    """A TCP connection that never starts its TLS handshake."""
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def closed_at_once(s: socket.socket) -> bool:
    """The server closed it without a byte (a refusal), rather than waiting for a ClientHello."""
    s.settimeout(3)  # well inside the handshake timeout (30 s here)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def client_works(protocol: str, running, pki: Pki) -> bool:
    try:
        if protocol == "http":
            c = httpclient.InferenceServerClient(
                f"localhost:{running.gateway.http_port}",
                ssl=True,
                ssl_options={"ca_certs": pki.path("ca.crt")},
                connection_timeout=5,
                network_timeout=5,
            )
        else:
            c = grpcclient.InferenceServerClient(
                f"localhost:{running.gateway.grpc_port}", ssl=True, root_certificates=pki.path("ca.crt")
            )
        try:
            return c.is_server_live(client_timeout=5) if protocol == "grpc" else c.is_server_live()
        finally:
            c.close()
    except Exception:  # noqa: BLE001 - refused: tried again by the caller
        return False


@pytest.mark.parametrize(("protocol", "reason"), [("http", "connections"), ("grpc", "grpc_connections")])
def test_connections_in_their_tls_handshake_count_against_max_connections(demo_repo, serve, pki, protocol, reason):
    # (the handshake timeout too: far beyond what the test waits)
    running = serve_tls(serve, demo_repo, pki, http_header_timeout_s=30)
    port = running.gateway.http_port if protocol == "http" else running.gateway.grpc_port
    held = [silent(port) for _ in range(CAP)]
    extra = silent(port)
    assert closed_at_once(extra), "a connection past max_connections waited for its handshake"
    assert refused(running, reason) == 1
    extra.close()
    # A handshake that fails (here: the client goes) gives its place back at once.
    held.pop().close()
    eventually(lambda: client_works(protocol, running, pki), "the place of a failed handshake was not given back")
    for s in held:
        s.close()


def test_a_handshake_that_fails_is_not_counted(demo_repo, serve, pki):
    """Clients that fail their handshake (no trusted certificate, plaintext bytes) leave every
    place free for the ones that follow."""
    running = serve_tls(serve, demo_repo, pki)
    for _ in range(CAP * 3):
        with socket.create_connection(("127.0.0.1", running.gateway.http_port), timeout=5) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # plaintext to a TLS port
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
        untrusted = ssl.create_default_context()  # the test CA not in it: verification fails
        with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", running.gateway.grpc_port)) as raw:
            untrusted.wrap_socket(raw, server_hostname="localhost")
    time.sleep(0.2)
    assert all(client_works(p, running, pki) for p in ("http", "grpc"))
    assert refused(running, "connections") == 0 and refused(running, "grpc_connections") == 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_clients_that_connect_and_close_at_once_leave_every_place_free(demo_repo, serve, pki, protocol):
    """A TCP probe or a port scan: connect, then close before any ClientHello. uvloop then
    returns the TLS transport closed, without an error; a protocol handed it never heard it was
    lost, and each such connect kept a place for ever (a probe shut HTTPS out for everyone after
    8,300 of them in 3 s at the default cap)."""
    running = serve_tls(serve, demo_repo, pki)  # (on uvloop: asyncio's start_tls raises instead)
    port = running.gateway.http_port if protocol == "http" else running.gateway.grpc_port
    for _ in range(CAP * 20):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

    def works() -> bool:
        return client_works(protocol, running, pki)

    eventually(works, "connections closed before their handshake kept their places")
    held = [silent(port) for _ in range(CAP - 1)]  # every place but one is free: the last still works
    try:
        # (the client just above closed its connection; the server hears of it a moment later)
        eventually(works, "a place stayed taken after every probe had gone")
    finally:
        for s in held:
            s.close()
