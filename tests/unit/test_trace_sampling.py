"""Request tracing's sampling: ``trace_sample_ratio`` is the share traced, whatever its value (it
used to be rounded to one in a whole N, so 0.7 traced every request)."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from batchgate.monitoring.tracing import Tracing
from gateway_support import eventually


@pytest.mark.parametrize("ratio", [0.7, 0.4, 0.1])
def test_the_share_traced_is_the_ratio(ratio):
    tracing = Tracing("http://127.0.0.1:1/v1/traces", ratio, "test", max_per_s=1_000_000)
    try:
        random.seed(3)
        n = 4000
        traced = 0
        for _ in range(n):
            span = tracing.begin("m", None, None, "grpc", 0.0)
            if span is not None:
                traced += 1  # (never ended: nothing to export)
        assert abs(traced / n - ratio) < 0.03, traced / n
        want = str(round(1 / ratio))  # the trace extension shows a whole N, as Triton's does
        assert tracing.settings("")["trace_rate"] == want
    finally:
        tracing.provider.shutdown()


def test_closing_before_a_collector_that_hangs_sends_no_more_than_one_timeout_allows():
    """On close the batch processor exports its queue a batch at a time, each export waiting up
    to the exporter's timeout: a collector that accepts and never answers held a stopping
    gateway for one timeout per batch (a full queue: four batches, 18 s at the default 5 s).
    Now the spans still queued past one timeout are counted failed without being sent: the
    collector sees at most the export in flight then, not one connection per batch."""
    collector = socket.socket()
    collector.bind(("127.0.0.1", 0))
    collector.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(collector.accept()[0])
            except OSError:  # closed
                return

    threading.Thread(target=accept, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.getsockname()[1]}"
    tracing = Tracing(endpoint, 1.0, "test", queue_size=2048, export_timeout_s=0.5, max_per_s=1_000_000)
    try:
        for _ in range(2048):  # four batches of 512
            tracing.begin("m", None, None, "http", time.perf_counter()).end()
        before = len(accepted)
        tracing.close()
        assert len(accepted) - before <= 1, f"{len(accepted) - before} exports sent while closing"
        eventually(lambda: tracing.counts.counts["failed"] == 2048, "every span counted failed")
    finally:
        collector.close()
        for c in accepted:
            c.close()
