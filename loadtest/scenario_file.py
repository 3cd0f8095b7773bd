"""Scenario files: YAML whose keys are exactly the command line's long option names.

``duration: 30`` sets what ``--duration 30`` sets; ``max-lag-p99-ms`` may also be written
``max_lag_p99_ms``. The positional ``target`` is a key too. The keys, their types and their
choices come from the argument parser itself (see ``cli.py``), so a new flag is a new key with
no second list to keep. An unknown key, a key given twice or a value of the wrong type is an
error that names the key (and, for an unknown one, lists every valid key).

``sweep-rate`` and ``sweep-concurrency`` also take YAML lists (``[1, 2, 4, 8]``): a list of
rates is a step search over exactly those rates (from the lowest up).

Numbers are read as YAML 1.2 reads them: ``1e3`` is a number and ``10:50`` is text (YAML 1.1,
which PyYAML follows, reads ``10:50`` as the base-60 number 650, which would turn a binary
search's ``LOW:HIGH`` into one rate without a word).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from batchgate.core.unique_yaml import UniqueKeys, one_line

from .scenario import LoadTestError

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class _Loader(UniqueKeys):
    """PyYAML's safe loader with YAML 1.2 numbers and duplicate keys refused."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class FileKey:
    """One scenario-file key: the flag it stands for and what its value must be."""

    name: str  # the flag's long name without -- (or "target")
    dest: str  # where argparse stores it
    kind: str  # bool | int | float | text
    choices: tuple[str, ...] | None = None


# the sweeps' list forms: YAML lists become the comma-separated text the flags take
LIST_KEYS = {"sweep_rate": "float", "sweep_concurrency": "int"}


def file_keys(actions: Iterable[argparse.Action], skip: Iterable[str] = ("scenario", "help")) -> dict[str, FileKey]:
    """The keys a scenario file may use, by name, from the parser's actions."""
    keys: dict[str, FileKey] = {}
    for a in actions:
        if a.dest in skip:
            continue
        longs = [o[2:] for o in a.option_strings if o.startswith("--")]
        name = longs[0] if longs else a.dest
        if a.nargs == 0:
            kind = "bool"
        elif a.type is int:
            kind = "int"
        elif a.type is float:
            kind = "float"
        else:
            kind = "text"
        keys[name] = FileKey(name, a.dest, kind, tuple(a.choices) if a.choices else None)
    return keys


def read(path: str, keys: dict[str, FileKey]) -> dict[str, Any]:
    """The settings a scenario file gives, by argparse ``dest``; LoadTestError on any problem."""
    loader = None
    try:
        with open(path, encoding="utf-8") as f:
            loader = _Loader(f)
            data = loader.get_single_data()
    except OSError as e:
        raise LoadTestError(f"cannot read scenario {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:  # (not UTF-8: a ValueError)
        where = loader.get_mark() if loader is not None else None
        raise LoadTestError(f"cannot read scenario {path}: {one_line(e, where)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoadTestError(f"scenario {path}: must be a mapping of keys to values (key: value lines)")
    return values(data, keys, f"scenario {path}")


def values(data: dict, keys: dict[str, FileKey], where: str) -> dict[str, Any]:
    """Check and convert a mapping of scenario keys; keyed by argparse ``dest``."""
    by_form = {k.replace("_", "-"): k for k in keys}
    unknown = [k for k in data if not isinstance(k, str) or k.replace("_", "-") not in by_form]
    if unknown:
        listed = ", ".join(sorted(keys))
        wrong = "; ".join(f"{k!r}{_hint(k, keys)}" for k in unknown)
        raise LoadTestError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {wrong}. "
            f"Valid keys (the flags' long names, - or _ alike): {listed}"
        )
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for raw, v in data.items():
        key = keys[by_form[raw.replace("_", "-")]]
        if key.dest in given:
            raise LoadTestError(f"{where}: {key.name!r} is given twice (as {given[key.dest]!r} and {raw!r})")
        given[key.dest] = raw
        converted = _convert(key, v, where)
        if converted is not None:  # an empty value leaves the default
            out[key.dest] = converted
    return out


def _hint(k: Any, keys: dict[str, FileKey]) -> str:
    if not isinstance(k, str):
        return " (keys are names)"
    form = k.replace("_", "-")
    for key in keys.values():
        if key.dest.replace("_", "-") == form:  # a Scenario field's name, e.g. duration_s
            return f" (the key is {key.name!r})"
    if form == "mode":
        return " (closed loop: give concurrency and no rate)"
    close = difflib.get_close_matches(form, list(keys), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(key: FileKey, v: Any, where: str) -> Any:
    if v is None:
        return None
    if key.dest in LIST_KEYS and isinstance(v, list):
        return _list(key, v, where)
    what = {
        "bool": "true or false",
        "int": "a whole number",
        "float": "a number",
        "text": "text" + (" or a list" if key.dest in LIST_KEYS else ""),
    }[key.kind]
    bad = LoadTestError(f"{where}: {key.name!r} must be {what}, not {v!r}")
    if key.kind == "bool":
        if not isinstance(v, bool):
            raise bad
        return v
    if isinstance(v, (bool, list, dict)):
        raise bad
    if key.kind == "text":
        v = str(v)
        if key.choices and v not in key.choices:
            raise LoadTestError(f"{where}: {key.name!r} must be one of {', '.join(key.choices)}, not {v!r}")
        return v
    number: Callable[[Any], Any] = int if key.kind == "int" else float
    if isinstance(v, float) and key.kind == "int":
        if not v.is_integer():
            raise bad
        return int(v)
    try:
        out = number(v)
    except (TypeError, ValueError):
        raise bad from None
    if key.kind == "float" and not math.isfinite(out):
        raise bad
    return out


def _list(key: FileKey, items: list, where: str) -> str:
    kind = LIST_KEYS[key.dest]
    example = "[1, 2, 4, 8]" if kind == "int" else "[100, 200, 400]"

    def fits(x: Any) -> bool:
        if isinstance(x, bool):
            return False
        return isinstance(x, int) if kind == "int" else isinstance(x, (int, float)) and math.isfinite(x)

    ok = all(fits(x) for x in items)
    if not items or not ok:
        noun = "whole numbers" if kind == "int" else "numbers"
        raise LoadTestError(f"{where}: {key.name!r} as a list is a list of {noun}, e.g. {example}, not {items!r}")
    return ",".join(repr(x) for x in items)
