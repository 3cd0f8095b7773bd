"""The operations listeners' limits: the metrics port's connections, head bytes and time
(monitoring/serve.py), the health and admin gRPC ports' connections.

Before, every connection to the metrics port got a thread that waited for its request for ever:
any number of clients that connected and sent nothing held a thread each.
"""

from __future__ import annotations

import socket
import time
import urllib.request

from gateway_support import eventually

CAP = 4


def refused(running, reason: str) -> float:
    for line in urllib.request.urlopen(running.metrics_url, timeout=5).read().decode().splitlines():
        if line.startswith(f'batchgate_http_connections_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def connect(running) -> socket.socket:
    return socket.create_connection(("127.0.0.1", running.gateway.metrics_port), timeout=5)


def closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_past_the_cap_are_closed_and_silent_ones_time_out(demo_repo, serve):
    running = serve(demo_repo, ops_max_connections=CAP, http_header_timeout_s=1.5)
    held = [connect(running) for _ in range(CAP)]
    for s in held:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
    time.sleep(0.3)  # (accepted: each holds its slot)
    extra = connect(running)
    assert closed_within(extra, 1.0), "a connection past ops_max_connections was kept"
    assert all(closed_within(s, 5) for s in held), "a silent connection was kept past the timeout"
    for s in [extra, *held]:
        s.close()
    # A held connection's client sees the close as its thread is ending: until the thread gives
    # its slot back, a scrape is one more connection past the cap (CI met this once).
    turned_away = []

    def scraped() -> bool:
        try:
            urllib.request.urlopen(running.metrics_url, timeout=5).read()
            return True
        except OSError:  # (closed at once: reset, or no status line; urllib wraps some as URLError)
            turned_away.append(1)
            return False

    eventually(scraped, "the silent connections' slots did not come back")
    assert refused(running, "metrics_connections") == 1 + len(turned_away)
    assert refused(running, "metrics_timeout") == CAP


def test_a_head_trickled_a_byte_at_a_time_is_cut_off_at_the_timeout(demo_repo, serve):
    """The timeout bounded each read, not the head: a byte every 0.7 s (timeout 1 s) held the
    connection and its thread for as long as the client liked."""
    running = serve(demo_repo, http_header_timeout_s=1)
    s = connect(running)
    start = time.monotonic()
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        for b in b"x-a: " + b"b" * 20:
            s.sendall(bytes([b]))
            time.sleep(0.25)
            if time.monotonic() - start > 3:
                break
    except OSError:
        pass  # closed under us
    assert closed_within(s, 1), "the trickling head was still read 3 s into a 1 s timeout"
    assert time.monotonic() - start < 3.5
    s.close()
    eventually(lambda: refused(running, "metrics_timeout") == 1, "the timeout was not counted")


def test_a_head_past_max_header_bytes_is_not_read_further(demo_repo, serve):
    """A head that goes on and on is answered from what was read (http.server would read 100
    header lines of 64 KiB each and wait for the rest)."""
    running = serve(demo_repo, max_header_bytes=4096, http_header_timeout_s=30)
    with connect(running) as s:
        s.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(4))
        )
        s.settimeout(3)  # far inside the timeout: the answer comes without the head's end
        assert s.recv(12).startswith(b"HTTP/1.")
    assert refused(running, "metrics_timeout") == 0


def test_the_grpc_operations_listeners_bound_their_connections(demo_repo, serve):
    """The plaintext health port and the admin gRPC port: gRPC core closes a connection past
    ops_max_connections at once (before, any number were held for its two-minute handshake
    timeout, each a file descriptor)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running = serve(demo_repo, health_port=0, admin_port=0, ops_max_connections=CAP, http_header_timeout_s=30)
    for port in (running.gateway.health_port, running.gateway.admin_port):
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(CAP)]
        time.sleep(0.3)  # (accepted: each holds its place)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            assert closed_within(extra, 2.0), f"port {port}: a connection past ops_max_connections was kept"
        for s in held:
            s.close()

    def probe_passes() -> bool:  # (the places come back as the server hears of the closes)
        with grpc.insecure_channel(f"127.0.0.1:{running.gateway.health_port}") as ch:
            try:
                answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError:
                return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    eventually(probe_passes, "the health port's places were not given back")


def connect_from(running, source: str, port: int | None = None) -> socket.socket:
    """A connection to the metrics port (or ``port``) from ``source`` (any 127.x address is this
    host's)."""
    port = port or running.gateway.metrics_port
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def test_one_peer_holds_at_most_its_share_and_another_still_scrapes(demo_repo, serve):
    """Before, one client holding ops_max_connections silent sockets (renewed every
    http_header_timeout_s) kept every scraper out."""
    running = serve(demo_repo, ops_max_connections=8, ops_max_connections_per_peer=3, http_header_timeout_s=30)
    held = [connect_from(running, "127.0.0.2") for _ in range(3)]
    time.sleep(0.3)  # (accepted: each holds its slots)
    extra = connect_from(running, "127.0.0.2")
    assert closed_within(extra, 1.0), "a connection past ops_max_connections_per_peer was kept"
    # a scrape from another address is answered meanwhile, and a second peer gets its own share
    others = [connect_from(running, "127.0.0.3") for _ in range(3)]
    time.sleep(0.3)
    assert b"batchgate_" in urllib.request.urlopen(running.metrics_url, timeout=5).read()
    assert refused(running, "metrics_peer") == 1
    held[0].close()
    tries = []

    def share_back() -> bool:  # (its thread sees the close a moment later and gives the slot back)
        tries.append(again := connect_from(running, "127.0.0.2"))
        try:
            again.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            return again.recv(12).startswith(b"HTTP/1.")
        except OSError:
            return False
        finally:
            again.close()

    eventually(share_back, "a closed connection's share did not come back")
    for s in [extra, *held, *others]:
        s.close()
    assert refused(running, "metrics_peer") == len(tries)  # the first, and each try before the share was back
    assert refused(running, "metrics_connections") == 0


def test_peers_are_addresses_and_ipv6_slash_64s():
    from batchgate.monitoring.serve import peer_of

    assert peer_of(("10.1.2.3", 5000)) == "10.1.2.3"
    assert peer_of(("::ffff:10.1.2.3", 5000, 0, 0)) == "10.1.2.3"
    a, b = peer_of(("2001:db8:1:2::1", 1, 0, 0)), peer_of(("2001:db8:1:2:ffff::9", 2, 0, 0))
    assert a == b == "2001:db8:1:2::/64"
    assert peer_of(("2001:db8:1:3::1", 1, 0, 0)) != a
    assert peer_of(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"


def test_the_health_port_gives_one_peer_its_share_and_probes_still_pass(demo_repo, serve):
    """The plaintext health port is what kubelet probes: before, one client holding
    ops_max_connections idle sockets there failed the probes (gRPC core counts connections in
    all only). Now it runs on batchgate's engine, with the metrics port's share per peer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running = serve(
        demo_repo, health_port=0, ops_max_connections=8, ops_max_connections_per_peer=3, http_header_timeout_s=30
    )
    port = running.gateway.health_port
    held = [connect_from(running, "127.0.0.2", port) for _ in range(3)]
    time.sleep(0.3)
    extra = connect_from(running, "127.0.0.2", port)
    assert closed_within(extra, 2.0), "a connection past ops_max_connections_per_peer was kept"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # kubelet, from another address
        answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert refused(running, "health_peer") == 1
    for s in [extra, *held]:
        s.close()


def test_a_scrape_leaves_no_cyclic_garbage(demo_repo, serve):
    """Each metrics connection's head timer held its handler (a bound method) and the handler
    the timer: every scrape left that cycle, with the connection's socket and buffers, for the
    garbage collector (about 40 objects a scrape)."""
    import gc

    running = serve(demo_repo)
    request = b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"

    def scrape() -> bytes:
        with connect(running) as s:
            s.sendall(request)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        return got

    assert scrape().startswith(b"HTTP/1.0 200")  # (wsgiref answers as HTTP/1.0)
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, not freed
    try:
        for _ in range(10):
            scrape()
        time.sleep(0.5)  # (each handler's thread ends after its client has read the close)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__name__ in ("MetricsHandler", "Timer")]
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
    assert left == []
