"""The floor under ``bench/overload.py``'s refusal latencies: its own clients against nginx.

nginx, on the core batchgate had and with one worker, refuses every request it is sent: 429 on
HTTP/1.1, RESOURCE_EXHAUSTED (a trailers-only answer) on gRPC over h2c, the body never read.
Nothing is cheaper to refuse with, so what its clients see is what the load tools, the kernel and
the core put under any server's refusal latency at these loads, measured in the same run:

- the open-loop phases at the same offered rates, connections and stagger: how much of a
  refusal's p99 the clients' own pattern (bursts, the shared load core) makes;
- the closed loops of 5,000 connections: every connection has a request outstanding at all
  times, so by Little's law each waits about 5,000 over the refusals answered a second, however
  cheaply each is made.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from common import BenchError, cpu_seconds, say, stop_process

CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
error_log {dir}/nginx-error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {dir}/nginx-body;
  keepalive_requests 1000000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{http} backlog=8192;
    location / {{ return 429 '{{"error":"overloaded"}}'; }}
  }}
  server {{
    listen 127.0.0.1:{grpc} http2 backlog=8192;
    location / {{
      default_type application/grpc;
      add_header grpc-status 8 always;
      add_header grpc-message "overloaded" always;
      return 200;
    }}
  }}
}}
"""


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """One nginx process (no master) refusing everything, pinned where the server ran; the same
    ``proc`` and ``cpu_seconds`` as :class:`common.Server`."""

    def __init__(self, binary: str, pin, workdir: Path):
        self.ports = {"http": free_port(), "grpc": free_port()}
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text(CONF.format(dir=workdir, **self.ports))
        self.log = workdir / "nginx-error.log"
        self.proc = subprocess.Popen(
            [*pin.server, binary, "-p", str(workdir), "-c", str(conf), "-e", str(self.log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end and self.proc.poll() is None:
            try:
                for port in self.ports.values():
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise BenchError(f"nginx did not start:\n{tail}")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 10)


def reference_phases(pin, files, seconds: float, plan: list[tuple], probe_set) -> dict:
    """``plan``: ``(name, protocol, clients, rps a connection or None, stagger, streams)`` as
    batchgate's phases ran. By phase: refusals a second, their p50 and p99 (ms; gRPC from the
    probe, as batchgate's), and nginx's busy fraction. Empty, with a note, without nginx."""
    from overload import h2load, pct, start_probe

    binary = nginx_binary()
    if binary is None:
        say("reference: nginx not found (make bench-tools installs it); no refusal floor measured")
        return {}
    out: dict = {}
    ngx = Nginx(binary, pin, files["dir"] / "nginx")
    try:
        for name, protocol, clients, rps, groups, streams in plan:
            grpc_mode = protocol == "grpc"
            port = ngx.ports[protocol]
            url = (
                f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
                if grpc_mode
                else f"http://127.0.0.1:{port}/v2/models/mlp/infer"
            )
            prober = start_probe(pin, port, probe_set[0], seconds, probe_set[1]) if grpc_mode else None
            cpu0, t0 = ngx.cpu_seconds(), time.monotonic()
            h = h2load(pin, url, seconds, clients, h1=not grpc_mode, rps=rps, data=files[protocol],
                       log=files["dir"] / f"reference-{name}.log", groups=groups, streams=streams)  # fmt: skip
            busy = (ngx.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            rows = h.pop("rows")
            if grpc_mode:
                got, err = prober.communicate(timeout=seconds + 120)
                if prober.returncode != 0:
                    raise BenchError(f"the probe failed:\n{err[-2000:]}")
                lat = np.array([ms for _, ms in json.loads(got).get("RESOURCE_EXHAUSTED", [])], float)
            else:
                lat = rows[rows[:, 1] == 429, 2] / 1e6
            out[name] = {
                "refusals_per_s": round(h["done"] / seconds),
                "refusal_p50_ms": None if not len(lat) else round(pct(lat, 50) * 1000, 2),
                "refusal_p99_ms": None if not len(lat) else round(pct(lat, 99) * 1000, 2),
                "server_busy": round(busy, 3),
            }
            say(f"  reference {name}: nginx refusing all, {out[name]}")
    finally:
        ngx.stop()
    return out
