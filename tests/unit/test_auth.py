"""API keys: the keys file's rules, authentication, scopes and model patterns, rate limits on
a fake clock, and reloading (change, revocation, a bad file keeping the old keys)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tracemalloc
from pathlib import Path

import pytest

from batchgate.core.errors import ConfigError, ErrorCode, GatewayError
from batchgate.security import auth
from batchgate.security.auth import (
    MAX_FILE_BYTES,
    MAX_KEYS,
    SCOPES,
    ApiKey,
    KeyStore,
    hash_token,
    new_token,
    normalize_subject,
    parse_entry,
)

TOKEN_A = "bgk_token-of-fraud-team"
TOKEN_B = "bgk_token-of-ops"
SHA_A = hashlib.sha256(TOKEN_A.encode()).hexdigest()
SHA_B = hashlib.sha256(TOKEN_B.encode()).hexdigest()

GOOD = f"""
keys:
  - id: fraud-team
    sha256: {SHA_A}
    scopes: [infer, read]
    models: ["fraud-*"]
    rate_per_s: 2
    burst: 3
    cert_subjects: ["CN=fraud-client,O=Acme"]
  - id: ops
    sha256: {SHA_B.upper()}
    scopes: [admin, read]
"""


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def write(path, text: str) -> str:
    """Write ``text`` and make sure the file's stat signature changes (mtime moved on)."""
    path.write_text(text)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    return str(path)


@pytest.fixture
def keys_file(tmp_path):
    return write(tmp_path / "keys.yaml", GOOD)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(keys_file, clock):
    return KeyStore(keys_file, clock=clock)


def polls(store: KeyStore) -> bool:
    """Two polls of the file: a change is read once a poll has seen it stand still."""
    assert store.reload_if_changed() is False
    return store.reload_if_changed()


def entry(**fields) -> dict:
    return {"id": "k", "sha256": SHA_A, "scopes": ["infer"], **fields}


def file_error(tmp_path, text: str | bytes) -> str:
    p = tmp_path / "bad.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    with pytest.raises(ConfigError) as e:
        KeyStore(str(p))
    return str(e.value)


def entry_error(**fields) -> str:
    with pytest.raises(ConfigError) as e:
        parse_entry(entry(**fields), "keys file F: entry 0")
    return str(e.value)


def refused(code: ErrorCode, fn, *args) -> GatewayError:
    with pytest.raises(GatewayError) as e:
        fn(*args)
    assert e.value.code is code, e.value.message
    return e.value


# --- the file -------------------------------------------------------------------------------------


def test_good_file_loads_every_field(store):
    assert len(store) == 2
    assert store.key_ids == ("fraud-team", "ops")
    fraud, ops = store.keys
    assert fraud == ApiKey(
        "fraud-team",
        bytes.fromhex(SHA_A),
        frozenset({"infer", "read"}),
        ("fraud-*",),
        2.0,
        3,
        ("CN=fraud-client,O=Acme",),
    )
    assert ops.digest == bytes.fromhex(SHA_B)  # upper-case hex accepted
    assert ops.models == ("*",) and ops.rate_per_s is None and ops.cert_subjects == ()
    assert SCOPES == ("infer", "read", "admin")


def test_default_burst_is_the_rate_rounded_up_at_least_one():
    assert parse_entry(entry(rate_per_s=2.5), "x").burst == 3
    assert parse_entry(entry(rate_per_s=0.2), "x").burst == 1
    assert parse_entry(entry(rate_per_s=100), "x").burst == 100


def test_empty_key_list_is_allowed_and_refuses_everyone(tmp_path):
    s = KeyStore(write(tmp_path / "k.yaml", "keys: []\n"))
    assert len(s) == 0
    refused(ErrorCode.UNAUTHENTICATED, s.authenticate, f"Bearer {TOKEN_A}")


@pytest.mark.parametrize(
    "text, words",
    [
        ("", ["is empty", "keys: []"]),
        ("- id: a\n", ["bare list", "put 'keys:' above it"]),
        ("key: []\n", ["unknown entry 'key'", "did you mean 'keys'"]),
        ("keys:\n", ["'keys' must be a list", "keys: []"]),
        ("keys: {id: a}\n", ["'keys' must be a list"]),
        ("keys: [\n", ["is not valid YAML"]),
        ("keys: [x]\n", ["entry 0", "must be a mapping"]),
        ('"\\U80092014"\n', ["is not valid YAML"]),  # PyYAML raises OverflowError / ValueError here
        ("[" * 5000 + "]" * 5000, ["is not valid YAML"]),  # nesting: RecursionError in PyYAML
    ],
)
def test_file_level_errors(tmp_path, text, words):
    message = file_error(tmp_path, text)
    assert "bad.yaml" in message
    for w in words:
        assert w in message, message


def _aliases(levels: int) -> str:
    """A list nesting itself by YAML alias, nine copies a level: a few hundred bytes of text, nine
    to the ``levels`` strings when written out whole."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(anchors) + "]"


@pytest.mark.parametrize(
    "text",
    [
        "keys: {{a: {}}}\n",  # 'keys' not a list
        "keys:\n  - id: {}\n",  # an id not a string
        f"keys:\n  - id: a\n    sha256: '{SHA_A}'\n    scopes: [read]\n    rate_per_s: {{}}\n",
        f"keys:\n  - id: a\n    sha256: '{SHA_A}'\n    scopes: [read]\n    models: [{{}}]\n",
    ],
)
def test_a_value_of_aliases_is_quoted_bounded(tmp_path, text):
    """The value a mistake is about is quoted in the error, bounded. It was written out whole
    first (``str``), then cut: this file of under 500 bytes took `keys check` 40 s and 4 GB
    before a MemoryError, and at a reload the server's watch the same."""
    tracemalloc.start()
    try:
        message = file_error(tmp_path, text.format(_aliases(6)))  # 9^7 strings: ~30 MB written out
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "bad.yaml" in message and len(message) < 400, message
    assert peak < 8 << 20, peak


def test_a_yaml_error_names_the_place_without_quoting_the_file(tmp_path):
    """PyYAML's message quotes the lines around a syntax error; a keys file that wrongly holds a
    token (the mistake the 'token' field refusal guards against) and is also malformed put the
    token in the ERROR line of every reload, and in `batchgate keys check`'s output."""
    message = file_error(tmp_path, f"keys:\n  - id: a\n    scopes: [infer\n  - id: b {TOKEN_B}\n")
    assert TOKEN_B not in message and "token-of" not in message, message
    assert "is not valid YAML" in message and "line 4, column 7" in message, message


def test_non_utf8_file_is_a_config_error(tmp_path):
    message = file_error(tmp_path, b"keys: []\n# \xff\xfe\n")
    assert "not UTF-8" in message and "bad.yaml" in message


def test_missing_file_and_directory_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read keys file .*nope.yaml"):
        KeyStore(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not a regular file"):
        KeyStore(str(tmp_path))


def test_file_over_4_mib_is_refused(tmp_path):
    message = file_error(tmp_path, "keys: []\n" + "#" * MAX_FILE_BYTES + "\n")
    assert "4 MiB" in message


def test_more_than_max_keys_is_refused(tmp_path):
    text = "keys:\n" + "".join(f"- {{id: k{i}, sha256: '{i:064x}', scopes: [read]}}\n" for i in range(MAX_KEYS + 1))
    assert f"at most {MAX_KEYS}" in file_error(tmp_path, text)


def test_max_keys_is_accepted(tmp_path):
    text = "keys:\n" + "".join(f"- {{id: k{i}, sha256: '{i:064x}', scopes: [read]}}\n" for i in range(MAX_KEYS))
    assert len(KeyStore(write(tmp_path / "k.yaml", text))) == MAX_KEYS


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"scope": ["infer"]}, ["unknown field 'scope'", "did you mean 'scopes'", "allowed: id, sha256"]),
        ({"token": "bgk_x"}, ["field 'token' is refused", "store only its SHA-256 in 'sha256'"]),
        ({"secret": "x"}, ["field 'secret' is refused", "never store a token"]),
        ({"id": None}, ["field 'id' must be a string"]),
        ({"id": 12}, ["field 'id' must be a string (quote it)"]),
        ({"id": "has space"}, ["field 'id'", "not allowed", "[A-Za-z0-9_]"]),
        ({"id": "x" * 129}, ["field 'id'", "not allowed"]),
        ({"sha256": None}, ["field 'sha256' is required"]),
        ({"sha256": "abc"}, ["field 'sha256' must be 64 hex digits"]),
        ({"sha256": "g" * 64}, ["field 'sha256' must be 64 hex digits"]),
        ({"scopes": None}, ["field 'scopes' is required", "infer, read, admin"]),
        ({"scopes": []}, ["field 'scopes' must name at least one"]),
        ({"scopes": "infer"}, ["field 'scopes' must be a list", "[infer, read]"]),
        ({"scopes": ["infr"]}, ["unknown scope 'infr'", "did you mean 'infer'", "allowed: infer, read, admin"]),
        ({"scopes": [1]}, ["must hold strings"]),
        ({"models": []}, ["field 'models' is empty"]),
        # An empty field (or a file read half-written, cut after "models:") is refused, never
        # read as its default: for models and rate_per_s that is every model, no limit.
        ({"models": None}, ["field 'models' is empty", "leave the field out"]),
        ({"rate_per_s": None}, ["field 'rate_per_s' is empty"]),
        ({"rate_per_s": 1, "burst": None}, ["field 'burst' is empty"]),
        ({"cert_subjects": None}, ["field 'cert_subjects' is empty"]),
        ({"models": "fraud-*"}, ["field 'models' must be a list"]),
        ({"models": ["fraud-*, risk-*"]}, ["field 'models' has pattern", "one pattern per list item"]),
        ({"models": [""]}, ["field 'models' has pattern"]),
        ({"models": ["a/../b"]}, ["field 'models' has pattern"]),
        ({"models": ["x" * 257]}, ["field 'models' has pattern"]),
        ({"models": ["m"] * 257}, ["field 'models' has 257 items; at most 256"]),
        ({"rate_per_s": 0}, ["field 'rate_per_s' must be a number", "above 0"]),
        ({"rate_per_s": -1}, ["field 'rate_per_s'"]),
        ({"rate_per_s": True}, ["field 'rate_per_s'"]),
        ({"rate_per_s": float("inf")}, ["field 'rate_per_s'"]),
        ({"rate_per_s": float("nan")}, ["field 'rate_per_s'"]),
        ({"rate_per_s": "100"}, ["field 'rate_per_s'"]),
        ({"rate_per_s": 2e9}, ["field 'rate_per_s'"]),
        ({"burst": 5}, ["field 'burst' needs rate_per_s"]),
        ({"rate_per_s": 1, "burst": 0}, ["field 'burst' must be a whole number"]),
        ({"rate_per_s": 1, "burst": 2.5}, ["field 'burst' must be a whole number"]),
        ({"rate_per_s": 1, "burst": True}, ["field 'burst' must be a whole number"]),
        ({"cert_subjects": "CN=a"}, ["field 'cert_subjects' must be a list"]),
        ({"cert_subjects": ["no equals sign"]}, ["field 'cert_subjects' has", "RFC 4514"]),
        ({"cert_subjects": ["CN=a\nO=b"]}, ["field 'cert_subjects' has", "control characters"]),
        ({"cert_subjects": ["CN=" + "a" * 1100]}, ["field 'cert_subjects' has"]),
        ({"cert_subjects": ["CN=a,O=b", "cn=a, o=b"]}, ["field 'cert_subjects' lists", "twice"]),
    ],
)
def test_entry_errors_name_the_entry_and_field(fields, words):
    message = entry_error(**fields)
    assert message.startswith("keys file F: entry 0"), message
    for w in words:
        assert w in message, message


def test_entry_error_names_the_id_when_it_is_valid():
    assert entry_error(scopes=["x"]).startswith("keys file F: entry 0 (id 'k'): field 'scopes'")
    assert entry_error(id="bad id").startswith("keys file F: entry 0: field 'id'")


def test_a_token_in_the_file_is_never_echoed():
    assert "bgk_secret-value" not in entry_error(token="bgk_secret-value")


def test_missing_id_is_refused():
    with pytest.raises(ConfigError, match="field 'id' is required"):
        parse_entry({"sha256": SHA_A, "scopes": ["read"]}, "F")


def test_errors_in_the_file_name_file_entry_index_and_id(tmp_path):
    text = GOOD + f"  - id: third\n    sha256: {'0' * 64}\n    scopes: [infer]\n    modles: ['*']\n"
    message = file_error(tmp_path, text)
    assert "keys file" in message and "bad.yaml: entry 2 (id 'third'): unknown field 'modles'" in message
    assert "did you mean 'models'" in message


@pytest.mark.parametrize(
    "extra, words",
    [
        (f"  - {{id: ops, sha256: '{'1' * 64}', scopes: [read]}}\n", ["entry 2 (id 'ops')", "entry 1 has the same id"]),
        (
            f"  - {{id: other, sha256: '{SHA_A.upper()}', scopes: [read]}}\n",
            ["entry 2 (id 'other'): field 'sha256'", "same hash as entry 0 (id 'fraud-team')"],
        ),
        (
            f"  - {{id: other, sha256: '{'1' * 64}', scopes: [read], cert_subjects: ['cn=fraud-client, o=Acme']}}\n",
            ["entry 2 (id 'other'): field 'cert_subjects'", "already given to entry 0 (id 'fraud-team')"],
        ),
    ],
)
def test_duplicates_are_refused(tmp_path, extra, words):
    message = file_error(tmp_path, GOOD + extra)
    for w in words:
        assert w in message, message


# --- tokens and authentication --------------------------------------------------------------------


def test_hash_token_and_new_token():
    assert hash_token("abc") == hashlib.sha256(b"abc").hexdigest()
    a, b = new_token(), new_token()
    assert a != b and a.startswith("bgk_") and len(a) == 4 + 43 and a.isascii()


@pytest.mark.parametrize(
    "header", [f"Bearer {TOKEN_A}", f"bearer {TOKEN_A}", f"BEARER   {TOKEN_A}", f"Bearer {TOKEN_A} "]
)
def test_bearer_token_authenticates(store, header):
    assert store.authenticate(header).id == "fraud-team"


def test_each_token_finds_its_own_key(store):
    assert store.authenticate(f"Bearer {TOKEN_B}").id == "ops"


@pytest.mark.parametrize(
    "header, words",
    [
        (None, ["needs an API key", "Authorization: Bearer <token>"]),
        ("", ["not a bearer token", "Authorization: Bearer <token>"]),
        (f"Basic {TOKEN_A}", ["not a bearer token"]),
        (TOKEN_A, ["not a bearer token"]),
        ("Bearer", ["not a bearer token"]),
        ("Bearer ", ["not a bearer token"]),
        (f"Bearer {TOKEN_A} extra", ["not a bearer token"]),
        (f"Bearer\t{TOKEN_A}", ["not a bearer token"]),
        ("Bearer bgk_wrong", ["not valid (unknown or revoked)", "Authorization: Bearer <token>"]),
        ("Bearer " + "a" * 4097, ["4097 characters", "at most 4096"]),
        ("Bearer " + "a" * 9000, ["at most 4096"]),
        ("Bearer bgk_tökén", ["must be ASCII"]),
    ],
)
def test_bad_credentials_are_unauthenticated_and_never_echo_the_header(store, header, words):
    e = refused(ErrorCode.UNAUTHENTICATED, store.authenticate, header)
    for w in words:
        assert w in e.message, e.message
    for secret in ("bgk_", "aaaa", "tökén"):
        assert secret not in e.message


def test_token_of_4096_chars_is_checked_not_refused_for_length(store):
    e = refused(ErrorCode.UNAUTHENTICATED, store.authenticate, "Bearer " + "a" * 4096)
    assert "unknown or revoked" in e.message


def test_the_final_match_is_decided_by_compare_digest(store, monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return False  # a constant-time "not equal" must refuse even when the lookup hit

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    refused(ErrorCode.UNAUTHENTICATED, store.authenticate, f"Bearer {TOKEN_A}")
    assert calls == [(bytes.fromhex(SHA_A), bytes.fromhex(SHA_A))]
    refused(ErrorCode.UNAUTHENTICATED, store.authenticate, "Bearer unknown")
    assert len(calls) == 2 and len(calls[1][0]) == 32  # compared against a dummy digest when no key matched


@pytest.mark.parametrize("subject", ["CN=fraud-client,O=Acme", "cn=fraud-client, o=Acme", " CN = fraud-client ,O=Acme"])
def test_certificate_subject_acts_as_its_key_without_a_header(store, subject):
    assert store.authenticate(None, cert_subject=subject).id == "fraud-team"


def test_certificate_subject_values_are_compared_exactly(store):
    for subject in ("CN=Fraud-client,O=Acme", "CN=fraud-client,O=Acme,C=US", "O=Acme,CN=fraud-client"):
        e = refused(ErrorCode.UNAUTHENTICATED, store.authenticate, None, subject)
        assert "not given to any API key" in e.message and "Authorization: Bearer <token>" in e.message


def test_a_header_wins_over_the_certificate(store):
    refused(ErrorCode.UNAUTHENTICATED, store.authenticate, "Bearer bgk_wrong", "CN=fraud-client,O=Acme")
    assert store.authenticate(f"Bearer {TOKEN_B}", "CN=fraud-client,O=Acme").id == "ops"


def test_an_over_long_certificate_subject_is_refused(store):
    e = refused(ErrorCode.UNAUTHENTICATED, store.authenticate, None, "CN=" + "a" * 5000)
    assert "needs an API key" in e.message and "a" * 200 not in e.message


def test_normalize_subject_keeps_values_and_escapes():
    assert normalize_subject(" cn = a , o=Acme\\, Inc\\ +ou=x") == "CN=a,O=Acme\\, Inc\\ +OU=x"
    assert normalize_subject("2.5.4.3=#0c01, CN=b") == "2.5.4.3=#0c01,CN=b"
    assert normalize_subject("CN=a b") == "CN=a b"


# --- authorization -------------------------------------------------------------------------------


def test_authorize_scopes(store):
    fraud = store.authenticate(f"Bearer {TOKEN_A}")
    store.authorize(fraud, "infer", "fraud-v2")
    store.authorize(fraud, "read")
    e = refused(ErrorCode.PERMISSION_DENIED, store.authorize, fraud, "admin", "fraud-v2")
    assert "'fraud-team'" in e.message and "scope 'admin'" in e.message and "infer, read" in e.message


def test_authorize_models_by_glob(store):
    fraud = store.authenticate(f"Bearer {TOKEN_A}")
    e = refused(ErrorCode.PERMISSION_DENIED, store.authorize, fraud, "infer", "risk-v1")
    assert "'fraud-team' may not use model 'risk-v1'" in e.message and "fraud-*" in e.message
    long = "x" * 1000
    e = refused(ErrorCode.PERMISSION_DENIED, store.authorize, fraud, "read", long)
    assert long not in e.message and "x" * 128 + "..." in e.message
    ops = store.authenticate(f"Bearer {TOKEN_B}")
    store.authorize(ops, "admin", "anything.at_all-1")


def test_unknown_scope_is_a_programming_error(store):
    with pytest.raises(ValueError):
        store.authorize(store.keys[0], "write")


@pytest.mark.parametrize(
    "patterns, name, allowed",
    [
        (("fraud-*",), "fraud-v2", True),
        (("fraud-*",), "Fraud-v2", False),  # case-sensitive (fnmatchcase)
        (("fraud-*",), "xfraud-v2", False),
        (("fraud-?",), "fraud-1", True),
        (("fraud-?",), "fraud-12", False),
        (("m[0-9]",), "m5", True),
        (("m[!0-9]",), "m5", False),
        (("a", "b.*"), "b.onnx", True),
        (("a", "b.*"), "ab", False),
        (("*",), "", True),
    ],
)
def test_allows_model(patterns, name, allowed):
    key = ApiKey("k", bytes(32), frozenset({"infer"}), patterns)
    assert key.allows_model(name) is allowed


# --- rate limits ---------------------------------------------------------------------------------


def test_rate_limit_burst_then_refill(store, clock):
    key = store.authenticate(f"Bearer {TOKEN_A}")  # 2 per second, burst 3
    for _ in range(3):
        store.charge(key)
    e = refused(ErrorCode.RESOURCE_EXHAUSTED, store.charge, key)
    assert "API key 'fraud-team' is over its rate of 2 requests/s" in e.message
    assert e.retry_after_s == pytest.approx(0.5)
    clock.t += 0.125  # a quarter of a token back: 0.375 s to the next
    e = refused(ErrorCode.RESOURCE_EXHAUSTED, store.charge, key)
    assert e.retry_after_s == pytest.approx(0.375)
    clock.t += 0.375
    store.charge(key)
    refused(ErrorCode.RESOURCE_EXHAUSTED, store.charge, key)
    clock.t += 100  # refills to the burst, no further
    for _ in range(3):
        store.charge(key)
    refused(ErrorCode.RESOURCE_EXHAUSTED, store.charge, key)


def test_a_refused_request_does_not_use_a_token(store, clock):
    key = store.authenticate(f"Bearer {TOKEN_A}")
    for _ in range(3):
        store.charge(key)
    for _ in range(10):
        refused(ErrorCode.RESOURCE_EXHAUSTED, store.charge, key)
    clock.t += 0.5
    store.charge(key)


def test_keys_without_a_rate_are_unlimited(store):
    ops = store.authenticate(f"Bearer {TOKEN_B}")
    for _ in range(10_000):
        store.charge(ops)


def test_buckets_are_per_key_id(tmp_path, clock):
    text = f"keys:\n- {{id: a, sha256: '{SHA_A}', scopes: [infer], rate_per_s: 1}}\n- {{id: b, sha256: '{SHA_B}', scopes: [infer], rate_per_s: 1}}\n"  # noqa: E501
    s = KeyStore(write(tmp_path / "k.yaml", text), clock=clock)
    a, b = s.keys
    s.charge(a)
    refused(ErrorCode.RESOURCE_EXHAUSTED, s.charge, a)
    s.charge(b)


def test_fractional_rate_retry_after(tmp_path, clock):
    s = KeyStore(
        write(tmp_path / "k.yaml", f"keys: [{{id: a, sha256: '{SHA_A}', scopes: [infer], rate_per_s: 0.25}}]"),
        clock=clock,
    )
    (a,) = s.keys
    s.charge(a)
    e = refused(ErrorCode.RESOURCE_EXHAUSTED, s.charge, a)
    assert e.retry_after_s == pytest.approx(4.0) and "rate of 0.25 requests/s (burst 1)" in e.message


# --- reloading -----------------------------------------------------------------------------------


def test_unchanged_file_is_not_reloaded(store, monkeypatch):
    monkeypatch.setattr(auth, "read_keys_file", lambda path: pytest.fail("read again"))
    assert store.reload_if_changed() is False


def test_reload_picks_up_a_new_key_and_revokes_a_removed_one(store, keys_file, tmp_path, caplog):

    token_c = "bgk_third"
    text = GOOD.split("  - id: ops")[0] + f"  - {{id: new, sha256: '{hash_token(token_c)}', scopes: [read]}}\n"
    write(Path(keys_file), text)
    with caplog.at_level(logging.INFO, logger="batchgate.auth"):
        assert polls(store) is True
    assert store.key_ids == ("fraud-team", "new")
    assert store.authenticate(f"Bearer {token_c}").id == "new"
    e = refused(ErrorCode.UNAUTHENTICATED, store.authenticate, f"Bearer {TOKEN_B}")  # ops revoked
    assert "revoked" in e.message
    (rec,) = [r for r in caplog.records if r.name == "batchgate.auth"]
    assert rec.levelno == logging.INFO and "2 keys" in rec.getMessage()
    assert "added new" in rec.getMessage() and "removed ops" in rec.getMessage()
    assert store.reload_if_changed() is False  # once per change


def test_bad_file_keeps_the_old_keys_and_logs_an_error_once(store, keys_file, caplog):

    write(Path(keys_file), GOOD.replace("scopes: [admin, read]", "scopes: [admin, raed]"))
    with caplog.at_level(logging.INFO, logger="batchgate.auth"):
        assert polls(store) is False
        assert store.reload_if_changed() is False
    errors = [r for r in caplog.records if r.name == "batchgate.auth"]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert "unknown scope 'raed'" in errors[0].getMessage() and "keeping the 2 keys" in errors[0].getMessage()
    assert store.reload_failures == 1  # (once per change, as the log line: batchgate_reload_failures_total)
    assert store.authenticate(f"Bearer {TOKEN_B}").id == "ops"
    write(Path(keys_file), GOOD)  # fixed: loaded again
    assert polls(store) is True


def test_deleted_file_keeps_the_old_keys(store, keys_file, caplog):
    os.unlink(keys_file)
    with caplog.at_level(logging.ERROR, logger="batchgate.auth"):
        assert polls(store) is False
    assert "cannot read keys file" in caplog.text
    assert len(store) == 2


def test_atomic_replace_is_seen_even_with_the_same_size_and_time(store, keys_file, tmp_path):
    # A new inode (rename over the file, as Kubernetes secret volumes and editors do).
    st = os.stat(keys_file)
    new = tmp_path / "new.yaml"
    new.write_text(GOOD.replace("ops", "opz"))
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, keys_file)
    assert polls(store) is True
    assert store.key_ids == ("fraud-team", "opz")


def test_a_rewrite_in_place_with_the_same_size_and_time_is_seen(store, keys_file):
    # Same inode, same size, mtime put back (cp -p, touch -r): only ctime tells. A revocation
    # written this way must not be missed.
    st = os.stat(keys_file)
    with open(keys_file, "r+") as f:
        f.write(GOOD.replace("ops", "opz"))
    os.utime(keys_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(keys_file)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert polls(store) is True
    assert store.key_ids == ("fraud-team", "opz")


def test_a_file_cut_after_an_empty_models_field_keeps_the_old_keys(store, keys_file):
    write_cut = GOOD[: GOOD.index('["fraud-*"]')]  # "models:" with nothing after it
    write(Path(keys_file), write_cut)
    assert polls(store) is False
    key = store.authenticate(f"Bearer {TOKEN_A}")
    assert not key.allows_model("other-model")


def test_buckets_survive_a_reload_and_take_new_rates(store, keys_file, clock):

    key = store.authenticate(f"Bearer {TOKEN_A}")
    for _ in range(3):
        store.charge(key)
    write(Path(keys_file), GOOD.replace("ops", "opz"))
    assert polls(store) is True
    refused(ErrorCode.RESOURCE_EXHAUSTED, store.charge, key)  # still empty after the reload
    write(Path(keys_file), GOOD.replace("rate_per_s: 2", "rate_per_s: 10"))
    assert polls(store) is True
    clock.t += 0.1
    store.charge(key)  # 10/s now: a token after 0.1 s
    refused(ErrorCode.RESOURCE_EXHAUSTED, store.charge, key)


def test_a_revoked_then_restored_id_starts_with_a_full_bucket(store, keys_file):

    key = store.authenticate(f"Bearer {TOKEN_A}")
    for _ in range(3):
        store.charge(key)
    write(Path(keys_file), "keys: []\n")
    assert polls(store) is True
    store.charge(key)  # revoked since authenticated: no bucket, not limited (authenticate refuses it)
    write(Path(keys_file), GOOD)
    assert polls(store) is True
    for _ in range(3):
        store.charge(key)


async def test_watch_reloads_until_cancelled(store, keys_file):

    task = asyncio.create_task(store.watch(0.01))
    write(Path(keys_file), "keys: []\n")
    for _ in range(500):
        if len(store) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(store) == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watch_survives_a_bad_file(store, keys_file, caplog):

    task = asyncio.create_task(store.watch(0.01))
    write(Path(keys_file), "keys: [\n")
    for _ in range(500):  # read once it stood still for a poll
        if "not valid YAML" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert len(store) == 2 and not task.done()
    write(Path(keys_file), "keys: []\n")
    for _ in range(500):
        if len(store) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(store) == 0
    task.cancel()
    assert "not valid YAML" in caplog.text
