"""A keys file caught half-written is never applied: a change is read only once two polls in a
row see the same stat signature, and a worker process reads only the file its supervisor found
settled. The polls are called one by one here, so nothing depends on timing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.security.auth import KeyStore, hash_token, parse_keys

LIMITED, OPS = "bgk_limited-team", "bgk_ops"

FULL = f"""keys:
  - id: limited
    sha256: {hash_token(LIMITED)}
    scopes: [infer]
    models: ["fraud-*"]
    rate_per_s: 1
  - id: ops
    sha256: {hash_token(OPS)}
    scopes: [admin, read]
"""
# An in-place writer (open(..., "w"), then the rest) caught right after the first entry's scopes:
# it parses; "limited" would get every model and no rate, and "ops" would be revoked.
HALF = FULL[: FULL.index("    models:")]


def write_in_place(path: Path, text: str) -> None:
    """Truncate and write the same file (same inode), its mtime moved on so each step has a
    signature of its own whatever the clock's resolution."""
    before = os.stat(path).st_mtime_ns
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def limited_as_written(store: KeyStore) -> None:
    """The keys are the full file's: "limited" reaches only fraud-* at 1/s, "ops" is valid."""
    key = store.authenticate(f"Bearer {LIMITED}")
    assert key.allows_model("fraud-a") and not key.allows_model("risk")
    assert key.rate_per_s == 1
    assert store.authenticate(f"Bearer {OPS}").id == "ops"


@pytest.fixture
def path(tmp_path) -> Path:
    p = tmp_path / "keys.yaml"
    p.write_text(FULL)
    return p


def test_a_file_seen_half_written_by_one_poll_is_never_applied(path):
    (cut,) = parse_keys(yaml.safe_load(HALF), "half")  # the cut file is a valid keys file on its own
    assert cut.every_model and cut.rate_per_s is None
    store = KeyStore(str(path))
    removed: list[list[str]] = []
    store.on_removed = removed.append
    write_in_place(path, HALF)  # the writer pauses here, across a poll
    assert store.reload_if_changed() is False
    limited_as_written(store)
    write_in_place(path, FULL.replace("rate_per_s: 1", "rate_per_s: 5"))  # ... and finishes
    assert store.reload_if_changed() is False  # changed again since the last poll: not yet
    limited_as_written(store)
    assert store.reload_if_changed() is True  # stood still for a poll: read
    key = store.authenticate(f"Bearer {LIMITED}")
    assert key.rate_per_s == 5 and not key.allows_model("risk")
    assert store.authenticate(f"Bearer {OPS}").id == "ops"
    assert removed == []  # no key was ever dropped, nor what it held (shared-memory regions)


def test_a_revocation_applies_at_the_second_poll(path):
    store = KeyStore(str(path))
    write_in_place(path, FULL[: FULL.index("  - id: ops")])  # ops revoked (a complete file)
    assert store.reload_if_changed() is False
    assert store.authenticate(f"Bearer {OPS}").id == "ops"
    assert store.reload_if_changed() is True
    with pytest.raises(GatewayError) as e:
        store.authenticate(f"Bearer {OPS}")
    assert e.value.code is ErrorCode.UNAUTHENTICATED
    assert store.reload_if_changed() is False  # once per change


def test_a_worker_reads_only_the_file_its_supervisor_found_settled(path):
    supervisor, worker = KeyStore(str(path)), KeyStore(str(path))
    write_in_place(path, FULL.replace("rate_per_s: 1", "rate_per_s: 5"))
    assert supervisor.reload_if_changed() is False
    assert supervisor.reload_if_changed() is True
    settled = tuple(supervisor.signature)
    write_in_place(path, HALF)  # a new write began before the worker was told
    assert worker.reload_settled(settled) is False
    limited_as_written(worker)
    assert worker.authenticate(f"Bearer {LIMITED}").rate_per_s == 1  # still what it had
    write_in_place(path, FULL.replace("rate_per_s: 1", "rate_per_s: 7"))  # the write ends
    assert supervisor.reload_if_changed() is False
    assert supervisor.reload_if_changed() is True
    assert worker.reload_settled(tuple(supervisor.signature)) is True
    assert worker.authenticate(f"Bearer {LIMITED}").rate_per_s == 7
    assert worker.reload_settled(tuple(supervisor.signature)) is False  # once
