"""The supervisor's pod-wide state (``supervisor.py``): the files one process writes (audit log,
disagreement log, route state), the keys file it watches, the routes' state the leader worker
shares, the one drift detector, and the one metrics view of every worker's figures."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .app import LIVENESS_SERVICE
from .config import ConfigError
from .core.errors import ErrorCode, GatewayError
from .monitoring.families import FAMILIES
from .monitoring.metrics import Metrics, Snapshot, by_worker, exposition
from .pod_control import POLL_S, SNAPSHOT_TIMEOUT_S, STALE_WAIT_S, Slot
from .route_table import SYSTEM

if TYPE_CHECKING:
    from .config import Settings
    from .monitoring.drift import DriftService

log = logging.getLogger("batchgate")


class PodState:
    """Pod-wide state and the metrics view, as part of :class:`~batchgate.supervisor.Supervisor`."""

    if TYPE_CHECKING:
        settings: Settings
        slots: list[Slot]
        owner: Slot | None
        stopping: bool
        n: int
        metrics: Metrics
        audit: Any
        disagreements: Any
        drift: DriftService | None
        _drift_start: asyncio.Future | None
        _keys: Any
        _route_docs: dict[str, dict]
        _state: Any
        _state_writes: ThreadPoolExecutor
        _gathered_at: float
        _reads_void: int
        _health: Any
        _loop: asyncio.AbstractEventLoop | None
        _lock: asyncio.Lock
        _followed: list[str]
        _owner_lives: int

        def _members(self, fronts: bool = False) -> list[Slot]: ...

        async def _follow(self, reload: list[str]) -> None: ...

    # ------------------------------------------------------------------ the pod's files
    def _open_files(self) -> None:
        """The audit log and the disagreement log: written here only (ConfigError if they cannot
        be opened, as in one process)."""
        from .security.audit import AuditLog
        from .shadows import DisagreementLog

        a, rs = self.settings.auth, self.settings.routing
        try:
            self.audit = AuditLog(a.audit_log_file) if a.audit_log_file else None
        except OSError as e:
            raise ConfigError(
                f"audit_log_file '{a.audit_log_file}' cannot be opened for appending: {e.strerror}"
            ) from None
        try:
            self.disagreements = (
                DisagreementLog(rs.disagreement_log_file, rs.disagreement_log_max_bytes, rs.disagreement_log_per_s)
                if rs.disagreement_log_file and (self.settings.routes or rs.routes_file)
                else None
            )
        except OSError as e:
            raise ConfigError(f"routing: cannot use {e.filename}: {e.strerror}") from None

    async def _watch_keys(self) -> None:
        """The keys file, watched here for the pod: once a change has stood still for a poll
        every worker reads it at once, if it still has the signature this process read (a revoked
        key stops working everywhere within two polls; a file caught half-written is never read)."""
        a, keys = self.settings.auth, self._keys
        while not self.stopping:
            await asyncio.sleep(a.api_keys_poll_s)
            try:
                if not await keys.poll():
                    continue
            except Exception:  # never let the watcher die: revocation depends on it
                log.exception("checking the API keys file %s failed", a.api_keys_file)
                continue
            members = self._members(True)
            signature = tuple(keys.signature)
            await asyncio.gather(
                *(s.channel.call("keys_reload", signature=signature, timeout=30) for s in members if s.channel),
                return_exceptions=True,
            )

    async def _audit(self, fields: dict) -> None:
        if self.audit is None:
            return
        try:
            await self.audit.arecord(**fields)
        except OSError as e:
            raise GatewayError(ErrorCode.INTERNAL, f"could not write the audit log: {e}") from None

    async def _disagreement(self, text: str) -> None:
        if self.disagreements is not None:
            self.disagreements.emit(text)

    # ------------------------------------------------------------------ routes: one leader
    def _others(self, slot: Slot) -> list[Slot]:
        return [s for s in self._members(True) if s is not slot]

    async def _route_windows(self, slot: Slot, name: str, outputs: bool = True) -> list[dict]:
        """The other workers' windows of a route, for the leader's rollout controller (and, without
        their kept ``outputs``, its admin API); a worker that does not answer in time is left out."""
        replies = await asyncio.gather(
            *(
                s.channel.call("route_windows", name=name, outputs=outputs, timeout=5)
                for s in self._others(slot)
                if s.channel
            ),
            return_exceptions=True,
        )
        return [r for r in replies if isinstance(r, dict) and r]

    async def _route_share(self, slot: Slot, name: str, doc: dict | None, new_windows: bool) -> None:
        """The leader changed a route (a rollout step, the admin API; None: the route is gone):
        kept here, and in state_dir, and every other worker follows."""
        kept = self._route_docs.get(name)
        if doc is None:
            self._route_docs.pop(name, None)
            self._forget_route(name, None)
        else:
            self._route_docs[name] = doc
            if kept is not None and kept.get("fingerprint") != doc.get("fingerprint"):
                self._forget_route(name, doc.get("table", {}).get("variants", []))
        if self._state is not None:
            fn = self._state.remove if doc is None else functools.partial(self._state.save, doc=doc)
            self._state_writes.submit(_logged_write, fn, "route", name)  # in order, off the loop
        for s in self._others(slot):
            if s.channel is not None:
                s.channel.tell("route_state", name=name, doc=doc, new_windows=new_windows)

    def _forget_route(self, name: str, variants: list[str] | None) -> None:
        """What exited workers left of route ``name``, as one process drops it: removed from the
        configuration (``variants`` None), every figure of it goes; redefined, its V2 statistics
        count from zero (it is a new route) and the variants it no longer has go, its other
        counters go on. Until 2026-12-06 a removed route stayed on ``/metrics`` for good once a
        worker had restarted, and a redefined one's statistics started from the old route's."""
        key = (name, "")
        for s in self.slots:
            s.gone.stats.pop(key, None)
            s.gone.failures.pop(key, None)
            for family, series in s.gone.values.items():
                labels = FAMILIES[family].labels
                if labels[:1] != ("route",):
                    continue
                by_variant = labels[1:2] == ("variant",)
                for k in list(series):
                    if k[0] == name and (variants is None or (by_variant and k[1] not in variants)):
                        del series[k]

    async def _route_states(self, slot: Slot) -> dict:
        """The routes' state for a worker that just built its routes: the pod's, kept here from
        what the leader shared; before the leader shared any, a ready worker's."""
        if self._route_docs:
            return dict(self._route_docs)
        for s in sorted(self._others(slot), key=lambda s: s.index):
            if s.ready and s.channel is not None:
                with contextlib.suppress(GatewayError, TimeoutError):
                    return await s.channel.call("route_states", timeout=10)
        return {}

    # ------------------------------------------------------------------ drift: one detector
    async def _start_drift(self, slot: Slot) -> None:
        """The drift monitors' detector, here: checked against the signatures the first ready
        worker serves (each worker checked its monitors already, so this does not fail)."""
        from .monitoring.drift import DriftService
        from .security.access import Access

        if slot.channel is None:
            self._drift_start = None
            return
        access = Access(None, audit=self.audit)
        service = DriftService(
            self.settings.drift,
            self.settings.drift_detector,
            self.metrics,
            lambda action, target, outcome, detail: access.audited(SYSTEM, None, action, target, outcome, detail),
        )
        try:
            service.prepare(await slot.channel.call("drift_signatures", timeout=30))
        except (ConfigError, GatewayError, TimeoutError) as e:  # (that worker went away): the next ready one tries
            log.error("drift: the detector cannot start yet: %s", e)
            self._drift_start = None
            return
        assert self._loop is not None
        service.start(self._loop)
        self.drift = service

    async def _drift_samples(self, message: tuple) -> None:
        if self.drift is not None:
            self.drift.take(message[1])
            return
        for model, _, _, _, count in message[1]:  # the detector is not up yet: dropped, counted
            dm = self.metrics.drift(model)
            dm.samples["dropped"] = dm.samples.get("dropped", 0) + count

    def _monitor(self) -> DriftService:
        if self.drift is None:
            raise GatewayError(ErrorCode.UNAVAILABLE, "the drift detector is starting")
        return self.drift

    async def _drift_status(self, model: str) -> dict:
        return self._monitor().status(model)

    async def _drift_command(self, name: str, args: dict, until: float | None = None) -> dict:
        return await self._monitor().command(name, args, until)

    # ------------------------------------------------------------------ one metrics view
    async def gather(self, fresh_s: float = 0.0, patient: bool = False) -> Snapshot:
        """Every worker's figures now, summed, with what exited workers left behind. In front
        mode the workers give what clients see (requests, refusals, connections, requests in
        flight, the hop to the owner), the owner what the models did (batches, executions, V2
        statistics, which count each hop as the requests it merged), and both their queues."""
        every = self.slots + ([self.owner] if self.owner is not None else [])
        if time.monotonic() - self._gathered_at > fresh_s:  # else the last read serves (statistics)
            # (a joining worker too: it holds the control lock, so one that hangs must be found)
            live = [(s, s.channel) for s in every if s.channel is not None and (s.ready or s.joining)]
            asked, void = time.monotonic(), self._reads_void
            # A worker that missed the last snapshot (hung, stopped) is given a moment only: one such
            # process must not hold every scrape and statistics call for the whole timeout.
            replies = await asyncio.gather(
                *(
                    ch.call("snapshot", timeout=STALE_WAIT_S if s.stale and not patient else SNAPSHOT_TIMEOUT_S)
                    for s, ch in live
                ),
                return_exceptions=True,
            )
            now = time.monotonic()
            for (s, ch), r in zip(live, replies):
                if s.channel is not ch:  # exited meanwhile
                    continue
                if isinstance(r, dict) and r:
                    # A read that waited for a slow worker ends after later reads: its figures of
                    # the others are older than theirs, and would take the totals backwards.
                    if asked >= s.asked_at:
                        s.last, s.process, s.models_ready = r["snapshot"], r["process"], bool(r["ready"])
                        s.asked_at = asked
                    s.answered_at, s.stale = now, False
                else:
                    s.stale = True
            # (a read begun before a model's statistics restarted holds its old versions' counts:
            # kept as the workers' figures until a later read, never reused for a statistics call)
            self._gathered_at = time.monotonic() if void == self._reads_void else -1e9
            await self._publish()
        total = Snapshot()
        for s in every:
            mine = s.gone if s.last is None else s.gone.merge(s.last)
            if self.owner is not None:
                mine = mine.part(FRONT_FAMILIES, False) if s is self.owner else mine.part(FRONT_SIDE, True)
            total = total.merge(mine)
        if self.drift is not None:  # the detector's figures, here (and this process's own, below)
            total = total.merge(self.metrics.snapshot())
        else:
            for file, watched in self.metrics.watched_files:  # (the keys file is read here, for the pod)
                total.add("batchgate_reload_failures", (file,), watched.reload_failures)
        return total

    def _tell_owner_ready(self) -> None:
        """Front mode: each worker's readiness (strict) follows the model-owning process's, as the
        health port's does: a model the owner should serve and does not (a failed load) makes
        every worker not ready, not only the pod's health port. Told when it changes (with the
        health port's, ``_publish``) and to a worker as it joins, before it listens."""
        if self.owner is None:
            return
        ready = self.owner.ready and self.owner.models_ready
        for s in self._members(True):
            if s.owner_ready_told is not ready and s.channel is not None and not s.channel.closed.is_set():
                s.channel.tell("owner_ready", ready=ready)
                s.owner_ready_told = ready

    async def _scrape(self) -> bytes:
        snap = await self.gather()
        snap.add("batchgate_workers", (), self.n)
        if self._state is not None:  # (written here only, never by the workers)
            snap.add("batchgate_state_write_failures", (), self._state.failures)
        for s in self.slots + ([self.owner] if self.owner is not None else []):
            w = (s.label,)
            snap.add("batchgate_worker_up", w, int(s.ready and not s.stale))
            snap.add("batchgate_worker_restarts", w, s.restarts)
            if s is self.owner:  # (it answers the workers' calls, not clients: counted, they would count twice)
                continue
            answered = _requests(s.gone) + (_requests(s.last) if s.last is not None else 0)
            snap.add("batchgate_worker_requests", w, answered)
        runtime = {s.label: s.process for s in self.slots if s.process}
        if self.owner is not None and self.owner.process:
            runtime["owner"] = self.owner.process
        runtime["supervisor"] = self.metrics.runtime_samples()
        for reason, n in self.metrics.connections_refused().items():  # (the metrics port's, served here)
            snap.add("batchgate_http_connections_refused", (reason,), n)
        return exposition(snap, by_worker(runtime), self.settings.server.triton_metrics)

    def _exposition(self) -> bytes:
        """``/metrics`` (called on the metrics server's thread)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._scrape(), self._loop).result(SNAPSHOT_TIMEOUT_S * 2)

    async def _poll(self) -> None:
        """Read the workers' figures and kill the hung ones. Never waits on the control lock: a
        pod-wide change waiting for a hung worker holds it, and only this loop frees that change
        (by killing the worker), so the owner's models are followed by a task of their own."""
        while not self.stopping:
            await asyncio.sleep(POLL_S)
            with contextlib.suppress(Exception):
                await self.gather(patient=True)  # (the full wait: a slow worker is not a hung one)
            self._kill_hung()

    async def _follow_owner(self) -> None:
        """Front mode: the workers follow what the owner serves after it rescanned (poll mode) or
        restarted."""
        while not self.stopping:
            await asyncio.sleep(POLL_S)
            if self.owner is None or not self.owner.member or self.owner.channel is None:
                continue
            with contextlib.suppress(Exception):
                async with self._lock:
                    names = sorted(await self.owner.channel.call("models", timeout=SNAPSHOT_TIMEOUT_S))
                    restarted = self.owner.restarts != self._owner_lives
                    if names != self._followed or restarted:
                        self._owner_lives = self.owner.restarts
                        await self._follow(names if restarted else [])

    def _kill_hung(self) -> None:
        """Kill a worker that has not answered a snapshot for ``worker_hang_s`` (its keeper starts
        it again): a hung process still holds its share of the port's new connections, and a
        pod-wide change waiting for its answer ends with it (``_ask``); one hung while joining held
        the control lock, and so every pod-wide change after it, for ever."""
        hang_s = self.settings.server.worker_hang_s
        if not hang_s or self.stopping:
            return
        now = time.monotonic()
        for s in self.slots + ([self.owner] if self.owner is not None else []):
            proc = s.proc
            if s.stale and (s.ready or s.joining) and proc is not None and now - s.answered_at > hang_s:
                log.error("worker %s (pid %d) has not answered for %.0f s: killing it", s.label, proc.pid, hang_s)
                s.failure = f"(pid {proc.pid}) did not answer the supervisor for {hang_s:g} s (worker_hang_s): killed"
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                s.stale = False  # (once: its keeper takes it from here)

    @property
    def ready(self) -> bool:
        """Ready while at least one worker listens and says it is ready (its models, strict
        readiness; the others may be starting) and, in front mode, the model-owning process is up
        and ready (without it no worker can answer). Not ready once the pod drains."""
        owner = self.owner
        if owner is not None and not (owner.ready and owner.models_ready):
            return False
        return not self.stopping and any(s.ready and s.models_ready for s in self.slots)

    async def _publish(self) -> None:
        """The pod's readiness may have changed: the health port says it, and front workers hear
        the owner's."""
        self._tell_owner_ready()
        if self._health is None:
            return
        from grpc_health.v1 import health_pb2

        on = health_pb2.HealthCheckResponse.SERVING if self.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "inference.GRPCInferenceService"):
            await self._health.set(service, on)
        # kubelet's liveness probe (the chart's, on the health port): alive while the supervisor runs
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)


# Front mode: the families the front workers give (what clients see); the owner gives the rest.
FRONT_FAMILIES = frozenset(
    {
        "batchgate_requests",
        "batchgate_request_duration_seconds",
        "batchgate_refusals",
        "batchgate_request_errors",
        "batchgate_http_connections_refused",
        "batchgate_unsent_answer_bytes",
        "batchgate_remote_requests",
        "batchgate_upstream_requests",
        "batchgate_upstream_errors",
        "batchgate_upstream_request_duration_seconds",
        "batchgate_upstream_ejections",
        "batchgate_upstream_outstanding",
        "batchgate_upstream_healthy",
        "batchgate_shm_regions",
        "batchgate_shm_bytes",
        "batchgate_shm_requests",
        # every client request a worker holds, whether waiting for its hop or at the owner
        "batchgate_inflight_requests",
    }
)
# ... and the queue is in both: requests a worker holds until a call to the owner is free, and
# those at the owner (each call counted as the requests it merged); so is every process's own
# stalls (its event loop's lag, its collector's pauses), summed.
FRONT_SIDE = FRONT_FAMILIES | {
    "batchgate_queue_depth",
    "batchgate_queue_oldest_age_seconds",
    "batchgate_event_loop_lag_seconds",
    "batchgate_gc_pause_seconds",
    # ... and what each process writes of its own: the access log (the workers'), spans, log lines
    # past their bounds, files it watches, the certificate it serves (the workers' own, which
    # until 2026-12-06 were left out: only the owner's counted, and it serves no client)
    "batchgate_access_log_lines",
    "batchgate_access_log_dropped",
    "batchgate_trace_spans",
    "batchgate_failure_log_dropped",
    "batchgate_audit_log_dropped",
    "batchgate_reload_failures",
    "batchgate_tls_certificate_expiry_timestamp_seconds",
    # ... and the routes, which the workers serve over the owner's models (it has none)
    *(f for f in FAMILIES if f.startswith(("batchgate_route", "batchgate_rollout", "batchgate_shadow"))),
    "batchgate_state_write_failures",
}


def _logged_write(fn, kind: str, name: str) -> None:
    try:
        fn(kind, name)
    except (OSError, ValueError) as e:
        log.error("route '%s': cannot keep its state in state_dir: %s", name, e)


def _requests(snap: Snapshot) -> float:
    return sum(v for v in snap.values.get("batchgate_requests", {}).values() if not isinstance(v, tuple))
