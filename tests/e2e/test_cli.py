"""The ``batchgate`` command as a user runs it: a real subprocess, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.config import SETTINGS
from batchgate.demo import _save, classifier_model, slow_model
from processes import BATCHGATE, Proc, serve_args


@pytest.fixture
def proc():
    started = []

    def start(args, env=None, preexec=None):
        p = Proc(args, env, preexec)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    repo = str(tmp_path_factory.mktemp("repo"))
    _save(classifier_model(), repo, "clf")
    return repo


def test_serve_on_free_ports_answers_both_protocols(proc, small_repo):
    p = proc(serve_args(small_repo)).wait_ready()
    x = np.ones((1, 4), np.float32)
    for mod, url in ((grpcclient, p.grpc), (httpclient, p.http)):
        c = mod.InferenceServerClient(url)
        inp = mod.InferInput("features", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        assert c.infer("clf", [inp]).as_numpy("probabilities").shape == (1, 3)
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics").read().decode()
    assert 'batchgate_requests_total{model="clf",protocol="grpc",status="OK",version="1"} 1.0' in text
    # the access log at its default: errors always, one JSON line each, on stdout
    inp = grpcclient.InferInput("features", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(p.grpc).infer("no_such_model", [inp], request_id="lost-1")
    end = time.monotonic() + 10
    while '"batchgate.request.id":"lost-1"' not in p.output() and time.monotonic() < end:
        time.sleep(0.05)
    line = next(ln for ln in p.output().splitlines() if '"batchgate.request.id":"lost-1"' in ln)
    assert json.loads(line)["error.type"] == "NOT_FOUND"


def test_sigterm_drains_in_flight_work_then_exits_zero(proc, tmp_path):
    repo = str(tmp_path)
    _save(slow_model(layers=192), repo, "slow", config="max_batch_size: 64\n")
    p = proc(serve_args(repo, "--exit-timeout-secs", "60")).wait_ready()
    x = np.ones((64, 1024), np.float32)

    def call(_):
        c = grpcclient.InferenceServerClient(p.grpc)
        inp = grpcclient.InferInput("input", [64, 1024], "FP32")
        inp.set_data_from_numpy(x)
        return c.infer("slow", [inp]).as_numpy("output").shape

    http = httpclient.InferenceServerClient(p.http)
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(call, i) for i in range(32)]
        deadline = time.monotonic() + 20
        # Wait until the server has accepted every request, then ask it to stop.
        metrics = f"http://127.0.0.1:{p.ports[2]}/metrics"
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(metrics).read().decode()
            inflight = _sample(text, 'batchgate_inflight_requests{model="slow",version="1"}')
            done = _sample(text, 'batchgate_requests_total{model="slow",protocol="grpc",status="OK",version="1"}')
            if inflight + done >= 32:
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the server never accepted all 32 requests")
        assert inflight >= 4, "too little work left in flight to test draining"
        p.p.send_signal(signal.SIGTERM)
        # Readiness turns false at once, and new work is refused, while accepted work still runs.
        end = time.monotonic() + 5
        while http.is_server_ready() and time.monotonic() < end:
            time.sleep(0.005)
        assert not http.is_server_ready()
        inp = httpclient.InferInput("input", [1, 1024], "FP32")
        inp.set_data_from_numpy(np.ones((1, 1024), np.float32))
        with pytest.raises(InferenceServerException) as refused:
            http.infer("slow", [inp])
        assert refused.value.status() == "503"
        results = [f.result(60) for f in futures]
    assert results == [(64, 1024)] * 32
    assert p.p.wait(30) == 0, p.output()
    assert "draining" in p.output()


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--http-port", "70000"], {}, "http_port must be between 0 and 65535"),
        (
            ["--model-control-mode", "explicit", "--repository-poll-secs", "0"],
            {},
            "repository_poll_secs must be greater than 0",
        ),
        ([], {"BATCHGATE_MAX_QUEUE_SIZE": "lots"}, "BATCHGATE_MAX_QUEUE_SIZE: 'max_queue_size' must be an integer"),
        ([], {"BATCHGATE_LOG_FORMAT": "xml"}, "log_format must be one of plain, json"),
    ],
)
def test_bad_settings_exit_nonzero_with_a_clear_message(small_repo, args, env, message):
    r = subprocess.run(
        BATCHGATE + serve_args(small_repo)[:3] + args,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert r.returncode == 2
    assert message in r.stderr


def test_bad_config_file_and_missing_repository(tmp_path):
    cfg = tmp_path / "bg.yaml"
    cfg.write_text("http_port: 8000\nbogus_setting: 1\n")
    r = subprocess.run(
        BATCHGATE + ["serve", "--config", str(cfg), "--model-repository", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "unknown setting 'bogus_setting'" in r.stderr
    r = subprocess.run(
        BATCHGATE + ["serve", "--model-repository", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "is not a directory" in r.stderr


def test_a_relative_repository_that_is_not_there_says_where_it_was_looked_for(tmp_path):
    """`model_repository: models` in a config file beside its `models/`, started from another
    directory, was told only "'models' is not a directory" (it is one, next to the file)."""
    (tmp_path / "etc" / "models").mkdir(parents=True)
    cfg = tmp_path / "etc" / "bg.yaml"
    cfg.write_text("model_repository: models\n")
    (tmp_path / "elsewhere").mkdir()
    r = subprocess.run(
        BATCHGATE + ["serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path / "elsewhere",
    )
    assert r.returncode == 2
    assert (
        f"config file {cfg}: model_repository 'models' is not a directory (a relative path is taken from the "
        f"current directory: {tmp_path / 'elsewhere' / 'models'})"
    ) in r.stderr


def test_config_file_and_env_and_json_logs_with_request_id(proc, small_repo, tmp_path):
    cfg = tmp_path / "bg.yaml"
    cfg.write_text(
        f"model_repository: {small_repo}\nhost: 127.0.0.1\nhttp_port: 0\ngrpc_port: 0\n"
        "metrics_port: 0\nadmin_port: -1\nlog_format: plain\n"
    )
    p = proc(["serve", "--config", str(cfg)], env={"BATCHGATE_LOG_FORMAT": "json"}).wait_ready()
    c = httpclient.InferenceServerClient(p.http)
    inp = httpclient.InferInput("features", [1, 5], "FP32")
    inp.set_data_from_numpy(np.ones((1, 5), np.float32))
    with pytest.raises(InferenceServerException):
        c.infer("clf", [inp], request_id="req-42")
    gc = grpcclient.InferenceServerClient(p.grpc)
    ginp = grpcclient.InferInput("features", [1, 5], "FP32")
    ginp.set_data_from_numpy(np.ones((1, 5), np.float32))
    with pytest.raises(InferenceServerException):
        gc.infer("clf", [ginp], headers={"x-request-id": "trace-7"})
    time.sleep(0.3)
    records = [json.loads(line) for line in p.output().splitlines() if line.startswith("{")]
    assert records, p.output()
    by_id = {r.get("request_id"): r for r in records}
    assert "req-42" in by_id and "INVALID_ARGUMENT" in by_id["req-42"]["msg"]
    assert "trace-7" in by_id


def _run(args, env=None, **kw):
    return subprocess.run(
        BATCHGATE + args, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, **kw
    )


def _yaml(value) -> str:
    """A declared default as the CLI should print it (YAML's spelling)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    if value == ():
        return "[]"
    return str(value)


def _rows(text: str) -> dict[str, tuple[str, list[str]]]:
    """setting -> (its section title, its cells) from a settings table: cells are separated by two
    or more spaces; a line not indented is a section title."""
    rows, section = {}, ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.split("]")[0][1:]
        elif line.startswith("  ") and line.strip():
            cells = re.split(r" {2,}", line.strip())
            name = cells[1] if cells[0] == "*" else cells[0]
            rows[name] = (section, cells)
    return rows


def test_settings_table_has_every_setting_with_flag_env_default_and_meaning():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run(BATCHGATE + ["settings"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    rows = _rows(r.stdout)
    assert rows.pop("SETTING")[1] == ["SETTING", "FLAG", "ENVIRONMENT VARIABLE", "DEFAULT", "MEANING"]
    assert set(rows) == set(SETTINGS)
    for spec in SETTINGS.values():
        section, cells = rows[spec.name]
        assert section == (spec.section or "remote_models"), spec.name
        assert cells[:4] == [spec.name, spec.flag, spec.env, _yaml(spec.default)], cells
        assert cells[4].startswith(spec.help), cells  # piped: one line per setting, not wrapped
    assert "alias exit_timeout_secs (--exit-timeout-secs, BATCHGATE_EXIT_TIMEOUT_SECS)" in rows["exit_timeout_s"][1][4]
    assert rows["log_format"][1][4].endswith("one of plain, json")
    # columns aligned: every row's flag starts where the header's FLAG does
    lines = r.stdout.splitlines()
    at = lines[0].index("FLAG")
    assert all(line[at : at + 2] == "--" for line in lines if line.startswith("  ") and line.strip()[0] != "S")

    # on a terminal of 120 columns, the meanings wrap within their column
    r = _run(["settings"], env={"COLUMNS": "120"})
    lines = r.stdout.split("\n\nIn a --config file")[0].splitlines()
    column = lines[0].index("MEANING")
    assert max(len(line) for line in lines) <= max(120, column + 41)
    more = [line for line in lines if line.startswith(" " * column) and line.strip()]
    assert more and all(line[column] != " " for line in more)


def test_settings_with_config_shows_the_values_in_effect_and_where_they_came_from(tmp_path):
    cfg = tmp_path / "bg.yaml"
    cfg.write_text(
        "server:\n  http_port: 9000\n  grpc_port: 7000\n  metrics_port: 8002\n"
        "repository:\n  model_repository: /not/on/this/machine\n  load_model: [mlp]\n"
    )
    r = _run(["settings", "--config", str(cfg)], env={"BATCHGATE_GRPC_PORT": "9001", "BATCHGATE_LOG_LEVEL": "debug"})
    assert r.returncode == 0, r.stderr
    rows = {name: cells for name, (_, cells) in _rows(r.stdout).items()}
    assert rows["http_port"] == ["*", "http_port", "9000", "file", "8000"]
    assert rows["grpc_port"] == ["*", "grpc_port", "9001", "env", "8001"]  # the environment wins over the file
    assert rows["log_level"] == ["*", "log_level", "debug", "env", "info"]
    assert rows["metrics_port"] == ["metrics_port", "8002", "file", "8002"]  # from the file, equal to the default
    assert rows["host"] == ["host", "0.0.0.0", "default", "0.0.0.0"]
    assert rows["model_repository"] == ["*", "model_repository", "/not/on/this/machine", "file", '""']
    assert rows["load_model"] == ["*", "load_model", "[mlp]", "file", "[]"]
    assert rows["model_control_mode"] == ["*", "model_control_mode", "explicit", "implied", "none"]
    assert set(rows) >= set(SETTINGS)


@pytest.mark.parametrize(
    "text, env, message",
    [
        ("server:\n  http_port: 99999\n", {}, "http_port must be between 0 and 65535"),
        ("server:\n  bogus: 1\n", {}, "unknown setting 'bogus' in section 'server'"),
        ("server: [8000\n", {}, "is not valid YAML"),
        ("server:\n  http_port: 8000\n", {"BATCHGATE_LOG_FORMAT": "xml"}, "log_format must be one of plain, json"),
        (None, {}, "cannot read config file"),
    ],
)
def test_settings_with_a_bad_config_exits_2_naming_the_problem(tmp_path, text, env, message):
    cfg = tmp_path / "bg.yaml"
    if text is not None:
        cfg.write_text(text)
    r = _run(["settings", "--config", str(cfg)], env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("batchgate settings: configuration error: ") and message in r.stderr, r.stderr
    if text is not None and not env:
        assert str(cfg) in r.stderr


def test_serve_help_gives_every_flag_its_default_and_environment_variable():
    r = _run(["serve", "--help"], env={"COLUMNS": "1000"})  # one line per flag's help
    assert r.returncode == 0, r.stderr
    entries: dict[str, str] = {}
    flag = ""
    for line in r.stdout.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")  # (3.13 writes "--a, --b X", 3.11 "--a X, --b X")
            entries[flag] = line
        elif line.startswith("    ") and flag:
            entries[flag] += " " + line.strip()
        else:
            flag = ""
    for spec in SETTINGS.values():
        help_text = entries[spec.flag]
        assert f"(default: {_yaml(spec.default)}; env {spec.env}" in help_text, help_text
        for alias in spec.aliases:
            assert f"--{alias.replace('_', '-')} / BATCHGATE_{alias.upper()}" in help_text


def test_completion_scripts_name_the_subcommands_and_bash_completes(tmp_path):
    subcommands = ("serve", "settings", "demo-repo", "convert", "loadtest", "keys", "routes", "drift", "completion")
    r = _run(["completion", "bash"])
    assert r.returncode == 0, r.stderr
    assert all(name in r.stdout for name in subcommands)
    script = tmp_path / "batchgate.bash"
    script.write_text(r.stdout)
    probe = (
        f"source {script}\n"
        "complete -p batchgate\n"
        'fn=$(complete -p batchgate | sed -E "s/.* -F ([^ ]+) .*/\\1/")\n'
        'ask() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=(); "$fn"; echo "${COMPREPLY[*]}"; }\n'
        "ask batchgate se\n"
        "ask batchgate serve --http-p\n"
        "ask batchgate completion ''\n"
    )
    b = subprocess.run(["bash", "--norc", "--noprofile", "-c", probe], capture_output=True, text=True, timeout=30)
    assert b.returncode == 0, b.stderr
    registered, serve_or_settings, flag, shells = b.stdout.splitlines()
    assert registered.startswith("complete ") and registered.endswith(" batchgate")
    assert serve_or_settings.split() == ["serve", "settings"]
    assert flag == "--http-port"
    assert shells.split() == ["bash", "zsh", "tcsh"]

    r = _run(["completion", "zsh"])
    assert r.returncode == 0 and r.stdout.startswith("#compdef batchgate") and "serve" in r.stdout
    r = _run(["completion", "fish"])
    assert r.returncode == 2 and "invalid choice: 'fish'" in r.stderr


def test_demo_repository_batches_concurrent_requests(proc, tmp_path):
    """`make serve`'s repository: mlp_batched has dynamic_batching, and served by a real process,
    concurrent requests share executions."""
    repo = tmp_path / "demo"
    r = _run(["demo-repo", str(repo)])
    assert r.returncode == 0, r.stderr
    assert {"simple", "classifier", "identity_bytes", "mlp", "mlp_batched"} <= {p.name for p in repo.iterdir()}
    assert "dynamic_batching" not in (repo / "mlp" / "config.pbtxt").read_text()  # the benchmarks' mlp
    p = proc(serve_args(str(repo))).wait_ready()
    client = httpclient.InferenceServerClient(p.http)
    batching = client.get_model_config("mlp_batched")["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] > 0 and batching["preferred_batch_size"]

    def call(i):
        c = httpclient.InferenceServerClient(p.http)
        inp = httpclient.InferInput("input", [1, 256], "FP32")
        inp.set_data_from_numpy(np.full((1, 256), i, np.float32))
        return c.infer("mlp_batched", [inp]).as_numpy("output").shape

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(call, range(64))) == [(1, 16)] * 64
    (stats,) = client.get_inference_statistics("mlp_batched")["model_stats"]
    assert stats["inference_count"] == 64
    assert stats["execution_count"] < 64, stats  # requests were run together


def test_max_connections_is_fitted_to_the_file_descriptor_limit(proc, small_repo):
    """A process allowed fewer file descriptors than max_connections needs (two per connection:
    HTTP and gRPC, plus a reserve) bounds its connections by what it may open and says so,
    instead of failing accepts with EMFILE at random; the HTTP connection past that bound is
    answered 503 and closed."""
    import resource
    import socket

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))

    p = proc(serve_args(small_repo, "--max-connections", "1000"), preexec=low_limit).wait_ready()
    assert "connections are bounded at 44 per protocol" in p.output(), p.output()[-2000:]
    host, port = p.http.split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(44)]
    try:
        with socket.create_connection((host, int(port)), timeout=5) as extra:
            extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"(max_connections)" in reply, reply[:200]
    finally:
        for s in held:
            s.close()


def test_demo_repo_never_writes_over_a_users_model_and_names_a_path_it_cannot_write(tmp_path):
    repo = tmp_path / "own"
    (repo / "mlp" / "1").mkdir(parents=True)
    (repo / "mlp" / "config.pbtxt").write_text("mine\n")
    r = _run(["demo-repo", str(repo)])
    assert r.returncode == 2 and "already has model(s) mlp" in r.stderr and "--force" in r.stderr
    assert (repo / "mlp" / "config.pbtxt").read_text() == "mine\n"
    assert _run(["demo-repo", "--force", str(repo)]).returncode == 0  # (as make serve does on an update)
    (tmp_path / "afile").write_text("x")
    r = _run(["demo-repo", str(tmp_path / "afile" / "x")])
    assert r.returncode == 2 and "cannot write" in r.stderr and "Traceback" not in r.stderr


def test_routes_refuses_a_client_certificate_without_its_key(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("not used")
    r = _run(["routes", "list", "--admin", "127.0.0.1:1", "--cert-file", str(cert)])
    assert r.returncode != 0 and "--cert-file and --key-file go together" in r.stderr


def test_routes_refuses_a_port_no_socket_can_have():
    """gRPC took 99999999 modulo 65536 and asked another port."""
    r = _run(["routes", "list", "--admin", "127.0.0.1:99999999"])
    assert r.returncode != 0 and "port from 1 to 65535" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["settings"], ["keys", "new", "--id", "k", "--scopes", "infer"]])
def test_output_cut_short_by_its_reader_is_not_an_error(args):
    # as `batchgate settings | head -1`: the reader is gone before anything is written
    p = subprocess.Popen(BATCHGATE + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and b"BrokenPipe" not in err and b"Traceback" not in err, err.decode()


@pytest.mark.parametrize(
    "listener, engine",
    [("--http-port", "h2"), ("--grpc-port", "h2"), ("--grpc-port", "grpcio"), ("--metrics-port", "h2")],
)
def test_a_port_in_use_is_named_with_the_reason(small_repo, listener, engine):
    """A port another process holds (a Triton still running on 8000, say): the start failed with
    "[Errno 98] Address already in use" (which port?) or, for gRPC, the address without why (h2)
    or grpcio's "Failed to bind to address ...; set GRPC_VERBOSITY=debug ..."."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        args = serve_args(small_repo)
        args[args.index(listener) + 1] = str(port)
        env = {**os.environ, "BATCHGATE_GRPC_ENGINE": engine}  # (grpcio raised its own words)
        r = subprocess.run(BATCHGATE + args, capture_output=True, text=True, timeout=60, env=env)
    finally:
        held.close()
    assert r.returncode == 1, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "could not start" in ln)
    assert line.endswith(f"127.0.0.1:{port}: Address already in use"), line
    # said before any model loads (a load may take minutes; it was said after them)
    assert "loading" not in r.stderr, r.stderr
