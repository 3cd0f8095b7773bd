"""``batchgate loadtest``: the command line of the load-test harness."""

from __future__ import annotations

import argparse
import dataclasses
import sys

EXIT_OK, EXIT_SLO, EXIT_USAGE, EXIT_INVALID = 0, 1, 2, 3


def add_parser(sub) -> None:
    from .scenario import Scenario

    d = Scenario("", "")
    p = sub.add_parser(
        "loadtest",
        help="load-test any Open Inference Protocol server (open loop by default)",
        description="Drive a V2 server (batchgate, Triton, KServe, MLServer) over gRPC or HTTP. Open loop by "
        "default: requests leave on schedule, and latency is timed from the intended send time "
        "(corrected for coordinated omission) and from the actual send time. Exit status: 0 ok, "
        "1 SLO breached, 2 bad arguments or unreachable server, 3 invalid measurement (the generator "
        "fell behind).",
    )
    p.add_argument("target", nargs="?", help="host:port of the server's gRPC (default) or HTTP endpoint")
    p.add_argument("--scenario", help="YAML file of scenario keys (the long option names with _); flags win")
    p.add_argument("--model")
    p.add_argument("--model-version", dest="version")
    p.add_argument("--protocol", choices=("grpc", "http"))
    p.add_argument("--http-encoding", choices=("json", "binary"), help=f"HTTP body (default {d.http_encoding})")
    p.add_argument("--grpc-stream", action="store_true", default=None, help="send over ModelStreamInfer streams")
    p.add_argument("--rate", type=float, help=f"open loop: requests/s over all workers (default {d.rate:g})")
    p.add_argument("--arrival", choices=("constant", "poisson"))
    p.add_argument("--shape", help="ramp:R0:R1 | step:R1@T1,R2@T2,... | spike:BASE:PEAK@AT+LEN (seconds)")
    p.add_argument("--concurrency", type=int, help="closed loop: this many callers, each waiting for its answer")
    p.add_argument("--duration", dest="duration_s", type=float, help=f"seconds measured (default {d.duration_s:g})")
    p.add_argument("--warmup", dest="warmup_s", type=float, help=f"seconds of warm-up (default {d.warmup_s:g})")
    p.add_argument("--window", dest="window_s", type=float, help=f"window seconds (default {d.window_s:g})")
    p.add_argument(
        "--cooldown", dest="cooldown_s", type=float, help=f"seconds between sweep steps (default {d.cooldown_s:g})"
    )
    p.add_argument("--deadline-ms", type=float, help=f"every request's deadline (default {d.deadline_ms:g})")
    p.add_argument("--workers", type=int, help="generator processes")
    p.add_argument("--channels", type=int, help="gRPC channels (connections) per worker")
    p.add_argument("--streams-per-channel", type=int, help="gRPC requests in flight per channel (0 = no limit)")
    p.add_argument("--connections", type=int, help="HTTP keep-alive connections per worker")
    p.add_argument("--batch-size", type=int, help="rows per request (the first dimension)")
    p.add_argument("--dynamic-size", type=int, help="size given to other dynamic dimensions")
    p.add_argument("--data", help=".npz (one request) or .jsonl (V2 JSON request bodies) to send")
    p.add_argument("--seed", type=int)
    p.add_argument("--slo-p99-ms", type=float, help="SLO on the corrected p99; breached: exit status 1")
    p.add_argument(
        "--error-budget",
        type=float,
        help="allowed error rate, part of the SLO (default 0.001 with --slo-p99-ms); a breach exits 1",
    )
    p.add_argument("--stability-pct", type=float)
    p.add_argument(
        "--precise-timing",
        action="store_true",
        default=None,
        help="dispatch within tens of microseconds of the schedule (spins; costs a busy core)",
    )
    p.add_argument("--max-lag-p99-ms", type=float, help="generator lag above which a step is invalid")
    p.add_argument("--metrics-url", help="the server's Prometheus endpoint, scraped during the run")
    p.add_argument("--sweep-rate", help="START:END:STEP (step search) or LOW:HIGH with --search binary")
    p.add_argument("--search", choices=("step", "binary"))
    p.add_argument("--precision", type=float, help="binary search: stop when the bracket is this narrow (req/s)")
    p.add_argument("--sweep-concurrency", help="closed-loop levels, e.g. 1,2,4,8,16")
    p.add_argument("--out", default="loadtest-results", help="folder for the reports and plots")
    p.add_argument("--quiet", action="store_true", help="no live progress")


def scenario_from(args: argparse.Namespace):
    from .scenario import LoadTestError, Scenario

    values: dict = {}
    if args.scenario:
        import yaml

        try:
            with open(args.scenario, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise LoadTestError(f"cannot read scenario {args.scenario}: {e}") from None
        known = {f.name for f in dataclasses.fields(Scenario)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoadTestError(f"scenario {args.scenario}: unknown key(s) {', '.join(unknown)}")
        values.update(data)
    for fld in dataclasses.fields(Scenario):
        v = getattr(args, fld.name, None)
        if v is not None:
            values[fld.name] = v
    if args.concurrency is not None and args.rate is None and "mode" not in values:
        values["mode"] = "closed"
    if not values.get("target") or not values.get("model"):
        raise LoadTestError("a target (host:port) and --model are needed")
    try:
        return Scenario(**values)
    except TypeError as e:
        raise LoadTestError(str(e)) from None


def main(args: argparse.Namespace) -> int:
    from .scenario import LoadTestError

    try:
        from . import report
        from .runner import Runner
    except ImportError as e:
        print(f"batchgate loadtest: {e.name} is missing: pip install 'batchgate[loadtest]'", file=sys.stderr)
        return EXIT_USAGE

    try:
        sc = scenario_from(args)
        runner = Runner(sc, progress=None if args.quiet else report.progress_line)
        run = runner.run()
    except LoadTestError as e:
        print(f"batchgate loadtest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    print(report.table(run))
    paths = report.write_all(run, args.out)
    print(f"\nreports: {', '.join(sorted(set(paths.values())))}", file=sys.stderr)
    return exit_status(run)


def exit_status(run) -> int:
    if not run.valid:
        return EXIT_INVALID
    if run.slo_met is False:
        return EXIT_SLO
    return EXIT_OK
