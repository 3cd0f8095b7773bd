"""Per model-version statistics, with the meanings of the V2 statistics extension.

- ``inference_count`` counts rows (a batch-8 request adds 8); ``execution_count``
  counts backend executions.
- ``success``/``fail`` count requests with their end-to-end durations; ``queue`` and
  ``compute_*`` count requests with the time each spent in that phase (a request
  sharing an execution is charged the whole execution, as Triton does).
- ``batch_stats`` has one entry per executed batch size, counting executions.

Figures are kept as flat lists of integers ([count, ns] pairs): recording happens
once or twice per request, so it is kept to a few additions. :meth:`ModelStats.as_dict`
is the snapshot of one process; :func:`merge_stats` adds up the snapshots of several
(worker processes serving the same version).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Positions in ModelStats.totals: (count, ns) for each duration.
SUCCESS, FAIL, QUEUE, INPUT, INFER, OUTPUT = 0, 2, 4, 6, 8, 10
_NAMES = (
    ("success", SUCCESS),
    ("fail", FAIL),
    ("queue", QUEUE),
    ("compute_input", INPUT),
    ("compute_infer", INFER),
    ("compute_output", OUTPUT),
)


def _d(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


class ModelStats:
    __slots__ = (
        "name",
        "version",
        "last_inference_ms",
        "inference_count",
        "execution_count",
        "totals",
        "batch_stats",
        "_wall_clock",
    )

    def __init__(self, name: str, version: str, wall_clock: Callable[[], float] = time.time):
        self._wall_clock = wall_clock  # seconds since the epoch, for last_inference
        self.name = name
        self.version = version
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.totals = [0] * 12
        self.batch_stats: dict[int, list[int]] = {}  # rows -> [executions, input_ns, infer_ns, output_ns]

    def record_execution(self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        self.inference_count += rows
        bs = self.batch_stats.get(rows)
        if bs is None:
            bs = self.batch_stats[rows] = [0, 0, 0, 0]
        bs[0] += 1
        bs[1] += input_ns
        bs[2] += infer_ns
        bs[3] += output_ns
        t = self.totals
        t[INPUT] += requests
        t[INPUT + 1] += input_ns * requests
        t[INFER] += requests
        t[INFER + 1] += infer_ns * requests
        t[OUTPUT] += requests
        t[OUTPUT + 1] += output_ns * requests
        self.last_inference_ms = int(self._wall_clock() * 1000)

    def record_routed(self, rows: int) -> None:
        """A request a route answered (its variant executed it; counted here as a Triton ensemble
        counts its own: one execution of ``rows`` inferences)."""
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = int(self._wall_clock() * 1000)

    def record_request(self, ok: bool, ns: int, queue_ns: int | None = None, n: int = 1) -> None:
        """``n`` requests (each of them took ``ns``, queued ``queue_ns``). As in Triton, the queue
        statistics count successful requests only (a failure adds to ``fail`` alone)."""
        t = self.totals
        i = SUCCESS if ok else FAIL
        t[i] += n
        t[i + 1] += ns * n
        if ok and queue_ns is not None:
            t[QUEUE] += n
            t[QUEUE + 1] += queue_ns * n

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of one ``model_stats`` entry (also fed to the protobuf)."""
        t = self.totals
        stats = {name: _d(t[i], t[i + 1]) for name, i in _NAMES}
        stats["cache_hit"] = _d(0, 0)
        stats["cache_miss"] = _d(0, 0)
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": stats,
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": _d(b[0], b[1]),
                    "compute_infer": _d(b[0], b[2]),
                    "compute_output": _d(b[0], b[3]),
                }
                for size, b in sorted(self.batch_stats.items())
            ],
            "memory_usage": [],
            "response_stats": {},
        }


def _sum_pair(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return _d(a["count"] + b["count"], a["ns"] + b["ns"])


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two snapshots (:meth:`ModelStats.as_dict`) of the same model version, added up:
    counts and durations summed, the latest ``last_inference`` kept, batch sizes merged."""
    if (a["name"], a["version"]) != (b["name"], b["version"]):
        raise ValueError(f"cannot merge statistics of {a['name']}/{a['version']} with {b['name']}/{b['version']}")
    stats = {k: _sum_pair(v, b["inference_stats"][k]) for k, v in a["inference_stats"].items()}
    sizes: dict[int, dict[str, Any]] = {e["batch_size"]: e for e in a["batch_stats"]}
    for e in b["batch_stats"]:
        mine = sizes.get(e["batch_size"])
        sizes[e["batch_size"]] = (
            e
            if mine is None
            else {
                "batch_size": e["batch_size"],
                **{k: _sum_pair(mine[k], e[k]) for k in ("compute_input", "compute_infer", "compute_output")},
            }
        )
    return {
        **a,
        "last_inference": max(a["last_inference"], b["last_inference"]),
        "inference_count": a["inference_count"] + b["inference_count"],
        "execution_count": a["execution_count"] + b["execution_count"],
        "inference_stats": stats,
        "batch_stats": [sizes[k] for k in sorted(sizes)],
    }
