"""The terminal side of the report: formatting helpers, the final table and the live line per window."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Set
from typing import Any, TypeGuard

from ..results import PERCENTILES, Run, Step, Window, above, percentiles_ms

LEGEND = (
    "corrected = answer time minus the *intended* (scheduled) send time: what a user arriving "
    "on schedule waits, coordinated omission included. uncorrected = answer time minus the "
    "actual send time (what most tools report). Percentiles come from merged histograms; "
    "'N of M' = samples above that percentile, of all samples."
)


# --------------------------------------------------------------------------------------------
# small formatting helpers (ASCII only, so any terminal or log collector shows them)


def _finite(v: Any) -> TypeGuard[float]:
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
    words: dict[bool | None, str] = {True: "stable", False: "unstable"}
    return words.get(step.stable, "n/a")


def _slo_word(v: bool | None) -> str:
    words: dict[bool | None, str] = {True: "met", False: "missed"}
    return words.get(v, "n/a")


def _grid(rows: list[list[str]], left: Set[int] = frozenset({0}), indent: str = "") -> list[str]:
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
    from ..scenario import DEFAULT_ERROR_BUDGET

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
        lines.append("no steps were run" + (f" ({run.interrupted})" if run.interrupted else ""))
        return "\n".join(lines) + "\n"

    best = _best(run)
    stats = [
        (s, s.totals(), percentiles_ms(s.hist("corrected")), percentiles_ms(s.hist("uncorrected"))) for s in run.steps
    ]

    rows = [
        [
            "step",
            "mode",
            "offered",
            "sent/s",
            "ok/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "p99 uncorr ms",
            "errors",
            "validity",
            "stability",
            "SLO",
            "",
        ]
    ]
    for s, t, c, u in stats:
        errs = sum(t["errors"].values())
        rows.append(
            [
                s.label,
                _mode(s),
                _offered(s),
                _rate(t["sent_rate"]),
                _rate(t["throughput"]),
                _ms(c["p50"]),
                _ms(c["p90"]),
                _ms(c["p99"]),
                _ms(c["p999"]),
                _ms(c["max"]),
                _ms(u["p99"]),
                f"{errs:,} ({t['error_rate']:.2%})" if errs else "0",
                _validity(s, short=True),
                _stability(s),
                _slo_word(s.slo_met),
                "<- best" if s is best else "",
            ]
        )
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
    lines = [
        f"== {s.label}: {_mode(s)}, {_offered(s)}, {_secs(t['seconds'])} s measured "
        f"in {len(measured)} window{'s' if len(measured) != 1 else ''}" + ("  [best]" if is_best else "")
    ]
    errs = sum(t["errors"].values())
    load = (
        f"  sent {_rate(t['sent_rate'])} req/s, throughput {_rate(t['throughput'])} ok/s, "
        f"{t['completed']:,} completed, errors {errs:,} ({t['error_rate']:.2%})"
    )
    if errs:
        load += ": " + _errors_text(t["errors"])
    lines.append(load)

    ps = list(PERCENTILES)
    rows = [
        ["latency", *(_pct(p) for p in ps), "max", "mean"],
        ["corrected ms", *(_ms(c[_key(p)]) for p in ps), _ms(c["max"]), _ms(c["mean"])],
        ["uncorrected ms", *(_ms(u[_key(p)]) for p in ps), _ms(u["max"]), _ms(u["mean"])],
        ["samples above", *(f"{above(n, p):,} of {n:,}" for p in ps), "", ""],
    ]
    lines += _grid(rows, indent="  ")
    thin = [_pct(p) for p in ps if n and above(n, p) < 10]
    if not n:
        lines.append("  no latency samples: every percentile is undefined")
    elif thin:
        lines.append(
            f"  thin tail: {', '.join(thin)} rest{'s' if len(thin) == 1 else ''} on fewer than "
            "10 samples above; treat as estimates"
        )

    lag = percentiles_ms(s.hist("lag"), (99.0,))
    late = t["late"]
    late_pct = f" ({late / t['sent']:.2%})" if t["sent"] else ""
    lines.append(
        f"  generator: lag p99 {_ms(lag['p99'])} ms, max {_ms(lag['max'])} ms, late sends {late:,}"
        f"{late_pct}, {t['generator_cores']:.2f} cores"
    )
    if t["overflow"]:
        lines.append(
            f"  overflow: {t['overflow']:,} latencies beyond the histogram's range were recorded at "
            "its maximum (the true max is higher)"
        )
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
            lines.append(
                f"sustainable throughput: {best.label} ({_offered(best)} offered, "
                f"{_rate(t['throughput'])} ok/s, corrected p99 {_ms(c['p99'])} ms, "
                f"max {_ms(c['max'])} ms)"
            )
        else:
            lines.append("sustainable throughput: none (no step met the SLO)")
    bad = [s for s in run.steps if not s.valid]
    listed = f" ({len(bad)} of {len(run.steps)} steps invalid: " + ", ".join(s.label for s in bad) + ")" if bad else ""
    if run.valid:
        validity = "VALID" + (listed.replace(")", "; they do not decide the sweep)") if bad else "")
    else:
        validity = "INVALID" + listed
    lines.append(f"run: {validity} | SLO {_slo_word(run.slo_met)}" + (f" ({_slo_text(slo)})" if slo else ""))
    if run.interrupted:
        lines.append(f"run: {run.interrupted}; the steps above are what was measured before it")
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
