"""The ``drift`` section: each monitor read from its YAML mapping into a checked
:class:`MonitorSpec` (pure); a :class:`ConfigError` names the monitor, the field and what is
wrong. Profiles, which a monitor names, are ``core/drift.py``'s."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .routing import _mapping, _name, _number, _shown, _unique

TESTS = ("psi", "ks", "chi2", "adwin")
ADWIN_CHUNK = 32  # rows a value fed to ADWIN (their mean: core/drift_window.py)
CORRECTIONS = ("bonferroni", "bh")
WEBHOOK_FORMATS = ("cloudevents", "json")


# ---------------------------------------------------------------------------------- monitors
@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "cloudevents"
    timeout_s: float = 5.0
    retries: int = 5


@dataclass(frozen=True)
class MonitorSpec:
    model: str  # a model or a route
    inputs: tuple[str, ...]
    reference: str  # profile file
    sample_rate: float = 0.1
    max_rows_per_sample: int = 64
    window_samples: int = 2000  # rows
    window_max_s: float = 300.0
    min_window_samples: int = 100  # a window closed by time with fewer rows is not scored
    tests: tuple[str, ...] = ("psi", "ks", "chi2", "adwin")
    alpha: float = 0.01
    correction: str = "bonferroni"
    psi_threshold: float = 0.2
    adwin_delta: float = 0.0  # 0 = alpha / features
    min_drifted_features: int = 1
    min_drifted_share: float = 0.0  # > 0 replaces min_drifted_features
    debounce_windows: int = 2
    outputs: bool = False
    missing_rate_margin: float = 0.1  # alarmed above the reference's missing rate plus this
    out_of_range_margin: float = 0.1  # of the reference range beyond min/max
    out_of_range_max: float = 0.01  # share of a window out of range that is alarmed
    unseen_max: float = 0.05  # share of unseen categories above the reference's other bucket
    webhook: Webhook | None = None
    definition: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


_MONITOR_FIELDS = {
    "model",
    "inputs",
    "reference",
    "sample_rate",
    "max_rows_per_sample",
    "window",
    "tests",
    "alpha",
    "correction",
    "psi_threshold",
    "adwin_delta",
    "min_drifted_features",
    "min_drifted_share",
    "debounce_windows",
    "outputs",
    "missing_rate_margin",
    "out_of_range_margin",
    "out_of_range_max",
    "unseen_max",
    "webhook",
}


def parse_monitors(raw: Any, source: str = "drift") -> list[MonitorSpec]:
    """The ``drift`` section (a list of monitor mappings), checked; a :class:`ConfigError` names
    the monitor, the field and what is wrong."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: must be a list of monitors, each with model, inputs and reference")
    out = [_parse_monitor(m, f"{source}[{i}]") for i, m in enumerate(raw)]
    _unique([m.model for m in out], f"{source}: monitored model")
    return out


def _whole(raw: Any, where: str, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise ConfigError(f"{where}: must be a whole number from {low} to {high}, not {_shown(raw)}")
    return raw


def _parse_monitor(raw: Any, where: str) -> MonitorSpec:
    m = _mapping(raw, where, _MONITOR_FIELDS)
    model = _name(m.get("model"), f"{where}.model")
    where = f"{where} (model '{model}')"
    inputs = m.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise ConfigError(f"{where}: 'inputs' must list the model's 2-D input tensors to watch")
    names = tuple(_name(i, f"{where}.inputs") for i in inputs)
    _unique(list(names), f"{where}: input")
    reference = m.get("reference")
    if not isinstance(reference, str) or not reference or len(reference) > 4096 or "\0" in reference:
        raise ConfigError(f"{where}: 'reference' must be the path of a profile file (batchgate drift profile)")
    window = _mapping(m.get("window") or {}, f"{where}.window", {"samples", "max_s", "min_samples"})
    tests = m.get("tests", list(MonitorSpec.tests))
    if not isinstance(tests, list) or not tests or any(t not in TESTS for t in tests):
        raise ConfigError(f"{where}: 'tests' must list some of {', '.join(TESTS)}, not {_shown(tests)}")
    correction = m.get("correction", "bonferroni")
    if correction not in CORRECTIONS:
        raise ConfigError(f"{where}: 'correction' must be one of {', '.join(CORRECTIONS)}, not {_shown(correction)}")
    outputs = m.get("outputs", False)
    if not isinstance(outputs, bool):
        raise ConfigError(f"{where}: 'outputs' must be true or false")
    samples = _whole(window.get("samples", 2000), f"{where}.window.samples", 10, 1_000_000)
    if samples < ADWIN_CHUNK and "adwin" in tests:  # (it never ran: a window gave it no value)
        if "tests" in m:
            raise ConfigError(
                f"{where}: 'adwin' takes one value per {ADWIN_CHUNK} rows, so window.samples must be at least "
                f"{ADWIN_CHUNK} for it, not {samples}"
            )
        tests = [t for t in tests if t != "adwin"]
    return MonitorSpec(
        model=model,
        inputs=names,
        reference=reference,
        sample_rate=_number(m.get("sample_rate", 0.1), f"{where}.sample_rate", 0, 1),
        max_rows_per_sample=_whole(m.get("max_rows_per_sample", 64), f"{where}.max_rows_per_sample", 1, 65536),
        window_samples=samples,
        window_max_s=_number(window.get("max_s", 300), f"{where}.window.max_s", 0.1, 7 * 86400),
        min_window_samples=_whole(
            window.get("min_samples", min(100, samples)), f"{where}.window.min_samples", 1, samples
        ),
        tests=tuple(dict.fromkeys(tests)),
        alpha=_number(m.get("alpha", 0.01), f"{where}.alpha", 1e-12, 0.5),
        correction=str(correction),
        psi_threshold=_number(m.get("psi_threshold", 0.2), f"{where}.psi_threshold", 0, 100),
        adwin_delta=_number(m.get("adwin_delta", 0.0), f"{where}.adwin_delta", 0, 0.5),
        min_drifted_features=_whole(m.get("min_drifted_features", 1), f"{where}.min_drifted_features", 1, 1_000_000),
        min_drifted_share=_number(m.get("min_drifted_share", 0.0), f"{where}.min_drifted_share", 0, 1),
        debounce_windows=_whole(m.get("debounce_windows", 2), f"{where}.debounce_windows", 1, 1000),
        outputs=outputs,
        missing_rate_margin=_number(m.get("missing_rate_margin", 0.1), f"{where}.missing_rate_margin", 0, 1),
        out_of_range_margin=_number(m.get("out_of_range_margin", 0.1), f"{where}.out_of_range_margin", 0, 100),
        out_of_range_max=_number(m.get("out_of_range_max", 0.01), f"{where}.out_of_range_max", 0, 1),
        unseen_max=_number(m.get("unseen_max", 0.05), f"{where}.unseen_max", 0, 1),
        webhook=_parse_webhook(m["webhook"], f"{where}.webhook") if m.get("webhook") is not None else None,
        definition=dict(m),
    )


def _parse_webhook(raw: Any, where: str) -> Webhook:
    w = _mapping(raw, where, {"url", "format", "timeout_s", "retries"})
    url = w.get("url")
    if (
        not isinstance(url, str)
        or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", url)
        or len(url) > 2048
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url)
    ):
        raise ConfigError(f"{where}: 'url' must be an http:// or https:// URL, not {_shown(url)}")
    _check_url_host(url, where)
    fmt = w.get("format", "cloudevents")
    if fmt not in WEBHOOK_FORMATS:
        raise ConfigError(f"{where}: 'format' must be one of {', '.join(WEBHOOK_FORMATS)}, not {_shown(fmt)}")
    return Webhook(
        url=url,
        format=str(fmt),
        timeout_s=_number(w.get("timeout_s", 5), f"{where}.timeout_s", 0.05, 300),
        retries=_whole(w.get("retries", 5), f"{where}.retries", 0, 100),
    )


def _check_url_host(url: str, where: str) -> None:
    """A webhook URL every delivery would fail on is refused at start (until 2026-12-06 it was
    taken, and each event went to the dead letter for ever): credentials before the host (urllib
    takes ``user:pw@host`` for a host name, and the URL is kept in the dead letter),
    no host, or a port that is not one."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ConfigError(f"{where}: 'url' must not hold credentials (user:password@host): they are never sent")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or port == 0:
        raise ConfigError(f"{where}: 'url' needs a host and, if any, a port from 1 to 65535, not {_shown(url)}")
