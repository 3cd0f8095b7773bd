"""Request tracing's sampling: ``trace_sample_ratio`` is the share traced, whatever its value (it
used to be rounded to one in a whole N, so 0.7 traced every request)."""

from __future__ import annotations

import random

import pytest

from batchgate.monitoring.tracing import Tracing


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
