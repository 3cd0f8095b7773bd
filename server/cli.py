"""``batchgate`` command line: ``serve`` and ``demo-repo``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import __version__, logs
from .config import ConfigError, describe, load_settings

log = logging.getLogger("batchgate")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC and HTTP",
                       description="Serve every model of a Triton-layout model repository. Each setting can "
                                   "also come from --config FILE (YAML) or BATCHGATE_<NAME> variables; "
                                   "flags win over the environment, which wins over the file.")
    p.add_argument("--config", help="YAML file of settings")
    p.add_argument("--model-repository", dest="model_repository")
    p.add_argument("--host")
    p.add_argument("--http-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--metrics-port", type=int, help="-1 turns the metrics endpoint off")
    p.add_argument("--model-control-mode", choices=("none", "poll", "explicit"))
    p.add_argument("--repository-poll-secs", type=float)
    p.add_argument("--load-model", action="append", help="explicit mode: load this model at start (repeatable; * = all)")
    p.add_argument("--default-max-batch-size", type=int)
    p.add_argument("--max-queue-size", type=int)
    p.add_argument("--max-request-bytes", type=int)
    p.add_argument("--infer-threads", type=int)
    p.add_argument("--batching-policy", choices=("triton", "work_conserving"),
                   help="how models with dynamic_batching form batches")
    p.add_argument("--model-batching-policy", action="append",
                   help="MODEL=POLICY: this model's batching policy (repeatable)")
    p.add_argument("--inline-execution-max-us", type=int,
                   help="run a model on the event loop when its executions are measured faster than this (0 = never)")
    p.add_argument("--warm-up", choices=("true", "false"))
    p.add_argument("--exit-timeout-secs", type=float)
    p.add_argument("--grpc-max-connection-age-secs", type=float,
                   help="close gRPC connections after this long so clients rebalance (0 = never)")
    p.add_argument("--log-format", choices=("plain", "json"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--gpu-device-id", type=int)
    p.add_argument("--remote-model", dest="remote_models", action="append",
                   help="a model served by remote V2 servers, as 'name=M upstreams=HOST:PORT[,HOST:PORT] "
                        "[batching=gateway|passthrough] [key=value ...]' (repeatable; see the README)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="batchgate", description="Open Inference Protocol gateway")
    ap.add_argument("--version", action="version", version=f"batchgate {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    d = sub.add_parser("demo-repo", help="write the demo model repository")
    d.add_argument("repo")
    sub.add_parser("settings", help="list every setting with its environment variable and default")
    # Their argument parsers only: torch, skl2onnx, hdrhistogram... are imported when they run.
    from .converters.cli import add_parser as add_convert_parser
    from .loadtest.cli import add_parser as add_loadtest_parser

    add_convert_parser(sub)
    add_loadtest_parser(sub)
    args = ap.parse_args(argv)

    if args.command == "demo-repo":
        from .demo import build_demo_repository

        build_demo_repository(args.repo)
        print(f"demo model repository written to {args.repo}")
        return 0
    if args.command == "loadtest":
        from .loadtest.cli import main as loadtest_main

        return loadtest_main(args)
    if args.command == "convert":
        from .converters.cli import main as convert_main

        return convert_main(args)
    if args.command == "settings":
        for name, env, default in describe():
            print(f"{name:24} {env:34} {default!r}")
        return 0

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        settings = load_settings(args.config, flags)
    except ConfigError as e:
        print(f"batchgate: configuration error: {e}", file=sys.stderr)
        return 2
    logs.setup(settings.log_format, settings.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - non-Linux
        pass
    return asyncio.run(_serve(settings))


async def _serve(settings) -> int:
    from .app import Gateway

    gateway = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except Exception as e:
        log.error("batchgate could not start: %s", e)
        await gateway.stop(0.1)
        return 1
    await stop.wait()
    log.info("shutdown signal received")
    clean = await gateway.stop()
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
