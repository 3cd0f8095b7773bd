"""Shared fixtures: a real gateway on ephemeral ports, in a thread with its own loop.

``serve(repo, **settings)`` starts one and returns a handle with its ports; the
handle stops it when the test ends. Tests talk to it with real tritonclient
clients over real sockets.
"""

from __future__ import annotations

import os

import pytest

from batchgate.demo import build_demo_repository
from gateway_support import Running, start_gateway


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory) -> str:
    return build_demo_repository(str(tmp_path_factory.mktemp("demo_models")))


@pytest.fixture(scope="session")
def server(demo_repo):
    """One gateway over the demo repository, shared by the tests that only read."""
    running = start_gateway(demo_repo)
    yield running
    running.stop()


@pytest.fixture
def serve():
    """Start gateways with custom settings; each is stopped at the end of the test."""
    started: list[Running] = []

    def _serve(repo: str, **overrides) -> Running:
        r = start_gateway(repo, **overrides)
        started.append(r)
        return r

    yield _serve
    for r in started:
        r.stop()


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
