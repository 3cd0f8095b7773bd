"""Per model-version statistics, with the meanings of the V2 statistics extension.

- ``inference_count`` counts rows (a batch-8 request adds 8); ``execution_count``
  counts backend executions.
- ``success``/``fail`` count requests with their end-to-end durations; ``queue`` and
  ``compute_*`` count requests with the time each spent in that phase (a request
  sharing an execution is charged the whole execution, as Triton does).
- ``batch_stats`` has one entry per executed batch size, counting executions.

Figures are kept as flat lists of integers ([count, ns] pairs): recording happens
once or twice per request, so it is kept to a few additions.
"""

from __future__ import annotations

import time

# Positions in ModelStats.totals: (count, ns) for each duration.
SUCCESS, FAIL, QUEUE, INPUT, INFER, OUTPUT = 0, 2, 4, 6, 8, 10
_NAMES = (("success", SUCCESS), ("fail", FAIL), ("queue", QUEUE), ("compute_input", INPUT),
          ("compute_infer", INFER), ("compute_output", OUTPUT))


def _d(count: int, ns: int) -> dict:
    return {"count": count, "ns": ns}


class ModelStats:
    __slots__ = ("name", "version", "last_inference_ms", "inference_count", "execution_count", "totals",
                 "batch_stats")

    def __init__(self, name: str, version: str):
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
        self.last_inference_ms = int(time.time() * 1000)

    def record_request(self, ok: bool, ns: int, queue_ns: int | None = None) -> None:
        t = self.totals
        i = SUCCESS if ok else FAIL
        t[i] += 1
        t[i + 1] += ns
        if queue_ns is not None:
            t[QUEUE] += 1
            t[QUEUE + 1] += queue_ns

    def as_dict(self) -> dict:
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
                {"batch_size": size, "compute_input": _d(b[0], b[1]), "compute_infer": _d(b[0], b[2]),
                 "compute_output": _d(b[0], b[3])}
                for size, b in sorted(self.batch_stats.items())
            ],
            "memory_usage": [],
            "response_stats": {},
        }
