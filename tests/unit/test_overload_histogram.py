"""bench/overload.py's reading of the server's own latency histograms: the 99th percentile
interpolated within its bucket from cumulative Prometheus buckets, as histogram_quantile does."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import overload  # noqa: E402


def buckets(prefix: str, cumulative: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{le}": n for le, n in cumulative.items()}


def test_p99_interpolated_within_its_bucket():
    # 1,000 observations: 900 under 25 ms, 100 between 25 and 50 ms: the 990th lies 90% of
    # the way through the second bucket.
    server = buckets("dur_le:", {"0.025": 900, "0.05": 1000, "+Inf": 1000})
    assert overload.histogram_p99_ms(server, "dur_le:") == 47.5
    # another prefix in the same dict is not read
    server.update(buckets("queue_le:", {"0.01": 1000, "+Inf": 1000}))
    assert overload.histogram_p99_ms(server, "queue_le:") == 9.9


def test_p99_past_the_last_bound_and_empty():
    # past the last finite bound: that bound (nothing known above it)
    assert overload.histogram_p99_ms(buckets("d:", {"0.1": 10, "+Inf": 1000}), "d:") == 100.0
    assert overload.histogram_p99_ms(buckets("d:", {"0.1": 0, "+Inf": 0}), "d:") is None
    assert overload.histogram_p99_ms({}, "d:") is None
