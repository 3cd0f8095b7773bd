"""The image's HEALTHCHECK (``python -m batchgate.healthcheck``) against real servers configured
as a container is, through BATCHGATE_* variables: plain, TLS, and mTLS with a health port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from listener_support import ipv6_loopback
from processes import Proc, free_port
from tls_support import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _check(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batchgate.healthcheck"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _serve(repo: str, env: dict[str, str]) -> Proc:
    args = ["serve", "--model-repository", repo, "--host", "127.0.0.1", "--grpc-port", "0"]
    args += ["--metrics-port", "0", "--admin-port", "-1", "--admin-http-port", "-1"]
    return Proc(args, env=env).wait_ready()


def test_the_image_healthcheck_is_healthy_with_tls_and_with_mtls_through_the_health_port(demo_repo, pki):
    """The image's probe was a plain http:// request: always unhealthy once TLS was on."""
    plain = {"BATCHGATE_HTTP_PORT": str(free_port())}
    assert _check(plain).returncode == 1  # nothing listens: unhealthy
    tls = {
        "BATCHGATE_HTTP_PORT": str(free_port()),
        "BATCHGATE_TLS_CERT_FILE": pki.path("server.crt"),
        "BATCHGATE_TLS_KEY_FILE": pki.path("server.key"),
    }
    mtls = {**tls, "BATCHGATE_TLS_CLIENT_CA_FILE": pki.path("ca.crt"), "BATCHGATE_HEALTH_PORT": str(free_port())}
    for env in (plain, tls, mtls):
        server = _serve(demo_repo, env)
        try:
            done = _check(env)
            assert done.returncode == 0, done.stdout + done.stderr
            assert ("gRPC health" if "BATCHGATE_HEALTH_PORT" in env else "/v2/health/ready") in done.stdout
        finally:
            server.kill()


def test_the_dockerfile_healthcheck_runs_the_module():
    dockerfile = (Path(__file__).parents[2] / "Dockerfile").read_text()
    assert '"python", "-m", "batchgate.healthcheck"' in dockerfile


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_the_image_healthcheck_asks_the_address_the_server_binds(demo_repo):
    """It always asked 127.0.0.1: a server bound to ::1 (or to one address of the pod's) was
    unhealthy. An address binding every address (0.0.0.0, ::) is still asked on 127.0.0.1."""
    for env in (
        {"BATCHGATE_HOST": "::1", "BATCHGATE_HTTP_PORT": str(free_port())},
        {"BATCHGATE_HOST": "::1", "BATCHGATE_HTTP_PORT": str(free_port()), "BATCHGATE_HEALTH_PORT": str(free_port())},
        {"BATCHGATE_HOST": "::", "BATCHGATE_HTTP_PORT": str(free_port())},
    ):
        args = ["serve", "--model-repository", demo_repo, "--grpc-port", "0", "--metrics-port", "0"]
        server = Proc([*args, "--admin-port", "-1", "--admin-http-port", "-1"], env=env).wait_ready()
        try:
            done = _check(env)
            assert done.returncode == 0, done.stdout + done.stderr
            assert ("[::1]" if env["BATCHGATE_HOST"] == "::1" else "127.0.0.1") in done.stdout
        finally:
            server.kill()
