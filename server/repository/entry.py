"""One model's place in the repository (``manager.py``): its state, why, the versions it serves,
and its rows of the repository index."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..model import ModelVersion

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"
NOT_LOADED = "not loaded"  # the reason of a model no load has touched yet


@dataclass
class ModelEntry:
    name: str
    state: str = UNAVAILABLE
    reason: str = NOT_LOADED
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    latest: ModelVersion | None = None
    fingerprint: tuple = ()
    # the versions it served last: the index lists them, with the model's state, once they are gone
    served_versions: tuple[int, ...] = ()
    loaded_once: bool = False  # has been READY at least once (strict readiness of remote models)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def index_rows(e: ModelEntry, ready_only: bool) -> list[dict[str, str]]:
    """Triton's index rows for one model: one per version served. A model serving nothing lists the
    versions it served last, with its state (``unloaded``, a failed reload, ...); if it never
    served, its state with no version (Triton's shape for a version it does not know); if no load
    has touched it yet, its name alone, as Triton lists a model of the repository it has not loaded."""
    rows: list[dict[str, str]] = []
    for v in sorted(e.versions):
        served = e.versions[v]
        if served.ready():
            rows.append({"name": e.name, "version": str(v), "state": READY, "reason": ""})
        elif not ready_only:
            rows.append({"name": e.name, "version": str(v), "state": UNAVAILABLE, "reason": served.not_ready_reason()})
    if e.versions or ready_only:
        return rows
    if e.state == UNAVAILABLE and e.reason == NOT_LOADED:
        return [{"name": e.name}]
    if e.served_versions:
        return [{"name": e.name, "version": str(v), "state": e.state, "reason": e.reason} for v in e.served_versions]
    return [{"name": e.name, "state": e.state, "reason": "" if e.state == LOADING else e.reason}]
