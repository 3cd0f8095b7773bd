"""Request tracing (monitoring/tracing.py) end to end: real gateways exporting over OTLP/HTTP to a
receiver in the test (tests/otlp_support.py), real tritonclient clients on both protocols. The
spans' shape (Triton's: InferRequest, the model span, compute), W3C context honoured with its
sampled flag, a batch execution's span linked to every request it served, one trace across the hop
to a remote model, a collector that is down costing no request, and Triton's trace-setting API."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.demo import _save, classifier_model
from batchgate.remote_models import RemoteModel
from otlp_support import Receiver
from processes import free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
X = np.full((1, 4), 0.1, np.float32)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("trace_models"))
    # batched, with a queue delay long enough for concurrent requests to share an execution
    _save(
        classifier_model(),
        root,
        "clf",
        config="max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n",
    )
    return root


def _infer(protocol: str, running, headers=None, rid: str = "", model: str = "clf", x=X):
    mod = grpcclient if protocol == "grpc" else httpclient
    client = mod.InferenceServerClient(running.grpc_url if protocol == "grpc" else running.http_url)
    inp = mod.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], headers=headers, request_id=rid)


def _traced(serve, repo, receiver, **extra):
    return serve(repo, tracing="otlp", otlp_endpoint=receiver.endpoint, trace_sample_ratio=1.0, **extra)


@pytest.mark.parametrize(
    ("protocol", "otlp"), [("grpc", "http/protobuf"), ("http", "http/protobuf"), ("grpc", "grpc"), ("http", "grpc")]
)
def test_a_traced_request_has_triton_shaped_spans(repo, serve, protocol, otlp):
    """The same spans over both protocols, exported over OTLP/HTTP and over OTLP/gRPC."""
    receiver = Receiver("grpc" if otlp == "grpc" else "http")
    try:
        running = _traced(serve, repo, receiver, access_log="all", access_log_file="/dev/null", otlp_protocol=otlp)
        _infer(protocol, running, rid="order-5")
        _triton_shaped(receiver, protocol)
    finally:
        receiver.close()


def _triton_shaped(receiver, protocol: str) -> None:
    spans = receiver.wait(lambda s: len(s) >= 3)
    by_name = {s.name: s for s in spans}
    root, model, compute = by_name["InferRequest"], by_name["clf"], by_name["compute"]
    assert root.kind == 2 and root.parent_id == ""  # SERVER, a root
    assert root.attributes["batchgate.model"] == "clf" and root.attributes["batchgate.protocol"] == protocol
    assert root.attributes["batchgate.request.id"] == "order-5" and root.attributes["batchgate.model.version"] == "1"
    status_key = "rpc.response.status_code" if protocol == "grpc" else "http.response.status_code"
    assert root.attributes[status_key] in ("OK", 200)
    assert root.events == ["REQUEST_START", "ADMITTED", "REQUEST_END"]
    assert model.parent_id == root.span_id and model.trace_id == root.trace_id
    assert model.attributes == {"triton.model_name": "clf", "triton.model_version": "1", "triton.request_id": "order-5"}
    assert model.events == ["QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END"]
    assert compute.parent_id == model.span_id and compute.links == [(model.trace_id, model.span_id)]
    assert compute.attributes["batchgate.batch_size"] == 1
    assert root.start_ns <= model.start_ns <= compute.start_ns <= compute.end_ns <= model.end_ns <= root.end_ns
    assert root.resource["service.name"] == "batchgate"
    # Which replica: the host (the pod's name), also as service.instance.id, which OpenTelemetry
    # asks to be unique among a service's instances (it was absent in one process until 2026-12-06,
    # and "worker 0" in every pod with workers).
    host = socket.gethostname()
    assert root.resource["host.name"] == host and root.resource["service.instance.id"] == host


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_incoming_context_is_honoured_with_its_sampled_flag(repo, serve, receiver, protocol):
    running = serve(repo, tracing="otlp", otlp_endpoint=receiver.endpoint, trace_sample_ratio=0.0)
    _infer(protocol, running)  # ratio 0, no context: not traced
    _infer(protocol, running, headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-00"})  # the caller says no
    _infer(protocol, running, headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "tracestate": "vendor=x"})
    _infer(protocol, running, headers={"traceparent": "00-zz-not-valid-01"})  # invalid: a root, at ratio 0
    spans = receiver.wait(lambda s: len(s) >= 3)
    time.sleep(1.5)  # the exporter sends about once a second: nothing else may come
    spans = receiver.wait(lambda s: False, timeout=0.1)
    assert {s.trace_id for s in spans} == {TRACE_ID} and len(spans) == 3
    root = next(s for s in spans if s.name == "InferRequest")
    assert root.parent_id == PARENT


def test_two_traceparent_headers_start_a_trace_of_their_own(repo, serve, receiver):
    """W3C Trace Context: a request with more than one traceparent has none that counts (its
    test suite expects a new trace id). The first had been taken. (Over HTTP: grpcio keeps one
    value of a repeated metadata key, so only a client of its own could send gRPC two; the
    gRPC path reads its metadata with the same trace_context, unit-tested below.)"""
    import http.client

    running = _traced(serve, repo, receiver)
    other = "0af7651916cd43dd8448eb211c80319c"
    body = json.dumps(
        {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
    ).encode()
    conn = http.client.HTTPConnection(*running.http_url.split(":"))
    conn.putrequest("POST", "/v2/models/clf/infer")
    for p in (f"00-{TRACE_ID}-{PARENT}-01", f"00-{other}-{PARENT}-01"):
        conn.putheader("traceparent", p)
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(len(body)))
    conn.endheaders(body)
    assert conn.getresponse().status == 200
    conn.close()
    spans = receiver.wait(lambda s: any(x.name == "InferRequest" for x in s))
    root = next(s for s in spans if s.name == "InferRequest")
    assert root.trace_id not in (TRACE_ID, other) and root.parent_id == ""


def test_trace_context_joins_tracestate_headers_and_takes_no_duplicated_traceparent():
    from batchgate.monitoring.trace_context import trace_context

    one = f"00-{TRACE_ID}-{PARENT}-01"
    assert trace_context([("traceparent", one), ("tracestate", "a=1"), ("tracestate", "b=2")]) == (one, "a=1,b=2")
    assert trace_context([(b"traceparent", one.encode())], b"traceparent", b"tracestate") == (one, None)
    assert trace_context([("traceparent", one), ("traceparent", one)]) == (None, None)
    assert trace_context([]) == (None, None)


def test_an_untraced_requests_tracestate_goes_on_only_as_printable_ascii():
    """Passed on as it came to a remote model, a caller's tracestate could carry control or
    non-ASCII bytes (the h2 engine takes any byte but CR, LF and NUL in a value), which an upstream
    stricter than grpcio refuses with the call: W3C's tracestate is printable ASCII, its spaces
    SP or HTAB. A tab reads as a space; anything else outside that leaves the tracestate behind
    (the traceparent still goes)."""
    from batchgate.monitoring.trace_context import passed_on

    one = f"00-{TRACE_ID}-{PARENT}-01"
    assert passed_on(None, one, "a=1,b=2") == (("traceparent", one), ("tracestate", "a=1,b=2"))
    assert passed_on(None, one, "a=1,\tb=2") == (("traceparent", one), ("tracestate", "a=1, b=2"))
    for bad in ("a=1,\x01b=2", "a=\u00e9", "a=1\x7f", "a=1,b=2\x85"):
        assert passed_on(None, one, bad) == (("traceparent", one),), bad


def test_a_batch_execution_links_every_request_it_served(repo, serve, receiver):
    running = _traced(serve, repo, receiver)
    threads = [threading.Thread(target=_infer, args=("grpc", running)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = receiver.wait(lambda s: sum(x.name == "InferRequest" for x in s) >= 6)
    models = {s.span_id: s for s in spans if s.name == "clf"}
    computes = [s for s in spans if s.name == "compute"]
    assert len(models) == 6
    assert sorted(sid for c in computes for _, sid in c.links) == sorted(models)  # each request linked once
    biggest = max(computes, key=lambda c: len(c.links))
    assert len(biggest.links) >= 2 and biggest.attributes["batchgate.batch.requests"] == len(biggest.links)
    assert biggest.attributes["batchgate.batch_size"] == len(biggest.links)  # one row each


def test_a_batch_of_traced_and_untraced_requests_links_only_the_traced(repo, serve, receiver):
    from batchgate.monitoring import tracing

    running = _traced(serve, repo, receiver)
    unsampled = {"traceparent": f"00-{TRACE_ID}-{PARENT}-00"}  # the caller says: not this one
    threads = [threading.Thread(target=_infer, args=("grpc", running, unsampled if i % 2 else None)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = receiver.wait(lambda s: sum(x.name == "InferRequest" for x in s) >= 3)
    time.sleep(0.3)
    models = {s.span_id for s in spans if s.name == "clf"}
    assert len(models) == 3
    assert sorted(sid for c in spans if c.name == "compute" for _, sid in c.links) == sorted(models)
    # every request span ended leaves the open set (executions skip the search while it is empty)
    assert len(tracing.LIVE) == 0
    _infer("grpc", running, unsampled)
    assert len(tracing.LIVE) == 0


@pytest.mark.parametrize(("batching", "protocol"), [("gateway", "http"), ("passthrough", "grpc")])
def test_one_trace_crosses_the_hop_to_a_remote_model(repo, serve, receiver, batching, protocol):
    upstream = _traced(serve, repo, receiver, service_name="upstream")
    gateway = _traced(serve, "", receiver, remote_models=(RemoteModel("clf", (upstream.grpc_url,), batching=batching),))
    _infer(protocol, gateway, headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "tracestate": "congo=t61rcWk"})
    spans = receiver.wait(lambda s: len(s) >= 6)
    assert {s.trace_id for s in spans} == {TRACE_ID}
    up_root = next(s for s in spans if s.name == "InferRequest" and s.resource["service.name"] == "upstream")
    # the upstream's request is a child of our call to it (the execution; forwarded raw: the request)
    ours = "compute" if batching == "gateway" else "InferRequest"
    caller = next(s for s in spans if s.name == ours and s.resource["service.name"] == "batchgate")
    assert up_root.parent_id == caller.span_id
    assert up_root.trace_state == "congo=t61rcWk"  # the caller's tracestate went on with it (W3C)


@pytest.mark.parametrize(
    ("front", "protocol", "batching"),
    [
        ("tracing off", "grpc", "passthrough"),
        ("not sampled", "grpc", "passthrough"),
        ("tracing off", "http", "passthrough"),
        ("not sampled", "http", "passthrough"),
        ("tracing off", "grpc", "gateway"),
    ],
)
def test_a_request_the_gateway_does_not_trace_carries_its_callers_context_across_the_hop(
    repo, serve, receiver, front, protocol, batching
):
    """A request to a remote model that the gateway does not trace (tracing off, or the caller's
    flag 00) goes with the caller's traceparent and tracestate as they came: the upstream then
    follows the caller's trace and decision. It went with none, so the upstream started a trace
    of its own: a new trace id for a sampled caller, a traced request the caller said not to.
    Forwarded raw (gRPC) it did carry them since 2026-12-04; decoded (HTTP, or batched by the
    gateway) it carried nothing until 2026-12-06."""
    upstream = _traced(serve, repo, receiver, service_name="upstream")
    ours = {"tracing": "otlp", "otlp_endpoint": receiver.endpoint, "trace_sample_ratio": 0.0}
    gateway = serve(
        "",
        remote_models=(RemoteModel("clf", (upstream.grpc_url,), batching=batching),),
        **(ours if front == "not sampled" else {}),
    )
    flag = "01" if front == "tracing off" else "00"
    _infer(protocol, gateway, headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-{flag}", "tracestate": "congo=t61rcWk"})
    if flag == "00":
        _infer("grpc", upstream)  # (a root at ratio 1: once it is exported, so would the other be)
        spans = receiver.wait(lambda s: len(s) >= 3)
        time.sleep(1.5)  # (the batch processor exports every second)
        assert TRACE_ID not in {s.trace_id for s in receiver.spans}
        assert len(receiver.spans) == 3, [(s.name, s.trace_id) for s in receiver.spans]
        return
    spans = receiver.wait(lambda s: len(s) >= 3)
    root = next(s for s in spans if s.name == "InferRequest")
    assert (root.trace_id, root.parent_id, root.trace_state) == (TRACE_ID, PARENT, "congo=t61rcWk")


@pytest.mark.parametrize("otlp", ["http/protobuf", "grpc"])
def test_a_collector_that_is_down_costs_no_request_and_is_counted(repo, serve, otlp, caplog):
    import urllib.request

    port = free_port()  # nothing listens there
    running = serve(
        repo,
        tracing="otlp",
        otlp_endpoint=f"http://127.0.0.1:{port}",
        otlp_protocol=otlp,
        trace_sample_ratio=1.0,
        metrics_port=0,
    )
    for _ in range(20):
        _infer("grpc", running)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
        failed = [ln for ln in text.splitlines() if ln.startswith('batchgate_trace_spans_total{outcome="failed"}')]
        if failed and float(failed[0].split()[-1]) >= 60:
            break
        time.sleep(0.2)
    assert failed and float(failed[0].split()[-1]) == 60, failed  # 3 spans a request, none delivered
    said = [r for r in caplog.records if "spans could not be exported" in r.getMessage()]
    assert len(said) == 1 and f"127.0.0.1:{port}" in said[0].getMessage()  # once, then only counted


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritons_trace_setting_api_changes_what_is_traced(repo, serve, receiver, protocol):
    running = serve(repo, tracing="otlp", otlp_endpoint=receiver.endpoint, trace_sample_ratio=0.001)
    mod = grpcclient if protocol == "grpc" else httpclient
    client = mod.InferenceServerClient(running.grpc_url if protocol == "grpc" else running.http_url)

    def settings(**kw):
        got = client.get_trace_settings(**kw) if protocol == "http" else client.get_trace_settings(as_json=True, **kw)
        if protocol == "grpc":
            got = {k: v["value"] for k, v in got["settings"].items()}
        return {k: (v if isinstance(v, list) else [v]) for k, v in got.items()}

    assert settings()["trace_rate"] == ["1000"] and settings()["trace_level"] == ["TIMESTAMPS"]
    client.update_trace_settings(settings={"trace_rate": "1", "trace_count": "2"})
    assert settings()["trace_count"] == ["2"]
    for _ in range(4):
        _infer(protocol, running)
    spans = receiver.wait(lambda s: sum(x.name == "InferRequest" for x in s) >= 2)
    time.sleep(1.5)
    roots = [s for s in receiver.wait(lambda s: False, timeout=0.1) if s.name == "InferRequest"]
    assert len(roots) == 2 and settings()["trace_count"] == ["0"]  # two traced, then the count ran out
    # a model of its own: OFF there, while the server traces every request again
    client.update_trace_settings(model_name="clf", settings={"trace_level": ["OFF"]})
    client.update_trace_settings(settings={"trace_count": "-1"})
    assert settings(model_name="clf")["trace_level"] == ["OFF"] and settings()["trace_level"] == ["TIMESTAMPS"]
    _infer(protocol, running)
    client.update_trace_settings(model_name="clf", settings={"trace_level": None})  # cleared: the server's again
    _infer(protocol, running)
    spans = receiver.wait(lambda s: sum(x.name == "InferRequest" for x in s) >= 3)
    assert sum(x.name == "InferRequest" for x in spans) == 3
    for bad, why in (
        ({"trace_file": "/etc/passwd"}, "trace_file cannot be set"),
        ({"trace_level": ["TENSORS"]}, "TENSORS is not supported"),
        ({"trace_rate": "-5"}, "trace_rate must be from 0 to"),
        ({"nonsense": "1"}, "unknown trace setting"),
    ):
        with pytest.raises(InferenceServerException) as e:
            client.update_trace_settings(settings=bad)
        assert why in str(e.value)
    meta = client.get_server_metadata(**({"as_json": True} if protocol == "grpc" else {}))
    assert "trace" in meta["extensions"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_trace_setting_corner_cases_are_refused_or_behave_as_on_triton(repo, serve, receiver, protocol):
    """OFF beside another level was taken as TIMESTAMPS (Triton refuses it); a trace_count past 12
    digits was "not a whole number" and one within them past what Triton takes was set; a null
    trace_rate for the server changed nothing (Triton clears it back to its value at start)."""
    running = serve(repo, tracing="otlp", otlp_endpoint=receiver.endpoint, trace_sample_ratio=0.001)
    mod = grpcclient if protocol == "grpc" else httpclient
    client = mod.InferenceServerClient(running.grpc_url if protocol == "grpc" else running.http_url)

    def settings(**kw):
        if protocol == "http":
            return client.get_trace_settings(**kw)
        return {k: v["value"] for k, v in client.get_trace_settings(as_json=True, **kw)["settings"].items()}

    before = settings()
    for bad, why in (
        ({"trace_level": ["TIMESTAMPS", "OFF"]}, "trace_level OFF cannot be combined with another level"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, "trace_level OFF cannot be combined with another level"),
        ({"trace_count": "12345678901234567890"}, "trace_count must be from -1 (no limit) to 2147483647"),
        ({"trace_count": "2147483648"}, "trace_count must be from -1 (no limit) to 2147483647, not 2147483648"),
        ({"trace_rate": "99999999999"}, "trace_rate must be from 0 to 2147483647"),
    ):
        with pytest.raises(InferenceServerException) as e:
            client.update_trace_settings(settings=bad)
        assert e.value.status() in ("400", "StatusCode.INVALID_ARGUMENT") and why in e.value.message(), bad
    assert settings() == before
    # null clears: the server's rate goes back to its value at start, a model's to the server's
    client.update_trace_settings(settings={"trace_rate": "1", "trace_count": "5"})
    client.update_trace_settings(model_name="clf", settings={"trace_rate": "7"})
    assert settings(model_name="clf")["trace_rate"] in ("7", ["7"])
    client.update_trace_settings(settings={"trace_rate": None})
    client.update_trace_settings(model_name="clf", settings={"trace_rate": None})
    now = settings()
    assert now["trace_rate"] in ("1000", ["1000"]) and now["trace_count"] in ("5", ["5"]), now
    assert settings(model_name="clf")["trace_rate"] in ("1000", ["1000"])
    if protocol == "http":  # a JSON number past 64 bits, which no client library sends
        import http.client

        conn = http.client.HTTPConnection(running.http_url, timeout=10)
        try:
            conn.request("POST", "/v2/trace/setting", body=b'{"trace_count": 99999999999999999999999}')
            resp = conn.getresponse()
            body = json.loads(resp.read())
        finally:
            conn.close()
        # (read as the float 1e+23 by the JSON parser: not a whole number, said so)
        assert resp.status == 400 and "trace_count must be a whole number" in body["error"], body


def test_the_access_log_names_the_trace(repo, serve, receiver, tmp_path):
    log = tmp_path / "access.log"
    running = _traced(serve, repo, receiver, access_log="all", access_log_file=str(log))
    _infer("grpc", running)
    spans = receiver.wait(lambda s: len(s) >= 3)
    end = time.monotonic() + 5
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < end:
        time.sleep(0.05)
    line = json.loads(log.read_text().splitlines()[0])
    root = next(s for s in spans if s.name == "InferRequest")
    assert line["trace_id"] == root.trace_id and line["span_id"] == root.span_id


def test_a_routed_request_names_its_variant_and_its_shadow_copy_has_a_span(tmp_path, serve, receiver):
    from route_support import FEATURES, route_repository, write_config

    repo = route_repository(str(tmp_path / "models"))
    route = {
        "name": "fraud",
        "variants": [{"name": "stable", "model": "clf_a", "weight": 100}],
        "shadows": [{"name": "next", "model": "clf_other", "percent": 100, "max_inflight": 8}],
        "compare": {"output": "probabilities", "kind": "classification", "atol": 1.0e-3},
    }
    cfg = write_config(str(tmp_path / "batchgate.yaml"), [route])
    running = serve(repo, config_file=cfg, tracing="otlp", otlp_endpoint=receiver.endpoint, trace_sample_ratio=1.0)
    _infer("grpc", running, model="fraud", x=FEATURES)
    spans = receiver.wait(lambda s: any(x.name == "shadow" for x in s))
    root = next(s for s in spans if s.name == "InferRequest")
    shadow = next(s for s in spans if s.name == "shadow")
    assert root.attributes["batchgate.variant"] == "stable" and root.attributes["batchgate.model"] == "fraud"
    assert shadow.parent_id == root.span_id and shadow.trace_id == root.trace_id
    assert shadow.attributes["batchgate.variant"] == "next" and shadow.attributes["batchgate.model"] == "clf_other"
    assert shadow.attributes["batchgate.shadow.outcome"] == "compared"
    assert shadow.attributes["batchgate.shadow.disagreed"] is True  # clf_other answers otherwise
    assert any(s.name == "clf_a" for s in spans)  # the variant's model span


def test_callers_cannot_buy_every_request_a_trace_nor_a_log_line(repo, serve, receiver, caplog):
    """trace_max_per_s bounds the traces a second whatever decided them: a client sending a sampled
    traceparent on every request gets a few traced, the rest counted as throttled; a malformed
    tracestate is dropped without a warning that would quote it. A small export queue still starts."""
    import logging
    import urllib.request

    running = serve(
        repo, tracing="otlp", otlp_endpoint=receiver.endpoint, trace_sample_ratio=0.0, trace_max_per_s=3,
        trace_queue_spans=16, metrics_port=0,
    )  # fmt: skip
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "tracestate": "garbage!!," * 20}
    with caplog.at_level(logging.WARNING):
        for _ in range(30):
            _infer("grpc", running, headers=headers)
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]
    text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    throttled = next(
        ln for ln in text.splitlines() if ln.startswith('batchgate_trace_spans_total{outcome="throttled"}')
    )
    assert float(throttled.split()[-1]) >= 20
    spans = receiver.wait(lambda s: sum(x.name == "InferRequest" for x in s) >= 3)
    assert 3 <= sum(x.name == "InferRequest" for x in spans) <= 8


def test_trace_settings_tell_a_caller_without_a_key_nothing_of_the_models(repo, serve, tmp_path, receiver):
    import yaml

    from batchgate.security.auth import hash_token, new_token

    token = new_token()
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"id": "ops", "sha256": hash_token(token), "scopes": ["read"]}]}))
    running = serve(repo, api_keys_file=str(keys), tracing="otlp", otlp_endpoint=receiver.endpoint)
    client = httpclient.InferenceServerClient(running.http_url)
    for model in ("clf", "no_such_model"):
        with pytest.raises(InferenceServerException) as e:
            client.get_trace_settings(model_name=model)
        assert "401" in str(e.value.status())  # the same answer for a model that exists and one that does not
    with pytest.raises(InferenceServerException) as e:
        client.get_trace_settings(model_name="no_such_model", headers={"authorization": f"Bearer {token}"})
    assert "404" in str(e.value.status())
    assert client.get_trace_settings(model_name="clf", headers={"authorization": f"Bearer {token}"})["trace_level"]


def test_each_request_of_a_grpc_stream_is_traced_and_logged(repo, serve, receiver, tmp_path):
    """A stream's requests get a span each (children of the stream's traceparent) and an access
    line each, whatever their outcome: two answered, one for a model that does not exist."""
    log = tmp_path / "access.log"
    running = _traced(serve, repo, receiver, access_log="all", access_log_file=str(log))
    client = grpcclient.InferenceServerClient(running.grpc_url)
    answers: list = []
    done = threading.Event()

    def callback(result, error):
        answers.append((result, error))
        if len(answers) == 3:
            done.set()

    client.start_stream(callback, headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01"})
    for rid, model in (("s-1", "clf"), ("s-2", "no_such_model"), ("s-3", "clf")):
        inp = grpcclient.InferInput("features", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        client.async_stream_infer(model, [inp], request_id=rid)
    assert done.wait(20), answers
    client.stop_stream()
    client.close()
    assert sum(error is not None for _, error in answers) == 1

    spans = receiver.wait(
        lambda s: sum(x.name == "InferRequest" for x in s) >= 3 and sum(x.name == "clf" for x in s) >= 2
    )
    roots = {s.attributes["batchgate.request.id"]: s for s in spans if s.name == "InferRequest"}
    assert set(roots) == {"s-1", "s-2", "s-3"}
    assert {(s.trace_id, s.parent_id) for s in roots.values()} == {(TRACE_ID, PARENT)}
    assert roots["s-1"].attributes["rpc.response.status_code"] == "OK"
    assert roots["s-2"].attributes["rpc.response.status_code"] != "OK" and "error.type" in roots["s-2"].attributes
    for rid in ("s-1", "s-3"):  # the model's span hangs under the request's
        assert any(s.name == "clf" and s.parent_id == roots[rid].span_id for s in spans)

    end = time.monotonic() + 5
    while log.read_text().count("\n") < 3 and time.monotonic() < end:  # (whole lines only)
        time.sleep(0.05)
    lines = {d["batchgate.request.id"]: d for d in map(json.loads, log.read_text().splitlines())}
    assert set(lines) == {"s-1", "s-2", "s-3"}
    for rid, line in lines.items():
        assert line["rpc.method"] == "inference.GRPCInferenceService/ModelStreamInfer"
        assert line["span_id"] == roots[rid].span_id and line["trace_id"] == TRACE_ID
        assert line["batchgate.request.bytes"] > 0
    assert lines["s-1"]["rpc.response.status_code"] == "OK" and lines["s-1"]["batchgate.response.bytes"] > 0
    assert lines["s-2"]["error.type"] == roots["s-2"].attributes["error.type"]


@pytest.mark.parametrize(
    ("endpoint", "otlp", "message"),
    [
        ("", "http/protobuf", "tracing: otlp needs otlp_endpoint"),
        ("collector:4318", "http/protobuf", "an http:// or https:// URL"),
        ("http://collector:4317/v1/traces", "grpc", "otlp_protocol: grpc takes an endpoint without a path"),
        ("http://user:s3cret@collector:4317", "grpc", "takes no credentials"),
        ("http://collector:4318/?token=x", "http/protobuf", "takes no credentials, query or fragment"),
        ("https://collector:99999", "grpc", "an http:// or https:// URL with a host"),
    ],
)
def test_an_endpoint_that_cannot_carry_spans_stops_the_start(repo, endpoint, otlp, message):
    from batchgate.app import Gateway
    from batchgate.config import ConfigError, load_settings

    flags = {"model_repository": repo, "tracing": "otlp", "otlp_endpoint": endpoint, "otlp_protocol": otlp}
    with pytest.raises(ConfigError, match=message) as e:
        Gateway(load_settings(flags=flags, environ={}))
    assert "s3cret" not in str(e.value)  # a password in the URL is never quoted


def test_a_grpc_endpoint_without_a_port_gets_otlps_and_a_bad_sdk_setting_is_a_config_error(repo, monkeypatch):
    from batchgate.app import Gateway
    from batchgate.config import ConfigError, load_settings
    from batchgate.monitoring.tracing import checked_endpoint

    assert checked_endpoint("http://collector", "grpc") == "http://collector:4317"  # (gRPC's own default: 443)
    assert checked_endpoint("https://[::1]:4317/", "grpc") == "https://[::1]:4317"
    # the SDK reads its OTEL_* settings as the exporter is made: a wrong one is said at start
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd-not-a-thing")
    flags = {"model_repository": repo, "tracing": "otlp", "otlp_endpoint": "http://c:4317", "otlp_protocol": "grpc"}
    with pytest.raises(ConfigError, match="the OTLP exporter cannot be made"):
        Gateway(load_settings(flags=flags, environ={}))


def test_a_later_traceparent_version_is_read_by_its_first_55_characters():
    """W3C trace context: a version above 00 is parsed as 00 up to its 55th character (then a
    dash or the end); it was taken for invalid and the caller's trace was cut in two."""
    from batchgate.monitoring.trace_context import valid_traceparent

    assert valid_traceparent(f"00-{TRACE_ID}-{PARENT}-01") == (True, True)
    assert valid_traceparent(f"01-{TRACE_ID}-{PARENT}-01-what-a-later-version-adds") == (True, True)
    assert valid_traceparent(f"cc-{TRACE_ID}-{PARENT}-00") == (True, False)
    for bad in (
        f"00-{TRACE_ID}-{PARENT}-01-x",  # version 00 is exactly 55 characters
        f"01-{TRACE_ID}-{PARENT}-01x",  # a later one goes on after a dash
        f"ff-{TRACE_ID}-{PARENT}-01",  # ff is no version
        f"01-{TRACE_ID}-{PARENT}",
        f"01-{'0' * 32}-{PARENT}-01",
        f"01-{TRACE_ID}-{PARENT.upper()}-01",
    ):
        assert valid_traceparent(bad) == (False, False), bad


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_callers_mistake_leaves_the_span_status_unset_a_server_failure_sets_it(tmp_path, serve, receiver, protocol):
    """OpenTelemetry's conventions for a SERVER span: status ERROR for the server's own failures
    (HTTP 5xx; gRPC UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS),
    unset for the caller's (HTTP 4xx, INVALID_ARGUMENT...), whose code stays in error.type. Every
    error was ERROR, so a Collector keeping error traces kept each malformed request a client sent."""
    from route_support import POISON, failing_classifier

    _save(failing_classifier(), str(tmp_path), "bad", config="max_batch_size: 8\n")
    running = _traced(serve, str(tmp_path), receiver)
    with pytest.raises(InferenceServerException):
        _infer(protocol, running, rid="mistake", model="bad", x=np.zeros((1, 3), np.float32))  # a wrong shape
    with pytest.raises(InferenceServerException):
        _infer(protocol, running, rid="fault", model="bad", x=POISON)  # the model fails: INTERNAL
    spans = receiver.wait(lambda s: sum(x.name == "InferRequest" for x in s) >= 2)
    roots = {s.attributes["batchgate.request.id"]: s for s in spans if s.name == "InferRequest"}
    assert roots["mistake"].attributes["error.type"] == "INVALID_ARGUMENT"
    assert roots["mistake"].status == 0  # UNSET
    assert roots["fault"].attributes["error.type"] == "INTERNAL"
    assert roots["fault"].status == 2  # ERROR


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_refused_at_admission_has_its_span_on_both_protocols(repo, serve, receiver, protocol, tmp_path):
    """A request refused as it is admitted (here an unknown model) is answered with a span in its
    caller's trace over both protocols. Over HTTP the refusal comes as the head arrives, before
    the request's span began: a caller's sampled trace showed a 404 or 503 with no server span,
    where gRPC's showed one."""
    log = tmp_path / "access.log"
    running = serve(
        repo,
        tracing="otlp",
        otlp_endpoint=receiver.endpoint,
        trace_sample_ratio=0.0,
        access_log="all",
        access_log_file=str(log),
    )
    with pytest.raises(InferenceServerException):
        _infer(protocol, running, model="nope", headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01"})
    spans = receiver.wait(lambda s: len(s) >= 1)
    assert [s.name for s in spans] == ["InferRequest"]
    root = spans[0]
    assert (root.trace_id, root.parent_id) == (TRACE_ID, PARENT)
    assert root.attributes["batchgate.model"] == "nope" and root.attributes["error.type"] == "NOT_FOUND"
    status_key = "rpc.response.status_code" if protocol == "grpc" else "http.response.status_code"
    assert root.attributes[status_key] in ("NOT_FOUND", 404)
    running.stop()  # (the access log's lines written)
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, root.span_id)  # its line names the trace
