"""Per model-version statistics, with the meanings of the V2 statistics extension.

- ``inference_count`` counts rows (a batch-8 request adds 8); ``execution_count``
  counts backend executions.
- ``success``/``fail`` count requests with their end-to-end durations; ``queue`` and
  ``compute_*`` count requests with the time each spent in that phase (a request
  sharing an execution is charged the whole execution, as Triton does).
- ``batch_stats`` has one entry per executed batch size, counting executions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batch_stats: dict[int, BatchStat] = field(default_factory=dict)

    def record_execution(self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        self.inference_count += rows
        bs = self.batch_stats.get(rows)
        if bs is None:
            bs = self.batch_stats[rows] = BatchStat()
        bs.compute_input.add(input_ns)
        bs.compute_infer.add(infer_ns)
        bs.compute_output.add(output_ns)
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        self.last_inference_ms = int(time.time() * 1000)

    def record_queue(self, ns: int) -> None:
        self.queue.add(ns)

    def record_request(self, ok: bool, ns: int) -> None:
        (self.success if ok else self.fail).add(ns)

    def as_dict(self) -> dict:
        """The JSON shape of one ``model_stats`` entry (also fed to the protobuf)."""
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.as_dict(),
                    "compute_infer": b.compute_infer.as_dict(),
                    "compute_output": b.compute_output.as_dict(),
                }
                for size, b in sorted(self.batch_stats.items())
            ],
            "memory_usage": [],
            "response_stats": {},
        }
