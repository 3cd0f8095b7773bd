"""load_settings: defaults < YAML file < BATCHGATE_* environment < flags, typed and validated.

The environment is always passed explicitly (``environ=``), so the real one never leaks in."""

import pytest

from batchgate.config import ConfigError, Settings, describe, load_settings


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
    assert s == Settings(model_repository=repo)
    assert s.http_port == 8000 and s.grpc_port == 8001 and s.model_control_mode == "none"


def test_file_then_env_then_flags(tmp_path, repo):
    f = write(tmp_path, f"model_repository: {repo}\nhttp_port: 9000\ngrpc_port: 9001\nmetrics_port: 9002\n"
                        "log_level: debug\n")
    env = {"BATCHGATE_GRPC_PORT": "7001", "BATCHGATE_METRICS_PORT": "7002"}
    s = load_settings(f, {"metrics_port": 6002}, environ=env)
    assert s.http_port == 9000  # file only
    assert s.grpc_port == 7001  # env beats file
    assert s.metrics_port == 6002  # flag beats env and file
    assert s.log_level == "debug"


def test_env_only_and_unrelated_variables_ignored(repo):
    env = {"BATCHGATE_MODEL_REPOSITORY": repo, "BATCHGATE_WARM_UP": "off", "BATCHGATE_REPOSITORY_POLL_SECS": "2.5",
           "HTTP_PORT": "1", "BATCHGATE_NOT_A_SETTING": "x"}
    s = load_settings(None, None, environ=env)
    assert s.model_repository == repo
    assert s.warm_up is False
    assert s.repository_poll_secs == 2.5
    assert s.http_port == 8000


def test_none_and_empty_flags_do_not_override(repo):
    env = {"BATCHGATE_HTTP_PORT": "8100", "BATCHGATE_LOAD_MODEL": "a"}
    s = load_settings(None, {"model_repository": repo, "http_port": None, "load_model": []}, environ=env)
    assert s.http_port == 8100
    assert s.load_model == ("a",)


def test_flag_strings_are_coerced(repo):
    s = load_settings(None, {"model_repository": repo, "http_port": "8500", "warm_up": "false",
                             "exit_timeout_secs": "1.5"}, environ={})
    assert s.http_port == 8500 and s.warm_up is False and s.exit_timeout_secs == 1.5


def test_yaml_keys_may_use_dashes(tmp_path, repo):
    f = write(tmp_path, f"model-repository: {repo}\nmax-queue-size: 7\n")
    assert load_settings(f, environ={}).max_queue_size == 7


def test_real_environment_is_not_read_when_environ_given(monkeypatch, repo):
    monkeypatch.setenv("BATCHGATE_HTTP_PORT", "1234")
    assert load_settings(None, {"model_repository": repo}, environ={}).http_port == 8000


@pytest.mark.parametrize("value", ["1", "true", "Yes", " ON "])
def test_bool_true_spellings(repo, value):
    assert load_settings(None, {"model_repository": repo}, environ={"BATCHGATE_WARM_UP": value}).warm_up is True


# ---------------------------------------------------------------- type errors name the setting
@pytest.mark.parametrize("env,words", [
    ({"BATCHGATE_HTTP_PORT": "eighty"}, ["BATCHGATE_HTTP_PORT", "'http_port'", "integer", "'eighty'"]),
    ({"BATCHGATE_HTTP_PORT": "80.5"}, ["'http_port'", "integer"]),
    ({"BATCHGATE_WARM_UP": "maybe"}, ["BATCHGATE_WARM_UP", "'warm_up'", "true or false"]),
    ({"BATCHGATE_EXIT_TIMEOUT_SECS": "soon"}, ["'exit_timeout_secs'", "number"]),
])
def test_env_type_errors(repo, env, words):
    msg = error(None, {"model_repository": repo}, environ=env)
    for w in words:
        assert w in msg


@pytest.mark.parametrize("yaml_line,words", [
    ("http_port: true", ["'http_port'", "integer"]),
    ("http_port: 80.5", ["'http_port'", "integer"]),
    ("warm_up: 3", ["'warm_up'", "true or false"]),
    ("host: [a, b]", ["'host'", "string"]),
    ("load_model: 5", ["'load_model'", "list of strings"]),
    ("repository_poll_secs: yes", ["'repository_poll_secs'", "number"]),
])
def test_file_type_errors(tmp_path, repo, yaml_line, words):
    f = write(tmp_path, f"model_repository: {repo}\n{yaml_line}\n")
    msg = error(f, environ={})
    assert f in msg  # says which file
    for w in words:
        assert w in msg


def test_flag_type_error_names_the_flag(repo):
    msg = error(None, {"model_repository": repo, "grpc_port": "x"}, environ={})
    assert "--grpc-port" in msg and "'grpc_port'" in msg


def test_integral_float_is_accepted_for_an_int(tmp_path, repo):
    f = write(tmp_path, f"model_repository: {repo}\nhttp_port: 8080.0\n")
    assert load_settings(f, environ={}).http_port == 8080


# ---------------------------------------------------------------- bad values name the setting
@pytest.mark.parametrize("flags,words", [
    ({"http_port": 70000}, ["http_port", "70000"]),
    ({"grpc_port": -1}, ["grpc_port", "-1"]),
    ({"metrics_port": -2}, ["metrics_port", "-2"]),
    ({"model_control_mode": "sometimes"}, ["model_control_mode", "'sometimes'", "explicit"]),
    ({"log_format": "xml"}, ["log_format", "json"]),
    ({"log_level": "verbose"}, ["log_level", "debug"]),
    ({"repository_poll_secs": 0}, ["repository_poll_secs"]),
    ({"exit_timeout_secs": -1}, ["exit_timeout_secs"]),
    ({"max_queue_size": -1}, ["max_queue_size"]),
    ({"default_max_batch_size": -4}, ["default_max_batch_size"]),
    ({"max_request_bytes": 0}, ["max_request_bytes"]),
    ({"infer_threads": -1}, ["infer_threads"]),
])
def test_bad_values(repo, flags, words):
    msg = error(None, {"model_repository": repo, **flags}, environ={})
    for w in words:
        assert w in msg


def test_metrics_port_minus_one_turns_metrics_off(repo):
    assert load_settings(None, {"model_repository": repo, "metrics_port": -1}, environ={}).metrics_port == -1


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
    f = write(tmp_path, f"model_repository: {repo}\nhttp_prot: 8000\n")
    msg = error(f, environ={})
    assert "'http_prot'" in msg and "unknown" in msg and "http_port" in msg


def test_file_must_be_a_mapping(tmp_path):
    f = write(tmp_path, "- a\n- b\n")
    assert "mapping" in error(f, environ={})


def test_file_must_be_valid_yaml(tmp_path):
    f = write(tmp_path, "a: [unclosed\n")
    assert "not valid YAML" in error(f, environ={})


def test_missing_file(tmp_path):
    missing = str(tmp_path / "none.yaml")
    assert missing in error(missing, environ={})


def test_empty_file_means_defaults(tmp_path, repo):
    f = write(tmp_path, "")
    assert load_settings(f, {"model_repository": repo}, environ={}).http_port == 8000


# ---------------------------------------------------------------- load_model and the control mode
def test_load_model_implies_explicit_mode(repo):
    s = load_settings(None, {"model_repository": repo, "load_model": ["a", "b"]}, environ={})
    assert s.model_control_mode == "explicit"
    assert s.load_model == ("a", "b")


def test_load_model_from_env_is_a_comma_list(repo):
    s = load_settings(None, {"model_repository": repo}, environ={"BATCHGATE_LOAD_MODEL": "a, b,,c"})
    assert s.load_model == ("a", "b", "c")
    assert s.model_control_mode == "explicit"


def test_load_model_with_another_mode_is_refused(repo):
    msg = error(None, {"model_repository": repo, "load_model": ["a"], "model_control_mode": "poll"}, environ={})
    assert "load_model" in msg and "explicit" in msg


def test_describe_lists_every_setting_with_its_variable():
    rows = {name: (var, default) for name, var, default in describe()}
    assert rows["http_port"] == ("BATCHGATE_HTTP_PORT", 8000)
    assert rows["max_queue_size"][0] == "BATCHGATE_MAX_QUEUE_SIZE"
    assert set(rows) == set(Settings.__dataclass_fields__)


def test_model_batching_policy_entries_are_checked(tmp_path):
    from batchgate.config import ConfigError, batching_policies, load_settings

    s = load_settings(None, {"model_repository": str(tmp_path), "model_batching_policy": ["m=work_conserving"]},
                      environ={})
    assert batching_policies(s) == {"m": "work_conserving"}
    with pytest.raises(ConfigError) as e:
        load_settings(None, {"model_repository": str(tmp_path), "model_batching_policy": ["m=fastest"]}, environ={})
    assert "model_batching_policy" in str(e.value)


def test_remote_models_from_yaml_mappings_env_lines_and_flags(tmp_path):
    path = write(tmp_path, "remote_models:\n"
                           "  - name: resnet\n"
                           "    upstreams: [10.0.0.5:8001, 'gpu-pool.svc:8001']\n"
                           "    upstream_model: resnet50\n"
                           "    batching: passthrough\n"
                           "    timeout_s: 2.5\n"
                           "  - name=bert upstreams=a:1,b:2 max-inflight=8\n")
    s = load_settings(path, {}, environ={})
    assert s.model_repository == ""  # remote models alone need no repository
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


@pytest.mark.parametrize("entry, words", [
    ("name=a", "needs 'upstreams'"),
    ("upstreams=h:1", "needs 'name'"),
    ("name=a upstreams=h", "must be host:port"),
    ("name=a upstreams=,", "needs at least one upstream"),
    ("name=a upstreams=h:99999", "must be host:port"),
    ("name=a upstreams=h:1 batching=maybe", "batching must be one of gateway, passthrough"),
    ("name=a upstreams=h:1 retries=-1", "'retries' must be a whole number"),
    ("name=a upstreams=h:1 timeout_s=0", "'timeout_s' must be a number > 0"),
    ("name=a upstreams=h:1 colour=blue", "unknown remote model key(s) colour"),
    ("name=a upstreams=h:1 eject_after_failures=0", "eject_after_failures must be at least 1"),
    ("name=a oops upstreams=h:1", "key=value pairs"),
])
def test_remote_model_errors_name_what_is_wrong(repo, entry, words):
    msg = error(None, {"model_repository": repo, "remote_models": [entry]}, environ={})
    assert "--remote-model:" in msg and words in msg


def test_a_remote_model_given_twice_is_refused(repo):
    msg = error(None, {"remote_models": ["name=a upstreams=h:1", "name=a upstreams=h:2"]}, environ={})
    assert "a given more than once" in msg
