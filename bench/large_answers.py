"""Large answers and everyone else: does a client that asks for big BYTES answers hold up the small
requests of others? (``make bench-large-answers``)

A real server on the demo repository plus ``fanout``, an ONNX model whose answer is its one
string input repeated as many times as asked (``Expand``): a request of a few bytes, an answer of
``--elements`` BYTES elements (300,000 by default, ~2 MB). A prober sends small gRPC requests
(``simple``) one after another and records each latency. Two phases alternate, ``--rounds``
times each:

- alone: the prober only (the baseline);
- beside large answers: two more clients ask ``fanout`` for its large answer without pause, one
  over gRPC, one over HTTP (JSON).

An answer is written element by element (BYTES framing, JSON values): on the event loop, each
large one held every other request for its whole length; past ``OFF_LOOP_ELEMENTS`` it is now
written on a thread. Reported per phase: the prober's p50, p99 and worst latency (medians over
the rounds) and the large requests answered a second; the figure is the prober's p99 beside large
answers over its p99 alone. ``--batchgate PATH`` runs another checkout's server (its
``.venv/bin/python``) for a before/after comparison.

``--codec`` times, in this process, what the server does element by element: framing and reading
``--elements`` BYTES elements, batchgate's way against the plain one-by-one loop (each
``struct.pack`` / ``struct.unpack_from`` and slice in turn) it replaced; medians of 7 rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from common import BATCHGATE_READY, Server, say, serve_command
from overload import counts, delta, loop_lag_p99_ms, scrape

HERE = Path(__file__).resolve().parent


def fanout_model(path: Path) -> None:
    """``COPIES`` = ``TEXT`` ([1, 1] string) repeated to the shape ``SHAPE`` asks for."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("TEXT", TensorProto.STRING, [1, 1])
    shape = helper.make_tensor_value_info("SHAPE", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("COPIES", TensorProto.STRING, [1, None])
    graph = helper.make_graph([helper.make_node("Expand", ["TEXT", "SHAPE"], ["COPIES"])], "fanout", [x, shape], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (path / "1").mkdir(parents=True)
    onnx.save(model, str(path / "1" / "model.onnx"))
    (path / "config.pbtxt").write_text("max_batch_size: 0\n")


def _fanout_inputs(mod, n: int) -> list:
    text, shape = mod.InferInput("TEXT", [1, 1], "BYTES"), mod.InferInput("SHAPE", [2], "INT64")
    text.set_data_from_numpy(np.array([[b"an element"]], dtype=object))
    shape.set_data_from_numpy(np.array([1, n], np.int64))
    return [text, shape]


def _probe(grpc_url: str, seconds: float) -> list[float]:
    client = grpcclient.InferenceServerClient(grpc_url)
    inputs = [grpcclient.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
    for x in inputs:
        x.set_data_from_numpy(np.ones((1, 16), np.int32))
    took, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        client.infer("simple", inputs)
        took.append(time.perf_counter() - t0)
    return took


def _large(mod, url: str, n: int, stop: threading.Event, done: list[int]) -> None:
    client = mod.InferenceServerClient(url, **({"network_timeout": 120.0} if mod is httpclient else {}))
    inputs = _fanout_inputs(mod, n)
    while not stop.is_set():
        client.infer("fanout", inputs)
        done[0] += 1


def phase(urls: dict[str, str], seconds: float, elements: int, protocols: list[str]) -> dict:
    stop, done, loaders = threading.Event(), [0], []
    before = counts(scrape(int(urls["metrics"])), "grpc")
    if elements:
        for mod, url in ((grpcclient, urls["grpc"]), (httpclient, urls["http"])):
            if mod.__name__.rsplit(".", 1)[-1] not in protocols:
                continue
            loaders.append(threading.Thread(target=_large, args=(mod, url, elements, stop, done), daemon=True))
        for t in loaders:
            t.start()
        time.sleep(1.0)  # (the large requests under way first)
    start = done[0]
    took = _probe(urls["grpc"], seconds)
    large = done[0] - start
    stop.set()
    for t in loaders:
        t.join(120)
    ms = np.array(took) * 1000
    lag = loop_lag_p99_ms(delta(counts(scrape(int(urls["metrics"])), "grpc"), before))
    return {
        "loop_lag_p99_ms": lag if lag is not None else float("nan"),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "probes": len(took),
        "large_per_s": large / seconds,
    }


def _frame_one_by_one(values) -> bytes:
    parts = []
    for v in values:
        v = v.encode() if isinstance(v, str) else v
        parts += [struct.pack("<I", len(v)), v]
    return b"".join(parts)


def _read_one_by_one(buf: bytes, count: int) -> np.ndarray:
    mv, pos, out = memoryview(buf), 0, np.empty(count, dtype=object)
    for i in range(count):
        (n,) = struct.unpack_from("<I", mv, pos)
        out[i] = bytes(mv[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def codec(n: int) -> None:
    from batchgate.core.types import decode_bytes_tensor, encode_bytes_tensor

    def ms(f, *a) -> float:
        took = []
        for _ in range(7):
            t0 = time.perf_counter()
            f(*a)
            took.append((time.perf_counter() - t0) * 1000)
        return statistics.median(took)

    for kind, values in (("bytes", [b"e%d" % i for i in range(n)]), ("str", [f"é{i}" for i in range(n)])):
        arr = np.array(values, dtype=object)
        framed = encode_bytes_tensor(arr)
        assert framed == _frame_one_by_one(values) and list(decode_bytes_tensor(framed, n, "x")) == [
            v.encode() if isinstance(v, str) else v for v in values
        ]
        a, b = ms(_frame_one_by_one, values), ms(encode_bytes_tensor, arr)
        c, d = ms(_read_one_by_one, framed, n), ms(decode_bytes_tensor, framed, n, "x")
        framing = f"framing {a:.1f} -> {b:.1f} ms ({a / b:.1f}x)"
        print(f"{n:,} {kind} elements: {framing}, reading {c:.1f} -> {d:.1f} ms ({c / d:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--elements", type=int, default=300_000, help="BYTES elements of a large answer")
    ap.add_argument("--large", default="grpc,http", help="the protocols that ask for large answers")
    ap.add_argument("--batchgate", type=Path, default=HERE.parent, help="the checkout whose server runs")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "large_answers.json")
    ap.add_argument("--codec", action="store_true", help="time the BYTES framing and reading in process, then stop")
    args = ap.parse_args()
    if args.codec:
        codec(args.elements)
        return
    python = str(args.batchgate / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory() as tmp:
        repo = str(Path(tmp) / "models")
        subprocess.run([python, "-m", "batchgate.cli", "demo-repo", repo], check=True, capture_output=True)
        fanout_model(Path(repo) / "fanout")
        cmd = serve_command(repo)
        cmd[0] = python
        server = Server("batchgate", cmd, BATCHGATE_READY, Path(tmp) / "server.log")
        try:
            m = server.match
            urls = {"grpc": f"127.0.0.1:{m['grpc']}", "http": f"127.0.0.1:{m['http']}", "metrics": m["metrics"]}
            _probe(urls["grpc"], 1.0)  # (warm)
            rounds: dict[str, list[dict]] = {"alone": [], "beside large answers": []}
            for r in range(args.rounds):
                for name, n in (("alone", 0), ("beside large answers", args.elements)):
                    got = phase(urls, args.seconds, n, args.large.split(","))
                    rounds[name].append(got)
                    say(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()))
        finally:
            server.stop()
    summary = {name: {k: statistics.median(g[k] for g in got) for k in got[0]} for name, got in rounds.items()}
    pairs = zip(rounds["alone"], rounds["beside large answers"])
    ratio = statistics.median(b["p99_ms"] / a["p99_ms"] for a, b in pairs)
    print(f"server: {args.batchgate}; {args.elements:,} BYTES elements a request; medians of {args.rounds} rounds")
    print("phase | probe p50 ms | probe p99 ms | probe worst ms | server loop lag p99 ms | large answers / s")
    for name, s in summary.items():
        cells = (s["p50_ms"], s["p99_ms"], s["max_ms"], s["loop_lag_p99_ms"], s["large_per_s"])
        print(f"{name} | {cells[0]:.2f} | {cells[1]:.2f} | {cells[2]:.1f} | <= {cells[3]:g} | {cells[4]:.2f}")
    print(f"probe p99 beside large answers / alone: {ratio:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                    "p99_ratio": ratio, "rounds": rounds}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
