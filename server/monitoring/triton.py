"""Triton's own per-model Prometheus families (``nv_inference_*``), so dashboards and alerts
written for Triton read batchgate unchanged (setting ``triton_metrics``).

Every figure comes from the V2 statistics of the model version (``core/stats.py``, read through
the metrics snapshot), so ``/metrics`` and ``/v2/models/<m>/stats`` agree to the nanosecond: a
count is the statistics' count, a ``*_duration_us`` counter is the statistics' nanoseconds over
1000, written as an exact decimal. Labels are ``model`` and ``version`` of the served entries the
statistics list (and ``reason`` on failures), never anything a request names.

Triton's counters carry no ``_total`` suffix, which prometheus_client's exposition would add to
every counter (and which OpenMetrics requires), so these families are written here as Prometheus
text format 0.0.4 by hand, after prometheus_client's text for the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Triton's failure reasons (``reason`` label of nv_inference_request_failure); every model gets
# all four series, as Triton does.
REJECTED, CANCELED, BACKEND, OTHER = "REJECTED", "CANCELED", "BACKEND", "OTHER"
REASONS = (REJECTED, CANCELED, BACKEND, OTHER)
NAMED_REASONS = (REJECTED, CANCELED, BACKEND)  # OTHER is the rest of the statistics' failures

# A failed request's error code -> Triton's reason. REJECTED: refused or timed out before it ran
# (queue full, queue timeout or deadline, model unloading, no upstream in rotation); CANCELED: the
# caller went away; BACKEND: the model (or a remote model's upstream) failed while running it.
# Anything else (INVALID_ARGUMENT, ...) is OTHER.
STATUS_REASONS: dict[str, str] = {
    "RESOURCE_EXHAUSTED": REJECTED,
    "UNAVAILABLE": REJECTED,
    "DEADLINE_EXCEEDED": REJECTED,
    "CANCELLED": CANCELED,
    "INTERNAL": BACKEND,
}

# name, type, help; the order of the exposition (durations are cumulative microseconds)
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("nv_inference_request_success", "counter", "Inference requests that succeeded (a request counts once, any batch)"),
    ("nv_inference_request_failure", "counter", "Inference requests that failed, by reason (a request counts once)"),
    ("nv_inference_count", "counter", "Inferences performed (a batch of n rows counts n)"),
    ("nv_inference_exec_count", "counter", "Model executions (batches) performed"),
    ("nv_inference_request_duration_us", "counter", "Cumulative end-to-end time of successful requests, in us"),
    ("nv_inference_queue_duration_us", "counter", "Cumulative time requests waited in the scheduler queue, in us"),
    ("nv_inference_compute_input_duration_us", "counter", "Cumulative time spent preparing model inputs, in us"),
    ("nv_inference_compute_infer_duration_us", "counter", "Cumulative time spent running the model, in us"),
    ("nv_inference_compute_output_duration_us", "counter", "Cumulative time spent extracting model outputs, in us"),
    ("nv_inference_pending_request_count", "gauge", "Requests admitted and not yet executing, now"),
)
# the statistics' duration behind each *_duration_us family
_DURATIONS = (
    ("nv_inference_request_duration_us", "success"),
    ("nv_inference_queue_duration_us", "queue"),
    ("nv_inference_compute_input_duration_us", "compute_input"),
    ("nv_inference_compute_infer_duration_us", "compute_infer"),
    ("nv_inference_compute_output_duration_us", "compute_output"),
)


def reasons(fail: int, named: Mapping[str, int]) -> tuple[int, int, int, int]:
    """``fail`` (the statistics' failures) split by reason: the named reasons as counted (never
    more, together, than ``fail``), OTHER the rest; the four add up to ``fail`` exactly."""
    left = fail
    out = []
    for r in NAMED_REASONS:
        n = min(named.get(r, 0), left)
        out.append(n)
        left -= n
    return out[0], out[1], out[2], left


def render(
    stats: Mapping[tuple[str, str], Mapping[str, Any]],
    failures: Mapping[tuple[str, str], Mapping[str, int]],
    pending: Mapping[tuple[str, ...], Any],
) -> str:
    """The families as Prometheus text: ``stats`` are V2 statistics entries (``as_dict`` shape) by
    (model, version), ``failures`` the named reasons' counts by the same key, ``pending`` the
    queue depth of the versions that have a queue (routes have none)."""
    lines: dict[str, list[str]] = {name: [] for name, _, _ in FAMILIES}
    for key in sorted(stats):
        st = stats[key]
        model, version = f'model="{_escape(key[0])}"', f'version="{_escape(key[1])}"'
        lv = f"{model},{version}"
        inf = st["inference_stats"]
        lines["nv_inference_request_success"].append(f"{{{lv}}} {int(inf['success']['count'])}")
        split = reasons(int(inf["fail"]["count"]), failures.get(key, {}))
        for reason, n in zip(REASONS, split):  # labels in name order, as Triton writes them
            lines["nv_inference_request_failure"].append(f'{{{model},reason="{reason}",{version}}} {n}')
        lines["nv_inference_count"].append(f"{{{lv}}} {int(st['inference_count'])}")
        lines["nv_inference_exec_count"].append(f"{{{lv}}} {int(st['execution_count'])}")
        for family, phase in _DURATIONS:
            lines[family].append(f"{{{lv}}} {microseconds(int(inf[phase]['ns']))}")
        depth = pending.get(key)
        if depth is not None:
            lines["nv_inference_pending_request_count"].append(f"{{{lv}}} {_number(depth)}")
    out: list[str] = []
    for name, kind, doc in FAMILIES:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        out.extend(f"{name}{sample}\n" for sample in lines[name])
    return "".join(out)


def microseconds(ns: int) -> str:
    """``ns`` / 1000 as an exact decimal (1234567 -> 1234.567, 5000 -> 5)."""
    whole, frac = divmod(ns, 1000)
    return str(whole) if not frac else f"{whole}.{frac:03d}".rstrip("0")


def _number(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
