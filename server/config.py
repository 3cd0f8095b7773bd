"""The one typed configuration: YAML file, then ``BATCHGATE_*`` environment, then flags.

Every setting has one name, used as the YAML key, the environment variable
(``BATCHGATE_`` + upper case) and the flag (``--`` + dashes). Settings carry
their unit in their name. This is the only module that reads the environment.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

ENV_PREFIX = "BATCHGATE_"


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says what is allowed."""


BATCHING_MODES = ("gateway", "passthrough")


@dataclass(frozen=True)
class RemoteModel:
    """A model served by remote Open Inference Protocol servers (Triton, KServe, batchgate...).

    Written in YAML as a mapping, or anywhere as one line of ``key=value`` pairs separated by
    spaces, upstreams by commas: ``name=mlp upstreams=10.0.0.5:8001,10.0.0.6:8001 batching=passthrough``.
    """

    name: str  # the name batchgate serves it under
    upstreams: tuple[str, ...]  # host:port of each upstream's gRPC endpoint
    upstream_model: str = ""  # the model's name on the upstreams; "" = name
    upstream_version: str = ""  # "" = the upstreams' choice (latest)
    batching: str = "gateway"  # gateway: batchgate batches, one call per batch | passthrough
    max_batch_size: int = 0  # gateway: rows per upstream call; 0 = the upstream's own max_batch_size
    max_queue_delay_us: int = 1000  # gateway: Triton's max_queue_delay_microseconds
    max_inflight: int = 0  # upstream calls at once; 0 = 2 per upstream (gateway), 256 (passthrough)
    timeout_s: float = 30.0  # upstream call timeout when the caller set no deadline
    retries: int = 1  # further tries on another upstream, only for a request never delivered
    eject_after_failures: int = 3  # consecutive failures that eject an upstream
    eject_s: float = 5.0  # first ejection; doubles while probes keep failing, up to 60 s
    probe_interval_s: float = 1.0  # readiness probe of each upstream (and of ejected ones)

    @property
    def target(self) -> str:
        return self.upstream_model or self.name

    @property
    def inflight(self) -> int:
        if self.max_inflight:
            return self.max_inflight
        return 2 * len(self.upstreams) if self.batching == "gateway" else 256


REMOTE_FIELDS = {f.name: f for f in dataclasses.fields(RemoteModel)}


def parse_remote_model(value: Any, source: str) -> RemoteModel:
    """A RemoteModel from a YAML mapping or a ``key=value ...`` line; the error names what is wrong."""
    if isinstance(value, str):
        items: dict[str, Any] = {}
        for part in value.split():
            key, sep, v = part.partition("=")
            if not sep or not key:
                raise ConfigError(f"{source}: remote model entries are key=value pairs separated by spaces "
                                  f"(e.g. 'name=mlp upstreams=host:8001,host2:8001'), not {part!r}")
            items[key.replace("-", "_")] = v
    elif isinstance(value, dict):
        items = {str(k).replace("-", "_"): v for k, v in value.items()}
    else:
        raise ConfigError(f"{source}: a remote model is a mapping or a 'key=value ...' line, not {value!r}")
    unknown = sorted(set(items) - set(REMOTE_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown remote model key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(REMOTE_FIELDS)}")
    for key in ("name", "upstreams"):
        if not items.get(key):
            raise ConfigError(f"{source}: a remote model needs '{key}'")
    ups = items["upstreams"]
    ups = tuple(u.strip() for u in ups.split(",") if u.strip()) if isinstance(ups, str) else tuple(str(u) for u in ups)
    if not ups:
        raise ConfigError(f"{source}: remote model '{items['name']}' needs at least one upstream host:port")
    for u in ups:
        host, sep, port = u.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{source}: remote model '{items['name']}': upstream {u!r} must be host:port")
    values: dict[str, Any] = {"upstreams": ups}
    for key, v in items.items():
        if key == "upstreams":
            continue
        kind = REMOTE_FIELDS[key].type
        try:
            if kind == "int":
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                v = int(v)
                if v < 0:
                    raise ValueError
            elif kind == "float":
                if isinstance(v, bool):
                    raise ValueError
                v = float(v)
                if not math.isfinite(v) or v <= 0:
                    raise ValueError
            else:
                v = str(v)
        except (TypeError, ValueError):
            want = "a whole number >= 0" if kind == "int" else "a number > 0"
            raise ConfigError(f"{source}: remote model '{items['name']}': '{key}' must be {want}, not {v!r}") from None
        values[key] = v
    spec = RemoteModel(**values)
    if spec.batching not in BATCHING_MODES:
        raise ConfigError(f"{source}: remote model '{spec.name}': batching must be one of "
                          f"{', '.join(BATCHING_MODES)}, not {spec.batching!r}")
    if spec.eject_after_failures < 1:
        raise ConfigError(f"{source}: remote model '{spec.name}': eject_after_failures must be at least 1")
    return spec


@dataclass(frozen=True)
class Settings:
    model_repository: str = ""
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002  # -1 turns the metrics endpoint off
    model_control_mode: str = "none"  # none | poll | explicit
    repository_poll_secs: float = 15.0
    load_model: tuple[str, ...] = ()  # explicit mode: models to load at start ("*" = all)
    default_max_batch_size: int = 4  # for configs completed from a model whose first dim is dynamic
    max_queue_size: int = 4096  # per model version, unless its config sets one
    max_request_bytes: int = 64 * 1024 * 1024  # HTTP body (after decompression) and gRPC message
    infer_threads: int = 0  # worker threads that run models; 0 = one per CPU, at least 4
    batching_policy: str = "triton"  # models with dynamic_batching: triton | work_conserving
    model_batching_policy: tuple[str, ...] = ()  # per-model choice, "model=policy" entries
    inline_execution_max_us: int = 50  # executions measured faster than this run on the event loop; 0 = never
    warm_up: bool = True
    exit_timeout_secs: float = 30.0  # grace period for in-flight work on SIGTERM
    grpc_max_connection_age_secs: float = 0.0  # close gRPC connections this old (clients reconnect); 0 = never
    log_format: str = "plain"  # plain | json
    log_level: str = "info"
    gpu_device_id: int = 0
    remote_models: tuple[RemoteModel, ...] = ()  # models served by remote V2 servers (see RemoteModel)


CHOICES = {
    "model_control_mode": ("none", "poll", "explicit"),
    "log_format": ("plain", "json"),
    "batching_policy": ("triton", "work_conserving"),
    "log_level": ("debug", "info", "warning", "error"),
}
FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any, source: str) -> Any:
    if name == "remote_models":
        if isinstance(value, str):  # environment: entries separated by ';'
            value = [v for v in value.split(";") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: 'remote_models' must be a list of remote models, not {value!r}")
        return tuple(v if isinstance(v, RemoteModel) else parse_remote_model(v, source) for v in value)
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
        elif kind == "bool":
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("1", "true", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif kind.startswith("tuple"):
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif isinstance(value, (list, tuple)):
                value = tuple(str(v) for v in value)
            else:
                raise ValueError
        else:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{name}' must be {_kind_words(kind)}, not {value!r}") from None
    return value


def _kind_words(kind: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string"}.get(kind, "a list of strings")


def _validate(s: Settings) -> None:
    if not s.model_repository and not s.remote_models:
        raise ConfigError("model_repository is required (--model-repository DIR), unless remote_models are given")
    if s.model_repository and not os.path.isdir(s.model_repository):
        raise ConfigError(f"model_repository '{s.model_repository}' is not a directory")
    for port in ("http_port", "grpc_port"):
        v = getattr(s, port)
        if not 0 <= v <= 65535:
            raise ConfigError(f"{port} must be between 0 and 65535 (0 picks a free port), not {v}")
    if not -1 <= s.metrics_port <= 65535:
        raise ConfigError(f"metrics_port must be between 0 and 65535, or -1 for none, not {s.metrics_port}")
    for name, allowed in CHOICES.items():
        if getattr(s, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {getattr(s, name)!r}")
    for name in ("repository_poll_secs", "exit_timeout_secs"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name} must be greater than 0, not {getattr(s, name)}")
    for name in ("max_queue_size", "max_request_bytes", "default_max_batch_size", "inline_execution_max_us",
                 "grpc_max_connection_age_secs"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name} must not be negative, not {getattr(s, name)}")
    if s.max_request_bytes == 0:
        raise ConfigError("max_request_bytes must be greater than 0")
    if s.infer_threads < 0:
        raise ConfigError(f"infer_threads must be 0 (automatic) or more, not {s.infer_threads}")
    for entry in s.model_batching_policy:
        model, sep, policy = entry.partition("=")
        if not sep or not model or policy not in CHOICES["batching_policy"]:
            raise ConfigError(f"model_batching_policy entries are model=policy with policy one of "
                              f"{', '.join(CHOICES['batching_policy'])}, not {entry!r}")
    names = [m.name for m in s.remote_models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"remote_models: model name(s) {', '.join(twice)} given more than once")
    if s.load_model and s.model_control_mode != "explicit":
        raise ConfigError("load_model is only used with model_control_mode 'explicit'")


def load_settings(
    file: str | None = None,
    flags: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Merge file < environment < flags over the defaults and validate the result."""
    values: dict[str, Any] = {}
    if file:
        try:
            with open(file, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {file}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {file} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file} must hold a mapping of settings")
        for k, v in data.items():
            key = str(k).replace("-", "_")
            if key not in FIELDS:
                raise ConfigError(f"config file {file}: unknown setting '{k}'; known: {', '.join(FIELDS)}")
            values[key] = _coerce(key, v, f"config file {file}")
    env = os.environ if environ is None else environ
    for key in FIELDS:
        var = ENV_PREFIX + key.upper()
        if var in env:
            values[key] = _coerce(key, env[var], f"environment {var}")
    for k, v in (flags or {}).items():
        if k not in FIELDS:
            raise ConfigError(f"unknown setting '{k}'; known: {', '.join(FIELDS)}")
        if v is None or (isinstance(v, (list, tuple)) and not v):
            continue
        values[k] = _coerce(k, v, "--remote-model" if k == "remote_models" else "--" + k.replace("_", "-"))
    if "load_model" in values and values["load_model"] and "model_control_mode" not in values:
        values["model_control_mode"] = "explicit"
    settings = Settings(**values)
    _validate(settings)
    return settings


def batching_policies(s: Settings) -> dict[str, str]:
    """Model name -> batching policy, from ``model_batching_policy``."""
    return dict(e.split("=", 1) for e in s.model_batching_policy)


def describe() -> list[tuple[str, str, Any]]:
    """(name, environment variable, default) of every setting, for docs and --help."""
    return [(f.name, ENV_PREFIX + f.name.upper(), f.default) for f in dataclasses.fields(Settings)]


__all__ = ["ConfigError", "RemoteModel", "Settings", "load_settings", "describe", "batching_policies",
           "parse_remote_model"]
