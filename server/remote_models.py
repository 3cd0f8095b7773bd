"""Remote models: the ``remote_models`` entries of the settings, parsed and checked.

A remote model is served by other Open Inference Protocol servers (``backends/remote.py``);
its entry is written in YAML as a mapping, or anywhere (flag, environment) as one line of
``key=value`` pairs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .core.batcher_config import MAX_QUEUE_DELAY_US
from .core.errors import ConfigError
from .core.types import MODEL_NAME, MODEL_NAME_RULE, brief, is_host_port

MIN_PROBE_INTERVAL_S = 0.05  # (1e-9 probed the upstreams without pause)

BATCHING_MODES = ("gateway", "passthrough")
FORWARDING_MODES = ("raw", "decoded")
CLIENTS = ("grpcio", "h2")


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
    eject_s: float = 5.0  # first ejection; doubles while probes keep failing, up to 60 s (or eject_s)
    probe_interval_s: float = 1.0  # readiness probe of each upstream (and of ejected ones)
    # raw: a gRPC request the gateway does not batch is forwarded as the caller's bytes | decoded: never
    forwarding: str = "raw"
    # grpcio: calls through grpc.aio's channel | h2: batchgate's own HTTP/2 client (backends/h2_client.py)
    client: str = "h2"
    # TLS to the upstreams (both clients); a CA bundle (default: the system's), a client
    # certificate and key (mTLS), and the name their certificate must carry ("" = the host)
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_server_name: str = ""
    # a file holding a bearer token sent on every upstream call (backends/upstream_tls.py)
    token_file: str = ""
    # (not a setting) front mode: each call says how many client requests it merged, so that the
    # model owner counts requests (core.types.REQUESTS_HEADER)
    tells_requests: bool = dataclasses.field(default=False, metadata={"internal": True})

    @property
    def target(self) -> str:
        return self.upstream_model or self.name

    @property
    def inflight(self) -> int:
        if self.max_inflight:
            return self.max_inflight
        return 2 * len(self.upstreams) if self.batching == "gateway" else 256


REMOTE_FIELDS = {f.name: f for f in dataclasses.fields(RemoteModel) if not f.metadata.get("internal")}
MAX_REMOTE_INT = 10**18 - 1  # a whole-number field has at most 18 digits
# Fields that become int32 fields of the model's config (max_batch_size, instance_group count):
# a larger value passed the settings and failed every load ("Value out of range").
INT32_FIELDS = ("max_batch_size", "max_inflight")
MAX_INT32 = 2**31 - 1


def shown(value: Any) -> str:
    """A setting's value quoted in a ConfigError: bounded in length and nesting, whatever it is."""
    try:
        return brief(value)
    except ValueError:  # repr() of an integer of more than 4,300 digits
        return "a value holding an integer of more than 4,300 digits"


def _upstreams(ups: Any, source: str, model: str) -> tuple[str, ...]:
    """The host:port list of a remote model: a comma-separated string, or a list of strings."""
    if isinstance(ups, str):
        out = tuple(u.strip() for u in ups.split(",") if u.strip())
    elif isinstance(ups, (list, tuple)) and all(isinstance(u, str) for u in ups):
        out = tuple(ups)
    else:
        raise ConfigError(
            f"{source}: remote model '{model}': 'upstreams' must be a list of host:port strings or one "
            f"comma-separated string, not {shown(ups)}"
        )
    if not out:
        raise ConfigError(f"{source}: remote model '{model}' needs at least one upstream host:port")
    for u in out:
        if "://" in u:
            raise ConfigError(
                f"{source}: remote model '{model}': upstream {shown(u)} must be host:port without a scheme "
                "(the upstream's gRPC port; tls: true for TLS)"
            )
        if not is_host_port(u):
            raise ConfigError(
                f"{source}: remote model '{model}': upstream {shown(u)} must be host:port with a port from 1 to 65535"
            )
    seen: set[str] = set()
    for u in out:
        if u in seen:  # (one address's figures are one series: two Upstreams wrote its health gauge in turn)
            raise ConfigError(f"{source}: remote model '{model}': upstream {shown(u)} is listed more than once")
        seen.add(u)
    return out


def parse_remote_model(value: Any, source: str) -> RemoteModel:
    """A RemoteModel from a YAML mapping or a ``key=value ...`` line; the error names what is wrong."""
    pairs: list[tuple[Any, Any]] = []
    if isinstance(value, str):
        for part in value.split():
            key, sep, text = part.partition("=")
            if not sep or not key:
                raise ConfigError(
                    f"{source}: remote model entries are key=value pairs separated by spaces "
                    f"(e.g. 'name=mlp upstreams=host:8001,host2:8001'), not {shown(part)}"
                )
            pairs.append((key, text))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ConfigError(f"{source}: a remote model is a mapping or a 'key=value ...' line, not {shown(value)}")
    items: dict[str, Any] = {}
    for given, text in pairs:  # (a key given twice, or with '-' and '_': the last one was taken silently)
        k = str(given).replace("-", "_")
        if k in items:
            raise ConfigError(f"{source}: remote model key {shown(k)} is given twice")
        items[k] = text
    unknown = sorted(set(items) - set(REMOTE_FIELDS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown remote model key(s) {', '.join(unknown)}; known: {', '.join(REMOTE_FIELDS)}"
        )
    for key in ("name", "upstreams"):
        if not items.get(key):
            raise ConfigError(f"{source}: a remote model needs '{key}'")
    name = items["name"] if isinstance(items["name"], str) else shown(items["name"])  # YAML: name: 7
    if MODEL_NAME.fullmatch(name) is None:
        raise ConfigError(f"{source}: remote model name {shown(name)} is not allowed: {MODEL_NAME_RULE}")
    values: dict[str, Any] = {"name": name, "upstreams": _upstreams(items["upstreams"], source, name)}
    for key, v in items.items():
        if key in values:
            continue
        kind = REMOTE_FIELDS[key].type
        try:
            if kind == "int":
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                v = int(v)
                if not 0 <= v <= MAX_REMOTE_INT:
                    raise ValueError
            elif kind == "bool":
                if isinstance(v, str) and v.lower() in ("true", "false"):
                    v = v.lower() == "true"
                if not isinstance(v, bool):
                    raise ValueError
            elif kind == "float":
                if isinstance(v, bool):
                    raise ValueError
                v = float(v)  # OverflowError for an integer past float's range
                if not math.isfinite(v) or v <= 0:
                    raise ValueError
            elif isinstance(v, (str, int, float)) and not isinstance(v, bool):
                v = str(v)
            else:
                raise TypeError
        except (TypeError, ValueError, OverflowError):
            want = "a whole number >= 0 of at most 18 digits" if kind == "int" else "a number > 0"
            if kind not in ("int", "float"):
                want = "true or false" if kind == "bool" else "a string"
            raise ConfigError(f"{source}: remote model '{name}': '{key}' must be {want}, not {shown(v)}") from None
        values[key] = v
    spec = RemoteModel(**values)
    if spec.batching not in BATCHING_MODES:
        raise ConfigError(
            f"{source}: remote model '{spec.name}': batching must be one of "
            f"{', '.join(BATCHING_MODES)}, not {shown(spec.batching)}"
        )
    if spec.client not in CLIENTS:
        raise ConfigError(
            f"{source}: remote model '{spec.name}': client must be one of "
            f"{', '.join(CLIENTS)}, not {shown(spec.client)}"
        )
    if spec.forwarding not in FORWARDING_MODES:
        raise ConfigError(
            f"{source}: remote model '{spec.name}': forwarding must be one of "
            f"{', '.join(FORWARDING_MODES)}, not {shown(spec.forwarding)}"
        )
    if spec.max_queue_delay_us > MAX_QUEUE_DELAY_US:  # (the batcher's bound, said where it is given)
        raise ConfigError(
            f"{source}: remote model '{spec.name}': max_queue_delay_us must be at most {MAX_QUEUE_DELAY_US} (an hour)"
        )
    for key in INT32_FIELDS:
        if getattr(spec, key) > MAX_INT32:
            raise ConfigError(
                f"{source}: remote model '{spec.name}': '{key}' must be at most {MAX_INT32} "
                f"(an int32 of the model's config), not {getattr(spec, key)}"
            )
    if spec.probe_interval_s < MIN_PROBE_INTERVAL_S:  # (each probe is two calls to every upstream)
        raise ConfigError(
            f"{source}: remote model '{spec.name}': probe_interval_s must be at least {MIN_PROBE_INTERVAL_S}, "
            f"not {spec.probe_interval_s:g}"
        )
    _check_security(spec, source)
    if spec.eject_after_failures < 1:
        raise ConfigError(f"{source}: remote model '{spec.name}': eject_after_failures must be at least 1")
    return spec


_SERVER_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")
TLS_FILE_KEYS = ("tls_ca_file", "tls_cert_file", "tls_key_file")


def _check_security(spec: RemoteModel, source: str) -> None:
    """The TLS keys' combinations (the files themselves are read when the server starts)."""
    where = f"{source}: remote model '{spec.name}'"
    if bool(spec.tls_cert_file) != bool(spec.tls_key_file):
        raise ConfigError(f"{where}: tls_cert_file and tls_key_file go together: give both, or neither")
    given = [k for k in (*TLS_FILE_KEYS, "tls_server_name") if getattr(spec, k)]
    if given and not spec.tls:
        raise ConfigError(f"{where}: {', '.join(given)} need(s) tls: true")
    if spec.tls_server_name and not _SERVER_NAME.fullmatch(spec.tls_server_name):
        raise ConfigError(
            f"{where}: tls_server_name must be a host name (letters, digits, '-', '.'), "
            f"not {shown(spec.tls_server_name)}"
        )
