"""``python -m batchgate.healthcheck``: the container image's HEALTHCHECK, exit 0 when the server
in this container says it is ready.

It reads the settings as ``batchgate serve`` does from the environment (``BATCHGATE_<NAME>``;
flags given to the container's command and a ``--config`` file are not visible to it) and asks:

- the plaintext ``health_port`` (gRPC health, the server as a whole) when one is set: the way in
  whatever TLS, mTLS or ``health_requires_key`` ask of other clients;
- else ``/v2/health/ready`` on the HTTP port, over HTTPS when ``tls_cert_file`` is set (the
  certificate is not checked: this is the server's own loopback), with the token in
  ``BATCHGATE_HEALTHCHECK_TOKEN`` when there is one.

A plain ``http://`` probe (the image's before 2026-12-06) was always unhealthy with TLS on. Under
mTLS (``tls_client_ca_file``) set a ``health_port``: a client without a certificate is refused."""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

from .config import settings_in_effect
from .transport.sockets import host_port

TIMEOUT_S = 2.0
TOKEN_VARIABLE = "BATCHGATE_HEALTHCHECK_TOKEN"


def ready(environ: dict[str, str] | None = None) -> tuple[bool, str]:
    """(ready, what was asked and what it said)."""
    env = dict(os.environ if environ is None else environ)
    token = env.pop(TOKEN_VARIABLE, "")  # (not a setting of the server's)
    s, _ = settings_in_effect(None, env)
    where = _address(s.server.host)
    if s.server.health_port > 0:
        return _grpc_health(where, s.server.health_port)
    scheme, context = "http", None
    if s.tls.tls_cert_file:
        scheme, context = "https", ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    url = f"{scheme}://{host_port(where, s.server.http_port)}/v2/health/ready"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as answer:
            return answer.status == 200, f"{url}: {answer.status}"
    except OSError as e:  # (an HTTPError, 503 or 401, is one too)
        return False, f"{url}: {e}"


def _address(host: str) -> str:
    """Where the server listens: loopback when it binds every address (``::`` takes IPv4 too),
    else that one address (``::1`` on an IPv6-only loopback, say)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _grpc_health(host: str, port: int) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    where = f"gRPC health on {host_port(host, port)}"
    with grpc.insecure_channel(host_port(host, port)) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            return False, f"{where}: {e.code().name}"
    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    return serving, f"{where}: {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"


def main() -> int:
    ok, said = ready()
    print(said, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
