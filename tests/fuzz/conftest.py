"""The fuzz harness's budget: two hypothesis settings profiles, one picked by ``BATCHGATE_FUZZ``.

- ``batchgate-fuzz-ci`` (the default, inside ``make test``): 400 examples for a property of
  weight 1, derandomized so every run tries the same inputs, no example database; the whole
  folder runs in well under a minute.
- ``batchgate-fuzz-long`` (``BATCHGATE_FUZZ=1``, what ``make fuzz`` sets): 20,000 examples for a
  property of weight 1, new seeds each run, and a database under ``.cache/hypothesis`` that
  replays first what an earlier run found.

The chosen one is registered as ``batchgate-fuzz``; each property takes it with
``fuzz_support.budget(weight)`` (its share of the profile's ``max_examples``). It is never
loaded globally: the other hypothesis tests of the suite keep their own settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("BATCHGATE_FUZZ", "").strip() not in ("", "0")
LONG_TIMEOUT_S = 1800  # pytest-timeout per test in the long run (the suite's own is 120 s)

_COMMON = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
}
settings.register_profile("batchgate-fuzz-ci", max_examples=400, derandomize=True, database=None, **_COMMON)
settings.register_profile(
    "batchgate-fuzz-long",
    max_examples=20_000,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(str(ROOT / ".cache" / "hypothesis")),
    **_COMMON,
)
settings.register_profile(
    "batchgate-fuzz", parent=settings.get_profile("batchgate-fuzz-long" if LONG else "batchgate-fuzz-ci")
)


def pytest_report_header(config):
    return f"fuzz profile: {'batchgate-fuzz-long (BATCHGATE_FUZZ=1)' if LONG else 'batchgate-fuzz-ci'}"


def pytest_collection_modifyitems(config, items):
    if not LONG:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_S))
