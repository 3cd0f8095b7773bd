"""Worker processes benchmark: one process against several sharing the ports (``--workers``).

The demo repository's ``mlp_batched`` (256 -> 16 MLP, dynamic batching, max 64 rows, 2 ms queue
delay) served three ways, each started afresh per round, driven at the same closed-loop load:

    1 worker             ``batchgate serve`` as one process (the baseline)
    N replicate          ``--workers N``: N processes, each with its own copy of the model and its
                         own batcher (the kernel spreads connections over them: SO_REUSEPORT)
    N front              ``--workers N --workers-mode front``: N processes take the protocols and
                         forward to one model-owning process, which batches everything

Load: gRPC with ``h2load`` (pre-framed [1, 256] FP32 requests, one per stream, C connections) and
HTTP/JSON with ``wrk`` (C connections), one after the other. The load tool runs on the same cores
(nothing is pinned: N workers need the cores); its own CPU share is reported beside the figures,
as is every other process's CPU that is not ours. On a 2-core machine the load tool takes a large
part of one core, so 2 workers cannot double 1; the ratio says what this machine gives.

Reported per (protocol, setup): successful req/s (median of the rounds), p50 and p99, the ratio to
the 1-worker baseline of the same round, the mean rows per model execution (from the server's
own batch-size histogram), the server's CPU per request (supervisor and every child) and the load
tool's share of the machine. After the rounds, the resident memory (RSS) of each process of each
setup is read from /proc, loaded and warm.

A run counts only if the load tool saw no error and no non-2xx status, and the server counted at
least the successes the tool reports and no more than those plus the requests cut off when the tool
stopped (gRPC errors arrive as HTTP 200, hence the count); else the exit status is 1.

    python bench/workers.py                         # ~4 minutes: 3 rounds of 8 s runs, N = 2
    python bench/workers.py --quick                 # ~40 s smoke run
    python bench/workers.py --workers 1,2,4,8 --connections 256   # a larger machine (bench/workers_kit.py)

Writes bench/results/workers.json, bench/results/workers.md and docs/bench-workers.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (
    Pinning,
    Server,
    cpu_model,
    finite,
    foreign_cpu_seconds,
    grpc_frame,
    grpc_infer_raw,
    h2load,
    say,
    serve_command,
    wrk,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "mlp_batched"
WIDTH = 256
NO_PIN = Pinning([], [], "off: the workers need every core")
# The ready line with a metrics port: the supervisor's (a worker's own line says "metrics on off").
READY = re.compile(r"HTTP on \S+?:(?P<http>\d+), gRPC on \S+?:(?P<grpc>\d+), metrics on \S+?:(?P<metrics>\d+)")


def payload() -> tuple[bytes, bytes]:
    """The gRPC ModelInferRequest bytes and the V2 JSON body of one [1, 256] FP32 row."""
    from tritonclient.grpc import service_pb2 as pb

    row = np.linspace(-1, 1, WIDTH, dtype=np.float32)
    req = pb.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="input", datatype="FP32", shape=[1, WIDTH])
    t.contents.fp32_contents.extend(row.tolist())
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, WIDTH], "data": row.tolist()}]})
    return req.SerializeToString(), body.encode()


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_of(pids: list[int]) -> float:
    tck, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tck
        except OSError:
            pass
    return total


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    return int(m.group(1)) / 1024 if m else 0.0


def scrape(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()


def series_sum(text: str, prefix: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def successes(text: str) -> float:
    return series_sum(text, f'batchgate_requests_total{{model="{MODEL}",protocol=')  # every protocol, OK or not


def ok_count(text: str) -> float:
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith(f'batchgate_requests_total{{model="{MODEL}"') and 'status="OK"' in ln
    )


def batch_rows(text: str) -> tuple[float, float]:
    """(executions, rows) from the batch-size histogram."""
    return (
        series_sum(text, f'batchgate_batch_size_count{{model="{MODEL}"'),
        series_sum(text, f'batchgate_batch_size_sum{{model="{MODEL}"'),
    )


def setups(counts: list[int]) -> list[tuple[str, list[str]]]:
    out = [("1 worker", [])]
    for n in counts:
        if n > 1:
            out.append((f"{n} replicate", ["--workers", str(n)]))
            out.append((f"{n} front", ["--workers", str(n), "--workers-mode", "front"]))
    return out


def measure(name: str, extra: list[str], repo: str, args, frame: Path, body: Path, tmp: Path) -> dict:
    """One setup, one round: start, check, drive gRPC then HTTP, read its figures, stop."""
    server = Server(name, serve_command(repo, *extra), READY, tmp / f"{name.replace(' ', '_')}.log")
    try:
        grpc_port, http_port, metrics_port = (int(server.match.group(k)) for k in ("grpc", "http", "metrics"))
        grpc_infer_raw(grpc_port, frame.read_bytes()[5:])  # the exact bytes h2load sends answer
        pids = tree_pids(server.proc.pid)
        out: dict = {"rss_mib": {str(p): rss_mib(p) for p in pids}}
        for proto in ("grpc", "http"):
            before_text = scrape(metrics_port)
            before = (ok_count(before_text), successes(before_text), *batch_rows(before_text))
            cpu0, foreign0 = cpu_of(tree_pids(server.proc.pid)), foreign_cpu_seconds()
            if proto == "grpc":
                r = h2load(
                    NO_PIN, grpc_port, frame, args.connections, 1, args.duration, tmp / "h2load.log", args.tool_threads
                )
            else:
                path = f"/v2/models/{MODEL}/infer"
                r = wrk(NO_PIN, http_port, path, body, args.connections, args.duration, args.tool_threads)
            cpu1, foreign1 = cpu_of(tree_pids(server.proc.pid)), foreign_cpu_seconds()
            after_text = scrape(metrics_port)
            ok = ok_count(after_text) - before[0]
            counted = successes(after_text) - before[1]
            execs, rows = (a - b for a, b in zip(batch_rows(after_text), before[2:]))
            problems = []
            if r["errors"] or r["non_2xx"]:
                problems.append(f"load tool saw {r['errors']} errors and {r['non_2xx']} non-2xx")
            if ok < r["ok"] or counted > r["ok"] + r.get("cut_off", args.connections):
                problems.append(f"server counted {ok:.0f} OK / {counted:.0f} in all, the tool {r['ok']}")
            foreign = sum(foreign1.get(p, 0) - foreign0.get(p, 0) for p in foreign1)
            out[proto] = {
                "req_s": r["ok"] / r["elapsed_s"],
                "p50_us": r["latency_us"]["p50"],
                "p99_us": r["latency_us"]["p99"],
                "rows_per_execution": rows / execs if execs else 0.0,
                "server_cpu_us_per_req": (cpu1 - cpu0) / max(1, r["ok"]) * 1e6,
                "tool_cpu_share": r["tool_cpu_s"] / r["elapsed_s"] / (os.cpu_count() or 1),
                "foreign_cpu_s": foreign,
                "valid": not problems,
                "problems": problems,
            }
            say(
                f"  {name:12s} {proto:4s} {out[proto]['req_s']:8.0f} req/s  p99 {out[proto]['p99_us'] / 1000:6.2f} ms  "
                f"rows/exec {out[proto]['rows_per_execution']:5.1f}  load tool {out[proto]['tool_cpu_share']:.0%} "
                f"of the machine" + (f"  INVALID: {'; '.join(problems)}" if problems else "")
            )
        out["rss_mib"] = {str(p): rss_mib(p) for p in tree_pids(server.proc.pid)}
        return out
    finally:
        server.stop()


def summarize(rounds: list[dict[str, dict]], names: list[str]) -> dict:
    summary: dict = {}
    for proto in ("grpc", "http"):
        base = [r["1 worker"][proto]["req_s"] for r in rounds]
        for name in names:
            runs = [r[name][proto] for r in rounds]
            med = {k: statistics.median(x[k] for x in runs) for k in runs[0] if isinstance(runs[0][k], float)}
            med["ratio"] = statistics.median(x["req_s"] / b for x, b in zip(runs, base))
            med["ratios"] = [x["req_s"] / b for x, b in zip(runs, base)]
            med["valid"] = all(x["valid"] for x in runs)
            summary.setdefault(proto, {})[name] = med
    memory = {}
    for name in names:
        rss = sorted(rounds[-1][name]["rss_mib"].values(), reverse=True)
        memory[name] = {"processes": len(rss), "total_mib": sum(rss), "each_mib": rss}
    summary["memory"] = memory
    return summary


def markdown(summary: dict, names: list[str], args) -> str:
    lines = [
        f"Worker processes, {args.rounds} rounds of {args.duration:g} s, {args.connections} connections, "
        f"model {MODEL}, {os.cpu_count()} cores ({cpu_model()}); medians; "
        "ratio = req/s over 1 worker in the same round",
        "",
        "| protocol | setup | req/s | ratio | p50 ms | p99 ms | rows/exec | server CPU µs/req | load tool share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for proto in ("grpc", "http"):
        for name in names:
            m = summary[proto][name]
            lines.append(
                f"| {proto} | {name} | {m['req_s']:.0f} | {m['ratio']:.2f} | {m['p50_us'] / 1000:.2f} | "
                f"{m['p99_us'] / 1000:.2f} | {m['rows_per_execution']:.1f} | {m['server_cpu_us_per_req']:.0f} | "
                f"{m['tool_cpu_share']:.0%} |" + ("" if m["valid"] else " INVALID")
            )
    lines += ["", "| setup | processes | RSS in all (MiB) | RSS each (MiB) |", "|---|---:|---:|---|"]
    for name in names:
        mem = summary["memory"][name]
        each = ", ".join(f"{x:.0f}" for x in mem["each_mib"])
        lines.append(f"| {name} | {mem['processes']} | {mem['total_mib']:.0f} | {each} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, names: list[str], path: Path, subtitle: str) -> None:
    try:
        import matplotlib
    except ImportError:
        say("no matplotlib: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    x = np.arange(len(names))
    for i, proto in enumerate(("grpc", "http")):
        ax = axes[i]
        vals = [summary[proto][n]["req_s"] for n in names]
        bars = ax.bar(x, vals, color=["#888"] + ["#3b7dd8", "#e08a2c"] * len(names))
        for b, n in zip(bars, names):
            ax.annotate(f"{summary[proto][n]['ratio']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=9)  # fmt: skip
        ax.set_xticks(x, names, rotation=20)
        ax.set_title(f"{proto}: successful req/s (median)")
    ax = axes[2]
    w = 0.38
    for j, proto in enumerate(("grpc", "http")):
        ax.bar(x + (j - 0.5) * w, [summary[proto][n]["rows_per_execution"] for n in names], w, label=proto)
    ax.set_xticks(x, names, rotation=20)
    ax.set_title("mean rows per model execution")
    ax.legend()
    fig.suptitle(f"batchgate worker processes: {subtitle}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="2", help="worker counts besides 1, comma-separated (default 2)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s runs")
    ap.add_argument(
        "--tool-threads", type=int, default=0, help="h2load / wrk threads; 0 = 1, or cores/4 on 8 cores or more"
    )
    ap.add_argument("--out", default=str(RESULTS), help="where workers.json and workers.md go")
    ap.add_argument("--plot", default=str(HERE.parent / "docs" / "bench-workers.png"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 3.0
    if not args.tool_threads:
        cores = os.cpu_count() or 1
        args.tool_threads = 1 if cores < 8 else cores // 4
    args.connections = max(args.connections, args.tool_threads)  # each tool thread needs a connection
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    counts = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    names = [n for n, _ in setups(counts)]
    from batchgate.demo import build_demo_repository

    with tempfile.TemporaryDirectory(prefix="bench-workers-") as d:
        tmp = Path(d)
        repo = build_demo_repository(str(tmp / "models"))
        grpc_bytes, json_bytes = payload()
        frame, body = tmp / "frame.bin", tmp / "body.json"
        frame.write_bytes(grpc_frame(grpc_bytes))
        body.write_bytes(json_bytes)
        rounds = []
        t0 = time.monotonic()
        total = args.rounds * len(names)
        for i in range(args.rounds):
            result = {}
            for j, (name, extra) in enumerate(setups(counts)):
                done = i * len(names) + j
                eta = "" if not done else f", about {(time.monotonic() - t0) / done * (total - done):.0f} s left"
                say(f"round {i + 1}/{args.rounds}: {name} ({done + 1}/{total}{eta})")
                result[name] = measure(name, extra, repo, args, frame, body, tmp)
            rounds.append(result)
    summary = summarize(rounds, names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "workers.json").write_text(
        json.dumps(finite({"args": vars(args), "rounds": rounds, "summary": summary}), indent=1)
    )
    text = markdown(summary, names, args)
    (out / "workers.md").write_text(text)
    print(text)
    plot(summary, names, Path(args.plot), f"{os.cpu_count()} cores, {args.connections} connections, {MODEL}")
    valid = all(summary[p][n]["valid"] for p in ("grpc", "http") for n in names)
    if not valid:
        say("some runs were INVALID (see the table)")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
