"""A keys file caught half-written is never applied: a change is read only once two polls in a
row see the same stat signature, and a worker process reads only the file its supervisor found
settled. The polls are called one by one here, so nothing depends on timing."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import yaml

from batchgate.app import Gateway
from batchgate.config import load_settings
from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.security.auth import KeyStore, hash_token, parse_keys
from batchgate.supervisor import Supervisor
from batchgate.worker import WorkerLink

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


async def test_a_worker_reads_only_the_file_its_supervisor_found_settled(path):
    supervisor, worker = KeyStore(str(path)), KeyStore(str(path))
    write_in_place(path, FULL.replace("rate_per_s: 1", "rate_per_s: 5"))
    assert supervisor.reload_if_changed() is False
    assert supervisor.reload_if_changed() is True
    settled = tuple(supervisor.signature)
    write_in_place(path, HALF)  # a new write began before the worker was told
    assert await worker.reload_settled(settled) is False
    limited_as_written(worker)
    assert worker.authenticate(f"Bearer {LIMITED}").rate_per_s == 1  # still what it had
    write_in_place(path, FULL.replace("rate_per_s: 1", "rate_per_s: 7"))  # the write ends
    assert supervisor.reload_if_changed() is False
    assert supervisor.reload_if_changed() is True
    assert await worker.reload_settled(tuple(supervisor.signature)) is True
    assert worker.authenticate(f"Bearer {LIMITED}").rate_per_s == 7
    assert await worker.reload_settled(tuple(supervisor.signature)) is False  # once


def _settings(tmp_path: Path, path: Path, **flags):
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    return load_settings(None, {"model_repository": str(models), "api_keys_file": str(path), **flags}, environ={})


def _told_on(keys: KeyStore, threads: list[int], then=lambda: None) -> None:
    """Record the thread each removal is told on, then tell the key store's own listener."""
    listener = keys.on_removed

    def told(ids: list[str]) -> None:
        threads.append(threading.get_ident())
        if listener is not None:
            listener(ids)
        then()

    keys.on_removed = told


async def test_a_worker_swaps_the_keys_in_on_its_event_loop(path, tmp_path):
    """A worker told of a settled keys file reads it on a thread but swaps the keys in, and drops
    what the removed keys held (their shared-memory regions), on its loop: the requests that
    use them run there (before, the swap and the drop ran on the reading thread, racing them)."""
    link = WorkerLink()
    link.gateway = Gateway(_settings(tmp_path, path))
    keys = link.gateway.dataplane.access.keys
    supervisor = KeyStore(str(path))
    threads: list[int] = []
    _told_on(keys, threads)
    write_in_place(path, FULL[: FULL.index("  - id: ops")])  # "ops" revoked
    assert supervisor.reload_if_changed() is False
    assert supervisor.reload_if_changed() is True
    assert await link.handlers()["keys_reload"](tuple(supervisor.signature)) is True
    assert threads == [threading.get_ident()]
    with pytest.raises(GatewayError):
        keys.authenticate(f"Bearer {OPS}")


async def test_the_supervisor_swaps_the_keys_in_on_its_event_loop(path, tmp_path):
    """The supervisor's watch of the keys file, likewise: what it forgets of a removed key (the
    regions it replays to a worker that starts again) is the loop's to change."""
    sup = Supervisor(_settings(tmp_path, path, api_keys_poll_s=0.05))
    sup._keys = keys = KeyStore(str(path))
    keys.on_removed = sup.forget_owners
    threads: list[int] = []
    _told_on(keys, threads, then=lambda: setattr(sup, "stopping", True))
    write_in_place(path, FULL[: FULL.index("  - id: ops")])
    await asyncio.wait_for(sup._watch_keys(), 60)  # returns once the removal was told
    assert threads == [threading.get_ident()]
