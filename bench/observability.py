"""What observability costs: throughput with the access log or tracing on, against off.

One model, the demo ``simple`` (two [1, 16] INT32 inputs added and subtracted: next to no model
time, so the gateway's own cost per request is all there is to measure: the worst case for any
per-request overhead), served by ``batchgate serve`` processes pinned to one core, driven by the load tool pinned to
the other, at the same closed-loop load.

Co-run mode (the default): in each round, every set-up runs beside the baseline, both servers on
the server core at once (each in its own session, so the kernel gives each half the core), each
driven by its own load tool over the same window (bench/common.corun): the ratio of their
throughputs compares their costs a request, and what slows this shared machine during the window
slows both alike. The baseline beside itself (``(control)``) measures the method's own error.
Sequential mode (``--mode sequential``): one set-up at a time, ratios between runs of a round.
Either way each server is started afresh per pair or run, every other round in reverse order (ABBA,
and in co-run mode the pair's order flips too). Set-ups (``--kind``):

    access (bench/observability.py)     off (the baseline) | access log sampled (the default) | all
    tracing (bench/tracing.py)          tracing off (the baseline; the access log at its default) |
                                        tracing at ratio 0.001 (the default) | at 1.0 (every request),
                                        exporting over OTLP/HTTP to a sink in this process

Load: gRPC with ``h2load`` (pre-framed requests, one per stream, C connections), then HTTP/JSON
with ``wrk`` (C connections). Reported per (protocol, setup): successful req/s (median of the
rounds), the ratio to the baseline (median of the rounds' ratios), p50 / p99, the
server's CPU per request and its ratio to the baseline (steadier than req/s on a noisy machine),
and the access log lines and spans exported. Then the per-request cost measured in-process. A run
counts only if the load tool saw no error and no non-2xx status; else the exit status is 1.

    python bench/observability.py            # ~8 minutes: 6 rounds of 6 s co-runs
    python bench/tracing.py                  # the same for tracing
    python bench/observability.py --quick    # ~1 minute smoke run

Writes bench/results/<kind>.json and .md (observability or tracing) and docs/bench-<kind>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (
    BATCHGATE_READY,
    Server,
    autogroup_note,
    choose_pinning,
    corun,
    cpu_model,
    finite,
    grpc_frame,
    grpc_infer_raw,
    h2load,
    say,
    serve_command,
    wrk,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "simple"


def payload() -> tuple[bytes, bytes]:
    """The gRPC ModelInferRequest bytes and the V2 JSON body of one request to ``simple``."""
    from tritonclient.grpc import service_pb2 as pb

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    req = pb.ModelInferRequest(model_name=MODEL)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        req.raw_input_contents.append(a.tobytes())  # as tritonclient sends tensors
        inputs.append({"name": name, "datatype": "INT32", "shape": [1, 16], "data": a.reshape(-1).tolist()})
    return req.SerializeToString(), json.dumps({"inputs": inputs}).encode()


def setups(tmp: Path, kind: str, sink: str) -> list[tuple[str, list[str]]]:
    if kind == "tracing":
        otlp = ["--tracing", "otlp", "--otlp-endpoint", sink, "--trace-sample-ratio"]
        return [
            ("tracing off", []),
            ("tracing 0.001", [*otlp, "0.001"]),
            ("tracing 1.0", [*otlp, "1.0", "--trace-max-per-s", "1000000"]),
        ]
    return [
        ("off", ["--access-log", "off"]),
        ("access log sampled", []),
        ("access log all", ["--access-log", "all", "--access-log-file", str(tmp / "access.log")]),
    ]


class Sink:
    """An OTLP/HTTP endpoint that takes every export and answers 200 (what a collector would)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self
        self.bytes = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's name
                sink.bytes += len(self.rfile.read(int(self.headers.get("content-length", "0"))))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def scrape(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()


def series(text: str, prefix: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def start(name: str, extra: list[str], repo: str, pin, frame: Path, tmp: Path, own_session: bool = False) -> Server:
    """One set-up's server, started and checked (the exact bytes h2load sends are answered)."""
    cmd = [*pin.server, *serve_command(repo, "--infer-threads", "1", *extra)]
    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    server = Server(name, cmd, BATCHGATE_READY, tmp / f"{slug}.log", own_session=own_session)
    try:
        grpc_infer_raw(int(server.match.group("grpc")), frame.read_bytes()[5:])
    except BaseException:
        server.stop()
        raise
    return server


def drive(server: Server, proto: str, args, pin, frame: Path, body: Path, tmp: Path) -> dict:
    """Load ``server`` over ``proto`` for a run; its figures (req/s, latency, CPU a request, the
    access log lines and spans it counted meanwhile)."""
    grpc_port, http_port, metrics_port = (int(server.match.group(k)) for k in ("grpc", "http", "metrics"))
    text0 = scrape(metrics_port)
    lines0 = series(text0, "batchgate_access_log_lines_total")
    spans0 = series(text0, 'batchgate_trace_spans_total{outcome="exported"}')
    cpu0 = server.cpu_seconds()
    if proto == "grpc":
        log = tmp / f"h2load-{server.proc.pid}.log"
        r = h2load(pin, grpc_port, frame, args.connections, 1, args.duration, log)
    else:
        r = wrk(pin, http_port, f"/v2/models/{MODEL}/infer", body, args.connections, args.duration)
    cpu1 = server.cpu_seconds()
    time.sleep(1.2)  # the span exporter sends about once a second
    text1 = scrape(metrics_port)
    lines = float(series(text1, "batchgate_access_log_lines_total") - lines0)
    spans = float(series(text1, 'batchgate_trace_spans_total{outcome="exported"}') - spans0)
    problems = []
    if r["errors"] or r["non_2xx"]:
        problems.append(f"load tool saw {r['errors']} errors and {r['non_2xx']} non-2xx")
    return {
        "req_s": r["ok"] / r["elapsed_s"],
        "p50_us": r["latency_us"]["p50"],
        "p99_us": r["latency_us"]["p99"],
        "server_cpu_us_per_req": (cpu1 - cpu0) / max(1, r["ok"]) * 1e6,
        "log_lines": lines,
        "spans": spans,
        "valid": not problems,
        "problems": problems,
    }


def shown(name: str, proto: str, m: dict, ratio: float | None = None) -> None:
    say(
        f"  {name:22s} {proto:4s} {m['req_s']:8.0f} req/s  p99 {m['p99_us'] / 1000:6.2f} ms"
        f"  {m['log_lines']:8.0f} log lines  {m['spans']:8.0f} spans"
        + ("" if ratio is None else f"  ratio {ratio:.3f}")
        + (f"  INVALID: {'; '.join(m['problems'])}" if m["problems"] else "")
    )


def measure(name: str, extra: list[str], repo: str, args, pin, frame: Path, body: Path, tmp: Path) -> dict:
    """One set-up, one round on its own (sequential mode): start, drive gRPC then HTTP, stop."""
    server = start(name, extra, repo, pin, frame, tmp)
    out: dict = {}
    try:
        for proto in ("grpc", "http"):
            out[proto] = drive(server, proto, args, pin, frame, body, tmp)
            shown(name, proto, out[proto])
        return out
    finally:
        server.stop()


def measure_pair(
    base: tuple[str, list[str]], other: tuple[str, list[str]], flip: bool, repo: str, args, pin, frame, body, tmp
) -> dict:
    """The baseline and one set-up co-run on the server core (common.corun), gRPC then HTTP: both
    figures and their ratios from the same window. ``flip``: start and drive the other first (a
    server's place in the pair must not favour it; rounds alternate)."""
    names = [f"{base[0]} (pair)", other[0]]
    plan = [(names[0], base[1]), (names[1], other[1])]
    if flip:
        plan.reverse()
    servers: dict[str, Server] = {}
    try:
        for name, extra in plan:
            servers[name] = start(name, extra, repo, pin, frame, tmp, own_session=True)
        out: dict = {}
        for proto in ("grpc", "http"):
            order = [n for n, _ in plan]
            got = dict(
                zip(
                    order,
                    corun([lambda n=n, p=proto: drive(servers[n], p, args, pin, frame, body, tmp) for n in order]),
                )
            )
            b, o = got[names[0]], got[names[1]]
            out[proto] = {
                **o,
                "base": b,
                "ratio": o["req_s"] / b["req_s"],
                "cpu_ratio": o["server_cpu_us_per_req"] / b["server_cpu_us_per_req"],
                "valid": o["valid"] and b["valid"],
            }
            shown(names[0], proto, b)
            shown(names[1], proto, o, out[proto]["ratio"])
        return out
    finally:
        for server in servers.values():
            server.stop()


def per_request_cost(kind: str, sink: str, n: int = 200_000) -> dict:
    return tracing_cost(sink, n // 4) if kind == "tracing" else access_cost(n)


def tracing_cost(sink: str, n: int) -> dict:
    """Microseconds tracing adds to a request, in this process: the decision for a request it does
    not trace (no context, ratio 0.001), and all the spans of one it does (the request's, the
    model's, the batch's compute span; queued for the exporter thread, whose work is not in it)."""
    from types import SimpleNamespace

    from batchgate.monitoring.access_log import Note
    from batchgate.monitoring.tracing import Tracing, batch_trace

    tracing = Tracing(sink, 0.001, "bench", queue_size=10**6, max_per_s=10**9)  # (no throttle here)
    start = time.perf_counter()
    t0 = time.perf_counter()
    for _ in range(n):
        tracing.begin("m", None, None, "grpc", start)
    untraced = (time.perf_counter() - t0) / n * 1e6
    tracing.policy.rate = 1
    m = n // 10
    t0 = time.perf_counter()
    for i in range(m):
        note = Note()
        note.model, note.request_id, note.version = "m", f"r{i}", "1"
        note.span = tracing.begin("m", None, None, "grpc", start)
        note.tracing = tracing
        request = SimpleNamespace(note=note, arrival=time.monotonic(), id=note.request_id)
        bt = batch_trace([request], "m", "1")
        now = time.perf_counter_ns()
        assert bt is not None
        bt.finish(now, now, now, now, 1)
        tracing.finish(note.span, note, "OK", "")
    traced = (time.perf_counter() - t0) / m * 1e6
    tracing.close()
    return {"untraced_us": untraced, "traced_us": traced, **contrib_asgi_cost()}


def contrib_asgi_cost(n: int = 20_000) -> dict:
    """What the OpenTelemetry contrib ASGI middleware (the usual way Python servers get traced) adds
    to an untraced request, in this process: a bare ASGI app against the same app wrapped, with a
    parent-based 0.001 ratio sampler. {} when opentelemetry-instrumentation-asgi is not installed."""
    import asyncio

    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    except ImportError:
        return {}
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.001)))
    wrapped = OpenTelemetryMiddleware(app, tracer_provider=provider)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v2/models/m/infer", "raw_path": b"/v2/models/m/infer", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"gw:8000"), (b"content-type", b"application/json"), (b"user-agent", b"bench")],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        pass

    async def run(handler) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await handler(dict(scope), receive, send)
        return (time.perf_counter() - t0) / n * 1e6

    bare = min(asyncio.run(run(app)) for _ in range(3))
    inst = min(asyncio.run(run(wrapped)) for _ in range(3))
    return {"contrib_asgi_us": inst - bare}


def access_cost(n: int = 200_000) -> dict:
    """Microseconds the access log adds to a request, in this process: the note a transport makes
    for every request plus the decision (sampled, the default: a request not logged), and the
    line built and queued for one that is (the writer thread's own share is not in it)."""
    from batchgate.monitoring.access_log import AccessLog, Note

    with tempfile.TemporaryDirectory() as d:
        sampled = AccessLog("sampled", 0.0, 1000.0, 10**9, os.path.join(d, "a.log"))
        every = AccessLog("all", 1.0, 1000.0, 10**9, os.path.join(d, "b.log"))

        def who():
            return "ipv4:127.0.0.1:40000", None

        def run(alog: AccessLog, count: int) -> float:
            t0 = time.perf_counter()
            for i in range(count):
                note = Note()
                note.model, note.request_id, note.version, note.queue_s, note.batch_rows = "m", f"r{i}", "1", 0.001, 4
                alog.request(note, "grpc", "m", "OK", "", who, path="inference.GRPCInferenceService/ModelInfer")
            return (time.perf_counter() - t0) / count * 1e6

        got = {
            "not_logged_us": min(run(sampled, n) for _ in range(3)),
            "logged_us": min(run(every, n // 10) for _ in range(3)),
        }
        every.close()
        sampled.close()
    return got


def summarize(rounds: list[dict[str, dict]], names: list[str], corun_mode: bool = False) -> dict:
    """Medians over the rounds. Sequential mode: ratios against the first set-up's run in the same
    round. Co-run mode: each set-up carries its own ratio against the baseline it ran beside."""
    summary: dict = {}
    for proto in ("grpc", "http"):
        for name in names:
            runs = [r[name][proto] for r in rounds]
            med = {k: statistics.median(x[k] for x in runs) for k in runs[0] if isinstance(runs[0][k], float)}
            if corun_mode:
                med["ratios"] = [x["ratio"] for x in runs]
                med["cpu_ratios"] = [x["cpu_ratio"] for x in runs]
                med["base_req_s"] = statistics.median(x["base"]["req_s"] for x in runs)
            else:
                base = [r[names[0]][proto] for r in rounds]
                med["ratios"] = [x["req_s"] / b["req_s"] for x, b in zip(runs, base)]
                med["cpu_ratios"] = [
                    x["server_cpu_us_per_req"] / b["server_cpu_us_per_req"] for x, b in zip(runs, base)
                ]
            med["ratio"] = statistics.median(med["ratios"])
            med["cpu_ratio"] = statistics.median(med["cpu_ratios"])
            med["valid"] = all(x["valid"] for x in runs)
            summary.setdefault(proto, {})[name] = med
    return summary


def markdown(summary: dict, names: list[str], args, pin_note: str) -> str:
    how = (
        f"co-run: each set-up beside the baseline on the server core over the same window ({autogroup_note()}); "
        f"ratio = its req/s over the baseline's in that window; `{names[0]}` is the baseline beside itself "
        "(the method's own error)"
        if args.mode == "corun"
        else f"one set-up at a time; ratio = req/s over {names[0]} in the same round"
    )
    lines = [
        f"{'Tracing' if args.kind == 'tracing' else 'Access log'} cost, {args.rounds} rounds of {args.duration:g} s, "
        f"{args.connections} connections, model {MODEL}, {os.cpu_count()} cores ({cpu_model()}), {pin_note}; "
        f"medians; {how}",
        "",
        "| protocol | setup | req/s | ratio | ratios by round | p50 ms | p99 ms | server CPU µs/req | CPU ratio "
        "| log lines | spans |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for proto in ("grpc", "http"):
        for name in names:
            m = summary[proto][name]
            lines.append(
                f"| {proto} | {name} | {m['req_s']:.0f} | {m['ratio']:.3f} | "
                f"{', '.join(f'{x:.3f}' for x in m['ratios'])} | {m['p50_us'] / 1000:.2f} | "
                f"{m['p99_us'] / 1000:.2f} | {m['server_cpu_us_per_req']:.0f} | {m['cpu_ratio']:.3f} | "
                f"{m['log_lines']:.0f} | {m['spans']:.0f} |" + ("" if m["valid"] else " INVALID")
            )
    c = summary["per_request"]
    if args.kind == "tracing":
        lines += [
            "",
            f"In-process, tracing at its default costs {c['untraced_us']:.2f} µs for a request it does not trace "
            f"and {c['traced_us']:.1f} µs for one it does (its three spans made and queued). Against the server "
            f"CPU per request of `{names[0]}` above, a ratio of 0.001 comes to:",
            "",
        ]
        for proto in ("grpc", "http"):
            base = summary[proto][names[0]]["server_cpu_us_per_req"]
            extra = c["untraced_us"] * 0.999 + c["traced_us"] * 0.001
            lines.append(f"- {proto}: {extra:.2f} µs of {base:.0f} µs, an implied ratio of {base / (base + extra):.4f}")
        if "contrib_asgi_us" in c:
            base = summary["http"][names[0]]["server_cpu_us_per_req"]
            lines += [
                "",
                f"The OpenTelemetry contrib ASGI middleware (opentelemetry-instrumentation-asgi), the usual way a "
                f"Python HTTP server is traced, adds {c['contrib_asgi_us']:.1f} µs to an untraced request in this "
                f"process (same 0.001 ratio): against the HTTP server CPU per request above, an implied ratio of "
                f"{base / (base + c['contrib_asgi_us']):.3f}. batchgate decides in its own transports instead.",
            ]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"In-process, the access log at its default costs {c['not_logged_us']:.2f} µs for a request it does not log "
        f"and {c['logged_us']:.1f} µs for one it logs (line built and queued). Against the server CPU per request "
        "of `off` above, the default (1% of quick requests logged) comes to:",
        "",
    ]
    for proto in ("grpc", "http"):
        base = summary[proto][names[0]]["server_cpu_us_per_req"]
        extra = c["not_logged_us"] * 0.99 + c["logged_us"] * 0.01
        lines.append(f"- {proto}: {extra:.2f} µs of {base:.0f} µs, an implied ratio of {base / (base + extra):.4f}")
    return "\n".join(lines) + "\n"


def plot(summary: dict, names: list[str], path: Path, subtitle: str) -> None:
    try:
        import matplotlib
    except ImportError:
        say("no matplotlib: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(names))
    for ax, proto in zip(axes, ("grpc", "http")):
        vals = [summary[proto][n]["ratio"] for n in names]
        bars = ax.bar(x, vals, color=["#888"] + ["#3b7dd8"] * (len(names) - 1))
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
        ax.axhline(0.97, color="#c33", lw=1, ls="--", label="target 0.97x")
        ax.set_ylim(0, max(1.1, max(vals) * 1.1))
        ax.set_xticks(x, names, rotation=15)
        ax.set_title(f"{proto}: req/s over off (median of rounds)")
        ax.legend(loc="lower right")
    fig.suptitle(f"batchgate {subtitle}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=6, help="an even number balances the ABBA order")
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s runs")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server and the load tool to cores")
    ap.add_argument("--kind", choices=("access", "tracing"), default="access", help="what to measure")
    ap.add_argument(
        "--mode",
        choices=("corun", "sequential"),
        default="corun",
        help="corun (default): each set-up beside the baseline on one core at once; sequential: one at a time",
    )
    ap.add_argument("--out", default=str(RESULTS), help="where <kind>.json and .md go")
    ap.add_argument("--plot", default="", help="the plot (docs/bench-observability.png, docs/bench-tracing.png)")
    args = ap.parse_args(argv)
    stem = "tracing" if args.kind == "tracing" else "observability"
    args.stem = stem
    args.plot = args.plot or str(HERE.parent / "docs" / f"bench-{stem}.png")
    if args.quick:
        args.rounds, args.duration = 2 if args.mode == "corun" else 1, 3.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    pin = choose_pinning(not args.no_pin)
    from batchgate.demo import build_demo_repository

    with tempfile.TemporaryDirectory(prefix="bench-observability-") as d:
        tmp = Path(d)
        repo = build_demo_repository(str(tmp / "models"))
        grpc_bytes, json_bytes = payload()
        frame, body = tmp / "frame.bin", tmp / "body.json"
        frame.write_bytes(grpc_frame(grpc_bytes))
        body.write_bytes(json_bytes)
        sink = Sink()
        plan = setups(tmp, args.kind, sink.endpoint)
        base = plan[0]
        if args.mode == "corun":  # the baseline beside itself first: the method's own error
            plan = [(f"{base[0]} (control)", base[1]), *plan[1:]]
        names = [n for n, _ in plan]
        rounds = []
        t0 = time.monotonic()
        total = args.rounds * len(plan)
        for i in range(args.rounds):
            result = {}
            # ABBA: every other round runs the set-ups in reverse, so a run's place in its round (the
            # machine warming up or slowing down) weighs on each set-up alike; in co-run mode the
            # pair's order flips too
            order = plan if i % 2 == 0 else plan[::-1]
            for j, (name, extra) in enumerate(order):
                done = i * len(plan) + j
                eta = "" if not done else f", about {(time.monotonic() - t0) / done * (total - done):.0f} s left"
                say(f"round {i + 1}/{args.rounds}: {name} ({done + 1}/{total}{eta})")
                if args.mode == "corun":
                    result[name] = measure_pair(base, (name, extra), i % 2 == 1, repo, args, pin, frame, body, tmp)
                else:
                    result[name] = measure(name, extra, repo, args, pin, frame, body, tmp)
            rounds.append(result)
    summary = summarize(rounds, names, args.mode == "corun")
    say("the access log's own cost per request, in-process")
    summary["per_request"] = per_request_cost(args.kind, sink.endpoint)
    sink.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(
        json.dumps(finite({"args": vars(args), "rounds": rounds, "summary": summary}), indent=1)
    )
    text = markdown(summary, names, args, pin.note)
    (out / f"{args.stem}.md").write_text(text)
    print(text)
    what = "tracing cost" if args.kind == "tracing" else "access log cost"
    plot(summary, names, Path(args.plot), f"{what}: {os.cpu_count()} cores, {args.connections} connections, {MODEL}")
    valid = all(summary[p][n]["valid"] for p in ("grpc", "http") for n in names)
    if not valid:
        say("some runs were INVALID (see the table)")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
