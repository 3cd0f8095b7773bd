"""Dynamic batching benchmark: what the batcher buys on a CPU model, and what each policy costs.

One server process pinned to one core, the load tool (h2load, gRPC) pinned to another, single-row
requests ([1, 256] FP32) to an MLP built here, all in one run:

1. The model, timed in ONNX Runtime directly (one intra-op thread, on the server's core): its
   batch-1 execution must take >= 0.1 ms, or the comparison is not the one asked for.
2. The same server and model three ways: batching off (no ``dynamic_batching`` block), batching
   on with the Triton policy, batching on with the work-conserving policy. Each is driven at
   1, 2, 4 (low load) and 64, 128, 256 (high load) concurrent clients. A client is one h2load
   connection with one request in flight (``-c N -m 1``): N independent single-row callers, closed
   loop. Targets at 64 clients: throughput with batching >= 2.5x batching off, and a lower p99.
3. Two references at 64 clients, to tell a missed target from a weak batcher: the same server
   answering the same request bytes from a model that costs next to nothing (a Slice with the
   MLP's input and output shapes, no batcher), and the bare grpc.aio echo of bench/serving.py
   (no gateway, no model: the least a Python gRPC server does per request). Batching removes
   model work, never the per-request transport, so echo / batching-off bounds the ratio any
   policy can show in this set-up. (The near-zero model is not a strict bound: answers that
   complete together in a batch cost the event loop a little less each than answers one by one.)

Extras in the default run (skipped with --quick or --no-extras), one round each, 64 clients:
the same three configurations over HTTP/JSON (wrk, 64 connections), whose per-request cost is a
fraction of gRPC's, and a sweep over cheaper MLPs (the issue's own example 256 -> 1024 -> 1024 ->
16 among them) over gRPC: how the speed-up batching buys depends on what one execution costs
against what one request costs the transport, with the echo's bound beside each.

Every configuration gets a freshly started server per round; its load levels run one after the
other on that server, and the figures of each level are differences of the server's own
statistics taken before and after it (successes, failures, executions, rows, executions per
batch size). A run is trusted only if the load tool saw no error, the server counted at least the
successes the tool reports (h2load counts a gRPC error as HTTP 200), the rows executed lie between
the tool's successes and the requests the server answered, and, at the end of each server's life,
the Prometheus ``batchgate_batch_size`` histogram agrees with the V2 ``batch_stats``.

Latency vs offered load uses the number of concurrent clients as the load axis (closed loop):
h2load's ``--rate`` paces new connections, not requests, so an open-loop request rate is not
available from it.

    python bench/batching.py              # ~4.5 minutes: 2 rounds x 6 levels x 3 configurations + extras
    python bench/batching.py --quick      # ~35 s: 1 round, levels 1, 64, 256, short runs, no extras
    python bench/batching.py --hidden 1536,1536   # a lighter main MLP (batch 1 ~0.12 ms here)
    python bench/batching.py --rounds 3 --duration 6

Writes bench/results/batching.json and bench/results/batching.png; prints markdown tables on
stdout and progress on stderr. Exit status: 0 when every measurement is valid (whatever the
verdicts), 1 when one is not; with --check also 1 when a target is missed.
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
from functools import partial
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
MODEL = "mlp"

# The MLP the issue names as its example measures about 60 us at batch 1 on this machine's
# cores (AMD EPYC, one ONNX Runtime thread): under the 0.1 ms the comparison asks for. On one
# core the gRPC path itself costs ~0.17 ms per request (the bare grpc.aio echo), so batching
# can at best remove the model's share of (model + transport): with 1536-wide layers (0.11 ms)
# even the echo serves under 2.5x what batching off does. The main model has three 2048-wide
# hidden layers (batch 1 ~0.7 ms, same input and output); the cheaper ones run as a sweep.
MAIN_SIZES = (256, 2048, 2048, 2048, 16)
ISSUE_SIZES = (256, 1024, 1024, 16)
SWEEP = {"issue": ISSUE_SIZES, "w1536": (256, 1536, 1536, 16), "w2048x2": (256, 2048, 2048, 16)}
MAX_BATCH = 64
# Rows reach the batcher about every 0.25 ms at 64 clients (that is what the gRPC path costs per
# request on one core), so 2 ms gathers batches of ~8-16 rows under the Triton policy. Measured
# on this machine with the main model at 64 clients: 1000 us gave ~3.5k req/s (mean batch 8),
# 2000 us ~3.9k (mean batch 15); higher delays add little throughput and only add latency at
# low load, where every lone request waits out the whole delay.
DEFAULT_DELAY_US = 2000
# One model instance: the server has one core, so a second concurrent execution only time-slices
# with the first and halves the batches (measured: 2 instances, Triton policy: same req/s, mean
# batch 13 instead of 15; work-conserving: 2.1k vs 2.35k req/s). Batching off with 4 instances
# was no faster than with 1 either. Four worker threads (batchgate's own default on 2 CPUs);
# with one instance only one of them runs a model at a time.
DEFAULT_INSTANCES = 1
DEFAULT_INFER_THREADS = 4
FLOOR_MS = 0.1  # the batch-1 execution the comparison needs at least
TARGET_RATIO = 2.5
HEADLINE = 64  # clients for the on/off comparison
LOW_LOAD = (1, 2, 4)
HIGH_LOAD = (64, 128, 256)
CONFIGS = ("off", "triton", "work_conserving")
REFERENCES = ("trivial", "echo")
NAMES = {
    "off": "batching off",
    "triton": "Triton policy",
    "work_conserving": "work-conserving",
    "trivial": "ref: near-zero model",
    "echo": "ref: bare grpc.aio echo",
}
COLORS = {"off": "#8a939c", "triton": "#2f6fb3", "work_conserving": "#d9822b", "trivial": "#cfd6dc", "echo": "#e8ecef"}
ECHO_READY = re.compile(r"listening on (?P<host>\S+?):(?P<port>\d+)")
# A level measured while other processes took more than this share of a core is measured again
# (once): this machine may be shared, and the load tool and the server each have one core.
NOISE_LIMIT = 0.25
RETRIES = {"left": 0}  # set from --retries: measurements repeated for noise, over the whole run
ORT_SIZES = (1, 2, 4, 8, 16, 32, 64)


# ============================================================================ models


def mlp_onnx(sizes: tuple[int, ...]):
    from batchgate.demo import mlp_model

    return mlp_model(tuple(sizes))


def slice_onnx(width_in: int, width_out: int):
    """[-1, width_in] -> its first width_out columns: the MLP's shapes at next to no cost."""
    from onnx import TensorProto, helper, numpy_helper

    from batchgate.demo import _model

    inits = [
        numpy_helper.from_array(np.asarray(v, dtype=np.int64), n)
        for n, v in (("starts", [0]), ("ends", [width_out]), ("axes", [1]))
    ]
    g = helper.make_graph(
        [helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["output"])],
        "slice",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width_out])],
        inits,
    )
    return _model(g)


def model_config(sizes: tuple[int, ...], batching: bool, delay_us: int, instances: int) -> str:
    cfg = (
        f'name: "{MODEL}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {MAX_BATCH}\n"
        f'input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {sizes[0]} ] }} ]\n'
        f'output [ {{ name: "output" data_type: TYPE_FP32 dims: [ {sizes[-1]} ] }} ]\n'
        # one ONNX Runtime thread per execution: the server has one core
        'parameters { key: "intra_op_thread_count" value { string_value: "1" } }\n'
        'parameters { key: "inter_op_thread_count" value { string_value: "1" } }\n'
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
    )
    if batching:
        cfg += f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    return cfg


def write_repository(root: Path, model, config: str) -> Path:
    from batchgate.demo import _save

    _save(model, str(root), MODEL, config=config)
    return root


def ort_session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def time_ort(model, width: int, core: str | None, quick: bool) -> dict[int, dict]:
    """Execution time of ``model`` in ONNX Runtime itself, per batch size: the median over a few
    time-boxed blocks of back-to-back runs, on the core the server will use."""
    sess = ort_session(model)
    rng = np.random.default_rng(7)
    old = os.sched_getaffinity(0)
    if core is not None:
        os.sched_setaffinity(0, {int(core)})
    blocks, block_s = (3, 0.03) if quick else (5, 0.06)
    out = {}
    try:
        for b in ORT_SIZES:
            x = {"input": rng.standard_normal((b, width)).astype(np.float32)}
            for _ in range(10):
                sess.run(None, x)
            means = []
            for _ in range(blocks):
                n, t0 = 0, time.perf_counter()
                while True:
                    sess.run(None, x)
                    n += 1
                    t = time.perf_counter() - t0
                    if t >= block_s:
                        break
                means.append(t / n)
            med = statistics.median(means)
            out[b] = {
                "ms": med * 1e3,
                "us_per_row": med * 1e6 / b,
                "min_ms": min(means) * 1e3,
                "max_ms": max(means) * 1e3,
            }
    finally:
        os.sched_setaffinity(0, old)
    return out


def model_seconds(timing: dict[int, dict], hist: dict[int, int]) -> float:
    """CPU seconds the executions in ``hist`` (rows -> executions) would take in ONNX Runtime
    alone, interpolating linearly between the batch sizes timed."""
    sizes = sorted(timing)
    secs = [timing[s]["ms"] / 1e3 for s in sizes]
    return sum(n * float(np.interp(rows, sizes, secs)) for rows, n in hist.items())


# ============================================================================ requests


@dataclass
class Workload:
    """One model under test: its request bytes and the answer each request must get."""

    key: str  # main | a SWEEP key | trivial | echo
    sizes: tuple[int, ...]
    row: np.ndarray  # the one input row every request carries
    expected: np.ndarray  # the answer to it, from ONNX Runtime directly
    frame: Path  # the gRPC frame h2load sends
    body: Path  # the V2 JSON body wrk sends


def make_workload(key: str, model, sizes: tuple[int, ...], tmp: Path) -> Workload:
    import orjson
    from tritonclient.grpc import service_pb2 as pb

    row = np.random.default_rng(1).standard_normal((1, sizes[0])).astype(np.float32)
    # the echo answers the input itself; a model answers what ONNX Runtime computes
    expected = row if model is None else ort_session(model).run(None, {"input": row})[0]
    msg = pb.ModelInferRequest(model_name=MODEL)
    t = msg.inputs.add(name="input", datatype="FP32")
    t.shape.extend([1, sizes[0]])
    msg.raw_input_contents.append(row.astype("<f4").tobytes())
    frame = tmp / f"{key}.grpc"
    frame.write_bytes(grpc_frame(msg.SerializeToString()))
    body = tmp / f"{key}.json"
    body.write_bytes(
        orjson.dumps(
            {"inputs": [{"name": "input", "shape": [1, sizes[0]], "datatype": "FP32", "data": row[0].tolist()}]}
        )
    )
    return Workload(key, sizes, row, expected, frame, body)


def grpc_check(port: int, w: Workload) -> None:
    """The exact bytes h2load sends, through a real gRPC client: the answer must be OK and equal
    to ONNX Runtime's own."""
    payload = w.frame.read_bytes()[5:]
    resp = grpc_infer_raw(port, payload)
    if len(resp.raw_output_contents) != 1 or list(resp.outputs[0].shape) != list(w.expected.shape):
        raise BenchError(f"unexpected gRPC answer to the benchmark request: {resp}")
    got = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(w.expected.shape)
    if not np.allclose(got, w.expected, rtol=1e-4, atol=1e-5):
        raise BenchError(f"gRPC answer {got.ravel()[:4]}... differs from ONNX Runtime's {w.expected.ravel()[:4]}...")


def http_check(port: int, w: Workload) -> None:
    import orjson

    status, data = http_call(port, "POST", f"/v2/models/{MODEL}/infer", w.body.read_bytes())
    if status != 200:
        raise BenchError(f"the benchmark request fails over HTTP: {status} {data[:300]!r}")
    out = orjson.loads(data)["outputs"][0]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    if got.shape != w.expected.shape or not np.allclose(got, w.expected, rtol=1e-4, atol=1e-5):
        raise BenchError(f"HTTP answer differs from ONNX Runtime's: {data[:300]!r}")


# ============================================================================ server figures


@dataclass
class Snapshot:
    ok: int
    failed: int
    executions: int
    rows: int
    batches: dict[int, int]  # rows per execution -> executions
    compute_ns: int  # input + infer + output time of every execution
    queue_count: int
    queue_ns: int


def snapshot(http_port: int) -> Snapshot:
    import orjson

    status, data = http_call(http_port, "GET", f"/v2/models/{MODEL}/stats")
    if status != 200:
        raise BenchError(f"statistics request failed: {status} {data[:300]!r}")
    (s,) = orjson.loads(data)["model_stats"]
    st = s["inference_stats"]
    batches, compute = {}, 0
    for b in s["batch_stats"]:
        batches[int(b["batch_size"])] = int(b["compute_infer"]["count"])
        compute += sum(int(b[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output"))
    return Snapshot(
        int(st["success"]["count"]),
        int(st["fail"]["count"]),
        int(s["execution_count"]),
        int(s["inference_count"]),
        batches,
        compute,
        int(st["queue"]["count"]),
        int(st["queue"]["ns"]),
    )


def snapshot_grpc(grpc_port: int) -> Snapshot:
    """The echo server's figures: it counts answered calls in V2 ModelStatistics over gRPC; each
    is one single-row "execution"."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=10)
    ok = sum(m.inference_stats.success.count for m in resp.model_stats)
    bad = sum(m.inference_stats.fail.count for m in resp.model_stats)
    return Snapshot(ok, bad, ok + bad, ok + bad, {1: ok + bad} if ok + bad else {}, 0, 0, 0)


def check_prometheus(metrics_port: int, snap: Snapshot) -> None:
    """The ``batchgate_batch_size`` histogram must tell the same story as ``batch_stats``."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    buckets, count, total = {}, None, None
    for line in text.splitlines():
        if not line.startswith("batchgate_batch_size") or f'model="{MODEL}"' not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("batchgate_batch_size_bucket"):
            le = re.search(r'le="([^"]+)"', name).group(1)
            buckets[le] = float(value)
        elif name.startswith("batchgate_batch_size_count"):
            count = float(value)
        elif name.startswith("batchgate_batch_size_sum"):
            total = float(value)
    if count is None or total is None:
        raise BenchError("no batchgate_batch_size histogram for the model on the metrics endpoint")
    problems = []
    if count != snap.executions:
        problems.append(f"histogram count {count:g} vs execution_count {snap.executions}")
    if total != snap.rows:
        problems.append(f"histogram sum {total:g} vs inference_count {snap.rows}")
    for le, n in buckets.items():
        limit = float("inf") if le == "+Inf" else float(le)
        want = sum(c for r, c in snap.batches.items() if r <= limit)
        if n != want:
            problems.append(f"bucket le={le}: {n:g} vs {want} from batch_stats")
    if problems:
        raise BenchError("Prometheus batch-size histogram disagrees with batch_stats: " + "; ".join(problems))


# ============================================================================ runs


@dataclass
class Run:
    """One load level, measured on one server, in one round."""

    case: str  # main | http | a SWEEP key
    config: str  # off | triton | work_conserving | trivial | echo
    clients: int
    round: int
    rps: float = 0.0  # successful requests per second
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    p999_ms: float = float("nan")
    mean_ms: float = float("nan")
    max_ms: float = float("nan")
    elapsed_s: float = 0.0
    tool_ok: int = 0
    cut_off: int | None = None
    server_ok: int = 0
    server_failed: int = 0
    executions: int = 0
    rows: int = 0
    batches: dict[int, int] = field(default_factory=dict)
    mean_batch: float = float("nan")
    instance_busy: float = float("nan")  # share of the run during which the instance executed
    server_queue_ms: float = float("nan")  # mean time a request waited in the scheduler
    model_cpu_share: float = float("nan")  # what ONNX Runtime alone needs for these executions, per second
    other_us_per_request: float = float("nan")  # the server core's remaining busy time, per request
    server_core_busy: float = float("nan")
    server_process_cpu: float = float("nan")
    load_core_busy: float = float("nan")
    other_cpu: float = float("nan")
    retried: bool = False  # measured again because other processes were busy during the first try
    error: str | None = None


@dataclass
class Plan:
    case: str
    protocol: str  # grpc | http
    workload: Workload
    config: str
    levels: tuple[int, ...]
    round: int


def server_command(py: str, repo: Path, policy: str, threads: int) -> list[str]:
    return [
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
        "0",
        "--admin-port",
        "-1",
        "--admin-http-port",
        "-1",
        "--batching-policy",
        policy,
        "--infer-threads",
        str(threads),
        "--log-level",
        "info",
    ]


def measure_server(plan: Plan, repo: Path | None, args, pin: Pinning, tmp: Path, timing: dict | None) -> list[Run]:
    """Start one server, run every load level of ``plan`` on it, stop it."""
    runs = [Run(plan.case, plan.config, c, plan.round) for c in plan.levels]
    label = f"round {plan.round} {plan.case}/{plan.config}"
    slug = f"{plan.case}-{plan.config}-{plan.round}"
    echo = plan.config == "echo"
    if echo:
        cmd, ready = [sys.executable, str(HERE / "echo_servers.py"), "grpc"], ECHO_READY
    else:
        policy = "work_conserving" if plan.config == "work_conserving" else "triton"
        cmd, ready = server_command(sys.executable, repo, policy, args.infer_threads), BATCHGATE_READY
    try:
        srv = Server(label, [*pin.server, *cmd], ready, tmp / f"{slug}.log")
    except BenchError as e:
        for r in runs:
            r.error = str(e)
        say(f"{label}: INVALID: {e}")
        return runs
    if echo:
        grpc_port, http_port, metrics_port = int(srv.match.group("port")), None, None
        snap = partial(snapshot_grpc, grpc_port)
    else:
        grpc_port, http_port = int(srv.match.group("grpc")), int(srv.match.group("http"))
        metrics_port = srv.match.group("metrics")
        snap = partial(snapshot, http_port)
    done = 0  # levels measured so far
    try:
        if plan.protocol == "grpc":
            grpc_check(grpc_port, plan.workload)
        else:
            http_check(http_port, plan.workload)
        for i in range(len(runs)):
            warm = args.warmup if i == 0 else min(args.warmup, 0.5)
            for attempt in range(2):
                measure_level(runs[i], plan, srv, grpc_port, http_port, snap, warm, args, pin, tmp, timing)
                if runs[i].other_cpu <= NOISE_LIMIT or attempt == 1 or RETRIES["left"] <= 0:
                    break
                RETRIES["left"] -= 1
                say(f"  other processes took {runs[i].other_cpu:.0%} of a core: measuring this level once more")
                runs[i] = Run(plan.case, plan.config, runs[i].clients, plan.round, retried=True)
                warm = min(args.warmup, 0.5)
            done += 1
        if metrics_port:
            check_prometheus(int(metrics_port), snap())
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        msg = f"{e}\nserver log:\n{srv.log_tail()}"
        # a failed level and the ones after it; a failed final check taints every level
        for r in runs[done:] if done < len(runs) else runs:
            r.error = msg
        say(f"{label}: INVALID: {e}")
    finally:
        srv.stop()
    return runs


def measure_level(
    run: Run,
    plan: Plan,
    srv: Server,
    grpc_port: int,
    http_port: int | None,
    snap,
    warm: float,
    args,
    pin: Pinning,
    tmp: Path,
    timing: dict | None,
) -> None:
    n = run.clients
    log = tmp / f"{plan.case}-{plan.config}-{plan.round}-{n}.h2load"

    def load(secs: float, with_log: bool) -> dict:
        if plan.protocol == "grpc":
            return h2load(pin, grpc_port, plan.workload.frame, n, 1, secs, log if with_log else None)
        return wrk(pin, http_port, f"/v2/models/{MODEL}/infer", plan.workload.body, n, secs)

    if warm > 0:
        load(warm, False)
    time.sleep(0.3)  # let what the warm-up cut off finish
    s0 = snap()
    cpu0, cores0, others0 = srv.cpu_seconds(), core_jiffies(pin.cores), foreign_cpu_seconds()
    res = load(args.duration, True)
    cpu1, cores1, others1 = srv.cpu_seconds(), core_jiffies(pin.cores), foreign_cpu_seconds()
    time.sleep(0.3)
    s1 = snap()

    secs = res["elapsed_s"] or float("nan")
    lat = res.get("latency_us") or {}
    run.elapsed_s = res["elapsed_s"]
    run.tool_ok = res["ok"]
    run.cut_off = res.get("cut_off")
    run.rps = res["ok"] / secs
    for q in ("p50", "p90", "p99", "p999", "mean", "max"):
        setattr(run, f"{q}_ms", lat.get(q, float("nan")) / 1e3)
    run.server_ok, run.server_failed = s1.ok - s0.ok, s1.failed - s0.failed
    run.executions, run.rows = s1.executions - s0.executions, s1.rows - s0.rows
    run.batches = {r: c - s0.batches.get(r, 0) for r, c in sorted(s1.batches.items()) if c - s0.batches.get(r, 0)}
    run.mean_batch = run.rows / run.executions if run.executions else float("nan")
    run.instance_busy = (s1.compute_ns - s0.compute_ns) / 1e9 / secs
    dq = s1.queue_count - s0.queue_count
    run.server_queue_ms = (s1.queue_ns - s0.queue_ns) / dq / 1e6 if dq else float("nan")
    run.server_process_cpu = (cpu1 - cpu0) / secs
    if pin.cores:
        run.server_core_busy = busy_fraction(cores0, cores1, pin.cores[0])
        run.load_core_busy = busy_fraction(cores0, cores1, pin.cores[1])
    run.other_cpu = sum(max(0.0, t - others0.get(pid, 0.0)) for pid, t in others1.items()) / secs
    if timing is not None and run.server_ok:
        run.model_cpu_share = model_seconds(timing, run.batches) / secs
        busy = run.server_core_busy if pin.cores else run.server_process_cpu
        run.other_us_per_request = (busy - run.model_cpu_share) * secs / run.server_ok * 1e6

    # Trust nothing the tool cannot prove: a gRPC error arrives as HTTP 200 with the status in
    # the trailers, so the server's own success counter must cover what the tool reports. The
    # only slack is the requests in flight when the tool stopped (answered OK, or cancelled).
    slack = n if run.cut_off is None else run.cut_off
    problems = []
    if res["errors"] or res["non_2xx"]:
        problems.append(f"the load tool saw {res['errors']} errors and {res['non_2xx']} non-2xx responses")
    if run.server_ok < run.tool_ok:
        problems.append(f"the tool reports {run.tool_ok} successes, the server counted only {run.server_ok}")
    if (run.server_ok - run.tool_ok) + run.server_failed > slack:
        problems.append(
            f"the server counted {run.server_ok} OK and {run.server_failed} failed for {run.tool_ok} "
            f"reported; only {slack} requests were cut off at the end"
        )
    # single-row requests: rows executed = requests executed
    if not run.tool_ok <= run.rows <= run.server_ok + run.server_failed:
        problems.append(
            f"{run.rows} rows executed for {run.tool_ok} successes reported and "
            f"{run.server_ok + run.server_failed} requests answered"
        )
    if sum(run.batches.values()) != run.executions or sum(r * c for r, c in run.batches.items()) != run.rows:
        problems.append(f"batch_stats ({run.batches}) disagree with {run.executions} executions / {run.rows} rows")
    if plan.config in ("off", *REFERENCES) and set(run.batches) - {1}:
        problems.append(f"batching is off, yet batches of {sorted(run.batches)} rows ran")
    if run.tool_ok == 0:
        problems.append("no successful request")
    if problems:
        raise BenchError(f"{n} clients: " + "; ".join(problems) + f"\nload tool output:\n{res['raw'][-1500:]}")
    say(
        f"round {run.round} {plan.case}/{plan.config}, {n} clients: {run.rps:,.0f} req/s, p50 {run.p50_ms:.2f} ms, "
        f"p99 {run.p99_ms:.2f} ms; mean batch {run.mean_batch:.1f}, instance busy {run.instance_busy:.0%}; "
        f"server core {run.server_core_busy:.0%}, load core {run.load_core_busy:.0%}, "
        f"others {run.other_cpu:.0%} of a core"
    )
    if run.other_cpu > 0.05:
        say(f"  warning: other processes used {run.other_cpu:.0%} of a core during this run: noisier numbers")


# ============================================================================ summary


def med(runs: list[Run], attr: str) -> float:
    vals = [getattr(r, attr) for r in runs if r.error is None]
    vals = [v for v in vals if v == v]
    return float(statistics.median(vals)) if vals else float("nan")


def group(runs: list[Run]) -> dict[tuple[str, str, int], list[Run]]:
    out: dict[tuple[str, str, int], list[Run]] = {}
    for r in runs:
        out.setdefault((r.case, r.config, r.clients), []).append(r)
    return out


def summarize(runs: list[Run]) -> dict:
    """Medians over rounds per (case, configuration, clients); batch counts summed over rounds."""
    out = {}
    for (case, cfg, n), rs in group(runs).items():
        batches: dict[int, int] = {}
        for r in rs:
            if r.error is None:
                for k, v in r.batches.items():
                    batches[k] = batches.get(k, 0) + v
        out.setdefault(case, {}).setdefault(cfg, {})[n] = {
            "valid": all(r.error is None for r in rs),
            "rounds": len(rs),
            "rps": med(rs, "rps"),
            "rps_min": min((r.rps for r in rs), default=0.0),
            "rps_max": max((r.rps for r in rs), default=0.0),
            **{
                k: med(rs, k)
                for k in (
                    "p50_ms",
                    "p90_ms",
                    "p99_ms",
                    "p999_ms",
                    "mean_ms",
                    "mean_batch",
                    "instance_busy",
                    "server_queue_ms",
                    "model_cpu_share",
                    "other_us_per_request",
                    "server_core_busy",
                    "load_core_busy",
                    "other_cpu",
                )
            },
            "batches": dict(sorted(batches.items())),
        }
    return out


def verdicts_of(summary: dict, precondition: dict, runs: list[Run]) -> dict:
    out = {}
    echo = summary.get("main", {}).get("echo", {}).get(HEADLINE)
    for case in summary:
        s = summary.get(case, {})
        off = s.get("off", {}).get(HEADLINE)
        if not off or not off["valid"]:
            continue
        v = {}
        for cfg in ("triton", "work_conserving", *REFERENCES):
            on = s.get(cfg, {}).get(HEADLINE)
            if not on or not on["valid"]:
                continue
            ratio = on["rps"] / off["rps"] if off["rps"] else float("nan")
            entry = {"ratio": ratio, "p99_ms": on["p99_ms"], "off_p99_ms": off["p99_ms"]}
            if cfg not in REFERENCES:
                entry["throughput"] = "PASS" if ratio >= TARGET_RATIO else "FAIL"
                entry["p99"] = "PASS" if on["p99_ms"] < off["p99_ms"] else "FAIL"
                # per round, where both configurations ran in the same round
                by_round = {
                    (r.config, r.round): r for r in runs if r.case == case and r.clients == HEADLINE and r.error is None
                }
                entry["ratio_per_round"] = [
                    by_round[cfg, k].rps / by_round["off", k].rps
                    for (c, k) in sorted(by_round)
                    if c == "off" and (cfg, k) in by_round
                ]
            v[cfg] = entry
        if case in SWEEP and echo and echo["valid"] and off["rps"]:
            # the echo ran once, beside the main model; its bound holds for every model
            v["echo"] = {"ratio": echo["rps"] / off["rps"], "p99_ms": echo["p99_ms"], "off_p99_ms": off["p99_ms"]}
        v["model_ok"] = precondition.get("main" if case == "http" else case, {}).get("ok")
        out[case] = v
    return out


# ============================================================================ reporting


def fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x != x else format(x, spec)


def markdown(summary: dict, verdicts: dict, timing: dict, precondition: dict, args) -> str:
    lines = []
    lines.append("### The model, in ONNX Runtime alone (one thread, on the server's core)\n")
    lines.append("| model | " + " | ".join(f"batch {b}" for b in ORT_SIZES) + " | batch 1 >= 0.1 ms |")
    lines.append("|---|" + "---:|" * len(ORT_SIZES) + "---|")
    for key, t in timing.items():
        p = precondition[key]
        cells = " | ".join(f"{t[b]['ms'] * 1e3:.0f} us ({t[b]['us_per_row']:.0f}/row)" for b in ORT_SIZES)
        lines.append(f"| {p['name']} | {cells} | {'yes' if p['ok'] else '**no**'} ({p['batch1_ms']:.3f} ms) |")
    lines.append("")
    titles = {
        "main": f"gRPC (h2load -c N -m 1), {precondition['main']['name']}",
        "http": f"HTTP/JSON (wrk -c N), {precondition['main']['name']} (extra, one round)",
    }
    for key in SWEEP:
        if key in precondition:
            note = "the issue's example model; " if key == "issue" else ""
            titles[key] = f"gRPC (h2load -c N -m 1), {precondition[key]['name']} ({note}sweep, one round)"
    for case in ("main", "http", *SWEEP):
        s = summary.get(case)
        if not s:
            continue
        v = verdicts.get(case, {})
        lines.append(f"### Batching on vs off at {HEADLINE} concurrent single-row clients: {titles[case]}\n")
        lines.append(
            "| configuration | req/s (median) | req/s range | p50 ms | p99 ms | mean batch | instance busy "
            "| non-model us/request | others (cores) | vs off | >= 2.5x | lower p99 |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for cfg in (*CONFIGS, *REFERENCES):
            e = s.get(cfg, {}).get(HEADLINE)
            if e is None:
                continue
            if not e["valid"]:
                lines.append(f"| {NAMES[cfg]} | invalid | | | | | | | | | | |")
                continue
            ve = v.get(cfg, {})
            ref = cfg in REFERENCES
            ratio = f"**{ve['ratio']:.2f}x**" if "ratio" in ve else ""
            res = f"{ve.get('throughput', '')} | {ve.get('p99', '')}" if cfg in ("triton", "work_conserving") else " | "
            lines.append(
                f"| {NAMES[cfg]} | {e['rps']:,.0f} | {e['rps_min']:,.0f} - {e['rps_max']:,.0f} | "
                f"{fmt(e['p50_ms'])} | {fmt(e['p99_ms'])} | {'-' if ref else fmt(e['mean_batch'], '.1f')} | "
                f"{'-' if ref else fmt(e['instance_busy'] * 100, '.0f') + '%'} | "
                f"{fmt(e['other_us_per_request'], '.0f')} | {fmt(e['other_cpu'], '.2f')} | {ratio} | {res} |"
            )
        lines.append("")
    main = summary.get("main", {})
    levels = sorted({n for cfg in main.values() for n in cfg})
    if levels:
        lines.append("### Triton vs work-conserving policy by load (gRPC, main model; batching off for reference)\n")
        lines.append(
            "| clients | load | configuration | req/s | p50 ms | p99 ms | mean batch | server queue ms "
            "| instance busy |"
        )
        lines.append("|---:|---|---|---:|---:|---:|---:|---:|---:|")
        for n in levels:
            for cfg in CONFIGS:
                e = main.get(cfg, {}).get(n)
                if e is None:
                    continue
                tag = "low" if n in LOW_LOAD else "high" if n in HIGH_LOAD else ""
                if not e["valid"]:
                    lines.append(f"| {n} | {tag} | {NAMES[cfg]} | invalid | | | | | |")
                    continue
                lines.append(
                    f"| {n} | {tag} | {NAMES[cfg]} | {e['rps']:,.0f} | {fmt(e['p50_ms'])} | "
                    f"{fmt(e['p99_ms'])} | {fmt(e['mean_batch'], '.1f')} | {fmt(e['server_queue_ms'])} | "
                    f"{fmt(e['instance_busy'] * 100, '.0f')}% |"
                )
        lines.append("")
    lines.append("### Verdicts\n")
    for case, v in verdicts.items():
        for cfg in ("triton", "work_conserving"):
            if cfg not in v:
                continue
            e = v[cfg]
            per = ", ".join(f"{x:.2f}" for x in e.get("ratio_per_round", []))
            lines.append(
                f"- {case} / {NAMES[cfg]}: {e['ratio']:.2f}x batching off (target >= {TARGET_RATIO}): "
                f"**{e['throughput']}**; p99 {e['p99_ms']:.2f} vs {e['off_p99_ms']:.2f} ms: **{e['p99']}**"
                + (f"; per round: {per}" if per else "")
            )
        if "trivial" in v:
            lines.append(
                f"- {case}: the same server with a near-zero model serves {v['trivial']['ratio']:.2f}x batching "
                "off: what the gateway's per-request path allows when the model costs nothing"
            )
        if "echo" in v:
            lines.append(
                f"- {case}: the bare grpc.aio echo (no gateway, no model) serves {v['echo']['ratio']:.2f}x "
                f"batching off: the {TARGET_RATIO}x target needs a batched gateway at least that fast"
            )
        if v.get("model_ok") is False:
            lines.append(
                f"- {case}: the model's batch-1 execution is under {FLOOR_MS} ms: outside the comparison the "
                "target is stated for"
            )
    return "\n".join(lines)


def plot(summary: dict, verdicts: dict, precondition: dict, path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = summary.get("main", {})
    fig = plt.figure(figsize=(25, 9))
    grid = fig.add_gridspec(2, 5)
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(4)] for r in range(2)])
    sweep_panel(fig.add_subplot(grid[:, 4]), summary, verdicts, precondition)

    # (0,0) throughput relative to batching off, per case, at the headline load
    ax = axes[0, 0]
    cases = [c for c in ("main", "http") if summary.get(c, {}).get("off", {}).get(HEADLINE)]
    labels = {"main": "gRPC\nmain model", "http": "HTTP/JSON\nmain model"}
    width = 0.16
    for i, case in enumerate(cases):
        s = summary[case]
        base = s["off"][HEADLINE]["rps"]
        cfgs = [c for c in (*CONFIGS, *REFERENCES) if s.get(c, {}).get(HEADLINE, {}).get("valid")]
        for j, cfg in enumerate(cfgs):
            e = s[cfg][HEADLINE]
            x = i + (j - (len(cfgs) - 1) / 2) * width
            ax.bar(
                x,
                e["rps"] / base,
                width * 0.9,
                color=COLORS[cfg],
                label=NAMES[cfg] if i == 0 else None,
                hatch="//" if cfg in REFERENCES else None,
                edgecolor="white",
            )
            ax.text(x, e["rps"] / base + 0.03, f"{e['rps'] / 1e3:.1f}k", ha="center", va="bottom", fontsize=7)
    ax.axhline(TARGET_RATIO, color="#b3261e", ls="--", lw=1)
    ax.text(-0.48, TARGET_RATIO + 0.04, f"target {TARGET_RATIO}x", color="#b3261e", fontsize=8)
    ax.set_xticks(range(len(cases)), [labels[c] for c in cases], fontsize=8)
    ax.set_ylabel("throughput / batching off (same run)")
    ax.set_title(f"throughput at {HEADLINE} clients (labels: req/s)", fontsize=10)
    ax.set_ylim(0, max(TARGET_RATIO + 1.4, ax.get_ylim()[1] * 1.35))
    ax.legend(fontsize=7, loc="upper left", ncol=2)

    # (0,1) p50 / p99 at the headline load, main case
    ax = axes[0, 1]
    cfgs = [c for c in CONFIGS if main.get(c, {}).get(HEADLINE, {}).get("valid")]
    for j, cfg in enumerate(cfgs):
        e = main[cfg][HEADLINE]
        for k, (q, alpha) in enumerate((("p50_ms", 0.55), ("p99_ms", 1.0))):
            ax.bar(j + (k - 0.5) * 0.35, e[q], 0.33, color=COLORS[cfg], alpha=alpha)
            ax.text(j + (k - 0.5) * 0.35, e[q], f"{e[q]:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(cfgs)), [NAMES[c] for c in cfgs], fontsize=8)
    ax.set_ylabel("latency, ms")
    ax.set_title(f"gRPC latency at {HEADLINE} clients (p50 light, p99 dark)", fontsize=10)

    # (0,2), (0,3) batch-size distribution per policy at high load
    for ax, cfg in ((axes[0, 2], "triton"), (axes[0, 3], "work_conserving")):
        levels = [n for n in HIGH_LOAD if main.get(cfg, {}).get(n, {}).get("batches")]
        styles = ("-", "--", ":")
        for k, n in enumerate(levels):
            b = main[cfg][n]["batches"]
            total = sum(b.values())
            xs = np.arange(1, MAX_BATCH + 1)
            ys = np.array([b.get(int(x), 0) / total for x in xs])
            ax.step(
                xs,
                ys,
                where="mid",
                ls=styles[k % 3],
                color=COLORS[cfg],
                lw=1.4,
                label=f"{n} clients (mean {main[cfg][n]['mean_batch']:.1f} rows, {total:,} executions)",
            )
        ax.set_xlabel("rows per execution")
        ax.set_ylabel("share of executions (all rounds)")
        ax.set_xlim(0, MAX_BATCH + 1)
        ax.set_ylim(bottom=0)
        ax.set_title(f"batch sizes, {NAMES[cfg]}, high load", fontsize=10)
        if levels:
            ax.legend(fontsize=7)

    # second row: against offered load (concurrent clients, closed loop)
    panels = (
        (axes[1, 0], "rps", "successful requests / s", False),
        (axes[1, 1], "p50_ms", "p50 latency, ms", True),
        (axes[1, 2], "p99_ms", "p99 latency, ms", True),
        (axes[1, 3], "mean_batch", "mean rows per execution", False),
    )
    for ax, key, ylabel, logy in panels:
        for cfg in CONFIGS:
            pts = sorted((n, e[key]) for n, e in main.get(cfg, {}).items() if e["valid"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[cfg], label=NAMES[cfg], ms=4)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("offered load: concurrent single-row clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1, 0].set_title("throughput vs load (gRPC)", fontsize=10)
    axes[1, 1].set_title("p50 vs load", fontsize=10)
    axes[1, 2].set_title("p99 vs load", fontsize=10)
    axes[1, 3].set_title("batch size vs load", fontsize=10)
    fig.suptitle(
        f"batchgate dynamic batching: Triton vs work-conserving policy vs batching off\n{subtitle}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_panel(ax, summary: dict, verdicts: dict, precondition: dict) -> None:
    """Speed-up over batching off at the headline load against the model's batch-1 cost, with
    the bound the bare echo sets for each model."""
    cases = sorted(
        (c for c in ("main", *SWEEP) if c in verdicts and c in precondition), key=lambda c: precondition[c]["batch1_ms"]
    )
    xs = [precondition[c]["batch1_ms"] * 1e3 for c in cases]
    for cfg in ("triton", "work_conserving", "echo"):
        pts = [(x, verdicts[c][cfg]["ratio"]) for x, c in zip(xs, cases) if cfg in verdicts[c]]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "o-" if cfg != "echo" else "s--",
                color=COLORS[cfg] if cfg != "echo" else "#6b7680",
                ms=5,
                label=NAMES[cfg] if cfg != "echo" else "bound: bare grpc.aio echo",
            )
    for x, c in zip(xs, cases):
        name = "main" if c == "main" else "issue's MLP" if c == "issue" else precondition[c]["name"][4:]
        ax.annotate(name, (x, 1.0), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=6, rotation=20)
    ax.axhline(TARGET_RATIO, color="#b3261e", ls="--", lw=1)
    ax.axhline(1.0, color="#8a939c", lw=0.8)
    ax.axvline(FLOOR_MS * 1e3, color="#b3261e", ls=":", lw=1)
    ax.text(FLOOR_MS * 1e3, 0.6, " 0.1 ms floor", color="#b3261e", fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0.5)
    ax.set_xlabel("model's batch-1 execution in ONNX Runtime, us (log)")
    ax.set_ylabel(f"throughput / batching off at {HEADLINE} clients (gRPC, same run)")
    ax.set_title("where batching pays: speed-up vs model cost", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


# ============================================================================ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="batchgate dynamic batching: on vs off, Triton vs work-conserving")
    ap.add_argument("--quick", action="store_true", help="1 round, levels 1/64/256, short runs, no extras (< 60 s)")
    ap.add_argument("--rounds", type=int, default=None, help="fresh servers per configuration (default 2)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of each measured level (default 3)")
    ap.add_argument(
        "--warmup", type=float, default=None, help="seconds of load before a server's first level (default 1)"
    )
    ap.add_argument(
        "--levels",
        type=str,
        default=None,
        help="concurrent clients, comma-separated (default 1,2,4,64,128,256; must include 64)",
    )
    ap.add_argument(
        "--hidden",
        type=str,
        default=None,
        help="hidden layer widths of the main MLP, comma-separated (default 2048,2048,2048)",
    )
    ap.add_argument(
        "--delay-us",
        type=int,
        default=DEFAULT_DELAY_US,
        help=f"max_queue_delay_microseconds (default {DEFAULT_DELAY_US})",
    )
    ap.add_argument(
        "--instances", type=int, default=DEFAULT_INSTANCES, help=f"instance_group count (default {DEFAULT_INSTANCES})"
    )
    ap.add_argument(
        "--infer-threads",
        type=int,
        default=DEFAULT_INFER_THREADS,
        help=f"batchgate --infer-threads (default {DEFAULT_INFER_THREADS})",
    )
    ap.add_argument("--no-extras", action="store_true", help="skip the HTTP/JSON comparison and the model sweep")
    ap.add_argument(
        "--retries",
        type=int,
        default=None,
        help="levels that may be measured again because other processes were busy (default 8; quick 0)",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server and the load tool to cores")
    ap.add_argument("--output", type=Path, default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    quick = {"rounds": 1, "duration": 1.5, "warmup": 0.5, "levels": "1,64,256", "retries": 0}
    full = {"rounds": 2, "duration": 3.0, "warmup": 1.0, "levels": "1,2,4,64,128,256", "retries": 8}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.levels = tuple(sorted({int(x) for x in args.levels.split(",")}))
    if HEADLINE not in args.levels:
        ap.error(f"--levels must include {HEADLINE}")
    if args.rounds < 1 or args.duration <= 0 or min(args.levels) < 1:
        ap.error("--rounds, --duration and --levels must be positive")
    hidden = tuple(int(x) for x in args.hidden.split(",")) if args.hidden else MAIN_SIZES[1:-1]
    args.sizes = (MAIN_SIZES[0], *hidden, MAIN_SIZES[-1])
    args.extras = not (args.quick or args.no_extras)
    return args


RUNS: list[Run] = []  # every run of this invocation


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("h2load") is None or (args.extras and shutil.which("wrk") is None):
        say("missing load tools; install them with `make bench-tools` (apt-get install nghttp2-client wrk)")
        return 1
    pin = choose_pinning(not args.no_pin)
    RETRIES["left"] = args.retries
    server_core = pin.cores[0] if pin.cores else None
    t_start = time.monotonic()
    say(f"pinning: {pin.note}; {args.rounds} round(s); levels {args.levels}; {args.duration:g} s per level")

    models = {"main": (args.sizes, mlp_onnx(args.sizes))}
    if args.extras:
        for key, sizes in SWEEP.items():
            if sizes != args.sizes:
                models[key] = (sizes, mlp_onnx(sizes))
    timing, precondition = {}, {}
    for key, (sizes, model) in models.items():
        t = time_ort(model, sizes[0], server_core, args.quick)
        timing[key] = t
        name = "MLP " + " -> ".join(str(s) for s in sizes)
        precondition[key] = {"name": name, "sizes": list(sizes), "batch1_ms": t[1]["ms"], "ok": t[1]["ms"] >= FLOOR_MS}
        say(
            f"{name}: ONNX Runtime alone, batch 1 {t[1]['ms'] * 1e3:.0f} us, batch {MAX_BATCH} "
            f"{t[MAX_BATCH]['ms'] * 1e3:.0f} us ({t[MAX_BATCH]['us_per_row']:.1f} us/row); batch 1 >= {FLOOR_MS} ms: "
            f"{'yes' if precondition[key]['ok'] else 'NO'}"
        )
    if not precondition["main"]["ok"]:
        say(f"warning: the main model's batch-1 execution is under {FLOOR_MS} ms here; pick wider layers (--hidden)")

    with tempfile.TemporaryDirectory(prefix="batchgate-batching-") as d:
        tmp = Path(d)
        work = {k: make_workload(k, m, sizes, tmp) for k, (sizes, m) in models.items()}
        trivial_model = slice_onnx(args.sizes[0], args.sizes[-1])
        work["trivial"] = make_workload("trivial", trivial_model, args.sizes, tmp)
        work["echo"] = make_workload("echo", None, args.sizes, tmp)
        repos = {}
        for key, (sizes, model) in models.items():
            for on in (False, True):
                repos[key, on] = write_repository(
                    tmp / f"repo-{key}-{'on' if on else 'off'}",
                    model,
                    model_config(sizes, on, args.delay_us, args.instances),
                )
        repos["trivial"] = write_repository(
            tmp / "repo-trivial", trivial_model, model_config(args.sizes, False, args.delay_us, args.instances)
        )
        repos["echo"] = None

        def run(plan: Plan, repo: Path, timed: dict | None) -> None:
            RUNS.extend(measure_server(plan, repo, args, pin, tmp, timed))

        for rnd in range(1, args.rounds + 1):
            for cfg in CONFIGS:
                run(
                    Plan("main", "grpc", work["main"], cfg, args.levels, rnd),
                    repos["main", cfg != "off"],
                    timing["main"],
                )
            for ref in REFERENCES:
                run(Plan("main", "grpc", work[ref], ref, (HEADLINE,), rnd), repos[ref], None)
        if args.extras:
            for cfg in CONFIGS:
                run(
                    Plan("http", "http", work["main"], cfg, (HEADLINE,), 1), repos["main", cfg != "off"], timing["main"]
                )
            for key in SWEEP:
                if key in models:
                    for cfg in CONFIGS:
                        run(Plan(key, "grpc", work[key], cfg, (HEADLINE,), 1), repos[key, cfg != "off"], timing[key])

    summary = summarize(RUNS)
    verdicts = verdicts_of(summary, precondition, RUNS)
    print(markdown(summary, verdicts, timing, precondition, args))

    import grpc

    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["bench/batching.py", *(argv if argv is not None else sys.argv[1:])]),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "levels": list(args.levels),
        "headline_clients": HEADLINE,
        "pinning": pin.note,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "h2load": tool_version(["h2load", "--version"]),
        "wrk": tool_version(["wrk", "-v"]) if args.extras else None,
        "load": "gRPC: h2load -t 1 -c N -m 1 (N connections, one request in flight each, closed loop); "
        "HTTP extra: wrk -t 1 -c N",
        "batchgate": {
            "max_batch_size": MAX_BATCH,
            "max_queue_delay_us": args.delay_us,
            "instances": args.instances,
            "infer_threads": args.infer_threads,
            "ort_threads": "intra 1, inter 1",
        },
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta,
        "targets": {"ratio_at_64_clients": TARGET_RATIO, "lower_p99": True, "batch1_floor_ms": FLOOR_MS},
        "model_timing": {
            k: {"model": precondition[k], "ort_by_batch": {str(b): v for b, v in t.items()}} for k, t in timing.items()
        },
        "verdicts": verdicts,
        "summary": {c: {cfg: {str(n): e for n, e in lv.items()} for cfg, lv in s.items()} for c, s in summary.items()},
        "runs": [asdict(r) for r in RUNS],
    }
    (args.output / "batching.json").write_text(json.dumps(finite(doc), indent=2) + "\n")
    subtitle = (
        f"{precondition['main']['name']} (batch 1: {precondition['main']['batch1_ms'] * 1e3:.0f} us in ORT); "
        f"max_batch_size {MAX_BATCH}, max_queue_delay {args.delay_us} us, {args.instances} instance(s); "
        f"{meta['cpu_model']}; {pin.note}; medians of {args.rounds} round(s) x {args.duration:g} s"
    )
    try:
        plot(summary, verdicts, precondition, args.output / "batching.png", subtitle)
    except Exception as e:  # the JSON and the tables are the result; a plot is a nicety
        say(f"could not draw the plot: {e}")
    say(f"wrote {args.output / 'batching.json'} and {args.output / 'batching.png'} in {meta['wall_s']:g} s")
    if any(r.error for r in RUNS):
        return 1
    headline = verdicts.get("main", {}).get("triton", {})
    if args.check and (
        headline.get("throughput") != "PASS" or headline.get("p99") != "PASS" or not precondition["main"]["ok"]
    ):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
