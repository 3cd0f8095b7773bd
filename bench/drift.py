"""Drift monitoring: what it costs the gateway (issue 14; ``make bench-drift``, about 12 minutes;
``--quick``, about a minute).

One gateway per model, pinned to one core (wrk on the other), serves three copies of the model:
``<model>_off`` with no drift monitor, ``<model>_0_1`` monitored at ``sample_rate`` 0.1 and
``<model>_1_0`` at 1.0 (one detector process for both monitors, the gateway's child). "Off" is the
same model in the same process, so no process-to-process difference enters the ratios; its
requests meet one dictionary look-up of drift code (``DriftService.watch``), and what the idle
detector costs meanwhile is reported. Models: the demo ``mlp`` (256 features, the demo's
configuration) and ``tiny`` (an ONNX Identity of 4 features like bench/serving.py's).

Load: HTTP/JSON from wrk in a closed loop (32 connections), each request one row of a pool of
2,048 rows drawn from N(0, 1): a Lua ``request()`` cycles through them (bench/wrk_post.lua's
report), so the detector scores varied data, which h2load's one fixed body would not be. The
reference profile is made from 20,000 other rows of the same distribution with ``batchgate drift
profile``; windows of ``--window`` rows (500) so that several are scored in every phase.

Each round measures off, 0.1 and 1.0 for ``--seconds`` each, the order reversed every other
round (ABBA); after each phase the detector is let finish what was queued (its CPU until then is
the phase's) and report its counts. Per setting: throughput and p99 over off (the median of the
rounds' ratios; target at 0.1: throughput >= 0.95x), the server process's CPU per request, the
detector's CPU (from /proc, per second of load and per 1,000 samples it scored), its pid beside
the server's, the drop rate (dropped / (used + dropped)), windows scored, and the detector lag
(a window's last sample offered -> window scored) p50/p99 estimated from its histogram.

Where the detector runs (``--detector-core``): ``load`` (the default) moves it to the load
tool's core, as a gateway with a spare core would have it (a process of its own is what keeps
its work off the serving core); ``server`` leaves it where it starts, on the server's pinned core
at nice 5, the worst case: every millisecond it scores is taken from serving (and its cache
traffic slows the model too), and what it cannot keep up with at 1.0 is dropped. The in-process
phase always has it on the one core of the measuring process.

Then, per model, the co-run (``--corun-only`` for just it, ``--no-corun`` to skip it): two
gateways of the same copies and monitors on the server core at once, each in a cpu cgroup of its
own (common.CpuGroup), their detectors on the load core; one driven on ``off``, the other on a
monitored copy over the same window, sides flipped every round; a control (both on ``off``) beside
each. The VM's swings hit both sides alike (see bench/common.corun).

Writes bench/results/drift.json and bench/results/drift.png; exit 1 when a phase could not be
measured (and, with --check, when the 0.1 target is missed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from common import (
    BATCHGATE_READY,
    BenchError,
    CpuGroup,
    Pinning,
    Server,
    busy_fraction,
    choose_pinning,
    core_jiffies,
    corun,
    cpu_model,
    dataplane_rounds,
    finite,
    foreign_cpu_seconds,
    run_tool,
    say,
    serve_command,
    tool_version,
)

HERE = Path(__file__).resolve().parent
TARGET = 0.95  # throughput at sample_rate 0.1 over off
RATES = {"off": 0.0, "0.1": 0.1, "1.0": 1.0}
DATAPLANE_REQUESTS = {"mlp": 4_000, "tiny": 20_000}  # a round of the in-process phase, per setting
POOL_ROWS = 2048
REFERENCE_ROWS = 20_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
COUNTS_WAIT_S = 1.3  # the detector reports its counts once a second (monitoring/drift_detector.py)

# wrk: bench/wrk_post.lua's headers and BENCH_JSON report, each request the next line of the
# BENCH_BODY file (formatted once, up front)
POOL_LUA = """dofile({base})
local requests = {{}}
for line in io.lines(os.getenv("BENCH_BODY")) do
  requests[#requests + 1] = wrk.format(nil, nil, nil, line)
end
local i = 0
function request()
  i = i % #requests + 1
  return requests[i]
end
"""


@dataclass(frozen=True)
class Subject:
    name: str
    input: str
    features: int
    about: str


SUBJECTS = {
    "mlp": Subject("mlp", "input", 256, "the demo mlp (server/demo.py): FP32 [-1, 256] -> 3 dense layers -> [-1, 16]"),
    "tiny": Subject("tiny", "INPUT", 4, "ONNX Identity, FP32 [-1, 4] -> [-1, 4], max_batch_size 8"),
}


def served_name(subject: str, setting: str) -> str:
    return f"{subject}_{setting.replace('.', '_')}"


# ============================================================================ set-up


def build_repo(s: Subject, repo: Path) -> Path:
    """Three copies of the model, one per setting; the demo's configuration for the mlp."""
    from onnx import TensorProto

    from batchgate.demo import _save, identity_model, mlp_model

    for setting in RATES:
        name = served_name(s.name, setting)
        if s.name == "mlp":
            model, cfg = mlp_model(), "max_batch_size: 64\ninstance_group [ { count: 1 kind: KIND_CPU } ]\n"
        else:
            model, cfg = identity_model(name, TensorProto.FLOAT, ("batch", s.features)), "max_batch_size: 8\n"
        _save(model, str(repo), name, config=cfg)
    return repo


def drift_config(s: Subject, folder: Path, window: int, queue: int | None) -> Path:
    """The reference profile (``batchgate drift profile`` of 20,000 rows like the traffic's) and
    the configuration file with a monitor for each sampled copy."""
    data = folder / "reference.npz"
    rows = np.random.default_rng(1).standard_normal((REFERENCE_ROWS, s.features), dtype=np.float32)
    np.savez(data, **{s.input: rows})
    profile = folder / "profile.json"
    cmd = [sys.executable, "-m", "batchgate.cli", "drift", "profile", "--model", s.name, "--input", s.input]
    p = subprocess.run([*cmd, "--data", str(data), "--out", str(profile)], capture_output=True, text=True)
    if p.returncode != 0:
        raise BenchError(f"batchgate drift profile failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    monitors = [
        {
            "model": served_name(s.name, setting),
            "inputs": [s.input],
            "reference": str(profile),
            "sample_rate": rate,
            "window": {"samples": window, "max_s": 300},
            "outputs": False,
        }
        for setting, rate in RATES.items()
        if rate > 0
    ]
    doc: dict = {"drift": monitors}
    if queue is not None:
        doc["drift_detector"] = {"drift_queue_samples": queue}
    cfg = folder / "drift.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


def traffic(s: Subject, folder: Path) -> tuple[Path, Path]:
    """The pool of request bodies (one a line) and the wrk script that cycles through them."""
    rows = np.random.default_rng(2).standard_normal((POOL_ROWS, s.features)).round(4)
    bodies = folder / "bodies.jsonl"
    with open(bodies, "w") as f:
        for row in rows:
            t = {"name": s.input, "shape": [1, s.features], "datatype": "FP32", "data": row.tolist()}
            f.write(json.dumps({"inputs": [t]}, separators=(",", ":")) + "\n")
    lua = folder / "pool.lua"
    lua.write_text(POOL_LUA.format(base=json.dumps(str(HERE / "wrk_post.lua"))))
    return bodies, lua


# ============================================================================ measuring


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [(x.name, x.labels, x.value) for fam in text_string_to_metric_families(text) for x in fam.samples]


def pick(samples: list, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def lag_buckets(samples: list, model: str) -> list[tuple[str, float]]:
    """(upper bound as its label says it, cumulative count) of the model's detector-lag histogram."""
    name = "batchgate_drift_lag_seconds_bucket"
    got = [(lab["le"], v) for n, lab, v in samples if n == name and lab.get("model") == model]
    return sorted(got, key=lambda b: float(b[0]))


def quantile(buckets: list[tuple[str, float]], q: float) -> float:
    """The q-quantile of a cumulative histogram, linear within its bucket (Prometheus's
    histogram_quantile); the highest finite bound when it falls beyond it; NaN when empty."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank, low, below = q * total, 0.0, 0.0
    for le, count in buckets:
        bound = float(le)
        if count >= rank:
            if math.isinf(bound):
                return low
            return low + (bound - low) * (rank - below) / (count - below) if count > below else bound
        low, below = bound, count
    return low


def proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on: field n is at index n - 3."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def proc_cpu(pid: int) -> float:
    try:
        fields = proc_stat(pid)
    except OSError:
        raise BenchError(f"process {pid} is gone (the drift detector restarted, or the server stopped)") from None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_info(pid: int) -> dict:
    fields = proc_stat(pid)
    status = Path(f"/proc/{pid}/status").read_text()
    allowed = re.search(r"Cpus_allowed_list:\s*(\S+)", status)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return {
        "pid": pid,
        "ppid": int(fields[1]),
        "cmdline": cmdline[:300],
        "nice": int(fields[16]),
        "cores_allowed": allowed.group(1) if allowed else "?",
        "last_core": int(fields[36]),
    }


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(proc_stat(int(entry))[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def find_detector(gw: Server, metrics_port: int, limit_s: float = 60.0) -> dict:
    """The drift detector: the server's child that multiprocessing's spawn started (the other
    child is spawn's resource tracker), once it says it is up."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if pick(scrape(metrics_port), "batchgate_drift_detector_up") == 1:
            for pid in children(gw.proc.pid):
                info = process_info(pid)
                if "spawn_main" in info["cmdline"]:
                    return info
        time.sleep(0.2)
    raise BenchError(f"no drift detector came up under the server (pid {gw.proc.pid}):\n{gw.log_tail()}")


def drain(metrics_port: int, detector: int, sampled: bool, limit_s: float = 30.0) -> None:
    """Until nothing waits for the detector and it has gone idle (a clock tick or less in 0.3 s);
    then, after a sampled phase, until its next counts report."""
    end = time.monotonic() + limit_s
    last = proc_cpu(detector)
    while True:
        time.sleep(0.3)
        now = proc_cpu(detector)
        if now - last <= 1.0 / CLK_TCK and pick(scrape(metrics_port), "batchgate_drift_queue_depth") == 0:
            break
        if time.monotonic() > end:
            raise BenchError(f"the drift detector was still busy {limit_s:g} s after the load stopped")
        last = now
    if sampled:
        time.sleep(COUNTS_WAIT_S)


def wrk_pool(pin: Pinning, port: int, model: str, files: tuple[Path, Path], connections: int, seconds: int) -> dict:
    bodies, lua = files
    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
    cmd = [*pin.load, "wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s", str(lua), url]
    out, _ = run_tool(cmd, timeout=seconds + 60, env={"BENCH_BODY": str(bodies)})
    report = re.search(r"^BENCH_JSON (.*)$", out, re.M)
    if report is None:
        raise BenchError(f"cannot read wrk's output:\n{out[-2000:]}")
    j = json.loads(report.group(1))
    if any(j["errors"].values()):
        raise BenchError(f"wrk saw errors or non-2xx answers on {model}: {j['errors']}")
    return j


@dataclass
class Context:
    pin: Pinning
    subject: Subject
    gw: Server
    http_port: int
    metrics_port: int
    detector: int
    ours: set[int]  # the server's children (detector, resource tracker): not "other processes"
    files: tuple[Path, Path]
    connections: int


def phase(ctx: Context, setting: str, seconds: int) -> dict:
    """One closed-loop run against one copy, the detector drained after it."""
    model = served_name(ctx.subject.name, setting)
    m0 = scrape(ctx.metrics_port)
    det0, srv0, cores0, others0 = (
        proc_cpu(ctx.detector),
        ctx.gw.cpu_seconds(),
        core_jiffies(ctx.pin.cores),
        foreign_cpu_seconds(),
    )
    j = wrk_pool(ctx.pin, ctx.http_port, model, ctx.files, ctx.connections, seconds)
    srv1, cores1, others1 = ctx.gw.cpu_seconds(), core_jiffies(ctx.pin.cores), foreign_cpu_seconds()
    drain(ctx.metrics_port, ctx.detector, RATES[setting] > 0)
    det1 = proc_cpu(ctx.detector)
    m1 = scrape(ctx.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return pick(m1, name, **labels) - pick(m0, name, **labels)

    secs = j["duration_us"] / 1e6
    server_ok = delta("batchgate_requests_total", model=model, status="OK")
    if server_ok < j["requests"]:
        raise BenchError(f"wrk reports {j['requests']} answers from {model}; the server counted {server_ok:.0f} OK")
    samples = {
        o: delta("batchgate_drift_samples_total", model=model, outcome=o) for o in ("used", "dropped", "invalid")
    }
    before, after = lag_buckets(m0, model), lag_buckets(m1, model)
    lag = [(b, c - c0) for (b, c), (_, c0) in zip(after, before)]
    other = sum(max(0.0, t - others0.get(pid, 0.0)) for pid, t in others1.items() if pid not in ctx.ours) / secs
    return {
        "setting": setting,
        "seconds": secs,
        "ok": j["requests"],
        "server_ok": server_ok,
        "rps": j["requests"] / secs,
        "p50_ms": j["latency_us"]["p50"] / 1e3,
        "p99_ms": j["latency_us"]["p99"] / 1e3,
        "server_cpu_cores": (srv1 - srv0) / secs,
        "server_us_per_request": (srv1 - srv0) / max(1, j["requests"]) * 1e6,
        "server_core_busy": busy_fraction(cores0, cores1, ctx.pin.cores[0]) if ctx.pin.cores else float("nan"),
        "load_core_busy": busy_fraction(cores0, cores1, ctx.pin.cores[1]) if ctx.pin.cores else float("nan"),
        "other_cpu_cores": other,
        "detector_cpu_s": det1 - det0,
        "detector_cpu_s_metric": delta("batchgate_drift_detector_cpu_seconds_total"),
        "samples": samples,
        "windows": delta("batchgate_drift_windows_total", model=model),
        "lag_buckets": lag,
    }


def corun_subject(s: Subject, args, pin: Pinning, tmp: Path, out: Path) -> dict:
    """Co-run (common.corun): two gateways with the same copies and monitors on the server core at
    once, each in a session of its own (half the core each), their detectors on the load core; one
    driven on ``off``, the other on a monitored copy, over the same window, sides flipped every
    round; a control run beside each (both on ``off``). Per setting: the median of the rounds'
    throughput ratios."""
    folder = tmp / f"{s.name}-corun"
    repo = build_repo(s, folder / "models")
    cfg = drift_config(s, folder, args.window, args.queue)
    files = traffic(s, folder)
    gws: list[Server] = []
    groups: list[CpuGroup] = []
    try:
        for i in (0, 1):
            cmd = [*pin.server, *serve_command(str(repo), "--config", str(cfg))]
            gws.append(Server(f"gateway {i}", cmd, BATCHGATE_READY, out / f"drift-corun-{s.name}-{i}.log", True))
        ports = [(int(g.match["http"]), int(g.match["metrics"])) for g in gws]
        dets = [find_detector(g, m)["pid"] for g, (_, m) in zip(gws, ports)]
        if pin.cores:
            for det in dets:
                os.sched_setaffinity(det, {int(pin.cores[1])})
        # each gateway in a cpu cgroup of its own, its detector left out (see common.CpuGroup)
        groups = [CpuGroup(g.proc.pid, f"gw{i}") for i, g in enumerate(gws)]
        if not all(g.ok for g in groups):
            say("no cpu cgroup could be made: the co-run relies on autogroup alone (see common.CpuGroup)")
        for http, _ in ports:
            for setting in RATES:
                wrk_pool(pin, http, served_name(s.name, setting), files, args.connections, args.warmup)

        def run(models: tuple[str, str]) -> list[float]:
            got = corun(
                [
                    lambda h=h, m=m: wrk_pool(pin, h, served_name(s.name, m), files, args.connections, args.seconds)
                    for (h, _), m in zip(ports, models)
                ]
            )
            for (_, metrics), det, m in zip(ports, dets, models):
                drain(metrics, det, RATES[m] > 0)
            return [j["requests"] / (j["duration_us"] / 1e6) for j in got]

        ratios: dict[str, list[float]] = {k: [] for k in RATES}
        for r in range(args.rounds):
            for setting in RATES:
                if setting == "off":  # the control: both on off
                    a, b = run(("off", "off"))
                    ratios["off"].append(b / a)
                    continue
                if r % 2 == 0:
                    a, b = run(("off", setting))
                else:
                    b, a = run((setting, "off"))
                ratios[setting].append(b / a)
            say(
                f"{s.name} co-run round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k}: {v[-1]:.3f}x" for k, v in ratios.items())
                + " (off: the control)"
            )
    finally:
        for g in gws:
            g.stop()
        for group in groups:
            group.close()
    return {k: {"ratios": v, "ratio": float(np.median(v))} for k, v in ratios.items()}


def run_subject(s: Subject, args, pin: Pinning, tmp: Path, out: Path) -> dict:
    folder = tmp / s.name
    repo = build_repo(s, folder / "models")
    say(f"{s.name}: reference profile of {REFERENCE_ROWS:,} rows x {s.features} features (batchgate drift profile)")
    cfg = drift_config(s, folder, args.window, args.queue)
    files = traffic(s, folder)
    cmd = [*pin.server, *serve_command(str(repo), "--config", str(cfg))]
    gw = Server(f"gateway ({s.name})", cmd, BATCHGATE_READY, out / f"drift-{s.name}.log")
    rows: dict[str, list[dict]] = {k: [] for k in RATES}
    try:
        http, metrics = int(gw.match["http"]), int(gw.match["metrics"])
        det = find_detector(gw, metrics)
        if args.detector_core == "load" and pin.cores:
            os.sched_setaffinity(det["pid"], {int(pin.cores[1])})
            det = process_info(det["pid"])
        server = process_info(gw.proc.pid)
        say(
            f"{s.name}: server pid {server['pid']} (cores {server['cores_allowed']}), drift detector pid {det['pid']} "
            f"(its child: ppid {det['ppid']}; cores {det['cores_allowed']}, nice {det['nice']})"
        )
        ctx = Context(pin, s, gw, http, metrics, det["pid"], set(children(gw.proc.pid)), files, args.connections)
        say(f"{s.name}: warming up each copy for {args.warmup} s")
        for setting in RATES:
            wrk_pool(pin, http, served_name(s.name, setting), files, args.connections, args.warmup)
        drain(metrics, ctx.detector, True)
        for r in range(args.rounds):
            order = list(RATES) if r % 2 == 0 else list(reversed(RATES))
            got = {}
            for setting in order:
                row = got[setting] = phase(ctx, setting, args.seconds)
                rows[setting].append(row)
                n = row["samples"]
                say(
                    f"{s.name} round {r + 1}/{args.rounds}, {setting:>3}: {row['rps']:,.0f} req/s, "
                    f"p99 {row['p99_ms']:.1f} ms, server {row['server_us_per_request']:.0f} µs CPU a request; "
                    f"detector {row['detector_cpu_s'] / row['seconds']:.0%} of a core, {n['used']:.0f} samples used, "
                    f"{n['dropped']:.0f} dropped, {row['windows']:.0f} windows"
                    + (f"; other processes {row['other_cpu_cores']:.0%}" if row["other_cpu_cores"] > 0.05 else "")
                )
            off = got["off"]
            ratios = ", ".join(
                f"{k}: {got[k]['rps'] / off['rps']:.3f}x throughput, {got[k]['p99_ms'] / off['p99_ms']:.2f}x p99"
                for k in RATES
                if k != "off"
            )
            say(f"{s.name} round {r + 1}/{args.rounds}: {ratios}")
        det["last_core"] = process_info(det["pid"])["last_core"]
        end = scrape(metrics)
        cpu_total = {"proc": proc_cpu(det["pid"]), "metric": pick(end, "batchgate_drift_detector_cpu_seconds_total")}
    finally:
        gw.stop()
    names = [served_name(s.name, k) for k in RATES]
    n = DATAPLANE_REQUESTS[s.name] // (4 if args.quick else 1)
    pool = np.random.default_rng(5).standard_normal((512, s.features)).astype(np.float32)
    say(f"{s.name}: the data plane in process, the detector on another core, {args.dataplane_rounds} rounds of {n:,}")
    cpu: dict[str, list[float]] = {}
    apart = dataplane_rounds(repo, cfg, names, (s.input, pool), args.dataplane_rounds, n, cpu, detector_apart=True)
    say(f"{s.name}: the data plane in process, the detector on the same core, {args.dataplane_rounds} rounds")
    shared = dataplane_rounds(repo, cfg, names, (s.input, pool), args.dataplane_rounds, n)
    off_us, off_cpu, off_shared = (float(np.median(d[names[0]])) for d in (apart, cpu, shared))
    dataplane = {
        k: {
            "us": apart[m],
            "median_us": float(np.median(apart[m])),
            "ratio": off_us / float(np.median(apart[m])),
            "cpu_us": cpu[m],
            "cpu_median_us": float(np.median(cpu[m])),
            "cpu_extra_us": float(np.median(cpu[m])) - off_cpu,
            "shared_us": shared[m],
            "shared_ratio": off_shared / float(np.median(shared[m])),
        }
        for k, m in zip(RATES, names)
    }
    return {
        "model": s.about,
        "dataplane": dataplane,
        "features": s.features,
        "server": server,
        "detector": det,
        "detector_restarts": pick(end, "batchgate_drift_detector_restarts_total"),
        "detector_cpu_s_total": cpu_total,
        "settings": summarize(rows),
        "rounds": rows,
    }


def summarize(rows: dict[str, list[dict]]) -> dict:
    off = rows["off"]
    out = {}
    for setting, runs in rows.items():
        thr = [r["rps"] / o["rps"] for r, o in zip(runs, off)]
        p99 = [r["p99_ms"] / o["p99_ms"] for r, o in zip(runs, off)]
        secs = sum(r["seconds"] for r in runs)
        used, dropped, invalid = (sum(r["samples"][k] for r in runs) for k in ("used", "dropped", "invalid"))
        det_cpu = sum(r["detector_cpu_s"] for r in runs)
        lag = [(b, sum(r["lag_buckets"][i][1] for r in runs)) for i, (b, _) in enumerate(runs[0]["lag_buckets"])]
        entry = {
            "sample_rate": RATES[setting],
            "rps": float(np.median([r["rps"] for r in runs])),
            "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
            "p99_ms": float(np.median([r["p99_ms"] for r in runs])),
            "throughput_ratio": float(np.median(thr)),
            "throughput_ratio_per_round": thr,
            "p99_ratio": float(np.median(p99)),
            "p99_ratio_per_round": p99,
            "server_us_per_request": float(np.median([r["server_us_per_request"] for r in runs])),
            "detector_cores": det_cpu / secs,
            "detector_cpu_ms_per_1000_used": det_cpu / used * 1e6 if used else float("nan"),
            "detector_cpu_ms_per_1000_sampled": det_cpu / (used + dropped + invalid) * 1e6 if used else float("nan"),
            "samples": {"used": used, "dropped": dropped, "invalid": invalid},
            "drop_rate": dropped / (used + dropped) if used + dropped else float("nan"),
            "windows": sum(r["windows"] for r in runs),
            "lag_s": {"p50": quantile(lag, 0.5), "p99": quantile(lag, 0.99), "buckets": lag},
            "other_cpu_cores": float(np.median([r["other_cpu_cores"] for r in runs])),
        }
        if setting == "0.1":
            entry["target"] = {
                "throughput_ratio_min": TARGET,
                "result": "PASS" if entry["throughput_ratio"] >= TARGET else "FAIL",
            }
        out[setting] = entry
    return out


# ============================================================================ reporting


def lag_ms(lag: dict, q: str) -> str:
    """A lag estimate in ms; within the histogram's first bucket only its bound is known."""
    first = float(lag["buckets"][0][0]) if lag["buckets"] else 0.0
    return f"<={first * 1e3:.0f}" if lag[q] <= first else f"{lag[q] * 1e3:.0f}"


def print_summary(report: dict) -> None:
    cols = ("model", "drift", "req/s", "x off", "p99 ms", "x off", "srv µs/req", "detector", "ms/1k", "dropped")
    widths = (5, 5, 7, 6, 7, 6, 10, 8, 6, 7, 7, 14)
    print("\n" + " ".join(f"{c:>{w}}" for c, w in zip((*cols, "windows", "lag p50/p99 ms"), widths)) + "  target")
    for name, m in report["models"].items():
        for setting, e in m["settings"].items():
            cells = [name, setting, f"{e['rps']:,.0f}", f"{e['throughput_ratio']:.3f}", f"{e['p99_ms']:.1f}"]
            cells += [f"{e['p99_ratio']:.2f}", f"{e['server_us_per_request']:.0f}", f"{e['detector_cores']:.1%}"]
            if setting == "off":
                cells += ["-"] * 4
            else:
                lag = "/".join(lag_ms(e["lag_s"], q) for q in ("p50", "p99")) if e["windows"] else "-"
                cells += [
                    f"{e['detector_cpu_ms_per_1000_used']:.0f}",
                    f"{e['drop_rate']:.1%}",
                    f"{e['windows']:.0f}",
                    lag,
                ]
            target = e.get("target")
            verdict = f"  {target['result']} (>= {TARGET}x throughput)" if target else ""
            print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + verdict)
        dp = m["dataplane"]
        print(
            f"  {name}, data plane in process, detector apart: off {dp['off']['median_us']:.1f} µs a request "
            f"({dp['off']['cpu_median_us']:.1f} µs CPU); "
            + ", ".join(
                f"{k} {dp[k]['median_us']:.1f} µs ({dp[k]['ratio']:.3f}x; CPU {dp[k]['cpu_extra_us']:+.1f} µs)"
                for k in RATES
                if k != "off"
            )
        )
        print(
            f"  {name}, data plane in process, detector on the same core: "
            + ", ".join(f"{k} {dp[k]['shared_ratio']:.3f}x" for k in RATES if k != "off")
        )
        d, srv = m["detector"], m["server"]
        print(
            f"  {name}: the detector ran in its own process, pid {d['pid']}, a child of the server (pid {srv['pid']}); "
            f"cores {d['cores_allowed']} (the server's: {srv['cores_allowed']}), nice {d['nice']}, "
            f"restarts {m['detector_restarts']:.0f}"
        )
    print(
        "x off: median of the rounds' ratios to off; srv µs/req: the server process's CPU a request; detector: its "
        "CPU while loaded, share of a core; ms/1k: its CPU ms per 1,000 samples scored; dropped: of used + dropped"
    )


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    width = 0.36
    for j, setting in enumerate(("0.1", "1.0")):
        xs = np.arange(len(models)) + (j - 0.5) * width
        entries = [report["models"][m]["settings"][setting] for m in models]
        for ax, key in ((axes[0], "throughput_ratio"), (axes[1], "p99_ratio")):
            ax.bar(xs, [e[key] for e in entries], width, label=f"sample_rate {setting}")
            for x, e in zip(xs, entries):
                per = e[f"{key}_per_round"]
                ax.plot([x] * len(per), per, "k.", ms=4)
        axes[2].bar(xs, [e["detector_cores"] * 100 for e in entries], width, label=f"sample_rate {setting}")
        for x, e in zip(xs, entries):
            axes[2].text(
                x,
                e["detector_cores"] * 100,
                f"drop {e['drop_rate']:.0%}\nlag p99\n{lag_ms(e['lag_s'], 'p99')} ms",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    axes[0].axhline(TARGET, color="red", linestyle="--", label=f"target at 0.1: {TARGET}x")
    axes[0].set_title("throughput over drift off (dots: rounds)")
    axes[1].axhline(1.0, color="grey", linestyle=":")
    axes[1].set_title("p99 latency over drift off (dots: rounds)")
    axes[2].set_title("drift detector CPU while loaded (% of a core)")
    top = max(e["detector_cores"] for m in models for e in report["models"][m]["settings"].values())
    axes[2].set_ylim(0, max(10.0, top * 140))
    for ax in axes:
        ax.set_xticks(range(len(models)), [f"{m} ({report['models'][m]['features']} features)" for m in models])
        ax.legend(fontsize=8, loc="lower right" if ax is axes[0] else "upper left")
    lo = min(min(e["throughput_ratio_per_round"]) for m in models for e in report["models"][m]["settings"].values())
    axes[0].set_ylim(min(0.8, lo - 0.05), 1.1)
    meta = report["meta"]
    fig.suptitle(
        f"Drift monitoring's cost: closed-loop HTTP/JSON (wrk -c{meta['connections']}), {meta['rounds']} ABBA "
        f"rounds of {meta['seconds']} s; window {meta['window']} rows; {meta['pinning']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2-second phases: a smoke check (~1 minute)")
    ap.add_argument("--rounds", type=int, help="rounds of (off, 0.1, 1.0), the order reversed every other (6)")
    ap.add_argument("--seconds", type=int, help="seconds of load per phase (5)")
    ap.add_argument("--warmup", type=int, help="seconds of load per copy before the rounds (2)")
    ap.add_argument("--models", default="mlp,tiny", help="which of mlp, tiny (default both)")
    ap.add_argument("--window", type=int, default=500, help="rows in a drift window (500)")
    ap.add_argument("--dataplane-rounds", type=int, help="rounds of the in-process data-plane phase (10)")
    ap.add_argument(
        "--detector-core",
        choices=("load", "server"),
        default="load",
        help="where the detector process runs: the load tool's core (default) or the server's",
    )
    ap.add_argument("--queue", type=int, help="drift_queue_samples (default: the server's, 1024)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 when the 0.1 target is missed")
    ap.add_argument("--no-corun", action="store_true", help="skip the co-run phase")
    ap.add_argument("--corun-only", action="store_true", help="only the co-run phase")
    args = ap.parse_args(argv)
    for k, full, quick in (("rounds", 12, 2), ("seconds", 3, 2), ("warmup", 2, 1), ("dataplane_rounds", 10, 2)):
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in SUBJECTS]
    if unknown or not args.models:
        ap.error(f"--models: choose from {', '.join(SUBJECTS)}")
    if args.rounds < 1 or args.seconds < 1 or args.warmup < 1:
        ap.error("--rounds, --seconds and --warmup must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        say("wrk is missing: `make bench-tools` (apt-get install wrk)")
        return 1
    pin = choose_pinning(not args.no_pin)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say(f"pinning: {pin.note}; {args.rounds} round(s) of {args.seconds} s a setting, models {', '.join(args.models)}")
    report: dict = {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["bench/drift.py", *(sys.argv[1:] if argv is None else argv)]),
            "pinning": pin.note,
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "wrk": tool_version(["wrk", "-v"]),
            "rounds": args.rounds,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "window": args.window,
            "detector_core": args.detector_core,
            "drift_queue_samples": args.queue or "default",
            "load": "HTTP/JSON, closed loop, one row a request from a pool of 2,048 N(0, 1) rows",
        },
        "target": {"setting": "0.1", "throughput_ratio_min": TARGET},
        "models": {},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="batchgate-drift-") as d:
            for name in args.models:
                if args.corun_only:
                    report["models"][name] = {"corun": corun_subject(SUBJECTS[name], args, pin, Path(d), args.out)}
                    continue
                report["models"][name] = run_subject(SUBJECTS[name], args, pin, Path(d), args.out)
                if not args.no_corun:
                    report["models"][name]["corun"] = corun_subject(SUBJECTS[name], args, pin, Path(d), args.out)
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        say(f"INVALID: {e}")
        return 1
    report["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    for name, r in report["models"].items():
        if "corun" in r:
            c = r["corun"]
            say(
                f"{name} co-run throughput over off (medians): "
                + ", ".join(
                    f"{k} {v['ratio']:.3f}x ({min(v['ratios']):.3f}-{max(v['ratios']):.3f})" for k, v in c.items()
                )
                + "; off is the control (off beside off)"
            )
    if args.corun_only:
        (args.out / "drift-corun.json").write_text(json.dumps(finite(report), indent=1) + "\n")
        return 0
    (args.out / "drift.json").write_text(json.dumps(finite(report), indent=1) + "\n")
    try:
        plot(report, args.out / "drift.png")
    except Exception as e:  # a plot is a nicety; the JSON and the table are the result
        say(f"could not draw the plot: {e}")
    print_summary(report)
    say(f"wrote {args.out / 'drift.json'} and {args.out / 'drift.png'} in {report['meta']['wall_s']:g} s")
    missed = [m for m, r in report["models"].items() if r["settings"]["0.1"]["target"]["result"] != "PASS"]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
