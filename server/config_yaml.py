"""The settings file read as YAML: one document, keys unique, and any failure of the loader (bad
syntax, a control character, a value its constructor cannot build, nesting too deep) a
ConfigError naming the file and the place, on one line."""

from __future__ import annotations

from typing import Any

import yaml

from .core.errors import ConfigError
from .core.unique_yaml import UniqueKeys
from .remote_models import shown

_MAX_INT_BITS = 13_000  # a YAML integer past this (about 3,900 digits) is refused: str() of it could fail


def _reason(e: BaseException) -> str:
    """A loader exception's own words, kept short."""
    text = str(e).split(";")[0]
    return f"{type(e).__name__}: {text[:120] + '...' if len(text) > 120 else text}"


class _Loader(UniqueKeys):
    """The settings file's loader: a value its constructors cannot build (a date like 2001-13-45,
    an integer of 5,000 digits, ``!!bool x``) is a YAMLError at that value's line, not the
    constructor's own exception (ValueError, KeyError, ...)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            data = super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as e:
            kind = str(node.tag).rpartition(":")[2]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown(node.value)} as {kind} ({_reason(e)})", node.start_mark
            ) from None
        if isinstance(data, int) and data.bit_length() > _MAX_INT_BITS:  # hexadecimal or base 60 (1:2:3)
            raise yaml.constructor.ConstructorError(
                None, None, f"the integer {shown(node.value)} is too large", node.start_mark
            )
        return data


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, on one line."""
    problem = getattr(e, "problem", None)
    if not problem:
        return " ".join(str(e).split())
    context = getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return " ".join(f"{context + ': ' if context else ''}{problem}".split()) + _at(mark)


def load_yaml(text: str, file: str) -> Any:
    """The document in ``text``; any loader failure is a ConfigError naming ``file`` and the place."""
    try:
        loader = _Loader(text)  # the reader refuses control characters first, before parsing
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(
            f"config file {file} is not valid YAML: character #x{e.character:04x} on line {line} is not allowed "
            "(YAML refuses control characters; write them as escapes in a double-quoted string)"
        ) from None
    loader.name = file  # marks name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:  # (one line: PyYAML's own text quotes the line with a caret under it)
        raise ConfigError(f"config file {file} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(
            f"config file {file} is not valid YAML: it is nested too deeply (a config file needs a few levels)"
            f"{_at(loader.get_mark())}"
        ) from None
    except Exception as e:  # PyYAML's scanner: chr() of an escape like "\U80092014" (OverflowError)
        raise ConfigError(
            f"config file {file} is not valid YAML: cannot read the text here ({_reason(e)}){_at(loader.get_mark())}"
        ) from None
    finally:
        loader.dispose()
