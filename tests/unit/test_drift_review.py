"""Regressions from the review of online drift detection (pure code and in-process; no server):
float32 traffic against profiles of rounded values, categories keyed alike in a profile and live,
ADWIN on a drift present from the start, the detections a restarted detector shows, ``drift
profile``'s options and the model's input types, recovery announced on reset and rebaseline, and
webhook delivery (an event in delivery at shutdown, a slow receiver)."""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import pytest

from batchgate.core.drift import (
    MAX_CATEGORY_BYTES,
    build_profile,
    build_tensor,
    category_key,
    profile_from_json,
)
from batchgate.core.drift_monitors import parse_monitors
from batchgate.core.drift_window import Scorer
from batchgate.monitoring.drift_events import DeadLetter, EventSender, make_event
from drift_support import wait_until

BASE = {"model": "m", "inputs": ["x"], "reference": "p.json"}


def _rounded(rng: np.random.Generator, n: int) -> np.ndarray:
    """Values as a CSV holds them: rounded to one and two decimals, and one continuous column."""
    return np.stack([np.round(rng.normal(0.5, 0.3, n), 1), np.round(rng.gamma(2, 1, n), 2), rng.normal(0, 1, n)], 1)


# ---------------------------------------------------------------- 1. float32 traffic, float64 profile
def test_float32_traffic_is_not_drift_against_a_profile_of_the_same_values_in_float64():
    rng = np.random.default_rng(3)
    profile = build_profile("m", {"x": build_tensor("x", _rounded(rng, 20_000))})  # a CSV: float64
    spec = parse_monitors([{**BASE, "window": {"samples": 500}, "tests": ["psi", "ks"]}])[0]
    scorer = Scorer(spec, profile)
    drifted = 0
    for k in range(10):
        x = _rounded(np.random.default_rng(100 + k), 500)
        r64 = scorer.score({("input", "x"): x})
        r32 = scorer.score({("input", "x"): x.astype(np.float32)})  # 0.1f is just above 0.1: same bins
        drifted += r32.drifted_window
        for name, fs in r64.features.items():
            assert r32.features[name].scores["psi"] == pytest.approx(fs.scores["psi"], abs=1e-3), name
            assert r32.features[name].scores["ks"] == pytest.approx(fs.scores["ks"], abs=1e-3), name
    assert drifted == 0


def test_a_float32_profile_has_float32_edges_and_narrowed_edges_merge_their_bins():
    from batchgate.core.drift_window import narrow

    rng = np.random.default_rng(4)
    feature = build_tensor("x", _rounded(rng, 5000).astype(np.float32))[0]
    assert all(np.float64(np.float32(e)) == e for e in (*feature.edges, *feature.cdf_points))
    edges = np.array([0.1, 0.1 + 1e-12, 0.2])  # the first two are one float32: bins (-inf, e0] and (e0, e1] merge
    freqs = np.array([0.1, 0.2, 0.3, 0.4])
    points = np.array([0.1, 0.1 + 1e-12, 0.2])
    values = np.array([0.3, 0.5, 0.6])
    e, f, p, v = narrow(edges, freqs, points, values, np.dtype(np.float32))
    assert e.tolist() == [float(np.float32(0.1)), float(np.float32(0.2))]
    assert f.tolist() == pytest.approx([0.3, 0.3, 0.4]) and v.tolist() == [0.5, 0.6] and p.shape == (2,)


# ---------------------------------------------------------------- 2. categories keyed alike
def test_text_and_bytes_are_one_category_and_long_text_is_cut_on_utf8_bytes():
    assert category_key("True") == category_key(b"True") == category_key(True) == "1"
    assert category_key("01") == category_key(b"01") == "01" != category_key(1)
    assert category_key(np.float32(0.1)) == category_key(0.1) == "0.1" and category_key(2.0) == "2"
    text = "a" + "é" * 300  # 601 bytes: cut at 256 would split an é
    key = category_key(text)
    assert key == category_key(text.encode()) == category_key(text.encode()[:MAX_CATEGORY_BYTES])
    assert len(key.encode()) == MAX_CATEGORY_BYTES - 1 and key == "a" + "é" * 127
    old = {"format": "batchgate.drift.profile/1", "model": "m", "inputs": {"s": [
        {"name": "s", "kind": "categorical", "count": 10, "missing_rate": 0.0,
         "categories": {"True": 0.5, "1": 0.25, "red": 0.25}, "other": 0.0}]}}  # fmt: skip
    assert profile_from_json(old).inputs["s"][0].categories == {"1": 0.75, "red": 0.25}


def test_live_bytes_match_a_profile_of_csv_text():
    rng = np.random.default_rng(5)
    words = ["red", "green", "True", "False", "01", "02"]
    text = rng.choice(words, (5000, 1)).astype(object)  # a CSV's text cells
    profile = build_profile("m", {"s": build_tensor("s", text, ["color"])})
    assert set(profile.inputs["s"][0].categories) == {"red", "green", "1", "0", "01", "02"}
    scorer = Scorer(parse_monitors([{**BASE, "inputs": ["s"]}])[0], profile)
    live = np.array([[w.encode()] for w in rng.choice(words, 1000)], dtype=object)  # a BYTES tensor's values
    r = scorer.score({("input", "s"): live})
    assert r.features["color"].quality["unseen"] == 0.0 and not r.drifted


# ---------------------------------------------------------------- 3. ADWIN on a drift present from the start
def test_adwin_flags_a_drift_present_from_the_start_and_not_a_stationary_stream():
    rng = np.random.default_rng(9)
    profile = build_profile("m", {"x": build_tensor("x", rng.standard_normal((20_000, 3)))})
    spec = parse_monitors([{**BASE, "window": {"samples": 2000}, "tests": ["adwin"]}])[0]
    shifted, clean = Scorer(spec, profile), Scorer(spec, profile)
    for _ in range(3):
        x = rng.standard_normal((2000, 3))
        assert not clean.score({("input", "x"): x}).drifted_window
        x[:, 0] += 0.5
        r = shifted.score({("input", "x"): x})
        assert r.drifted == ["x[0]"] and "adwin" in r.features["x[0]"].decided


# ---------------------------------------------------------------- 10. detections after a detector restart
def test_a_restarted_detector_goes_on_from_the_state_and_detections_before_it():
    from batchgate.monitoring.drift import DriftService
    from batchgate.monitoring.drift_detector import Detector, Plan, carried_state
    from batchgate.monitoring.metrics import Metrics
    from batchgate.settings_sections import DriftSettings

    spec = parse_monitors([BASE])[0]
    rng = np.random.default_rng(3)
    profile = build_profile("m", {"x": build_tensor("x", rng.standard_normal((2000, 2)))})
    state = carried_state(1, {"x[0]": 1, "x[1]": 0}, 3, {"last_window": {"index": 7}})  # as the gateway last heard
    w = Detector(Plan([(spec, profile, None)], "/t", states={"m": state}), [].append).watches["m"]
    assert w.flag.on and w.detections == 3 and w.index == 7
    assert w.features["x[0]"].on and not w.features["x[1]"].on
    metrics = Metrics()  # the gateway takes the restarted detector's count as it is (no double count)
    service = DriftService((spec,), DriftSettings(), metrics, lambda *a: None)  # type: ignore[arg-type, return-value]
    window = {"result": {"features": {}}, "detected": [], "active": True, "detections": 3, "span_s": 1.0}
    service._window("m", {**window, "lag_s": 0.0, "profile_id": "p", "index": 8, "rows": 100})
    assert metrics.drift("m").detections == 3
    assert service.status("m")["detections"] == 3


# ---------------------------------------------------------------- 9, 7, 8. drift profile
def _args(*argv: str) -> argparse.Namespace:
    from batchgate.drift_profile import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["drift", "profile", "--model", "m", *argv])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bins", "0"], "--bins must be from 2 to 1000, not 0"),
        (["--bins", "1"], "--bins must be from 2 to 1000, not 1"),
        (["--max-categories", "0"], "--max-categories must be from 1 to 100000, not 0"),
        (["--categorical", "nosuch"], "--categorical/--numeric name no feature: nosuch"),
        (["--numeric", "a", "--categorical", "a"], "--categorical and --numeric both name a"),
    ],
)
def test_drift_profile_refuses_options_that_cannot_make_a_profile(tmp_path, capsys, extra, message):
    from batchgate.drift_profile import main

    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4\n")
    args = _args("--input", "x", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "p.json"), *extra)
    assert main(args) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "p.json").exists()


def test_drift_profile_refuses_an_out_file_in_a_missing_directory(tmp_path, capsys):
    from batchgate.drift_profile import main

    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4\n")
    args = _args("--input", "x", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "no" / "p.json"))
    assert main(args) == 2
    assert f"the directory {tmp_path / 'no'} does not exist" in capsys.readouterr().err


def test_a_categorical_csv_column_keeps_its_text(tmp_path):
    from batchgate.drift_profile import make_profile

    (tmp_path / "codes.csv").write_text("code\n" + "01\n02\n10\n01\n" * 10)
    data = make_profile(_args("--input", "s", "--data", str(tmp_path / "codes.csv"), "--out", "p.json",
                              "--categorical", "code"))  # fmt: skip
    assert set(data["inputs"]["s"][0]["categories"]) == {"01", "02", "10"}


def _model(root) -> str:
    """A repository with model 'm': x FP32 [-1, 2], c INT64 [-1, 1] and s STRING [-1, 1], each
    answered as it came."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as h

    graph = h.make_graph(
        [h.make_node("Identity", [i], [f"{i}_out"]) for i in ("x", "c", "s")],
        "m",
        [
            h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
            h.make_tensor_value_info("c", TensorProto.INT64, ["N", 1]),
            h.make_tensor_value_info("s", TensorProto.STRING, ["N", 1]),
        ],
        [
            h.make_tensor_value_info("x_out", TensorProto.FLOAT, ["N", 2]),
            h.make_tensor_value_info("c_out", TensorProto.INT64, ["N", 1]),
            h.make_tensor_value_info("s_out", TensorProto.STRING, ["N", 1]),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "repo" / "m" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "repo" / "m" / "1" / "model.onnx"))
    return str(root / "repo")


def test_the_models_input_types_decide_kinds_text_and_precision(tmp_path):
    from batchgate.drift_profile import make_profile

    repo = _model(tmp_path)
    rng = np.random.default_rng(6)
    with open(tmp_path / "t.csv", "w") as f:
        f.write("x.a,x.b,c.code,s.color\n")
        for i in range(400):
            f.write(
                f"{rng.normal():.1f},{rng.normal():.2f},{['01', '02', '3'][i % 3]},{['True', 'red', '01'][i % 3]}\n"
            )
    data = make_profile(_args(
        "--input", "x", "--input", "c", "--input", "s", "--data", str(tmp_path / "t.csv"), "--out", "p.json",
        "--model-repository", repo,
    ))  # fmt: skip
    x, c, s = (data["inputs"][t] for t in ("x", "c", "s"))
    assert [f["kind"] for f in x] == ["numeric", "numeric"]
    assert all(np.float64(np.float32(e)) == e for e in x[0]["bins"]["edges"])  # at the served precision
    assert c[0]["kind"] == "categorical" and set(c[0]["categories"]) == {"1", "2", "3"}  # INT64: numbers
    assert s[0]["kind"] == "categorical" and set(s[0]["categories"]) == {"1", "red", "01"}  # BYTES: text
    assert set(data["outputs"]) == {"x_out", "c_out", "s_out"}
    assert set(data["outputs"]["s_out"][0]["categories"]) == {"1", "red", "01"}


# ---------------------------------------------------------------- 5. recovery on reset and rebaseline
def _drifted_detector():
    from batchgate.monitoring.drift_detector import Detector, Plan

    rng = np.random.default_rng(12)
    spec = parse_monitors([{**BASE, "window": {"samples": 200}, "debounce_windows": 1, "tests": ["ks"]}])[0]
    profile = build_profile("m", {"x": build_tensor("x", rng.standard_normal((5000, 3)))})
    sent: list = []
    detector = Detector(Plan([(spec, profile, None)], "/t", rebaseline_max_rows=1000), sent.append)
    detector.add("m", 0.0, 0.0, {("input", "x"): rng.standard_normal((200, 3)) + 2.0}, 1, now=0.0)
    assert detector.watches["m"].flag.on
    return detector, sent


@pytest.mark.parametrize("command", ["reset", "rebaseline"])
def test_leaving_the_drifted_state_by_a_command_is_announced(command):
    detector, sent = _drifted_detector()
    try:
        detector.command(command, {"model": "m", "rows": 200})
        events = [m[2] for m in sent if m[0] == "event"]
        assert [e["type"] for e in events] == ["io.batchgate.drift.detected", "io.batchgate.drift.recovered"]
        assert events[1]["data"]["state"] == "recovered" and events[1]["data"]["reason"] == command
        detector.command("reset", {"model": "m"})  # not drifted now: nothing to announce
        assert len([m for m in sent if m[0] == "event"]) == 2
    finally:
        detector.sender.close()


# ---------------------------------------------------------------- 6, 4. delivery
class _Poster:
    """A receiver per URL; those in ``slow`` hold each delivery until released."""

    def __init__(self, slow: set[str]):
        self.slow = slow
        self.release = threading.Event()
        self.entered = threading.Event()
        self.delivered: list[str] = []

    def __call__(self, url: str, event: dict, fmt: str, timeout_s: float) -> None:
        if url in self.slow:
            self.entered.set()
            if not self.release.wait(10):
                raise OSError("timed out")
        self.delivered.append(event["id"])


def _hook(url: str) -> dict:
    return {"url": url, "format": "cloudevents", "timeout_s": 1, "retries": 0}


def test_an_event_in_delivery_at_shutdown_goes_to_the_dead_letter(tmp_path):
    poster = _Poster({"http://slow/"})
    counts: dict[str, int] = {}
    dead = DeadLetter(str(tmp_path / "dead.jsonl"), 100)
    sender = EventSender(dead, 30.0, lambda o: counts.__setitem__(o, counts.get(o, 0) + 1), poster)
    event = make_event("io.batchgate.drift.detected", "/t", "m", {})
    sender.send(event, _hook("http://slow/"))
    assert poster.entered.wait(5)
    sender.close(wait_s=0.2)
    assert [e["event"]["id"] for e in DeadLetter(str(tmp_path / "dead.jsonl"), 100).events] == [event["id"]]
    assert counts.get("dead_lettered") == 1
    poster.release.set()  # the delivery ends after all: it is not dead-lettered twice
    time.sleep(0.2)
    assert len(dead) == 1 and counts.get("dead_lettered") == 1


def test_a_slow_receiver_does_not_hold_back_another_models_events():
    poster = _Poster({"http://slow/"})
    sender = EventSender(DeadLetter("", 100), 30.0, lambda o: None, poster)
    try:
        slow = make_event("io.batchgate.drift.detected", "/t", "a", {})
        fast = make_event("io.batchgate.drift.detected", "/t", "b", {})
        sender.send(slow, _hook("http://slow/"))
        assert poster.entered.wait(5)
        sender.send(fast, _hook("http://fast/"))
        assert wait_until(lambda: fast["id"] in poster.delivered, timeout=3)
        assert slow["id"] not in poster.delivered
        poster.release.set()
        assert wait_until(lambda: slow["id"] in poster.delivered, timeout=3)
    finally:
        poster.release.set()
        sender.close()


def test_the_dead_letter_from_before_is_retried_in_each_models_order():
    poster = _Poster(set())
    dead = DeadLetter("", 100)
    a1 = make_event("io.batchgate.drift.detected", "/t", "a", {})
    a2 = make_event("io.batchgate.drift.recovered", "/t", "a", {})
    dead.add(a1, _hook("http://old/"))  # the model's receiver changed between runs
    dead.add(a2, _hook("http://new/"))
    sender = EventSender(dead, 0.1, lambda o: None, poster)
    try:
        assert wait_until(lambda: len(dead) == 0, timeout=5)
        assert poster.delivered == [a1["id"], a2["id"]]
    finally:
        sender.close()


def test_profiles_json_round_trip_keeps_float32_edges():
    feature = build_tensor("x", np.array([[0.1], [0.2], [0.3]] * 50, dtype=np.float32))[0]
    again = profile_from_json(json.loads(json.dumps(build_profile("m", {"x": (feature,)}).to_json())))
    assert again.inputs["x"][0].edges == feature.edges


def test_a_dead_letter_with_bytes_that_are_not_utf8_keeps_its_good_lines(tmp_path):
    """The detector reads it at each start: a spoilt byte used to stop it there (restarted without end)."""
    good = make_event("io.batchgate.drift.detected", "/t", "m", {})
    path = tmp_path / "dead.jsonl"
    path.write_bytes(
        b'{"event": \xff\xfe}\n' + json.dumps({"event": good, "webhook": _hook("http://r/")}).encode() + b"\n"
    )
    assert [e["event"]["id"] for e in DeadLetter(str(path), 100).events] == [good["id"]]


def test_a_dead_letter_that_cannot_be_read_or_written_keeps_its_events_in_memory(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    dead = DeadLetter(str(folder), 100)  # a directory: neither read nor replaced
    assert len(dead) == 0
    event = make_event("io.batchgate.drift.detected", "/t", "m", {})
    dead.add(event, _hook("http://r/"))
    assert dead.holds("m") and len(dead) == 1
    dead.remove(dead.events[0])
    assert len(dead) == 0


@pytest.mark.parametrize("stage", ["head", "connect-only"])
def test_a_receiver_that_trickles_its_answer_fails_the_attempt_within_its_timeout(stage):
    """The socket's timeout bounds each read only: a receiver that sent its answer's head a byte
    every 0.2 s (or read the request and never answered, but kept the connection alive by the same
    trickle) held the delivery, and its lane, for as long as it kept going. The attempt now ends by
    the webhook's timeout_s, as a failure."""
    import http.client
    import socket

    from batchgate.monitoring.drift_events import post

    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            line = b"HTTP/1.1 200 OK\r\nX-Pad: " if stage == "head" else b""
            for i in range(300):  # a minute of it, unless the client goes
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(line[i : i + 1] if i < len(line) else b"a")
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    outcome: list[BaseException | None] = []

    def attempt():
        try:
            post(url, make_event("io.batchgate.drift.detected", "/t", "m", {}), "cloudevents", 0.5)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - the failure is what is looked at
            outcome.append(e)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(15)
    stop.set()
    listener.close()
    assert not worker.is_alive(), "the delivery attempt was still held by the trickling receiver"
    assert outcome and isinstance(outcome[0], OSError | http.client.HTTPException), outcome


def test_a_webhook_host_whose_name_does_not_resolve_in_time_fails_the_attempt_within_its_timeout(monkeypatch):
    """getaddrinfo takes no timeout: a resolver that did not answer held the delivery, and its
    lane, for as long as the system's resolver kept trying (here it answers after a minute, as
    a resolver with its retries can). The look-up is now bounded by the attempt's timeout_s.
    Attempts for a name still being looked up share that look-up: each retry of a hung name took
    one of eight shared threads, and once eight hung every other receiver's look-up timed out
    too (localhost, 127.0.0.1). An address is not looked up, and the look-ups' threads are
    daemons (a hung one held the process's exit). (The resolver is the system's, stood in for by
    a wrapper of socket.getaddrinfo that holds one name back; every other name is looked up for
    real.)"""
    import http.server
    import socket

    from batchgate.monitoring.drift_events import post

    real, held = socket.getaddrinfo, threading.Event()

    def getaddrinfo(host, *args, **kwargs):
        if host == "hook.unanswered.test":
            held.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    outcome: list[BaseException | None] = []

    def attempt(url: str) -> None:
        try:
            post(url, make_event("io.batchgate.drift.detected", "/t", "m", {}), "cloudevents", 0.5)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - the failure is what is looked at
            outcome.append(e)

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        workers = [
            threading.Thread(target=attempt, args=("http://hook.unanswered.test:9/hook",), daemon=True)
            for _ in range(12)  # (more than the eight lanes, retries of the one hung name)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(15)
        assert len(outcome) == 12, outcome
        assert all("looking up the webhook's host 'hook.unanswered.test'" in str(e) for e in outcome), outcome
        port = server.server_address[1]
        for url in (f"http://localhost:{port}/hook", f"http://127.0.0.1:{port}/hook"):  # other receivers: delivered
            outcome.clear()
            attempt(url)
            assert outcome == [None], (url, outcome)
        hung = [t for t in threading.enumerate() if t.name == "drift-dns"]
        assert len(hung) == 1 and hung[0].daemon
    finally:
        held.set()
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- a window that takes long to score
def test_a_detector_scoring_a_large_window_says_it_is_alive_and_only_then():
    """The detector reports between windows; one that takes longer to score than
    drift_detector_hang_s (a window of up to 10^6 rows is allowed) was killed by the gateway's
    watchdog again and again, no window ever scored (found by a re-check: 60,000 rows of 272
    features killed at hang_s 3). While a window is scored, a pulse says it is alive; before and
    after, silence (a stuck detector is still told by its silence)."""
    from batchgate.monitoring.drift_detector import Detector, Plan, _pulse

    rng = np.random.default_rng(3)
    rows, width = 200_000, 64
    spec = parse_monitors([{**BASE, "window": {"samples": rows, "max_s": 3600}, "tests": ["ks", "psi"]}])[0]
    profile = build_profile("m", {"x": build_tensor("x", rng.standard_normal((5000, width)))})
    sent: list = []
    detector = Detector(Plan([(spec, profile, None)], "/t"), sent.append)
    try:
        threading.Thread(target=_pulse, args=(detector, sent.append, 0.005), daemon=True).start()
        time.sleep(0.1)
        assert sent.count(("alive",)) == 0  # nothing scored: nothing said
        started = time.monotonic()
        detector.add("m", 0.0, 0.0, {("input", "x"): rng.standard_normal((rows, width))}, 1, now=0.0)
        took = time.monotonic() - started
        windows = [m for m in sent if m[0] == "window"]
        assert len(windows) == 1, "the window was not scored"
        alive = sent.count(("alive",))
        assert alive >= 1, f"scoring took {took:.3f} s and said nothing"
        assert all(m == ("alive",) for m in sent[: sent.index(windows[0])] if m[0] != "event")
        time.sleep(0.1)
        assert sent.count(("alive",)) == alive  # scored: silent again
    finally:
        detector.sender.close()
