"""Remote models benchmark: what the hop through batchgate costs, and where gateway batching pays.

batchgate can serve a model that executes on an upstream V2 gRPC server (``--remote-model``,
server/backends/remote.py). Here a real upstream serves an MLP, and three paths to it are driven
at the same load in the same run:

    direct        h2load -> upstream
    passthrough   h2load -> gateway (batching=passthrough: every request forwarded on its own, as the
                  caller's bytes: raw forwarding) -> upstream
    decoded       the same with forwarding=decoded: each request decoded, checked and re-encoded at the
                  gateway (what passthrough did before raw forwarding; the baseline it is measured against)
    gateway       h2load -> gateway (batching=gateway: the gateway's batcher, one upstream call per batch)
                  -> upstream

The upstream is itself a batchgate process with the ONNX backend (Triton is not installed here;
batchgate answers the same V2 gRPC service) serving an MLP built here: by default the issue's
256 -> 1024 -> 1024 -> 16, ~60 us at batch 1 on this machine's cores (--hidden picks another),
max_batch_size 64, one instance, one ONNX Runtime thread (as bench/batching.py). Two variants:

    A   the upstream batches as well: dynamic_batching, max_queue_delay 2000 us (Triton policy)
    B   the upstream does not batch: no dynamic_batching block, like a Triton model without one

The gateway keeps the remote backend's defaults but for the mode: in gateway mode a queue delay of
1000 us under batchgate's default (Triton) batching policy and at most 2 calls in flight to its one
upstream; in passthrough up to 256 calls in flight (--gateway-delay-us, --gateway-policy and
--max-inflight change them).

Load: N concurrent single-row [1, 256] FP32 gRPC clients, closed loop (``h2load -c N -m 1``), at
N = 1 and 4 (low load) and 64 (the headline). Every path gets the very same request bytes: the
gateway serves the remote model under the upstream's own name (``name=mlp upstream_model=mlp``),
so one pre-framed message fits all three paths and any difference comes from the path, not from
the request. Each server's ``/v2/models/mlp/stats`` then describes its own side of the hop.

Topology (2 cores): the upstream on the first core; the gateway and h2load share the second. The
direct path has no gateway, so h2load has the second core to itself there. The hop therefore pays
for its own CPU and for sharing the load tool's core; a gateway on a core of its own would cost
less. With --no-pin, fewer than 2 cores or no taskset, nothing is pinned (the output says so).

Reported per (upstream variant, path, clients): successful req/s, p50 and p99, the ratios to the
direct path of the same variant in the same run, and each server's own figures: gateway and
upstream executions per second and mean rows per execution, the mean upstream call time the gateway
measured, and the CPU each process used per request. The cost of the hop is passthrough / direct
(and gateway / direct at low load, where batching can only add its queue delay); where gateway
batching helps is gateway against direct and against passthrough, variant B above all, where
nothing else batches.

A level counts only if all of these hold (else it is invalid and the exit status is 1):
- before any load, the exact bytes h2load sends go through a real gRPC client to the server h2load
  talks to, and the answer equals ONNX Runtime's;
- h2load saw no error and no non-2xx status (a gRPC error still arrives as HTTP 200, hence:)
- that server counted at least the successes h2load reports, and no more successes and failures
  than those plus the requests h2load cut off when it stopped; the rows it executed lie between
  the two (bench/batching.py's checks);
- behind a gateway: the upstream executed at least the rows h2load saw succeed and no more than
  the cut-off allows; it received as many calls as the gateway says it sent
  (``batchgate_upstream_requests_total``); the gateway saw no upstream error but cancellations
  of cut-off requests; passthrough forwarded single rows only;
- an upstream without dynamic batching ran one request per execution;
- when a server stops, its Prometheus batch-size histogram agrees with its ``batch_stats``.

Fresh processes (upstream, and the gateway where there is one) for every (variant, path) in every
round; the second round runs the paths in the reverse order, so a machine that drifts during the
run does not favour one path. A level is measured again (once) when other processes took more
than a quarter of a core meanwhile, as in bench/batching.py.

    python bench/remote.py                  # ~4 minutes: 2 rounds x 8 configurations x levels 1, 4, 64 x 3 s
    python bench/remote.py --quick          # ~40 s: 1 round, levels 1 and 64, short runs
    python bench/remote.py --hidden 2048,2048,2048   # a heavier model (batch 1 ~0.7 ms)

Writes bench/results/remote.json and bench/results/remote.png; prints markdown tables on stdout and
progress on stderr. Exit status 0 when every measurement is valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from batching import (
    DEFAULT_DELAY_US,
    DEFAULT_INFER_THREADS,
    ISSUE_SIZES,
    MAX_BATCH,
    MODEL,
    NOISE_LIMIT,
    Snapshot,
    Workload,
    check_prometheus,
    fmt,
    grpc_check,
    make_workload,
    mlp_onnx,
    model_config,
    server_command,
    snapshot,
    time_ort,
    write_repository,
)
from common import (
    BATCHGATE_READY,
    BenchError,
    Pinning,
    Server,
    busy_fraction,
    choose_pinning,
    core_jiffies,
    cpu_model,
    finite,
    foreign_cpu_seconds,
    h2load,
    say,
    tool_version,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HEADLINE = 64  # clients for the main comparison
VARIANTS = ("A", "B")
PATHS = ("direct", "passthrough", "decoded", "gateway")
GATEWAY_DELAY_US = 1000  # the remote backend's own default max_queue_delay_us
COLORS = {"direct": "#8a939c", "passthrough": "#d9822b", "decoded": "#e8c07a", "gateway": "#2f6fb3"}
# How much a path must beat another to be called a gain rather than noise on this shared machine.
GAIN = 1.05


def variant_name(v: str, delay_us: int) -> str:
    return f"A: upstream batches ({delay_us} us)" if v == "A" else "B: upstream does not batch"


# ============================================================================ processes


def gateway_command(
    py: str,
    upstream: str,
    mode: str,
    delay_us: int,
    inflight: int,
    policy: str,
    engine: str = "grpcio",
    client: str = "grpcio",
) -> list[str]:
    """A batchgate with no repository, serving the upstream's model as a remote model of the same name."""
    # "decoded": passthrough with raw forwarding off, the path every forwarded request took before it
    batching, forwarding = ("passthrough", "decoded") if mode == "decoded" else (mode, "raw")
    spec = f"name={MODEL} upstreams={upstream} upstream_model={MODEL} batching={batching} forwarding={forwarding}"
    if mode == "gateway":
        spec += f" max_queue_delay_us={delay_us}"
    if inflight:
        spec += f" max_inflight={inflight}"
    if client != "grpcio":
        spec += f" client={client}"
    return [
        py,
        "-m",
        "batchgate.cli",
        "serve",
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
        "--log-level",
        "info",
        "--batching-policy",
        policy,
        "--grpc-engine",
        engine,
        "--remote-model",
        spec,
    ]


def port(srv: Server, kind: str) -> int:
    return int(srv.match.group(kind))


@dataclass
class UpstreamCalls:
    """The gateway's own account of its calls to the upstream (Prometheus counters)."""

    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status name -> failed calls
    seconds: float = 0.0  # summed call time
    paths: dict[str, int] = field(default_factory=dict)  # requests by path: raw (forwarded as bytes) | decoded


def upstream_calls(metrics_port: int) -> UpstreamCalls:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out = UpstreamCalls()
    for line in text.splitlines():
        if line.startswith("batchgate_remote_requests_total") and f'model="{MODEL}"' in line:
            name, value = line.rsplit(" ", 1)
            path = re.search(r'path="([^"]+)"', name).group(1)
            out.paths[path] = out.paths.get(path, 0) + int(float(value))
            continue
        if not line.startswith("batchgate_upstream_") or f'model="{MODEL}"' not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("batchgate_upstream_requests_total"):
            out.calls += int(float(value))
        elif name.startswith("batchgate_upstream_errors_total"):
            code = re.search(r'code="([^"]+)"', name).group(1)
            out.errors[code] = out.errors.get(code, 0) + int(float(value))
        elif name.startswith("batchgate_upstream_request_duration_seconds_sum"):
            out.seconds += float(value)
    return out


# ============================================================================ runs


@dataclass
class Side:
    """One server's figures over one measured level (differences of its V2 statistics)."""

    ok: int = 0
    failed: int = 0
    executions: int = 0
    rows: int = 0
    batches: dict[int, int] = field(default_factory=dict)  # rows per execution -> executions
    mean_batch: float = float("nan")
    queue_ms: float = float("nan")  # mean wait in its scheduler
    cpu_us: float = float("nan")  # process CPU per request h2load saw succeed

    @classmethod
    def between(cls, s0: Snapshot, s1: Snapshot) -> Side:
        side = cls(s1.ok - s0.ok, s1.failed - s0.failed, s1.executions - s0.executions, s1.rows - s0.rows)
        side.batches = {r: c - s0.batches.get(r, 0) for r, c in sorted(s1.batches.items()) if c - s0.batches.get(r, 0)}
        side.mean_batch = side.rows / side.executions if side.executions else float("nan")
        dq = s1.queue_count - s0.queue_count
        side.queue_ms = (s1.queue_ns - s0.queue_ns) / dq / 1e6 if dq else float("nan")
        return side


@dataclass
class Run:
    """One load level on one (variant, path) pair of processes, in one round."""

    variant: str  # A | B
    path: str  # direct | passthrough | gateway
    clients: int
    round: int
    rps: float = 0.0  # successful requests per second, as h2load saw them
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, p999, mean, max
    elapsed_s: float = 0.0
    tool_ok: int = 0
    cut_off: int | None = None
    upstream: Side = field(default_factory=Side)
    gateway: Side | None = None  # None on the direct path
    upstream_calls: int = 0  # calls the gateway sent
    raw: int = 0  # requests the gateway forwarded as the caller's bytes (its fast path)
    decoded: int = 0  # requests it decoded (batched, or every instance busy)
    upstream_errors: dict[str, int] = field(default_factory=dict)
    upstream_call_ms: float = float("nan")  # mean time of one upstream call, as the gateway measured it
    load_cpu_us: float = float("nan")  # h2load's CPU per successful request
    core0_busy: float = float("nan")  # the upstream's core
    core1_busy: float = float("nan")  # the load tool's core (and the gateway's)
    other_cpu: float = float("nan")  # cores used meanwhile by processes that are not ours
    retried: bool = False
    error: str | None = None

    @property
    def entry(self) -> Side:
        """The server h2load talks to."""
        return self.gateway or self.upstream


def measure_config(
    variant: str, path: str, rnd: int, repo: Path, work: Workload, args, pin: Pinning, tmp: Path, retries: dict
) -> list[Run]:
    """Start the upstream (and the gateway), run every level on them, stop them."""
    runs = [Run(variant, path, n, rnd) for n in args.levels]
    label = f"round {rnd} {variant}/{path}"
    servers: list[Server] = []
    done = 0
    try:
        up = Server(
            f"{label} upstream",
            [*pin.server, *server_command(sys.executable, repo, "triton", DEFAULT_INFER_THREADS)],
            BATCHGATE_READY,
            tmp / f"{variant}-{path}-{rnd}-upstream.log",
        )
        servers.append(up)
        gw = None
        if path != "direct":
            # the gateway shares the load tool's core
            cmd = gateway_command(
                sys.executable,
                f"127.0.0.1:{port(up, 'grpc')}",
                path,
                args.gateway_delay_us,
                args.max_inflight,
                args.gateway_policy,
                args.gateway_grpc_engine,
                args.gateway_client,
            )
            gw = Server(
                f"{label} gateway",
                [*(pin.gateway or pin.load), *cmd],
                BATCHGATE_READY,
                tmp / f"{variant}-{path}-{rnd}-gw.log",
            )
            servers.append(gw)
        grpc_check(port(gw or up, "grpc"), work)
        for i in range(len(runs)):
            warm = args.warmup if i == 0 else min(args.warmup, 0.5)
            for attempt in range(2):
                measure_level(runs[i], up, gw, warm, work, args, pin, tmp)
                if runs[i].other_cpu <= NOISE_LIMIT or attempt == 1 or retries["left"] <= 0:
                    break
                retries["left"] -= 1
                say(f"  other processes took {runs[i].other_cpu:.0%} of a core: measuring this level once more")
                runs[i] = Run(variant, path, runs[i].clients, rnd, retried=True)
                warm = min(args.warmup, 0.5)
            done += 1
        for srv in servers:
            check_prometheus(port(srv, "metrics"), snapshot(port(srv, "http")))
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        logs = "".join(f"\n{s.name} log:\n{s.log_tail()}" for s in servers)
        # the level that failed and those after it; a failed final check taints them all
        for r in runs[done:] if done < len(runs) else runs:
            r.error = f"{e}{logs}"
        say(f"{label}: INVALID: {e}")
    finally:
        for srv in reversed(servers):
            srv.stop()
    return runs


def measure_level(
    run: Run, up: Server, gw: Server | None, warm: float, work: Workload, args, pin: Pinning, tmp: Path
) -> None:
    n = run.clients
    entry = gw or up
    procs = [up] if gw is None else [up, gw]

    def figures() -> tuple:
        return (
            snapshot(port(up, "http")),
            snapshot(port(gw, "http")) if gw else None,
            upstream_calls(port(gw, "metrics")) if gw else None,
        )

    if warm > 0:
        h2load(pin, port(entry, "grpc"), work.frame, n, 1, warm, None)
    time.sleep(0.3)  # let what the warm-up cut off finish on both servers
    f0 = figures()
    cpu0, cores0, others0 = [p.cpu_seconds() for p in procs], core_jiffies(pin.cores), foreign_cpu_seconds()
    res = h2load(
        pin,
        port(entry, "grpc"),
        work.frame,
        n,
        1,
        args.duration,
        tmp / f"{run.variant}-{run.path}-{run.round}-{n}.h2load",
    )
    cpu1, cores1, others1 = [p.cpu_seconds() for p in procs], core_jiffies(pin.cores), foreign_cpu_seconds()
    time.sleep(0.3)
    f1 = figures()

    secs = res["elapsed_s"] or float("nan")
    lat = res.get("latency_us") or {}
    run.elapsed_s, run.tool_ok, run.cut_off = res["elapsed_s"], res["ok"], res.get("cut_off")
    run.rps = res["ok"] / secs
    run.latency_ms = {q: us / 1e3 for q, us in lat.items()}
    per_req = 1e6 / run.tool_ok if run.tool_ok else float("nan")
    run.upstream = Side.between(f0[0], f1[0])
    run.upstream.cpu_us = (cpu1[0] - cpu0[0]) * per_req
    if gw is not None:
        run.gateway = Side.between(f0[1], f1[1])
        run.gateway.cpu_us = (cpu1[1] - cpu0[1]) * per_req
        c0, c1 = f0[2], f1[2]
        run.upstream_calls = c1.calls - c0.calls
        run.raw = c1.paths.get("raw", 0) - c0.paths.get("raw", 0)
        run.decoded = c1.paths.get("decoded", 0) - c0.paths.get("decoded", 0)
        run.upstream_errors = {k: v - c0.errors.get(k, 0) for k, v in c1.errors.items() if v - c0.errors.get(k, 0)}
        if run.upstream_calls:
            run.upstream_call_ms = (c1.seconds - c0.seconds) / run.upstream_calls * 1e3
    run.load_cpu_us = res["tool_cpu_s"] * per_req
    if pin.cores:
        run.core0_busy = busy_fraction(cores0, cores1, pin.cores[0])
        run.core1_busy = busy_fraction(cores0, cores1, pin.cores[1])
    run.other_cpu = sum(max(0.0, t - others0.get(pid, 0.0)) for pid, t in others1.items()) / secs

    problems = check_level(run, res)
    if problems:
        raise BenchError(f"{n} clients: " + "; ".join(problems) + f"\nload tool output:\n{res['raw'][-1500:]}")
    g, ms = run.gateway, run.latency_ms
    say(
        f"round {run.round} {run.variant}/{run.path}, {n} clients: {run.rps:,.0f} req/s, p50 {ms['p50']:.2f} ms, "
        f"p99 {ms['p99']:.2f} ms; rows per execution: gateway {fmt(g.mean_batch, '.1f') if g else '-'}, upstream "
        f"{run.upstream.mean_batch:.1f}; core 0 {fmt(run.core0_busy * 100, '.0f')}%, "
        f"core 1 {fmt(run.core1_busy * 100, '.0f')}%, "
        f"others {run.other_cpu:.0%} of a core"
    )
    if run.other_cpu > 0.05:
        say(f"  warning: other processes used {run.other_cpu:.0%} of a core during this run: noisier numbers")


def check_level(run: Run, res: dict) -> list[str]:
    """Everything the load tool cannot prove, checked against the servers' own counters. The only
    slack is the requests in flight when h2load stopped: each may have been answered (counted OK)
    or cancelled (counted failed), on either server, executed upstream or not."""
    slack = run.clients if run.cut_off is None else run.cut_off
    problems = []
    if res["errors"] or res["non_2xx"]:
        problems.append(f"the load tool saw {res['errors']} errors and {res['non_2xx']} non-2xx responses")
    if run.tool_ok == 0:
        problems.append("no successful request")
    sides = [("upstream", run.upstream)] + ([("gateway", run.gateway)] if run.gateway else [])
    for who, s in sides:
        if sum(s.batches.values()) != s.executions or sum(r * c for r, c in s.batches.items()) != s.rows:
            problems.append(f"{who}: batch_stats ({s.batches}) disagree with {s.executions} executions / {s.rows} rows")
    e = run.entry
    who = "the upstream" if run.gateway is None else "the gateway"
    if e.ok < run.tool_ok:
        problems.append(f"the tool reports {run.tool_ok} successes, {who} counted only {e.ok}")
    if (e.ok - run.tool_ok) + e.failed > slack:
        problems.append(
            f"{who} counted {e.ok} OK and {e.failed} failed for {run.tool_ok} reported; only {slack} "
            "requests were cut off at the end"
        )
    # single-row requests: rows executed = requests executed (a cut-off one that ran is counted failed)
    if not run.tool_ok <= e.rows <= e.ok + e.failed:
        problems.append(
            f"{who} executed {e.rows} rows for {run.tool_ok} successes reported and {e.ok + e.failed} requests answered"
        )
    u = run.upstream
    if run.gateway is not None:
        if not run.tool_ok <= u.rows <= run.tool_ok + slack:
            problems.append(
                f"the upstream executed {u.rows} rows for {run.tool_ok} successes reported ({slack} cut off)"
            )
        if abs(run.upstream_calls - (u.ok + u.failed)) > slack:
            problems.append(
                f"the gateway sent {run.upstream_calls} calls, the upstream answered {u.ok} OK and {u.failed} failed"
            )
        unexpected = {k: v for k, v in run.upstream_errors.items() if k != "CANCELLED"}
        if unexpected or run.upstream_errors.get("CANCELLED", 0) > slack:
            problems.append(f"the gateway's upstream calls failed: {run.upstream_errors}")
        if run.path in ("passthrough", "decoded") and set(run.gateway.batches) - {1}:
            problems.append(f"{run.path}, yet the gateway sent batches of {sorted(run.gateway.batches)} rows")
        if run.path == "decoded" and run.raw:
            problems.append(f"forwarding=decoded, yet the gateway forwarded {run.raw} requests raw")
        if run.path == "passthrough" and run.raw < run.tool_ok - slack:
            # every request goes raw unless all instances are busy (then it queues decoded)
            problems.append(
                f"passthrough forwarded {run.raw} requests raw and decoded {run.decoded}, for {run.tool_ok} successes"
            )
    if run.variant == "B" and not u.ok <= u.executions <= u.ok + u.failed:
        problems.append(
            f"the upstream does not batch, yet ran {u.executions} executions for {u.ok} OK and "
            f"{u.failed} failed requests"
        )
    return problems


# ============================================================================ summary


def figures(r: Run) -> dict[str, float]:
    """The figures of one run that are summarized as medians over rounds."""
    d = {k: getattr(r, k) for k in ("rps", "upstream_call_ms", "load_cpu_us", "core0_busy", "core1_busy", "other_cpu")}
    d.update({f"{q}_ms": v for q, v in r.latency_ms.items()})
    for who, s in (("up", r.upstream), ("gw", r.gateway)):
        if s is not None:
            d.update(
                {
                    f"{who}_exec_per_s": s.executions / (r.elapsed_s or float("nan")),
                    f"{who}_mean_batch": s.mean_batch,
                    f"{who}_queue_ms": s.queue_ms,
                    f"{who}_cpu_us": s.cpu_us,
                }
            )
    return d


def summarize(runs: list[Run]) -> dict:
    """variant -> path -> clients -> medians over the valid rounds (batch counts summed over them)."""
    out: dict = {}
    for key in sorted({(r.variant, r.path, r.clients) for r in runs}):
        rs = [r for r in runs if (r.variant, r.path, r.clients) == key]
        good = [figures(r) for r in rs if r.error is None]
        entry = {
            "valid": all(r.error is None for r in rs),
            "rounds": len(rs),
            "rps_min": min((r.rps for r in rs), default=0.0),
            "rps_max": max((r.rps for r in rs), default=0.0),
        }
        for k in sorted({k for d in good for k in d}):
            vals = [d[k] for d in good if k in d and d[k] == d[k]]
            entry[k] = float(statistics.median(vals)) if vals else float("nan")
        for who in ("upstream", "gateway"):
            total: dict[int, int] = {}
            for r in rs:
                s = getattr(r, who)
                if r.error is None and s is not None:
                    for b, c in s.batches.items():
                        total[b] = total.get(b, 0) + c
            entry[f"{who}_batches"] = dict(sorted(total.items()))
        out.setdefault(key[0], {}).setdefault(key[1], {})[key[2]] = entry
    return out


def ratios_of(summary: dict, runs: list[Run]) -> dict:
    """variant -> path -> clients -> the path against direct (and gateway against passthrough)."""
    by_round = {(r.variant, r.path, r.clients, r.round): r for r in runs if r.error is None}
    out: dict = {}
    for v, paths in summary.items():
        for path in ("passthrough", "decoded", "gateway"):
            for n, e in paths.get(path, {}).items():
                base = paths.get("direct", {}).get(n)
                if not (base and base["valid"] and e["valid"]):
                    continue
                rounds = sorted(
                    k for (vv, p, nn, k) in by_round if (vv, p, nn) == (v, path, n) and (v, "direct", n, k) in by_round
                )
                per_round = [by_round[v, path, n, k].rps / by_round[v, "direct", n, k].rps for k in rounds]
                x = {
                    "rps": e["rps"] / base["rps"],
                    "p50": e["p50_ms"] / base["p50_ms"],
                    "p99": e["p99_ms"] / base["p99_ms"],
                    "p50_added_ms": e["p50_ms"] - base["p50_ms"],
                    "rps_per_round": per_round,
                }
                pt = paths.get("passthrough", {}).get(n)
                if path == "gateway" and pt and pt["valid"]:
                    x["rps_vs_passthrough"] = e["rps"] / pt["rps"]
                    x["p99_vs_passthrough"] = e["p99_ms"] / pt["p99_ms"]
                dec = paths.get("decoded", {}).get(n)
                if path == "passthrough" and dec and dec["valid"]:
                    # raw forwarding against the decoded path it replaces, same run
                    x["rps_vs_decoded"] = e["rps"] / dec["rps"]
                    x["gw_cpu_vs_decoded"] = e["gw_cpu_us"] / dec["gw_cpu_us"]
                if path in ("passthrough", "decoded") and base.get("up_cpu_us"):
                    # the gateway's CPU per forwarded request against the upstream's per request served directly
                    x["gw_cpu_vs_upstream"] = e["gw_cpu_us"] / base["up_cpu_us"]
                out.setdefault(v, {}).setdefault(path, {})[n] = x
    return out


# ============================================================================ reporting


def value(key: str, spec: str = ".2f"):
    """A table cell: one summary figure ("-" where there is none, e.g. the gateway's on the direct path)."""
    return lambda e, x: fmt(e.get(key, float("nan")), spec)


def rps_ratio(e: dict, x: dict) -> str:
    per_round = ", ".join(f"{q:.2f}" for q in x.get("rps_per_round", []))
    return f"**{x['rps']:.2f}x** ({per_round})" if x else ""


HEADLINE_COLUMNS = [
    ("req/s", value("rps", ",.0f")),
    ("req/s range", lambda e, x: f"{e['rps_min']:,.0f} - {e['rps_max']:,.0f}"),
    ("p50 ms", value("p50_ms")),
    ("p99 ms", value("p99_ms")),
    ("req/s vs direct (rounds)", rps_ratio),
    ("p99 vs direct", lambda e, x: f"{x['p99']:.2f}x" if x else ""),
    ("gateway exec/s", value("gw_exec_per_s", ",.0f")),
    ("gateway rows/exec", value("gw_mean_batch", ".1f")),
    ("upstream exec/s", value("up_exec_per_s", ",.0f")),
    ("upstream rows/exec", value("up_mean_batch", ".1f")),
    ("upstream call ms", value("upstream_call_ms")),
    ("gateway CPU us/req", value("gw_cpu_us", ".0f")),
    ("upstream CPU us/req", value("up_cpu_us", ".0f")),
]
LOAD_COLUMNS = [
    ("req/s", value("rps", ",.0f")),
    ("p50 ms", value("p50_ms")),
    ("p99 ms", value("p99_ms")),
    ("req/s vs direct", lambda e, x: f"{x['rps']:.2f}x" if x else ""),
    ("p50 added ms", lambda e, x: f"{x['p50_added_ms']:+.2f}" if x else ""),
    ("gateway rows/exec", value("gw_mean_batch", ".1f")),
    ("upstream rows/exec", value("up_mean_batch", ".1f")),
    ("gateway queue ms", value("gw_queue_ms")),
    ("upstream queue ms", value("up_queue_ms")),
]


def table(keys: list[tuple], first: list[str], label, columns: list, summary: dict, ratios: dict) -> list[str]:
    """A markdown table with a row per (variant, path, clients) in ``keys``: ``label`` gives the
    first cells (titled ``first``), ``columns`` the figures (title, cell function, right-aligned)."""
    out = [
        "| " + " | ".join(first + [t for t, _ in columns]) + " |",
        "|" + "---|" * len(first) + "---:|" * len(columns),
    ]
    for v, path, n in keys:
        e = summary.get(v, {}).get(path, {}).get(n)
        if e is None:
            continue
        x = ratios.get(v, {}).get(path, {}).get(n, {})
        cells = [cell(e, x) for _, cell in columns] if e["valid"] else ["invalid"] + [""] * (len(columns) - 1)
        out.append("| " + " | ".join(label(v, path, n) + cells) + " |")
    return out


def markdown(summary: dict, ratios: dict, timing: dict, args, pin: Pinning) -> str:
    name = "MLP " + " -> ".join(str(s) for s in args.sizes)
    t1, t8, tmax = timing[1], timing[8], timing[MAX_BATCH]
    lines = [
        "### Set-up\n",
        (
            f"- model: {name}; ONNX Runtime alone, one thread, on the upstream's core: batch 1 {t1['ms'] * 1e3:.0f} "
            f"us, batch 8 {t8['ms'] * 1e3:.0f} us, batch {MAX_BATCH} {tmax['ms'] * 1e3:.0f} us "
            f"({tmax['us_per_row']:.1f} us/row)"
        ),
        (
            f"- upstream: batchgate, ONNX backend, max_batch_size {MAX_BATCH}, 1 instance; "
            f"{variant_name('A', args.upstream_delay_us)} (dynamic_batching, Triton policy); "
            f"{variant_name('B', args.upstream_delay_us)}"
        ),
        (
            f"- gateway: batchgate remote model, batching=passthrough or batching=gateway (max_queue_delay_us "
            f"{args.gateway_delay_us}, {args.gateway_policy} policy), max_inflight "
            f"{args.max_inflight or 'default (gateway 2, passthrough 256)'}"
        ),
        (
            f"- load: h2load -c N -m 1 (N single-row [1, {args.sizes[0]}] FP32 clients, closed loop); "
            f"{args.rounds} round(s) x {args.duration:g} s per level; medians over rounds"
        ),
        f"- pinning: {topology(pin)}\n",
        f"### At {HEADLINE} concurrent clients\n",
    ]
    keys = [(v, p, HEADLINE) for v in VARIANTS for p in PATHS]
    lines += table(
        keys,
        ["upstream", "path"],
        lambda v, p, n: [variant_name(v, args.upstream_delay_us), p],
        HEADLINE_COLUMNS,
        summary,
        ratios,
    )
    lines.append(
        "\n(vs direct: ratio of the medians, per-round ratios in brackets; exec/s and rows/exec from each "
        "server's own V2 statistics; CPU per request h2load saw succeed)\n"
    )
    lines.append("### By load\n")
    keys = [(v, p, n) for n in args.levels for v in VARIANTS for p in PATHS]
    lines += table(keys, ["clients", "upstream", "path"], lambda v, p, n: [str(n), v, p], LOAD_COLUMNS, summary, ratios)
    lines += ["", "### Findings\n", *findings(summary, ratios, args)]
    return "\n".join(lines)


def clients(n: int) -> str:
    return f"{n} client" + ("" if n == 1 else "s")


def findings(summary: dict, ratios: dict, args) -> list[str]:
    out = []
    for v in VARIANTS:
        r = ratios.get(v, {})
        vn = variant_name(v, args.upstream_delay_us)
        hop = r.get("passthrough", {})
        if hop:
            parts = ", ".join(
                f"{clients(n)} {x['rps']:.2f}x (p50 {x['p50_added_ms']:+.2f} ms, p99 {x['p99']:.2f}x)"
                for n, x in sorted(hop.items())
            )
            out.append(f"- {vn}: cost of the hop, passthrough / direct: {parts}")
            raw = [
                f"{clients(n)} req/s {x['rps_vs_decoded']:.2f}x, gateway CPU per request {x['gw_cpu_vs_decoded']:.2f}x"
                for n, x in sorted(hop.items())
                if "rps_vs_decoded" in x
            ]
            if raw:
                out.append(f"- {vn}: raw forwarding / decoded forwarding: {', '.join(raw)}")
            cpu = [
                f"{clients(n)} {x['gw_cpu_vs_upstream']:.2f}x"
                for n, x in sorted(hop.items())
                if "gw_cpu_vs_upstream" in x
            ]
            if cpu:
                out.append(
                    f"- {vn}: gateway CPU per forwarded request / upstream CPU per request served directly: "
                    + ", ".join(cpu)
                )
        gwr = r.get("gateway", {})
        if gwr:
            parts = ", ".join(
                f"{clients(n)} {x['rps']:.2f}x direct"
                + (f", {x['rps_vs_passthrough']:.2f}x passthrough" if "rps_vs_passthrough" in x else "")
                + f" (p50 {x['p50_added_ms']:+.2f} ms, p99 {x['p99']:.2f}x direct)"
                for n, x in sorted(gwr.items())
            )
            out.append(f"- {vn}: gateway batching: {parts}")
            helps = [n for n, x in sorted(gwr.items()) if x["rps"] >= GAIN and x.get("rps_vs_passthrough", 0.0) >= GAIN]
            hurts = [n for n, x in sorted(gwr.items()) if x["rps"] < 1 / GAIN]
            out.append(
                f"- {vn}: gateway batching beats both direct and passthrough by >= {GAIN - 1:.0%} at: "
                f"{', '.join(clients(n) for n in helps) or 'no level'}"
                + (f"; it loses to direct at: {', '.join(clients(n) for n in hurts)}" if hurts else "")
            )
        busy = [(p, e) for p in PATHS if (e := summary.get(v, {}).get(p, {}).get(HEADLINE)) and e["valid"]]
        if busy and any(e["core0_busy"] == e["core0_busy"] for _, e in busy):
            parts = "; ".join(
                f"{p}: upstream core {e['core0_busy']:.0%}, "
                f"{'h2load' if p == 'direct' else 'gateway/h2load'} core {e['core1_busy']:.0%}"
                for p, e in busy
            )
            out.append(f"- {vn}: how busy each core was at {clients(HEADLINE)} (one near 100% sets the limit): {parts}")
    return out


def topology(pin: Pinning) -> str:
    if not pin.cores:
        return f"unpinned ({pin.note})"
    c0, c1 = pin.cores
    if pin.gateway and pin.gateway != pin.load:  # (BATCHGATE_BENCH_CORES: a core of its own)
        return f"upstream on core {c0}; gateway on core(s) {pin.gateway[-1]}; h2load on core(s) {pin.load[-1]}"
    return f"upstream on core {c0}; gateway and h2load share core {c1} (direct path: h2load alone on core {c1})"


def plot(summary: dict, ratios: dict, args, path: Path, subtitle: str) -> None:
    """Top: throughput (labelled with the ratio to direct) and p50/p99 at the headline load, per
    upstream variant and path. Bottom: the same against the load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5))
    width = 0.2
    names = [variant_name(v, args.upstream_delay_us) for v in VARIANTS]

    def valid(v: str, p: str, n: int = HEADLINE) -> dict | None:
        e = summary.get(v, {}).get(p, {}).get(n)
        return e if e and e["valid"] else None

    top_rps, top_lat = axes[0]
    for i, v in enumerate(VARIANTS):
        for j, p in enumerate(PATHS):
            e = valid(v, p)
            if e is None:
                continue
            x = i + (j - 1.5) * width
            top_rps.bar(
                x,
                e["rps"],
                width * 0.92,
                color=COLORS[p],
                label=p if i == 0 else None,
                yerr=[[e["rps"] - e["rps_min"]], [e["rps_max"] - e["rps"]]],
                capsize=3,
            )
            ratio = ratios.get(v, {}).get(p, {}).get(HEADLINE)
            label = f"{e['rps']:,.0f}" + (f"\n{ratio['rps']:.2f}x direct" if ratio else "")
            top_rps.text(
                x,
                e["rps_max"] * 1.01,
                label,
                ha="center",
                va="bottom",
                fontsize=8,
                fontweight="bold" if ratio else None,
            )
            for k, (q, alpha) in enumerate((("p50_ms", 0.45), ("p99_ms", 1.0))):
                xq = x + (k - 0.5) * width / 2
                top_lat.bar(
                    xq, e[q], width / 2 * 0.92, color=COLORS[p], alpha=alpha, label=f"{p} {q[:3]}" if i == 0 else None
                )
                top_lat.text(xq, e[q], f"{e[q]:.1f}", ha="center", va="bottom", fontsize=7)
    top_rps.set_ylabel("successful requests / s")
    top_rps.set_title(f"throughput at {HEADLINE} clients (whiskers: min-max over rounds)", fontsize=10)
    top_lat.set_ylabel("latency, ms")
    top_lat.set_title(f"latency at {HEADLINE} clients (p50 light, p99 dark)", fontsize=10)
    for ax in (top_rps, top_lat):
        ax.set_xticks(range(len(VARIANTS)), names)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
        ax.legend(fontsize=7, ncol=3, loc="upper left")

    # against the load: lines coloured by path, solid for variant A, dashed for B
    by_load_rps, by_load_p99 = axes[1]
    dash = dict(zip(VARIANTS, ("-", "--")))
    for v in VARIANTS:
        for p in PATHS:
            rel = sorted((n, x["rps"]) for n, x in ratios.get(v, {}).get(p, {}).items())
            p99 = sorted((n, e["p99_ms"]) for n, e in summary.get(v, {}).get(p, {}).items() if e["valid"])
            for ax, pts in ((by_load_rps, rel), (by_load_p99, p99)):
                if pts:
                    ax.plot(*zip(*pts), "o" + dash[v], color=COLORS[p], ms=4, label=f"{p}, {v}")
    by_load_rps.axhline(1.0, color=COLORS["direct"], lw=1.2, label="direct")
    by_load_rps.set_ylabel("req/s / direct (same variant, same run)")
    by_load_rps.set_title(
        "throughput against direct by load (above 1: faster than calling the upstream directly)", fontsize=10
    )
    by_load_p99.set_yscale("log")
    by_load_p99.yaxis.set_major_formatter(ScalarFormatter())
    by_load_p99.set_ylabel("p99 latency, ms (log)")
    by_load_p99.set_title("p99 by load", fontsize=10)
    for ax in (by_load_rps, by_load_p99):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(args.levels), [str(n) for n in args.levels])
        ax.set_xlabel("concurrent single-row clients (closed loop); solid: A, dashed: B")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(
        "batchgate remote models: h2load -> upstream (direct) against h2load -> gateway -> upstream "
        f"(passthrough, gateway batching)\n{subtitle}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ main


def levels_arg(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of whole numbers: {text!r}") from None
    if HEADLINE not in levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(f"levels must be positive and include {HEADLINE}, not {text!r}")
    return levels


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="batchgate remote models: gateway -> upstream against the upstream direct")
    ap.add_argument("--quick", action="store_true", help="1 round, levels 1 and 64, short runs (~40 s)")
    ap.add_argument("--rounds", type=int, default=None, help="fresh processes per configuration (default 2)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of each measured level (default 3)")
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of load before a configuration's first level (default 1; 0.5 before the others)",
    )
    ap.add_argument(
        "--levels",
        type=levels_arg,
        default=None,
        help=f"concurrent clients, comma-separated (default 1,4,64; must include {HEADLINE})",
    )
    ap.add_argument(
        "--hidden",
        type=str,
        default=None,
        help="hidden layer widths of the MLP, comma-separated (default 1024,1024: the issue's example)",
    )
    ap.add_argument(
        "--upstream-delay-us",
        type=int,
        default=DEFAULT_DELAY_US,
        help=f"variant A's max_queue_delay_microseconds on the upstream (default {DEFAULT_DELAY_US})",
    )
    ap.add_argument(
        "--gateway-delay-us",
        type=int,
        default=GATEWAY_DELAY_US,
        help=f"the gateway's max_queue_delay_us in gateway mode (default {GATEWAY_DELAY_US})",
    )
    ap.add_argument(
        "--gateway-policy",
        choices=("triton", "work_conserving"),
        default="triton",
        help="the gateway's --batching-policy in gateway mode (default triton, batchgate's default)",
    )
    ap.add_argument(
        "--gateway-grpc-engine",
        choices=("grpcio", "h2"),
        default="h2",
        help="the gateway's gRPC server engine (--grpc-engine; default h2, batchgate's default)",
    )
    ap.add_argument(
        "--max-inflight", type=int, default=0, help="the remote model's max_inflight (default 0: the backend's default)"
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=None,
        help="levels that may be measured again because other processes were busy (default 6; quick 0)",
    )
    ap.add_argument(
        "--gateway-client",
        choices=("grpcio", "h2"),
        default="h2",
        help="the remote model's client for its upstream calls (client=; default h2, batchgate's default)",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin the processes to cores")
    ap.add_argument("--output", type=Path, default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument(
        "--variants", type=lambda v: tuple(v.split(",")), default=VARIANTS, help="upstream variants (default A,B)"
    )
    ap.add_argument(
        "--paths",
        type=lambda v: tuple(v.split(",")),
        default=PATHS,
        help="paths measured, direct always among them (default direct,passthrough,decoded,gateway)",
    )
    args = ap.parse_args(argv)
    if set(args.variants) - set(VARIANTS) or set(args.paths) - set(PATHS):
        ap.error(f"--variants are {','.join(VARIANTS)}; --paths are {','.join(PATHS)}")
    if "direct" not in args.paths:
        args.paths = ("direct", *args.paths)
    # what --quick and the default run use for every option left unset
    preset = (
        {"rounds": 1, "duration": 1.5, "warmup": 0.5, "levels": (1, HEADLINE), "retries": 0}
        if args.quick
        else {"rounds": 2, "duration": 3.0, "warmup": 1.0, "levels": (1, 4, HEADLINE), "retries": 6}
    )
    vars(args).update({k: v for k, v in preset.items() if vars(args)[k] is None})
    if args.rounds < 1 or args.duration <= 0:
        ap.error("--rounds and --duration must be positive")
    hidden = tuple(int(x) for x in args.hidden.split(",")) if args.hidden else ISSUE_SIZES[1:-1]
    args.sizes = (ISSUE_SIZES[0], *hidden, ISSUE_SIZES[-1])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("h2load") is None:
        say("h2load is missing; install it with `make bench-tools` (apt-get install nghttp2-client)")
        return 1
    pin = choose_pinning(not args.no_pin)
    retries = {"left": args.retries}
    t_start = time.monotonic()
    say(f"pinning: {topology(pin)}; {args.rounds} round(s); levels {args.levels}; {args.duration:g} s per level")

    model = mlp_onnx(args.sizes)
    timing = time_ort(model, args.sizes[0], pin.cores[0] if pin.cores else None, args.quick)
    say(
        f"MLP {' -> '.join(map(str, args.sizes))}: ONNX Runtime alone, batch 1 {timing[1]['ms'] * 1e3:.0f} us, "
        f"batch {MAX_BATCH} {timing[MAX_BATCH]['ms'] * 1e3:.0f} us"
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="batchgate-remote-") as d:
        tmp = Path(d)
        work = make_workload("main", model, args.sizes, tmp)
        repos = {
            v: write_repository(tmp / f"repo-{v}", model, model_config(args.sizes, v == "A", args.upstream_delay_us, 1))
            for v in args.variants
        }
        for rnd in range(1, args.rounds + 1):
            paths = tuple(p for p in PATHS if p in args.paths)
            order = paths if rnd % 2 else tuple(reversed(paths))
            for v in args.variants:
                for path in order:
                    runs.extend(measure_config(v, path, rnd, repos[v], work, args, pin, tmp, retries))

    summary = summarize(runs)
    ratios = ratios_of(summary, runs)
    print(markdown(summary, ratios, timing, args, pin))

    import grpc

    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["bench/remote.py", *(argv if argv is not None else sys.argv[1:])]),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "levels": list(args.levels),
        "headline_clients": HEADLINE,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "pinning": pin.note,
        "topology": topology(pin),
        "cores": (
            {"upstream": pin.server[-1], "gateway": (pin.gateway or pin.load)[-1], "h2load": pin.load[-1]}
            if pin.cores
            else None
        ),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "h2load": tool_version(["h2load", "--version"]),
        "load": "h2load -t 1 -c N -m 1 (N connections, one single-row request in flight each, closed loop)",
        "model": {"sizes": list(args.sizes), "ort_by_batch": {str(b): t for b, t in timing.items()}},
        "upstream": {
            "max_batch_size": MAX_BATCH,
            "instances": 1,
            "infer_threads": DEFAULT_INFER_THREADS,
            "ort_threads": "intra 1, inter 1",
            "variants": {v: variant_name(v, args.upstream_delay_us) for v in VARIANTS},
            "A_max_queue_delay_us": args.upstream_delay_us,
        },
        "gateway": {
            "model": MODEL,
            "upstream_model": MODEL,
            "max_queue_delay_us": args.gateway_delay_us,
            "batching_policy": args.gateway_policy,
            "gateway_grpc_engine": args.gateway_grpc_engine,
            "gateway_client": args.gateway_client,
            "max_inflight": args.max_inflight or "backend default (gateway 2, passthrough 256)",
        },
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta,
        "ratios": {v: {p: {str(n): x for n, x in ns.items()} for p, ns in ps.items()} for v, ps in ratios.items()},
        "summary": {v: {p: {str(n): e for n, e in ns.items()} for p, ns in ps.items()} for v, ps in summary.items()},
        "runs": [asdict(r) for r in runs],
    }
    (args.output / "remote.json").write_text(json.dumps(finite(doc), indent=2) + "\n")
    subtitle = (
        f"MLP {' -> '.join(map(str, args.sizes))} (batch 1: {timing[1]['ms'] * 1e3:.0f} us in ORT), "
        f"max_batch_size {MAX_BATCH}; gateway: max_queue_delay {args.gateway_delay_us} us, "
        f"{args.gateway_policy} policy, {args.gateway_grpc_engine} gRPC engine, "
        f"{args.gateway_client} client; {meta['cpu_model']}, "
        f"medians of {args.rounds} round(s) x {args.duration:g} s\n{topology(pin)}"
    )
    try:
        plot(summary, ratios, args, args.output / "remote.png", subtitle)
    except Exception as e:  # noqa: BLE001 - the JSON and the tables are the result; a plot is a nicety
        say(f"could not draw the plot: {e}")
    say(f"wrote {args.output / 'remote.json'} and {args.output / 'remote.png'} in {meta['wall_s']:g} s")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
