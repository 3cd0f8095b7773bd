"""PyYAML's safe loader without its silent last-wins for a repeated mapping key."""

from __future__ import annotations

from typing import Any

import yaml

from .types import clip, printable


class UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, but a mapping key given twice is an error at its line (PyYAML keeps
    the last silently: a repeated section would drop every setting of the first). The settings
    file, the API keys file, the routes file and the load tester's scenario files read with it."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[str] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def one_line(error: BaseException, where: Any = None) -> str:
    """What PyYAML could not read, as one bounded line: its problem and where (line, column).
    A YAMLError's text spans several lines (the offending line quoted, a caret under it); PyYAML
    also raises ValueError, OverflowError or RecursionError on some odd input, placed by
    ``where`` (the loader's ``get_mark()`` when it stopped)."""
    if isinstance(error, yaml.MarkedYAMLError):
        where = error.problem_mark or error.context_mark or where
        text = ": ".join(x for x in (error.context, error.problem) if x) or type(error).__name__
    else:
        text = f"{type(error).__name__}: {error}"
    text = clip(printable(" ".join(text.split())), 240)  # escaped first: escapes lengthen it
    if where is not None:
        text += f" (line {where.line + 1}, column {where.column + 1})"
    return text
