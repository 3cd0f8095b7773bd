"""server/state.py on a real directory: round trips, atomic replacement (no temporary left),
private permissions, names that cannot escape the directory, and documents that are refused."""

from __future__ import annotations

import os
import stat

import pytest

from batchgate.core.buckets import BucketTable
from batchgate.state import MAX_BYTES, StateDir


def test_a_document_round_trips_and_replaces_the_old_one(tmp_path):
    store = StateDir(str(tmp_path / "state"))
    assert store.load("route", "fraud") is None
    table = BucketTable.fresh("fraud", {"stable": 90, "canary": 10})
    store.save("route", "fraud", table.to_state())
    table.reweigh({"stable": 50, "canary": 50})
    store.save("route", "fraud", table.to_state())
    again = BucketTable.from_state(store.load("route", "fraud"))
    assert again.owners == table.owners
    assert sorted(os.listdir(tmp_path / "state")) == ["route-fraud.json"]  # no temporary left behind
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    store.remove("route", "fraud")
    assert store.load("route", "fraud") is None


@pytest.mark.parametrize("kind, name", [("route", "../evil"), ("route", "/abs"), ("route", ""), ("secrets", "x")])
def test_names_and_kinds_cannot_reach_outside(tmp_path, kind, name):
    store = StateDir(str(tmp_path))
    with pytest.raises(ValueError):
        store.save(kind, name, {"a": 1})
    with pytest.raises(ValueError):
        store.load(kind, name)
    assert os.listdir(tmp_path) == []


def test_a_document_that_cannot_be_one_is_refused(tmp_path):
    store = StateDir(str(tmp_path))
    (tmp_path / "route-a.json").write_text("{not json")
    (tmp_path / "route-b.json").write_text("[1, 2]")
    (tmp_path / "route-c.json").write_bytes(b" " * (MAX_BYTES + 1))
    # nested past the parser's depth: RecursionError, which stopped the server at start
    (tmp_path / "route-e.json").write_text("[" * 100_000 + "]" * 100_000)
    cases = (("a", "is not JSON"), ("b", "does not hold a JSON object"), ("c", "larger than"), ("e", "is not JSON"))
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            store.load("route", name)
    with pytest.raises(ValueError, match="would be larger"):
        store.save("route", "d", {"x": "y" * MAX_BYTES})
    assert not (tmp_path / "route-d.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # nothing half-written


@pytest.mark.parametrize(
    "change",
    [
        {"weights": []},  # a list where the weights were: refused, not AttributeError
        {"runs": [[0, float("inf")]]},  # a run too long to count
        {"runs": [[0, 10**12]]},  # a run longer than the table: refused before it is built
        {"runs": [[0, -5], [1, 10_005]]},
        {"runs": [[0, 10_000]]},  # every bucket to "stable", whose weight is 90
    ],
)
def test_a_kept_table_that_cannot_be_the_routes_is_refused(change):
    good = BucketTable.fresh("fraud", {"stable": 90, "canary": 10}).to_state()
    with pytest.raises(ValueError, match="not a bucket table"):
        BucketTable.from_state({**good, **change})


def test_a_directory_that_cannot_be_written_is_found_at_start(tmp_path):
    # (as root, permissions do not stop a write: /proc/self is a directory nothing can be made in)
    with pytest.raises(OSError):
        StateDir("/proc/self")
    StateDir(str(tmp_path / "fine"))
    assert os.listdir(tmp_path / "fine") == []  # the probe leaves nothing behind
