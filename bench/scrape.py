"""What a /metrics scrape costs the server: the text written directly (``snapshot.text``) against
prometheus_client's ``generate_latest`` of the same families, in one process, same snapshots.

A scrape runs on a thread of the serving process; its Python holds the interpreter's lock in
turns of 5 ms, so every millisecond it takes is a millisecond the event loop's core and turns
are shared with it (the overload benchmark scrapes four times a second; Prometheus and KEDA every
15-30 s, from every replica, and more than one of them may). Snapshots are filled the way a busy
server's are: every model with both protocols' request histograms, statuses and refusals.

    python bench/scrape.py              # 5, 50 and 200 models, 7 rounds each (about a minute)
    python bench/scrape.py --quick      # 5 and 50 models, 3 rounds

Prints per model count: the page's size and series, the median time of each way and their ratio
(median of the rounds' ratios); writes bench/results/scrape.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from prometheus_client import generate_latest

from batchgate.monitoring.metrics import Metrics
from batchgate.monitoring.snapshot import _Scrape, render, text

HERE = Path(__file__).resolve().parent


def filled(models: int) -> Metrics:
    """A server's figures: ``models`` models, each having answered and refused on both protocols."""
    m = Metrics()
    for i in range(models):
        mm = m.bind(f"model-{i}", "1")
        for k in range(200):
            mm.request_done("grpc" if k % 2 else "http", "OK" if k % 7 else "RESOURCE_EXHAUSTED", 0.0001 * (k + 1))
        mm.refused("queue_target")
        mm.executions += 100
        mm.inferences += 400
        mm.batch_rows[4] = 100
    return m


def timed(fn, repeat: int) -> float:
    """The median seconds of one call over ``repeat`` calls."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes, rounds = ((5, 50), 3) if args.quick else ((5, 50, 200), 7)
    rows = []
    for models in sizes:
        snap = filled(models).snapshot()
        page = text(snap)
        assert page == generate_latest(_Scrape(render(snap), ())).decode(), "the two ways differ"
        direct, library, ratios = [], [], []
        for r in range(rounds):
            pair = [
                ("direct", lambda s=snap: text(s)),
                ("library", lambda s=snap: generate_latest(_Scrape(render(s), ()))),
            ]
            if r % 2:
                pair.reverse()  # (every other round in the other order)
            got = {name: timed(fn, 20) for name, fn in pair}
            direct.append(got["direct"])
            library.append(got["library"])
            ratios.append(got["library"] / got["direct"])
            print(f"  {models} models, round {r + 1} of {rounds}: library/direct {ratios[-1]:.2f}", flush=True)
        row = {
            "models": models,
            "series_lines": sum(1 for line in page.splitlines() if not line.startswith("#")),
            "page_bytes": len(page.encode()),
            "direct_ms": round(statistics.median(direct) * 1000, 3),
            "library_ms": round(statistics.median(library) * 1000, 3),
            "speedup": round(statistics.median(ratios), 2),
        }
        rows.append(row)
    print("models | series lines | page bytes | direct ms | prometheus_client ms | speed-up (median of rounds)")
    for r in rows:
        print(
            f"{r['models']} | {r['series_lines']:,} | {r['page_bytes']:,} | {r['direct_ms']} | "
            f"{r['library_ms']} | {r['speedup']}x"
        )
    out = HERE / "results" / "scrape.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rounds": rounds, "rows": rows}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
