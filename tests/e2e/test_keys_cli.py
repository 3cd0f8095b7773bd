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


def test_a_key_given_twice_in_the_keys_file_is_refused_at_its_line(tmp_path):
    """PyYAML keeps the last of two: a second scopes line gave a key admin though the first
    one read [infer]; a second keys: list replaced the first."""
    path = tmp_path / "keys.yaml"
    entry = f"  - id: a\n    sha256: {'0' * 64}\n    scopes: [infer]\n"
    for text in (entry.join(["keys:\n", "    scopes: [infer, read, admin]\n"]), f"keys:\n{entry}keys: []\n"):
        path.write_text(text)
        r = keys("check", str(path))
        assert r.returncode == 2 and "is given twice" in r.stderr, (text, r.stdout, r.stderr)


def test_keys_hash_reads_a_token_from_stdin():
    r = keys("hash", stdin="my-existing-token\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == hashlib.sha256(b"my-existing-token").hexdigest() + "\n"
    for bad in ["", "\n", "two tokens\n", "tökén\n", "a" * 5000]:
        r = keys("hash", stdin=bad)
        assert r.returncode == 2 and "give one token on stdin" in r.stderr and r.stdout == ""


def test_no_log_line_holds_a_token_even_at_debug_level(tmp_path):
    """Other libraries' debug lines are not written: hpack's show every header it decodes,
    the caller's bearer token included, and the h2 gRPC engine decodes with it."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from batchgate.demo import build_demo_repository
    from batchgate.security.auth import hash_token, new_token
    from processes import Proc, serve_args

    token = new_token()
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [{"id": "app", "sha256": hash_token(token), "scopes": ["infer"]}]}))
    repo = build_demo_repository(str(tmp_path / "models"))
    proc = Proc(serve_args(repo, "--log-level", "debug", "--api-keys-file", str(keys_file), "--grpc-engine", "h2"))
    try:
        proc.wait_ready()
        headers = {"authorization": f"Bearer {token}"}
        for mod, client in (
            (grpcclient, grpcclient.InferenceServerClient(proc.grpc)),
            (httpclient, httpclient.InferenceServerClient(proc.http)),
        ):
            x = mod.InferInput("INPUT0", [1, 16], "INT32")
            x.set_data_from_numpy(np.zeros((1, 16), np.int32))
            y = mod.InferInput("INPUT1", [1, 16], "INT32")
            y.set_data_from_numpy(np.ones((1, 16), np.int32))
            assert client.infer("simple", [x, y], headers=headers).as_numpy("OUTPUT0").sum() == 16
            client.close()
    finally:
        proc.kill()
    out = proc.output()
    assert token not in out and hash_token(token) not in out
