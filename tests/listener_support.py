"""Asking each of a running batchgate's listeners for an answer over one address (``::1``,
``127.0.0.1``) with the clients a user has: tritonclient HTTP and gRPC (an inference on the
classifier ``clf``), a /metrics scrape, the gRPC health service, the admin HTTP and gRPC APIs.

Run as a script (``python -m listener_support <repo> <engine> <workers>``) it starts
``batchgate serve --host ::`` itself and prints, as JSON, what each listener answered over each
loopback: the IPv4-under-``net.ipv6.bindv6only=1`` test runs it inside a network namespace of its
own, where the clients must run too."""

from __future__ import annotations

import json
import sys
import urllib.request

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batchgate.admin.v1 import admin_pb2, admin_pb2_grpc

LOOPBACKS = ("::1", "127.0.0.1")


def ipv6_loopback() -> bool:
    """Whether this machine can listen on ``::1`` (the IPv6 tests skip only without it)."""
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _url(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _infer_http(url: str) -> bool:
    with httpclient.InferenceServerClient(url, network_timeout=10) as c:
        x = httpclient.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        out = c.infer("clf", [x]).as_numpy("probabilities")
    return out.shape == (1, 3) and bool(np.isclose(out.sum(), 1.0))


def _infer_grpc(url: str) -> bool:
    with grpcclient.InferenceServerClient(url) as c:
        x = grpcclient.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        out = c.infer("clf", [x], client_timeout=10).as_numpy("probabilities")
    return out.shape == (1, 3) and bool(np.isclose(out.sum(), 1.0))


def _health(url: str, service: str = "") -> bool:
    with grpc.insecure_channel(url) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def _get(url: str) -> bool:
    with urllib.request.urlopen(f"http://{url}", timeout=10) as answer:
        return answer.status == 200


def _admin_grpc(url: str) -> bool:
    with grpc.insecure_channel(url) as channel:
        admin_pb2_grpc.AdminServiceStub(channel).ListRoutes(admin_pb2.ListRoutesRequest(), timeout=10)
    return True


def answers(address: str, ports: dict[str, int]) -> dict[str, str]:
    """Per listener in ``ports`` (http, grpc, metrics, health, admin_http, admin): "ok", or what
    went wrong, asked over ``address``."""
    checks = {
        "http": lambda u: _infer_http(u),
        "grpc": lambda u: _infer_grpc(u),
        "metrics": lambda u: _get(u + "/metrics"),
        "health": lambda u: _health(u),
        "admin_http": lambda u: _get(u + "/admin/v1/routes"),
        "admin": lambda u: _admin_grpc(u),
    }
    out = {}
    for name, port in ports.items():
        try:
            out[name] = "ok" if checks[name](_url(address, port)) else "wrong answer"
        except Exception as e:  # what the client said, for the assertion's message
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def probe(address: str, port: int, spec: dict) -> str:
    """A kubelet probe of the Deployment (``grpc`` or ``httpGet``) sent to ``address:port``:
    "ok", or what went wrong."""
    try:
        if "grpc" in spec:
            ok = _health(_url(address, port), spec["grpc"].get("service", ""))
        else:
            ok = _get(_url(address, port) + spec["httpGet"]["path"])
        return "ok" if ok else "not serving"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}"


def main(repo: str, engine: str, workers: str) -> None:
    from processes import Proc, free_port

    ports = {name: free_port() for name in ("health", "admin", "admin_http")}
    args = ["serve", "--model-repository", repo, "--host", "::", "--admin-host", "::", "--grpc-engine", engine]
    args += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--workers", workers]
    args += ["--health-port", str(ports["health"]), "--admin-port", str(ports["admin"])]
    args += ["--admin-http-port", str(ports["admin_http"]), "--allow-open-admin", "true"]
    p = Proc(args).wait_ready(90)
    try:
        assert p.ports is not None
        ports.update(zip(("http", "grpc", "metrics"), p.ports))
        print(json.dumps({address: answers(address, ports) for address in LOOPBACKS}))
    finally:
        p.kill()


if __name__ == "__main__":
    main(*sys.argv[1:4])
