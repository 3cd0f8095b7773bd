"""One model's place in the repository (``manager.py``): its state, why, and the versions it serves."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..model import ModelVersion

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class ModelEntry:
    name: str
    state: str = UNAVAILABLE
    reason: str = "not loaded"
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    latest: ModelVersion | None = None
    fingerprint: tuple = ()
    loaded_once: bool = False  # has been READY at least once (strict readiness of remote models)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
