"""The admin API's operations, the same for its gRPC service and its HTTP/JSON mirror: who may
call (scope ``read`` to look, ``admin`` to change; without API keys, changes need
``allow_open_admin``), what each call does to the route table, and one audit line per call."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias, TypeVar

from google.protobuf import json_format

from ..core.errors import GatewayError, invalid, not_found
from ..core.types import clip, printable
from ..dataplane import DataPlane
from ..routes import ServedRoute
from ..security.access import ADMIN, READ, Caller
from .v1 import admin_pb2 as apb

ACTIONS = ("promote", "rollback", "pause", "resume")


def drift_message(status: dict[str, Any]) -> apb.DriftStatus:
    msg = apb.DriftStatus(
        model=status["model"],
        active=bool(status.get("active", False)),
        detected=list(status.get("detected", [])),
        detections=int(status.get("detections", 0)),
        windows=int(status.get("windows", 0)),
        profile_id=str(status.get("profile_id") or ""),
        sample_rate=float(status.get("sample_rate", 0.0)),
        samples={k: int(v) for k, v in status.get("samples", {}).items()},
        detector_up=bool(status.get("detector_up", False)),
        detector_pid=int(status.get("detector_pid", 0)),
        tests=list(status.get("tests", [])),
        alpha=float(status.get("alpha", 0.0)),
        correction=str(status.get("correction", "")),
    )
    last = status.get("last_window")
    if last:
        msg.last_window.update(last)
    return msg


def route_message(route: ServedRoute, others: list | None = None) -> apb.Route:
    return json_format.ParseDict(route.describe(others), apb.Route())


T = TypeVar("T")
# What a request asked for: the value, or a function that reads it (from an HTTP body)
Given: TypeAlias = T | Callable[[], T]


def _read(value: Given[T]) -> T:
    return value() if callable(value) else value


class AdminApi:
    def __init__(self, dataplane: DataPlane):
        self.dp = dataplane

    async def _call(
        self, caller: Caller, scope: str, action: str, target: str, op, detail: str | Callable[[], str] = ""
    ) -> Any:
        """Check the caller, run ``op(key)`` (awaited when it is a coroutine function) and audit
        the call, whatever its outcome; ``detail`` may be read only then (what a request asked
        for, once its body has been read: after the caller is checked)."""
        access = self.dp.access
        key = None
        try:
            key = access.check(caller, scope, target or None)
            result = op(key)
            if inspect.isawaitable(result):
                result = await result
        except GatewayError as e:
            said = detail() if callable(detail) else detail
            why = f"{said}: {e.message}" if said else e.message
            await access.audited(caller, key, action, target, e.code.value, why)
            raise
        await access.audited(caller, key, action, target, "ok", detail() if callable(detail) else detail)
        return result

    def _table(self):
        table = self.dp.routes
        if table is None:
            raise not_found("no routes are configured (config file 'routes', or routing.routes_file)")
        return table

    def _route(self, name: str) -> ServedRoute:
        route = self._table().get(name)
        if route is None:
            raise not_found(f"unknown route '{printable(clip(name))}'")
        return route

    async def _shown(self, route: ServedRoute) -> apb.Route:
        """The route with the pod's window: with worker processes, the others' too (the figures
        the rollout judges; worker 0's own were shown, a share of them)."""
        peer = self.dp.routes.peer if self.dp.routes is not None else None
        others = None
        if peer is not None:
            try:
                others = await peer.windows(route.name, outputs=False)
            except (GatewayError, TimeoutError):  # (shown without them rather than not at all)
                others = None
        return route_message(route, others)

    async def list_routes(self, caller: Caller) -> apb.ListRoutesResponse:
        async def op(key) -> apb.ListRoutesResponse:
            table = self.dp.routes
            routes = [] if table is None else [r for _, r in sorted(table.routes.items())]
            shown = [self._shown(r) for r in routes if key is None or key.allows_model(r.name)]
            return apb.ListRoutesResponse(routes=await asyncio.gather(*shown))  # (a slow worker once, not per route)

        return await self._call(caller, READ, "routes.list", "", op)

    async def get_route(self, caller: Caller, name: str) -> apb.Route:
        async def op(key) -> apb.Route:
            return await self._shown(self._route(name))

        return await self._call(caller, READ, "routes.get", name, op)

    async def set_weights(self, caller: Caller, name: str, weights: Given[Mapping[str, Any]]) -> apb.Route:
        """``weights``, or (HTTP) a function that reads them from the body: called once the
        caller is checked, so a stranger's malformed body is 401, not 400, and audited."""
        given: dict[str, Any] = {}

        def op(key) -> apb.Route:
            given.update(_read(weights))
            self._route(name)
            return route_message(self._table().set_weights(name, given))

        def detail() -> str:
            return ", ".join(f"{printable(clip(str(k), 64))}={v}" for k, v in list(given.items())[:16])

        return await self._call(caller, ADMIN, "routes.set_weights", name, op, detail)

    async def act(self, caller: Caller, name: str, action: str) -> apb.Route:
        def op(key) -> apb.Route:
            self._route(name)
            return route_message(self._table().transition(name, action))

        return await self._call(caller, ADMIN, f"routes.{action}", name, op)

    # ---------------------------------------------------------------- drift
    def _drift(self):
        drift = self.dp.drift
        if drift is None:
            raise not_found("no drift monitors are configured (config file 'drift')")
        return drift

    async def list_drift(self, caller: Caller) -> apb.ListDriftResponse:
        async def op(key) -> apb.ListDriftResponse:
            drift = self.dp.drift
            if drift is None:
                return apb.ListDriftResponse()
            models = [m for m in sorted(drift.specs) if key is None or key.allows_model(m)]
            return apb.ListDriftResponse(monitors=[drift_message(await drift.status_now(m)) for m in models])

        return await self._call(caller, READ, "drift.list", "", op)

    async def get_drift(self, caller: Caller, model: str) -> apb.DriftStatus:
        async def op(key) -> apb.DriftStatus:
            return drift_message(await self._drift().status_now(model))

        return await self._call(caller, READ, "drift.get", model, op)

    async def reset_drift(
        self, caller: Caller, model: str, reference: Given[bool], until: float | None = None
    ) -> apb.DriftStatus:
        asked: list[bool] = []

        async def op(key) -> apb.DriftStatus:
            asked.append(_read(reference))
            drift = self._drift()
            drift.monitor(model)
            await drift.command("reset", {"model": model, "reference": asked[0]}, until)
            return drift_message(await drift.status_now(model))

        def detail() -> str:
            return "to the configured reference" if asked and asked[0] else ""

        return await self._call(caller, ADMIN, "drift.reset", model, op, detail)

    async def rebaseline(
        self, caller: Caller, model: str, rows: Given[int], until: float | None = None
    ) -> apb.DriftStatus:
        asked: list[int] = []

        async def op(key) -> apb.DriftStatus:
            asked.append(_read(rows))
            drift = self._drift()
            drift.monitor(model)
            if asked[0] < 0:
                raise invalid("rows must be 0 (as many as are kept) or more")
            await drift.command("rebaseline", {"model": model, "rows": asked[0]}, until)
            return drift_message(await drift.status_now(model))

        def detail() -> str:
            return f"rows={asked[0] or 'all kept'}" if asked else ""

        return await self._call(caller, ADMIN, "drift.rebaseline", model, op, detail)
