"""Refused attempts cannot flood the audit log: a caller needs no key to be refused, and each
record is fsynced. Past ``audit_refused_per_s`` (after a burst of five seconds of it) their
records are left out, counted in batchgate_audit_log_dropped_total and summed up in one record
written before the next one; admin actions of a key allowed them, done or failed, are always
recorded. A real server, real tritonclient clients over a keep-alive connection."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.demo import build_demo_repository
from batchgate.security.auth import hash_token, new_token

ADMIN, INFER = new_token(), new_token()
RATE, BURST = 2.0, 10  # audit_refused_per_s, and its burst of 5 seconds


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return build_demo_repository(str(tmp_path_factory.mktemp("models")))


def dropped(running) -> float:
    text = urllib.request.urlopen(running.metrics_url, timeout=20).read().decode()
    m = re.search(r"^batchgate_audit_log_dropped_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_flood_of_refused_attempts_is_bounded_and_counted_and_admin_actions_are_kept(repo, serve, tmp_path):
    keys, audit = tmp_path / "keys.yaml", tmp_path / "audit.log"
    keys.write_text(
        f"keys:\n  - {{id: ops, sha256: {hash_token(ADMIN)}, scopes: [admin, read]}}\n"
        f"  - {{id: app, sha256: {hash_token(INFER)}, scopes: [infer]}}\n"
    )
    running = serve(
        repo,
        api_keys_file=str(keys),
        audit_log_file=str(audit),
        audit_refused_per_s=RATE,
        model_control_mode="explicit",
        load_model=("simple", "classifier"),
    )
    c = httpclient.InferenceServerClient(running.http_url)  # one keep-alive connection
    admin = {"authorization": f"Bearer {ADMIN}"}
    flood = 60
    t0 = time.monotonic()
    for i in range(flood):
        if i == flood // 2:  # an admin's actions in the middle of it: recorded, done or failed
            c.unload_model("classifier", headers=admin)
            c.load_model("classifier", headers=admin)
            with pytest.raises(InferenceServerException):
                c.unload_model("no_such_model", headers=admin)
        with pytest.raises(InferenceServerException) as e:
            c.unregister_system_shared_memory("x" * 128)  # no key
        assert e.value.status() == "401"
    with pytest.raises(InferenceServerException) as e:  # a key without the scope: refused too
        c.unload_model("classifier", headers={"authorization": f"Bearer {INFER}"})
    assert e.value.status() == "403"
    elapsed = time.monotonic() - t0

    records = [json.loads(line) for line in audit.read_text().splitlines()]
    refused = [r for r in records if r["outcome"] in ("UNAUTHENTICATED", "PERMISSION_DENIED")]
    assert len(refused) <= BURST + RATE * elapsed + 1, (len(refused), elapsed)
    left_out = dropped(running)
    assert len(refused) + left_out == flood + 1
    ops = [(r["action"], r["outcome"]) for r in records if r["key_id"] == "ops"]
    assert ops[:2] == [("repository.unload", "ok"), ("repository.load", "ok")]
    assert len(ops) == 3 and ops[2][0] == "repository.unload" and ops[2][1] != "ok"

    # once the rate allows one again, the next refused attempt is recorded, after one record that
    # sums up those left out since the last such record (each summary precedes a record written)
    time.sleep(1.5 / RATE)
    with pytest.raises(InferenceServerException):
        c.unregister_system_shared_memory("y")
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert (records[-1]["action"], records[-1]["target"]) == ("shm.unregister", "y")
    summaries = [i for i, r in enumerate(records) if r["action"] == "audit.refused_not_recorded"]
    assert summaries and summaries[-1] < len(records) - 1
    assert all(" refused attempt" in records[i]["detail"] for i in summaries)
    assert all(" not recorded since " in records[i]["detail"] for i in summaries)
    assert sum(int(records[i]["detail"].split(" ", 1)[0]) for i in summaries) == left_out > 0
    assert dropped(running) == left_out


@pytest.mark.parametrize("keyed", [True, False])
def test_a_flood_of_failed_shared_memory_calls_or_of_a_key_over_its_rate_is_bounded(repo, serve, tmp_path, keyed):
    """Two floods that need no admin power: a key allowed one request a second, refused for its
    rate (each refusal was recorded and fsynced: 2,000 records where the rate allows one), and on
    an open server anyone's shared-memory registrations that name no segment (each failure was
    recorded: 2,000 records, 486 kB, in a second from one connection)."""
    audit = tmp_path / "audit.log"
    flags: dict = {"audit_log_file": str(audit), "audit_refused_per_s": RATE}
    headers = None
    if keyed:
        keys = tmp_path / "keys.yaml"
        keys.write_text(f"keys:\n  - {{id: metered, sha256: {hash_token(INFER)}, scopes: [infer], rate_per_s: 1}}\n")
        flags["api_keys_file"] = str(keys)
        headers = {"authorization": f"Bearer {INFER}"}
    running = serve(repo, **flags)
    c = httpclient.InferenceServerClient(running.http_url)  # one keep-alive connection
    segment = "/batchgate_metered_no_such" if keyed else "/batchgate_no_such"  # (a key's own prefix)
    flood = 60
    t0 = time.monotonic()
    statuses = set()
    for _ in range(flood):
        with pytest.raises(InferenceServerException) as e:
            c.register_system_shared_memory("r", segment, 8, headers=headers)
        statuses.add(e.value.status())
    elapsed = time.monotonic() - t0
    assert statuses == ({"400", "429"} if keyed else {"400"}), statuses  # (the first within the rate)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    failed = [r for r in records if r["action"] == "shm.register"]
    assert len(failed) <= BURST + RATE * elapsed + 1, (len(failed), elapsed)
    assert len(failed) + dropped(running) == flood
    assert {r["key_id"] for r in failed} == ({"metered"} if keyed else {None})
