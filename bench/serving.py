"""Serving overhead benchmark: batchgate against the least a Python server can do.

Single-row requests ([1, 4] FP32) to a tiny identity model, one server process pinned
to one core, the load tool pinned to another core, everything in one run:

- gRPC: batchgate vs a bare ``grpc.aio`` echo of ``ModelInfer`` (bench/echo_servers.py),
  both driven by ``h2load`` sending pre-framed gRPC messages.        target ratio >= 0.7
- HTTP/JSON: batchgate vs a bare uvicorn+httptools ASGI echo, both driven by ``wrk``
  POSTing the V2 JSON infer body (bench/wrk_post.lua).               target ratio >= 0.4

The ratio is batchgate's median successful requests/s over the baseline's, measured with
the same load settings in the same run: each round starts every server afresh and runs the
baseline and batchgate back to back, and the medians over the rounds are compared.
p50/p99 latency are reported beside throughput (medians over the rounds).

A run is only trusted if every request succeeded: h2load counts HTTP 200 even when the
gRPC status in the trailers is an error, so each run first sends the exact benchmark
request through a real gRPC client and checks the answer, then checks that the server's
own success counter (V2 statistics) moved by at least the successes the load tool reports,
with no slack but the requests cut off when the tool stopped. wrk's non-2xx and socket
errors fail the run as well. The CPU used meanwhile by processes that are not ours is
recorded and warned about: on a shared machine it makes the numbers noisier.

    python bench/serving.py                  # ~2.5 minutes: 3 rounds of 8 s runs
    python bench/serving.py --quick          # ~25 s smoke run: 1 round of 3 s runs
    python bench/serving.py --duration 20 --rounds 5

Writes bench/results/serving.json and bench/results/serving.png and prints a markdown table.
Process, load-tool and CPU-accounting helpers live in bench/common.py (shared with batching.py).
Exit status: 0 when the measurements are valid (whatever the ratios), 1 when a run was
invalid (errors, mismatched counts, a server that would not start); with --check also 1
when a target is missed.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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
    grpc_frame,
    grpc_infer_raw,
    h2load,
    http_call,
    say,
    tool_version,
    wrk,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "tiny"
INPUT_ROW = [0.25, -1.5, 3.0, 42.0]
TARGETS = {"grpc": 0.7, "http": 0.4}
# batchgate's settings for this run. Four worker threads is batchgate's own default
# (infer_threads 0 = max(4, CPUs)); four model instances let four executions be in flight.
# Before inline execution existed (every run handed to a worker thread and back), the
# alternatives measured on this 2-core machine (2026-11) were: 4 threads / 1 instance:
# gRPC 0.58, HTTP 0.17; 4/4: 0.65, 0.26; 8/8: 0.62, 0.31. Since the tiny model now runs on
# the event loop once timed (inline_execution_max_us, default 50), these matter little.
# Compare with --infer-threads and --instances.
DEFAULT_INFER_THREADS = 4
DEFAULT_INSTANCES = 4
ECHO_READY = re.compile(r"listening on (?P<host>\S+?):(?P<port>\d+)")

# ============================================================================ set-up


def build_repository(root: Path, instances: int) -> Path:
    """A Triton-layout repository with one model: FP32 [-1, 4] -> identity."""
    from onnx import TensorProto

    from batchgate.demo import _save, identity_model

    repo = root / "models"
    config = (
        f'name: "{MODEL}"\n'
        'platform: "onnxruntime_onnx"\n'
        "max_batch_size: 8\n"
        'input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        # One ONNX Runtime thread per run, said explicitly: the server has one core. (Left to
        # its default, ONNX Runtime measured the same here: it sizes its pool to the affinity.)
        'parameters { key: "intra_op_thread_count" value { string_value: "1" } }\n'
        'parameters { key: "inter_op_thread_count" value { string_value: "1" } }\n'
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
    )
    _save(identity_model(MODEL, TensorProto.FLOAT, ("batch", 4)), str(repo), MODEL, config=config)
    return repo


def grpc_request_bytes() -> bytes:
    """One serialized ModelInferRequest, shaped as tritonclient.grpc sends it."""
    from tritonclient.grpc import service_pb2 as pb

    msg = pb.ModelInferRequest(model_name=MODEL)
    t = msg.inputs.add(name="INPUT", datatype="FP32")
    t.shape.extend([1, 4])
    msg.raw_input_contents.append(np.asarray([INPUT_ROW], dtype="<f4").tobytes())
    return msg.SerializeToString()


def http_request_body() -> bytes:
    import orjson

    return orjson.dumps({"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": INPUT_ROW}]})


# ============================================================================ correctness checks


def grpc_check_once(port: int, payload: bytes) -> None:
    """Send the exact bytes h2load will send through a real gRPC client; the answer must be
    an OK status carrying the input row back."""
    resp = grpc_infer_raw(port, payload)
    if len(resp.outputs) != 1 or list(resp.outputs[0].shape) != [1, 4] or len(resp.raw_output_contents) != 1:
        raise BenchError(f"unexpected gRPC answer to the benchmark request: {resp}")
    got = np.frombuffer(resp.raw_output_contents[0], dtype="<f4")
    if not np.allclose(got, INPUT_ROW):
        raise BenchError(f"gRPC answer carries {got.tolist()}, expected {INPUT_ROW}")


def grpc_counts(port: int) -> tuple[int, int]:
    """(successful, failed) inference requests, from the server's ModelStatistics."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=10)
    ok = sum(s.inference_stats.success.count for s in resp.model_stats)
    bad = sum(s.inference_stats.fail.count for s in resp.model_stats)
    return ok, bad


def http_check_once(port: int, body: bytes) -> None:
    import orjson

    status, data = http_call(port, "POST", f"/v2/models/{MODEL}/infer", body)
    if status != 200:
        raise BenchError(f"the benchmark request fails over HTTP: {status} {data[:300]!r}")
    out = orjson.loads(data)["outputs"]
    if len(out) != 1 or out[0]["shape"] != [1, 4] or not np.allclose(out[0]["data"], INPUT_ROW):
        raise BenchError(f"unexpected HTTP answer to the benchmark request: {data[:300]!r}")


def http_counts(port: int) -> tuple[int, int]:
    import orjson

    status, data = http_call(port, "GET", f"/v2/models/{MODEL}/stats")
    if status != 200:
        raise BenchError(f"statistics request failed: {status} {data[:300]!r}")
    stats = orjson.loads(data)["model_stats"]
    ok = sum(s["inference_stats"]["success"]["count"] for s in stats)
    bad = sum(s["inference_stats"]["fail"]["count"] for s in stats)
    return ok, bad


# ============================================================================ one run


@dataclass
class Run:
    """One measured run of one load tool against one freshly started server."""

    round: int
    rps: float = 0.0  # successful requests per second
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    mean_ms: float = 0.0
    elapsed_s: float = 0.0
    tool_ok: int = 0  # successes the load tool reports
    cut_off: int | None = None  # requests in flight when the tool stopped (h2load only)
    server_ok: int = 0  # successes the server itself counted over the same run
    server_failed: int = 0
    server_core_busy: float = 0.0  # the server's core, softirq included (fraction)
    server_process_cpu: float = 0.0  # the server process, all threads (cores)
    load_core_busy: float = 0.0
    load_tool_cpu: float = 0.0
    other_cpu: float = 0.0  # CPU used meanwhile by processes that are not ours (cores)
    error: str | None = None


@dataclass
class Target:
    """One server under one protocol, measured once per round."""

    protocol: str  # grpc | http
    server: str
    baseline: bool
    runs: list[Run] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return next((r.error for r in self.runs if r.error), None if self.runs else "not measured")

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs)) if self.runs else 0.0


def measure(
    target: Target,
    rnd: int,
    args,
    pin: Pinning,
    tmp: Path,
    server_cmd: list[str],
    ready: re.Pattern,
    port_group: str,
    files: dict,
) -> Run:
    run = Run(rnd)
    target.runs.append(run)
    label = f"round {rnd} {target.protocol} / {target.server}"
    say(f"{label}: starting the server")
    slug = f"{target.protocol}-{'baseline' if target.baseline else 'batchgate'}-{rnd}"
    try:
        srv = Server(target.server, [*pin.server, *server_cmd], ready, tmp / f"{slug}.log")
    except BenchError as e:
        run.error = str(e)
        say(f"{label}: INVALID: {e}")
        return run
    try:
        port = int(srv.match.group(port_group))
        # Each phase checks one request and reads the server's statistics on its own protocol.
        if target.protocol == "grpc":
            grpc_check_once(port, files["grpc_payload"])
            counts = grpc_counts

            def load(secs: float, log: Path | None) -> dict:
                return h2load(pin, port, files["grpc_frame"], args.grpc_clients, args.grpc_streams, secs, log)

            max_cut = args.grpc_clients * args.grpc_streams
        else:
            http_check_once(port, files["http_body"])
            counts = http_counts

            def load(secs: float, log: Path | None) -> dict:
                return wrk(pin, port, f"/v2/models/{MODEL}/infer", files["http_file"], args.http_connections, secs)

            max_cut = args.http_connections
        say(f"{label}: one request checked; warming up for {args.warmup:g} s, then measuring for {args.duration:g} s")
        if args.warmup > 0:
            load(args.warmup, None)
        time.sleep(0.3)  # let the requests the warm-up cut off finish on the server
        ok0, bad0 = counts(port)
        cpu0, cores0, others0 = srv.cpu_seconds(), core_jiffies(pin.cores), foreign_cpu_seconds()
        res = load(args.duration, tmp / f"{slug}-h2load.log")
        cpu1, cores1, others1 = srv.cpu_seconds(), core_jiffies(pin.cores), foreign_cpu_seconds()
        time.sleep(0.3)
        ok1, bad1 = counts(port)

        secs = res["elapsed_s"] or float("nan")
        lat = res.get("latency_us") or {}
        run.elapsed_s = res["elapsed_s"]
        run.tool_ok = res["ok"]
        run.cut_off = res.get("cut_off")
        run.server_ok, run.server_failed = ok1 - ok0, bad1 - bad0
        run.rps = res["ok"] / secs
        for q in ("p50", "p90", "p99", "p999", "mean"):
            setattr(run, f"{q}_ms", lat.get(q, float("nan")) / 1e3)
        run.server_process_cpu = (cpu1 - cpu0) / secs
        run.load_tool_cpu = res["tool_cpu_s"] / secs
        if pin.cores:
            run.server_core_busy = busy_fraction(cores0, cores1, pin.cores[0])
            run.load_core_busy = busy_fraction(cores0, cores1, pin.cores[1])
        run.other_cpu = sum(max(0.0, t - others0.get(pid, 0.0)) for pid, t in others1.items()) / secs

        # Trust nothing the load tool cannot prove. A gRPC error still arrives as HTTP 200
        # (the status is in the trailers), so h2load would count it a success: the server's
        # own success counter must have moved by at least what the tool reports. The only
        # slack allowed is the requests in flight when the tool stopped: the server may
        # still answer them (counted OK) or see them cancelled (counted failed).
        slack = max_cut if run.cut_off is None else run.cut_off
        problems = []
        if res["errors"] or res["non_2xx"]:
            problems.append(f"the load tool saw {res['errors']} errors and {res['non_2xx']} non-2xx responses")
        if run.server_ok < run.tool_ok:
            problems.append(
                f"the load tool reports {run.tool_ok} successes but the server counted only "
                f"{run.server_ok}: some answers were errors"
            )
        if (run.server_ok - run.tool_ok) + run.server_failed > slack:
            problems.append(
                f"the server counted {run.server_ok} OK and {run.server_failed} failed for "
                f"{run.tool_ok} successes reported; only {slack} requests were cut off at the end"
            )
        if run.tool_ok == 0:
            problems.append("no successful request")
        if problems:
            raise BenchError(
                "; ".join(problems) + f"\nload tool output:\n{res['raw'][-2000:]}\nserver log:\n{srv.log_tail()}"
            )
        say(
            f"{label}: {run.rps:,.0f} req/s, p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms; "
            f"server core {run.server_core_busy:.0%} busy (process {run.server_process_cpu:.0%}), "
            f"load core {run.load_core_busy:.0%}; other processes {run.other_cpu:.0%} of a core; "
            f"server counted {run.server_ok} OK + {run.server_failed} failed for {run.tool_ok} reported"
        )
        if run.other_cpu > 0.05:
            say(
                f"{label}: warning: other processes used {run.other_cpu:.0%} of a core during this run; "
                "the numbers are noisier than usual"
            )
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        run.error = str(e)
        say(f"{label}: INVALID: {e}")
    finally:
        srv.stop()
    return run


# ============================================================================ reporting


def verdicts_of(targets: list[Target]) -> dict:
    out = {}
    for proto, goal in TARGETS.items():
        base = next((t for t in targets if t.protocol == proto and t.baseline), None)
        bg = next((t for t in targets if t.protocol == proto and not t.baseline), None)
        if base is None or bg is None:
            continue
        valid = base.error is None and bg.error is None and base.median("rps") > 0
        ratio = bg.median("rps") / base.median("rps") if valid else None
        per_round = [b.rps / a.rps for a, b in zip(base.runs, bg.runs) if a.rps and not (a.error or b.error)]
        out[proto] = {
            "ratio": ratio,
            "target": goal,
            "ratio_per_round": per_round,
            "result": "INVALID" if ratio is None else ("PASS" if ratio >= goal else "FAIL"),
        }
    return out


def markdown(targets: list[Target], verdicts: dict) -> str:
    rows = [
        "| protocol | server | req/s (median) | req/s range | p50 ms | p99 ms | server core busy "
        "| ratio | target | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in targets:
        v = verdicts.get(t.protocol, {})
        if t.error:
            rows.append(f"| {t.protocol} | {t.server} | invalid | | | | | | | INVALID |")
            continue
        rps = [r.rps for r in t.runs]
        if t.baseline:
            last = "| | | |"
        elif v.get("ratio") is not None:
            last = f"| **{v['ratio']:.2f}** | >= {v['target']:.1f} | **{v['result']}** |"
        else:
            last = f"| | >= {v.get('target', 0):.1f} | INVALID |"
        rows.append(
            f"| {t.protocol} | {t.server} | {t.median('rps'):,.0f} | {min(rps):,.0f} - {max(rps):,.0f} | "
            f"{t.median('p50_ms'):.2f} | {t.median('p99_ms'):.2f} | {t.median('server_core_busy'):.0%} {last}"
        )
    return "\n".join(rows)


def plot(targets: list[Target], verdicts: dict, path: Path, subtitle: str) -> None:
    """One throughput panel per protocol (each on its own scale), then latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [t for t in targets if not t.error]
    protos = [p for p in ("grpc", "http") if any(t.protocol == p for t in ok)]
    if not protos:
        return
    names = {"grpc": "gRPC (h2load)", "http": "HTTP/JSON (wrk)"}
    colors = {True: "#9aa5b1", False: "#2f6fb3"}
    fig, axes = plt.subplots(
        1,
        len(protos) + 1,
        figsize=(4.2 * (len(protos) + 1), 4.6),
        gridspec_kw={"width_ratios": [1] * len(protos) + [1.5]},
    )
    ax_l = axes[-1]
    for i, proto in enumerate(protos):
        ax = axes[i]
        pair = [t for t in ok if t.protocol == proto]
        pair.sort(key=lambda t: not t.baseline)
        for j, t in enumerate(pair):
            rps = [r.rps for r in t.runs]
            med = t.median("rps")
            ax.bar(j, med, 0.6, color=colors[t.baseline], yerr=[[med - min(rps)], [max(rps) - med]], capsize=5)
            ax.text(j, max(rps) * 1.02, f"{med:,.0f}", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(pair)), [t.server for t in pair])
        ax.set_ylim(0, max(max(r.rps for r in t.runs) for t in pair) * 1.3)
        ax.set_ylabel("successful requests / s")
        v = verdicts.get(proto)
        title = names[proto]
        if v and v["ratio"] is not None:
            title += f"\nratio {v['ratio']:.2f} (target >= {v['target']:.1f}): {v['result']}"
        ax.set_title(
            title, fontsize=10, color="#1b7f3b" if v and v["result"] == "PASS" else "#b3261e" if v else "black"
        )
        # latency: p50 and p99 of each server, grouped by protocol
        for j, t in enumerate(pair):
            x = i + (j - 0.5) * 0.4
            who = "echo" if t.baseline else "batchgate"
            for k, (q, alpha) in enumerate((("p50_ms", 0.5), ("p99_ms", 1.0))):
                ax_l.bar(
                    x + (k - 0.5) * 0.2,
                    t.median(q),
                    0.2,
                    color=colors[t.baseline],
                    alpha=alpha,
                    label=f"{who} {q[:3]}" if i == 0 else None,
                )
    ax_l.set_xticks(range(len(protos)), [names[p] for p in protos])
    ax_l.set_ylabel("latency, ms (median over rounds)")
    ax_l.set_title("latency at the same load\n(p50 light, p99 dark)", fontsize=10)
    ax_l.legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"batchgate vs bare echo servers, single-row [1, 4] FP32 requests (bars: median, whiskers: "
        f"min-max over rounds)\n{subtitle}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="batchgate serving overhead vs bare gRPC and ASGI echo servers")
    ap.add_argument("--duration", type=float, default=None, help="seconds of each measured run (default 8)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of load before each measured run (default 1.5)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of (baseline, batchgate) runs, interleaved; medians are reported (default 3)",
    )
    ap.add_argument("--quick", action="store_true", help="one round of 3 s runs: a smoke test (~25 s)")
    ap.add_argument("--only", choices=("grpc", "http"), help="measure one protocol only")
    ap.add_argument("--grpc-clients", type=int, default=4, help="h2load connections (default 4)")
    ap.add_argument("--grpc-streams", type=int, default=8, help="h2load concurrent streams per connection (default 8)")
    ap.add_argument("--http-connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument(
        "--infer-threads",
        type=int,
        default=DEFAULT_INFER_THREADS,
        help=f"batchgate --infer-threads (default {DEFAULT_INFER_THREADS})",
    )
    ap.add_argument(
        "--instances",
        type=int,
        default=DEFAULT_INSTANCES,
        help=f"instance_group count of the model: runs allowed at once (default {DEFAULT_INSTANCES})",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin servers and load tools to cores")
    ap.add_argument("--output", type=Path, default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.quick:
        defaults = {"duration": 3.0, "warmup": 1.0, "rounds": 1}
    else:
        defaults = {"duration": 8.0, "warmup": 1.5, "rounds": 3}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.rounds < 1 or args.duration <= 0:
        ap.error("--rounds and --duration must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("h2load", "wrk") if shutil.which(t) is None]
    if missing:
        say(
            f"missing load tools: {', '.join(missing)}; install them with `make bench-tools` "
            "(apt-get install nghttp2-client wrk)"
        )
        return 1
    pin = choose_pinning(not args.no_pin)
    say(f"pinning: {pin.note}; {args.rounds} round(s) of {args.duration:g} s runs after {args.warmup:g} s warm-ups")
    protocols = [args.only] if args.only else ["grpc", "http"]
    py = sys.executable
    t_start = time.monotonic()
    echo = str(HERE / "echo_servers.py")
    targets = {
        ("grpc", True): Target("grpc", "grpc.aio echo", True),
        ("grpc", False): Target("grpc", "batchgate", False),
        ("http", True): Target("http", "ASGI echo", True),
        ("http", False): Target("http", "batchgate", False),
    }
    with tempfile.TemporaryDirectory(prefix="batchgate-bench-") as d:
        tmp = Path(d)
        repo = build_repository(tmp, args.instances)
        payload = grpc_request_bytes()
        files = {
            "grpc_payload": payload,
            "grpc_frame": tmp / "request.grpc",
            "http_body": http_request_body(),
            "http_file": tmp / "request.json",
        }
        files["grpc_frame"].write_bytes(grpc_frame(payload))
        files["http_file"].write_bytes(files["http_body"])
        batchgate_cmd = [
            py,
            "-m",
            "batchgate.cli",
            "serve",
            "--model-repository",
            str(repo),
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
            "--admin-port",
            "-1",
            "--admin-http-port",
            "-1",
            "--infer-threads",
            str(args.infer_threads),
            "--log-level",
            "info",
        ]
        for rnd in range(1, args.rounds + 1):
            for proto in protocols:
                # baseline and batchgate back to back, so slow drifts of the machine hit both
                measure(targets[proto, True], rnd, args, pin, tmp, [py, echo, proto], ECHO_READY, "port", files)
                measure(targets[proto, False], rnd, args, pin, tmp, batchgate_cmd, BATCHGATE_READY, proto, files)
    chosen = [t for t in targets.values() if t.protocol in protocols]
    verdicts = verdicts_of(chosen)
    print(markdown(chosen, verdicts))
    print()
    for proto, v in verdicts.items():
        if v["ratio"] is not None:
            rounds = ", ".join(f"{r:.2f}" for r in v["ratio_per_round"])
            print(
                f"- {proto}: batchgate reaches {v['ratio']:.2f} of the bare echo's throughput "
                f"(target >= {v['target']:.1f}): {v['result']}; per round: {rounds}"
            )
        else:
            print(f"- {proto}: INVALID measurement, see the log above")

    import grpc
    import uvicorn

    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["bench/serving.py", *(argv if argv is not None else sys.argv[1:])]),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "pinning": pin.note,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "uvicorn": uvicorn.__version__,
        "h2load": tool_version(["h2load", "--version"]),
        "wrk": tool_version(["wrk", "-v"]),
        "model": f"{MODEL}: ONNX Identity, FP32 [-1, 4], max_batch_size 8, {args.instances} instance(s), "
        "one ORT intra-op thread; requests of shape [1, 4]",
        "batchgate": {"infer_threads": args.infer_threads, "instances": args.instances},
        "load": {
            "grpc": {
                "tool": "h2load",
                "threads": 1,
                "clients": args.grpc_clients,
                "streams_per_client": args.grpc_streams,
            },
            "http": {"tool": "wrk", "threads": 1, "connections": args.http_connections},
        },
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta,
        "targets": TARGETS,
        "verdicts": verdicts,
        "results": [
            {
                "protocol": t.protocol,
                "server": t.server,
                "baseline": t.baseline,
                "median": {
                    k: t.median(k) for k in ("rps", "p50_ms", "p99_ms", "p999_ms", "server_core_busy", "load_core_busy")
                }
                if not t.error
                else None,
                "error": t.error,
                "runs": [asdict(r) for r in t.runs],
            }
            for t in chosen
        ],
    }
    (args.output / "serving.json").write_text(json.dumps(finite(doc), indent=2) + "\n")
    subtitle = (
        f"{meta['cpu_model']}; {pin.note}; gRPC: h2load -c{args.grpc_clients} -m{args.grpc_streams}; "
        f"HTTP: wrk -c{args.http_connections}; {args.rounds} x {args.duration:g} s; "
        f"batchgate --infer-threads {args.infer_threads}, {args.instances} instance(s)"
    )
    try:
        plot(chosen, verdicts, args.output / "serving.png", subtitle)
    except Exception as e:  # a plot is a nicety; the JSON and the table are the result
        say(f"could not draw the plot: {e}")
    say(f"wrote {args.output / 'serving.json'} and {args.output / 'serving.png'} in {meta['wall_s']:g} s")
    if any(t.error for t in chosen):
        return 1
    if args.check and any(v["result"] != "PASS" for v in verdicts.values()):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
