"""Overload: does batchgate stay useful at three times its capacity? (``make bench-overload``)

batchgate runs with its default settings on the demo ``mlp``, pinned to one core (so the model
runs in its event loop's turns, ``one_core_turn_us``; ``--server-arg=--one-core-turn-us=0`` puts
it back on a thread); the load tools run on the other. Phases (each ``--seconds`` long, 20 by default):

1. capacity: closed loop (gRPC h2load -c 8 -m 8; HTTP h2load --h1 -c 32), the OK rate and the
   OK p99 there are the baselines;
2. gRPC open loop at 3x the gRPC capacity (h2load --rps over 64 connections);
3. HTTP open loop at 3x the HTTP capacity (h2load --h1 --rps over 600 connections);
4. HTTP closed loop with 5,000 connections;
5. gRPC closed loop with 5,000 connections, one call at a time each (h2load -m 1): clients that
   call again as soon as they are answered, RESOURCE_EXHAUSTED or not;
6. reference: phases 2-5 again, the same clients against nginx refusing every request on the
   server's core (``bench/overload_reference.py``): the floor the load tools, the kernel and
   the core put under any server's refusal latency at these loads;
7. refusals: a second server, its one in-flight slot taken, refuses every request of a closed
   loop (gRPC, then HTTP): the CPU one refusal costs when the core does nothing else.

Beside the client's figures, each overload phase reports the server's CPU: busy fraction, its
event loop's time running and waiting, runnable, for the core (``common.thread_shares``), the
cost of a refusal as the CPU left over once its answers are paid at the capacity phase's cost,
and the goodput ceiling that refusal/answer ratio sets (a goodput of f at load L costs
f + (L - f) * ratio of the core when every request is read; ``bench/http_cost.py --bound`` has
the same in process). Set beside phase 7's refusal cost, it shows what the mix of answers and
refusals costs beyond the two alone.

An open-loop phase runs ``--stagger`` h2load processes (8), each with its share of the
connections, started a fraction of the --rps period apart: one h2load fires all its
connections' rate timers together (600 requests at once, every 37 ms at 3x), a pattern of
synchronised bursts rather than the spread-out arrivals of many independent clients.
``--stagger 1`` measures the bursts.

Reported per phase: goodput (OK answers received per second) as a fraction of capacity
(target >= 0.8), OK p99 against the capacity p99 (target <= 2x), refusal p99 (target <= 5 ms),
CANCELLED (target 0), and the server's batchgate_queue_depth against the client's view (Little's
law: OK rate x OK mean latency). Closed or reset connections count as refusals, never as goodput.

h2load sees HTTP statuses, not gRPC ones (every gRPC answer is HTTP 200): for gRPC phases the
OK count comes from the server's counters, and latencies by outcome from a probe that sends
``--probe-rate`` requests per second through grpc.aio beside h2load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from common import (
    BATCHGATE_READY_METRICS,
    BenchError,
    Server,
    choose_pinning,
    grpc_frame,
    say,
    serve_command,
    thread_shares,
    thread_times,
)
from http_cost import goodput_bound
from overload_reference import reference_phases
from overload_report import CDF_POINTS, plot, print_summary, summary

HERE = Path(__file__).resolve().parent
MODEL = "mlp"


def request_bytes() -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    msg = pb.ModelInferRequest(model_name=MODEL)
    t = msg.inputs.add(name="input", datatype="FP32", shape=[1, 256])
    del t
    msg.raw_input_contents.append(np.linspace(-1, 1, 256, dtype="<f4").tobytes())
    return msg.SerializeToString()


def http_body() -> bytes:
    row = [round(float(v), 4) for v in np.linspace(-1, 1, 256)]
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 256], "data": row}]}).encode()


# ------------------------------------------------------------------ server counters
_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.M)


def scrape(port: int) -> list[tuple[str, dict, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for name, labels, value in _SAMPLE.findall(text):
        out.append((name, dict(kv.split("=", 1) for kv in re.findall(r'\w+="[^"]*"', labels)), float(value)))
    return [(n, {k: v.strip('"') for k, v in lab.items()}, val) for n, lab, val in out]


def counts(samples, protocol: str) -> dict[str, float]:
    """Answers by status for ``protocol`` (OK from batchgate_requests, refusals before a model
    saw the request from batchgate_request_errors)."""
    out: dict[str, float] = {}
    for name, lab, v in samples:
        if name == "batchgate_requests_total" and lab.get("protocol") == protocol and lab.get("status") == "OK":
            out["OK"] = out.get("OK", 0) + v
        elif name == "batchgate_request_errors_total" and lab.get("protocol") == protocol:
            out[lab["code"]] = out.get(lab["code"], 0) + v
        elif name == "batchgate_event_loop_lag_seconds_bucket":
            out[f"lag_le:{lab['le']}"] = v
        elif (
            name == "batchgate_request_duration_seconds_bucket"
            and lab.get("model") == MODEL
            and lab.get("protocol") == protocol
        ):
            out[f"dur_le:{lab['le']}"] = out.get(f"dur_le:{lab['le']}", 0) + v
        elif name == "batchgate_queue_duration_seconds_bucket" and lab.get("model") == MODEL:
            out[f"queue_le:{lab['le']}"] = out.get(f"queue_le:{lab['le']}", 0) + v
        elif name in ("batchgate_gc_pause_seconds_count", "batchgate_gc_pause_seconds_sum"):
            out[f"gc{lab['generation']}_{name.rsplit('_', 1)[1]}"] = v
        elif name == "batchgate_refusals_total" and lab.get("model") == MODEL:
            out[f"reason:{lab['reason']}"] = out.get(f"reason:{lab['reason']}", 0) + v
        elif name == "batchgate_http_connections_refused_total" and lab.get("reason") == "overload_hold":
            out["holds"] = out.get("holds", 0) + v  # (either protocol's: one protocol runs at a time)
        elif name == "batchgate_http_connections_refused_total" and lab.get("reason") == "overload_retry_hold":
            out["retry_holds"] = v  # (HTTP's: retries held at overload_retries_per_s)
    return out


def loop_lag_p99_ms(server: dict) -> float | None:
    """The 99th percentile of the server's event-loop lag over a phase, from the histogram's
    cumulative buckets (so: the upper bound of the bucket it falls in; inf past the last)."""
    les = sorted((float(k.split(":", 1)[1]), v) for k, v in server.items() if k.startswith("lag_le:"))
    if not les or not les[-1][1]:
        return None
    total = les[-1][1]
    return next(le * 1000 for le, n in les if n >= 0.99 * total)


def histogram_p99_ms(server: dict, prefix: str) -> float | None:
    """The 99th percentile of one of the server's histograms over a phase, interpolated within
    its bucket as Prometheus' histogram_quantile does (None when it saw nothing)."""
    les = sorted((float(k.split(":", 1)[1]), v) for k, v in server.items() if k.startswith(prefix))
    if not les or not les[-1][1]:
        return None
    want, lower, below = 0.99 * les[-1][1], 0.0, 0.0
    for le, n in les:
        if n >= want:
            if le == float("inf"):
                return round(lower * 1000, 2)
            return round((lower + (le - lower) * (want - below) / max(n - below, 1e-9)) * 1000, 2)
        lower, below = le, n
    return None


def stalls(server: dict) -> dict:
    """What the server's own stalls were over a phase: its event loop's lag p99 and the
    collector's pauses by generation (count, mean ms); the raw figures leave ``server``."""
    out: dict = {"loop_lag_p99_ms": loop_lag_p99_ms(server)}
    # The server's own view: arrival to answer (answers of the benchmark's model, refusals read
    # before a model was chosen not among them) and the time in its queue, against the client's.
    out["server_request_p99_ms"] = histogram_p99_ms(server, "dur_le:")
    out["server_queue_p99_ms"] = histogram_p99_ms(server, "queue_le:")
    for g in "012":
        n = server.get(f"gc{g}_count", 0)
        out[f"gc{g}"] = [int(n), round(server.get(f"gc{g}_sum", 0) / n * 1000, 2) if n else None]
    for k in [k for k in server if k.startswith(("lag_le:", "gc", "dur_le:", "queue_le:"))]:
        del server[k]
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


class DepthSampler(threading.Thread):
    """batchgate_queue_depth of the model, every 250 ms."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.values, self.stop = port, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.values.extend(
                    v for n, lab, v in scrape(self.port) if n == "batchgate_queue_depth" and lab.get("model") == MODEL
                )
            self.stop.wait(0.25)


# ------------------------------------------------------------------ load tools
def h2load(
    pin,
    url: str,
    seconds: float,
    clients: int,
    *,
    h1: bool,
    rps: float | None,
    data: Path,
    log: Path,
    groups: int = 1,
    streams: int = 8,
):
    """One closed-loop h2load, or ``groups`` open-loop ones started ``1 / (groups * rps)`` apart.

    h2load starts every connection's --rps timer at once, so its connections send together: a
    burst of ``clients`` requests every ``1 / rps`` seconds, not the spread-out arrivals of an
    open-loop load from independent clients. Staggered processes spread them over the period
    (bursts of ``clients / groups``)."""
    if not rps:
        groups = 1
    groups = max(1, min(groups, clients))
    procs = []
    for g in range(groups):
        n = clients // groups + (1 if g < clients % groups else 0)
        cmd = [*pin.load, "h2load", "-t", "1", "-c", str(n), "-D", f"{int(seconds)}s", "-d", str(data)]
        cmd += ["--log-file", f"{log}.{g}", "-T", "30s", "-N", "30s"]
        if h1:
            cmd += ["--h1", "-m", "1", "-H", "content-type: application/json"]
        else:
            cmd += ["-m", "64" if rps else str(streams), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        if rps:
            cmd += ["--rps", f"{rps:.2f}"]
        cmd.append(url)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        if rps and g + 1 < groups:
            time.sleep(1 / (rps * groups))
    out = {"done": 0, "failed": 0, "errored": 0}
    rows = []
    for g, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=seconds + 60)
        if p.returncode != 0:
            raise BenchError(f"h2load failed ({p.returncode}):\n{stdout[-2000:]}{stderr[-2000:]}")
        r = re.search(
            r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", stdout
        )
        if not r:
            raise BenchError(f"cannot read h2load's output:\n{stdout}")
        out["done"] += int(r.group(3))
        out["failed"] += int(r.group(5))
        out["errored"] += int(r.group(6))
        part = Path(f"{log}.{g}")
        if part.stat().st_size:
            rows.append(np.loadtxt(part, dtype=np.int64, ndmin=2))
        part.unlink()
    return {**out, "rows": np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)}


TARGET_IN_FORCE = re.compile(r"its queue has held more than (\d+) ms of work")


async def probe(port: int, rate: float, seconds: float) -> dict[str, list[list[float]]]:
    """gRPC requests at ``rate`` per second (open loop): by status code, ``[sent, latency]`` pairs
    (seconds; ``sent`` from the probe's start)."""
    import grpc

    out: dict[str, list[list[float]]] = {}
    payload = request_bytes()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        async def one():
            t0 = time.perf_counter()
            try:
                await call(payload, timeout=30)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                # the queue's wait admitted while shedding, as the refusal names it (queue_target_ms
                # or what the server raised it to)
                held = TARGET_IN_FORCE.search(e.details() or "")
                if held:
                    out.setdefault("_target_ms", []).append([t0 - t_start, float(held.group(1))])
            out.setdefault(code, []).append([t0 - t_start, time.perf_counter() - t0])

        tasks, t_start, i = [], time.perf_counter(), 0
        while time.perf_counter() - t_start < seconds:
            tasks.append(asyncio.ensure_future(one()))
            i += 1
            await asyncio.sleep(max(0.0, t_start + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
    return out


# The probe runs in a process of its own on the load core, at a real-time priority where the
# system allows it: it then runs as soon as an answer arrives, not after h2load's turn on a core
# that h2load keeps busy, so its latencies are the server's (as for a client on another machine),
# not the load tool's queue. It sends 50 requests a second: h2load hardly notices.
REALTIME = ["chrt", "-f", "10"]


def realtime_allowed() -> bool:
    try:
        return shutil.which("chrt") is not None and subprocess.run([*REALTIME, "true"], timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def start_probe(pin, port: int, rate: float, seconds: float, realtime: bool) -> subprocess.Popen:
    prio = REALTIME if realtime else []
    cmd = [*pin.load, *prio, sys.executable, __file__, "--_probe", str(port), str(rate), str(seconds)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


# ------------------------------------------------------------------ one phase
def capacity(name, pin, ports, seconds, protocol, files, probe_set, srv) -> dict:
    """The closed loop that measures capacity: gRPC 8 connections x 8 streams, HTTP 32
    connections; run again with half as many calls in flight while the server refused some.
    Capacity is what the server answers with nothing refused: on a machine where an answer
    takes long, 64 calls in flight make a queue past ``queue_target_ms``, and the refusals
    that sheds it (thousands a second, each sent again at once) take the core from answers,
    understating the capacity and the load of the phases sized from it."""
    clients, streams = (8, 8) if protocol == "grpc" else (32, 1)
    while True:
        r = phase(name, pin, ports, seconds, protocol, clients, None, files, probe_set, srv=srv, streams=streams)
        r["in_flight"] = clients * streams
        if r["refused"] <= r["ok_per_s"] * seconds / 1000 or clients * streams <= 2:
            return r
        if streams > 1:
            streams //= 2
        else:
            clients //= 2
        say(f"  {r['refused']:,} refused in a closed loop: again with {clients * streams} calls in flight")


def phase(name, pin, ports, seconds, protocol, clients, rps, files, probe_set, groups=1, srv=None, streams=8):
    """``probe_set``: the probe's rate a second, and whether it runs at real-time priority;
    ``groups``: staggered h2load processes of an open-loop phase (see :func:`h2load`); ``srv``:
    the server (:class:`common.Server`): its CPU over the phase (the cost per answer and per
    refusal come from it) and its threads' time on the core (``threads``: :func:`common.thread_shares`);
    ``streams``: a gRPC closed loop's calls in flight per connection."""
    closed = f", closed loop{f' x {streams} streams' if protocol == 'grpc' else ''}"
    say(f"{name}: {protocol}, {clients} connections" + (f", {rps * clients:,.0f} req/s offered" if rps else closed))
    grpc_mode = protocol == "grpc"
    url = (
        f"http://127.0.0.1:{ports['grpc']}/inference.GRPCInferenceService/ModelInfer"
        if grpc_mode
        else f"http://127.0.0.1:{ports['http']}/v2/models/{MODEL}/infer"
    )
    log = files["dir"] / f"{name}.log"
    before = counts(scrape(ports["metrics"]), protocol)
    sampler = DepthSampler(ports["metrics"])
    sampler.start()
    result: dict = {}
    probe_out: dict = {}
    prober = start_probe(pin, ports["grpc"], probe_set[0], seconds, probe_set[1]) if grpc_mode else None
    cpu0 = srv.cpu_seconds() if srv else None
    threads0 = thread_times(srv.proc.pid) if srv else {}
    t0 = time.monotonic()
    h = h2load(
        pin,
        url,
        seconds,
        clients,
        h1=not grpc_mode,
        rps=rps,
        data=files[protocol],
        log=log,
        groups=groups,
        streams=streams,
    )
    if prober:
        out, err = prober.communicate(timeout=seconds + 120)
        if prober.returncode != 0:
            raise BenchError(f"the probe failed:\n{err[-2000:]}")
        probe_out = json.loads(out)
        held = np.array([ms for _, ms in probe_out.pop("_target_ms", [])], float)
        if len(held):  # the wait the server admitted while shedding, as its refusals said
            result["target_in_force_ms"] = {"median": float(np.median(held)), "max": float(held.max())}
    elapsed = time.monotonic() - t0
    if srv is not None:
        result["server_cpu_s"] = srv.cpu_seconds() - cpu0
        result["server_busy"] = result["server_cpu_s"] / elapsed
        result["threads"] = thread_shares(threads0, thread_times(srv.proc.pid), srv.proc.pid, elapsed)
    sampler.stop.set()
    sampler.join()
    server = delta(counts(scrape(ports["metrics"]), protocol), before)
    result["server_stalls"] = stalls(server)
    rows = h.pop("rows")
    result.update(h)
    result["seconds"] = seconds
    # h2load's "done" counts every request that ended, its "failed" (a status other than 2xx or
    # 3xx, or no answer) and "errored" (no answer) among them: what was sent is "done" alone.
    result["offered_per_s"] = h["done"] / seconds
    result["server"] = server
    if grpc_mode:
        ok_at = np.array(probe_out.get("OK", []), float).reshape(-1, 2)
        refused_at = np.array(probe_out.get("RESOURCE_EXHAUSTED", []), float).reshape(-1, 2)
        ok_lat, refused_lat = ok_at[:, 1], refused_at[:, 1]
        result["ok_per_s"] = server.get("OK", 0) / seconds
        result["probe"] = {k: len(v) for k, v in probe_out.items()}
        result["cancelled"] = server.get("CANCELLED", 0) + len(probe_out.get("CANCELLED", []))
    else:
        status, lat = rows[:, 1], rows[:, 2] / 1e6
        sent = (rows[:, 0] - (rows[:, 0].min() if len(rows) else 0)) / 1e6
        ok, no = status == 200, (status == 429) | (status == 503)
        ok_lat, refused_lat = lat[ok], lat[no]
        ok_at, refused_at = np.column_stack([sent[ok], ok_lat]), np.column_stack([sent[no], refused_lat])
        result["ok_per_s"] = int((status == 200).sum()) / seconds
        result["statuses"] = {str(s): int((status == s).sum()) for s in np.unique(status)}
        result["cancelled"] = server.get("CANCELLED", 0)
    result["refused"] = server.get("RESOURCE_EXHAUSTED", 0) + server.get("UNAVAILABLE", 0)
    # errored: connections closed or reset before an answer; never goodput
    result["closed_or_reset"] = h["errored"]
    # Latency percentiles by outcome, for the plot (the raw latencies are not kept).
    result["latency_ms"] = {
        outcome: [_ms(pct(lat_s, q)) for q in CDF_POINTS]
        for outcome, lat_s in (("ok", ok_lat), ("refused", refused_lat))
        if len(lat_s)
    }
    result["timeline"] = timeline(ok_at, refused_at, seconds)
    result["ok_p50_ms"] = _ms(pct(ok_lat, 50))
    result["ok_p99_ms"] = _ms(pct(ok_lat, 99))
    result["ok_mean_ms"] = _ms(float(np.mean(ok_lat)) if len(ok_lat) else None)
    result["refusal_p99_ms"] = _ms(pct(refused_lat, 99))
    depth = sampler.values
    result["queue_depth_mean"] = float(np.mean(depth)) if depth else None
    result["queue_depth_max"] = float(np.max(depth)) if depth else None
    result["queue_depth_series"] = depth  # (every 250 ms)
    # Little's law from the client's side: requests waiting = OK rate x OK mean latency
    result["client_in_system"] = (result["ok_per_s"] * result["ok_mean_ms"] / 1000) if result["ok_mean_ms"] else None
    result["elapsed_s"] = elapsed
    say(
        f"  offered {result['offered_per_s']:,.0f}/s, OK {result['ok_per_s']:,.0f}/s, OK p99 "
        f"{result['ok_p99_ms']} ms, refusal p99 {result['refusal_p99_ms']} ms, server {server}, "
        f"its stalls {result['server_stalls']}"
    )
    return result


def refusal_phases(pin, repo: Path, files, seconds: float, probe_set, caps: dict) -> dict:
    """What one overload refusal costs the server's core when it does nothing else: a second
    server (limits set for the purpose: one request in flight, no holds) with its one slot taken
    by a request whose body never comes, driven closed loop as in the capacity phases, so that
    every request is refused and the core is busy with refusals alone. Beside the capacity
    phases' CPU per answer: the ratio, and the goodput at 3x it allows (see ``costs``)."""
    limits = ["--max-inflight-requests", "1", "--overload-refusals-per-s", "1000000"]
    limits += ["--overload-retries-per-s", "1000000", "--grpc-overload-refusals-per-s", "1000000"]
    srv = Server("batchgate-refusals", [*pin.server, *serve_command(str(repo), *limits)], BATCHGATE_READY_METRICS,
                 files["dir"] / "refusals.log")  # fmt: skip
    out: dict = {}
    try:
        m = srv.match
        ports = {"http": int(m["http"]), "grpc": int(m["grpc"]), "metrics": int(m["metrics"])}
        body = http_body()
        with socket.create_connection(("127.0.0.1", ports["http"]), timeout=30) as held:
            held.sendall(
                f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n".encode()
                + body[:10]
            )
            time.sleep(0.5)  # (admitted: its body is awaited while everything else is refused)
            for protocol, clients in (("grpc", 8), ("http", 32)):
                r = phase(f"refusals-{protocol}", pin, ports, seconds, protocol, clients, None, files, probe_set,
                          srv=srv)  # fmt: skip
                cap = caps[protocol]
                if r["ok_per_s"] or not r["refused"] or not cap.get("server_cpu_s"):
                    raise BenchError(f"refusals-{protocol}: not every request was refused ({r['server']})")
                answer = cap["server_cpu_s"] / (cap["ok_per_s"] * cap["seconds"])
                refusal = r["server_cpu_s"] / r["refused"]
                out[protocol] = {
                    "refusals_per_s": round(r["refused"] / seconds),
                    "server_busy": round(r["server_busy"], 3),
                    "answer_cpu_us": round(answer * 1e6, 1),
                    "refusal_cpu_us": round(refusal * 1e6, 1),
                    "refusal_over_answer": round(refusal / answer, 3),
                    "goodput_bound_at_3x": round(goodput_bound(answer, refusal), 3),
                }
                say(f"  {protocol}: {out[protocol]}")
    finally:
        srv.stop()
    return out


def timeline(ok_at, refused_at, seconds: float) -> dict:
    """Per second of the phase (by when a request was sent): OK answers seen and their p99, and
    the refusals' p99. Shows whether a phase's tail is its onset (the first interval admits a
    burst) or spread over the run."""
    bins = int(np.ceil(seconds))
    out: dict[str, list] = {"ok": [], "ok_p99_ms": [], "refusal_p99_ms": []}
    for b in range(bins):
        ok = ok_at[(ok_at[:, 0] >= b) & (ok_at[:, 0] < b + 1), 1]
        no = refused_at[(refused_at[:, 0] >= b) & (refused_at[:, 0] < b + 1), 1]
        out["ok"].append(len(ok))
        out["ok_p99_ms"].append(_ms(pct(ok, 99)))
        out["refusal_p99_ms"].append(_ms(pct(no, 99)))
    after = ok_at[ok_at[:, 0] >= 1, 1]
    out["ok_p99_after_first_second_ms"] = _ms(pct(after, 99))
    out["refusal_p99_after_first_second_ms"] = _ms(pct(refused_at[refused_at[:, 0] >= 1, 1], 99))
    # The first second in tenths: where an onset's tail comes from (connecting, the burst admitted).
    onset: dict[str, list] = {"ok": [], "ok_max_ms": [], "refused": [], "refusal_max_ms": []}
    for b in np.arange(10) / 10:
        ok = ok_at[(ok_at[:, 0] >= b) & (ok_at[:, 0] < b + 0.1), 1]
        no = refused_at[(refused_at[:, 0] >= b) & (refused_at[:, 0] < b + 0.1), 1]
        onset["ok"].append(len(ok))
        onset["ok_max_ms"].append(_ms(float(ok.max())) if len(ok) else None)
        onset["refused"].append(len(no))
        onset["refusal_max_ms"].append(_ms(float(no.max())) if len(no) else None)
    out["first_second_by_tenth"] = onset
    return out


def _ms(v):
    return None if v is None else round(v * 1000, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--factor", type=float, default=3.0, help="overload as a multiple of the measured capacity")
    ap.add_argument("--connections", type=int, default=5000, help="HTTP closed-loop connections")
    ap.add_argument(
        "--open-connections",
        type=int,
        default=600,
        help="HTTP open-loop connections (h2load --rps is per connection; a connection whose answer "
        "comes late sends the requests it owes back to back once it is answered)",
    )
    ap.add_argument(
        "--stagger",
        type=int,
        default=8,
        help="h2load processes per open-loop phase, started a fraction of the --rps period apart (one "
        "h2load fires all its connections' timers together: bursts, not an open-loop arrival stream)",
    )
    ap.add_argument("--probe-rate", type=float, default=50)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `batchgate serve` argument, for exploring settings (the reported figures use defaults only)",
    )
    ap.add_argument(
        "--phases",
        default="grpc,http,connections,grpc-connections,reference,refusals",
        help="which overload phases to run after the capacity ones (comma-separated: grpc, http, connections "
        "(HTTP closed loop), grpc-connections (gRPC closed loop, one call at a time a connection); "
        "reference: the same loads against nginx refusing every request, the floor under refusal latency "
        "(bench/overload_reference.py); refusals: a second server that refuses every request, for the CPU "
        "a refusal costs)",
    )
    ap.add_argument("--_probe", nargs=3, help=argparse.SUPPRESS)  # (the probe's own process)
    args = ap.parse_args()
    if args._probe:
        port, rate, secs = args._probe
        print(json.dumps(asyncio.run(probe(int(port), float(rate), float(secs)))))
        return 0
    realtime = realtime_allowed()
    say(f"probe: its own process, {'real-time priority (chrt -f 10)' if realtime else 'normal priority'}")
    pin = choose_pinning(not args.no_pin)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 65536)), hard))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        repo = tmp / "models"
        subprocess.run([sys.executable, "-m", "batchgate.cli", "demo-repo", str(repo)], check=True, capture_output=True)
        files = {"dir": tmp, "grpc": tmp / "req.grpc", "http": tmp / "req.json"}
        files["grpc"].write_bytes(grpc_frame(request_bytes()))
        files["http"].write_bytes(http_body())
        cmd = serve_command(str(repo), *args.server_arg)
        settings = " ".join(args.server_arg) or "defaults"
        say(f"server: {'defaults only' if not args.server_arg else settings}; pinning: {pin.note}")
        srv = Server("batchgate", [*pin.server, *cmd], BATCHGATE_READY_METRICS, tmp / "server.log")
        try:
            m = srv.match
            ports = {"http": int(m["http"]), "grpc": int(m["grpc"]), "metrics": int(m["metrics"])}
            s = args.seconds
            report: dict = {"settings": settings, "pinning": pin.note, "seconds": s, "factor": args.factor}
            report["stagger"] = args.stagger
            report["probe"] = "own process, real-time (chrt -f 10)" if realtime else "own process"
            probe_set = (args.probe_rate, realtime)
            cap_g = capacity("capacity-grpc", pin, ports, s, "grpc", files, probe_set, srv)
            cap_h = capacity("capacity-http", pin, ports, s, "http", files, probe_set, srv)
            clients_g, clients_h = 64, args.open_connections
            wanted = set(args.phases.split(","))
            over_g = over_h = conns_h = conns_g = None

            def closed(name: str, protocol: str, streams: int = 8) -> dict:
                try:
                    return phase(name, pin, ports, s, protocol, args.connections, None, files, probe_set, srv=srv,
                                 streams=streams)  # fmt: skip
                except subprocess.TimeoutExpired:
                    # Seen with more connections than max_connections: the refused ones
                    # reconnect at once, and h2load keeps them cycling without finishing.
                    say("  h2load did not finish (refused connections reconnecting without pause); no figures")
                    return {"error": "load tool did not finish"}

            plan = []  # what ran, for the reference server (overload_reference.py)
            if "grpc" in wanted:
                rate = args.factor * cap_g["ok_per_s"] / clients_g
                over_g = phase(
                    "overload-grpc", pin, ports, s, "grpc", clients_g, rate, files, probe_set, args.stagger, srv
                )
                plan.append(("overload-grpc", "grpc", clients_g, rate, args.stagger, 8))
            if "http" in wanted:
                rate = args.factor * cap_h["ok_per_s"] / clients_h
                over_h = phase(
                    "overload-http", pin, ports, s, "http", clients_h, rate, files, probe_set, args.stagger, srv
                )
                plan.append(("overload-http", "http", clients_h, rate, args.stagger, 1))
            if "connections" in wanted:
                conns_h = closed("connections-http", "http")
                plan.append(("connections-http", "http", args.connections, None, 1, 8))
            if "grpc-connections" in wanted:  # one call at a time a connection, sent again once answered
                conns_g = closed("connections-grpc", "grpc", streams=1)
                plan.append(("connections-grpc", "grpc", args.connections, None, 1, 1))
            report["phases"] = {
                "capacity-grpc": cap_g,
                "capacity-http": cap_h,
                "overload-grpc": over_g,
                "overload-http": over_h,
                "connections-http": conns_h,
                "connections-grpc": conns_g,
            }
        finally:
            srv.stop()
        if "reference" in wanted:
            report["reference"] = reference_phases(pin, files, s, plan, probe_set)
        report["summary"] = summary(cap_g, cap_h, over_g, over_h, conns_h, conns_g, report.get("reference"))
        if "refusals" in wanted:
            report["refusal_costs"] = refusal_phases(pin, repo, files, s, probe_set, {"grpc": cap_g, "http": cap_h})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"overload-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=float))
    plot(report, path.with_suffix(".png"))
    print_summary(report["summary"])
    for protocol, c in report.get("refusal_costs", {}).items():
        print(
            f"{protocol} alone: a refusal costs {c['refusal_cpu_us']} µs of the core, "
            f"an answer {c['answer_cpu_us']} µs "
            f"(ratio {c['refusal_over_answer']}): at 3x a server that reads every request answers at most "
            f"{c['goodput_bound_at_3x']} of its capacity"
        )
    say(f"results: {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
