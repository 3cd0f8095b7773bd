"""The two gRPC engines side by side: what an answer and a refusal cost each (``make bench-grpc-engines``).

One ``batchgate serve`` of the demo repository per engine and round (``--grpc-engine grpcio``,
then ``h2``; the order alternates by round), pinned to one core, h2load on the other. Each run
drives gRPC ModelInfer closed loop (``-c 8 -m 8``) in three ways:

- **answer**: the demo ``mlp`` (256 -> 16, no dynamic batching): a whole request;
- **refusal**: the same request naming a model that is not loaded: parsed, refused before any
  tensor is decoded (NOT_FOUND), counted and logged (one INFO line; an overload refusal is logged
  at DEBUG, so it costs a little less); the server runs without an access log;
- **ready**: ``ModelReady`` of the mlp: a tiny protobuf in and out, what the engine itself costs
  a call (a health probe's size);
- **shed**: the mlp request on a second server started with ``--max-inflight-requests 1`` (and
  no pausing of refused connections), so that most requests are refused for overload
  (RESOURCE_EXHAUSTED), the refusal issue 12's targets turn on. Its cost is solved from the
  server's CPU, its OK and refused counts and the answer's cost in the same round:
  (CPU - OK x answer) / refused.

Then the **forward** mode: a gateway with no models of its own serves the ``mlp`` of an upstream
batchgate (grpcio; on the load tool's core) as a remote model with ``batching=passthrough``, once
per combination of the gateway's engine and the remote model's client (``client=``): grpcio /
grpcio, h2 / grpcio, h2 / h2. What is measured is the gateway's own CPU per forwarded request.

Reported per engine and mode: requests per second and the server's CPU time per request (all its
threads, from /proc), medians over rounds, and h2 against grpcio per round. Every answer is
checked: h2load's success count must match, and the status must be the expected one (the
refusal mode reads the server's error counter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BATCHGATE_READY,
    BenchError,
    Server,
    choose_pinning,
    grpc_frame,
    h2load,
    http_call,
    say,
    serve_command,
)

ENGINES = ("grpcio", "h2")
MODES = ("answer", "refusal", "ready", "shed")
HERE = Path(__file__).resolve().parent


def frames(tmp: Path) -> dict[str, tuple[Path, str]]:
    from tritonclient.grpc import service_pb2 as pb

    def infer(model: str) -> bytes:
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="input", datatype="FP32", shape=[1, 256])
        req.raw_input_contents.append(np.ones((1, 256), np.float32).tobytes())
        return req.SerializeToString()

    out = {}
    for mode, (body, method) in {
        "answer": (infer("mlp"), "ModelInfer"),
        "refusal": (infer("no_such_model"), "ModelInfer"),
        "ready": (pb.ModelReadyRequest(name="mlp").SerializeToString(), "ModelReady"),
    }.items():
        path = tmp / f"{mode}.bin"
        path.write_bytes(grpc_frame(body))
        out[mode] = (path, method)
    return out


def drive(pin, port: int, frame: Path, method: str, seconds: float) -> dict:
    r = h2load(pin, port, frame, 8, 8, seconds, None, method=method)
    return {"done": r["done"], "ok": r["ok"], "rps": r["done"] / r["elapsed_s"], "elapsed": r["elapsed_s"]}


def counter(metrics_port: int, name: str, **labels: str) -> float:
    status, body = http_call(metrics_port, "GET", "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    if status != 200:
        raise BenchError(f"/metrics answered {status}")
    return total


def one_run(engine: str, repo: str, files, pin, seconds: float, tmp: Path, rnd: int) -> dict:
    cmd = serve_command(repo, "--grpc-engine", engine, "--access-log", "off")
    srv = Server(f"{engine} server", [*pin.server, *cmd], BATCHGATE_READY, tmp / f"{engine}-{rnd}.log")
    out: dict[str, dict] = {}
    try:
        port, metrics = int(srv.match.group("grpc")), int(srv.match.group("metrics"))
        for mode in MODES[:3]:
            frame, method = files[mode]
            drive(pin, port, frame, method, 1)  # warm-up
            refused0 = counter(metrics, "batchgate_request_errors_total", code="NOT_FOUND", protocol="grpc")
            cpu0 = srv.cpu_seconds()
            r = drive(pin, port, frame, method, seconds)
            cpu = srv.cpu_seconds() - cpu0
            if r["ok"] != r["done"]:
                raise BenchError(f"{engine} {mode}: {r['done'] - r['ok']} calls failed at the HTTP/2 level")
            if mode == "refusal":
                refused = (
                    counter(metrics, "batchgate_request_errors_total", code="NOT_FOUND", protocol="grpc") - refused0
                )
                if refused < r["done"]:
                    raise BenchError(f"{engine} refusal: {r['done']} calls, {refused:.0f} refusals counted")
            out[mode] = {"rps": r["rps"], "cpu_us": 1e6 * cpu / max(1, r["done"]), "done": r["done"]}
            say(f"  {engine:6s} {mode:7s} {r['rps']:8,.0f} req/s  {out[mode]['cpu_us']:6.0f} µs CPU a request")
    finally:
        srv.stop()
    out["shed"] = shed_run(engine, repo, files, pin, seconds, tmp, rnd, out["answer"]["cpu_us"])
    return out


def shed_run(engine: str, repo: str, files, pin, seconds: float, tmp: Path, rnd: int, answer_us: float) -> dict:
    """What an overload refusal costs (the ``shed`` mode of the module's docstring)."""
    cmd = serve_command(
        repo, "--grpc-engine", engine, "--access-log", "off", "--max-inflight-requests", "1",
        "--overload-refusals-per-s", "1000000", "--grpc-overload-refusals-per-s", "1000000",  # never held
    )  # fmt: skip
    srv = Server(f"{engine} shedding server", [*pin.server, *cmd], BATCHGATE_READY, tmp / f"{engine}-shed-{rnd}.log")
    try:
        port, metrics = int(srv.match.group("grpc")), int(srv.match.group("metrics"))
        frame, method = files["answer"]
        drive(pin, port, frame, method, 1)

        def counts() -> tuple[float, float]:
            ok = counter(metrics, "batchgate_requests_total", model="mlp", status="OK", protocol="grpc")
            no = counter(metrics, "batchgate_request_errors_total", code="RESOURCE_EXHAUSTED", protocol="grpc")
            return ok, no

        ok0, no0 = counts()
        cpu0 = srv.cpu_seconds()
        r = drive(pin, port, frame, method, seconds)
        cpu = srv.cpu_seconds() - cpu0
        ok1, no1 = counts()
        ok, refused = ok1 - ok0, no1 - no0
        if ok + refused < r["done"] or refused < 1000:
            raise BenchError(f"{engine} shed: {r['done']} calls, {ok:.0f} answered and {refused:.0f} refused")
        cpu_us = max(0.0, 1e6 * cpu - ok * answer_us) / refused
        say(f"  {engine:6s} shed    {refused / r['elapsed']:8,.0f} refusals/s ({refused / r['done']:.0%} refused)"
            f"  {cpu_us:6.0f} µs CPU a refusal")  # fmt: skip
        return {"rps": refused / r["elapsed"], "cpu_us": cpu_us, "done": r["done"], "refused": refused, "ok": ok}
    finally:
        srv.stop()


FORWARD = (("grpcio", "grpcio"), ("h2", "grpcio"), ("h2", "h2"))


def forward_run(engine: str, client: str, repo: str, files, pin, seconds: float, tmp: Path, rnd: int) -> dict:
    """The gateway's CPU per request it forwards to an upstream (see the module's docstring)."""
    up = Server("upstream", [*pin.load, *serve_command(repo)], BATCHGATE_READY, tmp / f"up-{engine}-{client}-{rnd}.log")
    try:
        spec = f"name=mlp upstreams=127.0.0.1:{up.match.group('grpc')} batching=passthrough client={client}"
        cmd = serve_command("", "--grpc-engine", engine, "--access-log", "off", "--remote-model", spec)
        cmd = [c for c in cmd if c not in ("--model-repository", "")]
        gw = Server("gateway", [*pin.server, *cmd], BATCHGATE_READY, tmp / f"gw-{engine}-{client}-{rnd}.log")
        try:
            port = int(gw.match.group("grpc"))
            frame, method = files["answer"]
            drive(pin, port, frame, method, 1)
            cpu0 = gw.cpu_seconds()
            r = drive(pin, port, frame, method, seconds)
            cpu = gw.cpu_seconds() - cpu0
            if r["ok"] != r["done"]:
                raise BenchError(f"forward {engine}/{client}: {r['done'] - r['ok']} calls failed")
            out = {"rps": r["rps"], "cpu_us": 1e6 * cpu / max(1, r["done"])}
            say(f"  forward {engine}/{client}: {r['rps']:,.0f} req/s, {out['cpu_us']:.0f} µs gateway CPU a request")
            return out
        finally:
            gw.stop()
    finally:
        up.stop()


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = np.arange(len(MODES))
    for i, engine in enumerate(ENGINES):
        med = report["medians"][engine]
        axes[0].bar(x + (i - 0.5) * 0.38, [med[m]["cpu_us"] for m in MODES], 0.38, label=engine)
        axes[1].bar(x + (i - 0.5) * 0.38, [med[m]["rps"] for m in MODES], 0.38, label=engine)
    for ax, title in zip(axes[:2], ("server CPU per request (µs)", "requests per second (one core)"), strict=True):
        ax.set_xticks(x, MODES)
        ax.set_title(title)
        ax.legend()
    fwd = report["forward"]
    axes[2].bar(list(fwd), [f["cpu_us"] for f in fwd.values()], color="tab:green")
    axes[2].set_title("gateway CPU per forwarded request (µs)\nengine / remote client")
    fig.suptitle(f"gRPC engines, medians of {report['rounds']} rounds ({report['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds of each mode")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    pin = choose_pinning(not args.no_pin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        repo = tmp / "repo"
        subprocess.run([sys.executable, "-m", "batchgate.cli", "demo-repo", str(repo)], check=True, capture_output=True)
        files = frames(tmp)
        say(f"{args.rounds} rounds x {len(ENGINES)} engines x {len(MODES)} modes; pinning: {pin.note}")
        runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
        forwards: dict[str, list[dict]] = {}
        for rnd in range(args.rounds):
            order = ENGINES if rnd % 2 == 0 else ENGINES[::-1]
            say(f"round {rnd + 1} of {args.rounds}")
            for engine in order:
                runs[engine].append(one_run(engine, str(repo), files, pin, args.seconds, tmp, rnd))
            for engine, client in FORWARD if rnd % 2 == 0 else FORWARD[::-1]:
                key = f"{engine}/{client}"
                forwards.setdefault(key, []).append(
                    forward_run(engine, client, str(repo), files, pin, args.seconds, tmp, rnd)
                )
    medians = {
        e: {m: {k: statistics.median(r[m][k] for r in runs[e]) for k in ("rps", "cpu_us")} for m in MODES}
        for e in ENGINES
    }
    ratios = {
        m: {
            "cpu": [round(runs["h2"][i][m]["cpu_us"] / runs["grpcio"][i][m]["cpu_us"], 3) for i in range(args.rounds)],
            "rps": [round(runs["h2"][i][m]["rps"] / runs["grpcio"][i][m]["rps"], 3) for i in range(args.rounds)],
        }
        for m in MODES
    }
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "pinning": pin.note,
        "runs": runs,
        "medians": medians,
        "h2_vs_grpcio": ratios,
        "forward": {
            k: {
                "rps": statistics.median(r["rps"] for r in v),
                "cpu_us": statistics.median(r["cpu_us"] for r in v),
                "cpu_vs_grpcio": [
                    round(r["cpu_us"] / forwards["grpcio/grpcio"][i]["cpu_us"], 3) for i, r in enumerate(v)
                ],
            }
            for k, v in forwards.items()
        },
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"grpc-engines-{stamp}.json").write_text(json.dumps(report, indent=1))
    plot(report, out / f"grpc-engines-{stamp}.png")
    print("\nmode    | engine | req/s (median) | CPU µs/request | h2/grpcio CPU per round | h2/grpcio req/s per round")
    for m in MODES:
        for e in ENGINES:
            r = medians[e][m]
            extra = f" | {ratios[m]['cpu']} | {ratios[m]['rps']}" if e == "h2" else " | |"
            print(f"{m:7s} | {e:6s} | {r['rps']:,.0f} | {r['cpu_us']:.0f}{extra}")
    print("\nforward (engine/client) | req/s (median) | gateway CPU µs/request | vs grpcio/grpcio per round")
    for k, f in report["forward"].items():
        print(f"{k} | {f['rps']:,.0f} | {f['cpu_us']:.0f} | {f['cpu_vs_grpcio']}")
    say(f"results: {out}/grpc-engines-{stamp}.json and .png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        say(f"FAILED: {e}")
        sys.exit(1)
