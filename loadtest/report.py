"""Reports for a load-test ``Run``: the terminal table, a live line per window, files and plots.

Everything here is pure: it reads a ``Run`` (see ``results.py``) and writes text, JSON, CSV,
HdrHistogram interval logs (``.hlog``), percentile distributions (``.hgrm``) and PNG plots.

Conventions kept throughout:

- the headline latency is the *corrected* one (from the intended send time, so coordinated
  omission is included); the *uncorrected* one (from the actual send) is always shown next to
  it, never instead of it;
- percentiles always come from merged histograms, never from averaging window percentiles;
- every percentile is printed with how many samples lie above it, so thin tails are visible;
- missing data (an empty histogram, a step without windows, no successes) prints as ``-`` and
  plots as a gap: nothing here raises on it.

matplotlib is imported only by the plotting functions (it is an optional dependency), and only
its object-oriented API with the Agg canvas is used: no pyplot, no global backend switch.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import textwrap
from pathlib import Path
from typing import Any

from .results import PERCENTILES, Run, Step, Window, above, decode, percentiles_ms

log = logging.getLogger(__name__)

HISTS = ("corrected", "uncorrected", "lag")

LEGEND = ("corrected = answer time minus the *intended* (scheduled) send time: what a user arriving "
          "on schedule waits, coordinated omission included. uncorrected = answer time minus the "
          "actual send time (what most tools report). Percentiles come from merged histograms; "
          "'N of M' = samples above that percentile, of all samples.")

CSV_COLUMNS = (
    "label", "mode", "target_rate", "concurrency", "seconds", "sent", "ok", "errors", "error_rate",
    "sent_rate", "throughput",
    "corrected_p50_ms", "corrected_p90_ms", "corrected_p99_ms", "corrected_p999_ms",
    "corrected_max_ms", "corrected_mean_ms",
    "uncorrected_p50_ms", "uncorrected_p99_ms", "uncorrected_max_ms",
    "lag_p99_ms", "generator_cores", "samples", "late", "overflow",
    "valid", "stable", "slo_met", "errors_by_code", "problems",
)

FORMAT = "batchgate-loadtest"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# small formatting helpers (ASCII only, so any terminal or log collector shows them)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ms(v: float | None) -> str:
    """A latency in ms, with precision that suits its size."""
    if not _finite(v):
        return "-"
    if v < 1:
        return f"{v:.3f}"
    if v < 10:
        return f"{v:.2f}"
    if v < 1000:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def _rate(v: float | None) -> str:
    if not _finite(v):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if _finite(v):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, float):
        return "-"
    text = str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _secs(v: float) -> str:
    return f"{v:g}" if float(v).is_integer() else f"{v:.1f}"


def _pct(p: float) -> str:
    return f"p{p:g}"


def _code(k: Any) -> str:
    """gRPC codes print as their names; bare numbers are HTTP statuses."""
    text = str(k)
    return f"HTTP {text}" if text.isdigit() else text


def _errors_text(errors: dict[str, int], limit: int | None = None) -> str:
    items = sorted(((k, v) for k, v in errors.items() if v), key=lambda kv: (-kv[1], str(kv[0])))
    shown = items if limit is None else items[:limit]
    text = ", ".join(f"{_code(k)} {v:,}" for k, v in shown)
    if limit is not None and len(items) > limit:
        text += ", ..."
    return text


def _mode(step: Step) -> str:
    return "closed loop" if step.mode == "closed" else "open loop"


def _offered(step: Step) -> str:
    if step.mode == "closed":
        return f"concurrency {step.concurrency}" if step.concurrency is not None else "concurrency -"
    return f"{_rate(step.target_rate)} req/s" if step.target_rate is not None else "- req/s"


def _validity(step: Step, short: bool = False) -> str:
    if step.valid:
        return "VALID"
    if short or not step.problems:
        return "INVALID"
    return "INVALID: " + "; ".join(step.problems)


def _stability(step: Step) -> str:
    return {True: "stable", False: "unstable"}.get(step.stable, "n/a")


def _slo_word(v: bool | None) -> str:
    return {True: "met", False: "missed"}.get(v, "n/a")


def _grid(rows: list[list[str]], left: set[int] = frozenset({0}), indent: str = "") -> list[str]:
    """Align rows of cells into columns (left-aligned where asked, right-aligned otherwise)."""
    if not rows:
        return []
    ncol = max(len(r) for r in rows)
    rows = [r + [""] * (ncol - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]
    out = []
    for r in rows:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def _slo(run: Run) -> dict[str, Any]:
    slo = (run.sweep or {}).get("slo")
    if isinstance(slo, dict):
        return slo
    sc = run.scenario or {}
    if sc.get("slo_p99_ms") is None and sc.get("error_budget") is None:
        return {}
    from .scenario import DEFAULT_ERROR_BUDGET

    budget = sc.get("error_budget")
    return {"p99_ms": sc.get("slo_p99_ms"), "error_budget": DEFAULT_ERROR_BUDGET if budget is None else budget}


def _best(run: Run) -> Step | None:
    label = (run.sweep or {}).get("best")
    if label is None:
        return None
    return next((s for s in run.steps if s.label == label), None)


def _name(run: Run) -> str:
    scenario = run.scenario or {}
    return str(scenario.get("name") or scenario.get("scenario") or "load test")


# --------------------------------------------------------------------------------------------
# 1. the final terminal table


def table(run: Run) -> str:
    """The end-of-run report: an overview row per step, then a detail block per step."""
    lines: list[str] = []
    slo = _slo(run)
    head = f"batchgate loadtest: {_name(run)}"
    extras = [f"{k} {run.scenario[k]}" for k in ("transport", "model") if run.scenario and run.scenario.get(k)]
    if extras:
        head += " (" + ", ".join(extras) + ")"
    lines.append(head)
    if run.sweep:
        sweep = f"sweep: {run.sweep.get('kind', '?')}"
        if run.sweep.get("method"):
            sweep += f" ({run.sweep['method']})"
        lines.append(sweep + (f", SLO {_slo_text(slo)}" if slo else ""))
    lines += textwrap.wrap("latency: " + LEGEND, width=110, subsequent_indent="  ")
    lines.append("")
    if not run.steps:
        lines.append("no steps were run")
        return "\n".join(lines) + "\n"

    best = _best(run)
    stats = [(s, s.totals(), percentiles_ms(s.hist("corrected")), percentiles_ms(s.hist("uncorrected")))
             for s in run.steps]

    rows = [["step", "mode", "offered", "sent/s", "ok/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
             "max ms", "p99 uncorr ms", "errors", "validity", "stability", "SLO", ""]]
    for s, t, c, u in stats:
        errs = sum(t["errors"].values())
        rows.append([s.label, _mode(s), _offered(s), _rate(t["sent_rate"]), _rate(t["throughput"]),
                     _ms(c["p50"]), _ms(c["p90"]), _ms(c["p99"]), _ms(c["p999"]), _ms(c["max"]),
                     _ms(u["p99"]), f"{errs:,} ({t['error_rate']:.2%})" if errs else "0",
                     _validity(s, short=True), _stability(s), _slo_word(s.slo_met),
                     "<- best" if s is best else ""])
    lines += _grid(rows, left={0, 1, 2, 12, 13, 14, 15})
    lines.append("")

    for s, t, c, u in stats:
        lines += _step_block(s, t, c, u, s is best)
        lines.append("")

    lines += _footer(run, best, slo)
    return "\n".join(lines) + "\n"


def _slo_text(slo: dict[str, Any]) -> str:
    parts = []
    if slo.get("p99_ms") is not None:
        parts.append(f"p99 <= {slo['p99_ms']:g} ms")
    if slo.get("max_ms") is not None:
        parts.append(f"max <= {slo['max_ms']:g} ms")
    if slo.get("error_budget") is not None:
        parts.append(f"errors <= {slo['error_budget']:.2%}")
    return ", ".join(parts) or "-"


def _step_block(s: Step, t: dict, c: dict, u: dict, is_best: bool) -> list[str]:
    n = s.hist("corrected").get_total_count()
    measured = s.measured()
    lines = [f"== {s.label}: {_mode(s)}, {_offered(s)}, {_secs(t['seconds'])} s measured "
             f"in {len(measured)} window{'s' if len(measured) != 1 else ''}" + ("  [best]" if is_best else "")]
    errs = sum(t["errors"].values())
    load = (f"  sent {_rate(t['sent_rate'])} req/s, throughput {_rate(t['throughput'])} ok/s, "
            f"{t['completed']:,} completed, errors {errs:,} ({t['error_rate']:.2%})")
    if errs:
        load += ": " + _errors_text(t["errors"])
    lines.append(load)

    ps = list(PERCENTILES)
    rows = [["latency", *(_pct(p) for p in ps), "max", "mean"],
            ["corrected ms", *(_ms(c[_key(p)]) for p in ps), _ms(c["max"]), _ms(c["mean"])],
            ["uncorrected ms", *(_ms(u[_key(p)]) for p in ps), _ms(u["max"]), _ms(u["mean"])],
            ["samples above", *(f"{above(n, p):,} of {n:,}" for p in ps), "", ""]]
    lines += _grid(rows, indent="  ")
    thin = [_pct(p) for p in ps if n and above(n, p) < 10]
    if not n:
        lines.append("  no latency samples: every percentile is undefined")
    elif thin:
        lines.append(f"  thin tail: {', '.join(thin)} rest{'s' if len(thin) == 1 else ''} on fewer than "
                     "10 samples above; treat as estimates")

    lag = percentiles_ms(s.hist("lag"), (99.0,))
    late = t["late"]
    late_pct = f" ({late / t['sent']:.2%})" if t["sent"] else ""
    lines.append(f"  generator: lag p99 {_ms(lag['p99'])} ms, max {_ms(lag['max'])} ms, late sends {late:,}"
                 f"{late_pct}, {t['generator_cores']:.2f} cores")
    if t["overflow"]:
        lines.append(f"  overflow: {t['overflow']:,} latencies beyond the histogram's range were recorded at "
                     "its maximum (the true max is higher)")
    if s.server:
        lines.append("  server: " + ", ".join(f"{k} {_num(v)}" for k, v in s.server.items()))
    verdict = f"  verdict: {_validity(s)} | {_stability(s)}"
    if s.stability:
        verdict += " (" + ", ".join(f"{k} {_num(v)}" for k, v in s.stability.items()) + ")"
    verdict += f" | SLO {_slo_word(s.slo_met)}"
    if s.slo_problems:
        verdict += ": " + "; ".join(s.slo_problems)
    lines.append(verdict)
    return lines


def _key(p: float) -> str:
    return "p" + f"{p:g}".replace(".", "")


def _footer(run: Run, best: Step | None, slo: dict[str, Any]) -> list[str]:
    lines = []
    if run.sweep:
        if best is not None:
            t = best.totals()
            c = percentiles_ms(best.hist("corrected"), (99.0,))
            lines.append(f"sustainable throughput: {best.label} ({_offered(best)} offered, "
                         f"{_rate(t['throughput'])} ok/s, corrected p99 {_ms(c['p99'])} ms, "
                         f"max {_ms(c['max'])} ms)")
        else:
            lines.append("sustainable throughput: none (no step met the SLO)")
    bad = [s for s in run.steps if not s.valid]
    listed = f" ({len(bad)} of {len(run.steps)} steps invalid: " + ", ".join(s.label for s in bad) + ")" if bad else ""
    if run.valid:
        validity = "VALID" + (listed.replace(")", "; they do not decide the sweep)") if bad else "")
    else:
        validity = "INVALID" + listed
    lines.append(f"run: {validity} | SLO {_slo_word(run.slo_met)}" + (f" ({_slo_text(slo)})" if slo else ""))
    return lines


# --------------------------------------------------------------------------------------------
# 2. one live line per window


def progress_line(window: Window, step_label: str) -> str:
    """A short status line for a window that has just closed."""
    w = window
    phase = "" if w.phase == "measure" else f" {w.phase}"
    parts = [f"[{step_label}{phase} #{w.index} {_secs(w.start_s)}..{_secs(w.end_s)}s]"]
    send = w.sent / w.seconds
    if w.target_rate:
        parts.append(f"send {_rate(send)}/{_rate(w.target_rate)} req/s")
    else:
        parts.append(f"send {_rate(send)} req/s")
    parts.append(f"ok {_rate(w.ok / w.seconds)}/s")
    c = percentiles_ms(w.corrected, (50.0, 99.0))
    parts.append(f"p50 {_ms(c['p50'])} p99 {_ms(c['p99'])} ms")
    errs = sum(w.errors.values())
    parts.append(f"err {errs:,}" + (f" ({_errors_text(w.errors, limit=2)})" if errs else ""))
    lag = percentiles_ms(w.lag, (99.0,))
    parts.append(f"lag p99 {_ms(lag['p99'])} ms")
    for key, short in (("queue_depth", "queue"), ("inflight", "inflight")):
        if _finite(w.server.get(key)):
            parts.append(f"{short} {w.server[key]:g}")
    return "  ".join(parts)


# --------------------------------------------------------------------------------------------
# 3. JSON: the machine-readable record, histograms included


def _blob(h) -> str:
    return h.encode().decode("ascii")


def json_safe(obj: Any) -> Any:
    """Make a value strict-JSON safe: NaN/inf become null, odd types become plain ones."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [json_safe(v) for v in sorted(obj, key=str)]
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return json_safe(obj.tolist())
    return str(obj)


def to_dict(run: Run) -> dict[str, Any]:
    """The JSON document for a run (already cleaned of NaN)."""
    steps = []
    for s in run.steps:
        windows = [{**w.summary(), "cpu_s": w.cpu_s,
                    "histograms": {k: _blob(getattr(w, k)) for k in HISTS}} for w in s.windows]
        steps.append({**s.summary(), "histograms": {k: _blob(s.hist(k)) for k in HISTS}, "windows": windows})
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "units": {"latency": "ms in summaries; histograms are base64 HdrHistogram V2 blobs in integer us",
                  "rates": "requests per second", "times": "seconds from the step's measurement start"},
        "scenario": run.scenario,
        "environment": run.environment,
        "sweep": run.sweep,
        "verdict": {"valid": run.valid, "slo_met": run.slo_met, "best": (run.sweep or {}).get("best")},
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
    steps = []
    for sd in doc.get("steps", []):
        windows = []
        for wd in sd.get("windows", []):
            hists = wd.get("histograms", {})
            seconds = max(1e-9, (wd.get("end_s") or 0.0) - (wd.get("start_s") or 0.0))
            cpu_s = wd.get("cpu_s")
            if cpu_s is None:
                cpu_s = (wd.get("generator_cores") or 0.0) * seconds
            windows.append(Window(
                index=wd.get("index", len(windows)), start_s=wd.get("start_s", 0.0), end_s=wd.get("end_s", 0.0),
                phase=wd.get("phase", "measure"), target_rate=wd.get("target_rate"), sent=wd.get("sent", 0),
                ok=wd.get("ok", 0), errors=dict(wd.get("errors") or {}), late=wd.get("late", 0),
                corrected=decode(hists.get("corrected", "")), uncorrected=decode(hists.get("uncorrected", "")),
                lag=decode(hists.get("lag", "")), cpu_s=cpu_s, overflow=wd.get("overflow", 0),
                server=dict(wd.get("server") or {})))
        steps.append(Step(
            label=sd.get("label", f"step{len(steps)}"), mode=sd.get("mode", "open"),
            target_rate=sd.get("target_rate"), concurrency=sd.get("concurrency"), windows=windows,
            valid=sd.get("valid", True), problems=list(sd.get("problems") or []), stable=sd.get("stable"),
            stability=dict(sd.get("stability") or {}), slo_met=sd.get("slo_met"),
            slo_problems=list(sd.get("slo_problems") or []), server=dict(sd.get("server") or {})))
    return Run(scenario=doc.get("scenario") or {}, environment=doc.get("environment") or {},
               steps=steps, sweep=doc.get("sweep") or {})


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
            "label": s.label, "mode": s.mode, "target_rate": s.target_rate, "concurrency": s.concurrency,
            "seconds": t["seconds"], "sent": t["sent"], "ok": t["ok"], "errors": sum(t["errors"].values()),
            "error_rate": t["error_rate"], "sent_rate": t["sent_rate"], "throughput": t["throughput"],
            "corrected_p50_ms": c["p50"], "corrected_p90_ms": c["p90"], "corrected_p99_ms": c["p99"],
            "corrected_p999_ms": c["p999"], "corrected_max_ms": c["max"], "corrected_mean_ms": c["mean"],
            "uncorrected_p50_ms": u["p50"], "uncorrected_p99_ms": u["p99"], "uncorrected_max_ms": u["max"],
            "lag_p99_ms": lag["p99"], "generator_cores": t["generator_cores"],
            "samples": s.hist("corrected").get_total_count(), "late": t["late"], "overflow": t["overflow"],
            "valid": s.valid, "stable": s.stable, "slo_met": s.slo_met,
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
            writer.output_comment("[corrected latency (answer minus intended send time), values in us; "
                                  "StartTimestamp and Interval_Length in s from the measurement start"
                                  + (f" plus {shift:g}" if shift else "") + "; Interval_Max in whole ms]")
            writer.output_legend()
            for w in measured:
                start = w.start_s + shift
                end = max(w.end_s + shift, start)
                # the writer takes a zero start as "use the histogram's own timestamp", so pass a
                # start too small to show in the log's 6 decimals instead of an exact 0
                writer.output_interval_histogram(w.corrected, start or 1e-9, end or 1e-9,
                                                 max_value_unit_ratio=1000.0)
        written.append(hlog)
        for which, suffix in (("corrected", ".hgrm"), ("uncorrected", ".uncorrected.hgrm")):
            path = stem + suffix
            with open(path, "wb") as f:
                s.hist(which).output_percentile_distribution(f, 1000.0)
            written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# 6. plots


def _new_figure(nrows: int, ratios: list[float], size: tuple[float, float], sharex: bool = True):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    return fig, list(axes)


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def _nan(v: Any) -> float:
    return float(v) if _finite(v) else float("nan")


def _legend(ax, **kw) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, **kw)


def _maybe_log(ax, values: list[float], ratio: float = 50.0) -> None:
    vals = [v for v in values if _finite(v) and v > 0]
    if vals and max(vals) / min(vals) > ratio:
        ax.set_yscale("log")


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


_PCT_COLOURS = {"p50": "tab:blue", "p99": "tab:orange", "max": "tab:red"}


def _place_windows(run: Run):
    """Lay the steps' windows end to end on one time axis. The first step keeps its own times
    (warm-up negative, measurement from 0); each next step starts where the previous ended."""
    placed = []
    cursor: float | None = None
    for s in run.steps:
        ws = sorted(s.windows, key=lambda w: w.start_s)
        if not ws:
            placed.append((s, [], cursor or 0.0))
            continue
        lo = ws[0].start_s
        offset = 0.0 if cursor is None else cursor - lo
        items = [(w, w.start_s + offset, w.end_s + offset) for w in ws]
        placed.append((s, items, lo + offset))
        cursor = max(t1 for _, _, t1 in items)
    return placed


def plot_timeline(run: Run, path) -> str:
    """Per-window latency (p50/p99/max, corrected solid, uncorrected dashed), send rate vs target
    and throughput, and server gauges when scraped; warm-up shaded, steps laid end to end."""
    placed = _place_windows(run)
    server_keys: list[str] = []
    for s in run.steps:
        for w in s.windows:
            for k, v in w.server.items():
                if _finite(v) and k not in server_keys:
                    server_keys.append(k)
    preferred = [k for k in ("queue_depth", "inflight") if k in server_keys]
    server_keys = (preferred + sorted(k for k in server_keys if k not in preferred))[:6]
    nrows = 3 if server_keys else 2
    fig, axes = _new_figure(nrows, [3, 2, 2][:nrows], (11, 7.5 if nrows == 2 else 9.5))
    lat, rates = axes[0], axes[1]

    latencies: list[float] = []
    any_window = False
    any_errors = any(sum(w.errors.values()) for s in run.steps for w in s.windows)
    labelled: set[str] = set()

    def once(label: str) -> str | None:
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for s, items, _ in placed:
        if not items:
            continue
        any_window = True
        mids = [(t0 + t1) / 2 for _, t0, t1 in items]
        ends = [t1 for _, _, t1 in items]
        stats = [(percentiles_ms(w.corrected, (50.0, 99.0)), percentiles_ms(w.uncorrected, (50.0, 99.0)))
                 for w, _, _ in items]
        for key, colour in _PCT_COLOURS.items():
            for i, (which, style) in enumerate((("corrected", "-"), ("uncorrected", "--"))):
                ys = [_nan(st[i][key]) for st in stats]
                latencies += ys
                lat.plot(mids, ys, linestyle=style, color=colour, marker="o", ms=3,
                         mfc=colour if i == 0 else "none", lw=1.6 if i == 0 else 1.1,
                         label=once(f"{key} {which}"))
        send = [w.sent / w.seconds for w, _, _ in items]
        ok = [w.ok / w.seconds for w, _, _ in items]
        target = [_nan(w.target_rate) for w, _, _ in items]
        rates.plot(mids, send, color="tab:blue", marker="o", ms=3, label=once("sent (req/s)"))
        if any(_finite(v) for v in target):
            rates.plot(mids, target, color="black", ls=":", lw=1.3, label=once("target (req/s)"))
        rates.plot(mids, ok, color="tab:green", marker="o", ms=3, label=once("throughput (ok/s)"))
        if any_errors:
            errs = [sum(w.errors.values()) / w.seconds for w, _, _ in items]
            rates.plot(mids, errs, color="tab:red", marker="x", ms=4, lw=1, label=once("errors/s"))
        if server_keys:
            for j, key in enumerate(server_keys):
                ys = [_nan(w.server.get(key)) for w, _, _ in items]
                axes[2].plot(ends, ys, color=f"C{j}", marker="o", ms=3, label=once(f"server {key}"))

    # warm-up shading (on every panel) and step boundaries with labels
    for s, items, _ in placed:
        for w, t0, t1 in items:
            if w.phase != "measure":
                for ax in axes:
                    ax.axvspan(t0, t1, color="0.88", lw=0, zorder=0,
                               label=once("warm-up") if ax is lat else None)
    if len(run.steps) > 1:
        rotate = 30 if len(run.steps) > 8 else 0
        for k, (s, items, start) in enumerate(placed):
            if not items:
                continue
            if k:
                for ax in axes:
                    ax.axvline(start, color="0.35", ls=":", lw=1)
            lat.text(start, 1.01, f" {s.label}", transform=lat.get_xaxis_transform(), ha="left",
                     va="bottom", fontsize=8, color="0.25", rotation=rotate)

    spans = [(t0, t1) for _, items, _ in placed for _, t0, t1 in items]
    if spans:
        lo, hi = min(t0 for t0, _ in spans), max(t1 for _, t1 in spans)
        if hi > lo:
            pad = 0.01 * (hi - lo)
            lat.set_xlim(lo - pad, hi + pad)

    slo_p99 = _slo(run).get("p99_ms")
    if _finite(slo_p99) and any_window:
        lat.axhline(slo_p99, color="tab:purple", ls="-.", lw=1, label=f"SLO p99 {slo_p99:g} ms")
        latencies.append(float(slo_p99))

    if not any(_finite(v) for v in latencies):
        _empty_note(lat, "no latency samples" if any_window else "no windows recorded")
    _maybe_log(lat, latencies)
    lat.set_ylabel("latency (ms)")
    rates.set_ylabel("requests / s")
    rates.set_ylim(bottom=0)
    if server_keys:
        axes[2].set_ylabel("server gauge\n(at window end)")
    single = len(run.steps) <= 1
    axes[-1].set_xlabel("time (s) from the start of measurement" if single
                        else "time (s), steps placed end to end")
    for ax in axes:
        _legend(ax)
    title = f"{_name(run)}: latency and load per window"
    if single and run.steps:
        title += f" ({run.steps[0].label}, {_mode(run.steps[0])}, {_offered(run.steps[0])})"
    elif run.steps and all(s.mode == "closed" for s in run.steps):
        title += " (closed loop)"
    fig.suptitle(title + "\ncorrected = from intended send time (solid), uncorrected = from actual send (dashed)",
                 fontsize=11)
    return _save(fig, path)


def _sweep_points(run: Run) -> tuple[bool, list[tuple[float, Step]]]:
    kind = (run.sweep or {}).get("kind")
    closed_n = sum(1 for s in run.steps if s.mode == "closed")
    closed = kind == "concurrency" or (kind != "rate" and closed_n > len(run.steps) - closed_n)
    points = []
    for s in run.steps:
        if (s.mode == "closed") != closed:
            continue
        x = s.concurrency if closed else s.target_rate
        if _finite(x):
            points.append((float(x), s))
    points.sort(key=lambda p: p[0])
    return closed, points


def plot_sweep(run: Run, path) -> str:
    """Latency and throughput against the offered load (rate, or concurrency for closed loop)."""
    closed, points = _sweep_points(run)
    fig, (lat, thr) = _new_figure(2, [3, 2], (10, 8))
    xs = [x for x, _ in points]
    c = [percentiles_ms(s.hist("corrected")) for _, s in points]
    u = [percentiles_ms(s.hist("uncorrected"), (99.0,)) for _, s in points]
    t = [s.totals() for _, s in points]
    valid = [s.valid for _, s in points]

    def series(ax, ys, colour, style, label, lw=1.6, marker="o"):
        ax.plot(xs, ys, color=colour, ls=style, lw=lw, label=label)
        for ok_flag, face in ((True, colour), (False, "white")):
            px = [x for x, y, v in zip(xs, ys, valid) if v == ok_flag and _finite(y)]
            py = [y for x, y, v in zip(xs, ys, valid) if v == ok_flag and _finite(y)]
            if px:
                ax.plot(px, py, ls="none", marker=marker, ms=6, color=colour, mfc=face, mec=colour, zorder=3)

    latencies: list[float] = []
    if points:
        for key, colour, style, label, lw in (("p50", "tab:blue", "-", "p50 corrected", 1.6),
                                              ("p99", "tab:orange", "-", "p99 corrected", 1.8),
                                              ("max", "tab:red", ":", "max corrected", 1.0)):
            ys = [_nan(ci[key]) for ci in c]
            latencies += ys
            series(lat, ys, colour, style, label, lw=lw)
        ys = [_nan(ui["p99"]) for ui in u]
        latencies += ys
        series(lat, ys, "tab:orange", "--", "p99 uncorrected", lw=1.1, marker="s")
        series(thr, [ti["throughput"] for ti in t], "tab:green", "-", "throughput (ok/s)")
        series(thr, [ti["sent_rate"] for ti in t], "tab:blue", "--", "sent (req/s)", lw=1.1, marker="s")
        if not closed:
            lo, hi = min(xs), max(xs)
            thr.plot([lo, hi], [lo, hi], color="0.5", ls=":", lw=1, label="ideal (throughput = offered)")
        # steps without a single latency sample: mark them on the x axis
        empty = [x for (x, s), ci in zip(points, c) if ci["p50"] is None]
        if empty:
            lat.plot(empty, [0.03] * len(empty), ls="none", marker="x", ms=8, color="tab:red",
                     transform=lat.get_xaxis_transform(), label="no successful responses", clip_on=False)
        if not all(valid):
            lat.plot([], [], ls="none", marker="o", mfc="white", mec="0.3", color="0.3",
                     label="invalid step (hollow)")
            thr.plot([], [], ls="none", marker="o", mfc="white", mec="0.3", color="0.3",
                     label="invalid step (hollow)")
    else:
        _empty_note(lat, "no steps with an offered rate to plot")

    slo_p99 = _slo(run).get("p99_ms")
    if _finite(slo_p99):
        lat.axhline(slo_p99, color="tab:purple", ls="-.", lw=1.2, label=f"SLO p99 <= {slo_p99:g} ms")
        latencies.append(float(slo_p99))

    best = _best(run)
    unit = "concurrency" if closed else "req/s"
    for (x, s), ci, ti in zip(points, c, t):
        if s is not best:
            continue
        for ax in (lat, thr):
            ax.axvline(x, color="tab:green", alpha=0.35, lw=6, zorder=0)
        y = ci["p99"]
        if _finite(y):
            lat.plot([x], [y], ls="none", marker="*", ms=17, color="gold", mec="black", zorder=5,
                     label="best (sustainable)")
        offered = f"{x:g} {unit}" if not closed else f"concurrency {x:g}"
        lat.annotate(f"best: {s.label}\n{offered}\n{_rate(ti['throughput'])} ok/s, p99 {_ms(y)} ms",
                     xy=(x, y if _finite(y) else 0.5),
                     xycoords="data" if _finite(y) else lat.get_xaxis_transform(),
                     xytext=(12, 18), textcoords="offset points", fontsize=8,
                     bbox={"boxstyle": "round", "fc": "white", "ec": "0.6"},
                     arrowprops={"arrowstyle": "->", "color": "0.3"})

    _maybe_log(lat, latencies)
    lat.set_ylabel("latency (ms)")
    thr.set_ylabel("requests / s")
    thr.set_ylim(bottom=0)
    if closed:
        from matplotlib.ticker import MaxNLocator

        thr.xaxis.set_major_locator(MaxNLocator(integer=True))
    thr.set_xlabel("concurrency: requests kept in flight (closed loop)" if closed
                   else "offered rate, open loop (req/s)")
    what = "concurrency (closed loop)" if closed else "offered rate (open loop)"
    fig.suptitle(f"{_name(run)}: latency and throughput vs {what}\n"
                 "corrected = from intended send time, uncorrected = from actual send; hollow = invalid step",
                 fontsize=11)
    _legend(lat)
    _legend(thr)
    return _save(fig, path)


def _spectrum_steps(run: Run, limit: int = 5) -> list[Step]:
    """The best step plus a spread of the others, at most ``limit``, in run order."""
    steps = [s for s in run.steps if s.hist("corrected").get_total_count()] or list(run.steps)
    if len(steps) <= limit:
        return steps
    chosen: list[Step] = []
    best = _best(run)
    if best in steps:
        chosen.append(best)
        i = steps.index(best)
        if i + 1 < len(steps):
            chosen.append(steps[i + 1])  # the first step past the sustainable one
    # then the two ends of the range, then evenly spread picks in between
    span = len(steps) - 1
    spread = [steps[round(k * span / (limit - 1))] for k in range(1, limit - 1)] if limit > 2 else []
    for cand in [steps[0], steps[-1], *spread, *steps]:
        if len(chosen) >= limit:
            break
        if cand not in chosen:
            chosen.append(cand)
    return [s for s in steps if s in chosen]


def _spectrum(h, max_x: float = 1e6) -> tuple[list[float], list[float]] | None:
    n = h.get_total_count()
    if not n:
        return None
    top = min(max(float(n), 10.0), max_x)
    npts = 160
    xs = [10 ** (math.log10(top) * i / (npts - 1)) for i in range(npts)]
    ps = [min(100.0, 100.0 * (1.0 - 1.0 / x)) for x in xs]
    values = h.get_percentile_to_value_dict(ps)
    ys = [max(values.get(p, h.get_max_value()), 1) / 1000 for p in ps]
    # finish at the recorded maximum, which is the hardest number to fake
    xs.append(top)
    ys.append(max(h.get_max_value(), 1) / 1000)
    return xs, ys


def plot_spectrum(run: Run, path) -> str:
    """Latency by percentile on a 1/(1-p) axis, corrected (solid) vs uncorrected (dashed)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, (ax,) = _new_figure(1, [1], (10, 6), sharex=False)
    top = 1e4
    drawn = False
    best = _best(run)
    for j, s in enumerate(_spectrum_steps(run)):
        colour = f"C{j % 10}"
        name = s.label + (" (best)" if s is best else "")
        for which, style, lw in (("corrected", "-", 1.8), ("uncorrected", "--", 1.1)):
            curve = _spectrum(s.hist(which))
            if curve is None:
                continue
            xs, ys = curve
            top = max(top, xs[-1])
            ax.plot(xs, ys, color=colour, ls=style, lw=lw, label=f"{name} {which}")
            drawn = True
    slo_p99 = _slo(run).get("p99_ms")
    if _finite(slo_p99) and drawn:
        ax.axhline(slo_p99, color="tab:purple", ls="-.", lw=1, label=f"SLO p99 <= {slo_p99:g} ms")
        ax.plot([100], [slo_p99], ls="none", marker="D", ms=6, color="tab:purple", zorder=5)
    if not drawn:
        _empty_note(ax, "no latency samples")
    ax.set_xscale("log")
    ax.set_xlim(1, top)
    if drawn:
        ax.set_yscale("log")
    ticks = [t for t in (2, 10, 100, 1e3, 1e4, 1e5, 1e6) if t <= top]
    names = {2: "50%", 10: "90%", 100: "99%", 1e3: "99.9%", 1e4: "99.99%", 1e5: "99.999%",
             1e6: "99.9999%"}
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([names[t] for t in ticks])
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.1)
    ax.set_xlabel("percentile (axis is 1/(1-p): each tick is one more nine)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{_name(run)}: latency by percentile\n"
                 "corrected = from intended send time (solid), uncorrected = from actual send (dashed)",
                 fontsize=11)
    _legend(ax)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# everything at once


def write_all(run: Run, out_dir) -> dict[str, str]:
    """Write the text table, JSON, CSV, interval logs and plots into ``out_dir``.

    Returns {kind: path}; per-step files are keyed ``hlog:<label>``, ``hgrm:<label>`` and
    ``hgrm_uncorrected:<label>``. Plots are skipped (with a warning) if matplotlib is missing;
    the sweep plot is skipped for a single-step run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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


__all__ = ["CSV_COLUMNS", "LEGEND", "csv_rows", "plot_spectrum", "plot_sweep", "plot_timeline",
           "progress_line", "read_json", "table", "to_dict", "write_all", "write_csv", "write_intervals",
           "write_json"]
