"""One setting of a section (``settings_sections.py``): a dataclass field carrying its row of the
settings table."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: int | None = None,
    maximum: int | None = None,
    positive: bool = False,
    zero_or_at_least: float | None = None,
    why: str = "",
    metavar: str = "",
) -> Any:
    """A section field and its row of the settings table: help text, allowed values, lower bound
    (``zero_or_at_least``: 0, meaning off, or at least this; ``why`` is added to the message when
    a bound is broken), the flag's metavar."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "minimum": minimum,
            "maximum": maximum,
            "positive": positive,
            "zero_or_at_least": zero_or_at_least,
            "why": why,
            "metavar": metavar,
        },
    )
