"""load_settings: defaults < YAML file < BATCHGATE_* environment < flags, typed and validated.

The YAML file nests settings in sections; environment variables and flags stay flat. The
environment is always passed explicitly (``environ=``), so the real one never leaks in."""

import argparse
import re
import subprocess
import sys
import warnings

import pytest

from batchgate.config import (
    ALIASES,
    SECTIONS,
    SETTINGS,
    ConfigError,
    LimitSettings,
    RepositorySettings,
    ServerSettings,
    Settings,
    describe,
    load_settings,
)


@pytest.fixture
def repo(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    return str(d)


def write(tmp_path, text: str) -> str:
    p = tmp_path / "batchgate.yaml"
    p.write_text(text)
    return str(p)


def error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as ei:
        load_settings(*args, **kwargs)
    return str(ei.value)


def test_defaults(repo):
    s = load_settings(None, {"model_repository": repo}, environ={})
    assert s == Settings(repository=RepositorySettings(model_repository=repo))
    assert s.server.http_port == 8000 and s.server.grpc_port == 8001
    assert s.repository.model_control_mode == "none"
    assert s.limits == LimitSettings(
        max_queue_size=4096,
        max_request_bytes=64 * 1024 * 1024,
        max_caller_headers=32,
        max_caller_header_bytes=4096,
        max_request_parameters=64,
    )
    assert s.server.exit_timeout_s == 30.0 and s.repository.repository_poll_s == 15.0


def test_file_then_env_then_flags(tmp_path, repo):
    f = write(
        tmp_path,
        f"repository:\n  model_repository: {repo}\n"
        "server:\n  http_port: 9000\n  grpc_port: 9001\n  metrics_port: 9002\n  log_level: debug\n",
    )
    env = {"BATCHGATE_GRPC_PORT": "7001", "BATCHGATE_METRICS_PORT": "7002"}
    s = load_settings(f, {"metrics_port": 6002}, environ=env)
    assert s.server.http_port == 9000  # file only
    assert s.server.grpc_port == 7001  # env beats file
    assert s.server.metrics_port == 6002  # flag beats env and file
    assert s.server.log_level == "debug"


def test_env_only_and_unrelated_variables_ignored(repo):
    env = {
        "BATCHGATE_MODEL_REPOSITORY": repo,
        "BATCHGATE_WARM_UP": "off",
        "BATCHGATE_REPOSITORY_POLL_SECS": "2.5",
        "HTTP_PORT": "1",
        "BATCHGATE_NOT_A_SETTING": "x",
    }
    with pytest.warns(UserWarning, match="BATCHGATE_NOT_A_SETTING: no such setting, ignored"):
        s = load_settings(None, None, environ=env)
    assert s.repository.model_repository == repo
    assert s.repository.warm_up is False
    assert s.repository.repository_poll_s == 2.5
    assert s.server.http_port == 8000


def test_none_and_empty_flags_do_not_override(repo):
    env = {"BATCHGATE_HTTP_PORT": "8100", "BATCHGATE_LOAD_MODEL": "a"}
    s = load_settings(None, {"model_repository": repo, "http_port": None, "load_model": []}, environ=env)
    assert s.server.http_port == 8100
    assert s.repository.load_model == ("a",)


def test_flag_strings_are_coerced(repo):
    s = load_settings(
        None,
        {"model_repository": repo, "http_port": "8500", "warm_up": "false", "exit_timeout_secs": "1.5"},
        environ={},
    )
    assert s.server.http_port == 8500 and s.repository.warm_up is False and s.server.exit_timeout_s == 1.5


def test_yaml_keys_may_use_dashes(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model-repository: {repo}\nlimits:\n  max-queue-size: 7\n")
    assert load_settings(f, environ={}).limits.max_queue_size == 7


def test_real_environment_is_not_read_when_environ_given(monkeypatch, repo):
    monkeypatch.setenv("BATCHGATE_HTTP_PORT", "1234")
    assert load_settings(None, {"model_repository": repo}, environ={}).server.http_port == 8000


@pytest.mark.parametrize("value", ["1", "true", "Yes", " ON "])
def test_bool_true_spellings(repo, value):
    s = load_settings(None, {"model_repository": repo}, environ={"BATCHGATE_WARM_UP": value})
    assert s.repository.warm_up is True


# ---------------------------------------------------------------- type errors name the setting
@pytest.mark.parametrize(
    "env,words",
    [
        ({"BATCHGATE_HTTP_PORT": "eighty"}, ["BATCHGATE_HTTP_PORT", "'http_port'", "integer", "'eighty'"]),
        ({"BATCHGATE_HTTP_PORT": "80.5"}, ["'http_port'", "integer"]),
        ({"BATCHGATE_WARM_UP": "maybe"}, ["BATCHGATE_WARM_UP", "'warm_up'", "true or false"]),
        ({"BATCHGATE_EXIT_TIMEOUT_SECS": "soon"}, ["'exit_timeout_secs'", "number"]),
    ],
)
def test_env_type_errors(repo, env, words):
    msg = error(None, {"model_repository": repo}, environ=env)
    for w in words:
        assert w in msg


@pytest.mark.parametrize(
    "yaml_lines,words",
    [
        ("server:\n  http_port: true", ["'http_port'", "integer"]),
        ("server:\n  http_port: 80.5", ["'http_port'", "integer"]),
        ("  warm_up: 3", ["'warm_up'", "true or false"]),
        ("server:\n  host: [a, b]", ["'host'", "string"]),
        ("  load_model: 5", ["'load_model'", "list of strings"]),
        ("  load_model: [a, [b, c]]", ["'load_model'", "list of strings"]),  # (was taken: "['b', 'c']")
        # a list nesting itself by aliases, a few hundred bytes: written out whole, it took
        # seconds and hundreds of MB at start; refused at its first nested entry
        (
            "  load_model: &a9 [&a8 [&a7 [&a6 [&a5 [&a4 [&a3 [&a2 [&a1 [x, x, x, x, x, x, x, x],"
            " *a1, *a1, *a1, *a1, *a1, *a1, *a1], *a2, *a2, *a2, *a2, *a2, *a2, *a2],"
            " *a3, *a3, *a3, *a3, *a3, *a3, *a3], *a4, *a4, *a4, *a4, *a4, *a4, *a4],"
            " *a5, *a5, *a5, *a5, *a5, *a5, *a5], *a6, *a6, *a6, *a6, *a6, *a6, *a6],"
            " *a7, *a7, *a7, *a7, *a7, *a7, *a7], *a8, *a8, *a8, *a8, *a8, *a8, *a8]",
            ["'load_model'", "list of strings"],
        ),
        ("  repository_poll_secs: yes", ["'repository_poll_secs'", "number"]),
        ("  repository_poll_s: soon", ["'repository_poll_s'", "number"]),
    ],
)
def test_file_type_errors(tmp_path, repo, yaml_lines, words):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\n{yaml_lines}\n")
    msg = error(f, environ={})
    assert f in msg  # says which file
    for w in words:
        assert w in msg


def test_flag_type_error_names_the_flag(repo):
    msg = error(None, {"model_repository": repo, "grpc_port": "x"}, environ={})
    assert "--grpc-port" in msg and "'grpc_port'" in msg


def test_integral_float_is_accepted_for_an_int(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nserver:\n  http_port: 8080.0\n")
    assert load_settings(f, environ={}).server.http_port == 8080


# ---------------------------------------------------------------- bad values name the setting
@pytest.mark.parametrize(
    "flags,words",
    [
        ({"http_port": 70000}, ["http_port", "70000"]),
        ({"grpc_port": -1}, ["grpc_port", "-1"]),
        ({"metrics_port": -2}, ["metrics_port", "-2"]),
        ({"model_control_mode": "sometimes"}, ["model_control_mode", "'sometimes'", "explicit"]),
        ({"log_format": "xml"}, ["log_format", "json"]),
        ({"log_level": "verbose"}, ["log_level", "debug"]),
        ({"repository_poll_secs": 0}, ["repository_poll_secs must be greater than 0"]),
        ({"repository_poll_s": 0}, ["repository_poll_s must be greater than 0"]),
        ({"exit_timeout_secs": -1}, ["exit_timeout_secs"]),
        ({"exit_timeout_s": 0}, ["exit_timeout_s must be greater than 0"]),
        ({"grpc_max_connection_age_s": -1}, ["grpc_max_connection_age_s must not be negative"]),
        ({"max_queue_size": -1}, ["max_queue_size"]),
        (
            {"max_queue_size": 0},
            ["--max-queue-size: max_queue_size must be at least 1, not 0", "no longer means unbounded"],
        ),
        ({"default_max_batch_size": -4}, ["default_max_batch_size"]),
        ({"max_request_bytes": 0}, ["max_request_bytes"]),
        ({"max_caller_headers": -1}, ["max_caller_headers must not be negative, not -1"]),
        ({"max_caller_header_bytes": 0}, ["max_caller_header_bytes must be at least 1, not 0"]),
        ({"max_request_parameters": -1}, ["max_request_parameters must not be negative, not -1"]),
        ({"host": "0.0.0.0:8000"}, ["host must be an IP address or a host name, without brackets or a port"]),
        ({"host": "[::1]"}, ["host must be", "'[::1]'"]),
        ({"host": "999.1.1.1"}, ["host must be"]),
        ({"admin_host": "local host"}, ["admin_host must be"]),
        ({"infer_threads": -1}, ["infer_threads"]),
        (
            {"infer_threads": 100_000},
            ["infer_threads must be at most 1024, not 100000"],
        ),  # (a traceback: no threads left)
        ({"gpu_device_id": -1}, ["gpu_device_id"]),
        ({"inline_execution_max_us": -1}, ["inline_execution_max_us"]),
        ({"shm_key_prefix": "batchgate_"}, ["shm_key_prefix must be '' (off) or '/' then", "'batchgate_'"]),
        ({"shm_key_prefix": "/"}, ["shm_key_prefix must be '' (off) or '/' then"]),
        ({"shm_key_prefix": "/a/b"}, ["shm_key_prefix"]),
    ],
)
def test_bad_values(repo, flags, words):
    msg = error(None, {"model_repository": repo, **flags}, environ={})
    for w in words:
        assert w in msg


@pytest.mark.parametrize(
    "host", ["", "::", "::1", "fe80::1%eth0", "127.0.0.1", "localhost", "batchgate.ns.svc.", "hôte"]
)
def test_hosts_that_can_be_bound_are_accepted(repo, host):
    assert load_settings(None, {"model_repository": repo, "host": host}, environ={}).server.host == host


def test_max_queue_size_zero_is_refused_from_every_source(tmp_path, repo):
    assert "max_queue_size must be at least 1" in error(
        None, {"model_repository": repo}, environ={"BATCHGATE_MAX_QUEUE_SIZE": "0"}
    )
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nlimits:\n  max_queue_size: 0\n")
    msg = error(f, environ={})
    assert f in msg and "max_queue_size must be at least 1, not 0" in msg


def test_the_new_limits_may_be_zero_where_zero_makes_sense(repo):
    s = load_settings(
        None,
        {"model_repository": repo, "max_caller_headers": 0, "max_request_parameters": 0, "max_caller_header_bytes": 1},
        environ={},
    )
    assert (s.limits.max_caller_headers, s.limits.max_request_parameters, s.limits.max_caller_header_bytes) == (0, 0, 1)


def test_metrics_port_minus_one_turns_metrics_off(repo):
    s = load_settings(None, {"model_repository": repo, "metrics_port": -1}, environ={})
    assert s.server.metrics_port == -1


def test_model_repository_required_and_must_be_a_directory(tmp_path):
    assert "model_repository" in error(None, {}, environ={})
    missing = str(tmp_path / "nope")
    msg = error(None, {"model_repository": missing}, environ={})
    assert "model_repository" in msg and missing in msg


def test_nan_is_refused(repo):
    msg = error(None, {"model_repository": repo}, environ={"BATCHGATE_EXIT_TIMEOUT_SECS": "nan"})
    assert "exit_timeout_secs" in msg


def test_unknown_flag_is_a_config_error(repo):
    assert "http_prot" in error(None, {"model_repository": repo, "http_prot": 1}, environ={})


# ---------------------------------------------------------------- the file itself
def test_unknown_key_in_file_is_refused(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nhttp_prot: 8000\n")
    msg = error(f, environ={})
    assert "'http_prot'" in msg and "unknown" in msg and "http_port" in msg
    assert "did you mean 'http_port'" in msg and "known sections: server, repository, limits, batching" in msg


def test_file_must_be_a_mapping(tmp_path):
    f = write(tmp_path, "- a\n- b\n")
    assert "mapping" in error(f, environ={})


def test_a_key_or_section_given_twice_in_the_file_is_refused(tmp_path, repo):
    f = write(tmp_path, f"server:\n  http_port: 9000\nserver:\n  grpc_port: 9001\nmodel_repository: {repo}\n")
    assert "key 'server' is given twice" in error(f, environ={})
    f = write(tmp_path, "server:\n  http_port: 9000\n  http_port: 9001\n")
    assert "key 'http_port' is given twice" in error(f, environ={})


def test_an_unquoted_off_in_yaml_means_off(tmp_path, repo):
    f = write(tmp_path, f"model_repository: {repo}\nobservability:\n  access_log: off\n  tracing: off\n")
    s = load_settings(f, environ={})
    assert s.observability.access_log == "off" and s.observability.tracing == "off"


def test_file_must_be_valid_yaml(tmp_path):
    f = write(tmp_path, "a: [unclosed\n")
    assert "not valid YAML" in error(f, environ={})


@pytest.mark.parametrize(
    "content, words",
    [
        ("server:\n  http_port: [1,\n", "while parsing a flow node: expected the node content, but found"),
        ("server:\n  host: a\n  host: b\n", "key 'host' is given twice"),
        ("server: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
        ('server:\n  host: "\\U80092014"\n', "OverflowError"),
    ],
)
def test_a_yaml_error_is_one_line_naming_the_place(tmp_path, content, words):
    """`batchgate serve --config` printed PyYAML's own text: four lines, with the file's line
    quoted under the message and a caret under that, where every other file error of the CLI is one."""
    f = write(tmp_path, content)
    msg = error(f, environ={})
    assert "\n" not in msg and words in msg, msg
    assert re.search(r" at line \d+, column \d+", msg), msg


def test_missing_file(tmp_path):
    missing = str(tmp_path / "none.yaml")
    assert missing in error(missing, environ={})


def test_empty_file_means_defaults(tmp_path, repo):
    f = write(tmp_path, "")
    assert load_settings(f, {"model_repository": repo}, environ={}).server.http_port == 8000


# ---------------------------------------------------------------- load_model and the control mode
def test_load_model_implies_explicit_mode(repo):
    s = load_settings(None, {"model_repository": repo, "load_model": ["a", "b"]}, environ={})
    assert s.repository.model_control_mode == "explicit"
    assert s.repository.load_model == ("a", "b")


def test_load_model_from_env_is_a_comma_list(repo):
    s = load_settings(None, {"model_repository": repo}, environ={"BATCHGATE_LOAD_MODEL": "a, b,,c"})
    assert s.repository.load_model == ("a", "b", "c")
    assert s.repository.model_control_mode == "explicit"


def test_load_model_with_another_mode_is_refused(repo):
    msg = error(None, {"model_repository": repo, "load_model": ["a"], "model_control_mode": "poll"}, environ={})
    assert "load_model" in msg and "explicit" in msg


def test_describe_lists_every_setting_with_its_variable():
    rows = {name: (var, default) for name, var, default in describe()}
    assert rows["http_port"] == ("BATCHGATE_HTTP_PORT", 8000)
    assert rows["max_queue_size"][0] == "BATCHGATE_MAX_QUEUE_SIZE"
    assert rows["exit_timeout_s"] == ("BATCHGATE_EXIT_TIMEOUT_S", 30.0)
    every = {f for cls in SECTIONS.values() for f in cls.__dataclass_fields__} | {"remote_models"}
    assert set(rows) == every == set(SETTINGS)


def test_model_batching_policy_entries_are_checked(tmp_path):
    from batchgate.config import ConfigError, batching_policies, load_settings

    s = load_settings(
        None, {"model_repository": str(tmp_path), "model_batching_policy": ["m=work_conserving"]}, environ={}
    )
    assert batching_policies(s) == {"m": "work_conserving"}
    with pytest.raises(ConfigError) as e:
        load_settings(None, {"model_repository": str(tmp_path), "model_batching_policy": ["m=fastest"]}, environ={})
    assert "model_batching_policy" in str(e.value)


def test_remote_models_from_yaml_mappings_env_lines_and_flags(tmp_path):
    path = write(
        tmp_path,
        "remote_models:\n"
        "  - name: resnet\n"
        "    upstreams: [10.0.0.5:8001, 'gpu-pool.svc:8001']\n"
        "    upstream_model: resnet50\n"
        "    batching: passthrough\n"
        "    timeout_s: 2.5\n"
        "  - name=bert upstreams=a:1,b:2 max-inflight=8\n",
    )
    s = load_settings(path, {}, environ={})
    assert s.repository.model_repository == ""  # remote models alone need no repository
    resnet, bert = s.remote_models
    assert resnet.upstreams == ("10.0.0.5:8001", "gpu-pool.svc:8001") and resnet.target == "resnet50"
    assert resnet.batching == "passthrough" and resnet.timeout_s == 2.5 and resnet.inflight == 256
    assert bert.upstreams == ("a:1", "b:2") and bert.target == "bert" and bert.inflight == 8
    assert bert.batching == "gateway" and bert.retries == 1 and bert.eject_after_failures == 3

    env = load_settings(None, {}, environ={"BATCHGATE_REMOTE_MODELS": "name=a upstreams=h:1; name=b upstreams=h:2"})
    assert [m.name for m in env.remote_models] == ["a", "b"]
    assert env.remote_models[0].inflight == 2  # gateway: two batches in flight per upstream
    flags = load_settings(None, {"remote_models": ["name=c upstreams=h:3 batching=passthrough"]}, environ={})
    assert flags.remote_models[0].batching == "passthrough"


@pytest.mark.parametrize(
    "entry, words",
    [
        ("name=a", "needs 'upstreams'"),
        ("upstreams=h:1", "needs 'name'"),
        ("name=a upstreams=h", "must be host:port"),
        ("name=a upstreams=,", "needs at least one upstream"),
        ("name=a upstreams=h:99999", "must be host:port"),
        # (one address's metrics are one series: two entries wrote its health gauge in turn)
        ("name=a upstreams=h:1,g:2,h:1", "upstream 'h:1' is listed more than once"),
        ("name=a upstreams=h:1 batching=maybe", "batching must be one of gateway, passthrough"),
        ("name=a upstreams=h:1 retries=-1", "'retries' must be a whole number"),
        ("name=a upstreams=h:1 timeout_s=0", "'timeout_s' must be a number > 0"),
        ("name=a upstreams=h:1 colour=blue", "unknown remote model key(s) colour"),
        ("name=a upstreams=h:1 eject_after_failures=0", "eject_after_failures must be at least 1"),
        ("name=a upstreams=h:1 probe_interval_s=1e-9", "probe_interval_s must be at least 0.05, not 1e-09"),
        ("name=a upstreams=h:1 max_queue_delay_us=3600000001", "max_queue_delay_us must be at most 3600000000"),
        # (int32 fields of the model's config: a larger value failed every load, "Value out of range")
        ("name=a upstreams=h:1 max_inflight=2147483648", "'max_inflight' must be at most 2147483647"),
        ("name=a upstreams=h:1 max_batch_size=3000000000", "'max_batch_size' must be at most 2147483647"),
        ("name=a oops upstreams=h:1", "key=value pairs"),
    ],
)
def test_remote_model_errors_name_what_is_wrong(repo, entry, words):
    msg = error(None, {"model_repository": repo, "remote_models": [entry]}, environ={})
    assert "--remote-model:" in msg and words in msg


def test_a_remote_model_given_twice_is_refused(repo):
    msg = error(None, {"remote_models": ["name=a upstreams=h:1", "name=a upstreams=h:2"]}, environ={})
    assert "a given more than once" in msg


# ---------------------------------------------------------------- sections in the YAML file
def no_warnings(*args, **kwargs):
    """load_settings, failing on any warning (the nested form is the current one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_settings(*args, **kwargs)


def test_nested_file_fills_every_section(tmp_path, repo):
    f = write(
        tmp_path,
        f"""
server:
  host: 127.0.0.1
  http_port: 9000
  exit_timeout_s: 12.5
  grpc_max_connection_age_s: 300
  infer_threads: 6
  log_format: json
repository:
  model_repository: {repo}
  model_control_mode: explicit
  load_model: [a, b]
  warm_up: false
  default_max_batch_size: 8
limits:
  max_queue_size: 100
  max_request_bytes: 1048576
  max_caller_headers: 8
  max_caller_header_bytes: 256
  max_request_parameters: 4
batching:
  batching_policy: work_conserving
  model_batching_policy: [m=triton]
  inline_execution_max_us: 0
remote_models:
  - name=r upstreams=h:1
""",
    )
    s = no_warnings(f, environ={})
    assert s.server == ServerSettings(
        host="127.0.0.1",
        http_port=9000,
        exit_timeout_s=12.5,
        grpc_max_connection_age_s=300.0,
        infer_threads=6,
        log_format="json",
    )
    assert s.repository == RepositorySettings(
        model_repository=repo,
        model_control_mode="explicit",
        load_model=("a", "b"),
        warm_up=False,
        default_max_batch_size=8,
    )
    assert s.limits == LimitSettings(
        max_queue_size=100,
        max_request_bytes=1048576,
        max_caller_headers=8,
        max_caller_header_bytes=256,
        max_request_parameters=4,
    )
    assert s.batching.batching_policy == "work_conserving" and s.batching.model_batching_policy == ("m=triton",)
    assert s.batching.inline_execution_max_us == 0
    assert [m.name for m in s.remote_models] == ["r"]


def test_an_empty_section_means_its_defaults(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nlimits:\nserver: {{}}\n")
    assert no_warnings(f, environ={}).limits == LimitSettings()


def test_flat_file_still_works_with_a_deprecation_warning(tmp_path, repo):
    f = write(tmp_path, f"model_repository: {repo}\nhttp_port: 9000\nmax_queue_size: 7\nexit_timeout_secs: 3\n")
    with pytest.warns(DeprecationWarning) as caught:
        s = load_settings(f, environ={})
    assert s.server.http_port == 9000 and s.limits.max_queue_size == 7 and s.server.exit_timeout_s == 3.0
    assert s.repository.model_repository == repo
    assert len(caught) == 1  # once per file, not once per key
    msg = str(caught[0].message)
    assert f in msg and "move each key into its section" in msg
    assert "server: http_port, exit_timeout_secs" in msg and "limits: max_queue_size" in msg


def test_flat_and_nested_mixed_in_one_file_is_accepted_with_the_warning(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nhttp_port: 9000\n")
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert load_settings(f, environ={}).server.http_port == 9000


def test_a_setting_both_flat_and_nested_in_one_file_is_refused(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nhttp_port: 9000\nserver:\n  http_port: 9001\n")
    msg = error(f, environ={})
    assert f in msg and "'http_port' and 'server.http_port' both set http_port" in msg


def test_drift_monitors_in_the_file_are_checked_with_the_settings(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\ndrift:\n  anything: 1\n")
    assert "drift: must be a list of monitors" in error(f, environ={})
    f = write(
        tmp_path,
        f"repository:\n  model_repository: {repo}\n"
        "drift:\n  - {model: m, inputs: [x], reference: p.json, alpha: 2}\n",
    )
    msg = error(f, environ={})
    assert "drift[0] (model 'm').alpha: must be a number from 1e-12 to 0.5, not 2" in msg
    f = write(
        tmp_path,
        f"repository:\n  model_repository: {repo}\n"
        "drift:\n  - {model: m, inputs: [x], reference: p.json, sample_rate: 0.5, window: {samples: 500}}\n"
        "drift_detector:\n  drift_queue_samples: 64\n",
    )
    s = load_settings(f, environ={})
    (m,) = s.drift
    assert (m.model, m.inputs, m.sample_rate, m.window_samples) == ("m", ("x",), 0.5, 500)
    assert s.drift_detector.drift_queue_samples == 64


def test_a_drift_hang_time_shorter_than_the_detectors_reports_is_refused(repo):
    """The detector reports every second: a drift_detector_hang_s under that (0.5) killed a healthy
    detector again and again (its windows lost each time). 0 (never) and 2 s or more are taken."""
    msg = error(None, {"model_repository": repo, "drift_detector_hang_s": 0.5}, environ={})
    assert "drift_detector_hang_s must be 0 (off) or at least 2" in msg and "not 0.5" in msg
    for ok in (0, 2, 60):
        s = load_settings(None, {"model_repository": repo, "drift_detector_hang_s": ok}, environ={})
        assert s.drift_detector.drift_detector_hang_s == ok


def test_unknown_section_is_refused_with_the_known_ones(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nmetrics:\n  port: 1\n")
    msg = error(f, environ={})
    assert "unknown setting 'metrics'" in msg
    known = (
        "server, repository, limits, batching, auth, tls, routing, drift_detector, shared_memory, observability, "
        "remote_models, routes, drift"
    )
    assert f"known sections: {known}" in msg


def test_routes_in_the_file_are_checked_with_the_settings(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nroutes:\n  keys: []\n")
    assert "routes: must be a list of routes" in error(f, environ={})
    good = "routes:\n  - name: r\n    variants: [{name: a, model: m, weight: 1}]\n"
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nrouting:\n  state_dir: /tmp/x\n{good}")
    s = load_settings(f, environ={})
    assert [r.name for r in s.routes] == ["r"] and s.routing.state_dir == "/tmp/x"


def test_unknown_key_in_a_section_lists_that_sections_keys(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nlimits:\n  max_queue: 5\n")
    msg = error(f, environ={})
    assert "unknown setting 'max_queue' in section 'limits'" in msg and "did you mean 'max_queue_size'" in msg
    assert (
        "known: max_queue_size, max_request_bytes, max_caller_headers, max_caller_header_bytes, max_request_parameters"
        in msg
    )


def test_a_setting_in_the_wrong_section_says_where_it_belongs(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\n  http_port: 1\n")
    assert "'http_port' belongs in section 'server', not in section 'repository'" in error(f, environ={})
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nlimits:\n  exit_timeout_secs: 1\n")
    assert "'exit_timeout_secs' belongs in section 'server'" in error(f, environ={})
    f = write(tmp_path, "server:\n  remote_models: []\n")
    assert "'remote_models' belongs at the top level" in error(f, environ={})


def test_a_section_must_be_a_mapping(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nserver: 8000\n")
    assert "section 'server' must be a mapping" in error(f, environ={})


# ---------------------------------------------------------------- aliases
def test_alias_table():
    assert {a: (t.name, t.deprecated) for a, t in ALIASES.items()} == {
        "exit_timeout_secs": ("exit_timeout_s", False),
        "grpc_max_connection_age_secs": ("grpc_max_connection_age_s", False),
        "repository_poll_secs": ("repository_poll_s", False),
    }
    assert SETTINGS["exit_timeout_s"].aliases == ("exit_timeout_secs",)


def test_secs_aliases_are_accepted_silently_everywhere(tmp_path, repo):
    f = write(
        tmp_path,
        f"repository:\n  model_repository: {repo}\n  repository_poll_secs: 2\nserver:\n  exit_timeout_secs: 5\n",
    )
    s = no_warnings(f, environ={})
    assert s.repository.repository_poll_s == 2.0 and s.server.exit_timeout_s == 5.0
    s = no_warnings(
        None,
        {"model_repository": repo},
        environ={"BATCHGATE_EXIT_TIMEOUT_SECS": "6", "BATCHGATE_GRPC_MAX_CONNECTION_AGE_SECS": "60"},
    )
    assert s.server.exit_timeout_s == 6.0 and s.server.grpc_max_connection_age_s == 60.0
    s = no_warnings(
        None, {"model_repository": repo, "grpc_max_connection_age_secs": 7, "repository_poll_secs": 1}, environ={}
    )
    assert s.server.grpc_max_connection_age_s == 7.0 and s.repository.repository_poll_s == 1.0


def test_a_later_source_overrides_an_alias_of_an_earlier_one(tmp_path, repo):
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nserver:\n  exit_timeout_secs: 5\n")
    assert load_settings(f, environ={"BATCHGATE_EXIT_TIMEOUT_S": "9"}).server.exit_timeout_s == 9.0
    assert (
        load_settings(f, {"exit_timeout_s": 4}, environ={"BATCHGATE_EXIT_TIMEOUT_SECS": "9"}).server.exit_timeout_s
        == 4.0
    )


def test_a_name_and_its_alias_in_one_source_are_refused(tmp_path, repo):
    f = write(
        tmp_path, f"repository:\n  model_repository: {repo}\nserver:\n  exit_timeout_s: 5\n  exit_timeout_secs: 6\n"
    )
    msg = error(f, environ={})
    assert f in msg and "'server.exit_timeout_s' and 'server.exit_timeout_secs' both set exit_timeout_s" in msg
    msg = error(
        None, {"model_repository": repo}, environ={"BATCHGATE_EXIT_TIMEOUT_S": "5", "BATCHGATE_EXIT_TIMEOUT_SECS": "6"}
    )
    assert "BATCHGATE_EXIT_TIMEOUT_S and BATCHGATE_EXIT_TIMEOUT_SECS both set exit_timeout_s" in msg
    msg = error(None, {"model_repository": repo, "repository_poll_s": 1, "repository_poll_secs": 2}, environ={})
    assert "--repository-poll-s and --repository-poll-secs both set repository_poll_s" in msg
    # a None flag (argparse: not given) is no conflict
    assert (
        load_settings(
            None, {"model_repository": repo, "exit_timeout_s": None, "exit_timeout_secs": 3}, environ={}
        ).server.exit_timeout_s
        == 3.0
    )


def test_errors_name_the_alias_the_user_wrote(repo):
    msg = error(None, {"model_repository": repo}, environ={"BATCHGATE_REPOSITORY_POLL_SECS": "0"})
    assert "environment BATCHGATE_REPOSITORY_POLL_SECS: repository_poll_secs must be greater than 0" in msg


def test_a_deprecated_alias_warns_with_the_new_name(tmp_path, repo, monkeypatch):
    from dataclasses import replace

    from batchgate.config import Alias

    monkeypatch.setitem(ALIASES, "http_listen_port", Alias("http_port", deprecated=True))
    monkeypatch.setitem(SETTINGS, "http_port", replace(SETTINGS["http_port"], aliases=("http_listen_port",)))
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\nserver:\n  http_listen_port: 9000\n")
    for args in [(f,), (None, {"model_repository": repo, "http_listen_port": 9000})]:
        with pytest.warns(DeprecationWarning, match="'http_listen_port' is deprecated; its new name is 'http_port'"):
            assert load_settings(*args, environ={}).server.http_port == 9000
    with pytest.warns(DeprecationWarning, match="BATCHGATE_HTTP_LISTEN_PORT"):
        assert (
            load_settings(
                None, {"model_repository": repo}, environ={"BATCHGATE_HTTP_LISTEN_PORT": "9001"}
            ).server.http_port
            == 9001
        )


# ---------------------------------------------------------------- flags made from the settings table
def serve_parser():
    from batchgate.cli import _serve_parser

    ap = argparse.ArgumentParser(prog="batchgate")
    _serve_parser(ap.add_subparsers(dest="command"))
    return ap


def parse_flags(*argv: str) -> dict:
    from batchgate.cli import serve_flags

    return serve_flags(serve_parser().parse_args(["serve", *argv]))


def test_every_setting_has_a_flag_and_nothing_else_does():
    flags = parse_flags()
    assert set(flags) == set(SETTINGS) and all(v is None for v in flags.values())


def test_generated_flags_parse_into_settings(repo):
    flags = parse_flags(
        "--model-repository",
        repo,
        "--http-port",
        "0",
        "--exit-timeout-secs",
        "3",
        "--repository-poll-secs",
        "2",
        "--grpc-max-connection-age-secs",
        "7",
        "--load-model",
        "a",
        "--load-model",
        "b",
        "--model-batching-policy",
        "m=work_conserving",
        "--model-batching-policy",
        "n=triton",
        "--remote-model",
        "name=r upstreams=h:1",
        "--remote-model",
        "name=q upstreams=h:2",
        "--warm-up",
        "false",
        "--log-format",
        "json",
        "--max-caller-headers",
        "4",
        "--max-caller-header-bytes",
        "100",
        "--max-request-parameters",
        "2",
        "--metrics-port",
        "-1",
    )
    s = no_warnings(None, flags, environ={})
    assert s.server.http_port == 0 and s.server.exit_timeout_s == 3.0 and s.server.metrics_port == -1
    assert s.repository.repository_poll_s == 2.0 and s.server.grpc_max_connection_age_s == 7.0
    assert s.repository.load_model == ("a", "b") and s.repository.model_control_mode == "explicit"
    assert s.batching.model_batching_policy == ("m=work_conserving", "n=triton")
    assert [m.name for m in s.remote_models] == ["r", "q"]
    assert s.repository.warm_up is False and s.server.log_format == "json"
    assert (s.limits.max_caller_headers, s.limits.max_caller_header_bytes, s.limits.max_request_parameters) == (
        4,
        100,
        2,
    )
    assert parse_flags("--exit-timeout-s", "4")["exit_timeout_s"] == "4"  # the new spelling, same setting
    assert parse_flags("--exit-timeout-secs", "4")["exit_timeout_secs"] == "4"  # messages name what was typed
    with pytest.raises(SystemExit):  # a name and its alias in the same source: an error, as in a file
        parse_flags("--exit-timeout-secs", "4", "--exit-timeout-s", "5")
    assert parse_flags("--exit-timeout-s", "4", "--exit-timeout-s", "5")["exit_timeout_s"] == "5"  # repeated: last wins
    msg = error(None, parse_flags("--model-repository", repo, "--repository-poll-secs", "0"), environ={})
    assert "--repository-poll-secs: repository_poll_secs must be greater than 0" in msg


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-format", "xml"],
        ["--batching-policy", "fastest"],
        ["--model-control-mode", "sometimes"],
        ["--warm-up", "maybe"],
    ],
)
def test_choices_come_from_the_table(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags(*argv)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_serve_help_lists_every_flag_and_the_old_spellings():
    r = subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for spec in SETTINGS.values():
        assert spec.flag in text and spec.env in text
    for old in ("--exit-timeout-secs", "--repository-poll-secs", "--grpc-max-connection-age-secs"):
        assert old in text
    for section in ("server settings", "repository settings", "limits settings", "batching settings"):
        assert section in text
    assert "--config FILE" in text


def test_serve_logs_the_flat_file_deprecation_and_refuses_bad_files(tmp_path, repo):
    f = write(tmp_path, f"model_repository: {repo}\nhttp_port: 70000\n")
    r = subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "serve", "--config", f], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "warning: config file" in r.stderr and "move each key into its section" in r.stderr
    assert "http_port must be between 0 and 65535" in r.stderr
    f = write(tmp_path, f"repository:\n  model_repository: {repo}\ndrift:\n  keys: []\n")
    r = subprocess.run(
        [sys.executable, "-m", "batchgate.cli", "serve", "--config", f], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "drift: must be a list of monitors" in r.stderr


def test_remote_model_names_follow_the_model_name_rule():
    from batchgate.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="remote model name '../up' is not allowed"):
        load_settings(None, {"remote_models": ["name=../up upstreams=h:1"]}, environ={})
    ok = load_settings(None, {"remote_models": ["name=up_1.v2 upstreams=h:1"]}, environ={})
    assert ok.remote_models[0].name == "up_1.v2"


# ---------------------------------------------------------------- what PyYAML and int() let through
# (found by the fuzz harness; each is a ConfigError naming the file or variable and the place)


def write_bytes(tmp_path, content: bytes) -> str:
    p = tmp_path / "batchgate.yaml"
    p.write_bytes(content)
    return str(p)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'server:\n  host: "\\U80092014"\n', "line 2, column 12"),  # OverflowError from chr() in the scanner
        (b'server:\n  host: "\\U00110000"\n', "line 2, column 12"),  # ValueError from chr()
        (b"server:\n  host: 2001-13-45\n", "cannot read '2001-13-45' as timestamp"),
        (b"server:\n  host: !!bool maybe\n", "cannot read 'maybe' as bool"),
        (b"server:\n  http_port: " + b"9" * 5000 + b"\n", "as int"),  # int() reads at most 4,300 digits
        (b"server:\n  http_port: 0x" + b"f" * 4000 + b"\n", "is too large"),  # str() of it would fail
        (b"server:\n  http_port: 1" + b":59" * 3000 + b"\n", "is too large"),  # YAML 1.1 base 60
        (b"server: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested too deeply"),  # RecursionError
        (b"server:\n  host: a\x1fb\n", "character #x001f on line 2 is not allowed"),  # the reader, first
    ],
)
def test_yaml_the_loader_cannot_build_is_a_config_error(tmp_path, repo, content, words):
    f = write_bytes(tmp_path, content)
    msg = error(f, {"model_repository": repo}, environ={})
    assert msg.startswith(f"config file {f} is not valid YAML") and words in msg and len(msg) < 600


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path, repo):
    f = write_bytes(tmp_path, b"server:\n  host: \xff\xfe\n")
    msg = error(f, {"model_repository": repo}, environ={})
    assert (
        msg
        == f"config file {f} is not UTF-8 text: byte 0xff on line 2 (offset 16) is not UTF-8; save the file as UTF-8"
    )
    f = write_bytes(tmp_path, "\ufeffserver:\n  host: hôte\n".encode())  # UTF-8, with a BOM: read as before
    assert load_settings(f, {"model_repository": repo}, environ={}).server.host == "hôte"


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"BATCHGATE_HTTP_PORT": "9" * 400}, "environment BATCHGATE_HTTP_PORT: 'http_port' is out of range"),
        ({"BATCHGATE_MAX_QUEUE_SIZE": "-" + "9" * 400}, "'max_queue_size' is out of range"),
        ({"BATCHGATE_HTTP_PORT": "9" * 5000}, "'http_port' must be an integer"),
        ({"BATCHGATE_MAX_QUEUE_WAIT_MS": "9" * 400}, "'max_queue_wait_ms' must be a finite number"),
    ],
)
def test_huge_numbers_in_settings_are_config_errors(repo, environ, words):
    msg = error(None, {"model_repository": repo}, environ=environ)
    assert words in msg and len(msg) < 300  # the value is quoted cut


def test_huge_numbers_in_a_file_or_flags_are_config_errors(tmp_path, repo):
    f = write(tmp_path, f"server:\n  http_port: {'9' * 400}\nlimits:\n  max_queue_wait_ms: {'9' * 400}\n")
    assert "'http_port' is out of range: an integer setting has at most 18 digits" in error(
        f, {"model_repository": repo}, environ={}
    )
    f = write(tmp_path, f"limits:\n  max_queue_wait_ms: {'9' * 400}\n")  # float() of it: OverflowError
    assert "'max_queue_wait_ms' must be a finite number" in error(f, {"model_repository": repo}, environ={})
    msg = error(None, {"model_repository": repo, "http_port": 10**5000}, environ={})
    assert "--http-port: 'http_port' is out of range" in msg and len(msg) < 300
    assert load_settings(None, {"model_repository": repo, "max_queue_size": 10**18 - 1}, environ={})


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (
            {"name": "m", "upstreams": 5},
            "'upstreams' must be a list of host:port strings or one comma-separated string",
        ),
        ({"name": "m", "upstreams": True}, "'upstreams' must be a list of host:port strings"),
        ({"name": "m", "upstreams": 1.5}, "'upstreams' must be a list of host:port strings"),
        ({"name": "m", "upstreams": {"h": 1}}, "'upstreams' must be a list of host:port strings"),
        ({"name": "m", "upstreams": ["h:1", 8001]}, "'upstreams' must be a list of host:port strings"),
        ("name=m upstreams=h:\u00b2", "upstream 'h:\u00b2' must be host:port with a port from 1 to 65535"),
        ("name=m upstreams=h:\u0663", "upstream 'h:\u0663' must be host:port"),  # int() reads 3
        # a URL was taken, then failed every call "Misformatted domain name"
        (
            "name=m upstreams=http://h:8001",
            "upstream 'http://h:8001' must be host:port without a scheme (the upstream's gRPC port; tls: true for TLS)",
        ),
        ({"name": "m", "upstreams": ["h/v2:8001"]}, "upstream 'h/v2:8001' must be host:port with a port from 1"),
        ({"name": "m", "upstreams": "h:1", "timeout_s": 10**400}, "'timeout_s' must be a number > 0"),
        ({"name": "m", "upstreams": "h:1", "retries": 10**400}, "'retries' must be a whole number >= 0 of at most 18"),
        ({"name": "m", "upstreams": "h:1", "upstream_model": ["a"]}, "'upstream_model' must be a string"),
    ],
)
def test_malformed_remote_models_are_config_errors(repo, entry, words):
    msg = error(None, {"model_repository": repo, "remote_models": [entry]}, environ={})
    assert msg.startswith("--remote-model: ") and words in msg and len(msg) < 300


def test_a_misspelt_environment_variable_is_warned_of_with_the_nearest_name(tmp_path):
    import warnings

    from batchgate.config import load_settings as load

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        env = {"BATCHGATE_HTTP_PROT": "1", "BATCHGATE_TEST_ANYTHING": "x", "BATCHGATE_HTTP_PORT": "9"}
        load(None, {"model_repository": str(tmp_path)}, environ=env)
    texts = [str(w.message) for w in got]
    assert texts == [
        "environment BATCHGATE_HTTP_PROT: no such setting, ignored (did you mean 'BATCHGATE_HTTP_PORT'?)"
    ], texts
