"""bench/soak.py's verdict on a kind's answers: anything its kind does not expect counts, but a
good request refused for load (RESOURCE_EXHAUSTED / 429) only past 1% of the kind (an admission
refusal on a busy machine is the server's right answer, not a defect)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import soak  # noqa: E402


def verdict(outcomes: dict[str, int]) -> int:
    kind = soak.Kind("grpc_infer", "grpc", 1.0, frozenset({"OK"}), True, "a good call")
    tally = {kind.name: soak.Tally(outcomes=Counter(outcomes))}
    return soak.Soak.unexpected(SimpleNamespace(tally=tally), kind)  # type: ignore[arg-type]


def test_load_refusals_of_good_requests_count_only_past_one_percent():
    assert verdict({"OK": 1000, "RESOURCE_EXHAUSTED": 10}) == 0  # within 1% of 1,010
    assert verdict({"OK": 1000, "RESOURCE_EXHAUSTED": 11}) == 11  # past it: every one counts
    assert verdict({"OK": 1000, "429": 5, "INTERNAL": 2}) == 2  # other answers always count
    assert verdict({"OK": 100, "INTERNAL": 3, "RESOURCE_EXHAUSTED": 30}) == 33
