"""The admin API for routes: the gRPC service on admin_port, its HTTP/JSON mirror on
admin_http_port, the `batchgate routes` CLI (a real subprocess), keys and scopes, the audit log."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
import yaml

from batchgate.admin.v1 import admin_pb2 as apb
from batchgate.admin.v1 import admin_pb2_grpc
from batchgate.security.auth import hash_token, new_token
from gateway_support import start_gateway
from route_support import infer_grpc, route_repository, write_config

ADMIN_TOKEN, READ_TOKEN, OTHER_TOKEN = new_token(), new_token(), new_token()

ROUTES = [
    {
        "name": "fraud",
        "variants": [
            {"name": "stable", "model": "clf_a", "weight": 90},
            {"name": "canary", "model": "clf_same", "weight": 10},
        ],
        "sticky_key": "header:x-user-id",
        "rollout": {
            "canary": "canary",
            "baseline": "stable",
            "steps": [10, 50, 100],
            "interval_s": 3600,
            "min_requests": 1000,
        },
    }
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return route_repository(str(tmp_path_factory.mktemp("admin_models")))


@pytest.fixture
def keyed(repo, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"id": "ops", "sha256": hash_token(ADMIN_TOKEN), "scopes": ["admin", "read", "infer"]},
                    {"id": "dash", "sha256": hash_token(READ_TOKEN), "scopes": ["read"]},
                    {"id": "other", "sha256": hash_token(OTHER_TOKEN), "scopes": ["admin", "read"], "models": ["x*"]},
                ]
            }
        )
    )
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(
        str(tmp_path / "c.yaml"), ROUTES, auth={"api_keys_file": str(keys), "audit_log_file": str(audit)}
    )
    running = start_gateway(repo, config_file=cfg, allow_open_admin=False)
    running.audit_file = audit
    yield running
    running.stop()


def _stub(running):
    channel = grpc.insecure_channel(f"127.0.0.1:{running.gateway.admin_port}")
    return admin_pb2_grpc.AdminServiceStub(channel), channel


def _md(token: str):
    return (("authorization", f"Bearer {token}"),)


def _http(running, method: str, path: str, token: str | None, body: dict | None = None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{running.gateway.admin_http_port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"authorization": f"Bearer {token}"} if token else {},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:  # (it holds the connection)
            return e.code, json.loads(e.read())


def test_grpc_admin_api_with_scopes(keyed):
    stub, channel = _stub(keyed)
    with channel:
        listed = stub.ListRoutes(apb.ListRoutesRequest(), metadata=_md(READ_TOKEN), timeout=10)
        (route,) = listed.routes
        assert route.name == "fraud" and dict(route.weights) == {"stable": 90, "canary": 10}
        assert route.rollout.state == "running" and route.rollout.canary_percent == 10
        # read scope looks, but does not change
        with pytest.raises(grpc.RpcError) as e:
            stub.SetWeights(apb.SetWeightsRequest(name="fraud", weights={"canary": 50}), metadata=_md(READ_TOKEN))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            stub.ListRoutes(apb.ListRoutesRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # an admin key whose model patterns do not match the route
        with pytest.raises(grpc.RpcError) as e:
            stub.Promote(apb.RouteActionRequest(name="fraud"), metadata=_md(OTHER_TOKEN))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert stub.ListRoutes(apb.ListRoutesRequest(), metadata=_md(OTHER_TOKEN)).routes == []
        changed = stub.SetWeights(
            apb.SetWeightsRequest(name="fraud", weights={"canary": 40}), metadata=_md(ADMIN_TOKEN)
        )
        assert dict(changed.weights) == {"stable": 90, "canary": 40}
        assert changed.rollout.state == "paused"  # a hand-set weight pauses the rollout
        resumed = stub.Resume(apb.RouteActionRequest(name="fraud"), metadata=_md(ADMIN_TOKEN))
        assert resumed.rollout.state == "running"
        promoted = stub.Promote(apb.RouteActionRequest(name="fraud"), metadata=_md(ADMIN_TOKEN))
        assert promoted.rollout.state == "promoted" and dict(promoted.weights) == {"stable": 0, "canary": 100}
        for request, code in (
            (apb.SetWeightsRequest(name="fraud", weights={"nope": 1}), grpc.StatusCode.INVALID_ARGUMENT),
            (apb.SetWeightsRequest(name="fraud", weights={"canary": 101}), grpc.StatusCode.INVALID_ARGUMENT),
            (apb.SetWeightsRequest(name="fraud", weights={"stable": 0, "canary": 0}), grpc.StatusCode.INVALID_ARGUMENT),
            (apb.SetWeightsRequest(name="fraud", weights={}), grpc.StatusCode.INVALID_ARGUMENT),
            (apb.SetWeightsRequest(name="ghost", weights={"a": 1}), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.SetWeights(request, metadata=_md(ADMIN_TOKEN))
            assert e.value.code() == code
    # every answer now comes from the canary
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}", "x-user-id": "u1"}
    assert infer_grpc(keyed.grpc_url, "fraud", headers=headers)[1]["variant"] == "canary"
    lines = [json.loads(x) for x in keyed.audit_file.read_text().splitlines()]
    actions = [(ln["action"], ln["key_id"], ln["outcome"]) for ln in lines]
    assert ("routes.set_weights", "ops", "ok") in actions
    assert ("routes.set_weights", "dash", "PERMISSION_DENIED") in actions
    assert ("routes.promote", "ops", "ok") in actions
    assert any(a == "routes.list" for a, _, _ in actions)
    assert ADMIN_TOKEN not in keyed.audit_file.read_text()


def test_http_mirror_speaks_the_same_messages(keyed):
    status, body = _http(keyed, "GET", "/admin/v1/routes", READ_TOKEN)
    assert status == 200 and body["routes"][0]["name"] == "fraud"
    status, body = _http(keyed, "GET", "/admin/v1/routes/fraud", READ_TOKEN)
    assert status == 200 and body["weights"] == {"stable": 90, "canary": 10}
    assert body["rollout"]["steps"] == [10, 50, 100]
    status, body = _http(keyed, "POST", "/admin/v1/routes/fraud/weights", ADMIN_TOKEN, {"weights": {"canary": 25}})
    assert status == 200 and body["weights"]["canary"] == 25
    status, body = _http(keyed, "POST", "/admin/v1/routes/fraud/rollback", ADMIN_TOKEN, {})
    assert status == 200 and body["rollout"]["state"] == "rolled_back" and body["weights"]["canary"] == 0
    assert _http(keyed, "POST", "/admin/v1/routes/fraud/weights", READ_TOKEN, {"weights": {"canary": 1}})[0] == 403
    assert _http(keyed, "GET", "/admin/v1/routes", None)[0] == 401
    assert _http(keyed, "GET", "/admin/v1/routes/ghost", READ_TOKEN)[0] == 404
    status, body = _http(keyed, "POST", "/admin/v1/routes/fraud/weights", ADMIN_TOKEN, {"weights": {"canary": "x"}})
    assert status == 400 and "SetWeightsRequest" in body["error"]
    assert _http(keyed, "GET", "/admin/v1/routes/fraud/weights", ADMIN_TOKEN)[0] == 405  # a wrong method: 405 (was 400)
    # a body that is not UTF-8 is a client error (it was a 500); the caller is checked before the
    # body is read as a request, so a stranger gets 401 whatever it sends, and both are audited
    for token, code in ((None, 401), (READ_TOKEN, 403), (ADMIN_TOKEN, 400)):
        req = urllib.request.Request(
            f"http://127.0.0.1:{keyed.gateway.admin_http_port}/admin/v1/routes/fraud/weights",
            data=b"\xff\xfe{",
            method="POST",
            headers={"authorization": f"Bearer {token}"} if token else {},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        e.value.close()
        assert e.value.code == code, token
    status, _ = _http(keyed, "POST", "/admin/v1/routes/fraud/weights", None, {"weights": {"canary": "x"}})
    assert status == 401
    lines = [json.loads(x) for x in keyed.audit_file.read_text().splitlines()]
    outcomes = [ln["outcome"] for ln in lines if ln["action"] == "routes.set_weights"]
    assert outcomes[-4:] == ["UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "UNAUTHENTICATED"]
    # a variant name with bidirectional characters is escaped in the answer and the audit line
    status, body = _http(keyed, "POST", "/admin/v1/routes/fraud/weights", ADMIN_TOKEN, {"weights": {"x\u202e": 1}})
    assert status == 400 and "\u202e" not in body["error"] and "x\\u202e" in body["error"]
    assert "\u202e" not in keyed.audit_file.read_text(encoding="utf-8")
    # and so is a route name that is not there (it was answered as sent, a model's name escaped)
    status, body = _http(keyed, "GET", "/admin/v1/routes/x%E2%80%AE%1B%5B2J", READ_TOKEN)
    assert status == 404 and "x\\u202e\\x1b[2J" in body["error"] and "\u202e" not in body["error"]
    stub, channel = _stub(keyed)
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub.GetRoute(apb.GetRouteRequest(name="x\u202e\x1b"), metadata=_md(READ_TOKEN))
        assert e.value.code() is grpc.StatusCode.NOT_FOUND and "\u202e" not in e.value.details()
    finally:
        channel.close()


def test_an_admin_body_past_its_bound_is_refused_unparsed(keyed):
    """A SetWeights body of megabytes (made-up variants) was parsed on the event loop, a second or
    two in which no request was answered, by any key with scope admin (one kept to other routes
    too); an admin body past 64 KiB is now refused unread (over HTTP after the caller is checked)."""
    weights = {f"v{i}": 1 for i in range(100_000)}
    for token, code in ((None, 401), (READ_TOKEN, 403), (ADMIN_TOKEN, 400)):
        status, body = _http(keyed, "POST", "/admin/v1/routes/fraud/weights", token, {"weights": weights})
        assert status == code, token
    assert "at most 65536 bytes" in body["error"]
    # a body of a reasonable size is read as before
    status, body = _http(keyed, "POST", "/admin/v1/routes/fraud/weights", ADMIN_TOKEN, {"weights": {"canary": 20}})
    assert status == 200 and body["weights"]["canary"] == 20
    # over gRPC, such a message is refused by the transport, as any message past its limit
    stub, channel = _stub(keyed)
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub.SetWeights(apb.SetWeightsRequest(name="fraud", weights=weights), metadata=_md(ADMIN_TOKEN), timeout=30)
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        got = stub.SetWeights(apb.SetWeightsRequest(name="fraud", weights={"canary": 30}), metadata=_md(ADMIN_TOKEN))
        assert got.weights["canary"] == 30
    finally:
        channel.close()


def test_open_server_refuses_changes_unless_allowed(repo, tmp_path):
    cfg = write_config(str(tmp_path / "c.yaml"), ROUTES)
    running = start_gateway(repo, config_file=cfg, allow_open_admin=False)
    try:
        stub, channel = _stub(running)
        with channel:
            assert stub.ListRoutes(apb.ListRoutesRequest()).routes[0].name == "fraud"  # looking is open
            with pytest.raises(grpc.RpcError) as e:
                stub.Pause(apb.RouteActionRequest(name="fraud"))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "allow_open_admin" in e.value.details()
    finally:
        running.stop()


def _cli(running, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "routes", *args, "--admin", f"127.0.0.1:{running.gateway.admin_port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_routes_cli(repo, tmp_path):
    cfg = write_config(str(tmp_path / "c.yaml"), ROUTES)
    running = start_gateway(repo, config_file=cfg)  # allow_open_admin (the test default)
    try:
        out = _cli(running, "list")
        assert out.returncode == 0, out.stderr
        assert "fraud" in out.stdout and "running 10%" in out.stdout and "stable=90 canary=10" in out.stdout
        out = _cli(running, "set-weight", "fraud", "canary=30", "stable=70")
        assert out.returncode == 0 and "stable=70 canary=30" in out.stdout and "paused" in out.stdout
        out = _cli(running, "show", "fraud")
        shown = json.loads(out.stdout)
        assert shown["weights"] == {"stable": 70, "canary": 30} and shown["rollout"]["state"] == "paused"
        for action, state in (("resume", "running"), ("pause", "paused"), ("promote", "promoted")):
            out = _cli(running, action, "fraud")
            assert out.returncode == 0 and state in out.stdout, out.stderr
        out = _cli(running, "rollback", "ghost")
        assert out.returncode == 1 and "NOT_FOUND" in out.stderr
        out = _cli(running, "set-weight", "fraud", "canary")
        assert out.returncode == 2 and "VARIANT=WEIGHT" in out.stderr
        out = _cli(running, "set-weight", "fraud", "stable=10", "stable=20")
        assert out.returncode == 2 and "'stable' is given twice" in out.stderr
        out = _cli(running, "list", "--timeout-s", "0")
        assert out.returncode == 2 and "greater than 0" in out.stderr
    finally:
        running.stop()
