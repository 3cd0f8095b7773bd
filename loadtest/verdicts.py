"""A load-test step's verdicts in words and figures: how stable its windows were, whether it is
judged on an SLO and with what error budget, the best step of a sweep, and what to change when the
generator could not keep its schedule (``runner.py`` runs the steps)."""

from __future__ import annotations

import time

from .results import Step, Window, percentiles_ms
from .scenario import DEFAULT_ERROR_BUDGET, Scenario, fmt_rate


def stability_spread(ws: list[Window], window_s: float) -> dict[str, float] | None:
    """How far apart (% of the largest) the throughput and the p99 of the last 3 whole windows
    are; None with fewer. A last window the duration cuts short (2.05 s in windows of 0.5 s) is
    left out: a few requests in it would make every step read unstable."""
    whole = [w for w in ws if w.seconds >= window_s * 0.999]
    if len(whole) < 3:
        return None
    tail = whole[-3:]
    tput = [w.ok / w.seconds for w in tail]
    tail_p99 = [percentiles_ms(w.corrected)["p99"] or 0.0 for w in tail]
    return {
        k: (max(v) - min(v)) / max(v) * 100 if max(v) > 0 else 0.0 for k, v in (("throughput", tput), ("p99", tail_p99))
    }


def best_closed_step(steps: list[Step]) -> Step | None:
    """A closed-loop sweep's best step: the highest throughput among the steps that met the SLO
    (a sweep always has one: :func:`s_slo`). More callers past the knee only add queueing, and
    throughput may fall, so the last passing level is not necessarily the best; a tie goes to
    the lower concurrency (the same throughput with less waiting)."""
    passing = [s for s in steps if s.slo_met]
    if not passing:
        return None
    return max(passing, key=lambda s: (s.totals()["throughput"], -(s.concurrency or 0)))


def eta_text(seconds_left: float, upper_bound: bool, now: float | None = None) -> str:
    """'about 1m 05s left, done by 14:03:10' (or 'at most ...' when the sweep may stop sooner)."""
    secs = max(0, round(seconds_left))
    span = f"{secs // 3600}h {secs % 3600 // 60:02d}m" if secs >= 3600 else f"{secs // 60}m {secs % 60:02d}s"
    if secs < 60:
        span = f"{secs} s"
    when = time.strftime("%H:%M:%S", time.localtime((time.time() if now is None else now) + secs))
    return f"{'at most' if upper_bound else 'about'} {span} left, done by {when}"


def invalid_advice(sc: Scenario, *, behind: bool, lag_p99_ms: float | None, cores_per_worker: float, cpus: int) -> str:
    """What to change when an open-loop step is INVALID, from what went wrong.

    - The workers were busy (about a core each: one event loop per process): the generator
      lacks CPU, so more ``--workers`` while cores are left, or a lower rate. ``--precise-timing``
      spins a core per worker, so it is named as the thing to drop when it is on.
    - The workers were not busy and only the lag missed its bound by about the event loop's
      1 ms timer resolution: ``--precise-timing`` fixes exactly that.
    - The workers were not busy (they got less than 0.8 of a core each over the step) and yet fell
      behind: something else holds the cores (the server under test on the same machine), so
      run the generator elsewhere, or spread the sends over more ``--workers`` and ``--channels``
      / ``--connections``, or lower the rate.
    A lower ``--rate`` (or a lower top of the sweep) always applies, and comes last."""
    busy = cores_per_worker >= 0.8
    lower = "a lower --sweep-rate" if sc.sweep_rate else "a lower --rate"
    spread = "--channels" if sc.protocol == "grpc" else "--connections"
    spread_now = sc.channels if sc.protocol == "grpc" else sc.connections
    more_workers = (
        f"more --workers ({sc.workers} now, each busy {cores_per_worker:.2f} of a core; {cpus} cores here)"
        if sc.workers < cpus
        else None
    )
    if busy:
        if sc.precise_timing:
            options = ["drop --precise-timing (it keeps a core per worker spinning)", more_workers, lower]
        else:
            options = [more_workers, lower]
        if more_workers is None:
            options.append(f"a generator with more cores ({sc.workers} workers already use all {cpus})")
        return "the generator is short of CPU: " + ", or ".join(o for o in options if o)
    timer_bound = not behind and lag_p99_ms is not None and lag_p99_ms <= 3.0 and not sc.precise_timing
    if timer_bound:
        return (
            "the lag is the event loop's ~1 ms timer resolution: add --precise-timing, "
            f"or allow it with --max-lag-p99-ms (now {sc.max_lag_p99_ms:g})"
        )
    workers = f"more --workers ({sc.workers} now)" if sc.workers < cpus else None
    return (
        f"the workers got only {cores_per_worker:.2f} of a core each, so other work holds this machine's "
        "cores (the server under test?): run the generator elsewhere, or "
        + ", or ".join(
            o for o in (workers, f"more {spread} per worker ({spread_now} now)" if behind else None, lower) if o
        )
    )


def missed(step: Step) -> str:
    """Why a sweep step did not pass: the generator fell behind, or the server missed the SLO."""
    return "missed the SLO" if step.valid else "was INVALID (the generator fell behind)"


def not_found(why: str, rate: float) -> str:
    return (
        f"the sweep ends: {why}, so the limit was not found "
        f"(the sustainable throughput is at least {fmt_rate(rate)}/s; try higher rates)"
    )


def s_slo(sc: Scenario) -> bool:
    """Whether the scenario's steps are judged on an SLO: one it states (a p99 bound or an error
    budget), or a sweep's (its steps meet the default error budget at least: a rate where half
    the requests fail is not sustainable, however validly it was measured)."""
    return sc.slo_p99_ms is not None or sc.error_budget is not None or bool(sc.sweep_rate or sc.sweep_concurrency)


def slo_budget(sc: Scenario) -> float:
    """The error budget a step is judged on: the one given, else the default."""
    return sc.error_budget if sc.error_budget is not None else DEFAULT_ERROR_BUDGET


def verdict_words(step: Step) -> str:
    s = step.summary()
    p = s["corrected_ms"]
    words = [
        f"{s['throughput']:,.0f} ok/s",
        f"p99 {p['p99']:.2f} ms" if p["p99"] is not None else "no samples",
        "VALID" if step.valid else "INVALID: " + "; ".join(step.problems),
    ]
    if step.slo_met is not None:
        words.append("SLO met" if step.slo_met else "SLO breached: " + "; ".join(step.slo_problems))
    return ", ".join(words)
