"""Shared fixtures: a real gateway on ephemeral ports, in a thread with its own loop.

``serve(repo, **settings)`` starts one and returns a handle with its ports; the
handle stops it when the test ends. Tests talk to it with real tritonclient
clients over real sockets.
"""

from __future__ import annotations

import contextlib
import os
import threading

import pytest

try:
    from gevent._hub_local import get_hub_if_exists  # (gevent's own module: where its hubs live)
except ImportError:  # a gevent without it: hubs are left to the process's end

    def get_hub_if_exists():
        return None


from batchgate.demo import build_demo_repository
from gateway_support import Running, start_gateway

_thread_run = threading.Thread.run


def _run_and_drop_the_hub(self: threading.Thread) -> None:
    """tritonclient.http's client (geventhttpclient) gives each thread that uses it a gevent hub,
    an epoll set and an eventfd that outlive the thread; the suite's worker threads would leave
    over a thousand of them. The hub goes when its thread ends."""
    try:
        _thread_run(self)
    finally:
        hub = get_hub_if_exists()
        if hub is not None:
            with contextlib.suppress(Exception):  # never in place of the thread's own error
                hub.destroy()


threading.Thread.run = _run_and_drop_the_hub  # type: ignore[method-assign]


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
