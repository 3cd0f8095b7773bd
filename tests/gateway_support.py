"""A real gateway on ephemeral ports, in a thread with its own event loop (used by the
fixtures in conftest.py, and by test modules that need a gateway of their own scope).

A module of its own, not conftest.py: several conftest.py files exist under tests/, and
``import conftest`` would find whichever was imported last."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass

from batchgate.app import Gateway
from batchgate.config import load_settings


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


def start_gateway(repo: str, config_file: str | None = None, uvloop: bool = False, **overrides) -> Running:
    """``uvloop``: on uvloop's loop, as ``batchgate serve`` runs (asyncio's by default: where the
    two differ in what a test looks at, the test asks for uvloop)."""
    flags = {
        "model_repository": repo,
        "host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "metrics_port": 0,
        "admin_port": 0,
        "admin_http_port": 0,
        "infer_threads": 4,
        # The repository API is refused on an open server unless allowed; tests of that rule
        # (tests/integration/test_auth.py) pass allow_open_admin=False.
        "allow_open_admin": True,
        # The access log (on by default: errors and a sample) would write its lines among pytest's
        # output; tests/integration/test_access_log.py reads it, and tests/e2e/test_cli.py reads a
        # served process's stdout.
        "access_log_file": os.devnull,
    }
    if os.environ.get("BATCHGATE_TEST_GRPC_ENGINE"):  # `make test-grpcio`: the gRPC tests on grpc.aio
        flags["grpc_engine"] = os.environ["BATCHGATE_TEST_GRPC_ENGINE"]
    flags.update(overrides)
    settings = load_settings(config_file, flags, environ={})
    if uvloop:
        import uvloop as uv

        loop = uv.new_event_loop()
    else:
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
        loop.close()  # (stopped by Running.stop) its selector and self-pipe go with it

    t = threading.Thread(target=run, name="gateway", daemon=True)
    t.start()
    started.wait(60)
    if "err" in box:
        raise box["err"]
    return Running(box["gw"], loop, t)


def eventually(check, what: str, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Calls `check` until it returns true, failing with `what` after `timeout` seconds: for what
    the server learns a moment after the client acts (a connection closed, a file changed). A
    fixed sleep instead flakes on a busy CI machine."""
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, what
        time.sleep(interval)


def judge_while_half_written(path, half: str, full: str, poll_s: float, check, good, rounds: int = 5) -> None:
    """Rewrite ``path`` in place ``rounds`` times, pausing half-way (``half``, then the rest of
    ``full``), and assert ``check() == good`` for every answer given before a second poll of the
    file could have come (so a slow machine can only judge fewer answers, never wrongly)."""
    judged = 0
    for _ in range(rounds):
        with open(path, "r+") as f:  # the same inode rewritten: truncate, write, pause, write the rest
            t0 = time.monotonic()
            f.truncate(0)
            f.write(half)
            f.flush()
            while time.monotonic() - t0 < 0.8 * poll_s:
                got = check()
                if time.monotonic() - t0 < 0.95 * poll_s:  # answered before a second poll can be
                    assert got == good, got
                    judged += 1
            f.write(full[len(half) :])
        time.sleep(2.5 * poll_s)  # the full file applied before the next round
    assert judged >= rounds, "the test machine was too slow to judge an answer"


def gather_model():
    """INT64 idx [-1, 1] -> FP32 [-1, 1] = table[idx] (0, 10, ..., 90): an index past the table
    fails at run time, a failure one request's values cause (for the batch-rerun tests)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from batchgate.demo import _model

    table = numpy_helper.from_array(np.arange(10, dtype=np.float32) * 10, "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["out"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1])],
        [table],
    )
    return _model(graph)
