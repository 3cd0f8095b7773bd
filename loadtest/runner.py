"""The coordinator: starts the worker processes, runs steps and sweeps, merges what the
workers measure, watches the server's Prometheus endpoint, and gives each step its verdicts.

Verdicts per step:

- **valid**: the generator kept its schedule. Open loop: it dispatched at least
  ``min_achieved`` (99%) of the requests the schedule held for the measurement, and its
  dispatch lag p99 stayed under ``max_lag_p99_ms``. Otherwise the step is INVALID: the
  numbers describe the generator, not the server, and are not a result.
- **stable**: the last 3 measurement windows agree within ``stability_pct`` on throughput
  and on corrected p99 (perf_analyzer's rule, on p99 rather than the mean).
- **SLO met**: valid, corrected p99 within ``slo_p99_ms`` and the error rate within
  ``error_budget``.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

from . import payload as pl
from .results import Run, Step, Window, decode, percentiles_ms
from .scenario import (
    MAX_PAYLOAD_BYTES,
    LoadTestError,
    Scenario,
    concurrency_levels,
    fmt_rate,
    mean_rate,
    rate_label,
    rate_sweep,
    segments,
    shown_url,
    usable_cpus,
    without_password,
)
from .server_view import ScrapeError, batch_mean, fetch, gauges, scrape, scrape_timed, server_view
from .verdicts import (
    best_closed_step,
    eta_text,
    invalid_advice,
    missed,
    not_found,
    s_slo,
    slo_budget,
    stability_spread,
    verdict_words,
)
from .worker import Plan, Transport, rate_at
from .worker import main as worker_main


class Interrupted(Exception):
    """A Ctrl-C during a step, carrying what of the step is kept."""

    def __init__(self, step: Step):
        super().__init__(step.label)
        self.step = step


def _scaled(segs, n: int):
    return [(t0, t1, r0 / n, r1 / n) for t0, t1, r0, r1 in segs]


# ---------------------------------------------------------------------------- the runner


class Runner:
    def __init__(
        self,
        sc: Scenario,
        say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
        progress: Callable[[Window, str], str] | None = None,
    ):
        sc.check()
        self.sc = sc
        self.say = say
        self.progress = progress
        self._procs: list = []
        self._steps_run = 0
        self.metrics_url = sc.metrics_url  # None once it has failed to answer (see check_metrics)
        self._start_sweep(1, exact=True, upper_bound=False)

    # ------------------------------------------------------------------ set-up
    def _payloads(self) -> list[pl.Encoded]:
        sc = self.sc
        try:
            inputs = pl.model_inputs(sc.target, sc.protocol, sc.model, sc.version, sc.secure())
            types = {name: dt for name, dt, _ in inputs}
            if sc.data:
                reqs = pl.from_file(sc.data, inputs, MAX_PAYLOAD_BYTES)
            else:
                as_json = sc.protocol == "http" and sc.http_encoding == "json"
                pl.check_size(inputs, sc.batch_size, sc.dynamic_size, sc.payloads, as_json, MAX_PAYLOAD_BYTES)
                reqs = pl.generate(inputs, sc.batch_size, sc.dynamic_size, sc.payloads, sc.seed)
        except (pl.PayloadError, OSError) as e:
            raise LoadTestError(str(e)) from None
        if sc.protocol == "grpc":
            return [pl.encode_grpc(sc.model, sc.version, r, types) for r in reqs]
        return [pl.encode_http(r, types, sc.http_encoding == "binary") for r in reqs]

    def check_metrics(self) -> None:
        """Scrape ``--metrics-url`` once: when it does not answer with Prometheus text, say so in
        one line and run without the server view."""
        if not self.metrics_url:
            return
        try:
            fetch(self.metrics_url)
        except ScrapeError as e:
            url = shown_url(self.metrics_url)
            self.say(f"batchgate loadtest: warning: metrics-url {url}: {e}; running without the server view")
            self.metrics_url = None

    def start(self) -> None:
        sc = self.sc
        payloads = self._payloads()
        ctx = mp.get_context("spawn")  # gRPC does not survive fork
        self.out = ctx.Queue()
        transport = Transport(
            sc.target,
            sc.protocol,
            sc.model,
            sc.grpc_stream,
            sc.channels,
            sc.streams_per_channel,
            sc.connections,
            sc.secure(),
        )
        self.commands = []
        for i in range(sc.workers):
            cmd = ctx.Queue()
            p = ctx.Process(
                target=worker_main,
                args=(i, transport, payloads, cmd, self.out),
                daemon=True,
                name=f"loadtest-worker-{i}",
            )
            p.start()
            self._procs.append(p)
            self.commands.append(cmd)
        ready = 0
        end = time.monotonic() + 60
        while ready < sc.workers:
            try:
                msg = self.out.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise LoadTestError("the worker processes did not start within 60 s") from None
            if msg[0] == "error":
                self.stop()
                raise LoadTestError(msg[2])
            ready += msg[0] == "ready"

    def stop(self, at_once: bool = False) -> None:
        """End the workers: at the end of a run, when they have finished; after a Ctrl-C (which
        they ignore, see worker.main), at once, in the middle of a step."""
        for cmd in getattr(self, "commands", []):
            cmd.put(None)
        for p in self._procs:
            if at_once:
                p.kill()
            p.join(10)
            if p.is_alive():
                p.kill()
        self._procs = []

    # ------------------------------------------------------------------ one step
    def run_step(self, label: str, mode: str, rate: float | None = None, concurrency: int | None = None) -> Step:
        sc = self.sc
        n = sc.workers
        if self._steps_run and sc.cooldown_s > 0:
            time.sleep(sc.cooldown_s)
        self._steps_run += 1
        segs = segments(sc, rate) if mode == "open" else []
        step_id = int(time.monotonic_ns() % 1_000_000_000)
        start_ns = time.monotonic_ns() + int((0.2 + sc.warmup_s) * 1e9)  # the warm-up starts in 0.2 s
        conc = concurrency or sc.concurrency
        for i, cmd in enumerate(self.commands):
            share = conc // n + (1 if i < conc % n else 0)
            cmd.put(
                Plan(
                    step=step_id,
                    mode=mode,
                    start_ns=start_ns,
                    warmup_s=sc.warmup_s,
                    duration_s=sc.duration_s,
                    window_s=sc.window_s,
                    deadline_s=sc.deadline_ms / 1000,
                    segments=_scaled(segs, n),
                    arrival=sc.arrival,
                    offset=i / n,
                    concurrency=share,
                    seed=sc.seed * 1000 + i + 7919 * self._steps_run,
                    late_ms=sc.late_ms,
                    precise=sc.precise_timing,
                )
            )
        step = Step(
            label, mode, target_rate=rate if mode == "open" else None, concurrency=conc if mode == "closed" else None
        )
        windows: dict[int, Window] = {}
        w_ns = int(sc.window_s * 1e9)

        def window(i: int) -> Window:
            w = windows.get(i)
            if w is None:
                t0 = max(i * sc.window_s, -sc.warmup_s)  # (a warm-up shorter than a window: its own length)
                t1 = min((i + 1) * sc.window_s, sc.duration_s if i >= 0 else 0.0)
                tr = None
                if mode == "open":
                    tr = rate_at(segs, (t0 + t1) / 2) if t1 > t0 else rate_at(segs, t0)
                w = windows[i] = Window(i, t0, t1, "warmup" if i < 0 else "measure", tr)
            return w

        before = None  # the server's figures as the measurement starts (after the warm-up)
        previous, took_s = scrape_timed(self.metrics_url)  # the last scrape, for figures taken as differences
        # ``before`` is taken so that the server has written its page before the first measured
        # request leaves: one taken at 0 or later already counted a request sent at 0 and answered
        # meanwhile, and the server view came out short of what was sent. (A warm-up's requests
        # answered in that lead are counted instead: it is kept short, twice a scrape's time.)
        lead_s = min(0.1, 2 * took_s + 0.002)
        done, scheduled = 0, 0
        first = -math.ceil(sc.warmup_s / sc.window_s) if sc.warmup_s else 0
        shown = first  # next window to show progress for
        last = math.ceil(sc.duration_s / sc.window_s) - 1
        try:
            while done < n:
                wait_s = 0.05
                if before is None:  # (wake up in time for it)
                    wait_s = min(wait_s, max(0.0, (start_ns - time.monotonic_ns()) / 1e9 - lead_s))
                # Every message already queued is taken before a window is shown: taking one per turn,
                # a coordinator held up (a scrape of a stalled server waits up to 2 s) showed the
                # windows due meanwhile before their workers' counts were read: "send 0.0/50.0".
                msgs = []
                with contextlib.suppress(queue.Empty):
                    msgs.append(self.out.get(timeout=wait_s) if wait_s > 0 else self.out.get_nowait())
                    while len(msgs) < 10_000:
                        msgs.append(self.out.get_nowait())
                for msg in msgs:
                    kind = msg[0]
                    if kind == "done" and msg[2] == step_id:
                        done += 1
                        scheduled += msg[3]
                    elif kind == "window" and msg[2] == step_id:
                        _, _, _, idx, sent, ok, errors, late, c, u, lag, cpu, overflow = msg
                        w = window(idx)
                        w.sent += sent
                        w.ok += ok
                        for k, v in errors.items():
                            w.errors[k] = w.errors.get(k, 0) + v
                        w.late += late
                        w.cpu_s += cpu
                        w.overflow += overflow
                        for hist, blob in ((w.corrected, c), (w.uncorrected, u), (w.lag, lag)):
                            other = decode(blob)
                            if other.get_total_count():
                                hist.add(other)
                    elif kind == "error":
                        raise LoadTestError(msg[2])
                # a window is shown (and the server's gauges taken) a little after it ends
                now_s = (time.monotonic_ns() - start_ns) / 1e9
                if before is None and now_s >= -lead_s:
                    before = scrape(self.metrics_url) or {}
                turn = shown  # one window a turn while the step runs: what came during its scrape is read first
                while shown <= last and (done == n or (shown == turn and now_s > (shown + 1) * sc.window_s + 0.3)):
                    w = window(shown)
                    samples = scrape(self.metrics_url)
                    if samples is not None:
                        w.server = gauges(samples, sc.model)
                        mean = batch_mean(previous, samples, sc.model)
                        if mean is not None:
                            w.server["batch_size_mean"] = mean
                        previous = samples
                    if self.progress is not None:
                        self.say(self.progress(w, label))
                    shown += 1
                dead = [f"{p.name} (exit {p.exitcode})" for p in self._procs if not p.is_alive()]
                if dead:
                    raise LoadTestError(f"worker process(es) died during step '{label}': {', '.join(dead)}")
                if now_s > sc.duration_s + sc.deadline_ms / 1000 + 30:
                    raise LoadTestError("the workers did not finish the step")
        except KeyboardInterrupt:
            raise Interrupted(self._cut_short(step, windows, start_ns)) from None
        # The workers' CPU over the whole step, windows past the measurement included: a worker that
        # has fallen behind sends without yielding, and its CPU is only booked once it catches up.
        wall_s = (time.monotonic_ns() - start_ns) / 1e9 + sc.warmup_s
        cores_per_worker = sum(w.cpu_s for w in windows.values()) / max(wall_s, 1e-9) / n
        step.windows = [windows[i] for i in sorted(windows) if windows[i].start_s < sc.duration_s]
        step.server = server_view(before, scrape(self.metrics_url), sc.model, sc.protocol)
        self._verdicts(step, scheduled, w_ns, cores_per_worker)
        return step

    def _cut_short(self, step: Step, windows: dict[int, Window], start_ns: int) -> Step:
        """The step as far as a Ctrl-C let it go: only the windows whose every request had been
        answered or had timed out by then (a window's slowest answers come last: one cut before
        them would keep its fast ones only), marked INVALID, as a step that was not finished."""
        sc = self.sc
        at_s = (time.monotonic_ns() - start_ns) / 1e9
        cut_s = at_s - sc.deadline_ms / 1000 - 0.3  # (a worker reports every 0.25 s)
        step.windows = [windows[i] for i in sorted(windows) if windows[i].end_s <= cut_s]
        step.valid = False
        kept = len(step.measured())
        step.problems.append(
            f"interrupted {max(0.0, at_s):.1f} s into the measurement: {kept} whole window(s) kept, "
            "those whose requests had all been answered or timed out"
        )
        return step

    def _verdicts(self, step: Step, scheduled: int, w_ns: int, cores_per_worker: float) -> None:
        sc = self.sc
        t = step.totals()
        lag = percentiles_ms(step.hist("lag"))
        step.stability["scheduled"] = scheduled
        if step.mode == "open":
            ratio = t["sent"] / scheduled if scheduled else 0.0
            step.stability["achieved_ratio"] = ratio
            behind = ratio < sc.min_achieved
            lagging = lag["p99"] is not None and lag["p99"] > sc.max_lag_p99_ms
            if behind:
                step.problems.append(
                    f"the generator sent {t['sent']:,} of the {scheduled:,} requests scheduled "
                    f"({ratio:.1%} < {sc.min_achieved:.0%}): it fell behind"
                )
            if lagging:
                step.problems.append(f"generator dispatch lag p99 {lag['p99']:.1f} ms > {sc.max_lag_p99_ms:g} ms")
            if behind or lagging:
                step.valid = False
                step.problems.append(
                    "to fix: "
                    + invalid_advice(
                        sc,
                        behind=behind,
                        lag_p99_ms=lag["p99"],
                        cores_per_worker=cores_per_worker,
                        cpus=usable_cpus(),
                    )
                )
        if t["sent"] == 0:
            step.valid = False
            step.problems.append("no request was sent")
        spread = stability_spread(step.measured(), sc.window_s)
        if spread is not None:
            step.stable = all(s <= sc.stability_pct for s in spread.values())
            step.stability.update({f"{k}_spread_pct": v for k, v in spread.items()})
        if s_slo(sc):
            budget = slo_budget(sc)
            p99 = percentiles_ms(step.hist("corrected"))["p99"]
            if not step.valid:
                step.slo_problems.append("invalid measurement")
            if sc.slo_p99_ms is not None and (p99 is None or p99 > sc.slo_p99_ms):
                step.slo_problems.append(f"p99 {p99 if p99 is None else round(p99, 2)} ms > {sc.slo_p99_ms:g} ms")
            if t["error_rate"] > budget:
                step.slo_problems.append(f"error rate {t['error_rate']:.2%} > budget {budget:.2%}")
            step.slo_met = not step.slo_problems

    # ------------------------------------------------------------------ whole runs
    def run(self) -> Run:
        sc = self.sc
        scenario = asdict(sc)
        if sc.metrics_url:  # a report is shared: no password from the URL in it
            scenario["metrics_url"] = without_password(sc.metrics_url)
        run = Run(scenario=scenario, environment=environment(sc))
        self.check_metrics()
        by = ["Ctrl-C"]

        def terminated(signum, frame):  # SIGTERM (timeout, a cancelled job, Kubernetes) as a Ctrl-C
            by[0] = "SIGTERM"
            raise KeyboardInterrupt

        main_thread = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGTERM, terminated) if main_thread else None
        try:
            self.start()
            if sc.sweep_concurrency:
                self._sweep_concurrency(run)
            elif sc.sweep_rate:
                self._sweep_rate(run)
            elif sc.mode == "closed":
                run.steps.append(self.run_step(f"concurrency {sc.concurrency} (closed loop)", "closed"))
            else:  # a shape is offered at its mean rate
                offered = mean_rate(segments(sc), sc.duration_s)
                run.steps.append(self.run_step(rate_label(sc), "open", offered))
        except Interrupted as e:  # Ctrl-C: keep what was measured, and say so
            if e.step.measured():
                run.steps.append(e.step)
            run.interrupted = f"interrupted ({by[0]}) during step '{e.step.label}'"
        except KeyboardInterrupt:
            run.interrupted = f"interrupted ({by[0]}) between steps"
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, before)
            self.stop(at_once=run.interrupted is not None)
        run.terminated = by[0] == "SIGTERM"
        return run

    def _sweep_step(self, run: Run, label: str, mode: str, **load) -> Step:
        """Run one step of a sweep, announced as "step k of n" with the time left, then judged."""
        k = len(run.steps) + 1
        n, exact = self._plan
        of = f"{k} of {n}" if exact else f"{k} of at most {n}"
        left = self._step_seconds() * (n - k + 1)
        self.say(f"step {of}: {label} ({eta_text(left, upper_bound=self._upper_bound)})")
        started = time.monotonic()
        label = self._unique(run, label, load.get("rate"))
        step = self.run_step(label, mode, **load)
        self._durations.append(time.monotonic() - started)
        run.steps.append(step)
        self.say(f"step {of}: {label}: {verdict_words(step)}")
        return step

    def _unique(self, run: Run, label: str, rate: float | None) -> str:
        """``label``, or one with more digits of the rate (or the step's number) when an earlier
        step has it already (a binary search's rates can agree to six digits)."""
        taken = {s.label for s in run.steps}
        if label not in taken:
            return label
        if rate is not None:
            for digits in (9, 12, 17):
                longer = f"{self.sc.arrival} {fmt_rate(rate, digits)}/s"
                if longer not in taken:
                    return longer
        return f"{label} (step {len(run.steps) + 1})"

    def _step_seconds(self) -> float:
        """How long a step takes: the mean of those run so far, or the scenario's estimate."""
        if self._durations:
            return sum(self._durations) / len(self._durations)
        sc = self.sc
        return 0.2 + sc.warmup_s + sc.duration_s + sc.cooldown_s + 0.5  # start offset, drain and scrapes

    def _start_sweep(self, n: int, exact: bool, upper_bound: bool) -> None:
        self._plan = (n, exact)
        self._upper_bound = upper_bound
        self._durations: list[float] = []

    def _sweep_rate(self, run: Run) -> None:
        sc = self.sc
        sweep = rate_sweep(sc)
        run.sweep = {
            "kind": "rate",
            "method": sweep.method,
            "best": None,
            "slo": {"p99_ms": sc.slo_p99_ms, "error_budget": slo_budget(sc)},
        }
        # both searches may stop early: a step search at its first miss, a binary search when an end decides it
        self._start_sweep(sweep.most_steps, exact=sweep.method == "step", upper_bound=True)

        def open_step(rate: float) -> Step:
            return self._sweep_step(run, rate_label(sc, rate), "open", rate=rate)

        if sweep.method == "step":
            for k, rate in enumerate(sweep.rates, 1):
                step = open_step(rate)
                if not step.slo_met:
                    if k < len(sweep.rates):
                        self.say(
                            f"the sweep stops at step {k} of {len(sweep.rates)}: it {missed(step)} "
                            f"({len(sweep.rates) - k} higher rate(s) not run)"
                        )
                    break
                run.sweep["best"] = step.label
            else:
                self.say(not_found(f"every rate passed, up to {fmt_rate(sweep.rates[-1])}/s", sweep.rates[-1]))
            return
        low, high = sweep.rates
        step = open_step(low)
        if not step.slo_met:
            self.say(f"the sweep stops: even its lowest rate {missed(step)}")
            return
        run.sweep["best"] = step.label
        step = open_step(high)
        if step.slo_met:
            run.sweep["best"] = step.label
            self.say(not_found("even its highest rate passed", high))
            return
        while high - low > sweep.precision and len(run.steps) < sweep.most_steps:
            mid = (low + high) / 2
            if not low < mid < high:  # the bracket is as narrow as floats go
                break
            step = open_step(mid)
            if step.slo_met:
                low = mid
                run.sweep["best"] = step.label
            else:
                high = mid

    def _sweep_concurrency(self, run: Run) -> None:
        sc = self.sc
        levels = concurrency_levels(sc.sweep_concurrency or "")
        run.sweep = {
            "kind": "concurrency",
            "method": "step",
            "best": None,
            "slo": {"p99_ms": sc.slo_p99_ms, "error_budget": slo_budget(sc)},
        }
        self._start_sweep(len(levels), exact=True, upper_bound=False)
        for c in levels:
            self._sweep_step(run, f"concurrency {c} (closed loop)", "closed", concurrency=c)
        best = best_closed_step(run.steps)
        run.sweep["best"] = best.label if best is not None else None


def environment(sc: Scenario) -> dict:
    from batchgate import __version__

    sha = None
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        sha = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            or None
        )
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "batchgate": __version__,
        "git": sha,
        "target": sc.target,
        "protocol": sc.protocol,
        "workers": sc.workers,
    }
