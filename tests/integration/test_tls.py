"""TLS and mTLS on the V2 ports, certificate rotation, the plaintext health port and the
client-certificate subject: real gateways, real tritonclient clients, real TLS handshakes.

The certificates are made by tls_support.py with ``cryptography``: a CA, a server certificate for 127.0.0.1
and localhost, a client certificate, and a second CA with a client certificate of its own that the
gateway must refuse.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import logging
import os
import re
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tritonclient.utils import InferenceServerException

from batchgate.app import Gateway
from batchgate.config import ConfigError, TlsSettings, load_settings
from batchgate.security.tls import (
    ServerTls,
    certificate_info,
    grpc_peer_subject,
    http_peer_subject,
    load_server_tls,
    subject_of_der,
)
from batchgate.transport.http_limits import guarded_protocol
from tls_support import Pki, make_cert, make_pki, new_key, subject

POLL_S = 0.2  # tls_poll_s of the rotation tests
GRPC_SERVICE = "inference.GRPCInferenceService"


# ---------------------------------------------------------------------------- certificates
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_flags(pki: Pki, mtls: bool = False, **extra) -> dict:
    flags = {"tls_cert_file": pki.path("server.crt"), "tls_key_file": pki.path("server.key"), **extra}
    if mtls:
        flags["tls_client_ca_file"] = pki.path("ca.crt")
    return flags


# ---------------------------------------------------------------------------- clients
def http_client(running, pki: Pki, client: str | None = None) -> httpclient.InferenceServerClient:
    options = {"ca_certs": pki.path("ca.crt")}
    if client:
        options.update(certfile=pki.path(f"{client}.crt"), keyfile=pki.path(f"{client}.key"))
    return httpclient.InferenceServerClient(
        f"localhost:{running.gateway.http_port}", ssl=True, ssl_options=options, connection_timeout=5, network_timeout=5
    )


def grpc_client(running, pki: Pki, client: str | None = None, url: str = "") -> grpcclient.InferenceServerClient:
    kw = {}
    if client:
        kw = {"private_key": pki.path(f"{client}.key"), "certificate_chain": pki.path(f"{client}.crt")}
    return grpcclient.InferenceServerClient(
        url or f"localhost:{running.gateway.grpc_port}", ssl=True, root_certificates=pki.path("ca.crt"), **kw
    )


def infer_simple(c, mod) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    i0 = mod.InferInput("INPUT0", [1, 16], "INT32")
    i0.set_data_from_numpy(a)
    i1 = mod.InferInput("INPUT1", [1, 16], "INT32")
    i1.set_data_from_numpy(b)
    r = c.infer("simple", [i0, i1])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)


def served_serial(port: int, pki: Pki, alpn: str | None = None) -> int:
    """The serial number of the certificate a NEW TLS connection to ``port`` is given."""
    ctx = ssl.create_default_context(cafile=pki.path("ca.crt"))
    if alpn:
        ctx.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serials(running, pki: Pki) -> tuple[int, int]:
    """(HTTP port's, gRPC port's) certificate serial on a new connection."""
    g = running.gateway
    return served_serial(g.http_port, pki), served_serial(g.grpc_port, pki, alpn="h2")


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# ---------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def tls_gateway(demo_repo, pki):
    from gateway_support import start_gateway

    running = start_gateway(demo_repo, **tls_flags(pki), health_port=0)
    yield running
    running.stop()


def test_https_and_grpc_tls_with_tritonclient(tls_gateway, pki):
    h = http_client(tls_gateway, pki)
    assert h.is_server_live() and h.is_server_ready()
    infer_simple(h, httpclient)
    h.close()
    g = grpc_client(tls_gateway, pki)
    assert g.is_server_live() and g.is_server_ready()
    infer_simple(g, grpcclient)
    g.close()


def test_a_client_closing_its_https_connection_logs_no_error(tls_gateway, pki, caplog):
    """On asyncio's loop, a TLS transport closed a second time (the client's close, then
    uvicorn's connection_lost) lets go of its protocol; the write batching asked it for its
    buffer size after that, and every such close logged an AttributeError traceback."""
    for _ in range(3):
        h = http_client(tls_gateway, pki)
        assert h.is_server_live()
        h.close()
    time.sleep(0.5)  # (the server hears of the closes)
    assert "Exception in callback" not in caplog.text


def test_http_ssl_context_factory_option(tls_gateway, pki):
    """tritonclient.http's other way in: an ssl_context_factory."""

    def factory(**_kw):
        return ssl.create_default_context(cafile=pki.path("ca.crt"))

    c = httpclient.InferenceServerClient(
        f"127.0.0.1:{tls_gateway.gateway.http_port}", ssl=True, ssl_context_factory=factory, connection_timeout=5
    )
    assert c.is_server_live()
    c.close()


def test_plaintext_clients_are_refused(tls_gateway):
    h = httpclient.InferenceServerClient(tls_gateway.http_url, connection_timeout=5, network_timeout=5)
    with pytest.raises(Exception):  # noqa: B017 - the connection is dropped; the error type is the client's
        h.is_server_live()
    h.close()
    g = grpcclient.InferenceServerClient(tls_gateway.grpc_url)
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        g.is_server_live(client_timeout=5)
    g.close()


def test_an_untrusted_server_certificate_is_refused_by_the_client(tls_gateway, pki):
    """The client checks the chain: trusting only the other CA, it refuses the gateway."""
    ctx = ssl.create_default_context(cafile=pki.path("other-ca.crt"))
    with (
        socket.create_connection(("127.0.0.1", tls_gateway.gateway.http_port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="localhost")


def test_tls_1_1_is_refused(tls_gateway):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    with (
        socket.create_connection(("127.0.0.1", tls_gateway.gateway.http_port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        ctx.wrap_socket(raw)


def test_health_port_is_plaintext_grpc_health_only(tls_gateway):
    gw = tls_gateway.gateway
    assert gw.health_port and gw.health_port not in (gw.grpc_port, gw.http_port)
    with grpc.insecure_channel(f"127.0.0.1:{gw.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", GRPC_SERVICE):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # Nothing else is served there: the inference service is on the TLS port only.
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{gw.health_port}")
    with pytest.raises(InferenceServerException, match="UNIMPLEMENTED"):
        g.is_server_live(client_timeout=5)
    g.close()
    # The main port needs TLS even for health.
    with grpc.insecure_channel(tls_gateway.grpc_url) as ch, pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_port_follows_drain(serve, demo_repo, pki):
    running = serve(demo_repo, **tls_flags(pki), health_port=0)
    with grpc.insecure_channel(f"127.0.0.1:{running.gateway.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)

        def status(service=""):
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        assert status() == health_pb2.HealthCheckResponse.SERVING
        running.call(running.gateway.drain(0.5))
        assert status() == status(GRPC_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        # The process runs on: kubelet's liveness probe must not restart it mid-drain (one process
        # set every service NOT_SERVING, "liveness" too; the supervisor of workers did not)
        assert status("liveness") == health_pb2.HealthCheckResponse.SERVING


def test_a_client_that_never_says_hello_is_closed_after_the_head_timeout(serve, demo_repo, pki):
    """The TLS handshake had asyncio's 60 s on both ports: connections that never sent a
    ClientHello held a file descriptor for a minute, past http_header_timeout_s (whose clock
    starts after the handshake). On grpcio gRPC core's own handshake timeout is set to it."""
    running = serve(demo_repo, **tls_flags(pki), http_header_timeout_s=1.0)
    ports = [running.gateway.http_port, running.gateway.grpc_port]
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for port in ports]
    start = time.monotonic()
    try:
        for sock in silent:
            assert sock.recv(1) == b""  # closed by the server (a timeout here raises)
        assert time.monotonic() - start < 5
    finally:
        for sock in silent:
            sock.close()
    infer_simple(http_client(running, pki), httpclient)  # the server goes on


def test_health_port_off_by_default(serve, demo_repo):
    running = serve(demo_repo)
    assert running.gateway.health_port is None


def test_health_port_without_tls(serve, demo_repo, caplog):
    caplog.set_level(logging.INFO, logger="batchgate")
    running = serve(demo_repo, health_port=0)
    with grpc.insecure_channel(f"127.0.0.1:{running.gateway.health_port}") as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=GRPC_SERVICE), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    # the start-up line names every listener, this one too
    assert f"plaintext gRPC health on 127.0.0.1:{running.gateway.health_port}" in caplog.text


# ---------------------------------------------------------------------------- mTLS
@pytest.fixture(scope="module")
def mtls_gateway(demo_repo, pki):
    from gateway_support import start_gateway

    running = start_gateway(demo_repo, **tls_flags(pki, mtls=True))
    yield running
    running.stop()


def test_mtls_client_certificate_accepted(mtls_gateway, pki):
    h = http_client(mtls_gateway, pki, client="client")
    assert h.is_server_live()
    infer_simple(h, httpclient)
    h.close()
    g = grpc_client(mtls_gateway, pki, client="client")
    assert g.is_server_live()
    infer_simple(g, grpcclient)
    g.close()


@pytest.mark.parametrize("client", [None, "rogue"], ids=["no-client-cert", "other-ca-client-cert"])
def test_mtls_refuses(mtls_gateway, pki, client):
    h = http_client(mtls_gateway, pki, client=client)
    with pytest.raises(Exception):  # noqa: B017 - a TLS alert; the error type is the client's
        h.is_server_live()
    h.close()
    g = grpc_client(mtls_gateway, pki, client=client)
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        g.is_server_live(client_timeout=5)
    g.close()


# ---------------------------------------------------------------------------- rotation
class K8sSecretDir:
    """A directory laid out as kubelet mounts a Secret: tls.crt -> ..data/tls.crt, ..data -> a
    timestamped directory, and an update swaps the ..data link in one rename."""

    def __init__(self, root: Path):
        self.root = root
        self.n = 0

    def write(self, files: dict[str, bytes]) -> None:
        self.n += 1
        version = self.root / f"..2026_{self.n:04d}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    def path(self, name: str) -> str:
        return str(self.root / name)


def test_rotation_reaches_new_connections_and_keeps_open_ones(serve, demo_repo, pki, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchgate.tls")
    secret = K8sSecretDir(tmp_path)
    secret.write({"tls.crt": pki.server.pem, "tls.key": pki.server.key_pem})
    running = serve(
        demo_repo, tls_cert_file=secret.path("tls.crt"), tls_key_file=secret.path("tls.key"), tls_poll_s=POLL_S
    )
    gw = running.gateway
    assert serials(running, pki) == (pki.server.serial, pki.server.serial)

    # Connections opened before the rotation.
    ctx = ssl.create_default_context(cafile=pki.path("ca.crt"))
    keep_alive = http.client.HTTPSConnection("localhost", gw.http_port, context=ctx, timeout=5)
    keep_alive.request("GET", "/v2/health/live")
    assert keep_alive.getresponse().read() is not None
    open_sock = keep_alive.sock
    channel = grpc_client(running, pki)
    assert channel.is_server_live()

    # cert-manager / kubelet rotation: a new key and certificate, the ..data link swapped.
    second = pki.new_server()
    secret.write({"tls.crt": second.pem, "tls.key": second.key_pem})
    assert wait_for(lambda: serials(running, pki) == (second.serial, second.serial)), serials(running, pki)

    # The connections opened before still work, on their old certificate.
    keep_alive.request("GET", "/v2/health/ready")
    r = keep_alive.getresponse()
    r.read()
    assert r.status == 200 and keep_alive.sock is open_sock
    old = x509.load_der_x509_certificate(open_sock.getpeercert(binary_form=True))
    assert old.serial_number == pki.server.serial
    assert channel.is_server_live()
    infer_simple(channel, grpcclient)
    keep_alive.close()
    channel.close()

    # New tritonclient clients work with the new certificate.
    h = http_client(running, pki)
    infer_simple(h, httpclient)
    h.close()

    # A rewrite in place (a file replaced by rename) is picked up too.
    third = pki.new_server()
    for name, data in (("tls.key", third.key_pem), ("tls.crt", third.pem)):
        tmp = tmp_path / f"{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, tmp_path / "..data" / name)
    assert wait_for(lambda: serials(running, pki) == (third.serial, third.serial)), serials(running, pki)
    assert "TLS files reloaded" in caplog.text


def test_bad_new_files_keep_the_old_certificate(serve, demo_repo, pki, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchgate.tls")
    secret = K8sSecretDir(tmp_path)
    secret.write({"tls.crt": pki.server.pem, "tls.key": pki.server.key_pem})
    running = serve(
        demo_repo, tls_cert_file=secret.path("tls.crt"), tls_key_file=secret.path("tls.key"), tls_poll_s=POLL_S
    )
    first, second = pki.new_server(), pki.new_server()
    cases = [
        ("a key that is not the certificate's", {"tls.crt": first.pem, "tls.key": second.key_pem}),
        ("a half-written certificate", {"tls.crt": first.pem[: len(first.pem) // 2], "tls.key": first.key_pem}),
        ("an empty key", {"tls.crt": first.pem, "tls.key": b""}),
    ]
    for what, files in cases:
        caplog.clear()
        secret.write(files)
        assert wait_for(lambda: "cannot be used" in caplog.text), what
        time.sleep(2 * POLL_S)  # a few more checks: still the old certificate
        assert serials(running, pki) == (pki.server.serial, pki.server.serial), what
        g = grpc_client(running, pki)
        infer_simple(g, grpcclient)
        g.close()
        h = http_client(running, pki)
        infer_simple(h, httpclient)
        h.close()
    assert "previous certificate is still served" in caplog.text
    # Good files again: served.
    secret.write({"tls.crt": first.pem, "tls.key": first.key_pem})
    assert wait_for(lambda: serials(running, pki) == (first.serial, first.serial)), serials(running, pki)
    # each refused change was counted, and the served certificate says when it expires: an SRE's
    # alert on either (a renewal that failed, or was never picked up) had only the log before
    metrics = urllib.request.urlopen(running.metrics_url).read().decode()
    failed = re.search(r'^batchgate_reload_failures_total\{file="tls"\} (\S+)$', metrics, re.M)
    assert failed and float(failed.group(1)) >= len(cases), metrics
    assert 'batchgate_reload_failures_total{file="api_keys"}' not in metrics  # (no keys file: no series)
    expiry = re.search(r"^batchgate_tls_certificate_expiry_timestamp_seconds (\S+)$", metrics, re.M)
    assert expiry and float(expiry.group(1)) == first.cert.not_valid_after_utc.timestamp(), metrics


def test_client_ca_rotation(serve, demo_repo, pki, tmp_path):
    """The CA bundle is reloaded too: a bundle with the second CA added admits its clients on
    both protocols (cert-manager's trust rotation: old and new CA side by side), and once it is
    taken out, no longer."""
    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki.ca.pem)
    running = serve(demo_repo, **tls_flags(pki), tls_client_ca_file=str(ca), tls_poll_s=POLL_S)
    g = grpc_client(running, pki, client="rogue")
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        g.is_server_live(client_timeout=5)
    g.close()
    tmp = tmp_path / "ca.tmp"
    tmp.write_bytes(pki.ca.pem + pki.other_ca.pem)
    os.replace(tmp, ca)

    def admitted(client: str) -> bool:
        g = grpc_client(running, pki, client=client)
        h = http_client(running, pki, client=client)
        try:
            return g.is_server_live(client_timeout=5) and h.is_server_live()
        except Exception:
            return False
        finally:
            g.close()
            h.close()

    assert wait_for(lambda: admitted("rogue"))
    assert admitted("client")
    # The second CA taken out again (a compromised CA pulled): its clients are refused on both
    # protocols, while the first CA's are still admitted.
    tmp.write_bytes(pki.ca.pem)
    os.replace(tmp, ca)
    assert wait_for(lambda: not admitted("rogue"))
    assert admitted("client")


def test_rotation_reaches_every_grpc_port_on_the_grpcio_engine(serve, demo_repo, pki, tmp_path):
    """On the grpcio engine the main port and the admin port are two gRPC core servers, each with
    credentials that fetch the files after a reload. Each must get them: one mark shared by both
    let whichever shook hands first take the reload, and the admin port kept the old certificate
    and the old client CA bundle (a CA pulled from it still admitted) until the next reload."""
    secret = K8sSecretDir(tmp_path)
    secret.write({"tls.crt": pki.server.pem, "tls.key": pki.server.key_pem, "ca.crt": pki.ca.pem + pki.other_ca.pem})
    running = serve(
        demo_repo,
        tls_cert_file=secret.path("tls.crt"),
        tls_key_file=secret.path("tls.key"),
        tls_client_ca_file=secret.path("ca.crt"),
        tls_poll_s=POLL_S,
        grpc_engine="grpcio",
    )
    gw = running.gateway

    def serial(port: int, client: str = "client") -> int:
        ctx = ssl.create_default_context(cafile=pki.path("ca.crt"))
        ctx.load_cert_chain(pki.path(f"{client}.crt"), pki.path(f"{client}.key"))
        ctx.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

    def admin_admits(client: str) -> bool:
        creds = grpc.ssl_channel_credentials(
            pki.ca.pem, (pki.dir / f"{client}.key").read_bytes(), (pki.dir / f"{client}.crt").read_bytes()
        )
        with grpc.secure_channel(f"localhost:{gw.admin_port}", creds) as channel:
            try:
                channel.unary_unary("/no.Such/Method")(b"", timeout=5)
            except grpc.RpcError as e:
                return e.code() is grpc.StatusCode.UNIMPLEMENTED  # through the handshake
        return True

    assert serial(gw.grpc_port) == serial(gw.admin_port) == pki.server.serial
    assert admin_admits("rogue")
    # A new certificate, and the second CA pulled from the bundle, in one kubelet swap.
    second = pki.new_server()
    secret.write({"tls.crt": second.pem, "tls.key": second.key_pem, "ca.crt": pki.ca.pem})
    assert wait_for(lambda: serial(gw.grpc_port) == second.serial)  # the main port shakes hands first
    assert serial(gw.admin_port) == second.serial
    assert not admin_admits("rogue")
    assert admin_admits("client")


def _rogue(pki: Pki, alpn: str, version: ssl.TLSVersion) -> ssl.SSLContext:
    """The second CA's client (a session is resumed only with the context that made it)."""
    ctx = ssl.create_default_context(cafile=pki.path("ca.crt"))
    ctx.load_cert_chain(pki.path("rogue.crt"), pki.path("rogue.key"))
    ctx.maximum_version = version
    ctx.set_alpn_protocols([alpn])
    return ctx


def _rogue_visit(port: int, ctx: ssl.SSLContext, alpn: str, session=None) -> tuple:
    """A connection of ``ctx`` (resuming ``session`` when given): (admitted (see
    :func:`_admitted`), its session, whether it was resumed)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
        ):
            return _admitted(s, alpn), s.session, s.session_reused
    except (OSError, ssl.SSLError):
        return False, None, False


def _admitted(s: ssl.SSLSocket, alpn: str) -> bool:
    """An HTTP answer, or on the gRPC port the server's HTTP/2 SETTINGS frame."""
    if alpn == "h2":
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        got = s.recv(9)
        return len(got) == 9 and got[3] == 4  # a SETTINGS frame
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return s.recv(12).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("port_alpn", [("http", "http/1.1"), ("grpc", "h2")])
def test_a_session_from_before_a_ca_is_pulled_is_not_resumed_after_it(
    serve, demo_repo, pki, tmp_path, version, port_alpn
):
    """Resuming a TLS session skips the client's certificate chain: before, a client of a CA
    taken out of tls_client_ca_file kept its access by resuming the session it had (and each
    resumption handed it a fresh ticket). Now each handshake starts on the newest context, whose
    session cache and ticket keys are the reload's own."""
    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki.ca.pem + pki.other_ca.pem)
    running = serve(demo_repo, **tls_flags(pki), tls_client_ca_file=str(ca), tls_poll_s=POLL_S)
    port = running.gateway.http_port if port_alpn[0] == "http" else running.gateway.grpc_port
    alpn = port_alpn[1]
    ctx = _rogue(pki, alpn, version)
    admitted, session, _ = _rogue_visit(port, ctx, alpn)
    assert admitted and session is not None
    admitted, session, resumed = _rogue_visit(port, ctx, alpn, session)
    assert admitted and resumed  # resumption works: the check below means something
    tmp = tmp_path / "ca.tmp"
    tmp.write_bytes(pki.ca.pem)
    os.replace(tmp, ca)  # the second CA pulled
    assert wait_for(lambda: not _rogue_visit(port, _rogue(pki, alpn, version), alpn)[0])
    admitted, _, resumed = _rogue_visit(port, ctx, alpn, session)
    assert not admitted and not resumed


@pytest.mark.parametrize("port_alpn", [("http", "http/1.1"), ("grpc", "h2")])
def test_a_connection_accepted_before_a_reload_may_not_resume_a_session_after_it(
    serve, demo_repo, pki, tmp_path, port_alpn
):
    """A connection accepted before a reload shakes hands on the context of then (chosen as it
    is accepted), which can still resume a session of a CA the reload pulled: such a connection
    is closed once its handshake says it resumed, and the client's next one starts afresh."""
    if port_alpn[1] == "h2" and os.environ.get("BATCHGATE_TEST_GRPC_ENGINE", "h2") == "grpcio":
        pytest.skip("gRPC core (the grpcio engine) shakes hands on the credentials of the accept (docs/tls.md)")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki.ca.pem + pki.other_ca.pem)
    running = serve(demo_repo, **tls_flags(pki), tls_client_ca_file=str(ca), tls_poll_s=POLL_S)
    port = running.gateway.http_port if port_alpn[0] == "http" else running.gateway.grpc_port
    alpn = port_alpn[1]
    ctx = _rogue(pki, alpn, ssl.TLSVersion.TLSv1_3)
    admitted, session, _ = _rogue_visit(port, ctx, alpn)
    assert admitted and session is not None
    early = socket.create_connection(("127.0.0.1", port), timeout=5)  # accepted; its hello held back
    try:
        tmp = tmp_path / "ca.tmp"
        tmp.write_bytes(pki.ca.pem)
        os.replace(tmp, ca)  # the second CA pulled
        assert wait_for(lambda: not _rogue_visit(port, _rogue(pki, alpn, ssl.TLSVersion.TLSv1_3), alpn)[0])
        admitted, resumed = False, False
        try:
            with ctx.wrap_socket(early, server_hostname="localhost", session=session) as s:
                resumed = s.session_reused
                admitted = _admitted(s, alpn)
        except (OSError, ssl.SSLError):
            pass
        assert resumed  # (on the context of then: the check below is the server's closing)
        assert not admitted
    finally:
        early.close()


# ---------------------------------------------------------------------------- start-up errors
def _settings(**tls) -> TlsSettings:
    return TlsSettings(**tls)


def test_startup_errors_name_the_setting_and_file(pki, tmp_path):
    missing = str(tmp_path / "missing.crt")
    with pytest.raises(ConfigError, match=f"tls_cert_file {missing}: cannot read it"):
        load_server_tls(_settings(tls_cert_file=missing, tls_key_file=pki.path("server.key")))
    with pytest.raises(ConfigError, match="tls_key_file .*client.key.*cannot be used together"):
        load_server_tls(_settings(tls_cert_file=pki.path("server.crt"), tls_key_file=pki.path("client.key")))
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello\n")
    with pytest.raises(ConfigError, match=f"tls_client_ca_file {not_pem}: not a PEM file"):
        load_server_tls(
            _settings(
                tls_cert_file=pki.path("server.crt"),
                tls_key_file=pki.path("server.key"),
                tls_client_ca_file=str(not_pem),
            )
        )
    broken = tmp_path / "broken-ca.crt"
    broken.write_bytes(pki.ca.pem[:100] + b"\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="tls_client_ca_file .*not a usable PEM CA bundle"):
        load_server_tls(
            _settings(
                tls_cert_file=pki.path("server.crt"),
                tls_key_file=pki.path("server.key"),
                tls_client_ca_file=str(broken),
            )
        )
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        pki.server.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="tls_key_file .*encrypted"):
        load_server_tls(_settings(tls_cert_file=pki.path("server.crt"), tls_key_file=str(encrypted)))
    assert load_server_tls(_settings()) is None


def test_an_expired_certificate_is_served_with_an_error_logged(pki, tmp_path, caplog):
    """Refusing to start would not help (the renewal is what is missing): log it loudly."""
    expired = make_cert(subject("gateway"), pki.ca, server=True, days=-1)
    cert, key = expired.write(tmp_path, "expired")
    with caplog.at_level(logging.INFO, logger="batchgate.tls"):
        assert load_server_tls(_settings(tls_cert_file=cert, tls_key_file=key)) is not None
    assert "the certificate expired at" in caplog.text


async def test_gateway_start_refuses_bad_files_before_listening(demo_repo, pki, tmp_path):
    flags = {
        "model_repository": demo_repo,
        "host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "metrics_port": -1,
        "infer_threads": 1,
        "tls_cert_file": pki.path("server.crt"),
        "tls_key_file": str(tmp_path / "nope.key"),
    }
    gw = Gateway(load_settings(None, flags, environ={}))
    try:
        with pytest.raises(ConfigError, match="tls_key_file .*nope.key"):
            await gw.start()
        assert gw.http_port is None and gw.grpc_port is None
    finally:
        await gw.stop(0.1)


# ---------------------------------------------------------------------------- the caller's subject
class _SubjectHealth(HealthServicer):
    def __init__(self):
        super().__init__()
        self.subjects: list[str | None] = []

    async def Check(self, request, context):
        self.subjects.append(grpc_peer_subject(context))
        return await super().Check(request, context)


async def _subjects_seen(tls: ServerTls, pki: Pki) -> tuple[list, list]:
    """Serve HTTPS (the gateway's protocol class) and gRPC with ``tls``; make two requests on
    one HTTPS connection and one gRPC call with the client certificate; return the subjects the
    helpers found: (HTTP, gRPC)."""
    seen_http: list[str | None] = []

    async def app(scope, receive, send):
        if scope["type"] == "http":
            seen_http.append(http_peer_subject(scope))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    http_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=guarded_protocol(65536, 5, 5, 16, lambda _reason: None),
        loop="none",
        lifespan="off",
        log_config=None,
        log_level="warning",
    )
    config.load()
    config.ssl = tls.http_context
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    health = _SubjectHealth()
    grpc_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    grpc_port = grpc_server.add_secure_port("127.0.0.1:0", tls.grpc_credentials())
    await grpc_server.start()

    def clients():
        ctx = ssl.create_default_context(cafile=pki.path("ca.crt"))
        ctx.load_cert_chain(pki.path("client.crt"), pki.path("client.key"))
        conn = http.client.HTTPSConnection("localhost", http_port, context=ctx, timeout=5)
        for _ in range(2):  # two requests on one connection: both scopes carry it
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"ok"
        conn.close()
        creds = grpc.ssl_channel_credentials(pki.ca.pem, pki.client.key_pem, pki.client.pem)
        with grpc.secure_channel(f"localhost:{grpc_port}", creds) as ch:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)

    try:
        await asyncio.to_thread(clients)
    finally:
        await grpc_server.stop(0)
        server.should_exit = True
        await task
    return seen_http, health.subjects


async def test_peer_subject_is_the_same_on_both_protocols(pki):
    """The helpers the authorization uses, behind the gateway's own parts (the TLS state, the
    HTTP protocol class) and real handshakes: both give the client certificate's RFC 4514
    subject, the same string, and None without mTLS (no client certificate is asked for)."""
    expected = pki.client.cert.subject.rfc4514_string()
    assert expected == "O=Acme,CN=client"
    for mtls in (True, False):
        tls = ServerTls(
            _settings(
                tls_cert_file=pki.path("server.crt"),
                tls_key_file=pki.path("server.key"),
                tls_client_ca_file=pki.path("ca.crt") if mtls else "",
            )
        )
        seen_http, seen_grpc = await _subjects_seen(tls, pki)
        want = expected if mtls else None
        assert seen_http == [want, want], mtls
        assert seen_grpc == [want], mtls
    assert http_peer_subject({"type": "http", "headers": []}) is None


def test_subject_format_matches_rfc4514_of_cryptography():
    """subject_of_der (no cryptography at run time) writes what cryptography writes."""
    key = new_key()
    names = [
        subject("client", "Acme"),
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, ' a,b+c"d\\e<f>g;h#'),
                x509.NameAttribute(NameOID.EMAIL_ADDRESS, "x@example.com"),
                x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "com"),
                x509.NameAttribute(NameOID.USER_ID, "u1"),
                x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                x509.NameAttribute(NameOID.STREET_ADDRESS, "Straße 1 "),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "日本"),
            ]
        ),
        x509.Name(
            [
                x509.RelativeDistinguishedName(
                    [x509.NameAttribute(NameOID.COMMON_NAME, "a"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "b")]
                ),
                x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "#x")]),
            ]
        ),
        x509.Name([]),
    ]
    for name in names:
        cert = make_cert(name).cert if len(name) else None
        if cert is None:  # an empty subject: built by hand (make_cert's issuer is the subject)
            now = datetime.datetime.now(datetime.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(subject("issuer"))
                .public_key(key.public_key())
                .serial_number(7)
                .not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256())
            )
        der = cert.public_bytes(serialization.Encoding.DER)
        assert subject_of_der(der) == name.rfc4514_string()
        info = certificate_info(der)
        assert info.serial == cert.serial_number and info.not_after == cert.not_valid_after_utc
    with pytest.raises(ValueError):
        subject_of_der(b"\x30\x03\x02\x01")
