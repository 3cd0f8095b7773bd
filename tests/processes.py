"""``batchgate serve`` as a real subprocess: started, watched for its ready line, killed."""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

BATCHGATE = [sys.executable, "-m", "batchgate.cli"]
READY_LINE = re.compile(r"HTTP on [^ ]+:(\d+), gRPC on [^ ]+:(\d+), metrics on [^ ]+:(\d+)")


def free_port() -> int:
    """A loopback TCP port nothing listens on, for a listener a test starts later.

    Picked below the kernel's ephemeral range: a port from that range (what binding port 0
    gives) can be taken meanwhile as the local end of any outgoing connection, such as a
    gateway probing the very address the test means to bring up.
    """
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def serve_args(repo: str, *extra: str) -> list[str]:
    """``batchgate serve`` of ``repo`` ("": none, remote models only) on loopback, every port
    picked free, the admin listener off."""
    return [
        "serve",
        *(("--model-repository", repo) if repo else ()),
        "--host",
        "127.0.0.1",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--admin-port",
        "-1",
        "--admin-http-port",
        "-1",
        *extra,
    ]


def slow_to_load(nodes: int = 20000):
    """A model ONNX Runtime takes seconds to load (a chain of ``nodes`` Adds)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.full((1, 4), i * 1e-3, np.float32), f"c{i}") for i in range(nodes)]
    names = ["features"] + [f"t{i}" for i in range(nodes - 1)] + ["probabilities"]
    adds = [helper.make_node("Add", [names[i], f"c{i}"], [names[i + 1]]) for i in range(nodes)]
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["b", 4])
    model = helper.make_model(
        helper.make_graph(adds, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class Proc:
    def __init__(self, args, env=None, preexec=None):
        """``preexec``: run in the child before batchgate starts (resource limits, say)."""
        self.p = subprocess.Popen(
            BATCHGATE + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec,
        )
        self.lines: list[str] = []
        self.ports = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)
            m = READY_LINE.search(line)
            if m:
                self.ports = tuple(int(x) for x in m.groups())
                self._ready.set()

    def wait_ready(self, timeout=60):
        end = time.monotonic() + timeout
        while not self._ready.is_set():
            if self.p.poll() is not None:
                raise AssertionError("batchgate exited early:\n" + "".join(self.lines))
            if time.monotonic() > end:
                raise AssertionError("batchgate did not start:\n" + "".join(self.lines))
            time.sleep(0.05)
        return self

    @property
    def http(self):
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def grpc(self):
        return f"127.0.0.1:{self.ports[1]}"

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        """Until ``text`` shows in the output (an assertion, with the output, past ``timeout``)."""
        end = time.monotonic() + timeout
        while text not in self.output():
            assert time.monotonic() < end, self.output()
            time.sleep(0.1)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)
        self._reader.join(2)  # the pipe is at its end once the process is gone (and any child it left)
        if not self._reader.is_alive():
            self.p.stdout.close()


def logged_at(output: str, message: str) -> float:
    """The wall-clock time of the first log line ending in ``message`` (plain format, local time)."""
    for line in output.splitlines():
        if line.endswith(message):
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    raise AssertionError(f"no log line '{message}' in:\n{output}")


def pod_statistics(read, least: int, timeout_s: float = 20.0) -> dict:
    """``read()``'s statistics once its count (``read()[1]``) reaches ``least``, or the last read
    after ``timeout_s``: with worker processes, a worker answers the pod's V2 statistics from a
    reading up to 0.5 s old (README, Worker processes), so calls of the last half second may not
    be in the first answer. ``read`` returns (statistics, count)."""
    end = time.monotonic() + timeout_s
    while True:
        stats, count = read()
        if count >= least or time.monotonic() > end:
            return stats
        time.sleep(0.2)


def successes(answer: dict) -> tuple[dict, int]:
    """A V2 statistics answer's first model and its success count (for :func:`pod_statistics`)."""
    stats = answer["model_stats"][0]
    return stats, int(stats["inference_stats"]["success"].get("count", 0))
