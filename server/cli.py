"""``batchgate`` command line: ``serve`` (its flags made from the settings table), ``settings``,
``demo-repo``, ``convert``, ``loadtest``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import warnings

from . import __version__, logs
from .config import ALIASES, ENV_PREFIX, SETTINGS, ConfigError, load_settings

log = logging.getLogger("batchgate")


METAVARS = {"int": "N", "float": "SECONDS", "str": "TEXT", "list": "VALUE", "remote_models": "SPEC"}


class _Store(argparse.Action):
    """Stores the value and the spelling the user typed (--exit-timeout-secs is the alias
    exit_timeout_secs), so that messages about the setting use the name the user wrote."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        vars(namespace).setdefault("_spelled", {})[self.dest] = (option_string or "")[2:].replace("-", "_")


def serve_flags(args: argparse.Namespace) -> dict:
    """The flat flags dict load_settings takes, keyed by the name or alias the user typed."""
    spelled = vars(args).get("_spelled", {})
    return {
        (spelled[k] if spelled.get(k) in ALIASES else k): v
        for k, v in vars(args).items()
        if k not in ("command", "config", "_spelled")
    }


def _serve_parser(sub) -> None:
    """`batchgate serve`: one flag per row of the settings table, made from the table."""
    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC and HTTP",
        description="Serve every model of a Triton-layout model repository. Each setting can "
        "also come from --config FILE (YAML, in sections) or BATCHGATE_<NAME> "
        "variables; flags win over the environment, which wins over the file. "
        "`batchgate settings` lists them all.",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of settings, in sections (server, repository, limits, batching, auth, tls, remote_models)",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in SETTINGS.values():
        section = spec.section or "remote_models"
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} settings" if spec.section else "remote models")
        extra = ", ".join(
            [
                f"default {_shown(spec.default)}" if spec.default not in ("", ()) else "",
                spec.env,
                *(f"alias {a}" for a in spec.aliases),
            ]
        ).strip(", ")
        kw: dict = {"dest": spec.name, "default": None, "help": f"{spec.help} ({extra})".replace("%", "%%")}
        kw["action"] = "append" if spec.repeatable else _Store
        if spec.kind == "bool":
            kw["choices"] = ("true", "false")
        elif spec.choices:
            kw["choices"] = spec.choices
        else:
            kw["metavar"] = spec.metavar or METAVARS[spec.kind]
        groups[section].add_argument(spec.flag, *("--" + a.replace("_", "-") for a in spec.aliases), **kw)


def _shown(default) -> str:
    """A default as it is written in YAML (true, not True; [] for an empty list)."""
    return str(default).lower() if isinstance(default, bool) else "[]" if default == () else repr(default)


def _print_settings() -> None:
    rows = [("section", "setting", "environment variable", "default", "aliases")]
    for spec in SETTINGS.values():
        rows.append(
            (
                spec.section or "(top)",
                spec.name,
                spec.env,
                _shown(spec.default),
                ", ".join(f"{a} ({ENV_PREFIX}{a.upper()})" for a in spec.aliases),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print(("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4]).rstrip())
    print(
        "\nYAML: each setting under its section (remote_models: a list at the top); environment: "
        f"{ENV_PREFIX}<NAME> (lists comma-separated, remote models ';'-separated); flag: --<name-with-dashes>, "
        "--remote-model for remote_models (see `batchgate serve --help`). An alias works wherever its name does."
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="batchgate", description="Open Inference Protocol gateway")
    ap.add_argument("--version", action="version", version=f"batchgate {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    d = sub.add_parser("demo-repo", help="write the demo model repository")
    d.add_argument("repo")
    sub.add_parser("settings", help="list every setting with its section, environment variable, default and aliases")
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
        _print_settings()
        return 0

    flags = serve_flags(args)
    with warnings.catch_warnings(record=True) as caught:  # deprecated forms: logged once logging is set up
        warnings.simplefilter("always")
        try:
            settings = load_settings(args.config, flags)
        except ConfigError as e:
            for w in caught:
                print(f"batchgate: warning: {w.message}", file=sys.stderr)
            print(f"batchgate: configuration error: {e}", file=sys.stderr)
            return 2
    logs.setup(settings.server.log_format, settings.server.log_level)
    for w in caught:
        log.warning("%s", w.message)
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
