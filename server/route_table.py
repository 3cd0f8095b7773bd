"""The routes a gateway serves: built from the configuration, checked against the repository,
reloaded when the routes file changes, kept current as models load and unload, and stepped by
the rollout controller.

**Which weights win.** The configuration (the config file's ``routes`` and ``routes_file``)
defines the routes and their initial weights. Runtime weights (the rollout controller, or the
admin API's SetWeights) are kept in ``state_dir`` with a fingerprint of the route's definition,
and win over the file's until that definition changes; a changed definition resets them to the
file's, and the reset is audited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol

from .core import buckets
from .core import rollout as ro
from .core.buckets import BucketTable
from .core.errors import ConfigError, ErrorCode, GatewayError, invalid, not_found
from .core.routing import RouteSpec, Shadow, Variant, check_signatures, idle_misfits, loaded_only
from .core.types import clip, printable
from .execution import LocalExecution
from .model import ModelVersion
from .monitoring.metrics import Metrics
from .repository.manager import ModelRepository
from .routes import ServedRoute, Settled, file_stamp, read_routes_file
from .security.access import Caller
from .security.limits import Admission
from .settings_sections import RoutingSettings
from .shadows import DisagreementLog, ShadowRunner, ShadowScheduler, idle_priority
from .state import StateDir

log = logging.getLogger("batchgate.routes")

SYSTEM = Caller(None, None, "batchgate")  # who the controller's own actions are audited as
TICK_S = 1.0  # how often the rollout controller looks at its routes
Audit = Callable[[str, str, str, str], "asyncio.Future | Any"]  # (action, target, outcome, detail)


class RouteTable:
    def __init__(
        self,
        repository: ModelRepository,
        admission: Admission,
        metrics: Metrics,
        shadow_pool: Executor,
        state: StateDir | None = None,
        disagreements: DisagreementLog | None = None,
        audit: Audit | None = None,
        wall_clock: Callable[[], float] = time.time,
        away: Callable[[], int] = lambda: 0,
        routing: RoutingSettings | None = None,
    ):
        """``away``: how many requests in flight are out at an upstream (``threads.away``); shadow
        work runs while those are all that is in flight. ``routing``: the shadows' settings."""
        self._routing = routing = routing or RoutingSettings()
        self.repository = repository
        self.admission = admission
        self.metrics = metrics
        self.pool = shadow_pool
        self.state = state
        self.disagreements = disagreements
        self._audit = audit
        self.clock = wall_clock
        self.routes: dict[str, ServedRoute] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="batchgate-state")  # state_dir writes, in order
        self._config_routes: tuple[RouteSpec, ...] = ()
        self._twins: dict[int, Any] = {}  # id(version) -> (version, its shadow session)
        self._tasks: set[asyncio.Future] = set()
        repository.listeners.append(self._model_changed)
        # Several worker processes: one (worker 0, the leader) runs the rollout controller on the
        # pod's figures, takes the admin API's changes, keeps state_dir and shares every change
        # with the others through ``peer``; the others follow (apply_state).
        self.peer: RoutePeer | None = None
        self.leader = True
        # Shadow copies start only while no primary request is in flight.
        self.shadow_scheduler = ShadowScheduler(
            lambda: admission.inflight > away(), gather_s=routing.shadow_gather_ms / 1000
        )
        self._senders: ThreadPoolExecutor | None = None  # remote shadows' blocking calls, made on first use
        admission.on_idle = self.shadow_scheduler.wake

    def get(self, name: str) -> ServedRoute | None:
        return self.routes.get(name)

    # ---------------------------------------------------------------- building
    async def install(self, specs: Sequence[RouteSpec], source: str) -> None:
        """Check and put in place a whole set of routes; on a ConfigError nothing changes."""
        now = self.clock()
        new: dict[str, ServedRoute] = {}
        resets: list[str] = []
        names = [spec.name for spec in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # (the configuration's routes and the routes file's together)
            raise ConfigError(
                f"route(s) {', '.join(twice)} defined more than once (in the configuration and routes_file)"
            )
        for spec in specs:
            if spec.name in self.repository.models or spec.name in self.repository.remote:
                raise ConfigError(f"route '{spec.name}': a model has that name; a route needs a name of its own")
            # A route the reload leaves as it is is checked as at run time: a model that stopped
            # fitting it (a shadow left out, a variant unready) refused every later routes file.
            served = self.routes.get(spec.name)
            strict = served is None or served.spec.fingerprint() != spec.fingerprint()
            members = self._members(spec, strict)
            problem = self._check(spec, members, strict, weights={} if served is None else served.weights)
            route, reset = self._carry_or_build(spec, now)
            if reset:
                resets.append(spec.name)
            route.set_members(members, problem)
            new[spec.name] = route
        for route in new.values():
            await self._build_shadows(route)
        old = self.routes
        self.routes = new
        self.repository.reserved = frozenset(new)
        for name, route in old.items():
            if new.get(name) is not route:
                for s in route.shadows:
                    s.cancel()
            if name not in new:  # removed from the configuration: its figures and kept state go
                self.metrics.drop_route(name)
                self._forget(name)
        for route in new.values():
            route.metrics.keep([v.name for v in route.spec.variants], [s.name for s in route.spec.shadows])
            self._refresh(route)  # (a model that changed while the shadows were built)
            route.publish()
            self._save(route)
        for name in resets if self.leader else ():  # (one line for the pod)
            await self._audited("route.reset", name, "ok", f"the definition in {source} changed: weights reset to it")
        if self.peer is not None:  # each worker reloads on its own: meet again on the leader's state
            if self.leader:
                for route in new.values():
                    self._share(route, False)
            else:
                self._spawn(self._pull())
        if specs:
            log.info("routes from %s: %s", source, ", ".join(s.name for s in specs))

    def _members(self, spec: RouteSpec, strict: bool) -> dict[str, ModelVersion | None]:
        out: dict[str, ModelVersion | None] = {}
        repo = self.repository
        used: list[Variant | Shadow] = [*spec.variants, *spec.shadows]
        for m in used:
            entry = repo.models.get(m.model)
            # (explicit mode loads later: its folder must be there, or the model loaded already)
            if entry is None and strict and m.model not in repo.remote and not repo.has_folder(m.model):
                raise ConfigError(f"route '{spec.name}': '{m.name}' uses model '{m.model}', not in the repository")
            try:
                out[m.name] = repo.resolve(m.model, m.version)
            except GatewayError as e:  # (a version the loaded model does not have: refused at install)
                if strict and e.code is ErrorCode.NOT_FOUND and entry is not None and entry.versions:
                    raise ConfigError(f"route '{spec.name}': '{m.name}': {e.message}") from None
                out[m.name] = None
        return out

    def _check(self, spec: RouteSpec, members: Mapping[str, Any], strict: bool, weights: Mapping[str, int]) -> Any:
        """Whether the loaded members can answer alike (None), else why not; at install
        (``strict``) a mismatch refuses the configuration. ``weights``: the route's now."""
        signatures = {name: v.signature for name, v in members.items() if v is not None}
        spec = loaded_only(spec, signatures)  # (a member not loaded refuses its requests)
        try:
            check_signatures(spec, signatures)
            return None
        except ConfigError:
            if strict:
                raise
        # At runtime the variants decide; a shadow whose model no longer fits is left out (its
        # member set to None here, so no runner is built for it) until its model fits again: a
        # shadow never takes its route down.
        try:
            check_signatures(dataclasses.replace(spec, shadows=()), signatures)
        except ConfigError as e:
            left_out = idle_misfits(spec, signatures, weights)
            if left_out is None:
                return str(e)
            for name, why in left_out.items():  # (a variant with no weight now: not the route's problem)
                log.warning("route '%s': variant '%s' (weight 0) left out: %s", spec.name, name, why)
                members[name] = None  # type: ignore[index]
            spec = dataclasses.replace(spec, variants=tuple(v for v in spec.variants if v.name not in left_out))
        for s in spec.shadows:
            try:
                check_signatures(dataclasses.replace(spec, shadows=(s,)), signatures)
            except ConfigError as e:
                log.warning("route '%s': shadow '%s' left out: %s", spec.name, s.name, e)
                members[s.name] = None  # type: ignore[index]
        return None

    def _carry_or_build(self, spec: RouteSpec, now: float) -> tuple[ServedRoute, bool]:
        """The route for ``spec``: the one serving now if its definition is unchanged, else one
        from ``state_dir`` if kept there for this definition, else the file's weights, reached
        from the table served (or kept) so far as a weight change would move it. True when
        runtime state was dropped because the definition changed."""
        fingerprint = spec.fingerprint()
        old = self.routes.get(spec.name)
        if old is not None and old.spec.fingerprint() == fingerprint:
            old.spec = spec
            return old, False
        reset = old is not None
        table = state = None
        doc = self._load(spec.name)
        if doc is not None:
            if doc.get("fingerprint") in (fingerprint, spec.legacy_fingerprint()):
                try:
                    table = BucketTable.from_state(doc["table"])
                    if set(table.weights) != {v.name for v in spec.variants}:
                        raise ValueError("its variants are not the route's")
                    if spec.rollout is not None and doc.get("rollout") is not None:
                        state = ro.RolloutState.from_state(doc["rollout"], spec.rollout)
                except (KeyError, ValueError) as e:
                    log.warning("route '%s': the kept state is unusable (%s); starting from the file", spec.name, e)
                    table = state = None
            else:
                reset = True
        if spec.rollout is not None and state is None:
            state = ro.start(spec.rollout, now)
        if table is None:
            weights = spec.weights
            if state is not None and spec.rollout is not None:
                weights = ro.weights(spec.rollout, state, spec.weights)
            base = old.table if old is not None else BucketTable.kept(doc)
            if base is None or base.route != spec.name:
                table = BucketTable.fresh(spec.name, weights)
            else:
                table = base.moved_to(weights)
        return ServedRoute(spec, table, state, self.metrics.route(spec.name), self.admission), reset

    async def _build_shadows(self, route: ServedRoute) -> None:
        """The route's shadow runners: one whose shadow, model version and comparison are unchanged
        is kept, copies in flight and all (one budget, not two); the others are cancelled."""
        before, runners = route.shadows, []
        for s in route.spec.shadows:
            served = route.members.get(s.name)
            if served is None:  # (its runner went without a word: no copy, no line, no series)
                log.warning("route '%s': shadow '%s' left out: model '%s' is not served", route.name, s.name, s.model)
            same = [r for r in before if (r.spec, r.version, r.compare) == (s, served, route.spec.compare)]
            if served is None or (same and not same[0].closed):
                runners += same[:1]
                continue
            backend = await self._twin(served)
            if backend is None:
                continue
            runners.append(
                ShadowRunner(
                    route.name,
                    s,
                    served,
                    backend,
                    self.pool if isinstance(served.execution, LocalExecution) else self._sender_pool(),
                    self.metrics.route(route.name).shadow(s.name),
                    route.spec.compare,
                    self.disagreements,
                    route.rng,
                    self.shadow_scheduler,
                )
            )
        route.shadows = runners
        for r in before:
            if r not in runners:
                r.cancel()

    def _sender_pool(self) -> ThreadPoolExecutor | None:
        """The threads that make remote shadows' blocking calls, at SCHED_IDLE (the kernel runs them
        only when no other thread of the core wants to); None (``shadow_send_threads`` 0): the loop's."""
        if not self._routing.shadow_send_threads:
            return None
        if self._senders is None:
            self._senders = ThreadPoolExecutor(
                self._routing.shadow_send_threads, thread_name_prefix="batchgate-shadow-send", initializer=idle_priority
            )
        return self._senders

    async def _twin(self, served: ModelVersion) -> Any:
        """The session a shadow runs on: a local model's second session (one intra-op thread), shared
        by every route shadowing that version; a remote model's backend; None if it did not open."""
        backend = served.backend
        if backend is None or not isinstance(served.execution, LocalExecution):
            return backend
        kept = self._twins.get(id(served))
        if kept is not None and kept[0] is served:
            return kept[1]
        twin = getattr(backend, "twin", None)
        try:
            session = await asyncio.to_thread(twin) if twin is not None else backend
        except Exception as e:  # (the shadow is left out, said once; the route serves on)
            log.warning("shadow of model '%s' left out: no session: %s", served.name, printable(clip(str(e))))
            return None
        self._twins = {k: v for k, v in self._twins.items() if v[0].backend is not None}  # drop retired ones
        self._twins[id(served)] = (served, session)
        return session

    def _model_changed(self, model: str) -> None:
        """A model's versions changed (loaded, reloaded, unloaded): the routes using it look
        again, and say why they cannot serve if the new version does not fit."""
        for route in list(self.routes.values()):
            if any(v.model == model for v in route.spec.variants) or any(s.model == model for s in route.spec.shadows):
                self._refresh(route, force=True)

    def _refresh(self, route: ServedRoute, force: bool = False) -> None:
        members = self._members(route.spec, strict=False)
        if not force and members == route.members:
            return
        problem = self._check(route.spec, members, strict=False, weights=route.weights)
        if problem is not None:
            log.warning("route '%s' cannot serve: %s", route.name, problem)
        route.set_members(members, problem)
        for s in route.shadows:
            s.cancel()
        self._spawn(self._build_shadows(route))

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- state_dir
    def _load(self, name: str) -> dict[str, Any] | None:
        if self.state is None:
            return None
        try:
            return self.state.load("route", name)
        except (OSError, ValueError) as e:
            log.warning("route '%s': cannot read its kept state: %s", name, e)
            return None

    @staticmethod
    def _doc(route: ServedRoute) -> dict[str, Any]:
        """The route's runtime state as kept in state_dir and shared between worker processes."""
        doc: dict[str, Any] = {"fingerprint": route.spec.fingerprint(), "table": route.table.to_state()}
        if route.rollout is not None:
            doc["rollout"] = route.rollout.to_state()
        return doc

    def _save(self, route: ServedRoute) -> None:
        """Keep the route's runtime state: written (and fsynced) on a thread of its own, in the
        order the changes happened, never on the event loop. Among worker processes the
        supervisor keeps it (from what the leader shares); no worker writes."""
        if self.state is None or self.peer is not None:
            return
        self._write(route.name, self.state.save, "route", route.name, self._doc(route))

    def _share(self, route: ServedRoute, new_windows: bool) -> None:
        """The leader's change, to the other worker processes."""
        if self.peer is not None and self.leader:
            self.peer.share(route.name, self._doc(route), new_windows)

    def states(self) -> dict[str, dict[str, Any]]:
        return {name: self._doc(route) for name, route in self.routes.items()}

    async def _pull(self) -> None:
        """A follower that rebuilt its routes: the leader's state of each (a route whose
        definition the leader has not re-read yet is skipped; the leader shares it when it has)."""
        assert self.peer is not None
        try:
            docs = await self.peer.states()
        except (GatewayError, TimeoutError) as e:
            log.warning("routes: could not take the leader's route state: %s", e)
            return
        for name, doc in docs.items():
            self.apply_state(name, doc, False)

    def apply_state(self, name: str, doc: dict[str, Any] | None, new_windows: bool) -> bool:
        """Follow the leader: its weights and rollout state for route ``name`` (ignored when the
        route's definition differs here, e.g. a routes file this process has not re-read yet)."""
        route = self.routes.get(name)
        if route is None or doc is None or doc.get("fingerprint") != route.spec.fingerprint():
            return False
        try:
            table = BucketTable.from_state(doc["table"])
            state = (
                ro.RolloutState.from_state(doc["rollout"], route.spec.rollout)
                if route.spec.rollout is not None and doc.get("rollout") is not None
                else route.rollout
            )
        except (KeyError, ValueError) as e:
            log.warning("route '%s': the state shared by the leader is unusable: %s", name, e)
            return False
        route.table, route.rollout = table, state
        if new_windows:
            route.new_windows()
        route.publish()
        return True

    def _forget(self, name: str) -> None:
        if self.peer is not None and self.leader:  # the supervisor forgets its copy (and state_dir's)
            self.peer.share(name, None, False)
        elif self.state is not None and self.peer is None:
            self._write(name, self.state.remove, "route", name)

    def _write(self, name: str, fn, *args) -> None:
        def write() -> None:
            try:
                fn(*args)
            except (OSError, ValueError) as e:
                log.error("route '%s': cannot keep its state in state_dir: %s", name, e)

        try:
            self._writer.submit(write)
        except RuntimeError:  # the writer has stopped (shutdown): write here
            write()

    async def _audited(self, action: str, target: str, outcome: str, detail: str) -> None:
        if self._audit is not None:
            await self._audit(action, target, outcome, detail)

    # ---------------------------------------------------------------- the routes file
    async def watch(self, config_routes: Sequence[RouteSpec], path: str, poll_s: float, since: object) -> None:
        """Re-read ``path`` whenever it changed and stood still for a poll (size, mtime or inode:
        a ConfigMap's symlink swap changes the inode) and install the routes it holds with the config's. A file that
        cannot be read or checked changes nothing; it is logged and counted. ``since``: its stamp
        before the start read it (one taken here missed an edit made while the routes installed)."""
        self._config_routes = tuple(config_routes)
        settled = Settled(since)
        while True:
            await asyncio.sleep(poll_s)
            if not settled.changed(file_stamp(path)):
                continue
            try:
                await self.reload(path)
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("routes file %s: the reload failed", path)
                self.metrics.routes_reloads["error"] = self.metrics.routes_reloads.get("error", 0) + 1

    async def reload(self, path: str) -> bool:
        reloads = self.metrics.routes_reloads
        try:
            specs = await asyncio.to_thread(read_routes_file, path)
            await asyncio.to_thread(buckets.warm, [s.name for s in specs])  # (hashing: off the loop)
            await self.install([*self._config_routes, *specs], path)
        except ConfigError as e:
            reloads["error"] = reloads.get("error", 0) + 1
            log.error("routes file %s not applied, the routes stay as they were: %s", path, e)
            return False
        reloads["ok"] = reloads.get("ok", 0) + 1
        return True

    # ---------------------------------------------------------------- the rollout controller
    async def control(self, tick_s: float = TICK_S) -> None:
        """Step every running rollout at the end of its interval (see ``core/rollout.py``)."""
        while True:
            await asyncio.sleep(tick_s)
            try:
                await self.step(self.clock())
            except Exception:  # the controller must outlive any one failed step
                log.exception("rollout controller: a step failed")

    async def step(self, now: float) -> None:
        for route in list(self.routes.values()):
            if self.routes.get(route.name) is not route:  # replaced by a reload while an audit line was written
                continue
            r, state = route.spec.rollout, route.rollout
            if r is None or state is None or state.state != ro.RUNNING or now < state.next_at:
                continue
            try:
                if self.peer is None:
                    canary, baseline = route.window_figures()
                else:  # the pod's figures: every worker's window of this interval
                    canary, baseline = route.pod_figures(await self.peer.windows(route.name))
                    if self.routes.get(route.name) is not route:  # reloaded meanwhile: judged next tick
                        continue
                verdict = ro.tick(r, state, now, canary, baseline)
            except Exception:  # one route's figures must not stop the others' rollouts
                log.exception("route '%s' rollout: the interval could not be judged; starting a new one", route.name)
                route.new_windows()
                self._share(route, True)
                continue
            if verdict is None:
                continue
            route.new_windows()
            if state.waits > 1:
                # still waiting at this step: said once, when the wait began (a line, an audit record
                # and a state file each interval grew without a request)
                self._share(route, True)
                continue
            self._apply(route)
            self._share(route, True)
            figures = ", ".join(f"{k}={v:.4g}" for k, v in verdict.figures.items())
            log.info("route '%s' rollout: %s%s", route.name, state.last, f" ({figures})" if figures else "")
            await self._audited("rollout.step", route.name, state.state, f"{state.last}; {figures}")

    def _apply(self, route: ServedRoute) -> None:
        """The rollout's weights into the bucket table, kept and published."""
        r, state = route.spec.rollout, route.rollout
        if r is not None and state is not None:
            route.table.reweigh(ro.weights(r, state, route.spec.weights))
        route.publish()
        self._save(route)

    # ---------------------------------------------------------------- admin operations
    def _route(self, name: str) -> ServedRoute:
        route = self.routes.get(name)
        if route is None:
            raise not_found(f"unknown route '{printable(clip(name))}'")
        return route

    def set_weights(self, name: str, weights: Mapping[str, Any]) -> ServedRoute:
        """Runtime weights (variants not named keep theirs); a running rollout is paused, since
        its steps would overwrite them."""
        route = self._route(name)
        new = dict(route.table.weights)
        if not weights:  # (else a request that changes nothing would pause the rollout)
            raise invalid(f"no weights given; name one or more variants of route '{name}': {', '.join(new)}")
        for variant, w in weights.items():
            if variant not in new:
                shown = printable(clip(str(variant)))
                raise invalid(f"route '{name}' has no variant '{shown}'; it has {', '.join(new)}")
            if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 100:
                raise invalid(f"the weight of variant '{variant}' must be a whole number from 0 to 100")
            new[variant] = w
        if sum(new.values()) <= 0:
            raise invalid("the weights add up to 0; at least one must be positive")
        if route.rollout is not None and route.rollout.state == ro.RUNNING:
            ro.pause(route.rollout)
            route.rollout.last = "paused: weights set by hand"
        route.table.reweigh(new)
        route.publish()
        self._save(route)
        self._share(route, False)
        return route

    def transition(self, name: str, action: str) -> ServedRoute:
        """promote, rollback, pause or resume the route's rollout."""
        route = self._route(name)
        r, state = route.spec.rollout, route.rollout
        if r is None or state is None:
            raise GatewayError(ErrorCode.FAILED_PRECONDITION, f"route '{name}' has no rollout")
        before = state.state
        if action == "promote":
            ro.promote(state, r)
        elif action == "rollback":
            ro.rollback(state)
        elif action == "pause":
            ro.pause(state)
        elif action == "resume":
            ro.resume(state, r, self.clock())
        else:
            raise invalid(f"unknown rollout action '{clip(action)}'")
        if action in ("promote", "rollback") or (action == "resume" and state.state != before):
            route.new_windows()
            self._apply(route)  # the state's weights
        elif state.state != before:  # paused: the weights stay as they are
            route.publish()
            self._save(route)
        else:  # a pause or resume that changed nothing touches nothing (weights set by hand stay)
            return route
        self._share(route, True)
        return route

    def close(self) -> None:
        """Drain: the shadows' copies still running are cancelled first; then the tasks."""
        for route in self.routes.values():
            for s in route.shadows:
                s.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._senders is not None:
            self._senders.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True)  # what was kept is on disk before the process goes


class RoutePeer(Protocol):
    """The other worker processes, as the leader's route table reaches them (``worker.py``)."""

    async def windows(self, name: str, outputs: bool = True) -> list[dict[str, dict[str, Any]]]:
        """The other workers' windows of route ``name`` (variant -> :meth:`Window.export`)."""

    def share(self, name: str, doc: dict[str, Any] | None, new_windows: bool) -> None:
        """Send a change of route ``name`` (None: it is gone) to the supervisor, which keeps it
        (and state_dir) and sends it to the other workers (never waits)."""

    async def states(self) -> dict[str, dict[str, Any]]:
        """The leader's state of every route (a follower's catch-up)."""
