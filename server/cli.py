"""``batchgate`` command line: ``serve`` (its flags made from the settings table), ``settings``,
``demo-repo``, ``convert``, ``loadtest``, ``keys``."""

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
            kw["metavar"] = spec.metavar or ("MS" if spec.name.endswith("_ms") else METAVARS[spec.kind])
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


def _keys_parser(sub) -> None:
    """`batchgate keys new | check | hash`: make and check entries of the API keys file."""
    k = sub.add_parser("keys", help="make and check API keys (the api_keys_file)", description=_keys_parser.__doc__)
    ks = k.add_subparsers(dest="keys_command", required=True)
    n = ks.add_parser(
        "new",
        help="make a key: print a fresh token (once) and the entry to paste under 'keys:'",
        description="Print a fresh token, shown once and stored nowhere, then the keys-file entry holding "
        "its SHA-256. Give the token to the client; paste the entry under 'keys:' in the api_keys_file.",
    )
    n.add_argument("--id", required=True, metavar="NAME", help="the key's name (model name rule)")
    n.add_argument("--scopes", required=True, metavar="LIST", help="comma list of infer, read, admin")
    n.add_argument(
        "--models", action="append", metavar="PATTERN", help="model name patterns (repeatable or comma list; default *)"
    )
    n.add_argument("--rate-per-s", metavar="N", help="requests per second allowed (default: unlimited)")
    n.add_argument("--burst", metavar="N", help="bucket size of the rate (default: max(1, ceil(rate)))")
    n.add_argument(
        "--cert-subject", action="append", metavar="DN", help="mTLS client certificate subject acting as the key"
    )
    c = ks.add_parser("check", help="check a keys file and list its keys")
    c.add_argument("file")
    ks.add_parser("hash", help="print the sha256 of a token read from stdin (for an existing token)")


def _number(text: str | None) -> int | float | str | None:
    """A flag's number as YAML would read it (100 stays an int); text that is none is kept for
    the keys-file check to refuse in its words."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _keys_main(args: argparse.Namespace) -> int:
    import yaml

    from .security import auth

    if args.keys_command == "check":
        try:
            keys, _ = auth.read_keys_file(args.file)
        except ConfigError as e:
            print(f"batchgate keys check: {e}", file=sys.stderr)
            return 2
        print(f"{len(keys)} key{'' if len(keys) == 1 else 's'} in {args.file}")
        for key in keys:
            extra = f"; {key.rate_per_s:g} requests/s, burst {key.burst}" if key.rate_per_s is not None else ""
            if key.cert_subjects:
                extra += f"; {len(key.cert_subjects)} certificate subject{'s' * (len(key.cert_subjects) > 1)}"
            scopes = ", ".join(s for s in auth.SCOPES if s in key.scopes)
            print(f"{key.id} ({scopes}; {', '.join(key.models)}{extra})")
        return 0
    if args.keys_command == "hash":
        token = sys.stdin.read(auth.MAX_TOKEN_CHARS + 2).strip()
        if not token or not token.isascii() or len(token) > auth.MAX_TOKEN_CHARS or any(c.isspace() for c in token):
            print(
                f"batchgate keys hash: give one token on stdin: 1 to {auth.MAX_TOKEN_CHARS} ASCII characters, "
                'no spaces (e.g. `printf %s "$TOKEN" | batchgate keys hash`)',
                file=sys.stderr,
            )
            return 2
        print(auth.hash_token(token))
        return 0

    token = auth.new_token()
    entry: dict[str, object] = {"id": args.id, "sha256": auth.hash_token(token)}
    entry["scopes"] = [s.strip() for s in args.scopes.split(",") if s.strip()]
    entry["models"] = [m.strip() for ms in args.models or ["*"] for m in ms.split(",") if m.strip()]
    for name in ("rate_per_s", "burst"):
        value = _number(getattr(args, name))
        if value is not None:
            entry[name] = value
    if args.cert_subject:
        entry["cert_subjects"] = args.cert_subject
    try:
        auth.parse_entry(entry, "batchgate keys new")  # the keys file's own check
    except ConfigError as e:
        print(f"{e}", file=sys.stderr)
        return 2
    text = yaml.safe_dump([entry], sort_keys=False, default_flow_style=None, width=10_000)
    print(token)
    print("# paste under 'keys:' in the api_keys_file")
    print("".join(f"  {line}\n" for line in text.splitlines()), end="")
    print(
        "batchgate: the first line is the token, shown once and stored nowhere: give it to the client now "
        "(the keys file holds only its sha256)",
        file=sys.stderr,
    )
    return 0


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
    _keys_parser(sub)
    from .admin.cli import add_parser as add_routes_parser

    add_routes_parser(sub)
    from .drift_profile import add_parser as add_drift_parser

    add_drift_parser(sub)
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
    if args.command == "keys":
        return _keys_main(args)
    if args.command == "routes":
        from .admin.cli import main as routes_main

        return routes_main(args)
    if args.command == "drift":
        from .drift_profile import main as drift_main

        return drift_main(args)

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

    try:
        gateway = Gateway(settings)
    except ConfigError as e:  # the keys file or the audit log, read when the parts are built
        log.error("configuration error: %s", e)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except ConfigError as e:  # e.g. certificate files or the keys file, read at start
        log.error("configuration error: %s", e)
        await gateway.stop(0.1)
        return 2
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
