"""Draw the chart's Grafana dashboard without Grafana: run real gateways under a changing load,
scrape /metrics every second, evaluate every panel's queries over the recording
(tools/promql_lite.py) and plot the panels with matplotlib.

    python tools/dashboard_preview.py                # ~80 s; writes docs/dashboard.png
    python tools/dashboard_preview.py --seconds 30

The set-up: one gateway serving a route ``fraud`` (stable 90 / canary 10, a rollout under way, a
shadow compared on every request), a remote model on a second gateway, and a drift monitor on the
stable model. The load: a steady stream, a burst in the middle, the inputs shifted in the last
third (drift), a canary pinned to failing inputs now and then (errors), the upstream gateway
stopped for a while (its health panel). Also writes the recording (``--recording FILE``, JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

import dashboard  # noqa: E402
from promql_lite import Evaluator, Recording  # noqa: E402

TARGET = {"job": "batchgate", "namespace": "serving", "service": "rel-batchgate", "instance": "10.0.0.7:8002"}


def say(msg: str) -> None:
    print(f"[preview {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup(tmp: Path):
    import yaml

    from batchgate.remote_models import RemoteModel
    from gateway_support import start_gateway
    from route_support import route_repository

    repo = route_repository(str(tmp / "models"))
    rng = np.random.default_rng(0)
    train = rng.random((4000, 4), dtype=np.float32) * 0.5
    np.savez(tmp / "train.npz", features=train)
    done = subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "drift", "profile", "--model", "clf_a", "--input", "features",
         "--data", str(tmp / "train.npz"), "--model-repository", repo, "--out", str(tmp / "profile.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"drift profile failed: {done.stderr}")
    cfg = {
        "routes": [
            {
                "name": "fraud",
                "variants": [
                    {"name": "stable", "model": "clf_a", "weight": 90},
                    {"name": "canary", "model": "clf_bad", "weight": 10},
                ],
                "shadows": [{"name": "next", "model": "clf_other", "percent": 100, "max_inflight": 8}],
                "compare": {"output": "probabilities", "kind": "classification", "atol": 1.0e-3},
                "rollout": {"canary": "canary", "baseline": "stable", "steps": [10, 50], "interval_s": 3600,
                            "min_requests": 10**6, "gates": {"max_error_rate": 0.9}, "on_fail": "pause"},
            }
        ],
        "drift": [
            {"model": "clf_a", "inputs": ["features"], "reference": str(tmp / "profile.json"), "sample_rate": 1.0,
             "window": {"samples": 400, "max_s": 5, "min_samples": 50}, "debounce_windows": 1}
        ],
    }  # fmt: skip
    (tmp / "batchgate.yaml").write_text(yaml.safe_dump(cfg))
    upstream = start_gateway(repo, metrics_port=-1)
    remote = RemoteModel("remote_clf", (upstream.grpc_url,), upstream_model="clf_a", probe_interval_s=0.2, eject_s=1)
    gw = start_gateway(repo, config_file=str(tmp / "batchgate.yaml"), remote_models=(remote,), latency_slo_ms=250)
    return gw, upstream, repo


def drive(gw, upstream, seconds: float, stop: threading.Event) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(gw.grpc_url)
    rng = np.random.default_rng(1)
    t0 = time.monotonic()
    upstream_down = False
    while not stop.is_set():
        t = time.monotonic() - t0
        if t > seconds:
            return
        burst = 0.4 * seconds < t < 0.55 * seconds
        shift = 0.35 if t > 0.66 * seconds else 0.0
        if not upstream_down and 0.25 * seconds < t < 0.35 * seconds:
            upstream.stop(0.5)
            upstream_down = True
        for _ in range(4 if burst else 1):
            x = (rng.random((1 + int(rng.integers(0, 4)), 4), dtype=np.float32) * 0.5 + shift).astype(np.float32)
            for model, headers in (("fraud", None), ("clf_a", None), ("remote_clf", None)):
                inp = grpcclient.InferInput("features", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                with contextlib.suppress(Exception):  # errors are part of the picture
                    client.infer(model, [inp], headers=headers)
            if rng.random() < 0.05:
                inp = grpcclient.InferInput("features", [1, 4], "FP32")
                inp.set_data_from_numpy(np.ones((1, 4), np.float32))
                with contextlib.suppress(Exception):
                    client.infer("fraud", [inp], headers={"x-batchgate-variant": "canary"})
        time.sleep(0.01 if burst else 0.03)


def record(gw, seconds: float) -> Recording:
    rec = Recording()
    stop = threading.Event()
    worker = threading.Thread(target=drive, args=(gw, gw.upstream, seconds, stop), daemon=True)
    worker.start()
    t0 = time.time()
    while time.time() - t0 < seconds + 2:
        text = urllib.request.urlopen(gw.metrics_url, timeout=10).read().decode()
        rec.add(time.time() - t0, [(TARGET, text)])
        if len(rec.times) % 10 == 0:
            say(f"{len(rec.times)} scrapes, {time.time() - t0:.0f} of {seconds:.0f} s")
        time.sleep(1.0)
    stop.set()
    worker.join(10)
    return rec


def plot(rec: Recording, out: Path, window: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = Evaluator(rec)
    panels = [p for row in dashboard.ROWS for p in row.panels]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.9 * rows))
    variables = {"job": ".*", "model": ".*", "__rate_interval": window}
    start = next(i for i, t in enumerate(rec.times) if t >= rec.times[0] + 5)
    ts = rec.times[start:]
    for ax, p in zip(axes.flat, panels):
        ax.set_title(f"{p.title}", fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        if p.kind == "heatmap":
            expr = p.targets[0][0]
            les, grid = None, []
            for i in range(start, len(rec.times)):
                got = ev.instant(expr, i, variables)
                by_le = {dict(k).get("le"): v for k, v in got.items()}
                les = les or sorted(by_le, key=lambda x: math.inf if x == "+Inf" else float(x))
                cum = [by_le.get(le, 0.0) for le in les]
                grid.append([b - a for a, b in zip([0.0, *cum[:-1]], cum)])
            if les:
                ax.imshow(np.array(grid).T, aspect="auto", origin="lower", cmap="Blues",
                          extent=(ts[0], ts[-1], 0, len(les)))  # fmt: skip
                ax.set_yticks(np.arange(len(les)) + 0.5, les, fontsize=6)
                ax.set_ylabel("rows ≤ le", fontsize=7)
            continue
        for expr, legend in p.targets:
            series: dict = {}
            for i in range(start, len(rec.times)):
                got = ev.instant(expr, i, variables)
                if isinstance(got, float):
                    got = {frozenset(): got}
                for k, v in got.items():
                    series.setdefault(k, {})[rec.times[i]] = v
            for k, pts in sorted(series.items(), key=lambda kv: sorted(kv[0])):
                labels = dict(k)
                name = legend
                for key, val in labels.items():
                    name = name.replace("{{" + key + "}}", val)
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], lw=1.2, label=name[:40])
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2, frameon=False)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#999", transform=ax.transAxes)
        ax.set_ylabel(p.unit, fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        "batchgate dashboard (helm/batchgate/dashboards/batchgate.json), every panel's queries evaluated over a "
        f"recorded run of real gateways, {len(rec.times)} scrapes, seconds on the x axis",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=75.0)
    ap.add_argument("--window", default="10s", help="$__rate_interval for the plot (the run is short)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    ap.add_argument("--recording", default="", help="also write the recording here (JSON)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dash-preview-") as d:
        say("starting two gateways (a route with canary, shadow and rollout; a remote model; a drift monitor)")
        gw, upstream, _ = setup(Path(d))
        gw.upstream = upstream
        try:
            say(f"driving and scraping for {args.seconds:.0f} s")
            rec = record(gw, args.seconds)
        finally:
            gw.stop()
            upstream.stop()
    if args.recording:
        Path(args.recording).write_text(
            json.dumps({"times": rec.times, "samples": [[[sorted(k), v] for k, v in s.items()] for s in rec.samples]})
        )
    say("evaluating the panels and drawing")
    plot(rec, Path(args.out), args.window)
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
