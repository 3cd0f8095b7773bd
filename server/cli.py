"""``batchgate`` command line: ``serve`` (its flags made from the settings table), ``settings``,
``demo-repo``, ``convert``, ``loadtest``, ``keys``, ``routes``, ``drift``, ``completion``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import sys
import textwrap
import warnings
from collections.abc import Sequence
from typing import Any

from . import __version__, logs
from .config import ALIASES, ENV_PREFIX, SECTIONS, SETTINGS, ConfigError, Spec, load_settings, settings_in_effect
from .cores import resolve_workers
from .settings_sections import TOP_LEVEL

log = logging.getLogger("batchgate")


METAVARS = {"int": "N", "float": "SECONDS", "str": "TEXT", "list": "VALUE", "remote_models": "SPEC"}


def _metavar(spec) -> str:
    """A flag's placeholder from its setting's name and kind: MS for ``_ms``, N for a rate
    (``_per_s``) or a count, SECONDS for another float."""
    if spec.name.endswith("_ms"):
        return "MS"
    if spec.name.endswith("_per_s") or spec.name.endswith("_ratio"):
        return "N" if spec.name.endswith("_per_s") else "RATIO"
    return METAVARS[spec.kind]


class _Store(argparse.Action):
    """Stores the value and the spelling the user typed (--exit-timeout-secs is the alias
    exit_timeout_secs), so that messages about the setting use the name the user wrote."""

    def __call__(self, parser, namespace, values, option_string=None):
        spelled = vars(namespace).setdefault("_spelled", {})
        spelling = (option_string or "")[2:].replace("-", "_")
        if spelled.get(self.dest, spelling) != spelling:  # a setting given under its name and its alias
            parser.error(f"--{spelled[self.dest].replace('_', '-')} and {option_string} are the same setting; give one")
        setattr(namespace, self.dest, values)
        spelled[self.dest] = spelling


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
        help=f"YAML file of settings, in sections ({', '.join(TOP_LEVEL)}); "
        "`batchgate settings --config FILE` shows what it sets (default: none; no environment variable)",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in SETTINGS.values():
        section = spec.section or "remote_models"
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} settings" if spec.section else "remote models")
        kw: dict = {"dest": spec.name, "default": None, "help": _flag_help(spec).replace("%", "%%")}
        kw["action"] = "append" if spec.repeatable else _Store
        if spec.kind == "bool":
            kw["choices"] = ("true", "false")
        elif spec.choices:
            kw["choices"] = spec.choices
        else:
            kw["metavar"] = spec.metavar or _metavar(spec)
        groups[section].add_argument(spec.flag, *("--" + a.replace("_", "-") for a in spec.aliases), **kw)


def shown(value: Any) -> str:
    """A setting's value as YAML writes it: true, not True; strings unquoted, "" when empty; lists
    in brackets; a remote model by its name."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if dataclasses.is_dataclass(value) and hasattr(value, "name"):
        return str(value.name)
    return str(value) if value != "" else '""'


def _flag_help(spec: Spec) -> str:
    """A serve flag's help: the table's meaning, its default, its environment variable, its aliases."""
    extra = [f"default: {shown(spec.default)}", f"env {spec.env}"]
    extra += [f"alias --{a.replace('_', '-')} / {ENV_PREFIX}{a.upper()}" for a in spec.aliases]
    return f"{spec.help} ({'; '.join(extra)})"


def _meaning(spec: Spec) -> str:
    """The settings table's last column: the help text, the allowed values and the aliases."""
    text = spec.help
    if spec.kind == "bool":
        text += "; true or false"
    elif spec.choices:
        text += f"; one of {', '.join(spec.choices)}"
    for alias in spec.aliases:
        text += f"; alias {alias} (--{alias.replace('_', '-')}, {ENV_PREFIX}{alias.upper()})"
    return text


def _sections() -> list[tuple[str, str, list[Spec]]]:
    """(section, what it holds, its settings) in the order of the table; top-level lists last."""
    out = []
    for section, cls in SECTIONS.items():
        doc = " ".join((cls.__doc__ or "").split()).replace("``", "'")
        about = doc.split(": ", 1)[-1].split(". ")[0].rstrip(".")
        out.append((section, about, [s for s in SETTINGS.values() if s.section == section]))
    out.append(("remote_models", "a list at the top of the file", [s for s in SETTINGS.values() if not s.section]))
    return out


def _table(header: tuple[str, ...], groups: Sequence[tuple[str, Sequence[tuple[str, ...]]]], wrap_last: bool) -> str:
    """Rows aligned in columns under ``header``, each group under a title line. On a terminal (or
    with COLUMNS set) the last column is wrapped to the width, at least 40 characters, its lines
    kept in the column; piped, each row stays one line, for grep."""
    rows = [header, *(row for _, group in groups for row in group)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    indent = sum(widths) + 2 * len(widths) + 2
    room = max(40, shutil.get_terminal_size((120, 24)).columns - indent - 1)
    wrap_last = wrap_last and (sys.stdout.isatty() or "COLUMNS" in os.environ)

    def line(row: tuple[str, ...]) -> str:
        last = [row[-1]]
        if wrap_last and row[-1]:
            last = textwrap.wrap(row[-1], room, break_long_words=False, break_on_hyphens=False)
        head = "  " + "".join(c.ljust(w + 2) for c, w in zip(row, widths))
        return "\n".join([head + last[0], *(" " * indent + more for more in last[1:])]).rstrip()

    lines = [line(header)]
    for title, group in groups:
        lines += ["", title, *(line(r) for r in group)]
    return "\n".join(lines)


def _print_settings() -> None:
    groups = [
        (f"[{section}] {about}", [(s.name, s.flag, s.env, shown(s.default), _meaning(s)) for s in specs])
        for section, about, specs in _sections()
    ]
    print(_table(("SETTING", "FLAG", "ENVIRONMENT VARIABLE", "DEFAULT", "MEANING"), groups, wrap_last=True))
    notes = (
        "In a --config file each setting goes under its section (remote_models, routes and drift are lists at "
        f"the top). Environment: {ENV_PREFIX}<NAME> (lists comma-separated, remote models ';'-separated). Flags win "
        "over the environment, which wins over the file. An alias works wherever its name does. "
        "`batchgate settings --config FILE` shows the settings in effect."
    )
    print("\n" + textwrap.fill(notes, 100))


def _print_settings_in_effect(file: str) -> int:
    with warnings.catch_warnings(record=True) as caught:  # deprecated forms: printed, not raised
        warnings.simplefilter("always")
        try:
            settings, origins = settings_in_effect(file)
        except ConfigError as e:
            for w in caught:
                print(f"batchgate settings: warning: {w.message}", file=sys.stderr)
            print(f"batchgate settings: configuration error: {e}", file=sys.stderr)
            return 2
    for w in caught:
        print(f"batchgate settings: warning: {w.message}", file=sys.stderr)
    groups = []
    for section, _, specs in _sections():
        rows = []
        for spec in specs:
            value = getattr(getattr(settings, spec.section), spec.name) if spec.section else settings.remote_models
            mark = "*" if value != spec.default else ""
            rows.append((mark, spec.name, shown(value), origins[spec.name], shown(spec.default)))
        groups.append((f"[{section}]", rows))
    print(f"Settings in effect with --config {file} and the environment, before any flags:\n")
    print(_table(("", "SETTING", "VALUE", "SOURCE", "DEFAULT"), groups, wrap_last=False))
    print(f"\nroutes: {len(settings.routes)} in the file; drift monitors: {len(settings.drift)} in the file")
    notes = (
        "* = differs from the default. SOURCE: default; file (the --config file); env (a "
        f"{ENV_PREFIX}* variable); implied (load_model turns model_control_mode to explicit). "
        "Checked as `batchgate serve` checks them, except that the model repository need not exist here."
    )
    print("\n" + textwrap.fill(notes, 100))
    return 0


def _completion(parser: argparse.ArgumentParser, shell: str) -> int:
    """Print shtab's completion script for ``parser``; values named FILE or DIR complete as paths.
    shtab is imported here only (it costs every other command tens of milliseconds)."""
    import shtab

    paths = {"FILE": shtab.FILE, "DIR": shtab.DIRECTORY}
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif isinstance(action.metavar, str) and action.metavar in paths:
                action.complete = paths[action.metavar]  # type: ignore[attr-defined]
    print(shtab.complete(parser, shell=shell))
    return 0


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


COMPLETION_SHELLS = ("bash", "zsh", "tcsh")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand and its flags (also what shell completion is made from)."""
    ap = argparse.ArgumentParser(prog="batchgate", description="Open Inference Protocol gateway")
    ap.add_argument("--version", action="version", version=f"batchgate {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    d = sub.add_parser("demo-repo", help="write the demo model repository")
    d.add_argument("repo", metavar="DIR")
    d.add_argument(
        "--force", action="store_true", help="write over models of the demo's names already in DIR (default: refuse)"
    )
    st = sub.add_parser(
        "settings",
        help="list every setting (flag, environment variable, default, meaning), or those in effect with --config",
        description="Without --config: the table of every setting by section: its flag, environment variable, "
        "default and meaning. With --config FILE: the value of each setting after reading FILE and the "
        "BATCHGATE_* environment, where it came from, and which differ from the defaults.",
    )
    st.add_argument("--config", metavar="FILE", help="show the settings in effect with this YAML file")
    c = sub.add_parser(
        "completion",
        help="print a shell completion script for batchgate",
        description="Print a completion script for batchgate. bash: `source <(batchgate completion bash)` "
        "in ~/.bashrc; zsh: `batchgate completion zsh > ~/.zfunc/_batchgate` with ~/.zfunc in fpath "
        'before compinit; tcsh: `eval "`batchgate completion tcsh`"`.',
    )
    c.add_argument("shell", choices=COMPLETION_SHELLS)
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
    from .score.cli import add_parser as add_score_parser

    add_score_parser(sub)
    return ap


# gRPC's I/O engine for sockets: the older poller costs this gateway about 9% less CPU per
# forwarded request, with a third fewer thread hand-offs (measured with grpcio 1.85, see README,
# Benchmarks, Remote models). It is chosen when grpc loads, so before anything imports it; a
# GRPC_EXPERIMENTS the user set wins, and grpcio releases it was not measured with keep their default.
GRPC_IO_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
GRPC_IO_TESTED = ((1, 80), (1, 90))  # grpcio versions from, up to (not included)


def prefer_legacy_grpc_io() -> bool:
    """Set GRPC_EXPERIMENTS for this process unless given or grpc is loaded; whether it did."""
    if "GRPC_EXPERIMENTS" in os.environ or "grpc" in sys.modules:
        return False
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("grpcio").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    low, high = GRPC_IO_TESTED
    if not low <= (major, minor) < high:
        return False
    os.environ["GRPC_EXPERIMENTS"] = GRPC_IO_EXPERIMENTS
    return True


def main(argv=None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # (here, where a reader gone is caught, not at exit)
        return code
    except BrokenPipeError:
        # whoever read our output stopped (`batchgate routes list | head`): not an error here; what
        # is still buffered goes nowhere, so that closing stdout at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "serve":
        prefer_legacy_grpc_io()

    if args.command == "demo-repo":
        from .demo import DEMO_MODELS, build_demo_repository

        taken = [m for m in DEMO_MODELS if os.path.exists(os.path.join(args.repo, m))]
        if taken and not args.force:  # (a user's own model of the same name is never overwritten)
            names = ", ".join(taken)
            print(
                f"batchgate demo-repo: {args.repo} already has model(s) {names}; pick another folder, "
                "or --force to write over them",
                file=sys.stderr,
            )
            return 2
        try:
            build_demo_repository(args.repo)
        except OSError as e:
            print(f"batchgate demo-repo: cannot write {args.repo}: {e.strerror}", file=sys.stderr)
            return 2
        print(f"demo model repository written to {args.repo}")
        return 0
    if args.command == "loadtest":
        from .loadtest.cli import main as loadtest_main

        return loadtest_main(args)
    if args.command == "convert":
        from .converters.cli import main as convert_main

        return convert_main(args)
    if args.command in ("settings", "completion"):
        if args.command == "completion":
            return _completion(ap, args.shell)
        if args.config is not None:
            return _print_settings_in_effect(args.config)
        _print_settings()
        return 0
    if args.command == "keys":
        return _keys_main(args)
    if args.command == "routes":
        from .admin.cli import main as routes_main

        return routes_main(args)
    if args.command == "score":
        from .score.cli import main as score_main

        return score_main(args)
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
    if resolve_workers(settings.server.workers) > 1:
        from .supervisor import supervise

        return asyncio.run(supervise(settings))
    from .lifecycle import leave

    return leave(asyncio.run(_serve(settings)))


async def _serve(settings) -> int:
    from .app import Gateway
    from .lifecycle import start_unless_stopped
    from .transport.sockets import ListenError

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
        if not await start_unless_stopped(gateway.start(), stop):
            await gateway.stop(0.1)
            return 0
    except ConfigError as e:  # e.g. certificate files or the keys file, read at start
        log.error("configuration error: %s", e)
        await gateway.stop(0.1)
        return 2
    except Exception as e:
        # (a port another process holds: "cannot listen on 127.0.0.1:8000: Address already in use")
        said = f"cannot listen on {e.filename}: {e.strerror}" if isinstance(e, ListenError) else e
        log.error("batchgate could not start: %s", said)
        await gateway.stop(0.1)
        return 1
    await stop.wait()
    log.info("shutdown signal received")
    clean = await gateway.stop()
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
