"""The report's plots: the per-window timeline, the sweep and the percentile spectrum.

matplotlib is imported only inside these functions (it is an optional dependency), and only its
object-oriented API with the Agg canvas is used: no pyplot, no global backend switch."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..results import Run, Step, Window, percentiles_ms, values_at
from .text import _best, _finite, _mode, _ms, _name, _offered, _rate, _slo


def _new_figure(nrows: int, ratios: Sequence[float], size: tuple[float, float], sharex: bool = True):
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


def _legend(ax, extra=None, **kw) -> None:
    """A legend right of ``ax``; with ``extra`` (a twin axis), its entries join the same legend
    (placed further right, past the twin's tick labels)."""
    handles, labels = ax.get_legend_handles_labels()
    if extra is not None:
        more, more_labels = extra.get_legend_handles_labels()
        handles, labels = handles + more, labels + more_labels
    if handles:
        x = 1.08 if extra is not None else 1.01
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(x, 1.0), fontsize=8, frameon=False, **kw)


def _maybe_log(ax, values: list[float], ratio: float = 50.0) -> None:
    vals = [v for v in values if _finite(v) and v > 0]
    if vals and max(vals) / min(vals) > ratio:
        ax.set_yscale("log")


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


_PCT_COLOURS = {"p50": "tab:blue", "p99": "tab:orange", "max": "tab:red"}


def _place_windows(run: Run) -> list[tuple[Step, list[tuple[Window, float, float]], float]]:
    """Lay the steps' windows end to end on one time axis. The first step keeps its own times
    (warm-up negative, measurement from 0); each next step starts where the previous ended."""
    placed: list[tuple[Step, list[tuple[Window, float, float]], float]] = []
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


# How the server panel draws each gauge: (label, colour, line style, marker). Queue depth (waiting
# for a batch) and in-flight (accepted, not yet answered) are both counts of requests, on one axis,
# told apart by style as well as colour; the mean batch size is rows per execution, another unit,
# so it gets its own axis on the right.
SERVER_STYLES = {
    "queue_depth": ("queue depth (waiting)", "tab:red", "-", "s"),
    "inflight": ("in flight (accepted, unanswered)", "tab:blue", "--", "^"),
    "batch_size_mean": ("mean batch size (rows)", "tab:purple", ":", "D"),
}


def server_panel_keys(run: Run) -> tuple[list[str], list[str]]:
    """The server gauges to draw, split by axis: (request counts on the left, batch sizes on the
    right). Queue depth and in-flight come first; at most six in all."""
    keys: list[str] = []
    for s in run.steps:
        for w in s.windows:
            for k, v in w.server.items():
                if _finite(v) and k not in keys:
                    keys.append(k)
    preferred = [k for k in SERVER_STYLES if k in keys]
    keys = (preferred + sorted(k for k in keys if k not in preferred))[:6]
    right = [k for k in keys if "batch" in k]
    return [k for k in keys if k not in right], right


def _step_flags(s: Step) -> str:
    flags = (["INVALID"] if not s.valid else []) + (["unstable"] if s.stable is False else [])
    return f" [{', '.join(flags)}]" if flags else ""


def plot_timeline(run: Run, path) -> str:
    """Per-window latency (p50/p99/max, corrected solid, uncorrected dashed), send rate vs target
    and throughput, and server gauges when scraped; warm-up shaded, steps laid end to end."""
    return _save(timeline_figure(run), path)


def timeline_figure(run: Run):
    """The figure ``plot_timeline`` saves (a matplotlib Figure)."""
    placed = _place_windows(run)
    left_keys, right_keys = server_panel_keys(run)
    server_keys = left_keys + right_keys
    nrows = 3 if server_keys else 2
    fig, axes = _new_figure(nrows, [3, 2, 2][:nrows], (11, 7.5 if nrows == 2 else 9.5))
    lat, rates = axes[0], axes[1]
    gauges = axes[2] if server_keys else None
    batches = None
    if gauges is not None and right_keys:
        batches = gauges.twinx()
        batches.set_ylabel("batch size (rows)", color=SERVER_STYLES["batch_size_mean"][1])

    latencies: list[float] = []
    any_window = False
    any_errors = any(sum(w.errors.values()) for s in run.steps for w in s.windows)
    labelled: set[str] = set()

    def once(label: str) -> str | None:
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for _step, items, _ in placed:
        if not items:
            continue
        any_window = True
        mids = [(t0 + t1) / 2 for _, t0, t1 in items]
        ends = [t1 for _, _, t1 in items]
        stats = [
            (percentiles_ms(w.corrected, (50.0, 99.0)), percentiles_ms(w.uncorrected, (50.0, 99.0)))
            for w, _, _ in items
        ]
        for key, colour in _PCT_COLOURS.items():
            for i, (which, style) in enumerate((("corrected", "-"), ("uncorrected", "--"))):
                ys = [_nan(st[i][key]) for st in stats]
                latencies += ys
                lat.plot(
                    mids,
                    ys,
                    linestyle=style,
                    color=colour,
                    marker="o",
                    ms=3,
                    mfc=colour if i == 0 else "none",
                    lw=1.6 if i == 0 else 1.1,
                    label=once(f"{key} {which}"),
                )
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
        for j, key in enumerate(server_keys):
            ax = batches if key in right_keys else gauges
            assert ax is not None
            label, colour, style, marker = SERVER_STYLES.get(key, (key, f"C{j + 2}", "-.", "o"))
            ys = [_nan(w.server.get(key)) for w, _, _ in items]
            ax.plot(ends, ys, color=colour, ls=style, marker=marker, ms=4, mfc="none", label=once(label))

    # warm-up shading (on every panel) and step boundaries with labels
    for _step, items, _ in placed:
        for w, t0, t1 in items:
            if w.phase != "measure":
                for ax in axes:
                    ax.axvspan(t0, t1, color="0.88", lw=0, zorder=0, label=once("warm-up") if ax is lat else None)
    step_labels = []
    if len(run.steps) > 1:
        for i, (s, items, start) in enumerate(placed):
            if not items:
                continue
            if i:
                for ax in axes:
                    ax.axvline(start, color="0.35", ls=":", lw=1)
            step_labels.append(
                lat.text(
                    start,
                    1.01,
                    f" {s.label}{_step_flags(s)}",
                    transform=lat.get_xaxis_transform(),
                    ha="left",
                    va="bottom",
                    fontsize=8,
                    color="0.25",
                )
            )

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
    if gauges is not None:
        gauges.set_ylabel("requests (server,\nat window end)" if left_keys else "server")
        gauges.set_ylim(bottom=0)
    if batches is not None:
        batches.set_ylim(bottom=0)
    single = len(run.steps) <= 1
    axes[-1].set_xlabel("time (s) from the start of measurement" if single else "time (s), steps placed end to end")
    for ax in axes[:2]:
        _legend(ax)
    if gauges is not None:
        _legend(gauges, extra=batches)
    title = f"{_name(run)}: latency and load per window"
    if single and run.steps:
        title += f" ({run.steps[0].label}, {_mode(run.steps[0])}, {_offered(run.steps[0])})"
    elif run.steps and all(s.mode == "closed" for s in run.steps):
        title += " (closed loop)"
    fig.suptitle(
        title + "\ncorrected = from intended send time (solid), uncorrected = from actual send (dashed)", fontsize=11
    )
    _fit_labels(fig, step_labels)
    return fig


# Step labels above the timeline: turned further and made smaller until they stop overlapping.
LABEL_FITS = ((0, 8), (30, 8), (60, 7), (90, 7))  # (rotation in degrees, font size)


def _fit_labels(fig, texts) -> None:
    """Turn and shrink the step labels (left to right) until none overlaps the next, as drawn."""
    if len(texts) < 2:
        return
    for rotation, size in LABEL_FITS:
        for t in texts:
            t.set_rotation(rotation)
            t.set_fontsize(size)
        fig.canvas.draw()  # (the constrained layout places the axes when the figure is drawn)
        boxes = [t.get_window_extent() for t in texts]
        if all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])):
            return


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


def unstable_points(points: list[tuple[float, Step]]) -> list[tuple[float, Step]]:
    """The sweep's steps whose last windows disagreed (``stable`` False; None is too few windows
    to tell, and is not marked)."""
    return [(x, s) for x, s in points if s.stable is False]


def plot_sweep(run: Run, path) -> str:
    """Latency and throughput against the offered load (rate, or concurrency for closed loop)."""
    return _save(sweep_figure(run), path)


def sweep_figure(run: Run):
    """The figure ``plot_sweep`` saves. Invalid steps are hollow, unstable ones ringed; a
    concurrency sweep has a log (base 2) x axis with a tick at each level."""
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
        for key, colour, style, label, lw in (
            ("p50", "tab:blue", "-", "p50 corrected", 1.6),
            ("p99", "tab:orange", "-", "p99 corrected", 1.8),
            ("max", "tab:red", ":", "max corrected", 1.0),
        ):
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
            lat.plot(
                empty,
                [0.03] * len(empty),
                ls="none",
                marker="x",
                ms=8,
                color="tab:red",
                transform=lat.get_xaxis_transform(),
                label="no successful responses",
                clip_on=False,
            )
        if not all(valid):
            lat.plot([], [], ls="none", marker="o", mfc="white", mec="0.3", color="0.3", label="invalid step (hollow)")
            thr.plot([], [], ls="none", marker="o", mfc="white", mec="0.3", color="0.3", label="invalid step (hollow)")
        shaky = unstable_points(points)
        if shaky:
            at = {id(s): i for i, (_, s) in enumerate(points)}
            for ax, ys in (
                (lat, [_nan(c[at[id(s)]]["p99"]) for _, s in shaky]),
                (thr, [t[at[id(s)]]["throughput"] for _, s in shaky]),
            ):
                ring = [(x, y) for (x, _), y in zip(shaky, ys) if _finite(y)]
                ax.plot(
                    [x for x, _ in ring],
                    [y for _, y in ring],
                    ls="none",
                    marker="o",
                    ms=14,
                    mfc="none",
                    mec="tab:brown",
                    mew=1.5,
                    zorder=4,
                    label="unstable step (ringed): its last windows disagree",
                )
    else:
        _empty_note(lat, "no steps with an offered rate to plot")

    slo_p99 = _slo(run).get("p99_ms")
    if _finite(slo_p99):
        lat.axhline(slo_p99, color="tab:purple", ls="-.", lw=1.2, label=f"SLO p99 <= {slo_p99:g} ms")
        latencies.append(float(slo_p99))

    _maybe_log(lat, latencies)
    lat.set_ylabel("latency (ms)")
    thr.set_ylabel("requests / s")
    thr.set_ylim(bottom=0)
    if closed and len({x for x in xs if x > 0}) > 1:
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

        # levels usually double (1, 2, 4, ... 256): on a linear axis the low ones crowd together
        thr.set_xscale("log", base=2)
        levels = sorted({x for x in xs if x > 0})
        if len(levels) <= 16:
            thr.xaxis.set_major_locator(FixedLocator(levels))
            thr.xaxis.set_minor_locator(NullLocator())
        thr.xaxis.set_major_formatter(ScalarFormatter())
    thr.set_xlabel(
        "concurrency: requests kept in flight (closed loop, log scale)" if closed else "offered rate, open loop (req/s)"
    )
    what = "concurrency (closed loop)" if closed else "offered rate (open loop)"
    fig.suptitle(
        f"{_name(run)}: latency and throughput vs {what}\n"
        "corrected = from intended send time, uncorrected = from actual send; hollow = invalid, ringed = unstable",
        fontsize=11,
    )
    _annotate_best(run, closed, points, c, t, lat, thr)  # (once the scales are set)
    _legend(lat)
    _legend(thr)
    return fig


def _annotate_best(run: Run, closed: bool, points: list[tuple[float, Step]], c, t, lat, thr) -> None:
    """Mark the best step; its note goes to the side of the point away from the legend (which is
    right of the plot) and away from the top, so it stays inside the axes."""
    best = _best(run)
    unit = "concurrency" if closed else "req/s"
    for (x, s), ci, ti in zip(points, c, t):
        if s is not best:
            continue
        for ax in (lat, thr):
            ax.axvline(x, color="tab:green", alpha=0.35, lw=6, zorder=0)
        y = ci["p99"]
        if _finite(y):
            lat.plot(
                [x], [y], ls="none", marker="*", ms=17, color="gold", mec="black", zorder=5, label="best (sustainable)"
            )
        lat.get_xlim(), lat.get_ylim()  # (brings the view limits up to date for the transform)
        where = lat.transAxes.inverted().transform(lat.transData.transform((x, y if _finite(y) else 1.0)))
        right, high = where[0] > 0.5, bool(_finite(y) and where[1] > 0.6)
        offered = f"{x:g} {unit}" if not closed else f"concurrency {x:g}"
        lat.annotate(
            f"best: {s.label}\n{offered}\n{_rate(ti['throughput'])} ok/s, p99 {_ms(y)} ms",
            xy=(x, y if _finite(y) else 0.5),
            xycoords="data" if _finite(y) else lat.get_xaxis_transform(),
            xytext=(-12 if right else 12, -18 if high else 18),
            textcoords="offset points",
            ha="right" if right else "left",
            va="top" if high else "bottom",
            multialignment="left",
            fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.6"},
            arrowprops={"arrowstyle": "->", "color": "0.3"},
        )


SPECTRUM_LIMIT = 8  # curves (two lines each) that still read apart on one plot


@dataclass
class SpectrumChoice:
    """Which steps the spectrum plot draws, and which it does not and why (the plot says so)."""

    shown: list[Step]  # in run order
    left_out: list[Step] = field(default_factory=list)  # had samples; too many steps to draw them all
    empty: list[Step] = field(default_factory=list)  # no latency sample: nothing to draw

    def notes(self, names: int = 6) -> list[str]:
        def listed(steps: list[Step]) -> str:
            text = ", ".join(s.label for s in steps[:names])
            return text + (f" and {len(steps) - names} more" if len(steps) > names else "")

        out = []
        if self.left_out:
            total = len(self.shown) + len(self.left_out)
            out.append(
                f"{len(self.shown)} of {total} steps drawn (the best, the first past it, both ends, a spread "
                f"between); not drawn: {listed(self.left_out)} (every step's spectrum is in its .hgrm file)"
            )
        if self.empty:
            out.append(f"no latency samples, so no curve: {listed(self.empty)}")
        return out


def spectrum_steps(run: Run, limit: int = SPECTRUM_LIMIT) -> SpectrumChoice:
    """The steps with samples, all of them up to ``limit``; past that the best step, the first
    step past it, both ends and evenly spread picks in between. The rest are named, not dropped."""
    steps = [s for s in run.steps if s.hist("corrected").get_total_count()]
    empty = [s for s in run.steps if s not in steps]
    if len(steps) <= limit:
        return SpectrumChoice(steps, [], empty)
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
    return SpectrumChoice([s for s in steps if s in chosen], [s for s in steps if s not in chosen], empty)


def _spectrum(h, max_x: float = 1e6) -> tuple[list[float], list[float]] | None:
    n = h.get_total_count()
    if not n:
        return None
    top = min(max(float(n), 10.0), max_x)
    npts = 160
    xs = [10 ** (math.log10(top) * i / (npts - 1)) for i in range(npts)]
    ps = [min(100.0, 100.0 * (1.0 - 1.0 / x)) for x in xs]
    values = values_at(h, ps)
    ys = [max(values.get(p, h.get_max_value()), 1) / 1000 for p in ps]
    # finish at the recorded maximum, which is the hardest number to fake
    xs.append(top)
    ys.append(max(h.get_max_value(), 1) / 1000)
    return xs, ys


def plot_spectrum(run: Run, path) -> str:
    """Latency by percentile on a 1/(1-p) axis, corrected (solid) vs uncorrected (dashed)."""
    return _save(spectrum_figure(run), path)


def spectrum_figure(run: Run):
    """The figure ``plot_spectrum`` saves. A step left out (too many to draw, or no samples) is
    named in a note on the plot, never dropped without a word."""
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, (ax,) = _new_figure(1, [1], (10, 6), sharex=False)
    top = 1e4
    drawn = False
    best = _best(run)
    choice = spectrum_steps(run)
    for j, s in enumerate(choice.shown):
        colour = f"C{j % 10}"
        name = s.label + (" (best)" if s is best else "") + _step_flags(s)
        for which, style, lw in (("corrected", "-", 1.8), ("uncorrected", "--", 1.1)):
            curve = _spectrum(s.hist(which))
            if curve is None:
                continue
            xs, ys = curve
            top = max(top, xs[-1])
            ax.plot(xs, ys, color=colour, ls=style, lw=lw, label=name if which == "corrected" else None)
            drawn = True
    if drawn:  # one legend entry per step (its colour); the line style says which latency
        ax.plot([], [], color="0.3", ls="-", lw=1.8, label="corrected (solid)")
        ax.plot([], [], color="0.3", ls="--", lw=1.1, label="uncorrected (dashed)")
    notes = choice.notes()
    if notes and drawn:
        ax.text(
            0.99,
            0.02,
            "\n".join(textwrap.fill(n, 70) for n in notes),
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            multialignment="left",
            fontsize=8,
            color="0.2",
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
        )
    slo_p99 = _slo(run).get("p99_ms")
    if _finite(slo_p99) and drawn:
        ax.axhline(slo_p99, color="tab:purple", ls="-.", lw=1, label=f"SLO p99 <= {slo_p99:g} ms")
        ax.plot([100], [slo_p99], ls="none", marker="D", ms=6, color="tab:purple", zorder=5)
    if not drawn:
        _empty_note(ax, "\n".join(textwrap.fill(n, 70) for n in notes) or "no latency samples")
    ax.set_xscale("log")
    ax.set_xlim(1, top)
    if drawn:
        ax.set_yscale("log")
    ticks = [t for t in (2, 10, 100, 1e3, 1e4, 1e5, 1e6) if t <= top]
    names = {2: "50%", 10: "90%", 100: "99%", 1e3: "99.9%", 1e4: "99.99%", 1e5: "99.999%", 1e6: "99.9999%"}
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([names[t] for t in ticks])
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.1)
    ax.set_xlabel("percentile (axis is 1/(1-p): each tick is one more nine)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(
        f"{_name(run)}: latency by percentile\n"
        "corrected = from intended send time (solid), uncorrected = from actual send (dashed)",
        fontsize=11,
    )
    _legend(ax)
    return fig
