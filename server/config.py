"""The one typed configuration: YAML file, then ``BATCHGATE_*`` environment, then flags.

Settings live in typed sections (``server``, ``repository``, ``limits``, ``batching``) plus the
``remote_models`` list. Every setting name is unique across sections, so outside the YAML file
names stay flat: the environment variable is ``BATCHGATE_`` + the name in upper case and the flag
is ``--`` + the name with dashes, whatever the section. A YAML file nests each key under its
section; the older flat file (every key at the top) is still read, with a DeprecationWarning.
Settings carry their unit in their name; ``ALIASES`` holds other accepted spellings (Triton's
``*_secs``). This is the only module that reads the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

from .config_yaml import load_yaml
from .core.drift_monitors import MonitorSpec, parse_monitors

# The remote_models list's entries and the settings error live in their own modules; both are
# part of this module's interface.
from .core.errors import ConfigError
from .core.routing import RouteSpec, parse_routes
from .cores import parse_workers
from .remote_models import BATCHING_MODES, REMOTE_FIELDS, RemoteModel, parse_remote_model, shown  # noqa: F401
from .settings_sections import (  # the sections are part of this module's interface
    RESERVED_SECTIONS,
    SECTIONS,
    TOP_LEVEL,
    AuthSettings,
    BatchingSettings,
    LimitSettings,
    RepositorySettings,
    RoutingSettings,
    ServerSettings,
    Settings,
    TlsSettings,
)
from .transport.cors import cors_policy

ENV_PREFIX = "BATCHGATE_"


@dataclass(frozen=True)
class Alias:
    """Another accepted spelling of a setting, in YAML (same section), environment and flags."""

    name: str  # the setting it stands for
    deprecated: bool = False  # a former name: accepted with a DeprecationWarning naming the new one


ALIASES: dict[str, Alias] = {  # Triton's names; documented, accepted silently
    "exit_timeout_secs": Alias("exit_timeout_s"),
    "grpc_max_connection_age_secs": Alias("grpc_max_connection_age_s"),
    "repository_poll_secs": Alias("repository_poll_s"),
}


@dataclass(frozen=True)
class Spec:
    """One row of the settings table, from which the flags, the environment and docs are made."""

    name: str
    section: str  # "" = top level (remote_models)
    kind: str  # int | float | bool | str | list | remote_models
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    positive: bool = False
    zero_or_at_least: float | None = None  # 0 (off), or at least this
    why: str = ""
    metavar: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--remote-model" if self.kind == "remote_models" else "--" + self.name.replace("_", "-")

    @property
    def repeatable(self) -> bool:
        return self.kind in ("list", "remote_models")


def _table() -> dict[str, Spec]:
    rows: dict[str, Spec] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            assert f.name not in rows, f"setting {f.name} is in two sections"
            rows[f.name] = Spec(
                f.name,
                section,
                "list" if kind.startswith("tuple") else kind,
                f.default,
                aliases=tuple(a for a, t in ALIASES.items() if t.name == f.name),
                **f.metadata,
            )
    rows["remote_models"] = Spec(
        "remote_models",
        "",
        "remote_models",
        (),
        "a model served by remote V2 servers: 'name=M upstreams=HOST:PORT[,HOST:PORT] "
        "[batching=gateway|passthrough] [key=value ...]' (repeatable; see the README)",
        metavar="SPEC",
    )
    assert not set(ALIASES) & set(rows) and {a.name for a in ALIASES.values()} <= set(rows)
    return rows


SETTINGS: dict[str, Spec] = _table()


def _resolve(key: str, source: str) -> str | None:
    """The setting that ``key`` (a name or an alias) stands for; None if neither."""
    if key in SETTINGS:
        return key
    alias = ALIASES.get(key)
    if alias is None:
        return None
    if alias.deprecated:
        warnings.warn(
            f"{source}: '{key}' is deprecated; its new name is '{alias.name}'", DeprecationWarning, stacklevel=5
        )
    return alias.name


def _claim(seen: dict[str, str], name: str, label: str, source: str) -> None:
    """One source sets each setting once, under one spelling."""
    if name in seen:
        raise ConfigError(f"{source}: {seen[name]} and {label} both set {name}; give only one")
    seen[name] = label


# BATCHGATE_* variables that are not settings (the test and benchmark harnesses' own)
_NOT_SETTINGS = ("BATCHGATE_TEST_", "BATCHGATE_FUZZ", "BATCHGATE_DRIFT_SWEEP", "BATCHGATE_BENCH")


def _unknown_environment(env) -> None:
    """Warn of a BATCHGATE_* variable that names no setting (a misspelt one in a pod spec would
    otherwise go unnoticed), with the nearest setting's variable."""
    known = {ENV_PREFIX + s.upper() for s in [*SETTINGS, *ALIASES]}
    for var in env:
        if var.startswith(ENV_PREFIX) and var not in known and not var.startswith(_NOT_SETTINGS):
            warnings.warn(
                f"environment {var[:64]}: no such setting, ignored{_hint(var, known)}", UserWarning, stacklevel=4
            )


def _hint(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _read_file(file: str) -> dict[str, tuple[str, Any]]:
    """setting -> (spelling, raw value) from a YAML file: sections, or the deprecated flat form."""
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {file}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"config file {file} is not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} "
            f"(offset {e.start}) is not UTF-8; save the file as UTF-8"
        ) from None
    data = load_yaml(text, file) or {}
    src = f"config file {file}"
    if not isinstance(data, dict):
        raise ConfigError(f"{src} must hold a mapping of sections ({', '.join(TOP_LEVEL)})")
    out: dict[str, tuple[str, Any]] = {}
    seen: dict[str, str] = {}
    flat: dict[str, list[str]] = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"{src}: section '{key}' must be a mapping of settings, not {shown(v)}")
            known = [n for n, s in SETTINGS.items() if s.section == key]
            for sk, sv in v.items():
                skey = str(sk).replace("-", "_")
                name = _resolve(skey, src)
                if name is None:
                    raise ConfigError(
                        f"{src}: unknown setting '{sk}' in section '{key}'{_hint(skey, known)}; "
                        f"known: {', '.join(known + [a for n in known for a in SETTINGS[n].aliases])}"
                    )
                if SETTINGS[name].section != key:
                    home = SETTINGS[name].section
                    raise ConfigError(
                        f"{src}: '{sk}' belongs "
                        + (f"in section '{home}'" if home else "at the top level")
                        + f", not in section '{key}'"
                    )
                _claim(seen, name, f"'{key}.{skey}'", src)
                out[name] = (skey, sv)
            continue
        if key in ("routes", "drift"):  # lists of routes and monitors, checked by core/routing.py, core/drift.py
            out[key] = (key, v)
            continue
        if key in RESERVED_SECTIONS:
            raise ConfigError(
                f"{src}: section '{k}' is not available in this version yet; known sections: {', '.join(TOP_LEVEL)}"
            )
        name = _resolve(key, src)
        if name is None:
            raise ConfigError(
                f"{src}: unknown setting '{k}'{_hint(key, [*TOP_LEVEL, *SETTINGS, *ALIASES])}; "
                f"known sections: {', '.join(TOP_LEVEL)}; known settings: {', '.join(SETTINGS)}"
            )
        _claim(seen, name, f"'{key}'", src)
        out[name] = (key, v)
        if SETTINGS[name].section:
            flat.setdefault(SETTINGS[name].section, []).append(key)
    if flat:
        where = "; ".join(f"{section}: {', '.join(keys)}" for section, keys in flat.items())
        warnings.warn(
            f"{src}: settings at the top level of the file are deprecated; move each key into its section ({where})",
            DeprecationWarning,
            stacklevel=4,
        )
    return out


MAX_INT_SETTING = 10**18 - 1  # an integer setting has at most 18 digits (the rest is checked by _validate)


def _coerce(name: str, spelling: str, value: Any, source: str) -> Any:
    kind = SETTINGS[name].kind
    if kind == "remote_models":
        if isinstance(value, str):  # environment: entries separated by ';'
            value = [v for v in value.split(";") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{spelling}' must be a list of remote models, not {shown(value)}")
        return tuple(v if isinstance(v, RemoteModel) else parse_remote_model(v, source) for v in value)
    given = value
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)  # of a float: finite, since is_integer() is False for inf and nan
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)  # OverflowError for an integer past float's range
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
        elif kind == "list":
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif isinstance(value, (list, tuple)):
                # Each entry a scalar: a list inside (YAML aliases nest one in itself cheaply) was
                # written out whole as a name, which took seconds and hundreds of MB at start.
                if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
                    raise ValueError
                value = tuple(str(v) for v in value)
            else:
                raise ValueError
        else:
            if isinstance(value, bool) and {"off", "on"} & set(SETTINGS[name].choices):
                value = "on" if value else "off"  # (YAML 1.1 reads an unquoted off as false)
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            value = str(value)
    except (TypeError, ValueError, OverflowError):
        words = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}
        raise ConfigError(
            f"{source}: '{spelling}' must be {words.get(kind, 'a list of strings')}, not {shown(given)}"
        ) from None
    if kind == "int" and not -MAX_INT_SETTING <= value <= MAX_INT_SETTING:
        raise ConfigError(
            f"{source}: '{spelling}' is out of range: an integer setting has at most 18 digits, not {shown(given)}"
        )
    return value


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")


def _host_like(host: str) -> bool:
    """An address to bind: "" (every address, as the socket API has it), an IP address (an IPv6
    one with a %scope), or a host name (its letters only: it is looked up when the server starts)."""
    if host == "":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        ascii_name = host.encode("idna").decode()  # (a name in another script: as the resolver is asked)
    except UnicodeError:
        return False
    return _HOST_NAME.fullmatch(ascii_name) is not None and not host.replace(".", "").isdigit()


def _validate(s: Settings, given: dict[str, tuple[str, str]], check_repository: bool = True) -> None:
    def what(name: str) -> str:  # the setting as the user wrote it, and where
        return f"{given[name][0]}: {given[name][1]}" if name in given else name

    rs = s.repository
    if check_repository and not rs.model_repository and not s.remote_models:
        raise ConfigError("model_repository is required (--model-repository DIR), unless remote_models are given")
    if check_repository and rs.model_repository and not os.path.isdir(rs.model_repository):
        here = f" (a relative path is taken from the current directory: {os.path.abspath(rs.model_repository)})"
        here = "" if os.path.isabs(rs.model_repository) else here
        raise ConfigError(f"{what('model_repository')} '{rs.model_repository}' is not a directory{here}")
    for port in ("http_port", "grpc_port"):
        v = getattr(s.server, port)
        if not 0 <= v <= 65535:
            raise ConfigError(f"{what(port)} must be between 0 and 65535 (0 picks a free port), not {v}")
    for port in ("metrics_port", "admin_port", "admin_http_port", "health_port"):
        v = getattr(s.server, port)
        if not -1 <= v <= 65535:
            raise ConfigError(f"{what(port)} must be between 0 and 65535, or -1 for none, not {v}")
    for name in ("host", "admin_host"):
        if not _host_like(getattr(s.server, name)):
            raise ConfigError(
                f"{what(name)} must be an IP address or a host name, without brackets or a port (the ports "
                f"have settings of their own), not {getattr(s.server, name)[:64]!r}"
            )
    try:
        parse_workers(s.server.workers)
    except ValueError as e:
        raise ConfigError(f"{what('workers')}: {e}") from None
    t = s.tls
    if bool(t.tls_cert_file) != bool(t.tls_key_file):
        raise ConfigError("tls_cert_file and tls_key_file go together: give both, or neither")
    if t.tls_client_ca_file and not t.tls_cert_file:
        raise ConfigError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
    for name, spec in SETTINGS.items():
        if not spec.section:
            continue
        v = getattr(getattr(s, spec.section), name)
        if spec.choices and v not in spec.choices:
            raise ConfigError(f"{what(name)} must be one of {', '.join(spec.choices)}, not {v!r}")
        if spec.positive and v <= 0:
            raise ConfigError(f"{what(name)} must be greater than 0, not {v}")
        if spec.minimum is not None and v < spec.minimum:
            words = "must not be negative" if spec.minimum == 0 else f"must be at least {spec.minimum}"
            raise ConfigError(f"{what(name)} {words}, not {v}" + (f" ({spec.why})" if spec.why else ""))
        if spec.maximum is not None and v > spec.maximum:
            raise ConfigError(f"{what(name)} must be at most {spec.maximum}, not {v}")
        least = spec.zero_or_at_least
        if least is not None and 0 < v < least:
            why = f" ({spec.why})" if spec.why else ""
            raise ConfigError(f"{what(name)} must be 0 (off) or at least {least:g}, not {v:g}{why}")
    policies = SETTINGS["batching_policy"].choices
    for entry in s.batching.model_batching_policy:
        model, sep, policy = entry.partition("=")
        if not sep or not model or policy not in policies:
            raise ConfigError(
                f"{what('model_batching_policy')} entries are model=policy with policy one of "
                f"{', '.join(policies)}, not {entry!r}"
            )
    names = [m.name for m in s.remote_models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"remote_models: model name(s) {', '.join(twice)} given more than once")
    prefix = s.shared_memory.shm_key_prefix
    if prefix and not re.fullmatch(r"/[A-Za-z0-9_.-]{1,200}", prefix):
        raise ConfigError(
            f"{what('shm_key_prefix')} must be '' (off) or '/' then 1 to 200 letters, digits, '_', '.' or '-' "
            f"(the start of a POSIX shared-memory name), not {prefix[:64]!r}"
        )
    cors_policy(s.server)  # (origins written as a browser would never send them, '*' with credentials)
    source = s.drift_detector.drift_event_source
    if source and not re.fullmatch(r"[\x20-\x7e]{1,1024}", source):  # (each 'format: json' event's ce-source)
        raise ConfigError(
            f"{what('drift_event_source')} must be 1 to 1024 printable ASCII characters (a URI reference, as "
            f"CloudEvents asks; it is a header of each 'format: json' event, which a control character failed), "
            f"not {source[:64]!r}"
        )
    if rs.load_model and rs.model_control_mode != "explicit":
        raise ConfigError("load_model is only used with model_control_mode 'explicit'")


def load_settings(
    file: str | None = None,
    flags: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Merge file < environment < flags over the defaults and validate the result.

    ``flags`` is flat, keyed by setting name or alias (``{"http_port": 0}``); None or an empty
    list leaves a setting alone. Deprecated forms warn with a DeprecationWarning."""
    return _load(file, flags, environ, check_repository=True)[0]


ORIGINS = ("default", "file", "env", "flag", "implied")


def settings_in_effect(
    file: str | None = None, environ: dict[str, str] | None = None
) -> tuple[Settings, dict[str, str]]:
    """What ``batchgate serve --config FILE`` would run with, before any flags, and where each
    setting came from: ``origins`` maps a setting to one of ``ORIGINS`` ('implied':
    model_control_mode turned explicit by load_model). Validated like ``load_settings``, except
    that the model repository need not be given nor exist on this machine."""
    return _load(file, None, environ, check_repository=False)


def _load(
    file: str | None,
    flags: dict[str, Any] | None,
    environ: dict[str, str] | None,
    check_repository: bool,
) -> tuple[Settings, dict[str, str]]:
    values: dict[str, Any] = {}
    given: dict[str, tuple[str, str]] = {}  # setting -> (source, spelling) of the value that won
    origins: dict[str, str] = dict.fromkeys(SETTINGS, "default")

    def put(name: str, spelling: str, raw: Any, source: str) -> None:
        values[name] = _coerce(name, spelling, raw, source)
        given[name] = (source, spelling)
        origins[name] = "file" if source.startswith("config file") else "env" if source.startswith("env") else "flag"

    routes: tuple[RouteSpec, ...] = ()
    monitors: tuple[MonitorSpec, ...] = ()
    if file:
        for name, (spelling, raw) in _read_file(file).items():
            if name == "routes":
                routes = tuple(parse_routes(raw, f"config file {file}: routes"))
                continue
            if name == "drift":
                monitors = tuple(parse_monitors(raw, f"config file {file}: drift"))
                continue
            put(name, spelling, raw, f"config file {file}")
    env = os.environ if environ is None else environ
    _unknown_environment(env)
    seen: dict[str, str] = {}
    for name, spec in SETTINGS.items():
        for spelling in (name, *spec.aliases):
            var = ENV_PREFIX + spelling.upper()
            if var in env:
                _resolve(spelling, f"environment {var}")  # warns if deprecated
                _claim(seen, name, var, "environment")
                put(name, spelling, env[var], f"environment {var}")
    seen = {}
    for k, v in (flags or {}).items():
        setting = _resolve(k, "--" + k.replace("_", "-"))
        if setting is None:
            raise ConfigError(f"unknown setting '{k}'{_hint(k, [*SETTINGS, *ALIASES])}; known: {', '.join(SETTINGS)}")
        if v is None or (isinstance(v, (list, tuple)) and not v):
            continue
        flag = "--remote-model" if setting == "remote_models" else "--" + k.replace("_", "-")
        _claim(seen, setting, flag, "flags")
        put(setting, k, v, flag)
    if values.get("load_model") and "model_control_mode" not in values:
        values["model_control_mode"] = "explicit"
        origins["model_control_mode"] = "implied"
    settings = Settings(
        **{
            section: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
            for section, cls in SECTIONS.items()
        },
        remote_models=values.get("remote_models", ()),
        routes=routes,
        drift=monitors,
    )
    _validate(settings, given, check_repository)
    return settings, origins


def batching_policies(s: Settings) -> dict[str, str]:
    """Model name -> batching policy, from ``model_batching_policy``."""
    return dict(e.split("=", 1) for e in s.batching.model_batching_policy)


def describe() -> list[tuple[str, str, Any]]:
    """(name, environment variable, default) of every setting, for docs and --help; the rest of
    each row (section, help, choices, aliases) is in ``SETTINGS``."""
    return [(spec.name, spec.env, spec.default) for spec in SETTINGS.values()]


__all__ = [
    "ALIASES",
    "Alias",
    "AuthSettings",
    "BatchingSettings",
    "ConfigError",
    "LimitSettings",
    "ORIGINS",
    "RemoteModel",
    "RepositorySettings",
    "RoutingSettings",
    "SECTIONS",
    "SETTINGS",
    "ServerSettings",
    "Settings",
    "Spec",
    "TlsSettings",
    "batching_policies",
    "describe",
    "load_settings",
    "parse_remote_model",
    "settings_in_effect",
]
