"""The system shared-memory extension with tritonclient's own shared-memory utilities, over both
protocols; its bounds (key prefix, segment and region limits, counts, bytes, scopes) as an attacker
would probe them; CUDA shared memory and trace settings answered UNIMPLEMENTED with the reason; the
logging extension.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
import yaml
from tritonclient.utils import InferenceServerException

from batchgate.demo import build_demo_repository
from batchgate.security.auth import hash_token, new_token

INFER_TOKEN, READ_TOKEN, OTHER_TOKEN = new_token(), new_token(), new_token()
PROTOCOLS = [(grpcclient, "grpc"), (httpclient, "http")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return build_demo_repository(str(tmp_path_factory.mktemp("models")))


@pytest.fixture
def segments():
    """Create POSIX shared-memory segments (tritonclient's utilities); all destroyed at the end."""
    made = []

    def make(size: int, prefix: str = "/batchgate_"):
        key = f"{prefix}{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key[1:], key, size)
        made.append(handle)
        return key, handle

    yield make
    for h in made:
        shm.destroy_shared_memory_region(h)


def _keys_file(tmp_path, *keys: tuple[str, str, list[str]]) -> str:
    """An api_keys_file of (id, token, scopes) entries."""
    path = tmp_path / "keys.yaml"
    entries = [{"id": i, "sha256": hash_token(token), "scopes": scopes} for i, token, scopes in keys]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return str(path)


def _url(running, mod) -> str:
    return running.grpc_url if mod is grpcclient else running.http_url


def _code(e: InferenceServerException) -> str:
    return (e.status() or "").replace("StatusCode.", "")


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_inputs_read_from_and_outputs_written_to_registered_regions(repo, serve, segments, mod, proto):
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    x = np.random.default_rng(1).random((4, 4), dtype=np.float32)
    in_key, in_h = segments(x.nbytes + 100)
    out_key, out_h = segments(4 * 3 * 4)
    shm.set_shared_memory_region(in_h, [x], offset=100)
    c.register_system_shared_memory("in", in_key, x.nbytes, offset=100)
    c.register_system_shared_memory("out", out_key, 48)
    status = c.get_system_shared_memory_status()
    regions = {r.name: r for r in status.regions.values()} if mod is grpcclient else {r["name"]: r for r in status}
    assert set(regions) == {"in", "out"}
    assert (regions["in"].offset if mod is grpcclient else regions["in"]["offset"]) == 100

    inp = mod.InferInput("features", [4, 4], "FP32")
    inp.set_shared_memory("in", x.nbytes)
    out = mod.InferRequestedOutput("probabilities")
    out.set_shared_memory("out", 48)
    r = c.infer("classifier", [inp], outputs=[out])
    meta = r.get_output("probabilities")
    shape = list(meta.shape) if mod is grpcclient else meta["shape"]
    assert shape == [4, 3]
    got = shm.get_contents_as_numpy(out_h, np.float32, [4, 3])
    plain = mod.InferInput("features", [4, 4], "FP32")
    plain.set_data_from_numpy(x)
    want = c.infer("classifier", [plain]).as_numpy("probabilities")
    np.testing.assert_allclose(got, want, rtol=1e-6)

    # An input in shared memory beside one sent in the request (gRPC: raw contents keep their order).
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 5, np.int32)
    a_key, a_h = segments(a.nbytes)
    shm.set_shared_memory_region(a_h, [a])
    c.register_system_shared_memory("a", a_key, a.nbytes)
    i0 = mod.InferInput("INPUT0", [1, 16], "INT32")
    i0.set_shared_memory("a", a.nbytes)
    i1 = mod.InferInput("INPUT1", [1, 16], "INT32")
    i1.set_data_from_numpy(b)
    r = c.infer("simple", [i0, i1])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)

    c.unregister_system_shared_memory("a")
    status = c.get_system_shared_memory_status()
    assert len(status.regions if mod is grpcclient else status) == 2
    c.unregister_system_shared_memory()  # all
    status = c.get_system_shared_memory_status()
    assert len(status.regions if mod is grpcclient else status) == 0
    metrics = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    assert "batchgate_shm_regions 0.0" in metrics
    assert 'batchgate_shm_requests_total{action="register",outcome="OK"} 3.0' in metrics


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_every_bound_a_client_controls_is_enforced(repo, serve, segments, tmp_path, mod, proto):
    running = serve(repo, shm_max_regions=2, shm_max_bytes=4096)
    c = mod.InferenceServerClient(_url(running, mod))
    key, h = segments(1024)

    def refused(call, code_grpc: str, code_http: str, text: str):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert text in e.value.message(), e.value.message()
        if mod is grpcclient:
            assert _code(e.value) == code_grpc, e.value
        else:
            assert str(e.value.status()) == code_http, e.value

    # A key outside the prefix: another process's segment is never mapped.
    other_key, _ = segments(64, prefix="/other_")
    refused(lambda: c.register_system_shared_memory("x", other_key, 64), "PERMISSION_DENIED", "403", "(shm_key_prefix)")
    # Not a plain shared-memory name, or no such segment.
    refused(
        lambda: c.register_system_shared_memory("x", "/batchgate_../../etc/passwd", 8),
        "INVALID_ARGUMENT",
        "400",
        "must be a POSIX",
    )
    refused(
        lambda: c.register_system_shared_memory("x", "/batchgate_missing", 8),
        "INVALID_ARGUMENT",
        "400",
        "cannot be opened",
    )
    # A symbolic link planted in /dev/shm under the prefix is not followed.
    link = f"/dev/shm/batchgate_link{uuid.uuid4().hex[:8]}"
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 4096)
    os.symlink(target, link)
    try:
        refused(
            lambda: c.register_system_shared_memory("x", "/" + os.path.basename(link), 8),
            "INVALID_ARGUMENT",
            "400",
            "cannot be opened",
        )
    finally:
        os.unlink(link)
    # The region must lie inside its segment.
    refused(
        lambda: c.register_system_shared_memory("x", key, 1000, offset=100),
        "INVALID_ARGUMENT",
        "400",
        "runs past the end of segment",
    )
    # Counts and bytes, and names taken.
    c.register_system_shared_memory("r1", key, 1024)
    refused(lambda: c.register_system_shared_memory("r1", key, 8), "ALREADY_EXISTS", "409", "already registered")
    key2, _ = segments(8192)
    # larger than the whole budget: never to be registered, a 400 (it was a 429, as if freeing could help)
    refused(lambda: c.register_system_shared_memory("r2", key2, 8192), "INVALID_ARGUMENT", "400", "(shm_max_bytes)")
    refused(lambda: c.register_system_shared_memory("r2", key2, 2**63), "INVALID_ARGUMENT", "400", "(shm_max_bytes)")
    refused(lambda: c.register_system_shared_memory("r2", key2, 3500), "RESOURCE_EXHAUSTED", "429", "(shm_max_bytes)")
    c.register_system_shared_memory("r2", key2, 16)
    refused(lambda: c.register_system_shared_memory("r3", key2, 16), "RESOURCE_EXHAUSTED", "429", "(shm_max_regions)")

    # Reads and writes stay inside the region: a request cannot reach past it.
    def shm_input(region: str, size: int, offset: int = 0):
        inp = mod.InferInput("features", [4, 4], "FP32")
        return inp.set_shared_memory(region, size, offset=offset)

    for inp, text in (
        (shm_input("r2", 64), "runs past the end of shared-memory region 'r2'"),  # the region holds 16 bytes
        (shm_input("r1", 64, offset=1000), "runs past the end of shared-memory region 'r1'"),
        (shm_input("nope", 64), "'nope' is not registered"),
        (shm_input("r1", 60), "input 'features'"),  # too few bytes for the shape
    ):
        refused(lambda inp=inp: c.infer("classifier", [inp]), "INVALID_ARGUMENT", "400", text)
    out = mod.InferRequestedOutput("probabilities")
    out.set_shared_memory("r2", 16)  # [4, 3] FP32 is 48 bytes
    refused(
        lambda: c.infer("classifier", [shm_input("r1", 64)], outputs=[out]),
        "INVALID_ARGUMENT",
        "400",
        "more than the 16 bytes",
    )
    c.unregister_system_shared_memory("nope")  # a name never registered: nothing to do, no error (as Triton)
    c.unregister_system_shared_memory()
    # The server still serves.
    plain = mod.InferInput("features", [1, 4], "FP32")
    plain.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert c.infer("classifier", [plain]).as_numpy("probabilities").shape == (1, 3)


def test_with_api_keys_registering_needs_scope_infer_or_admin(repo, serve, segments, tmp_path):
    keys = _keys_file(
        tmp_path,
        ("app", INFER_TOKEN, ["infer"]),
        ("dash", READ_TOKEN, ["read"]),
        ("other", OTHER_TOKEN, ["infer", "read"]),
    )
    running = serve(repo, api_keys_file=keys)
    key, _ = segments(64, prefix="/batchgate_app_")
    for mod in (grpcclient, httpclient):
        c = mod.InferenceServerClient(_url(running, mod))
        with pytest.raises(InferenceServerException) as e:
            c.register_system_shared_memory("r", key, 64)
        assert "UNAUTHENTICATED" in str(e.value.status()) or "401" in str(e.value.status())
        with pytest.raises(InferenceServerException) as e:
            c.register_system_shared_memory("r", key, 64, headers={"authorization": f"Bearer {READ_TOKEN}"})
        assert "needs scope 'infer' or 'admin'" in e.value.message()
        c.register_system_shared_memory("r", key, 64, headers={"authorization": f"Bearer {INFER_TOKEN}"})
        c.unregister_system_shared_memory("r", headers={"authorization": f"Bearer {INFER_TOKEN}"})


def test_with_api_keys_a_region_is_its_keys_alone(repo, serve, segments, tmp_path):
    """Another tenant cannot read a key's inputs, overwrite its outputs, see or unregister its
    regions by naming them; two keys may use the same region name."""
    keys = _keys_file(tmp_path, ("app", INFER_TOKEN, ["infer", "read"]), ("other", OTHER_TOKEN, ["infer", "read"]))
    running = serve(repo, api_keys_file=keys, shm_max_regions_per_key=2, shm_max_bytes_per_key=4096)
    app = {"authorization": f"Bearer {INFER_TOKEN}"}
    other = {"authorization": f"Bearer {OTHER_TOKEN}"}
    x = np.ones((1, 4), np.float32)
    key, h = segments(x.nbytes + 12, prefix="/batchgate_app_")
    other_key, _ = segments(64, prefix="/batchgate_other_")
    shm.set_shared_memory_region(h, [x])
    for mod in (grpcclient, httpclient):
        c = mod.InferenceServerClient(_url(running, mod))
        with pytest.raises(InferenceServerException) as e:  # a key maps only segments named for it
            c.register_system_shared_memory("stolen", key, x.nbytes, headers=other)
        assert "does not start with '/batchgate_other_'" in e.value.message()
        c.register_system_shared_memory("in", key, x.nbytes, headers=app)
        status = c.get_system_shared_memory_status(headers=other)
        assert len(status.regions if mod is grpcclient else status) == 0  # not its region
        inp = mod.InferInput("features", [1, 4], "FP32").set_shared_memory("in", x.nbytes)
        with pytest.raises(InferenceServerException) as e:
            c.infer("classifier", [inp], headers=other)
        assert "'in' is not registered" in e.value.message()
        out = mod.InferRequestedOutput("probabilities")
        out.set_shared_memory("in", 12)
        with pytest.raises(InferenceServerException) as e:  # nor write into it
            c.infer(
                "classifier",
                [mod.InferInput("features", [1, 4], "FP32").set_data_from_numpy(x)],
                outputs=[out],
                headers=other,
            )
        assert "'in' is not registered" in e.value.message()
        c.unregister_system_shared_memory("in", headers=other)  # none of its own by that name: a no-op
        c.register_system_shared_memory("in", other_key, 4, headers=other)  # the same name, its own
        got = c.infer("classifier", [inp], headers=app).as_numpy("probabilities")  # the owner still can
        assert got.shape == (1, 3)
        c.unregister_system_shared_memory(headers=other)  # all of its own: app's stays
        status = c.get_system_shared_memory_status(headers=app)
        assert len(status.regions if mod is grpcclient else status) == 1
        c.unregister_system_shared_memory(headers=app)
    # One key cannot take every tenant's share: its own regions and bytes are bounded. (Fresh
    # header dicts: tritonclient's HTTP infer adds its own entries to the one it is given.)
    app = {"authorization": f"Bearer {INFER_TOKEN}"}
    other = {"authorization": f"Bearer {OTHER_TOKEN}"}
    c = grpcclient.InferenceServerClient(running.grpc_url)
    big, _ = segments(8192, prefix="/batchgate_app_")
    with pytest.raises(InferenceServerException) as e:
        c.register_system_shared_memory("big", big, 8192, headers=app)
    assert e.value.message().endswith("(shm_max_bytes_per_key)")
    c.register_system_shared_memory("a", big, 16, headers=app)
    c.register_system_shared_memory("b", big, 16, headers=app)
    with pytest.raises(InferenceServerException) as e:
        c.register_system_shared_memory("c", big, 16, headers=app)
    assert e.value.message().endswith("(shm_max_regions_per_key)")
    c.register_system_shared_memory("c", other_key, 16, headers=other)  # another key still can


def test_a_key_whose_id_starts_another_keys_id_cannot_map_that_keys_segments(repo, serve, segments, tmp_path):
    # ids may hold '_': '/batchgate_app_x_...' starts with key 'app''s prefix, but is named for 'app_x'
    keys = _keys_file(tmp_path, ("app", INFER_TOKEN, ["infer"]), ("app_x", OTHER_TOKEN, ["infer"]))
    running = serve(repo, api_keys_file=keys)
    app = {"authorization": f"Bearer {INFER_TOKEN}"}
    app_x = {"authorization": f"Bearer {OTHER_TOKEN}"}
    theirs, _ = segments(64, prefix="/batchgate_app_x_")
    mine, _ = segments(64, prefix="/batchgate_app_")
    for mod in (grpcclient, httpclient):
        c = mod.InferenceServerClient(_url(running, mod))
        with pytest.raises(InferenceServerException) as e:
            c.register_system_shared_memory("stolen", theirs, 64, headers=dict(app))
        assert "named for another API key" in e.value.message()
        c.register_system_shared_memory("r", theirs, 64, headers=dict(app_x))  # its owner may
        c.register_system_shared_memory("r", mine, 64, headers=dict(app))
        c.unregister_system_shared_memory(headers=dict(app_x))
        c.unregister_system_shared_memory(headers=dict(app))


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_a_region_unregistered_while_a_request_uses_it_still_takes_that_requests_output(
    tmp_path, serve, segments, mod, proto
):
    # A model that holds each request 0.5 s in its batching queue: the region is unregistered
    # meanwhile. Triton lets requests in flight finish; so does batchgate.
    repo = build_demo_repository(str(tmp_path / "models"))
    config = tmp_path / "models" / "classifier" / "config.pbtxt"
    config.write_text("max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 500000 }\n")
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    x = np.ones((1, 4), np.float32)
    out_key, out_h = segments(12)
    c.register_system_shared_memory("out", out_key, 12)
    inp = mod.InferInput("features", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    out = mod.InferRequestedOutput("probabilities")
    out.set_shared_memory("out", 12)
    answered: list = []

    def infer():  # (a client of its own: tritonclient.http's is bound to the thread that made it)
        answered.append(mod.InferenceServerClient(_url(running, mod)).infer("classifier", [inp], outputs=[out]))

    t = threading.Thread(target=infer)
    t.start()
    time.sleep(0.2)
    mod.InferenceServerClient(_url(running, mod)).unregister_system_shared_memory("out")
    t.join(10)
    assert answered, "the request failed"
    written = shm.get_contents_as_numpy(out_h, np.float32, [1, 3])
    plain = c.infer("classifier", [inp]).as_numpy("probabilities")
    np.testing.assert_allclose(written, plain, rtol=1e-6)
    assert (
        len(c.get_system_shared_memory_status().regions if mod is grpcclient else c.get_system_shared_memory_status())
        == 0
    )


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_cuda_shared_memory_answers_unimplemented_and_trace_settings_say_tracing_is_off(repo, serve, mod, proto):
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    calls = [c.get_cuda_shared_memory_status, lambda: c.unregister_cuda_shared_memory("x")]
    for call in calls:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert "CUDA shared memory is not supported" in e.value.message()
        assert "UNIMPLEMENTED" in str(e.value.status()) or "501" in str(e.value.status())
    off = c.get_trace_settings() if mod is not grpcclient else c.get_trace_settings(as_json=True)["settings"]
    assert "OFF" in str(off["trace_level"])  # tracing off (tests/integration/test_tracing.py: on)
    with pytest.raises(InferenceServerException) as e:
        c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert "request tracing is off" in e.value.message()
    extensions = c.get_server_metadata()
    names = extensions.extensions if mod is grpcclient else extensions["extensions"]
    assert "system_shared_memory" in names and "logging" in names and "trace" in names
    assert "cuda_shared_memory" not in names


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_log_settings_are_read_and_changed_and_a_client_log_file_is_refused(repo, serve, mod, proto):
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    root = logging.getLogger()
    before = root.level
    try:
        now = c.get_log_settings(as_json=True) if mod is grpcclient else c.get_log_settings()
        settings = now["settings"] if mod is grpcclient else now
        if mod is grpcclient:
            settings = {k: next(iter(v.values())) for k, v in settings.items()}
        assert settings["log_file"] == "" and "log_verbose_level" in settings
        c.update_log_settings({"log_info": False, "log_warning": False})
        assert root.level == logging.ERROR
        c.update_log_settings({"log_verbose_level": 1})
        assert root.level == logging.DEBUG
        c.update_log_settings({"log_verbose_level": 3, "log_format": "ISO8601"})  # read back as given (Triton's)
        now = c.get_log_settings(as_json=True) if mod is grpcclient else c.get_log_settings()
        settings = now["settings"] if mod is grpcclient else now
        if mod is grpcclient:
            settings = {k: next(iter(v.values())) for k, v in settings.items()}
        assert int(settings["log_verbose_level"]) == 3 and settings["log_format"] == "ISO8601"
        for bad, text in (
            ({"log_file": "/tmp/x.log"}, "log_file cannot be set"),
            ({"log_colour": True}, "unknown log setting"),
            ({"log_format": "xml"}, "log_format must be one of"),
        ):
            with pytest.raises(InferenceServerException) as e:
                c.update_log_settings(bad)
            assert text in e.value.message()
        assert root.level == logging.DEBUG  # a refused change changes nothing
    finally:
        root.setLevel(before)


def test_a_grpc_log_setting_with_no_value_is_refused_log_file_too(repo, serve):
    """Over gRPC a SettingValue with no field set is no value: Triton refuses it for every
    setting ("expect string for 'log_file'"), as the other settings were refused here, but an
    empty log_file was taken as ""."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    running = serve(repo)
    with grpc.insecure_channel(running.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for key, text in (("log_file", "log_file must be text"), ("log_info", "log_info must be true or false")):
            req = service_pb2.LogSettingsRequest()
            req.settings[key].Clear()
            with pytest.raises(grpc.RpcError) as info:
                stub.LogSettings(req, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details(), key
        req = service_pb2.LogSettingsRequest()
        req.settings["log_file"].string_param = ""  # (as tritonclient sends it: the standard error, taken)
        assert stub.LogSettings(req, timeout=10).settings["log_file"].string_param == ""


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_a_verbose_level_back_to_0_gives_back_the_levels_set_before(repo, serve, mod):
    """Triton's log_info is a switch of its own, which a verbose level does not change. Here one
    threshold serves both: a verbose level holds it at debug, and the switches read as on
    meanwhile; setting the level back to 0 took those readings as the switches, so a server
    logging warnings and errors was left logging info lines too."""
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    root = logging.getLogger()
    before = root.level
    try:
        c.update_log_settings({"log_info": False, "log_warning": True, "log_error": True, "log_verbose_level": 0})
        assert root.level == logging.WARNING
        c.update_log_settings({"log_verbose_level": 2})
        assert root.level == logging.DEBUG
        c.update_log_settings({"log_format": "default"})  # another change meanwhile keeps them too
        c.update_log_settings({"log_verbose_level": 0})
        assert root.level == logging.WARNING
        now = c.get_log_settings(as_json=True)["settings"] if mod is grpcclient else c.get_log_settings()
        if mod is grpcclient:
            now = {k: next(iter(v.values())) for k, v in now.items()}
        assert (now["log_info"], now["log_warning"], now["log_verbose_level"]) == (False, True, 0)
        c.update_log_settings({"log_verbose_level": 1, "log_info": True})  # given with it: taken
        c.update_log_settings({"log_verbose_level": 0})
        assert root.level == logging.INFO
    finally:
        root.setLevel(before)


def test_a_log_setting_given_as_null_over_http_is_left_as_it_is(repo, serve):
    """Triton's HTTP logging endpoint skips a setting whose value is null and applies the rest;
    a null was refused 400 ("log_info must be true or false") and nothing was changed."""
    running = serve(repo)
    root = logging.getLogger()
    before = root.level
    url = f"http://{running.http_url}/v2/logging"
    try:
        root.setLevel(logging.WARNING)
        with urllib.request.urlopen(url, timeout=10) as r:
            fmt = json.loads(r.read())["log_format"]
        body = b'{"log_info": null, "log_verbose_level": 1, "log_format": null, "log_file": null}'
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as r:
            now = json.loads(r.read())
        assert root.level == logging.DEBUG and now["log_verbose_level"] == 1 and now["log_format"] == fmt
        with pytest.raises(urllib.error.HTTPError) as e:  # a value of the wrong type is still refused
            urllib.request.urlopen(urllib.request.Request(url, data=b'{"log_info": "no"}'), timeout=10)
        assert e.value.code == 400 and "log_info must be true or false" in e.value.read().decode()
    finally:
        root.setLevel(before)


def test_the_http_endpoints_refuse_malformed_registrations(repo, serve, segments):
    running = serve(repo)
    key, _ = segments(64)
    base = f"http://{running.http_url}/v2/systemsharedmemory/region/r/register"
    for body, text in (
        (b"[]", "must be a JSON object"),
        (b'{"key": 7, "byte_size": 8}', "must be a JSON object with 'key'"),
        (f'{{"key": "{key}", "byte_size": "8"}}'.encode(), "whole numbers"),
        (f'{{"key": "{key}", "byte_size": 0}}'.encode(), "byte_size >= 1"),
        (f'{{"key": "{key}", "byte_size": 8, "offset": -1}}'.encode(), "offset >= 0"),
    ):
        req = urllib.request.Request(base, data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and text in e.value.read().decode(), body


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_a_segment_shrunk_after_registration_is_refused_not_a_crash(repo, serve, segments, mod, proto):
    """Regression: regions were mapped, and a client that truncated its segment after registering
    it would have made the next read of the mapping kill the server (SIGBUS)."""
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    x = np.ones((1, 4), np.float32)
    key, h = segments(4096)
    shm.set_shared_memory_region(h, [x], offset=2048)
    c.register_system_shared_memory("r", key, 2048 + x.nbytes)
    os.truncate(f"/dev/shm/{key[1:]}", 1024)
    inp = mod.InferInput("features", [1, 4], "FP32").set_shared_memory("r", x.nbytes, offset=2048)
    with pytest.raises(InferenceServerException) as e:
        c.infer("classifier", [inp])
    assert "shorter than when it was registered" in e.value.message()
    plain = mod.InferInput("features", [1, 4], "FP32")
    plain.set_data_from_numpy(x)
    assert c.infer("classifier", [plain]).as_numpy("probabilities").shape == (1, 3)  # still serving


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_an_input_size_that_does_not_fit_its_shape_is_refused_before_anything_is_read(
    repo, serve, segments, mod, proto
):
    """Regression: a ~270-byte request naming a 16-element input but a 512 MiB byte size made the
    server read (and allocate) the whole region on the event loop before refusing it."""
    running = serve(repo, max_request_bytes=1 << 20)
    c = mod.InferenceServerClient(_url(running, mod))
    key, _ = segments(4 << 20)
    c.register_system_shared_memory("big", key, 4 << 20)
    inp = mod.InferInput("features", [1, 4], "FP32").set_shared_memory("big", 4 << 20)
    with pytest.raises(InferenceServerException) as e:
        c.infer("classifier", [inp])
    assert "take 16 bytes, not shared_memory_byte_size 4194304" in e.value.message()
    words = mod.InferInput("INPUT", [1, 1], "BYTES").set_shared_memory("big", 2 << 20)  # BYTES: bounded by size
    with pytest.raises(InferenceServerException) as e:
        c.infer("identity_bytes", [words])
    assert "(max_request_bytes)" in e.value.message()


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_a_region_name_with_a_space_is_served_as_any_printable_name(repo, serve, segments, mod, proto):
    """Region names are printable ASCII but the two path separators, as the error for any other
    name says; a space (printable) was refused with that very message. Over HTTP tritonclient
    puts the name in the path percent-encoded: registered, named in a request, in the status on
    both protocols, unregistered by name."""
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    other = (httpclient if mod is grpcclient else grpcclient).InferenceServerClient(
        running.http_url if mod is grpcclient else running.grpc_url
    )
    x = np.random.default_rng(3).random((2, 4), dtype=np.float32)
    key, handle = segments(x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    c.register_system_shared_memory("input data", key, x.nbytes)
    status = c.get_system_shared_memory_status("input data")
    names = list(status.regions) if mod is grpcclient else [r["name"] for r in status]
    assert names == ["input data"]
    seen = other.get_system_shared_memory_status("input data")
    assert ([r["name"] for r in seen] if mod is grpcclient else list(seen.regions)) == ["input data"]
    inp = mod.InferInput("features", [2, 4], "FP32")
    inp.set_shared_memory("input data", x.nbytes)
    plain = mod.InferInput("features", [2, 4], "FP32")
    plain.set_data_from_numpy(x)
    np.testing.assert_array_equal(
        c.infer("classifier", [inp]).as_numpy("probabilities"), c.infer("classifier", [plain]).as_numpy("probabilities")
    )
    c.unregister_system_shared_memory("input data")
    status = c.get_system_shared_memory_status()
    assert len(status.regions if mod is grpcclient else status) == 0


@pytest.mark.parametrize("name", ["a/b", "../../etc/passwd", "a\\b"])
def test_a_region_name_with_a_path_separator_is_refused_on_grpc_too(repo, serve, segments, name):
    """HTTP names a region in its path and refuses an encoded separator there: such a name,
    registered over gRPC, was listed in HTTP's status but could not be named in its calls."""
    running = serve(repo)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    key, _ = segments(64)
    with pytest.raises(InferenceServerException) as e:
        c.register_system_shared_memory(name, key, 64)
    assert _code(e.value) == "INVALID_ARGUMENT"
    assert "not '/' or '\\'" in e.value.message()
    assert c.get_system_shared_memory_status().regions == {}


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_an_input_the_model_refuses_is_refused_before_its_region_is_read(repo, serve, segments, mod, proto):
    """A ~100-byte request naming a region is checked against the model before the region's bytes
    are read: before, a region of 11 M strings sent to an INT32 input was decoded on the event
    loop (7-9 s, 800 MB) only to be refused for its datatype. Here the region's BYTES are
    malformed: read first, they would be refused for that instead."""
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    key, handle = segments(4096)
    shm.set_shared_memory_region(handle, [np.full(1024, 0xFFFFFFFF, np.uint32)])  # no BYTES element fits
    c.register_system_shared_memory("words", key, 4096)
    inp = mod.InferInput("INPUT0", [1, 16], "BYTES").set_shared_memory("words", 4096)
    other = mod.InferInput("INPUT1", [1, 16], "INT32")
    other.set_data_from_numpy(np.zeros((1, 16), np.int32))
    with pytest.raises(InferenceServerException) as e:
        c.infer("simple", [inp, other])
    msg = e.value.message()
    assert "INPUT0" in msg and "INT32" in msg and "BYTES element" not in msg, msg


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_an_output_that_does_not_fit_its_region_fails_the_request_in_its_statistics(repo, serve, segments, mod, proto):
    """The write to shared memory is part of the request: one that does not fit is counted a
    failure (as on Triton, where the output buffer is allocated during the request), not a success
    answered with an error. Also on a stream."""
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    key, _ = segments(16)
    c.register_system_shared_memory("small", key, 16)
    inp = mod.InferInput("features", [4, 4], "FP32")
    inp.set_data_from_numpy(np.ones((4, 4), np.float32))
    out = mod.InferRequestedOutput("probabilities")
    out.set_shared_memory("small", 16)  # [4, 3] FP32 is 48 bytes

    def stats() -> tuple[int, int]:
        kw = {"as_json": True} if mod is grpcclient else {}
        s = c.get_inference_statistics("classifier", **kw)["model_stats"][0]
        st = s["inference_stats"]
        return int(st["success"].get("count", 0)), int(st["fail"].get("count", 0))

    with pytest.raises(InferenceServerException) as e:
        c.infer("classifier", [inp], outputs=[out])
    assert "more than the 16 bytes" in e.value.message()
    assert stats() == (0, 1)
    c.infer("classifier", [inp])
    assert stats() == (1, 1)
    if mod is grpcclient:  # a stream request: its error in the stream, counted the same way
        answers: list = []
        done = threading.Event()
        c.start_stream(lambda result, error: (answers.append((result, error)), done.set()))
        c.async_stream_infer("classifier", [inp], outputs=[out])
        assert done.wait(30)
        c.stop_stream()
        assert answers[0][0] is None and "more than the 16 bytes" in str(answers[0][1])
        assert stats() == (1, 2)
    c.unregister_system_shared_memory()


def _simple_inputs(mod):
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        inputs.append(mod.InferInput(name, [1, 16], "INT32"))
        inputs[-1].set_data_from_numpy(np.full((1, 16), 5, np.int32))
    return inputs


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_an_output_into_a_segment_shrunk_after_registration_is_refused_not_written(repo, serve, segments, mod, proto):
    """Regression: the write went past the segment's new end and grew it again, unasked, while
    the request answered OK."""
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    key, _ = segments(256)
    c.register_system_shared_memory("r", key, 256)
    path = f"/dev/shm/{key[1:]}"
    os.truncate(path, 0)
    out = mod.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("r", 64, offset=32)
    with pytest.raises(InferenceServerException) as e:
        c.infer("simple", _simple_inputs(mod), outputs=[out])
    assert "shorter than when it was registered" in e.value.message()
    assert os.path.getsize(path) == 0
    # shrunk to hold the first output but not the second: neither is written
    with open(path, "wb") as f:
        f.write(bytes([7]) * 64)
    first, second = mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")
    first.set_shared_memory("r", 64)
    second.set_shared_memory("r", 64, offset=64)
    with pytest.raises(InferenceServerException) as e:
        c.infer("simple", _simple_inputs(mod), outputs=[first, second])
    assert "shorter than when it was registered" in e.value.message()
    with open(path, "rb") as f:
        assert f.read() == bytes([7]) * 64


@pytest.mark.parametrize("mod, proto", PROTOCOLS)
def test_a_request_that_fails_writes_none_of_its_outputs(repo, serve, segments, mod, proto):
    """Regression: the outputs were written one by one, so a request refused for its second output
    (too large for its place) had already written its first into the client's region."""
    running = serve(repo)
    c = mod.InferenceServerClient(_url(running, mod))
    key, h = segments(128)
    shm.set_shared_memory_region(h, [np.full(32, 7, np.int32)])
    c.register_system_shared_memory("r", key, 128)
    first, second = mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")
    first.set_shared_memory("r", 64)
    second.set_shared_memory("r", 63, offset=64)  # one byte short
    with pytest.raises(InferenceServerException) as e:
        c.infer("simple", _simple_inputs(mod), outputs=[first, second])
    assert "more than the 63 bytes" in e.value.message()
    assert (shm.get_contents_as_numpy(h, np.int32, [32]) == 7).all()


def test_an_unregistered_region_holds_no_descriptor_once_its_requests_are_answered(repo, serve, segments):
    """Regression: each inference thread kept its last job, and through it the request's region,
    until its next job: an unregistered segment stayed open (its memory held) on an idle server."""
    running = serve(repo)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    key, _ = segments(4096)

    def open_on_it() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # (closed since the listing)
                n += os.readlink(f"/proc/self/fd/{fd}").endswith(key)
        return n

    mine = open_on_it()  # (the client's own, in this same process)
    for i in range(8):
        c.register_system_shared_memory(f"r{i}", key, 4096)
        out = grpcclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory(f"r{i}", 64)
        c.infer("simple", _simple_inputs(grpcclient), outputs=[out])
        c.unregister_system_shared_memory(f"r{i}")
    deadline = time.monotonic() + 10
    while open_on_it() > mine and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_on_it() == mine


def test_requests_cut_short_by_their_deadline_leave_no_region_open(repo, serve, segments):
    """Regression: a call whose deadline passed while it was queued left its exception in a
    reference cycle (the h2 call's task, the scheduler's waiter, a thrown-in cancellation each
    held a frame of its traceback), and through it the request and the regions it named: an
    unregistered (even deleted) segment stayed open, its memory held, until a full collection,
    as many as such calls had named. The cyclic collector is off here, so only plain reference
    counting can close them."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    if os.environ.get("BATCHGATE_TEST_GRPC_ENGINE") == "grpcio":
        pytest.skip("grpc.aio keeps a cancelled call's frames in cycles of its own (README, System shared memory)")
    running = serve(repo)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    x = np.random.default_rng(0).random((64, 256), dtype=np.float32)
    in_key, in_handle = segments(x.nbytes)
    shm.set_shared_memory_region(in_handle, [x])
    out_key, _ = segments(1 << 16)

    def open_on(key: str) -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/self/fd/{fd}").endswith(key)
        return n

    mine = open_on(out_key)  # (the test's own handle)

    def late(_):
        inp = grpcclient.InferInput("input", [64, 256], "FP32").set_shared_memory("in", x.nbytes)
        out = grpcclient.InferRequestedOutput("output")
        out.set_shared_memory("out", 64 * 16 * 4)
        with contextlib.suppress(InferenceServerException):
            c.infer("mlp", [inp], outputs=[out], client_timeout=0.005)

    gc.collect()
    gc.disable()
    try:
        c.register_system_shared_memory("in", in_key, x.nbytes)
        c.register_system_shared_memory("out", out_key, 1 << 16)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(late, range(64)))
        c.unregister_system_shared_memory()
        deadline = time.monotonic() + 10
        while open_on(out_key) > mine and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_on(out_key) == mine
    finally:
        gc.enable()


def test_a_key_removed_from_the_keys_file_takes_its_regions_with_it(repo, serve, segments, tmp_path):
    """Before, a revoked key's regions could never be unregistered (its token is refused) and
    kept their share of shm_max_regions until a restart: four revoked keys' regions shut every
    tenant out."""
    path = _keys_file(tmp_path, ("app", INFER_TOKEN, ["infer", "read"]), ("other", OTHER_TOKEN, ["infer", "read"]))
    running = serve(repo, api_keys_file=path, api_keys_poll_s=0.1, shm_max_regions=3)
    app = {"authorization": f"Bearer {INFER_TOKEN}"}
    other = {"authorization": f"Bearer {OTHER_TOKEN}"}
    c = grpcclient.InferenceServerClient(running.grpc_url)
    mine, _ = segments(64, prefix="/batchgate_app_")
    theirs, _ = segments(64, prefix="/batchgate_other_")
    for name in ("a", "b"):
        c.register_system_shared_memory(name, mine, 16, headers=app)
    c.register_system_shared_memory("keep", theirs, 16, headers=other)
    with pytest.raises(InferenceServerException):  # the pod's bound is reached
        c.register_system_shared_memory("more", theirs, 16, headers=dict(other))
    time.sleep(0.05)  # (a file's new mtime must differ from the last one seen)
    _keys_file(tmp_path, ("other", OTHER_TOKEN, ["infer", "read"]))  # 'app' revoked
    deadline = time.monotonic() + 10
    while running.gateway.dataplane.shm.bytes > 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["name"] for r in running.gateway.dataplane.shm.status("", "app")] == []
    c.register_system_shared_memory("more", theirs, 16, headers=dict(other))  # room again
    status = c.get_system_shared_memory_status(headers=dict(other))
    assert sorted(status.regions) == ["keep", "more"]
