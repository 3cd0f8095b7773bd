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
    log_format: str = "plain"  # plain | json
    log_level: str = "info"
    gpu_device_id: int = 0


CHOICES = {
    "model_control_mode": ("none", "poll", "explicit"),
    "log_format": ("plain", "json"),
    "batching_policy": ("triton", "work_conserving"),
    "log_level": ("debug", "info", "warning", "error"),
}
FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any, source: str) -> Any:
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
    if not s.model_repository:
        raise ConfigError("model_repository is required (--model-repository DIR)")
    if not os.path.isdir(s.model_repository):
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
    for name in ("max_queue_size", "max_request_bytes", "default_max_batch_size", "inline_execution_max_us"):
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
        values[k] = _coerce(k, v, "--" + k.replace("_", "-"))
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


__all__ = ["ConfigError", "Settings", "load_settings", "describe", "batching_policies"]
