"""API keys, scopes, the admin boundary and the audit log, through real tritonclient clients on
both protocols (issue: safe to expose). Keys are made the way an operator makes them
(``new_token`` / ``hash_token``, as ``batchgate keys new`` does)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from batchgate.demo import build_demo_repository
from batchgate.security.auth import hash_token, new_token
from gateway_support import judge_while_half_written

INFER_TOKEN, READ_TOKEN, ADMIN_TOKEN, SLOW_TOKEN, SIMPLE_ADMIN_TOKEN, SIMPLE_READ_TOKEN = (
    new_token() for _ in range(6)
)


def fetch(req) -> bytes:
    """The body of an HTTP GET / POST, the connection closed whatever the answer: an HTTPError
    comes back with its body read into memory (an unclosed one leaves its socket to the collector,
    which warns in whichever test runs then)."""
    try:
        with urllib.request.urlopen(req) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        with e:
            body = e.read()
        raise urllib.error.HTTPError(e.url, e.code, e.msg, e.hdrs, io.BytesIO(body)) from None


def keys_yaml(extra: list[dict] | None = None) -> str:
    entries = [
        {"id": "app", "sha256": hash_token(INFER_TOKEN), "scopes": ["infer"], "models": ["simp*"]},
        {"id": "dash", "sha256": hash_token(READ_TOKEN), "scopes": ["read"]},
        {"id": "ops", "sha256": hash_token(ADMIN_TOKEN), "scopes": ["admin", "read", "infer"]},
        {"id": "metered", "sha256": hash_token(SLOW_TOKEN), "scopes": ["infer"], "rate_per_s": 0.5, "burst": 2},
        {"id": "simpleops", "sha256": hash_token(SIMPLE_ADMIN_TOKEN), "scopes": ["admin", "read"], "models": ["simp*"]},
        {"id": "simplereader", "sha256": hash_token(SIMPLE_READ_TOKEN), "scopes": ["read"], "models": ["simp*"]},
    ]
    return yaml.safe_dump({"keys": entries + (extra or [])})


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return build_demo_repository(str(tmp_path_factory.mktemp("models")))


@pytest.fixture
def keyed(repo, serve, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(keys_yaml())
    audit = tmp_path / "audit.log"
    running = serve(
        repo,
        api_keys_file=str(keys),
        api_keys_poll_s=0.1,
        audit_log_file=str(audit),
        model_control_mode="explicit",
        load_model=("simple", "classifier"),
        allow_open_admin=False,
    )
    running.keys_file, running.audit_file = keys, audit
    return running


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def simple_inputs(mod):
    out = []
    for n in ("INPUT0", "INPUT1"):
        i = mod.InferInput(n, [1, 16], "INT32")
        i.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
        out.append(i)
    return out


def clients(running):
    return [
        (grpcclient, grpcclient.InferenceServerClient(running.grpc_url)),
        (httpclient, httpclient.InferenceServerClient(running.http_url)),
    ]


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as ei:
        call()
    return str(ei.value.status()), ei.value.message() or ""


UNAUTH = {"StatusCode.UNAUTHENTICATED", "401"}
DENIED = {"StatusCode.PERMISSION_DENIED", "403"}
EXHAUSTED = {"StatusCode.RESOURCE_EXHAUSTED", "429"}


def test_infer_needs_a_valid_key_with_the_scope_and_model(keyed):
    for mod, c in clients(keyed):
        # no key, a made-up key, a malformed header: 401 / UNAUTHENTICATED, the token never echoed
        for headers in ({}, bearer("bgk_" + "x" * 43), {"authorization": "Basic dXNlcjpwYXNz"}):
            code, msg = status_of(partial(c.infer, "simple", simple_inputs(mod), headers=headers))
            assert code in UNAUTH, (mod.__name__, code, msg)
            assert "x" * 43 not in msg
        # an unknown model is not revealed to a caller without a key: 401, not 404
        code, _ = status_of(partial(c.infer, "no_such_model", simple_inputs(mod)))
        assert code in UNAUTH
        # the right key: answered
        r = c.infer("simple", simple_inputs(mod), headers=bearer(INFER_TOKEN))
        assert r.as_numpy("OUTPUT0").shape == (1, 16)
        # a key without the scope, or whose models do not match: 403 / PERMISSION_DENIED
        code, msg = status_of(partial(c.infer, "simple", simple_inputs(mod), headers=bearer(READ_TOKEN)))
        assert code in DENIED and "scope 'infer'" in msg
        x = mod.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        code, msg = status_of(partial(c.infer, "classifier", [x], headers=bearer(INFER_TOKEN)))
        assert code in DENIED and "model 'classifier'" in msg


def test_read_scope_guards_metadata_and_filters_the_index(keyed):
    g = grpcclient.InferenceServerClient(keyed.grpc_url)
    h = httpclient.InferenceServerClient(keyed.http_url)
    for c in (g, h):
        code, _ = status_of(lambda c=c: c.get_model_metadata("simple"))
        assert code in UNAUTH
        code, _ = status_of(lambda c=c: c.get_model_metadata("simple", headers=bearer(INFER_TOKEN)))
        assert code in DENIED
        assert c.get_model_metadata("simple", headers=bearer(READ_TOKEN))
        assert c.get_model_config("simple", headers=bearer(READ_TOKEN))
        assert c.get_inference_statistics("simple", headers=bearer(READ_TOKEN))
    # health stays open by default (kubelet probes have no key)
    assert g.is_server_live() and g.is_server_ready() and h.is_server_live() and h.is_server_ready()
    names = {m["name"] for m in h.get_model_repository_index(headers=bearer(READ_TOKEN))}
    assert {"simple", "classifier"} <= names


def test_two_credentials_are_refused_whichever_comes_first(keyed):
    """A proxy that adds its own Authorization to a caller's must not let either win by order."""
    import http.client

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    pairs = ((READ_TOKEN, INFER_TOKEN), (INFER_TOKEN, READ_TOKEN), ("bgk_junk", READ_TOKEN))
    with grpc.insecure_channel(keyed.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for first, second in pairs:
            md = (("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}"))
            with pytest.raises(grpc.RpcError) as ei:
                stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="simple"), metadata=md)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "more than one authorization" in ei.value.details()
    host, port = keyed.http_url.split(":")
    for first, second in pairs:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.putrequest("GET", "/v2/models/simple")
        conn.putheader("Authorization", f"Bearer {first}")
        conn.putheader("Authorization", f"Bearer {second}")
        conn.endheaders()
        answer = conn.getresponse()
        body = answer.read().decode()
        assert answer.status == 401 and "more than one authorization" in body, body
        assert first not in body and second not in body
        conn.close()


def test_a_stream_without_a_key_for_infer_is_refused_when_it_opens(repo, serve, tmp_path):
    """A ModelStreamInfer stream is judged when it opens: no key, an unknown one or one without
    scope infer ends it at once (UNAUTHENTICATED / PERMISSION_DENIED) before any request is sent.
    Before, such a stream stayed open as long as its client liked, answering each request with an
    error: strangers with no key held the server's streams (grpc_max_streaming_calls, 2 here) and
    a caller with a key was refused RESOURCE_EXHAUSTED."""
    import queue
    import threading

    import grpc
    from tritonclient.grpc import service_pb2_grpc

    keys = tmp_path / "keys.yaml"
    keys.write_text(keys_yaml())
    running = serve(repo, api_keys_file=str(keys), grpc_max_streaming_calls=2)
    quiet = threading.Event()  # the strangers send nothing until the end of the test

    def nothing():
        quiet.wait(60)
        yield from ()

    strangers = {
        (): grpc.StatusCode.UNAUTHENTICATED,
        (("authorization", "Bearer bgk_" + "x" * 43),): grpc.StatusCode.UNAUTHENTICATED,
        (("authorization", f"Bearer {READ_TOKEN}"),): grpc.StatusCode.PERMISSION_DENIED,
    }
    try:
        with grpc.insecure_channel(running.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for md, code in strangers.items():
                call = stub.ModelStreamInfer(nothing(), metadata=md, timeout=30)
                assert call.code() == code, (md, call.code())  # (ends without a request sent)
        answers: queue.Queue = queue.Queue()
        c = grpcclient.InferenceServerClient(running.grpc_url)
        c.start_stream(lambda result, error: answers.put((result, error)), headers=bearer(INFER_TOKEN))
        c.async_stream_infer("simple", simple_inputs(grpcclient))
        result, error = answers.get(timeout=30)
        assert error is None, error
        assert result.as_numpy("OUTPUT0").shape == (1, 16)
        c.stop_stream()
        c.close()
    finally:
        quiet.set()


def test_grpc_reflection_needs_a_key_of_scope_read(keyed):
    """With keys, gRPC reflection is a call like the others, for a key of scope read (grpcurl
    sends one with -H): a stranger's reflection stream ends at once, UNAUTHENTICATED, rather
    than stay open (before, it answered anyone, and open reflection streams held places of
    grpc_max_streaming_calls that callers with a key then lacked)."""
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def services(md) -> set[str]:
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with grpc.insecure_channel(keyed.grpc_url) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            (answer,) = stub.ServerReflectionInfo(iter([ask]), metadata=md, timeout=30)
        return {s.name for s in answer.list_services_response.service}

    for md, code in (
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer bgk_" + "x" * 43),), grpc.StatusCode.UNAUTHENTICATED),
        (tuple(bearer(INFER_TOKEN).items()), grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.RpcError) as ei:
            services(md)
        assert ei.value.code() == code, md
    assert "inference.GRPCInferenceService" in services(tuple(bearer(READ_TOKEN).items()))


def test_admin_scope_guards_load_and_unload_and_every_attempt_is_audited(keyed):
    for _, c in clients(keyed):
        code, _ = status_of(lambda c=c: c.unload_model("classifier", headers=bearer(READ_TOKEN)))
        assert code in DENIED
        code, _ = status_of(lambda c=c: c.load_model("classifier"))
        assert code in UNAUTH
        c.unload_model("classifier", headers=bearer(ADMIN_TOKEN))
        c.load_model("classifier", headers=bearer(ADMIN_TOKEN))
        assert c.is_model_ready("classifier", headers=bearer(ADMIN_TOKEN))
    lines = [json.loads(line) for line in keyed.audit_file.read_text().splitlines()]
    assert len(lines) == 8
    assert [(r["action"], r["outcome"], r.get("key_id")) for r in lines[:4]] == [
        ("repository.unload", "PERMISSION_DENIED", "dash"),  # a known key, refused: named
        ("repository.load", "UNAUTHENTICATED", None),
        ("repository.unload", "ok", "ops"),
        ("repository.load", "ok", "ops"),
    ]
    loaded = lines[3]
    assert loaded["target"] == "classifier" and loaded["peer"]
    assert any(name.endswith("model.onnx") and len(digest) == 64 for name, digest in loaded["files"].items())
    text = keyed.audit_file.read_text()
    for token in (INFER_TOKEN, READ_TOKEN, ADMIN_TOKEN):
        assert token not in text


def test_a_load_with_a_config_is_audited_with_that_config_not_the_folders(keyed):
    """A load given a config (Triton's override) builds the model from that config alone: its
    record holds the SHA-256 of the config as given (``config_sha256``) and the folder's other
    files, not the folder's config.pbtxt, which was not read. Before, the record named the
    folder's config.pbtxt and its hash, and nothing of the config the model was loaded with."""
    import hashlib

    tensors = [{"name": n, "data_type": "TYPE_INT32", "dims": [16]} for n in ("INPUT0", "INPUT1")]
    config = {
        "name": "simple",
        "backend": "onnxruntime",
        "input": tensors,
        "output": [dict(t, name=t["name"].replace("IN", "OUT")) for t in tensors],
    }
    for mod, c in clients(keyed):
        batch = 3 if mod is grpcclient else 5  # (the folder's config.pbtxt says 8)
        text = json.dumps(dict(config, max_batch_size=batch))
        c.load_model("simple", config=text, headers=bearer(ADMIN_TOKEN))
        loaded = c.get_model_config("simple", headers=bearer(ADMIN_TOKEN))
        assert (loaded.config.max_batch_size if mod is grpcclient else loaded["max_batch_size"]) == batch
        record = json.loads(keyed.audit_file.read_text().splitlines()[-1])
        assert (record["action"], record["outcome"], record["key_id"]) == ("repository.load", "ok", "ops")
        assert record["config_sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert set(record["files"]) == {"1/model.onnx"}
    # without a config, the folder's config.pbtxt is what was loaded: named, and no config_sha256
    httpclient.InferenceServerClient(keyed.http_url).load_model("simple", headers=bearer(ADMIN_TOKEN))
    record = json.loads(keyed.audit_file.read_text().splitlines()[-1])
    assert set(record["files"]) == {"1/model.onnx", "config.pbtxt"} and "config_sha256" not in record


MALFORMED_ADMIN_BODIES = [
    ("repository.load", "simple", "/v2/repository/models/simple/load", b"[]"),
    ("repository.load", "simple", "/v2/repository/models/simple/load", b'{"parameters": []}'),
    ("repository.load", "simple", "/v2/repository/models/simple/load", b'{"parameters": {"file:1/model.onnx": "!!"}}'),
    ("repository.unload", "simple", "/v2/repository/models/simple/unload", b"{"),
    ("logging.update", "logging", "/v2/logging", b"[1]"),
    ("tracing.update", "model simple", "/v2/models/simple/trace/setting", b'"x"'),
    ("shm.register", "r1", "/v2/systemsharedmemory/region/r1/register", b"[]"),
]


@pytest.mark.parametrize(("action", "target", "path", "body"), MALFORMED_ADMIN_BODIES)
def test_a_malformed_admin_body_is_judged_after_the_caller_and_audited(keyed, action, target, path, body):
    """The body of an admin call over HTTP (repository load / unload, log and trace settings,
    shared-memory registration) was parsed before the caller was checked: a caller without a key
    got the 400 of its malformed body instead of 401, and neither attempt reached the audit
    log. Now: no key, 401; a key without the scope, 403; a key allowed, the 400; each audited."""
    before = len(keyed.audit_file.read_text().splitlines())
    url = f"http://{keyed.http_url}{path}"
    codes = []
    for headers in ({}, bearer(READ_TOKEN), bearer(ADMIN_TOKEN)):
        with pytest.raises(urllib.error.HTTPError) as ei:
            fetch(urllib.request.Request(url, data=body, headers=headers, method="POST"))
        codes.append(ei.value.code)
    assert codes == [401, 403, 400]
    lines = [json.loads(line) for line in keyed.audit_file.read_text().splitlines()[before:]]
    assert [(r["action"], r["target"], r["outcome"], r["key_id"]) for r in lines] == [
        (action, target, "UNAUTHENTICATED", None),
        (action, target, "PERMISSION_DENIED", "dash"),
        (action, target, "INVALID_ARGUMENT", "ops"),
    ]


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"ready": "false"}'])
def test_a_malformed_index_body_is_judged_after_the_caller(keyed, body):
    """The repository index read its body before the caller was checked: a caller with no key
    (or with a key that may not read) learnt how its body was wrong, 400, instead of 401 / 403."""
    url = f"http://{keyed.http_url}/v2/repository/index"
    codes = []
    for headers in ({}, bearer(INFER_TOKEN), bearer(READ_TOKEN)):
        with pytest.raises(urllib.error.HTTPError) as ei:
            fetch(urllib.request.Request(url, data=body, headers=headers, method="POST"))
        codes.append(ei.value.code)
    assert codes == [401, 403, 400]
    ok = json.loads(
        fetch(urllib.request.Request(url, data=b'{"ready": true}', headers=bearer(READ_TOKEN), method="POST"))
    )
    assert {r["name"] for r in ok} == {"simple", "classifier"}


# Characters JSON leaves as they are but that split a line (str.splitlines) or change how it reads.
SPLITTERS = "\u2028\u2029\x85\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_a_name_with_line_separators_and_bidi_controls_is_one_escaped_audit_record(keyed):
    """RepositoryModelUnload (gRPC) and repository unload (HTTP) named with U+202E, U+2028 and
    U+0085: without a key, with a key lacking admin, with an admin key (an invalid name). Each
    attempt is one record that str.splitlines() keeps whole, and the file holds none of those
    characters raw (they showed "risk" + "attack" reversed, and cut a record in three)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    name = "risk\u202ekcatta\u2028second\x85third\u2066x\u2069"
    before = keyed.audit_file.read_bytes().count(b"\n")
    with grpc.insecure_channel(keyed.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for md in ((), (("authorization", f"Bearer {READ_TOKEN}"),), (("authorization", f"Bearer {ADMIN_TOKEN}"),)):
            with pytest.raises(grpc.RpcError):
                stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name=name), metadata=md)
    url = f"http://{keyed.http_url}/v2/repository/models/{urllib.parse.quote(name)}/unload"
    for headers in ({}, bearer(READ_TOKEN), bearer(ADMIN_TOKEN)):
        with pytest.raises(urllib.error.HTTPError):
            fetch(urllib.request.Request(url, data=b"{}", headers=headers, method="POST"))
    raw = keyed.audit_file.read_bytes()
    records = raw.split(b"\n")[before:-1]
    assert len(records) == 6 and raw.endswith(b"\n")
    text = raw.decode("utf-8")
    assert len(text.splitlines()) == raw.count(b"\n")  # one line per record, whoever reads it
    assert not [c for c in SPLITTERS if c in text]
    got = [json.loads(r) for r in records]
    assert [(r["outcome"], r["key_id"]) for r in got] == 2 * [
        ("UNAUTHENTICATED", None),
        ("PERMISSION_DENIED", "dash"),
        ("INVALID_ARGUMENT", "ops"),
    ]
    for r in got:
        assert r["action"] == "repository.unload"
        assert r["target"] == "risk\\u202ekcatta\\u2028second\\x85third\\u2066x\\u2069", r


def test_the_audit_peer_is_the_socket_s_whatever_x_forwarded_for_says(keyed, monkeypatch):
    """uvicorn trusted X-Forwarded-For from 127.0.0.1 (anyone's, with FORWARDED_ALLOW_IPS=*):
    a local client, a port-forward or a sidecar wrote 9.9.9.9 as the admin's address."""
    before = len(keyed.audit_file.read_text().splitlines())
    c = httpclient.InferenceServerClient(keyed.http_url)
    c.unload_model("classifier", headers={**bearer(ADMIN_TOKEN), "X-Forwarded-For": "9.9.9.9"})
    c.load_model("classifier", headers={**bearer(ADMIN_TOKEN), "X-Forwarded-For": "9.9.9.9"})
    lines = [json.loads(line) for line in keyed.audit_file.read_text().splitlines()[before:]]
    assert [r["action"] for r in lines] == ["repository.unload", "repository.load"]
    assert all(r["peer"].startswith("127.0.0.1:") and r["peer"] != "127.0.0.1:0" for r in lines), lines


def test_an_ipv6_peer_is_audited_in_brackets(repo, serve, tmp_path):
    """Over HTTP an IPv6 peer was audited as "::1:51234": which colon starts the port could not be
    told (gRPC's peers read "ipv6:[::1]:51234"). Now "[::1]:51234"."""
    keys, audit = tmp_path / "keys.yaml", tmp_path / "audit.log"
    keys.write_text(keys_yaml())
    running = serve(repo, host="::", api_keys_file=str(keys), audit_log_file=str(audit), allow_open_admin=False,
                    model_control_mode="explicit", load_model=("classifier",))  # fmt: skip
    url = f"http://[::1]:{running.gateway.http_port}/v2/repository/models/classifier/unload"
    fetch(urllib.request.Request(url, data=b"{}", headers={**bearer(ADMIN_TOKEN), "Content-Type": "application/json"}))
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
    host, _, port = record["peer"].rpartition(":")
    assert record["action"] == "repository.unload" and host == "[::1]" and port.isdigit(), record


def test_a_key_over_its_rate_gets_429_with_retry_after(keyed):
    c = httpclient.InferenceServerClient(keyed.http_url)
    c.infer("simple", simple_inputs(httpclient), headers=bearer(SLOW_TOKEN))
    c.infer("simple", simple_inputs(httpclient), headers=bearer(SLOW_TOKEN))
    code, msg = status_of(lambda: c.infer("simple", simple_inputs(httpclient), headers=bearer(SLOW_TOKEN)))
    assert code in EXHAUSTED and "'metered' is over its rate" in msg
    req = urllib.request.Request(
        f"http://{keyed.http_url}/v2/models/simple/infer",
        data=b"{}",
        headers={"Authorization": f"Bearer {SLOW_TOKEN}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as ei:
        fetch(req)
    assert ei.value.code == 429
    wait = int(ei.value.headers["Retry-After"])
    assert wait >= 1
    time.sleep(wait)  # a client that waits what it was told is served (the wait is rounded up, never down)
    c.infer("simple", simple_inputs(httpclient), headers=bearer(SLOW_TOKEN))


def test_a_key_whose_rate_is_next_to_nothing_is_refused_with_a_bounded_retry_after(repo, serve, tmp_path):
    """A rate the keys file and ``keys check`` accept as above 0, the smallest float, made the
    wait infinite: gRPC answered UNKNOWN (an OverflowError writing retry-after) and HTTP broke
    the answer, with a traceback logged each time; 1e-300 told clients to wait 10^300 s."""
    token = new_token()
    keys = tmp_path / "keys.yaml"
    entry = {"id": "dribble", "sha256": hash_token(token), "scopes": ["infer"], "rate_per_s": 5e-324}
    keys.write_text(yaml.safe_dump({"keys": [entry]}))
    running = serve(repo, api_keys_file=str(keys))
    for mod, c in clients(running):
        with contextlib.suppress(InferenceServerException):  # (the burst of 1: the first may pass)
            c.infer("simple", simple_inputs(mod), headers=bearer(token))
        code, msg = status_of(lambda c=c, mod=mod: c.infer("simple", simple_inputs(mod), headers=bearer(token)))
        assert code in EXHAUSTED and "'dribble' is over its rate" in msg, (code, msg)
    req = urllib.request.Request(
        f"http://{running.http_url}/v2/models/simple/infer",
        data=b"{}",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as ei:
        fetch(req)
    assert ei.value.code == 429
    assert 1 <= int(ei.value.headers["Retry-After"]) <= 86400


def test_settings_changes_check_the_keys_models_and_every_refusal_is_audited(keyed):
    """A key allowed some models changes the trace settings of those only; a refused change of the
    log or trace settings is audited with its error code, as a refused load is."""
    h = httpclient.InferenceServerClient(keyed.http_url)
    g = grpcclient.InferenceServerClient(keyed.grpc_url)
    for c in (h, g):
        code, _ = status_of(
            lambda c=c: c.update_trace_settings(
                "classifier", {"trace_level": ["OFF"]}, headers=bearer(SIMPLE_ADMIN_TOKEN)
            )
        )
        assert code in DENIED
        c.update_trace_settings("simple", {"trace_level": ["OFF"]}, headers=bearer(SIMPLE_ADMIN_TOKEN))
        code, _ = status_of(lambda c=c: c.update_log_settings({"log_verbose_level": 1}, headers=bearer(READ_TOKEN)))
        assert code in DENIED
        code, _ = status_of(lambda c=c: c.update_trace_settings(settings={"trace_level": ["OFF"]}))
        assert code in UNAUTH
        # settings that reach every model need a key allowed every model
        code, msg = status_of(
            lambda c=c: c.update_trace_settings(settings={"trace_level": ["OFF"]}, headers=bearer(SIMPLE_ADMIN_TOKEN))
        )
        assert code in DENIED and 'models are ["*"]' in msg
        code, _ = status_of(
            lambda c=c: c.update_log_settings({"log_verbose_level": 1}, headers=bearer(SIMPLE_ADMIN_TOKEN))
        )
        assert code in DENIED
    lines = [json.loads(line) for line in keyed.audit_file.read_text().splitlines()]
    got = [(r["action"], r["target"], r["outcome"], r.get("key_id")) for r in lines]
    assert got == 2 * [
        ("tracing.update", "model classifier", "PERMISSION_DENIED", "simpleops"),
        ("tracing.update", "model simple", "ok", "simpleops"),
        ("logging.update", "logging", "PERMISSION_DENIED", "dash"),
        ("tracing.update", "server", "UNAUTHENTICATED", None),
        ("tracing.update", "server", "PERMISSION_DENIED", "simpleops"),
        ("logging.update", "logging", "PERMISSION_DENIED", "simpleops"),
    ], got
    # (and a 401 over HTTP names the scheme, RFC 9110)
    with pytest.raises(urllib.error.HTTPError) as ei:
        fetch(f"http://{keyed.http_url}/v2/models/simple")
    assert ei.value.code == 401 and ei.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoking_a_key_in_the_file_takes_effect_without_restart(keyed):
    c = grpcclient.InferenceServerClient(keyed.grpc_url)
    assert c.infer("simple", simple_inputs(grpcclient), headers=bearer(INFER_TOKEN))
    entries = yaml.safe_load(keyed.keys_file.read_text())["keys"]
    keyed.keys_file.write_text(yaml.safe_dump({"keys": [e for e in entries if e["id"] != "app"]}))
    deadline = time.monotonic() + 10
    while True:
        try:
            c.infer("simple", simple_inputs(grpcclient), headers=bearer(INFER_TOKEN))
        except InferenceServerException as e:
            assert e.status() == "StatusCode.UNAUTHENTICATED"
            break
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.05)
    # an edit that breaks the file keeps the keys in force, and is counted for an alert (only the
    # log said so before)
    assert 'batchgate_reload_failures_total{file="api_keys"} 0.0' in fetch(keyed.metrics_url).decode()
    keyed.keys_file.write_text("keys: [{id: x}]\n")
    deadline = time.monotonic() + 10
    while 'batchgate_reload_failures_total{file="api_keys"} 1.0' not in fetch(keyed.metrics_url).decode():
        assert time.monotonic() < deadline, "the broken keys file is not counted"
        time.sleep(0.05)
    assert c.infer("simple", simple_inputs(grpcclient), headers=bearer(ADMIN_TOKEN))  # (the keys before it)


def test_metrics_and_health_can_require_a_key(repo, serve, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(keys_yaml())
    running = serve(repo, api_keys_file=str(keys), metrics_requires_key=True, health_requires_key=True)
    with pytest.raises(urllib.error.HTTPError) as ei:
        fetch(running.metrics_url)
    assert ei.value.code == 401
    req = urllib.request.Request(running.metrics_url, headers={"Authorization": f"Bearer {INFER_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        fetch(req)
    assert ei.value.code == 403  # scope read needed
    req = urllib.request.Request(running.metrics_url, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert b"batchgate_" in fetch(req)
    # a key that may read some models only: the figures name every model, so no
    req = urllib.request.Request(running.metrics_url, headers={"Authorization": f"Bearer {SIMPLE_READ_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        fetch(req)
    assert ei.value.code == 403 and b"every model" in ei.value.read()
    with pytest.raises(urllib.error.HTTPError) as ei:
        fetch(f"http://{running.http_url}/v2/health/live")
    assert ei.value.code == 401
    h = httpclient.InferenceServerClient(running.http_url)
    assert not h.is_server_live() and h.is_server_live(headers=bearer(READ_TOKEN))
    g = grpcclient.InferenceServerClient(running.grpc_url)
    code, _ = status_of(lambda: g.is_server_ready())
    assert code in UNAUTH
    assert g.is_server_ready(headers=bearer(READ_TOKEN))


def test_without_keys_the_server_is_open_but_admin_is_refused_unless_allowed(repo, serve, tmp_path):
    closed = serve(repo, model_control_mode="explicit", load_model=("simple",), allow_open_admin=False)
    for mod, c in clients(closed):
        assert c.infer("simple", simple_inputs(mod)).as_numpy("OUTPUT0") is not None
        code, msg = status_of(lambda c=c: c.load_model("classifier"))
        assert code in DENIED and "allow_open_admin" in msg
    opened = serve(repo, model_control_mode="explicit", load_model=("simple",), allow_open_admin=True)
    for _, c in clients(opened):
        c.load_model("classifier")
        assert c.is_model_ready("classifier")
        c.unload_model("classifier")


def test_settings_that_ask_for_keys_without_a_keys_file_are_named_in_the_warning(repo, serve, caplog):
    """health_requires_key and metrics_requires_key need api_keys_file; without it the endpoints
    stay open, and the start-up warning says so by name (it said only that metadata was open)."""
    caplog.set_level(logging.WARNING, logger="batchgate")
    running = serve(repo, metrics_requires_key=True, health_requires_key=True)
    assert b"batchgate_" in fetch(running.metrics_url)  # open, as the warning says
    (line,) = [r.getMessage() for r in caplog.records if "no api_keys_file" in r.getMessage()]
    assert "metrics_requires_key has no effect without it: /metrics open to anyone" in line, line
    assert "health_requires_key has no effect without it: health endpoints open to anyone" in line, line


def test_the_admin_listener_serves_the_repository_api_and_health_only(repo, serve):
    running = serve(repo, model_control_mode="explicit", load_model=("simple",))
    assert running.gateway.settings.server.admin_host == "127.0.0.1"  # loopback unless told otherwise
    admin = httpclient.InferenceServerClient(f"127.0.0.1:{running.gateway.admin_http_port}")
    assert admin.is_server_live() and admin.is_server_ready()
    admin.load_model("classifier")
    assert httpclient.InferenceServerClient(running.http_url).is_model_ready("classifier")
    # a model's readiness is health too (it was 404 here, which tritonclient reads as not ready)
    assert admin.is_model_ready("classifier") and admin.is_model_ready("classifier", "1")
    assert not admin.is_model_ready("no_such_model")
    assert {m["name"] for m in admin.get_model_repository_index()} >= {"simple", "classifier"}
    code, msg = status_of(partial(admin.infer, "simple", simple_inputs(httpclient)))
    assert code == "404" and "admin listener" in msg
    admin.unload_model("classifier")


def test_a_keys_file_caught_half_written_is_never_applied(repo, serve, tmp_path):
    """A writer that rewrites the file in place and pauses between two writes (for less than a
    poll) is never read in between: cut after its scopes, "app" would reach every model, and
    "dash" after it would be 401. Polls are at least ``poll_s`` apart, so a file that has stood
    half-written for less than that cannot have been seen by two polls in a row: only answers
    given within that time are judged, whatever delays the test. Without the settle, a poll
    lands in the window of most attempts (about four in five)."""
    poll_s = 0.5
    full = (
        "keys:\n"
        "  - id: app\n"
        f"    sha256: {hash_token(INFER_TOKEN)}\n"
        "    scopes: [infer]\n"
        '    models: ["simp*"]\n'
        f"  - {{id: dash, sha256: {hash_token(READ_TOKEN)}, scopes: [read]}}\n"
    )
    half = full[: full.index("    models:")]
    keys = tmp_path / "keys.yaml"
    keys.write_text(full)
    running = serve(
        repo,
        api_keys_file=str(keys),
        api_keys_poll_s=poll_s,
        model_control_mode="explicit",
        load_model=("simple", "classifier"),
    )
    h = httpclient.InferenceServerClient(running.http_url)
    x = httpclient.InferInput("features", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))

    def mis_authorized() -> list[str]:
        wrong = []
        try:
            h.infer("classifier", [x], headers=bearer(INFER_TOKEN))
            wrong.append("app reached classifier")
        except InferenceServerException as e:
            if e.status() != "403":
                wrong.append(f"app got {e.status()}")
        try:
            h.get_model_metadata("simple", headers=bearer(READ_TOKEN))
        except InferenceServerException as e:
            wrong.append(f"dash got {e.status()}")
        return wrong

    assert mis_authorized() == []
    judge_while_half_written(keys, half, full, poll_s, mis_authorized, [])
    assert mis_authorized() == []
