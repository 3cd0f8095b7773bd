"""The Backend protocol: what the serving layer needs from an execution engine.

``run`` is synchronous and is called from a worker thread, never on the event
loop. A backend is created for one model version and closed when that version
is retired (after the requests in flight on it have finished).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class IOInfo:
    """A tensor as the engine declares it (used to complete a missing config)."""

    name: str
    v2_datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension


class Backend(Protocol):
    platform: str

    def inputs(self) -> list[IOInfo]: ...

    def outputs(self) -> list[IOInfo]: ...

    def run(self, feeds: dict[str, np.ndarray], output_names: tuple[str, ...]) -> list[np.ndarray]: ...

    def warm_up(self) -> None: ...

    def close(self) -> None: ...
