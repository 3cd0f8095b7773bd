"""Cross-origin calls from browser apps (CORS, ``cors_allowed_origins``): preflights answered on
the V2 HTTP port, every answer to an allowed origin carrying the headers a browser needs to let
the app read it (errors and the refusals made before the body is read included), nothing for
other origins, nothing on the admin and metrics ports, and nothing changed without the setting.
Raw HTTP over real sockets (a browser's requests, byte for byte where it matters)."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
import yaml

from batchgate.config import load_settings
from batchgate.core.errors import ConfigError
from batchgate.demo import build_demo_repository
from batchgate.security.auth import hash_token, new_token

APP = "https://app.example.com"
OTHER = "https://evil.example.com"
TOKEN = new_token()
GOOD = json.dumps(
    {
        "inputs": [
            {"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))} for n in ("INPUT0", "INPUT1")
        ]
    }
).encode()
EXPOSED = "inference-header-content-length, x-batchgate-variant, retry-after, www-authenticate"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return build_demo_repository(str(tmp_path_factory.mktemp("models")))


def keyed(serve, repo, tmp_path, **cors):
    """A server with API keys (a 401 to be had), only ``simple`` loaded (a 503 for
    ``classifier``), and the CORS settings given."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"id": "app", "sha256": hash_token(TOKEN), "scopes": ["infer", "read"]}]}))
    return serve(
        repo,
        api_keys_file=str(keys),
        model_control_mode="explicit",
        load_model=("simple",),
        allow_open_admin=False,
        **cors,
    )


def ask(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """(status, headers with lower-case names, body) of one request on its own connection."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def cors_of(headers: dict) -> dict:
    return {k: v for k, v in headers.items() if k.startswith("access-control-") or k == "vary"}


def preflight(port: int, path: str, origin: str, method: str = "POST", asked: str = "content-type"):
    return ask(
        port,
        "OPTIONS",
        path,
        {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": asked},
    )


def test_preflights_answer_allowed_origins_only_and_do_no_work(repo, serve, tmp_path):
    running = keyed(
        serve,
        repo,
        tmp_path,
        cors_allowed_origins=(APP, "HTTP://LOCALHOST:3000", "https://app.example.com:443"),
        cors_max_age_s=120,
        cors_allow_headers=("X-Tenant",),
    )
    port = port_of(running.http_url)
    # any V2 path, an infer path of a model never loaded or unknown too: no key is asked for,
    # nothing is looked up (a browser never sends credentials with a preflight)
    for path in ("/v2/models/simple/infer", "/v2/models/classifier/infer", "/v2/models/nope", "/v2/health/ready"):
        status, headers, body = preflight(port, path, APP)
        assert (status, body) == (204, b""), (path, status, body)
        assert cors_of(headers) == {
            "access-control-allow-origin": APP,
            "vary": "origin",
            "access-control-allow-methods": "GET, POST",
            "access-control-allow-headers": "content-type, authorization, inference-header-content-length, "
            "content-encoding, accept-encoding, x-request-id, traceparent, tracestate, x-batchgate-variant, x-tenant",
            "access-control-max-age": "120",
        }, path
        assert "content-length" not in headers  # (a 204 has no content: RFC 9110)
    # origins are matched as browsers write them: the configured ones were normalised
    assert preflight(port, "/v2", "http://localhost:3000")[1]["access-control-allow-origin"] == "http://localhost:3000"
    # another origin, another port or scheme of an allowed host, a suffix trick, one far too
    # long: refused, with no CORS header and nothing of the allowed list in the answer
    for origin in (OTHER, "https://app.example.com:8443", "http://app.example.com", APP + ".evil.com", APP + "x" * 400):
        status, headers, body = preflight(port, "/v2/models/simple/infer", origin)
        assert status == 403 and cors_of(headers) == {}, origin
        assert b"cors_allowed_origins" in body and APP.encode() not in body
    # an OPTIONS that is no preflight (no Access-Control-Request-Method) is what it was: 405
    status, headers, _ = ask(port, "OPTIONS", "/v2/models/simple/infer", {"Origin": APP})
    assert status == 405 and headers["allow"] == "POST"
    # the admin HTTP port answers no browser of any origin
    admin = running.gateway.admin_http_port
    status, headers, _ = preflight(admin, "/v2/health/ready", APP)
    assert status != 204 and cors_of(headers) == {}
    status, headers, _ = ask(admin, "GET", "/v2/health/live", {"Origin": APP})
    assert status == 200 and cors_of(headers) == {}
    with socket.create_connection(("127.0.0.1", running.gateway.metrics_port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nOrigin: " + APP.encode() + b"\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.split(b"\r\n")[0].endswith(b" 200 OK") and b"access-control" not in data.split(b"\r\n\r\n")[0].lower()


def test_every_answer_to_an_allowed_origin_carries_the_cors_headers(repo, serve, tmp_path):
    """Success and errors alike (401 before any key is checked, 403, 404, 405, 400 of a bad
    body, 503 of a model not loaded): a browser app reads why it was refused."""
    running = keyed(serve, repo, tmp_path, cors_allowed_origins=(APP,))
    port = port_of(running.http_url)
    key = {"Authorization": f"Bearer {TOKEN}"}
    want = {"access-control-allow-origin": APP, "vary": "origin", "access-control-expose-headers": EXPOSED}
    calls = [
        (200, "GET", "/v2/models/simple", key, None),
        (200, "POST", "/v2/models/simple/infer", {**key, "Content-Type": "application/json"}, GOOD),
        (401, "POST", "/v2/models/simple/infer", {}, GOOD),  # refused by the gate, as its head came
        (401, "GET", "/v2/models/simple", {}, None),
        (403, "POST", "/v2/repository/models/simple/unload", key, b""),  # (no admin scope)
        (404, "POST", "/v2/models/nope/infer", key, GOOD),
        (404, "GET", "/v2/nothing/here", key, None),
        (405, "GET", "/v2/models/simple/infer", key, None),
        (400, "POST", "/v2/models/simple/infer", key, b"{not json"),
        (503, "POST", "/v2/models/classifier/infer", key, GOOD),  # known, not loaded
        (503, "GET", "/v2/models/classifier", key, None),
    ]
    for status, method, path, headers, body in calls:
        got, answer, text = ask(port, method, path, {**headers, "Origin": APP}, body)
        assert got == status, (method, path, got, text[:200])
        assert cors_of(answer) == want, (method, path, answer)
        if status == 401:
            assert "www-authenticate" in answer
        # the same call from an origin not allowed, or from no browser at all: no CORS header but
        # Vary (a shared cache must not give this answer to an allowed origin)
        for origin in ({"Origin": OTHER}, {}):
            got, answer, _ = ask(port, method, path, {**headers, **origin}, body)
            assert got == status and cors_of(answer) == {"vary": "origin"}, (method, path, origin, answer)


def _response(s: socket.socket) -> bytes:
    s.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _infer_head(origin: bytes = b"") -> bytes:
    return (
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + (b"Origin: " + origin + b"\r\n" if origin else b"")
        + b"Content-Length: %d\r\n\r\n" % len(GOOD)
    )


def test_overload_refusals_made_before_the_body_carry_the_cors_headers(repo, serve):
    """A 429 while the server sheds is answered from the request's head (or from its request line
    alone, for a plain request without Origin): one from an allowed origin still says who may
    read it, and Retry-After is exposed."""
    running = serve(repo, max_inflight_requests=1, cors_allowed_origins=("*",))
    dp = running.gateway.dataplane
    port = port_of(running.http_url)
    held = socket.create_connection(("127.0.0.1", port), timeout=30)
    held.sendall(_infer_head() + GOOD[:10])  # admitted, its body half sent
    end = time.monotonic() + 30
    while dp.admission.inflight != 1:
        assert time.monotonic() < end, "the held request was not admitted"
        time.sleep(0.01)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(_infer_head() + GOOD)  # the first refusal: shedding from now on
        reply = _response(s)
        assert reply.startswith(b"HTTP/1.1 429") and b"access-control" not in reply.lower()
        # whole, plain requests: the second without Origin refused from its request line
        for origin in (APP.encode(), b"", b"null"):
            s.sendall(_infer_head(origin) + GOOD)
            reply = _response(s)
            head = reply.split(b"\r\n\r\n")[0].lower()
            assert reply.startswith(b"HTTP/1.1 429") and b"retry-after: " in head, reply[:300]
            if origin:
                assert b"access-control-allow-origin: *\r\n" in head, reply[:400]
                assert f"access-control-expose-headers: {EXPOSED}".encode() in head
            else:
                assert b"access-control" not in head
    held.sendall(GOOD[10:])
    with held:
        assert _response(held).startswith(b"HTTP/1.1 200")


def test_wildcard_and_credentials(repo, serve, tmp_path):
    running = keyed(serve, repo, tmp_path, cors_allowed_origins=("*",))
    port = port_of(running.http_url)
    status, headers, _ = preflight(port, "/v2/models/simple/infer", OTHER)
    assert status == 204 and headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in headers and headers["access-control-max-age"] == "600"
    status, headers, _ = ask(port, "GET", "/v2/models/simple", {"Origin": "null"})  # (a sandboxed page)
    assert status == 401 and headers["access-control-allow-origin"] == "*"  # the wildcard, never the value
    assert preflight(port, "/v2", "https://" + "a" * 400 + ".com")[0] == 403  # past any origin's length

    running = keyed(serve, repo, tmp_path, cors_allowed_origins=(APP,), cors_allow_credentials=True)
    port = port_of(running.http_url)
    status, headers, _ = preflight(port, "/v2/models/simple/infer", APP, asked="authorization, content-type")
    assert status == 204 and headers["access-control-allow-origin"] == APP
    assert headers["access-control-allow-credentials"] == "true"
    status, headers, _ = ask(port, "GET", "/v2/models/simple", {"Origin": APP, "Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and headers["access-control-allow-credentials"] == "true"
    assert headers["access-control-allow-origin"] == APP
    status, headers, _ = ask(port, "GET", "/v2/models/simple", {"Origin": OTHER})
    assert status == 401 and cors_of(headers) == {"vary": "origin"}


def test_without_the_setting_nothing_changes(server):
    port = port_of(server.http_url)
    status, headers, _ = preflight(port, "/v2/models/simple/infer", APP)
    assert status == 405 and cors_of(headers) == {}
    status, headers, _ = ask(port, "GET", "/v2/models/simple", {"Origin": APP})
    assert status == 200 and cors_of(headers) == {}
    status, headers, _ = ask(port, "POST", "/v2/models/nope/infer", {"Origin": APP}, GOOD)
    assert status == 404 and cors_of(headers) == {}


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"cors_allowed_origins": ("https://app.example.com/",)}, "has a path, query or fragment"),
        ({"cors_allowed_origins": ("https://app.example.com/ui?x=1",)}, "'https://app.example.com'"),
        ({"cors_allowed_origins": ("app.example.com",)}, "is not an origin"),
        ({"cors_allowed_origins": ("ftp://app.example.com",)}, "scheme http or https"),
        ({"cors_allowed_origins": ("https://user@app.example.com",)}, "is not an origin"),
        ({"cors_allowed_origins": ("https://[::zz]:80",)}, "is not an origin"),
        ({"cors_allowed_origins": ("https://app.example.com:70000",)}, "between 1 and 65535"),
        ({"cors_allowed_origins": ("*", APP)}, "give it alone"),
        ({"cors_allowed_origins": ("*",), "cors_allow_credentials": True}, "cannot go with"),
        ({"cors_allowed_origins": (APP,), "cors_allow_headers": ("x tenant",)}, "not an HTTP header name"),
        ({"cors_max_age_s": 86401}, "at most 86400"),
        ({"cors_max_age_s": -1}, "must not be negative"),
    ],
)
def test_settings_that_make_no_policy_are_refused_at_start(demo_repo, settings, words):
    with pytest.raises(ConfigError) as e:
        load_settings(None, {"model_repository": demo_repo, **settings}, environ={})
    assert words in str(e.value)


def test_origins_from_the_environment(demo_repo):
    s = load_settings(
        None,
        {"model_repository": demo_repo},
        environ={"BATCHGATE_CORS_ALLOWED_ORIGINS": "https://a.example.com, http://127.0.0.1:5173"},
    )
    assert s.server.cors_allowed_origins == ("https://a.example.com", "http://127.0.0.1:5173")
