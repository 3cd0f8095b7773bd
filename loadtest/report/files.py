"""The report's files: JSON (histograms included), CSV, HdrHistogram interval logs and percentile
distributions, and ``write_all``, which writes every file and plot at once."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from ..jsonsafe import json_safe
from ..results import Run, Step, Window, decode, percentiles_ms
from .plots import plot_spectrum, plot_sweep, plot_timeline
from .text import _mode, _offered, table

log = logging.getLogger(__package__)

HISTS = ("corrected", "uncorrected", "lag")

CSV_COLUMNS = (
    "label",
    "mode",
    "target_rate",
    "concurrency",
    "seconds",
    "sent",
    "ok",
    "errors",
    "error_rate",
    "sent_rate",
    "throughput",
    "corrected_p50_ms",
    "corrected_p90_ms",
    "corrected_p99_ms",
    "corrected_p999_ms",
    "corrected_max_ms",
    "corrected_mean_ms",
    "uncorrected_p50_ms",
    "uncorrected_p99_ms",
    "uncorrected_max_ms",
    "lag_p99_ms",
    "generator_cores",
    "samples",
    "late",
    "overflow",
    "valid",
    "stable",
    "slo_met",
    "errors_by_code",
    "problems",
)

FORMAT = "batchgate-loadtest"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# 3. JSON: the machine-readable record, histograms included


def _blob(h) -> str:
    return h.encode().decode("ascii")


def to_dict(run: Run) -> dict[str, Any]:
    """The JSON document for a run (already cleaned of NaN)."""
    steps = []
    for s in run.steps:
        windows = [
            {**w.summary(), "cpu_s": w.cpu_s, "histograms": {k: _blob(getattr(w, k)) for k in HISTS}} for w in s.windows
        ]
        steps.append({**s.summary(), "histograms": {k: _blob(s.hist(k)) for k in HISTS}, "windows": windows})
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "units": {
            "latency": "ms in summaries; histograms are base64 HdrHistogram V2 blobs in integer us",
            "rates": "requests per second",
            "times": "seconds from the step's measurement start",
        },
        "scenario": run.scenario,
        "environment": run.environment,
        "sweep": run.sweep,
        "verdict": {
            "valid": run.valid,
            "slo_met": run.slo_met,
            "best": (run.sweep or {}).get("best"),
            "interrupted": run.interrupted,
        },
        "steps": steps,
    }
    return json_safe(doc)


def write_json(run: Run, path) -> str:
    """Write ``to_dict(run)`` to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_dict(run), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return str(path)


def read_json(path) -> Run:
    """Rebuild a ``Run`` from a file written by ``write_json`` (to re-render or compare it)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    steps: list[Step] = []
    for sd in doc.get("steps", []):
        windows: list[Window] = []
        for wd in sd.get("windows", []):
            hists = wd.get("histograms", {})
            seconds = max(1e-9, (wd.get("end_s") or 0.0) - (wd.get("start_s") or 0.0))
            cpu_s = wd.get("cpu_s")
            if cpu_s is None:
                cpu_s = (wd.get("generator_cores") or 0.0) * seconds
            windows.append(
                Window(
                    index=wd.get("index", len(windows)),
                    start_s=wd.get("start_s", 0.0),
                    end_s=wd.get("end_s", 0.0),
                    phase=wd.get("phase", "measure"),
                    target_rate=wd.get("target_rate"),
                    sent=wd.get("sent", 0),
                    ok=wd.get("ok", 0),
                    errors=dict(wd.get("errors") or {}),
                    late=wd.get("late", 0),
                    corrected=decode(hists.get("corrected", "")),
                    uncorrected=decode(hists.get("uncorrected", "")),
                    lag=decode(hists.get("lag", "")),
                    cpu_s=cpu_s,
                    overflow=wd.get("overflow", 0),
                    server=dict(wd.get("server") or {}),
                )
            )
        steps.append(
            Step(
                label=sd.get("label", f"step{len(steps)}"),
                mode=sd.get("mode", "open"),
                target_rate=sd.get("target_rate"),
                concurrency=sd.get("concurrency"),
                windows=windows,
                valid=sd.get("valid", True),
                problems=list(sd.get("problems") or []),
                stable=sd.get("stable"),
                stability=dict(sd.get("stability") or {}),
                slo_met=sd.get("slo_met"),
                slo_problems=list(sd.get("slo_problems") or []),
                server=dict(sd.get("server") or {}),
            )
        )
    return Run(
        scenario=doc.get("scenario") or {},
        environment=doc.get("environment") or {},
        steps=steps,
        sweep=doc.get("sweep") or {},
        interrupted=(doc.get("verdict") or {}).get("interrupted"),
    )


# --------------------------------------------------------------------------------------------
# 4. CSV: one row per step


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        text = f"{v:.6f}".rstrip("0").rstrip(".")
        return "0" if text in ("", "-0") else text
    return str(v)


def csv_rows(run: Run) -> list[dict[str, str]]:
    rows = []
    for s in run.steps:
        t = s.totals()
        c = percentiles_ms(s.hist("corrected"))
        u = percentiles_ms(s.hist("uncorrected"), (50.0, 99.0))
        lag = percentiles_ms(s.hist("lag"), (99.0,))
        row = {
            "label": s.label,
            "mode": s.mode,
            "target_rate": s.target_rate,
            "concurrency": s.concurrency,
            "seconds": t["seconds"],
            "sent": t["sent"],
            "ok": t["ok"],
            "errors": sum(t["errors"].values()),
            "error_rate": t["error_rate"],
            "sent_rate": t["sent_rate"],
            "throughput": t["throughput"],
            "corrected_p50_ms": c["p50"],
            "corrected_p90_ms": c["p90"],
            "corrected_p99_ms": c["p99"],
            "corrected_p999_ms": c["p999"],
            "corrected_max_ms": c["max"],
            "corrected_mean_ms": c["mean"],
            "uncorrected_p50_ms": u["p50"],
            "uncorrected_p99_ms": u["p99"],
            "uncorrected_max_ms": u["max"],
            "lag_p99_ms": lag["p99"],
            "generator_cores": t["generator_cores"],
            "samples": s.hist("corrected").get_total_count(),
            "late": t["late"],
            "overflow": t["overflow"],
            "valid": s.valid,
            "stable": s.stable,
            "slo_met": s.slo_met,
            "errors_by_code": ";".join(f"{k}:{v}" for k, v in sorted(t["errors"].items(), key=lambda kv: str(kv[0]))),
            "problems": "; ".join(list(s.problems) + list(s.slo_problems)),
        }
        rows.append({k: _csv_cell(row[k]) for k in CSV_COLUMNS})
    return rows


def write_csv(run: Run, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(csv_rows(run))
    return str(path)


# --------------------------------------------------------------------------------------------
# 5. HdrHistogram interval logs and percentile distributions


def _slug(label: str, index: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("._")
    return slug or f"step{index}"


def _step_paths(run: Run, path_prefix) -> list[str]:
    """A file stem per step, unique even when labels collapse to the same slug."""
    prefix = str(path_prefix)
    if prefix and not prefix.endswith(("/", "\\", "-", "_", ".")):
        prefix += "-"
    seen: dict[str, int] = {}
    out = []
    for i, s in enumerate(run.steps):
        slug = _slug(s.label, i)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.append(prefix + (slug if n == 0 else f"{slug}-{n + 1}"))
    return out


def write_intervals(run: Run, path_prefix) -> list[str]:
    """Per step: ``<prefix><label>.hlog`` holding the corrected histogram of every measurement
    window (timestamps in seconds from the step's measurement start, interval max in ms), and
    ``<prefix><label>.hgrm`` / ``<prefix><label>.uncorrected.hgrm`` with the percentile
    distribution of the step's merged histograms in ms. Returns the paths written."""
    from hdrh.log import HistogramLogWriter

    written: list[str] = []
    for s, stem in zip(run.steps, _step_paths(run, path_prefix)):
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        measured = sorted(s.measured(), key=lambda w: w.start_s)
        # The log format (and hdrh's reader) only takes non-negative timestamps: shift if needed.
        shift = -min((w.start_s for w in measured), default=0.0)
        shift = max(0.0, shift)
        hlog = stem + ".hlog"
        with open(hlog, "w", encoding="utf-8") as f:
            writer = HistogramLogWriter(f)
            writer.output_log_format_version()
            writer.output_comment(f"[batchgate loadtest step {s.label}: {_mode(s)}, {_offered(s)}]")
            writer.output_comment(
                "[corrected latency (answer minus intended send time), values in us; "
                "StartTimestamp and Interval_Length in s from the measurement start"
                + (f" plus {shift:g}" if shift else "")
                + "; Interval_Max in whole ms]"
            )
            writer.output_legend()
            for w in measured:
                start = w.start_s + shift
                end = max(w.end_s + shift, start)
                # the writer takes a zero start as "use the histogram's own timestamp", so pass a
                # start too small to show in the log's 6 decimals instead of an exact 0
                writer.output_interval_histogram(w.corrected, start or 1e-9, end or 1e-9, max_value_unit_ratio=1000.0)
        written.append(hlog)
        for which, suffix in (("corrected", ".hgrm"), ("uncorrected", ".uncorrected.hgrm")):
            path = stem + suffix
            with open(path, "wb") as f:
                f.write(_hgrm_ms(s.hist(which)))
            written.append(path)
    return written


def _hgrm_ms(h) -> bytes:
    """``h``'s percentile distribution in ms. hdrh scales every figure of its footer but the
    standard deviation, which it writes in µs beside a mean in ms: that one is put right."""
    out = io.BytesIO()
    h.output_percentile_distribution(out, 1000.0)
    digits = h.significant_figures
    return re.sub(
        rb"(StdDeviation   = )( *[0-9.]+)",
        lambda m: m.group(1) + b"%12.*f" % (digits, h.get_stddev() / 1000.0),
        out.getvalue(),
        count=1,
    )


# --------------------------------------------------------------------------------------------
# everything at once


REPORT_FILES = ("summary.txt", "results.json", "results.csv", "timeline.png", "sweep.png", "spectrum.png")


def write_all(run: Run, out_dir) -> dict[str, str]:
    """Write the text table, JSON, CSV, interval logs and plots into ``out_dir``.

    Returns {kind: path}; per-step files are keyed ``hlog:<label>``, ``hgrm:<label>`` and
    ``hgrm_uncorrected:<label>``. Plots are skipped (with a warning) if matplotlib is missing;
    the sweep plot is skipped for a single-step run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A folder used before (the default one, say) keeps nothing of the last run that this one
    # would not write again: no old sweep plot or step logs beside the new results.
    for old in [*out.glob("step-*.hlog"), *out.glob("step-*.hgrm")]:
        old.unlink(missing_ok=True)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    paths: dict[str, str] = {}
    summary = out / "summary.txt"
    summary.write_text(table(run), encoding="utf-8")
    paths["table"] = str(summary)
    paths["json"] = write_json(run, out / "results.json")
    paths["csv"] = write_csv(run, out / "results.csv")
    files = write_intervals(run, out / "step-")
    for s, i in zip(run.steps, range(0, len(files), 3)):
        paths[f"hlog:{s.label}"] = files[i]
        paths[f"hgrm:{s.label}"] = files[i + 1]
        paths[f"hgrm_uncorrected:{s.label}"] = files[i + 2]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: skipping the plots")
        return paths
    paths["timeline"] = plot_timeline(run, out / "timeline.png")
    if len(run.steps) > 1:
        paths["sweep"] = plot_sweep(run, out / "sweep.png")
    paths["spectrum"] = plot_spectrum(run, out / "spectrum.png")
    return paths
