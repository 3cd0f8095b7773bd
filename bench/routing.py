"""Routing: what a route costs, what a shadow costs its primary, and a rollout over time
(``make bench-routing``, about 9 minutes).

One gateway (pinned to one core; the load on the other) serves the model ``base`` (the demo mlp)
directly and through routes; a second batchgate process (the "remote" upstream, on the load's
core under SCHED_IDLE, so it stands for another machine without delaying the load tool) serves
the same model as a remote shadow. Phases:

1. corun (route overhead): two gateways with the same models and routes on the gateway core at
   once (each in its own session: half the core each; common.corun), each driven by its own
   closed-loop gRPC load (h2load -c 8 -m 8), one to ``base``, the other to the route ``plain``
   (one variant: ``base``), over the same 4-second window; which gateway takes the route flips
   every round, and a control run (both to ``base``) beside each measures the method's error.
   OK answers per second from each server's counters; the median of the rounds' ratios. Target:
   route / direct >= 0.95. (``overhead``, not in the default phases: the older way, one gateway,
   ``--pairs`` pairs of 2-second runs one after the other in ABBA order, which this machine's
   minute-to-minute swings drown.) Then (1b) the same without any transport: a gateway in this
   process, requests handed to its data plane, alternating rounds of 10,000 (the route's own cost,
   free of the load tool's noise).
2. remote shadow: the capacity of the route ``remote_shadowed`` (``base`` plus a shadow on the
   remote upstream at 100%), then open-loop gRPC at 50% of it, one client alternating between
   ``plain`` and ``remote_shadowed`` second by second (shuffled); the primary's p99 with the
   shadow over without. Target <= 1.25. The p99 is taken per second and the median of those is
   compared (the p99 pooled over a round is reported too: on this shared VM a stall now and then
   takes one second's p99 to tens of milliseconds, whichever route it falls on). Also how many
   copies one upstream call carried (``routing.shadow_gather_ms``; ``--shadow-gather-ms`` sets it,
   0 to see the cost without gathering).
3. local shadow of equal cost (another mlp of the same size, ``canary_good``, on its own session
   and thread; a shadow of the answering model itself gets no copies): the same, and the share of
   copies dropped at its budget.
4. rollouts (interval 5 s, min_requests 300, 800 requests/s): a canary of equal cost ramps
   10 -> 25 -> 50 -> 100% and is promoted; a canary several times slower fails the p99 gate
   (max_p99_ratio 1.5 here: with 400 canary answers an interval at the 10% step, this VM's stalls
   move a p99 by more than 25%) and is rolled back. Weights and gate figures are sampled from the admin API and plotted.

Figures are ratios within one run (medians of the rounds); the JSON and the plot go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from common import BATCHGATE_READY, BenchError, Server, choose_pinning, corun, dataplane_rounds, grpc_frame, say

HERE = Path(__file__).resolve().parent
SERVE = [sys.executable, "-m", "batchgate.cli", "serve", "--host", "127.0.0.1"]
FREE = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
ADMIN_READY = re.compile(r"admin HTTP on \S+?:(\d+)")
_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.M)


def build_repo(root: Path) -> Path:
    from batchgate.demo import _save, mlp_model

    cfg = "max_batch_size: 64\ninstance_group [ { count: 1 kind: KIND_CPU } ]\n"
    _save(mlp_model(), str(root), "base", config=cfg)
    _save(mlp_model(seed=1), str(root), "canary_good", config=cfg)
    _save(mlp_model(sizes=(256, 2048, 2048, 16), seed=2), str(root), "canary_slow", config=cfg)
    return root


def request(model: str) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    msg = pb.ModelInferRequest(model_name=model)
    msg.inputs.add(name="input", datatype="FP32", shape=[1, 256])
    msg.raw_input_contents.append(np.linspace(-1, 1, 256, dtype="<f4").tobytes())
    return msg.SerializeToString()


def scrape(port: int) -> list[tuple[str, dict, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [(n, dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(v)) for n, labels, v in _SAMPLE.findall(text)]


def total(port: int, name: str, **labels) -> float:
    return sum(v for n, lab, v in scrape(port) if n == name and all(lab.get(k) == x for k, x in labels.items()))


def ok_answers(port: int) -> float:
    return total(port, "batchgate_requests_total", model="base", status="OK")


def h2load_closed(pin, port: int, model: str, seconds: float, data_dir: Path) -> None:
    data = data_dir / f"{model}.bin"
    if not data.exists():
        data.write_bytes(grpc_frame(request(model)))
    cmd = [*pin.load, "h2load", "-t", "1", "-c", "8", "-m", "8", "-D", f"{int(seconds)}s", "-d", str(data)]
    cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    cmd.append(f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0:
        raise BenchError(f"h2load failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")


def closed_rate(pin, gw: Server, model: str, seconds: float, data_dir: Path) -> float:
    """OK answers per second of ``base`` (directly or as a route's variant) in a closed loop."""
    before, t0 = ok_answers(gw.metrics_port), time.monotonic()
    h2load_closed(pin, gw.grpc_port, model, seconds, data_dir)
    return (ok_answers(gw.metrics_port) - before) / (time.monotonic() - t0)


def open_loop(pin, port: int, models: tuple[str, ...], rate: float, seconds: float, slice_s: float = 1.0) -> dict:
    """Open-loop gRPC at ``rate`` a second through grpc.aio (a child process on the load core; h2load's
    --rps does not hold its rate), to each of ``models`` in turn for ``slice_s`` at a time so that
    every model meets the machine's noisy moments alike, ``seconds`` each in all. Per model: the
    latencies of the OK answers, the failures. The first second warms the channel up."""
    code = f"""
import asyncio, gc, json, random, sys, time
import grpc
gc.disable()  # a collection in the client would show as server latency
payloads = [bytes.fromhex(h) for h in sys.argv[1:]]
async def main():
    lat = [[] for _ in payloads]
    bad = [0 for _ in payloads]
    async with grpc.aio.insecure_channel("127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        async def one(k, kept, slot):
            t0 = time.perf_counter()
            try:
                await call(payloads[k], timeout=30)
                if kept:
                    lat[k].append((slot, time.perf_counter() - t0))
            except grpc.aio.AioRpcError:
                bad[k] += kept
        # which model each slice goes to: every model equally often, in a shuffled order, so
        # that nothing periodic on the machine falls on one model's slices more than another's
        n = len(payloads)
        slots = [k for _ in range(int({seconds} / {slice_s}) + 1) for k in range(n)]
        random.Random(7).shuffle(slots)
        tasks, start, i = set(), time.perf_counter(), 0
        end = 1 + {seconds} * n
        while (now := time.perf_counter() - start) < end:
            slot = int(max(0.0, now - 1) / {slice_s})
            k = slots[slot]
            t = asyncio.ensure_future(one(k, now >= 1, slot))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            i += 1
            await asyncio.sleep(max(0.0, start + i / {rate} - time.perf_counter()))
        sent = i / (time.perf_counter() - start)
        await asyncio.gather(*tasks)
    print(json.dumps({{"lat": lat, "bad": bad, "sent_per_s": sent}}))
asyncio.run(main())
"""
    cmd = [*pin.load, sys.executable, "-c", code, *(request(m).hex() for m in models)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * len(models) + 120)
    if p.returncode != 0:
        raise BenchError(f"the open-loop client failed:\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout)
    result = {}
    for k, m in enumerate(models):
        pairs = np.array(out["lat"][k])
        ms = pairs[:, 1] * 1e3
        # the p99 of each slice, and their median: robust to the machine's stalls, which take
        # a slice's p99 to tens of milliseconds now and then, whichever model it carried
        per_slice = [np.percentile(ms[pairs[:, 0] == s], 99) for s in np.unique(pairs[:, 0])]
        result[m] = {
            "p99_ms": float(np.percentile(ms, 99)),
            "slice_p99_ms": float(np.median(per_slice)),
            "p50_ms": float(np.median(ms)),
            "ok": int(ms.size),
            "failed": out["bad"][k],
            "sent_per_s": out["sent_per_s"],
        }
    return result


class Gateway(Server):
    def __init__(self, pin, repo: Path, config: Path, log: Path, name: str = "gateway", own_session: bool = False):
        cmd = [*pin.server, *SERVE, "--model-repository", str(repo), "--config", str(config), *FREE]
        cmd += ["--admin-port", "-1", "--admin-http-port", "0", "--allow-open-admin", "true"]
        super().__init__(name, cmd, BATCHGATE_READY, log, own_session=own_session)
        self.grpc_port, self.metrics_port = int(self.match["grpc"]), int(self.match["metrics"])
        m = ADMIN_READY.search(log.read_text())
        self.admin_port = int(m.group(1)) if m else None


def corun_phase(pin, repo: Path, out: Path, rounds: int, seconds: float, data_dir: Path) -> dict:
    """Route / direct by co-running two gateways (see the module's docstring, phase 1)."""
    cfg = data_dir / "corun.yaml"
    cfg.write_text(
        yaml.safe_dump({"routes": [{"name": "plain", "variants": [{"name": "main", "model": "base", "weight": 100}]}]})
    )
    for model in ("base", "plain"):
        (data_dir / f"{model}.bin").write_bytes(grpc_frame(request(model)))
    gws = [Gateway(pin, repo, cfg, out / f"routing-corun-{i}.log", f"gateway {i}", own_session=True) for i in (0, 1)]
    ratios, controls, rates = [], [], []
    try:
        for i in range(rounds):
            for what in ("control", "route") if i % 2 == 0 else ("route", "control"):
                models = ("base", "base") if what == "control" else ("plain", "base") if i % 2 else ("base", "plain")
                got = corun([lambda g=g, m=m: closed_rate(pin, g, m, seconds, data_dir) for g, m in zip(gws, models)])
                if what == "control":
                    controls.append(got[1] / got[0])
                else:
                    routed, direct = (got[0], got[1]) if models[0] == "plain" else (got[1], got[0])
                    ratios.append(routed / direct)
                    rates.append({"route_per_s": routed, "direct_per_s": direct})
            say(f"  round {i + 1}/{rounds}: route / direct {ratios[-1]:.3f}, control {controls[-1]:.3f}")
    finally:
        for g in gws:
            g.stop()
    return {
        "ratio_per_round": ratios,
        "ratio": float(np.median(ratios)),
        "control_per_round": controls,
        "control": float(np.median(controls)),
        "rates": rates,
    }


def shadow_rounds(
    pin,
    gw: Server,
    shadowed: str,
    rounds: int,
    seconds: float,
    data_dir: Path,
    upstream_metrics: int | None = None,
    rate: float | None = None,
) -> dict:
    """Capacity of ``shadowed``, then p99 at half of it: the plain route against the shadowed one
    (each round one client alternating between them second by second). With ``upstream_metrics``
    (a remote shadow's upstream), also how many copies one upstream call carried."""
    cap = closed_rate(pin, gw, shadowed, seconds, data_dir)
    rate = rate or cap / 2
    say(f"  {shadowed}: capacity {cap:.0f}/s; open loop at {rate:.0f}/s")
    rows = []
    before = {o: total(gw.metrics_port, "batchgate_shadow_requests_total", route=shadowed, outcome=o) for o in OUTCOMES}
    calls_before = ok_answers(upstream_metrics) if upstream_metrics else 0.0
    for i in range(rounds):
        got = open_loop(pin, gw.grpc_port, ("plain", shadowed), rate, seconds)
        rows.append(got)
        p, s = got["plain"]["slice_p99_ms"], got[shadowed]["slice_p99_ms"]
        pooled = got[shadowed]["p99_ms"] / got["plain"]["p99_ms"]
        say(f"  round {i + 1}: p99 plain {p:.2f} ms, with shadow {s:.2f} ms ({s / p:.2f}x; pooled {pooled:.2f}x)")
    after = {o: total(gw.metrics_port, "batchgate_shadow_requests_total", route=shadowed, outcome=o) for o in OUTCOMES}
    copies = {o: after[o] - before[o] for o in OUTCOMES}
    calls = ok_answers(upstream_metrics) - calls_before if upstream_metrics else 0.0
    if calls:
        say(f"  {copies['compared']:.0f} copies compared in {calls:.0f} upstream calls")
    ratios = [r[shadowed]["slice_p99_ms"] / r["plain"]["slice_p99_ms"] for r in rows]
    pooled = [r[shadowed]["p99_ms"] / r["plain"]["p99_ms"] for r in rows]
    return {
        "pooled_p99_ratio_per_round": pooled,
        "capacity_per_s": cap,
        "rate_per_s": rate,
        "rounds": rows,
        "p99_ratio_per_round": ratios,
        "p99_ratio": float(np.median(ratios)),
        "copies": copies,
        "drop_rate": copies["dropped"] / max(1.0, sum(copies.values())),
        **({"copies_per_upstream_call": (copies["compared"] + copies["failed"]) / calls} if calls else {}),
    }


OUTCOMES = ("compared", "answered", "dropped", "failed")


def rollout_run(pin, repo: Path, out: Path, canary: str, rate: float, seconds: float) -> list[dict]:
    """A rollout of ``canary`` against ``base`` under open-loop load; GetRoute sampled 4x a second."""
    cfg = out / f"rollout-{canary}.yaml"
    route = {
        "name": "ramp",
        "variants": [{"name": "stable", "model": "base", "weight": 100}, {"name": "canary", "model": canary}],
        "rollout": {
            "canary": "canary",
            "baseline": "stable",
            "steps": [10, 25, 50, 100],
            "interval_s": 5,
            "min_requests": 300,
            # 1.5, not the example's 1.25: a 10% step is 400 canary answers an interval here, whose
            # p99 (the 4th slowest) a VM stall moves by more than 25%; the 4x slower canary fails it
            "gates": {"max_error_rate": 0.01, "max_p99_ratio": 1.5},
        },
    }
    cfg.write_text(yaml.safe_dump({"routes": [route]}))
    gw = Gateway(pin, repo, cfg, out / f"rollout-{canary}.log", f"rollout {canary}")
    samples: list[dict] = []
    try:
        load = subprocess.Popen(  # the load, in the background, while the admin API is sampled
            [sys.executable, __file__, "--_load", str(gw.grpc_port), str(rate), str(seconds)],
            stdout=subprocess.DEVNULL,
        )
        t0 = time.monotonic()
        while load.poll() is None:
            with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/admin/v1/routes/ramp", timeout=5) as r:
                doc = json.loads(r.read())
            doc["t"] = time.monotonic() - t0
            samples.append(doc)
            if doc["rollout"]["state"] in ("promoted", "rolled_back") and doc["t"] > 1:
                load.terminate()
                load.wait()
                break
            time.sleep(0.25)
    finally:
        gw.stop()
    last = samples[-1]["rollout"]
    say(f"  canary {canary}: {last['state']} after {samples[-1]['t']:.1f} s ({last['last']})")
    return samples


def background_load(port: int, rate: float, seconds: float) -> None:
    import grpc

    payload = request("ramp")

    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")

            async def one():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call(payload, timeout=30)

            tasks, start, i = set(), time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                t = asyncio.ensure_future(one())
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))

    asyncio.run(main())


def dataplane_phase(repo: Path, cfg: Path, rounds: int, n: int = 10_000) -> dict:
    """The route's own cost without any transport: one in-process gateway, requests handed to
    its data plane (admit, infer, release) to ``base`` and to ``plain``, in alternating rounds of
    ``n``; microseconds a request, median of the rounds. Pinned like the gateway when possible."""
    x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
    got = dataplane_rounds(repo, cfg, ["base", "plain"], ("input", x), rounds, n)
    direct, route = float(np.median(got["base"])), float(np.median(got["plain"]))
    return {"direct_us": got["base"], "route_us": got["plain"], "ratio": direct / route}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["rollouts"]
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 6), sharex="col", squeeze=False)
    for col, (name, samples) in enumerate(runs.items()):
        t = [s["t"] for s in samples]
        top, bottom = axes[0][col], axes[1][col]
        for variant in ("stable", "canary"):
            top.step(t, [s["weights"].get(variant, 0) for s in samples], where="post", label=variant)
        top.set_title(f"canary {name}: {samples[-1]['rollout']['state'].replace('_', ' ')}")
        top.set_ylabel("weight")
        top.legend(loc="center right")
        ratio = []
        for s in samples:
            w = s["window"]
            c, b = w.get("canary", {}).get("p99_s"), w.get("stable", {}).get("p99_s")
            ratio.append(c / b if c and b else np.nan)
        bottom.plot(t, ratio, ".", label="canary p99 / stable p99 (current interval)")
        bottom.axhline(1.5, color="red", linestyle="--", label="gate max_p99_ratio 1.5")
        bottom.set_xlabel("seconds")
        bottom.set_ylabel("p99 ratio")
        bottom.legend(loc="upper right", fontsize=8)
    fig.suptitle("Rollouts driven by batchgate's gates (interval 5 s, steps 10/25/50/100, 800 requests/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8, help="seconds per model in each shadow round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the shadow phases")
    ap.add_argument(
        "--shadow-gather-ms", type=float, help="the gateway's routing.shadow_gather_ms (default: the server's)"
    )
    ap.add_argument("--rate", type=float, help="open-loop rate of the shadow phases (default: half the capacity)")
    ap.add_argument("--pairs", type=int, default=20, help="pairs of 2-second runs of the overhead phase")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--corun-rounds", type=int, default=12, help="rounds of the co-run overhead phase")
    ap.add_argument("--phases", default="corun,dataplane,remote,local,rollout", help="also: overhead")
    ap.add_argument("--_load", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._load:
        background_load(int(args._load[0]), float(args._load[1]), float(args._load[2]))
        return 0
    pin = choose_pinning(not args.no_pin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = set(args.phases.split(","))
    report: dict = {
        "pinning": pin.note,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "shadow_gather_ms": args.shadow_gather_ms,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        repo = build_repo(tmp_path / "models")
        say(f"pinning: {pin.note}")
        # The remote shadow's upstream: on the load's core (two cores: nowhere else) under SCHED_IDLE
        # (below nice 19), as it stands for another machine and must not delay the client that measures.
        upstream = Server(
            "upstream",
            [
                "chrt",
                "--idle",
                "0",
                *(pin.upstream or pin.load),
                *SERVE,
                "--model-repository",
                str(repo),
                *FREE,
                "--admin-port",
                "-1",
                "--admin-http-port",
                "-1",
            ],
            BATCHGATE_READY,
            out / "routing-upstream.log",
        )
        try:
            if "corun" in phases:
                say("phase 1: route overhead, co-run (closed loop, gRPC)")
                report["corun"] = corun_phase(pin, repo, out, args.corun_rounds, 4, tmp_path)
            cfg = tmp_path / "gateway.yaml"
            one = [{"name": "main", "model": "base", "weight": 100}]
            compare = {"output": "output", "kind": "regression", "atol": 1e-4}
            shadow = {"percent": 100, "max_inflight": 64}
            cfg.write_text(
                yaml.safe_dump(
                    {
                        "remote_models": [
                            f"name=base_remote upstreams=127.0.0.1:{upstream.match['grpc']} "
                            "upstream_model=base batching=passthrough"
                        ],
                        "routes": [
                            {"name": "plain", "variants": one},
                            {
                                "name": "remote_shadowed",
                                "variants": one,
                                "shadows": [{"name": "remote", "model": "base_remote", **shadow}],
                                "compare": compare,
                            },
                            {
                                "name": "local_shadowed",
                                "variants": one,
                                "shadows": [
                                    {"name": "local", "model": "canary_good", "percent": 100, "max_inflight": 8}
                                ],
                                "compare": compare,
                            },
                        ],
                    }
                )
            )
            if args.shadow_gather_ms is not None:
                cfg.write_text(cfg.read_text() + f"routing:\n  shadow_gather_ms: {args.shadow_gather_ms}\n")
            gw = Gateway(pin, repo, cfg, out / "routing-gateway.log")
            try:
                if "overhead" in phases:
                    say("phase 1: route overhead (closed loop, gRPC)")
                    # Short runs in pairs, the order flipped every other pair (ABBA): the machine's
                    # speed drifts by more than the overhead within seconds, so each ratio compares
                    # two neighbouring runs.
                    direct, routed = [], []
                    for i in range(args.pairs):
                        order = ("base", "plain") if i % 2 == 0 else ("plain", "base")
                        got = {m: closed_rate(pin, gw, m, 2, tmp_path) for m in order}
                        direct.append(got["base"])
                        routed.append(got["plain"])
                        say(f"  pair {i + 1}: direct {direct[-1]:.0f}/s, route {routed[-1]:.0f}/s")
                    ratios = [r / d for d, r in zip(direct, routed)]
                    report["overhead"] = {
                        "direct_per_s": direct,
                        "route_per_s": routed,
                        "ratio_per_round": ratios,
                        "ratio": float(np.median(ratios)),
                    }
                if "dataplane" in phases:
                    say("phase 1b: the route's own cost through the data plane, in process")
                    report["dataplane"] = dataplane_phase(repo, cfg, 2 * args.rounds)
                if "remote" in phases:
                    say("phase 2: remote shadow at 100%")
                    report["remote_shadow"] = shadow_rounds(
                        pin,
                        gw,
                        "remote_shadowed",
                        args.rounds,
                        args.seconds,
                        tmp_path,
                        int(upstream.match["metrics"]),
                        args.rate,
                    )
                if "local" in phases:
                    say("phase 3: local shadow of equal cost at 100%")
                    report["local_shadow"] = shadow_rounds(
                        pin, gw, "local_shadowed", args.rounds, args.seconds, tmp_path, rate=args.rate
                    )
            finally:
                gw.stop()
        finally:
            upstream.stop()
        if "rollout" in phases:
            say("phase 4: rollouts (a good canary, a slow one)")
            report["rollouts"] = {
                name: rollout_run(pin, repo, out, model, 800, 60)
                for name, model in (("of equal cost", "canary_good"), ("4x slower", "canary_slow"))
            }
    (out / "routing.json").write_text(json.dumps(report, indent=1))
    if "rollouts" in report:
        plot(report, out / "routing.png")
    print_summary(report)
    return 0


def print_summary(report: dict) -> None:
    rows = []
    if "corun" in report:
        c = report["corun"]
        rows.append(("route / direct throughput, co-run", f"{c['ratio']:.3f}", ">= 0.95"))
        rows.append(("  control (direct / direct), co-run", f"{c['control']:.3f}", "-"))
    if "overhead" in report:
        o = report["overhead"]
        rows.append(("route / direct throughput", f"{o['ratio']:.3f}", ">= 0.95"))
    if "dataplane" in report:
        rows.append(("route / direct, data plane in process", f"{report['dataplane']['ratio']:.3f}", "-"))
    for key, what in (("remote_shadow", "remote shadow"), ("local_shadow", "local shadow (equal cost)")):
        if key in report:
            r = report[key]
            rows.append(
                (f"primary p99, {what} / none", f"{r['p99_ratio']:.3f}", "<= 1.25" if key == "remote_shadow" else "-")
            )
            rows.append((f"{what}: copies dropped", f"{r['drop_rate']:.3f}", "-"))
    for name, samples in report.get("rollouts", {}).items():
        rows.append((f"rollout, canary {name}", samples[-1]["rollout"]["state"], ""))
    print(f"\n{'figure':<44} {'value':>12} {'target':>8}")
    for r in rows:
        print(f"{r[0]:<44} {r[1]:>12} {r[2]:>8}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
