"""Batch scoring benchmark: `batchgate score` against a plain pipeline on the same data, same run.

    plain        pyarrow reads the Parquet file in chunks -> ONNX Runtime -> pyarrow writes Parquet
                 parts (the least a script does; same chunk size, same session options: one
                 intra-op thread per core)
    local        batchgate score --model-repository (the same model loaded by batchgate)
    server       batchgate score --target (gRPC) through a local `batchgate serve`

The model is the demo `mlp` (256 -> 1024 -> 1024 -> 16, max_batch_size 64, so batchgate sends
64-row requests and its batcher runs them); the input a Parquet file of N rows of 256 FP32
features (a fixed-size list column) and an id column kept through. Each is run as a fresh
subprocess per round; reported: rows/s (median of the rounds), the ratio to plain in the same
round, and the peak RSS of the scoring process (`ru_maxrss` of the child) beside the input's size
on disk, for two input sizes, so that flat memory shows as equal peaks for files of different size.

A run counts only if every row came out: the parts hold N rows and the ids in order.

    python bench/score.py                 # ~3 minutes
    python bench/score.py --quick         # ~40 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WIDTH = 256

PLAIN = r"""
import sys, os, numpy as np, pyarrow as pa, pyarrow.parquet as pq, onnxruntime as ort
src, model, out, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
so = ort.SessionOptions(); so.intra_op_num_threads = len(os.sched_getaffinity(0))
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
os.makedirs(out, exist_ok=True)
for i, b in enumerate(pq.ParquetFile(src).iter_batches(batch_size=rows)):
    feats = b.column("features")
    x = feats.values.to_numpy(zero_copy_only=False).reshape(len(b), -1).astype(np.float32)
    y = sess.run(None, {"input": x})[0]
    col = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), y.shape[1])
    pq.write_table(pa.table({"id": b.column("id"), "output": col}), f"{out}/part-{i:05d}.parquet", compression="zstd")
"""


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_input(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, rows, 50_000):
        n = min(50_000, rows - start)
        x = rng.standard_normal((n, WIDTH), dtype=np.float32)
        t = pa.table(
            {
                "id": np.arange(start, start + n),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), WIDTH),
            }
        )
        writer = writer or pq.ParquetWriter(path, t.schema)
        writer.write_table(t)
    assert writer is not None
    writer.close()


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` under a tiny wrapper that reports its own child's peak RSS."""
    wrapper = (
        "import resource, subprocess, sys, time;"
        "t=time.perf_counter(); r=subprocess.run(sys.argv[1:]);"
        "w=time.perf_counter()-t;"
        "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024); sys.exit(r.returncode)"
    )
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed:\n{p.stderr[-2000:]}")
    wall, rss = p.stdout.strip().splitlines()[-1].split()
    return float(wall), float(rss)


def check(out: Path, rows: int, column: str = "id") -> None:
    parts = sorted(out.glob("part-*.parquet"))
    ids = np.concatenate([pq.read_table(p, columns=[column]).column(column).to_numpy() for p in parts])
    if len(ids) != rows or not np.array_equal(ids, np.arange(rows)):
        raise SystemExit(f"{out}: {len(ids)} rows out of {rows}, or out of order")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=400_000, help="rows of the larger input (the smaller: a quarter)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--huge-rows",
        type=int,
        default=1_200_000,
        help="rows of a file larger than the memory scoring it takes (local, once)",
    )
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.rounds, args.huge_rows = 100_000, 1, 0
    from batchgate.demo import build_demo_repository

    bg = [sys.executable, "-m", "batchgate.cli"]
    results: dict = {"rounds": [], "rss": {}}
    with tempfile.TemporaryDirectory(prefix="bench-score-") as d:
        tmp = Path(d)
        repo = build_demo_repository(str(tmp / "models"))
        model = os.path.join(repo, "mlp", "1", "model.onnx")
        sizes = {"small": args.rows // 4, "large": args.rows}
        inputs = {}
        for label, n in sizes.items():
            inputs[label] = tmp / f"{label}.parquet"
            say(f"writing the {label} input: {n:,} rows")
            make_input(inputs[label], n)
        server = subprocess.Popen(
            [*bg, "serve", "--model-repository", repo, "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
             "--metrics-port", "-1", "--admin-port", "-1", "--admin-http-port", "-1"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        grpc_port = None
        for line in server.stderr:  # the ready line names the ports
            if "gRPC on" in line:
                grpc_port = int(line.split("gRPC on ")[1].split(",")[0].rsplit(":", 1)[1])
                break
        assert grpc_port is not None
        try:
            common = ["--model", "mlp", "--input", "{src}", "--output", "{out}", "--keep", "id",
                      "--columns", "input=features", "--batch-size", str(args.batch_size), "--quiet"]  # fmt: skip
            ways = {
                "plain": [sys.executable, "-c", PLAIN, "{src}", model, "{out}", str(args.batch_size)],
                "local": [*bg, "score", "--model-repository", repo, *common],
                "server": [*bg, "score", "--target", f"127.0.0.1:{grpc_port}", *common],
            }
            total = args.rounds * len(ways) * len(sizes)
            done = 0
            for r in range(args.rounds):
                row: dict = {}
                for label, src in inputs.items():
                    for way, cmd in ways.items():
                        out = tmp / f"out-{way}-{label}-{r}"
                        done += 1
                        say(f"round {r + 1}/{args.rounds}: {way} on the {label} input ({done}/{total})")
                        argv2 = [c.replace("{src}", str(src)).replace("{out}", str(out)) for c in cmd]
                        wall, rss = peak_rss(argv2)
                        check(out, sizes[label])
                        row[f"{way}/{label}"] = {"rows_s": sizes[label] / wall, "rss_mib": rss}
                results["rounds"].append(row)
        finally:
            server.terminate()
            server.wait(30)
        file_mib = {label: p.stat().st_size / 2**20 for label, p in inputs.items()}
        huge: dict = {}
        if args.huge_rows:
            src = tmp / "huge.parquet"
            say(f"writing a file of {args.huge_rows:,} rows, then scoring it once (local): memory against file size")
            make_input(src, args.huge_rows)
            for f in inputs.values():
                f.unlink()  # (disk)
            argv2 = [c.replace("{src}", str(src)).replace("{out}", str(tmp / "out-huge")) for c in ways["local"]]
            wall, rss = peak_rss(argv2)
            check(tmp / "out-huge", args.huge_rows)
            huge = {"rows": args.huge_rows, "file_mib": src.stat().st_size / 2**20, "rows_s": args.huge_rows / wall,
                    "peak_rss_mib": rss}  # fmt: skip
    summary: dict = {"file_mib": file_mib, "rows": sizes, "huge": huge}
    for key in results["rounds"][0]:
        way, label = key.split("/")
        rates = [rd[key]["rows_s"] for rd in results["rounds"]]
        ratios = [rd[key]["rows_s"] / rd[f"plain/{label}"]["rows_s"] for rd in results["rounds"]]
        summary[key] = {
            "rows_s": statistics.median(rates),
            "ratio_to_plain": statistics.median(ratios),
            "ratios": ratios,
            "peak_rss_mib": max(rd[key]["rss_mib"] for rd in results["rounds"]),
        }
    lines = [
        f"Batch scoring, demo mlp, {args.rounds} rounds, chunks of {args.batch_size} rows, {os.cpu_count()} cores; "
        "ratio = rows/s over plain (same round, median)",
        "",
        "| input | rows | file MiB | way | rows/s | ratio | peak RSS MiB |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for label in sizes:
        for way in ("plain", "local", "server"):
            m = summary[f"{way}/{label}"]
            lines.append(
                f"| {label} | {sizes[label]:,} | {file_mib[label]:.0f} | {way} | {m['rows_s']:,.0f} | "
                f"{m['ratio_to_plain']:.2f} | {m['peak_rss_mib']:.0f} |"
            )
    if huge:
        lines += [
            "",
            f"Local on a {huge['file_mib']:,.0f} MiB file ({huge['rows']:,} rows): {huge['rows_s']:,.0f} rows/s, "
            f"peak RSS {huge['peak_rss_mib']:.0f} MiB",
        ]
    text = "\n".join(lines) + "\n"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "score.json").write_text(json.dumps({"summary": summary, "rounds": results["rounds"]}, indent=1))
    (out_dir / "score.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
