"""Shared fixtures: a real gateway on ephemeral ports, in a thread with its own loop.

``serve(repo, **settings)`` starts one and returns a handle with its ports; the
handle stops it when the test ends. Tests talk to it with real tritonclient
clients over real sockets.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass

import pytest

from batchgate.app import Gateway
from batchgate.config import load_settings
from batchgate.demo import build_demo_repository


@dataclass
class Running:
    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.gateway.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.metrics_port}/metrics"

    def call(self, coro, timeout: float = 60):
        """Run a coroutine on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace_s: float = 5.0) -> bool:
        if not self.loop.is_running():
            return True
        clean = self.call(self.gateway.stop(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        return clean


def start_gateway(repo: str, **overrides) -> Running:
    flags = {
        "model_repository": repo,
        "host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "metrics_port": 0,
        "infer_threads": 4,
    }
    flags.update(overrides)
    settings = load_settings(None, flags, environ={})
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    def run():
        asyncio.set_event_loop(loop)

        async def boot():
            gw = Gateway(settings)
            box["gw"] = gw
            try:
                await gw.start()
            except BaseException as e:  # surface start-up errors to the test
                box["err"] = e
            finally:
                started.set()

        loop.create_task(boot())
        loop.run_forever()

    t = threading.Thread(target=run, name="gateway", daemon=True)
    t.start()
    started.wait(60)
    if "err" in box:
        raise box["err"]
    return Running(box["gw"], loop, t)


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
