"""Drift monitoring end to end: a model converted by ``batchgate convert sklearn``, a profile made
by ``batchgate drift profile`` (subprocesses), a real gateway with a drift monitor, tritonclient
traffic over gRPC and HTTP, a real HTTP receiver for the CloudEvents, and the admin API and CLI.

In-distribution traffic raises nothing; shifted traffic sets the metrics and delivers a
``detected`` event, in-distribution traffic again a ``recovered`` one; with the receiver down
the events go to the dead-letter file and are delivered once it is back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml

from batchgate.config import ConfigError
from drift_support import NAMES, Receiver, batchgate, build, traffic, wait_until
from gateway_support import start_gateway
from processes import free_port
from route_support import metric

pytestmark = pytest.mark.timeout(240)
ROWS = 20  # rows per request
WINDOW = 200  # rows per window: 10 requests


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("drift")))


def _config(path, profile: str, receiver_url: str, **over) -> str:
    monitor = {
        "model": "fraud",
        "inputs": ["features"],
        "reference": profile,
        "sample_rate": 1.0,
        "window": {"samples": WINDOW, "max_s": 60},
        "debounce_windows": 2,
        "outputs": True,
        "webhook": {"url": receiver_url, "format": "cloudevents", "timeout_s": 2, "retries": 1},
    }
    monitor.update(over)
    with open(path, "w") as f:
        yaml.safe_dump({"drift": [monitor]}, f)
    return str(path)


@pytest.fixture(scope="module")
def served(built, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift-served")
    receiver = Receiver()
    cfg = _config(tmp / "config.yaml", built["profile"], receiver.url)
    dead = str(tmp / "dead-letter.jsonl")
    gw = start_gateway(
        built["repo"],
        cfg,
        drift_dead_letter_file=dead,
        drift_dead_letter_retry_s=0.5,
        drift_profiles_dir=str(tmp / "profiles"),
        audit_log_file=str(tmp / "audit.jsonl"),
    )
    yield {"gw": gw, "receiver": receiver, "dead": dead, "tmp": tmp}
    gw.stop()
    receiver.close()


def _send(gw, x, protocol: str = "grpc", headers=None) -> None:
    if protocol == "grpc":
        with grpcclient.InferenceServerClient(gw.grpc_url) as c:
            i = grpcclient.InferInput("features", list(x.shape), "FP32")
            i.set_data_from_numpy(x)
            c.infer("fraud", [i], headers=headers)
    else:
        c = httpclient.InferenceServerClient(gw.http_url)
        i = httpclient.InferInput("features", list(x.shape), "FP32")
        i.set_data_from_numpy(x, binary_data=True)
        c.infer("fraud", [i], headers=headers)
        c.close()


def _windows(gw, count: int, seed: int, shift: float = 0.0) -> None:
    """``count`` windows' worth of traffic, half over each protocol; wait until they are scored."""
    before = _metric(gw, "batchgate_drift_windows_total", model="fraud")
    for k in range(count * WINDOW // ROWS):
        _send(gw, traffic(ROWS, seed * 1000 + k, shift), "grpc" if k % 2 else "http")
    assert wait_until(lambda: _metric(gw, "batchgate_drift_windows_total", model="fraud") >= before + count)


def _json(path):
    with open(path) as f:
        return json.load(f)


def _lines(path) -> list[dict]:
    """The JSON lines of a file (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _metrics(gw) -> str:
    return urllib.request.urlopen(gw.metrics_url, timeout=10).read().decode()


def _metric(gw, name: str, **labels) -> float:
    return metric(_metrics(gw), name, **labels)


def _admin(gw, path: str, body: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{gw.gateway.admin_http_port}/admin/v1/{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def test_in_distribution_traffic_raises_no_alarm_then_a_shift_is_announced_and_recovers(served, built):
    gw, receiver = served["gw"], served["receiver"]
    _windows(gw, 4, seed=1)
    assert _metric(gw, "batchgate_drift_active", model="fraud") == 0
    assert _metric(gw, "batchgate_drift_detections_total", model="fraud") == 0
    assert not receiver.events
    assert wait_until(lambda: _metric(gw, "batchgate_drift_samples_total", model="fraud", outcome="used") >= 40)
    assert _metric(gw, "batchgate_drift_score", model="fraud", feature="f2", test="ks") < 0.1

    _windows(gw, 3, seed=2, shift=1.0)  # feature f2 moves by one standard deviation
    assert _metric(gw, "batchgate_drift_active", model="fraud") == 1
    assert _metric(gw, "batchgate_drift_detected", model="fraud", feature="f2") == 1
    assert _metric(gw, "batchgate_drift_detected", model="fraud", feature="f0") == 0
    assert _metric(gw, "batchgate_drift_detections_total", model="fraud") == 1
    assert _metric(gw, "batchgate_drift_features_drifted", model="fraud") >= 1
    detected = receiver.wait_for(lambda e: e["type"] == "io.batchgate.drift.detected")
    assert len(detected) == 1
    event = detected[0]
    assert event["specversion"] == "1.0" and event["subject"] == "fraud" and event["id"]
    assert event["source"].startswith("/batchgate/") and event["datacontenttype"] == "application/json"
    assert receiver.headers[0]["content-type"].startswith("application/cloudevents+json")
    features = {d["feature"]: d["tests"] for d in event["data"]["drifted_features"]}
    assert "f2" in features and "f0" not in features
    assert event["data"]["profile_id"] == _json(built["profile"])["id"]
    ks = features["f2"].get("ks")
    assert ks is None or ks["p_value"] <= ks["p_threshold"]

    _windows(gw, 3, seed=3)
    recovered = receiver.wait_for(lambda e: e["type"] == "io.batchgate.drift.recovered")
    assert len(recovered) == 1 and recovered[0]["id"] != event["id"]
    assert _metric(gw, "batchgate_drift_active", model="fraud") == 0
    assert _metric(gw, "batchgate_drift_detected", model="fraud", feature="f2") == 0
    audit = _lines(served["tmp"] / "audit.jsonl")
    actions = [a["action"] for a in audit]
    assert "drift.detected" in actions and "drift.recovered" in actions


def test_with_the_receiver_down_events_wait_in_the_dead_letter_and_arrive_later(served):
    gw, receiver = served["gw"], served["receiver"]
    seen = len(receiver.events)
    receiver.up = False
    _windows(gw, 3, seed=4, shift=-1.5)
    assert wait_until(lambda: _lines(served["dead"]))
    lines = _lines(served["dead"])
    assert lines[0]["event"]["type"] == "io.batchgate.drift.detected"
    held = lines[0]["event"]["id"]
    assert wait_until(lambda: _metric(gw, "batchgate_drift_events_total", outcome="dead_lettered") >= 1)
    receiver.up = True
    arrived = receiver.wait_for(lambda e: e["id"] == held)
    assert arrived, "the dead-lettered event was not delivered once the receiver was back"
    assert wait_until(lambda: not _lines(served["dead"]))
    assert len(receiver.events) > seen
    _windows(gw, 3, seed=5)  # back to normal for the tests after this one
    assert receiver.wait_for(lambda e: e["type"] == "io.batchgate.drift.recovered" and e["id"] != held)


def test_synthetic_traffic_is_never_sampled(served):
    gw = served["gw"]
    wait_until(lambda: False, timeout=1.2)  # let the detector's counts settle
    used = _metric(gw, "batchgate_drift_samples_total", model="fraud", outcome="used")
    for k in range(5):
        _send(gw, traffic(ROWS, 9000 + k, shift=5.0), "grpc", headers={"x-batchgate-synthetic": "1"})
        _send(gw, traffic(ROWS, 9100 + k, shift=5.0), "http", headers={"x-batchgate-synthetic": "1"})
    wait_until(lambda: False, timeout=1.5)
    assert _metric(gw, "batchgate_drift_samples_total", model="fraud", outcome="used") == used


def test_status_rebaseline_and_reset_through_the_admin_api_and_the_cli(served):
    gw = served["gw"]
    listed = _admin(gw, "drift")
    assert [m["model"] for m in listed["monitors"]] == ["fraud"]
    status = _admin(gw, "drift/fraud")
    assert int(status["windows"]) >= 10 and status["detector_up"] and status["last_window"]["rows"] >= WINDOW
    assert set(status["last_window"]["result"]["features"]) >= set(NAMES)
    before = status["profile_id"]

    port = gw.gateway.admin_port
    done = batchgate("drift", "status", "--admin", f"127.0.0.1:{port}")
    assert done.returncode == 0 and "fraud" in done.stdout, done.stderr
    done = batchgate("drift", "rebaseline", "fraud", "--rows", "400", "--admin", f"127.0.0.1:{port}")
    assert done.returncode == 0, done.stderr
    after = json.loads(done.stdout)["profile_id"]
    assert after != before
    saved = served["tmp"] / "profiles" / "fraud.json"
    assert _json(saved)["source"]["based_on"] == before

    reset = _admin(gw, "drift/fraud/reset", {"reference": True})
    assert reset["profile_id"] == before and not reset["active"]
    assert not saved.exists()
    done = batchgate("drift", "status", "nosuch", "--admin", f"127.0.0.1:{port}")
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr
    with pytest.raises(urllib.error.HTTPError) as e:
        _admin(gw, "drift/fraud/rebaseline", {"rows": "many"})
    assert e.value.code == 400
    # a body that is not a JSON object is refused, not read as {} (protobuf's JSON reader took
    # `[]` for an empty message: a rebaseline of every row kept, from a malformed request)
    for body in ([], [{"rows": 5}], "rows", 7):
        with pytest.raises(urllib.error.HTTPError) as e:
            _admin(gw, "drift/fraud/rebaseline", body)  # type: ignore[arg-type]
        with e.value:
            assert e.value.code == 400 and "must be a JSON object" in json.loads(e.value.read())["error"], body
    assert _admin(gw, "drift/fraud")["profile_id"] == before
    audit = [a["action"] for a in _lines(served["tmp"] / "audit.jsonl")]
    assert "drift.rebaseline" in audit and "drift.reset" in audit


@pytest.mark.parametrize(
    "change, message",
    [
        ({"inputs": ["nosuch"]}, "the model has no input 'nosuch'"),
        ({"model": "absent"}, "no model or route of that name is served"),
        ({"reference": "/nonexistent/profile.json"}, "cannot read drift profile"),
    ],
)
def test_a_monitor_that_cannot_work_stops_the_start_with_a_message(built, tmp_path, change, message):
    cfg = _config(tmp_path / "c.yaml", built["profile"], "http://127.0.0.1:9/x", **change)
    with pytest.raises(ConfigError, match=message):
        start_gateway(built["repo"], cfg)


def test_a_profile_that_does_not_fit_the_model_or_the_feature_bound_is_refused(built, tmp_path):
    profile = _json(built["profile"])
    profile["inputs"]["features"] = profile["inputs"]["features"][:5]
    narrow = tmp_path / "narrow.json"
    narrow.write_text(json.dumps(profile))
    cfg = _config(tmp_path / "c.yaml", str(narrow), "http://127.0.0.1:9/x")
    with pytest.raises(ConfigError, match="has 8 columns but the profile describes 5"):
        start_gateway(built["repo"], cfg)
    cfg = _config(tmp_path / "d.yaml", built["profile"], "http://127.0.0.1:9/x")
    with pytest.raises(ConfigError, match=r"more than drift_max_features \(4\)"):
        start_gateway(built["repo"], cfg, drift_max_features=4)
    bad = _json(built["profile"])
    bad["inputs"]["features"][0]["name"] = 'f0",x="y'  # a feature name is a metric label
    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps(bad))
    cfg = _config(tmp_path / "e.yaml", str(evil), "http://127.0.0.1:9/x")
    with pytest.raises(ConfigError, match="is not allowed"):
        start_gateway(built["repo"], cfg)
    # a window that needs more rows than a rebaseline may keep: no rebaseline could ever be taken
    cfg = _config(
        tmp_path / "f.yaml", built["profile"], "http://127.0.0.1:9/x", window={"samples": 500, "min_samples": 200}
    )
    with pytest.raises(ConfigError, match="window.min_samples 200 is more than drift_rebaseline_max_rows 100"):
        start_gateway(built["repo"], cfg, drift_rebaseline_max_rows=100)


def test_a_detector_process_that_dies_is_restarted_and_scoring_goes_on(served):
    """Last in the module: it kills the served gateway's detector process."""
    gw = served["gw"]
    service = gw.gateway.drift
    pid = wait_until(lambda: service.detector_pid)
    assert pid and pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _metric(gw, "batchgate_drift_detector_restarts_total") == 1, timeout=20)
    assert wait_until(lambda: _metric(gw, "batchgate_drift_detector_up") == 1 and service.detector_pid != pid)
    before = _metric(gw, "batchgate_drift_windows_total", model="fraud")
    _windows(gw, 1, seed=6)
    assert _metric(gw, "batchgate_drift_windows_total", model="fraud") >= before + 1


@contextlib.contextmanager
def _stopped_detector(built, tmp_path, monitor: dict | None = None, **settings):
    """A gateway of its own whose detector process is stopped (SIGSTOP) once it is up: (the
    gateway, the stopped pid); the process let go and the gateway stopped at the end."""
    cfg = _config(tmp_path / "c.yaml", built["profile"], "http://127.0.0.1:9/x", **(monitor or {}))
    gw = start_gateway(built["repo"], cfg, **settings)
    pid = None
    try:
        assert wait_until(lambda: _metric(gw, "batchgate_drift_detector_up") == 1, timeout=60)
        pid = gw.gateway.drift.detector_pid
        os.kill(pid, signal.SIGSTOP)
        yield gw, pid
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        gw.stop()


def test_a_detector_that_stops_reporting_is_killed_and_started_again(built, tmp_path):
    """A hung detector (here stopped) read as up for ever, nothing scored: it reports every second,
    so one silent past drift_detector_hang_s is killed, counted down, and started again."""
    with _stopped_detector(built, tmp_path, drift_detector_hang_s=2) as (gw, pid):
        service = gw.gateway.drift
        assert wait_until(lambda: _metric(gw, "batchgate_drift_detector_restarts_total") == 1, timeout=30)
        assert wait_until(lambda: _metric(gw, "batchgate_drift_detector_up") == 1 and service.detector_pid != pid)
        before = _metric(gw, "batchgate_drift_windows_total", model="fraud")
        _windows(gw, 1, seed=8)
        assert _metric(gw, "batchgate_drift_windows_total", model="fraud") >= before + 1


def test_a_command_to_a_stuck_detector_answers_deadline_exceeded(built, tmp_path, monkeypatch):
    """A detector that stops reading (stopped, or busy for long) fills the pipe: the sender thread
    then waits on it, holding it. A reset or rebaseline must still answer within the command's
    time, not wait with it for as long as the detector is stuck."""
    from batchgate.monitoring import drift as drift_module

    monkeypatch.setattr(drift_module, "COMMAND_TIMEOUT_S", 1.0)  # (30 s in service)
    with _stopped_detector(built, tmp_path, {"max_rows_per_sample": 64}, drift_queue_samples=4) as (gw, _):
        rows = traffic(64, 7)
        for _ in range(5000):  # until the pipe is full and the queue behind it too
            _send(gw, rows)
            if _metric(gw, "batchgate_drift_samples_total", model="fraud", outcome="dropped"):
                break
        assert _metric(gw, "batchgate_drift_samples_total", model="fraud", outcome="dropped")
        for path, body in (("drift/fraud/reset", {}), ("drift/fraud/rebaseline", {"rows": 200})):
            with pytest.raises(urllib.error.HTTPError) as e:
                _admin(gw, path, body)
            assert e.value.code == 504
            assert "did not answer" in e.value.read().decode()


def test_a_command_the_detector_reads_after_its_caller_gave_up_is_dropped(built, tmp_path, monkeypatch, capfd):
    """A reset sent to a detector that was not reading answered its caller 504 ('did not
    answer'), but stayed in the pipe and was carried out when the detector read on: the caller
    was told it failed and it happened. The detector now drops a command past its time."""
    from batchgate.monitoring import drift as drift_module

    monkeypatch.setattr(drift_module, "COMMAND_TIMEOUT_S", 1.0)  # (30 s in service)
    with _stopped_detector(built, tmp_path) as (gw, pid):
        with pytest.raises(urllib.error.HTTPError) as e:
            _admin(gw, "drift/fraud/reset", {})
        assert e.value.code == 504 and "drops the command if it reaches it later" in e.value.read().decode()
        os.kill(pid, signal.SIGCONT)
        err = ""

        def said() -> bool:
            nonlocal err
            err += capfd.readouterr().err
            return "a reset command came" in err

        assert wait_until(said, timeout=30), err[-2000:]
        assert _admin(gw, "drift/fraud/reset", {})["model"] == "fraud"  # a timely one is carried out


def test_a_command_whose_grpc_deadline_passed_is_dropped(built, tmp_path):
    """A gRPC caller's deadline (the CLI's --timeout-s, 10 s by default) ends before the server's
    30 s: the caller was told DEADLINE_EXCEEDED while the rebaseline waited in the pipe and was
    carried out when the detector read on. The call's deadline now bounds the command too."""
    import grpc

    from batchgate.admin.v1 import admin_pb2 as apb
    from batchgate.admin.v1 import admin_pb2_grpc

    profiles = tmp_path / "profiles"
    with _stopped_detector(built, tmp_path, drift_profiles_dir=str(profiles)) as (gw, pid):
        for seed in range(WINDOW // ROWS):  # rows to rebaseline from, read before the command
            _send(gw, traffic(ROWS, seed))
        with grpc.insecure_channel(f"127.0.0.1:{gw.gateway.admin_port}") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.Rebaseline(apb.RebaselineRequest(model="fraud"), timeout=1)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server's deadline is the client's plus the call's transit: let the server's side
            # of the call end too (its reply slot goes), else the command may still be in time.
            assert wait_until(lambda: not gw.gateway.drift._replies, timeout=30)
            os.kill(pid, signal.SIGCONT)
            # The pipe keeps order: once a later reset is answered, the rebaseline was read (or, on
            # a slow machine, never sent: the deadline can pass before the send); either way not done.
            assert _admin(gw, "drift/fraud/reset", {})["model"] == "fraud"
            assert not (profiles / "fraud.json").exists()
            status = stub.Rebaseline(apb.RebaselineRequest(model="fraud"), timeout=30)  # a timely one is carried out
            assert status.model == "fraud" and (profiles / "fraud.json").exists()


def test_a_dead_letter_file_that_is_a_directory_stops_the_start(built, tmp_path):
    cfg = _config(tmp_path / "c.yaml", built["profile"], "http://127.0.0.1:9/x")
    (tmp_path / "dead").mkdir()
    with pytest.raises(ConfigError, match="drift_dead_letter_file .*: not a regular file"):
        start_gateway(built["repo"], cfg, drift_dead_letter_file=str(tmp_path / "dead"))
    made = tmp_path / "new" / "dead.jsonl"  # a missing folder is made, as drift_profiles_dir is
    start_gateway(built["repo"], cfg, drift_dead_letter_file=str(made)).stop()
    assert made.parent.is_dir()


def test_a_remote_models_grpc_requests_are_sampled_at_the_sample_rate(built, tmp_path):
    """A remote model under ``batching: passthrough`` forwards gRPC requests as they came; a
    sampled one takes the decoded path. The sample was decided twice (before the fast path, and
    again on the decoded path), so 0.5 sampled a quarter of the requests."""
    upstream = start_gateway(built["repo"])
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tmp_path / "c.yaml"
    monitor = {"model": "fraud", "inputs": ["features"], "reference": built["profile"], "sample_rate": 0.5}
    monitor["window"] = {"samples": 100_000, "max_s": 600}
    remote = {"name": "fraud", "upstreams": [upstream.grpc_url], "batching": "passthrough"}
    cfg.write_text(yaml.safe_dump({"remote_models": [remote], "drift": [monitor]}))
    front = start_gateway(str(empty), str(cfg))
    try:
        assert wait_until(lambda: _metric(front, "batchgate_drift_detector_up") == 1, timeout=60)
        requests = 400  # sampled: 200 expected, 10 the standard deviation; at the rate squared 100
        for k in range(requests):
            _send(front, traffic(2, k))
        assert wait_until(lambda: _metric(front, "batchgate_drift_samples_total", model="fraud", outcome="used") >= 150)
        wait_until(lambda: False, timeout=1.5)  # the detector's counts settle
        assert _metric(front, "batchgate_drift_samples_total", model="fraud", outcome="used") <= 250
    finally:
        front.stop()
        upstream.stop()


def test_a_monitor_of_a_remote_model_whose_upstream_is_down_at_start_does_not_stop_the_start(built, tmp_path, caplog):
    """The gateway starts without a remote model's upstream (it retries); its drift monitor
    used to stop the start ("no model or route of that name is served"), a pod crash-looping
    until Triton came up. It starts, and samples once the model has loaded."""
    port = free_port()  # nothing listens there yet: the upstream comes to it later
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tmp_path / "c.yaml"
    monitor = {"model": "fraud", "inputs": ["features"], "reference": built["profile"], "sample_rate": 1.0}
    remote = {"name": "fraud", "upstreams": [f"127.0.0.1:{port}"], "batching": "passthrough"}
    cfg.write_text(yaml.safe_dump({"remote_models": [remote], "drift": [monitor]}))
    front = start_gateway(str(empty), str(cfg))
    upstream = None
    try:
        assert "the model is not loaded yet" in caplog.text
        upstream = start_gateway(built["repo"], grpc_port=port)

        def answered() -> bool:
            try:
                _send(front, traffic(4, 1))
                return True
            except Exception:
                return False

        assert wait_until(answered, timeout=60)
        assert wait_until(lambda: _metric(front, "batchgate_drift_samples_total", model="fraud", outcome="used") >= 1)
    finally:
        front.stop()
        if upstream is not None:
            upstream.stop()


def test_a_command_too_late_for_its_caller_is_answered_deadline_exceeded(built, tmp_path):
    """The detector drops a command it reads with less than COMMIT_RESERVE_S (0.25 s) of its
    caller's time left; it answered that as a failure, which the gateway turned into
    INVALID_ARGUMENT / 400, a mistake of the caller's that clients do not retry. It is the
    caller's deadline: DEADLINE_EXCEEDED, as when the gateway itself stops waiting."""
    import grpc

    from batchgate.admin.v1 import admin_pb2 as apb
    from batchgate.admin.v1 import admin_pb2_grpc

    cfg = _config(tmp_path / "c.yaml", built["profile"], "http://127.0.0.1:9/x")
    gw = start_gateway(built["repo"], cfg)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gw.gateway.admin_port}") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            assert stub.ResetDrift(apb.ResetDriftRequest(model="fraud"), timeout=30).model == "fraud"
            for request in (stub.ResetDrift, stub.Rebaseline):
                message = apb.ResetDriftRequest if request is stub.ResetDrift else apb.RebaselineRequest
                with pytest.raises(grpc.RpcError) as e:
                    request(message(model="fraud"), timeout=0.2)  # (under the detector's reserve)
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    finally:
        gw.stop()


def test_a_rebaseline_the_detector_cannot_keep_is_a_server_error_not_the_callers(served):
    """A profile that cannot be written (here its temporary file's name is taken by a folder; a
    full disk likewise) answered INVALID_ARGUMENT / 400: a caller's mistake, which clients do not
    retry. It is INTERNAL / 500, and nothing changed."""
    gw = served["gw"]
    _windows(gw, 2, seed=7)
    before = _admin(gw, "drift/fraud")["profile_id"]
    trap = served["tmp"] / "profiles" / "fraud.json.tmp"
    trap.mkdir(parents=True)
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            _admin(gw, "drift/fraud/rebaseline", {"rows": 400})
        assert e.value.code == 500, e.value.read()
        assert "could not carry it out" in e.value.read().decode()
        assert _admin(gw, "drift/fraud")["profile_id"] == before
    finally:
        trap.rmdir()


def test_a_detector_restarted_in_the_drifted_state_announces_the_recovery_and_not_the_drift_again(built, tmp_path):
    """A restarted detector started its debounce afresh: the drift it had announced was not
    recovered from for its receiver (the new detector, never drifted, had nothing to announce when
    the data came back) and a drift still present was announced again as a new detection (a second
    retraining). The state it had carries over, as its counters do."""
    receiver = Receiver()
    cfg = _config(tmp_path / "c.yaml", built["profile"], receiver.url)
    gw = start_gateway(built["repo"], cfg)
    try:
        service = gw.gateway.drift
        _windows(gw, 3, seed=21, shift=1.0)
        detected = receiver.wait_for(lambda e: e["type"] == "io.batchgate.drift.detected")
        assert len(detected) == 1 and _metric(gw, "batchgate_drift_active", model="fraud") == 1
        pid = wait_until(lambda: service.detector_pid)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _metric(gw, "batchgate_drift_detector_restarts_total") == 1, timeout=20)
        assert wait_until(lambda: _metric(gw, "batchgate_drift_detector_up") == 1 and service.detector_pid != pid)

        _windows(gw, 3, seed=22, shift=1.0)  # the same drift, still present: not a new detection
        assert _metric(gw, "batchgate_drift_active", model="fraud") == 1
        assert _metric(gw, "batchgate_drift_detections_total", model="fraud") == 1
        assert _metric(gw, "batchgate_drift_detected", model="fraud", feature="f2") == 1
        assert {e["id"] for e in receiver.events} == {detected[0]["id"]}  # (at least once: perhaps twice)

        _windows(gw, 3, seed=23)  # back to normal: the receiver hears of it
        recovered = receiver.wait_for(lambda e: e["type"] == "io.batchgate.drift.recovered")
        assert len(recovered) == 1 and recovered[0]["data"]["detections"] == 1
        assert _metric(gw, "batchgate_drift_active", model="fraud") == 0
    finally:
        gw.stop()
        receiver.close()


def test_an_event_in_delivery_when_the_detector_dies_is_delivered_by_the_next_one(built, tmp_path):
    """Events are delivered from the detector process: one still queued or being retried there
    when it died (killed as hung, or out of memory) was lost, and with the state now carried over
    (no new detection) its receiver never heard of the drift. The gateway keeps each event until
    the detector says it is settled, and hands what is not to the next detector."""
    receiver = Receiver()
    receiver.up = False
    cfg = _config(
        tmp_path / "c.yaml",
        built["profile"],
        receiver.url,
        webhook={"url": receiver.url, "format": "cloudevents", "timeout_s": 2, "retries": 8},
    )
    gw = start_gateway(built["repo"], cfg)
    try:
        service = gw.gateway.drift
        _windows(gw, 3, seed=31, shift=1.0)
        assert _metric(gw, "batchgate_drift_active", model="fraud") == 1
        assert wait_until(lambda: receiver.attempts >= 1)  # being retried now (for a minute or more)
        pid = wait_until(lambda: service.detector_pid)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _metric(gw, "batchgate_drift_detector_restarts_total") == 1, timeout=20)
        receiver.up = True
        detected = receiver.wait_for(lambda e: e["type"] == "io.batchgate.drift.detected", timeout=60)
        assert len(detected) == 1 and detected[0]["subject"] == "fraud"
    finally:
        gw.stop()
        receiver.close()
