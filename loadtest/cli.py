"""``batchgate loadtest``: the command line of the load-test harness."""

from __future__ import annotations

import argparse
import dataclasses
import sys

EXIT_OK, EXIT_SLO, EXIT_USAGE, EXIT_INVALID = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped by timeout, a cancelled job or Kubernetes


DEFAULT_OUT = "loadtest-results"  # relative to the current folder; git-ignored in this repository


def add_parser(sub) -> None:
    p = sub.add_parser(
        "loadtest",
        help="load-test any Open Inference Protocol server (open loop by default)",
        description="Drive a V2 server (batchgate, Triton, KServe, MLServer) over gRPC or HTTP. Open loop by "
        "default: requests leave on schedule, and latency is timed from the intended send time "
        "(corrected for coordinated omission) and from the actual send time. Exit status: 0 ok, "
        "1 SLO breached, 2 bad arguments or unreachable server, 3 invalid measurement (the generator "
        "fell behind).",
    )
    p.add_argument(
        "--scenario",
        metavar="FILE",
        help="YAML file of settings keyed by these flags' long names (duration: 30, sweep-rate: 100:900:100, "
        "sweep-concurrency: [1, 2, 4]) and target; flags given here win; see loadtest/examples/",
    )
    options(p)


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """Add the load test's settings to ``p``; returns their actions (a scenario file's keys)."""
    from .scenario import (
        MAX_BINARY_STEPS,
        MAX_CONCURRENCY,
        MAX_PAYLOAD_BYTES,
        MAX_PAYLOADS,
        MAX_WORKERS,
        WORKERS_PER_CPU,
        Scenario,
    )

    d = Scenario("", "")
    actions: list[argparse.Action] = []

    def add(*names: str, **kw) -> None:
        actions.append(p.add_argument(*names, **kw))

    add("target", nargs="?", help="host:port of the server's gRPC (default) or HTTP endpoint")
    add("--model", help="the model to send requests to (required, here or in --scenario)")
    add("--model-version", dest="version", help="the model's version (default: the server's choice)")
    add("--protocol", choices=("grpc", "http"), help=f"how to reach the target (default {d.protocol})")
    add("--http-encoding", choices=("json", "binary"), help=f"HTTP body (default {d.http_encoding})")
    add(
        "--grpc-stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send over ModelStreamInfer streams (default: unary calls)",
    )
    add("--rate", type=float, help=f"open loop: requests/s over all workers (default {d.rate:g})")
    add("--arrival", choices=("constant", "poisson"), help=f"spacing of the sends (default {d.arrival})")
    add(
        "--shape",
        help="open loop, instead of --rate: ramp:R0:R1 | step:R1@T1,R2@T2,... | spike:BASE:PEAK@AT+LEN "
        "(rates in req/s, times in seconds within --duration; default: none, a constant --rate)",
    )
    add(
        "--concurrency",
        type=int,
        help=f"closed loop: this many callers over all workers, each waiting for its answer "
        f"(default {d.concurrency}; at most {MAX_CONCURRENCY:,})",
    )
    add(
        "--duration",
        dest="duration_s",
        metavar="SECONDS",
        type=float,
        help=f"seconds measured (default {d.duration_s:g})",
    )
    add("--warmup", dest="warmup_s", metavar="SECONDS", type=float, help=f"seconds of warm-up (default {d.warmup_s:g})")
    add("--window", dest="window_s", metavar="SECONDS", type=float, help=f"window seconds (default {d.window_s:g})")
    add(
        "--cooldown",
        dest="cooldown_s",
        metavar="SECONDS",
        type=float,
        help=f"seconds between sweep steps (default {d.cooldown_s:g})",
    )
    add("--deadline-ms", type=float, help=f"every request's deadline (default {d.deadline_ms:g})")
    add(
        "--workers",
        type=int,
        help=f"generator processes, one busy core each at most (default {d.workers}; at most "
        f"{WORKERS_PER_CPU} per CPU and {MAX_WORKERS})",
    )
    add("--channels", type=int, help=f"gRPC channels (connections) per worker (default {d.channels})")
    add(
        "--streams-per-channel",
        type=int,
        help=f"gRPC requests in flight per channel (default {d.streams_per_channel}: no limit)",
    )
    add("--connections", type=int, help=f"HTTP keep-alive connections per worker (default {d.connections})")
    add(
        "--token-file",
        metavar="FILE",
        help="a file holding an API key (scopes infer and read), sent as authorization: Bearer; kept off the "
        "command line, where ps shows it (default: none)",
    )
    add(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TLS, trusting the system's CAs unless --tls-ca (default: plaintext)",
    )
    add("--tls-ca", metavar="FILE", help="the CA certificate the server's is signed by; implies --tls (default: none)")
    add("--tls-cert", metavar="FILE", help="a client certificate, for a server that asks for one (default: none)")
    add("--tls-key", metavar="FILE", help="the private key of --tls-cert (default: none)")
    add(
        "--batch-size",
        type=int,
        help=f"rows per request, the first dimension (default {d.batch_size}; all generated requests "
        f"together at most {MAX_PAYLOAD_BYTES >> 30} GiB)",
    )
    add("--dynamic-size", type=int, help=f"size given to other dynamic dimensions (default {d.dynamic_size})")
    add(
        "--data",
        metavar="FILE",
        help=".npz (one request) or .jsonl (V2 JSON request bodies) to send (default: generated requests)",
    )
    add(
        "--payloads",
        type=int,
        help=f"distinct generated requests, sent in turn (default {d.payloads}; at most {MAX_PAYLOADS:,})",
    )
    add("--seed", type=int, help=f"seed of the generated data and Poisson arrivals (default {d.seed})")
    add("--slo-p99-ms", type=float, help="SLO on the corrected p99; breached: exit status 1 (default: none)")
    add(
        "--error-budget",
        type=float,
        help="allowed error rate, part of the SLO (default 0.001 with --slo-p99-ms); a breach exits 1",
    )
    add(
        "--stability-pct",
        type=float,
        help=f"a step is stable when its last 3 windows agree within this %% (default {d.stability_pct:g})",
    )
    add(
        "--precise-timing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dispatch within tens of microseconds of the schedule (spins; costs a busy core; default off)",
    )
    add(
        "--max-lag-p99-ms",
        type=float,
        help=f"generator lag above which a step is invalid (default {d.max_lag_p99_ms:g})",
    )
    add(
        "--min-achieved",
        type=float,
        help=f"share of the scheduled requests the generator must send for a valid step (default {d.min_achieved:g})",
    )
    add("--late-ms", type=float, help=f"a send later than this counts as late (default {d.late_ms:g})")
    add(
        "--metrics-url",
        help="the server's Prometheus endpoint (http:// or https://), scraped during the run (default: none)",
    )
    add(
        "--sweep-rate",
        help="START:END:STEP or R1,R2,... (step search), LOW:HIGH with --search binary (default: none)",
    )
    add("--search", choices=("step", "binary"), help=f"how --sweep-rate searches (default {d.search})")
    add(
        "--precision",
        type=float,
        help="binary search: stop when the bracket is this narrow, in req/s (default: 1/32 of the bracket, "
        f"at least 1; at most {MAX_BINARY_STEPS} steps)",
    )
    add("--sweep-concurrency", help="closed-loop levels, e.g. 1,2,4,8,16 (default: none)")
    add("--out", metavar="DIR", help=f"folder for the reports and plots (default ./{DEFAULT_OUT})")
    add("--quiet", action=argparse.BooleanOptionalAction, default=None, help="no live line per window (default off)")
    return actions


def scenario_keys():
    """The keys a scenario file may use (the flags' long names and ``target``), by name."""
    from .scenario_file import file_keys

    return file_keys(options(argparse.ArgumentParser(add_help=False)))


def resolve(args: argparse.Namespace):
    """The scenario, the output folder and whether to be quiet: the flags over the scenario file.

    ``--concurrency`` without ``--rate`` is a closed loop; so is ``concurrency`` without ``rate``
    in the file, unless the flags give a rate (what is given at the higher level wins); and so is
    a concurrency sweep."""
    from .scenario import LoadTestError, Scenario

    given = {k: v for k, v in vars(args).items() if v is not None}
    from_file: dict = {}
    if args.scenario:
        from .scenario_file import read

        from_file = read(args.scenario, scenario_keys())
    merged = {**from_file, **given}
    level = {k: 2 if k in given else 1 if k in from_file else 0 for k in ("concurrency", "rate")}
    values = {f.name: merged[f.name] for f in dataclasses.fields(Scenario) if f.name in merged}
    if level["concurrency"] > level["rate"] or values.get("sweep_concurrency"):
        values["mode"] = "closed"  # a concurrency sweep is closed loop whatever the rate says
    if not values.get("target") or not values.get("model"):
        raise LoadTestError("a target (host:port) and --model are needed (or target: and model: in --scenario)")
    try:
        sc = Scenario(**values)
    except TypeError as e:
        raise LoadTestError(str(e)) from None
    fields = [f.name for f in dataclasses.fields(Scenario)]
    refuse_ignored(sc, {k: 2 if k in given else 1 if k in from_file else 0 for k in fields})
    return sc, merged.get("out") or DEFAULT_OUT, bool(merged.get("quiet"))


def refuse_ignored(sc, level: dict[str, int]) -> None:
    """Refuse a setting the run would not use, given beside the one that makes it unused (it was
    ignored without a word: a --rate beside a --shape measured the shape's rates). ``level``: where
    each setting came from, 2 the flags, 1 the scenario file, 0 neither; a setting overridden from
    a higher level (the file's rate, a --shape flag) is the override's doing, and stays allowed."""
    from .scenario import LoadTestError, flag, shaped

    def over(k: str, *by: str) -> bool:
        return level[k] > 0 and level[k] >= max(level[b] for b in by)

    def refuse(k: str, other: str, why: str) -> None:
        raise LoadTestError(f"{flag(k)} cannot be combined with {flag(other)}: {why}")

    if level["rate"] and level["rate"] == level["concurrency"]:
        refuse("rate", "concurrency", "rate is an open loop, concurrency a closed one; give one of them")
    if shaped(sc) and over("rate", "shape"):
        refuse("rate", "shape", "a shape sets its own rates")
    if sc.sweep_rate and over("rate", "sweep_rate"):
        refuse("rate", "sweep_rate", "the sweep sets each step's rate")
    if sc.mode == "closed":
        by = "sweep_concurrency" if sc.sweep_concurrency else "concurrency"
        if sc.sweep_concurrency:
            for k in ("rate", "concurrency"):
                if over(k, by):
                    refuse(k, by, "the sweep sets each step's concurrency, in a closed loop")
        for k, used in (
            ("shape", shaped(sc)),
            ("arrival", sc.arrival != "constant"),
            ("precise_timing", sc.precise_timing),
        ):
            if used and over(k, by):
                refuse(k, by, f"{flag(k)} is for an open loop (rate), and {flag(by)} makes a closed one")
    unused: tuple[str, ...] = ("channels", "streams_per_channel") if sc.protocol == "http" else ("connections",)
    if sc.protocol == "grpc" and sc.http_encoding != "json":
        unused += ("http_encoding",)
    for k in unused:
        if over(k, "protocol"):
            other = "gRPC" if sc.protocol == "http" else "HTTP"
            raise LoadTestError(f"{flag(k)} is a setting of {other} only, and protocol is {sc.protocol}")
    if sc.data:
        for k in ("batch_size", "dynamic_size", "payloads"):
            if over(k, "data"):
                refuse(k, "data", "the file's requests are sent as they are (these shape generated ones)")
    if level["cooldown_s"] and sc.cooldown_s > 0 and not (sc.sweep_rate or sc.sweep_concurrency):
        raise LoadTestError("cooldown is the pause between the steps of a sweep, and this run has one step")


def scenario_from(args: argparse.Namespace):
    return resolve(args)[0]


def main(args: argparse.Namespace) -> int:
    from .scenario import LoadTestError

    try:
        from . import report
        from .runner import Runner
    except ImportError as e:
        print(f"batchgate loadtest: {e.name} is missing: pip install 'batchgate[loadtest]'", file=sys.stderr)
        return EXIT_USAGE

    try:
        sc, out, quiet = resolve(args)
        runner = Runner(sc, progress=None if quiet else report.progress_line)
        run = runner.run()
    except LoadTestError as e:
        print(f"batchgate loadtest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # (before the workers started: nothing measured)
        return EXIT_INTERRUPTED
    print(report.table(run))
    paths = report.write_all(run, out)
    print(f"\nreports: {', '.join(sorted(set(paths.values())))}", file=sys.stderr)
    if run.interrupted:
        print(f"batchgate loadtest: {run.interrupted}: the reports hold what was measured before it", file=sys.stderr)
        return EXIT_TERMINATED if run.terminated else EXIT_INTERRUPTED
    return exit_status(run)


def exit_status(run) -> int:
    if not run.valid:
        return EXIT_INVALID
    if run.slo_met is False:
        return EXIT_SLO
    if run.slo_met is not None:
        # Judged on an SLO, the run stands on that verdict. A sweep's steps above its knee miss the
        # SLO as they should, and one of them answering nothing at all made a sweep that had found
        # its sustainable rate, and said so, exit 1.
        return EXIT_OK
    failed = [s.label for s in run.steps if not any(w.ok for w in s.measured()) and any(w.sent for w in s.measured())]
    if failed:  # (with no SLO given: a step that answered nothing is still not a pass)
        print(f"batchgate loadtest: no request was answered OK in step(s) {', '.join(failed)}", file=sys.stderr)
        return EXIT_SLO
    return EXIT_OK
