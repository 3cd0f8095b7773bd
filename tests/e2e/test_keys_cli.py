"""`batchgate keys new | check | hash` as a user runs them: real subprocesses."""

from __future__ import annotations

import hashlib
import subprocess

import yaml

from batchgate.security.auth import KeyStore
from processes import BATCHGATE


def keys(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BATCHGATE, "keys", *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def new_key(*args: str) -> tuple[str, str]:
    """(token, the entry text to paste under 'keys:')."""
    r = keys("new", *args)
    assert r.returncode == 0, r.stderr
    token, _, entry = r.stdout.partition("\n")
    assert "shown once and stored nowhere" in r.stderr and token not in r.stderr
    return token, entry


def test_keys_new_prints_a_token_whose_sha256_is_in_the_entry(tmp_path):
    token, entry = new_key(
        "--id",
        "fraud-team",
        "--scopes",
        "infer,read",
        "--models",
        "fraud-*",
        "--models",
        "risk-a,risk-b",
        "--rate-per-s",
        "100",
        "--burst",
        "200",
        "--cert-subject",
        "CN=fraud-client,O=Acme",
    )
    assert token.startswith("bgk_") and len(token) == 47
    (parsed,) = yaml.safe_load("keys:\n" + entry)["keys"]
    assert parsed == {
        "id": "fraud-team",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "scopes": ["infer", "read"],
        "models": ["fraud-*", "risk-a", "risk-b"],
        "rate_per_s": 100,
        "burst": 200,
        "cert_subjects": ["CN=fraud-client,O=Acme"],
    }
    assert token not in entry

    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n" + entry)
    r = keys("check", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"1 key in {path}",
        "fraud-team (infer, read; fraud-*, risk-a, risk-b; 100 requests/s, burst 200; 1 certificate subject)",
    ]
    store = KeyStore(str(path))  # and the server takes it: the printed token is the key
    assert store.authenticate(f"Bearer {token}").id == "fraud-team"


def test_two_new_keys_in_one_file_pass_check(tmp_path):
    t1, e1 = new_key("--id", "a", "--scopes", "read")
    t2, e2 = new_key("--id", "b", "--scopes", "admin")
    assert t1 != t2
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n" + e1 + e2)
    r = keys("check", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == ["a (read; *)", "b (admin; *)"]


def test_keys_new_refuses_bad_arguments_with_exit_2():
    for args, words in [
        (["--id", "bad id", "--scopes", "read"], "field 'id'"),
        (["--id", "k", "--scopes", "reed"], "did you mean 'read'"),
        (["--id", "k", "--scopes", ","], "at least one"),
        (["--id", "k", "--scopes", "read", "--rate-per-s", "0"], "field 'rate_per_s'"),
        (["--id", "k", "--scopes", "read", "--rate-per-s", "fast"], "field 'rate_per_s'"),
        (["--id", "k", "--scopes", "read", "--burst", "5"], "needs rate_per_s"),
        (["--id", "k", "--scopes", "read", "--models", "a b"], "field 'models'"),
        (["--id", "k", "--scopes", "read", "--cert-subject", "nonsense"], "field 'cert_subjects'"),
        (["--scopes", "read"], "--id"),
    ]:
        r = keys("new", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert words in r.stderr, (args, r.stderr)
        assert "bgk_" not in r.stdout + r.stderr  # no token is shown for an entry that is refused


def test_keys_check_reports_the_error_and_exits_2(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - id: a\n    sha256: {'0' * 64}\n    scopes: [read]\n    token: bgk_leaked\n")
    r = keys("check", str(path))
    assert r.returncode == 2 and r.stdout == ""
    assert f"{path}: entry 0 (id 'a'): field 'token' is refused" in r.stderr
    assert "bgk_leaked" not in r.stderr
    r = keys("check", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read keys file" in r.stderr


def test_keys_hash_reads_a_token_from_stdin():
    r = keys("hash", stdin="my-existing-token\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == hashlib.sha256(b"my-existing-token").hexdigest() + "\n"
    for bad in ["", "\n", "two tokens\n", "tökén\n", "a" * 5000]:
        r = keys("hash", stdin=bad)
        assert r.returncode == 2 and "give one token on stdin" in r.stderr and r.stdout == ""
