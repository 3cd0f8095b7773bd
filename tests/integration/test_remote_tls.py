"""Remote models over TLS, mTLS and with a bearer token (``tls``, ``tls_ca_file``,
``tls_cert_file``, ``tls_key_file``, ``tls_server_name``, ``token_file``), through both upstream
clients: the upstream is a real batchgate gateway that serves TLS, asks for a client certificate
and an API key; the gateway in front is queried with real tritonclient clients. The fake upstream
(tests/fake_upstream.py) tells what authorization each call carried."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from batchgate.config import ConfigError, RemoteModel
from batchgate.security.auth import hash_token, new_token
from fake_upstream import FakeUpstream
from gateway_support import eventually, start_gateway
from tls_support import make_pki

TOKEN_A, TOKEN_B = new_token(), new_token()
CLIENTS = ("h2", "grpcio")
FAST = dict(probe_interval_s=0.1, eject_s=0.3, batching="passthrough")


def _keys(*tokens: str) -> str:
    entries = [{"id": f"k{i}", "sha256": hash_token(t), "scopes": ["infer", "read"]} for i, t in enumerate(tokens)]
    return yaml.safe_dump({"keys": entries})


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def upstreams(demo_repo, pki):
    """Two upstream gateways: TLS only, and mTLS with API keys (tokens A and B)."""
    keys = pki.dir / "keys.yaml"
    keys.write_text(_keys(TOKEN_A, TOKEN_B))
    cert = dict(tls_cert_file=pki.path("server.crt"), tls_key_file=pki.path("server.key"))
    tls = start_gateway(demo_repo, **cert)
    secured = start_gateway(
        demo_repo, **cert, tls_client_ca_file=pki.path("ca.crt"), api_keys_file=str(keys), api_keys_poll_s=0.1
    )
    secured.keys_file = keys
    yield tls, secured
    tls.stop()
    secured.stop()


def _x() -> np.ndarray:
    return np.random.default_rng(0).random((2, 4), dtype=np.float32)


def _infer(mod, url: str, model: str = "classifier", **kw) -> np.ndarray:
    c = mod.InferenceServerClient(url)
    inp = mod.InferInput("features", [2, 4], "FP32")
    inp.set_data_from_numpy(_x())
    return c.infer(model, [inp], **kw).as_numpy("probabilities")


def _token_file(tmp_path, token: str) -> str:
    path = tmp_path / "token"
    path.write_text(token + "\n")  # (as a Secret is mounted: a file, its line ended)
    return str(path)


def _failure(running, model: str = "classifier") -> str:
    """The reason the front gateway gives for a call to ``model`` failing ("" if it succeeds)."""
    try:
        _infer(grpcclient, running.grpc_url, model)
    except InferenceServerException as e:
        return f"{e.status()} {e.message()}"
    return ""


@pytest.mark.parametrize("client", CLIENTS)
def test_tls_and_mtls_with_a_token_reach_the_upstream_and_answer_as_it_does(tmp_path, serve, upstreams, pki, client):
    tls, secured = upstreams
    running = serve(
        "",
        remote_models=(
            RemoteModel("plain_tls", (tls.grpc_url,), upstream_model="classifier", tls=True,
                        tls_ca_file=pki.path("ca.crt"), client=client, **FAST),
            RemoteModel("classifier", (secured.grpc_url,), tls=True, tls_ca_file=pki.path("ca.crt"),
                        tls_cert_file=pki.path("client.crt"), tls_key_file=pki.path("client.key"),
                        token_file=_token_file(tmp_path, TOKEN_A), client=client, **FAST),
            # the certificate names 127.0.0.1 and localhost: a name to check given apart from the address
            RemoteModel("by_name", (secured.grpc_url,), upstream_model="classifier", tls=True,
                        tls_ca_file=pki.path("ca.crt"), tls_server_name="localhost",
                        tls_cert_file=pki.path("client.crt"), tls_key_file=pki.path("client.key"),
                        token_file=_token_file(tmp_path, TOKEN_B), client=client, **FAST),
        ),
    )  # fmt: skip
    want = _infer(grpcclient, running.grpc_url, "plain_tls")
    assert want.shape == (2, 3)
    for model in ("classifier", "by_name"):
        for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
            np.testing.assert_allclose(_infer(mod, url, model), want, rtol=1e-6)


@pytest.mark.parametrize("client", CLIENTS)
def test_a_ca_that_did_not_sign_the_upstream_or_another_name_leaves_it_out_saying_why(
    tmp_path, serve, upstreams, pki, client
):
    tls, _ = upstreams
    running = serve(
        "",
        remote_models=(
            RemoteModel("wrong_ca", (tls.grpc_url,), upstream_model="classifier", tls=True,
                        tls_ca_file=pki.path("other-ca.crt"), client=client, **FAST),
            RemoteModel("wrong_name", (tls.grpc_url,), upstream_model="classifier", tls=True,
                        tls_ca_file=pki.path("ca.crt"), tls_server_name="elsewhere.example", client=client, **FAST),
        ),
    )  # fmt: skip
    c = grpcclient.InferenceServerClient(running.grpc_url)
    for model, words in (("wrong_ca", "certificate_verify_failed"), ("wrong_name", "hostname verification")):
        assert not c.is_model_ready(model)
        why = _failure(running, model)
        assert why.startswith("StatusCode.UNAVAILABLE") and tls.grpc_url in why and words in why.lower(), why


@pytest.mark.parametrize("client", CLIENTS)
def test_a_client_certificate_the_upstream_refuses_leaves_it_out(tmp_path, serve, upstreams, pki, client):
    _, secured = upstreams
    spec = RemoteModel("classifier", (secured.grpc_url,), tls=True, tls_ca_file=pki.path("ca.crt"),
                       tls_cert_file=pki.path("rogue.crt"), tls_key_file=pki.path("rogue.key"),
                       token_file=_token_file(tmp_path, TOKEN_A), client=client, **FAST)  # fmt: skip
    running = serve("", remote_models=(spec,))
    assert not grpcclient.InferenceServerClient(running.grpc_url).is_model_ready("classifier")
    why = _failure(running)  # (gRPC says only "Socket closed": the upstream ends the handshake)
    assert why.startswith("StatusCode.UNAVAILABLE") and secured.grpc_url in why, why


@pytest.mark.parametrize("client", CLIENTS)
def test_without_the_token_the_upstreams_unauthenticated_is_the_reason(tmp_path, serve, upstreams, pki, client):
    _, secured = upstreams
    spec = RemoteModel("classifier", (secured.grpc_url,), tls=True, tls_ca_file=pki.path("ca.crt"),
                       tls_cert_file=pki.path("client.crt"), tls_key_file=pki.path("client.key"),
                       client=client, **FAST)  # fmt: skip
    running = serve("", remote_models=(spec,))
    assert not grpcclient.InferenceServerClient(running.grpc_url).is_model_ready("classifier")
    why = _failure(running)
    assert why.startswith("StatusCode.UNAVAILABLE") and "UNAUTHENTICATED" in why and secured.grpc_url in why, why


@pytest.mark.parametrize("client", CLIENTS)
def test_a_rotated_token_file_is_used_without_a_restart(tmp_path, serve, upstreams, pki, client):
    _, secured = upstreams
    token = _token_file(tmp_path, TOKEN_A)
    spec = RemoteModel("classifier", (secured.grpc_url,), tls=True, tls_ca_file=pki.path("ca.crt"),
                       tls_cert_file=pki.path("client.crt"), tls_key_file=pki.path("client.key"),
                       token_file=token, client=client, **FAST)  # fmt: skip
    running = serve("", remote_models=(spec,))
    assert _infer(grpcclient, running.grpc_url).shape == (2, 3)
    try:
        secured.keys_file.write_text(_keys(TOKEN_B))  # A revoked upstream
        eventually(lambda: "UNAUTHENTICATED" in _failure(running), "the revoked token refused", timeout=30)
        (tmp_path / "token").write_text(TOKEN_B + "\n")
        eventually(lambda: _failure(running) == "", "the new token used", timeout=30)
        assert _infer(httpclient, running.http_url).shape == (2, 3)
    finally:
        secured.keys_file.write_text(_keys(TOKEN_A, TOKEN_B))


@pytest.mark.parametrize("client", CLIENTS)
def test_a_rotated_ca_file_is_used_by_new_connections(tmp_path, serve, upstreams, pki, client):
    tls, _ = upstreams
    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki.ca.pem)
    spec = RemoteModel("classifier", (tls.grpc_url,), tls=True, tls_ca_file=str(ca), client=client, **FAST)
    running = serve("", remote_models=(spec,))
    c = grpcclient.InferenceServerClient(running.grpc_url)
    assert _infer(grpcclient, running.grpc_url).shape == (2, 3)
    ca.write_bytes(pki.other_ca.pem)  # a CA that did not sign the upstream: no longer trusted
    eventually(lambda: not c.is_model_ready("classifier"), "the upstream out of rotation", timeout=30)
    assert "certificate_verify_failed" in _failure(running).lower()
    ca.write_bytes(pki.ca.pem)
    eventually(lambda: c.is_model_ready("classifier"), "the upstream back in rotation", timeout=30)
    assert _infer(grpcclient, running.grpc_url).shape == (2, 3)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("batching", ["passthrough", "gateway"])
def test_the_token_goes_on_every_call_and_the_callers_authorization_never_does(tmp_path, serve, client, batching):
    fake = FakeUpstream()
    try:
        spec = RemoteModel("fk", (fake.address,), token_file=_token_file(tmp_path, TOKEN_A), client=client,
                           probe_interval_s=0.1, batching=batching)  # fmt: skip
        running = serve("", remote_models=(spec,))
        x = np.ones((1, 2), np.float32)
        for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
            inp = mod.InferInput("x", [1, 2], "FP32")
            inp.set_data_from_numpy(x)
            got = mod.InferenceServerClient(url).infer("fk", [inp], headers={"authorization": "Bearer caller-secret"})
            np.testing.assert_array_equal(got.as_numpy("y"), 2 * x)
        assert fake.authorization == [f"Bearer {TOKEN_A}"] * 2
        assert fake.probe_authorization == f"Bearer {TOKEN_A}"
    finally:
        fake.stop()


@pytest.mark.parametrize(
    ("files", "words"),
    [
        (dict(token_file="missing"), "token_file"),
        (dict(tls=True, tls_ca_file="token"), "tls_ca_file"),
        (dict(tls=True, tls_cert_file="ca.crt", tls_key_file="ca.crt"), "tls_key_file"),
        (dict(tls=True, tls_cert_file="client.crt", tls_key_file="server.key"), "cannot be used together"),
        (dict(token_file="empty"), "holds no token"),
    ],
)
def test_unusable_files_stop_the_start_naming_the_key_and_the_file(tmp_path, pki, files, words):
    (pki.dir / "token").write_text(TOKEN_A)
    (pki.dir / "empty").write_text("\n")
    given = {k: v if isinstance(v, bool) else pki.path(v) for k, v in files.items()}
    spec = RemoteModel("m", ("127.0.0.1:1",), **given)
    with pytest.raises(ConfigError) as e:
        start_gateway("", remote_models=(spec,))
    assert words in str(e.value) and "remote model 'm'" in str(e.value), e.value
    assert TOKEN_A not in str(e.value)


@pytest.mark.parametrize("client", CLIENTS)
def test_a_shadow_copy_to_a_secured_upstream_goes_over_tls_with_its_token(tmp_path, upstreams, pki, client):
    """A shadow's copies go over a blocking channel of their own (``Upstream.blocking_infer``)."""
    import urllib.request

    from route_support import metric, write_config

    _, secured = upstreams
    files = dict(tls=True, tls_ca_file=pki.path("ca.crt"), tls_cert_file=pki.path("client.crt"),
                 tls_key_file=pki.path("client.key"), client=client, **FAST)  # fmt: skip
    routes = [
        {
            "name": "scored",
            "variants": [{"name": "main", "model": "main", "weight": 100}],
            "shadows": [{"name": "copy", "model": "copy", "percent": 100}],
        }
    ]
    running = start_gateway(
        "",
        config_file=write_config(str(tmp_path / "routes.yaml"), routes),
        remote_models=(
            RemoteModel("main", (secured.grpc_url,), upstream_model="classifier",
                        token_file=_token_file(tmp_path, TOKEN_A), **files),
            RemoteModel("copy", (secured.grpc_url,), upstream_model="classifier",
                        token_file=str(_write(tmp_path / "token_b", TOKEN_B)), **files),
        ),
    )  # fmt: skip
    try:

        def answered() -> float:
            text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
            return metric(text, "batchgate_shadow_requests_total", route="scored", shadow="copy", outcome="answered")

        # Shadow senders run at SCHED_IDLE: on a machine busy with other work a copy may starve
        # past its channel's connection attempt (counted failed, its reason logged), so requests
        # go on until three copies are answered; a wrong certificate or token answers none.
        end = time.monotonic() + 60
        while answered() < 3:
            assert time.monotonic() < end, "three copies answered over TLS with the token"
            assert _infer(grpcclient, running.grpc_url, "scored").shape == (2, 3)
            time.sleep(0.2)
    finally:
        running.stop()


def _write(path, token: str):
    path.write_text(token + "\n")
    return path


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_cli_stops_at_start_on_a_missing_token_file_naming_it(tmp_path, workers):
    """As a served process: one process, and the supervisor of several (nothing started)."""
    from processes import Proc

    missing = tmp_path / "no-token"
    p = Proc(["serve", "--workers", workers, "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
              "--metrics-port", "-1", "--admin-port", "-1", "--admin-http-port", "-1",
              "--remote-model", f"name=m upstreams=127.0.0.1:1 token_file={missing}"])  # fmt: skip
    try:
        assert p.p.wait(60) != 0
    finally:
        p.kill()
    assert f"token_file {missing}: cannot read it" in p.output() and "remote model 'm'" in p.output(), p.output()
    assert "starting 2 worker processes" not in p.output()  # (the supervisor reads them before any worker starts)


def test_a_token_file_caught_half_written_is_not_sent(tmp_path, serve):
    """Rewritten in place, the file is read only once it stood still for a poll (probe_interval_s)."""
    from gateway_support import judge_while_half_written

    fake = FakeUpstream()
    try:
        token = _token_file(tmp_path, TOKEN_A)
        running = serve("", remote_models=(RemoteModel("fk", (fake.address,), token_file=token, probe_interval_s=0.5),))
        x = np.ones((1, 2), np.float32)

        def sent() -> str | None:
            inp = grpcclient.InferInput("x", [1, 2], "FP32")
            inp.set_data_from_numpy(x)
            grpcclient.InferenceServerClient(running.grpc_url).infer("fk", [inp])
            return fake.authorization[-1]

        judge_while_half_written(token, TOKEN_A[:8], TOKEN_A + "\n", 0.5, sent, f"Bearer {TOKEN_A}")
    finally:
        fake.stop()


def test_a_reload_after_the_token_file_became_unusable_says_why(tmp_path, serve):
    """The model loaded again (the load API; a new version upstream, too) while its token file is empty:
    the new load failed with "no upstream serves model 'fk': " and no reason (its upstreams were
    left out, the file's error unsaid); the reason names the file."""
    fake = FakeUpstream()
    try:
        token = _token_file(tmp_path, TOKEN_A)
        spec = RemoteModel("fk", (fake.address,), token_file=token, probe_interval_s=0.1)
        running = serve("", model_control_mode="explicit", allow_open_admin=True, remote_models=(spec,))
        c = httpclient.InferenceServerClient(running.http_url)
        assert c.is_model_ready("fk")
        (tmp_path / "token").write_text("")
        with pytest.raises(InferenceServerException) as e:
            c.load_model("fk")
        assert f"token_file {token}" in str(e.value), e.value
        # the version loaded before serves on, with the token it read
        inp = grpcclient.InferInput("x", [1, 2], "FP32")
        inp.set_data_from_numpy(np.ones((1, 2), np.float32))
        grpcclient.InferenceServerClient(running.grpc_url).infer("fk", [inp])
        assert fake.authorization[-1] == f"Bearer {TOKEN_A}"
    finally:
        fake.stop()
