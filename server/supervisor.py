"""Several worker processes behind one port (``workers`` > 1).

The supervisor binds no serving socket itself. It reserves the HTTP, gRPC and admin ports (bound
with SO_REUSEPORT, never listening, so port 0 resolves once and the kernel gives connections only
to listening workers), starts each worker fresh (``python -m batchgate.worker``: spawned, never a
fork of a process with threads or ONNX Runtime sessions), and keeps them running:

- one metrics view: ``/metrics`` sums the workers' snapshots by each family's rule
  (``monitoring/families.py``); a worker that exits leaves its counters and histograms behind
  (totals never go backwards), its gauges drop out at once; process metrics carry ``worker``;
- one control plane: a repository load is two-phase across workers (each builds the new version
  while the old one serves and votes; all switch, or none does), unloads and shared-memory
  registrations reach every worker, and a worker that (re)starts catches up before it listens;
- lifecycle: a worker that dies is started again with backoff and counted; SIGTERM drains every
  worker and the supervisor exits after the slowest.

Per-request limits (rates, in-flight, connections) stay per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import cores
from .config import ConfigError, Settings
from .control import Channel
from .core.errors import ErrorCode, GatewayError
from .lifecycle import start_unless_stopped
from .monitoring.metrics import Metrics
from .pod_control import (
    BACKOFF_S,
    STATS_FRESH_S,
    STEADY_S,
    PodControl,
    Slot,
    WorkerFailed,
    _detached,
    _named,
    _Txn,
    log,
)
from .pod_dir import SOCKET, PodDir, remove_leftovers
from .pod_state import PodState
from .transport.sockets import host_port as _join
from .transport.sockets import tcp_socket

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    import grpc

    from .monitoring.drift import DriftService


class Supervisor(PodControl, PodState):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.n = cores.resolve_workers(settings.server.workers)
        self.slots = [Slot(i, str(i)) for i in range(self.n)]
        # workers_mode front: the workers forward to one process that owns the models and batches.
        self.owner = Slot(-1, "owner") if settings.server.workers_mode == "front" else None
        self._private: PodDir | None = None  # a 0700 directory holding the owner's Unix socket
        self.metrics = Metrics()  # only its own process collectors: the figures are the workers'
        self.stopping = False
        self._lock = asyncio.Lock()  # one pod-wide change at a time; a joining worker catches up under it
        self._txns: dict[int, _Txn] = {}
        self._txn_ids = 0
        self._models: dict[str, tuple] = {}  # name -> the last load / unload to replay, in order
        self._files: dict[str, asyncio.Future] = {}  # name -> its folder's files as the pod loaded them
        self._regions: dict[tuple[str | None, str], tuple] = {}  # (owner, name) -> registration
        self._log_changes: dict[str, Any] = {}  # the logging extension's changes, all of them
        self._trace_changes: dict[str, dict[str, Any]] = {}  # the trace extension's, by model ("": the server)
        self._reserved: dict[str, socket.socket] = {}
        self.ports: dict[str, int] = {}
        self._tasks: list[asyncio.Task] = []
        self._metrics_server: WSGIServer | None = None
        self.metrics_port: int | None = None
        self._health: Any = None
        self._health_grpc: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.drift: DriftService | None = None  # the pod's one drift detector, fed by every worker
        self.audit: Any = None  # the audit log (audit_log_file): its one writer
        self._route_docs: dict[str, dict] = {}  # the routes' runtime state (weights, rollout), the pod's copy
        self._state: Any = None  # state_dir: the routes' state kept across restarts, written here only
        self._state_writes = ThreadPoolExecutor(1, thread_name_prefix="batchgate-state")
        self._keys: Any = None  # the API keys (api_keys_file): watched here, read by every worker on a change
        self.disagreements: Any = None  # the shadows' disagreement log: its one writer
        self._drift_start: asyncio.Future | None = None
        self._gathered_at = -1e9  # when the workers' figures were last read
        self._reads_void = 0  # bumped when a model's statistics restart: reads begun before are not reused
        self._followed: list[str] = []  # front mode: the owner's models the workers serve
        self._owner_lives = 0  # front mode: the owner's restarts the workers have followed

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._open_files()
        if s.routing.state_dir and (s.routes or s.routing.routes_file):
            from .state import StateDir

            try:
                self._state = StateDir(s.routing.state_dir)
            except OSError as e:
                raise ConfigError(f"routing: cannot use {e.filename}: {e.strerror}") from None
        srv = s.server
        for name, host in (("http_port", srv.host), ("grpc_port", srv.host)):
            self._reserve(name, host, getattr(srv, name))
        for name in ("admin_port", "admin_http_port"):
            if getattr(srv, name) >= 0:
                self._reserve(name, srv.admin_host, getattr(srv, name))
        from .backends.upstream_tls import check_remote_files

        check_remote_files(s.remote_models)  # remote models' TLS and token files: bad ones, nothing started
        if s.auth.api_keys_file:
            from .security.auth import KeyStore

            self._keys = KeyStore(s.auth.api_keys_file)  # a bad file: ConfigError, nothing started
            self._keys.on_removed = self.forget_owners
            self.metrics.watched_files = [("api_keys", self._keys)]  # (its failures: counted here alone)
            self._tasks.append(asyncio.ensure_future(self._watch_keys()))
        if srv.metrics_port >= 0:
            from .monitoring.serve import metrics_limits, serve_metrics

            keys = self._keys if s.auth.metrics_requires_key else None
            limits = metrics_limits(s, self.metrics.connection_refused)
            self._metrics_server = serve_metrics(self._exposition, srv.host, srv.metrics_port, keys, **limits)
            self.metrics_port = self._metrics_server.server_port
        if srv.health_port >= 0:
            from grpc_health.v1._async import HealthServicer

            from .transport.grpc_server import plaintext_health_server

            self._health = HealthServicer()
            await self._publish()
            address, refused = _join(srv.host, srv.health_port), self.metrics.connection_refused
            self._health_grpc, self.health_port = plaintext_health_server(self._health, address, s, refused)
            await self._health_grpc.start()
        if self.owner is not None:
            for path in await asyncio.to_thread(remove_leftovers):
                log.info("front mode: removed %s, left by a supervisor that is gone", path)
            self._private = PodDir()
            log.info("supervisor (pid %d): starting the model-owning process", os.getpid())
            self._launch(self.owner)
            assert self.owner.first is not None
            await self.owner.first  # WorkerFailed: the caller stops
        log.info("supervisor (pid %d): starting %d worker processes", os.getpid(), self.n)
        for slot in self.slots:
            self._launch(slot)
        self._tasks.append(asyncio.ensure_future(self._poll()))
        if self.owner is not None:
            self._tasks.append(asyncio.ensure_future(self._follow_owner()))
        if s.repository.model_control_mode == "poll":
            self._tasks.append(asyncio.ensure_future(self._rescans()))
        firsts = [slot.first for slot in self.slots if slot.first is not None]
        done, _ = await asyncio.wait(firsts, return_when=asyncio.FIRST_EXCEPTION)
        for f in done:
            f.result()  # WorkerFailed: the caller stops the others
        log.info(
            "batchgate: %d workers serving: HTTP on %s, gRPC on %s, metrics %s",
            self.n,
            _join(srv.host, self.ports["http_port"]),
            _join(srv.host, self.ports["grpc_port"]),
            "on " + _join(srv.host, self.metrics_port) if self.metrics_port is not None else "off",
        )

    def _launch(self, slot: Slot) -> None:
        assert self._loop is not None
        slot.first = self._loop.create_future()
        self._tasks.append(asyncio.ensure_future(self._keep(slot)))

    @property
    def owner_address(self) -> str:
        assert self._private is not None
        return f"unix:{os.path.join(self._private.path, SOCKET)}"

    def _reserve(self, name: str, host: str, port: int) -> None:
        try:
            if port:  # Free of any other owner first: SO_REUSEPORT alone would let this pod share
                # the port with another process that listens on it with SO_REUSEPORT (another
                # batchgate), each taking some of the connections.
                tcp_socket(host, port, reuse_port=False).close()
            sock = tcp_socket(host, port, reuse_port=True)
        except OSError as e:
            raise OSError(f"cannot reserve {name} {_join(host, port)}: {e.strerror}") from None
        self._reserved[name] = sock
        self.ports[name] = sock.getsockname()[1]

    def worker_settings(self, slot: Slot) -> Settings:
        """A worker's settings: the reserved ports; metrics and health are the supervisor's; the
        admin listeners are worker 0's. In front mode the workers serve no repository (they follow
        the owner's models as remote models), and the owner serves gRPC on its Unix socket only,
        trusting the workers (they checked keys, limits and TLS; its admin changes come from here)."""
        srv, p = self.settings.server, self.ports
        if slot is self.owner:
            alone = dataclasses.replace(
                srv, http_port=-1, admin_port=-1, admin_http_port=-1, metrics_port=-1, health_port=-1, workers="1"
            )
            # A worker's call carries a batch of requests, each within max_request_bytes already.
            limits = dataclasses.replace(self.settings.limits, max_request_bytes=2**31 - 1)
            return dataclasses.replace(
                self.settings,
                server=alone,
                limits=limits,
                auth=type(self.settings.auth)(),
                tls=type(self.settings.tls)(),
                drift=(),
                routes=(),  # the workers serve the routes over the owner's models
                routing=dataclasses.replace(self.settings.routing, routes_file="", state_dir=""),
            )
        admin = slot.index == 0
        server = dataclasses.replace(
            srv,
            http_port=p["http_port"],
            grpc_port=p["grpc_port"],
            admin_port=p.get("admin_port", -1) if admin else -1,
            admin_http_port=p.get("admin_http_port", -1) if admin else -1,
            metrics_port=-1,
            health_port=-1,
            workers="1",
        )
        if self.owner is None:
            return dataclasses.replace(self.settings, server=server)
        nothing = dataclasses.replace(
            self.settings.repository, model_repository="", model_control_mode="none", load_model=()
        )
        return dataclasses.replace(self.settings, server=server, repository=nothing, remote_models=())

    # ------------------------------------------------------------------ keeping workers running
    async def _keep(self, slot: Slot) -> None:
        delay = BACKOFF_S[0]
        while not self.stopping:
            began = time.monotonic()
            how = await self._run_once(slot)
            if self.stopping:
                return
            assert slot.first is not None
            if not slot.first.done():
                slot.first.set_exception(WorkerFailed(f"{_named(slot)} {slot.failure or how}"))
                return
            if time.monotonic() - began > STEADY_S:
                delay = BACKOFF_S[0]
            slot.restarts += 1
            log.error("%s %s; starting it again in %.1f s", _named(slot), slot.failure or how, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _run_once(self, slot: Slot) -> str:
        """Start the worker of ``slot`` and wait for it to exit; how it ended, in words."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slot.failure = ""
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "batchgate.worker", str(theirs.fileno()), pass_fds=(theirs.fileno(),)
            )
        except OSError as e:  # no process to wait for: said like an exit, and tried again
            mine.close()
            return f"could not be started: {e.strerror or e}"
        finally:
            theirs.close()
        slot.proc = proc
        if self.stopping:  # started as the pod stops: it drains at once
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        slot.channel = channel = await Channel.over(mine, self._handlers(slot))
        reading = asyncio.ensure_future(channel.serve())
        code = await proc.wait()
        slot.ready = slot.member = False
        channel.close()
        await reading
        if slot.last is not None:  # its counters stay in the totals; its gauges go with it
            slot.gone = slot.gone.merge(slot.last.without_gauges())
        slot.last, slot.process, slot.channel, slot.proc, slot.asked_at = None, [], None, None, 0.0
        await self._publish()
        if code < 0:
            return f"(pid {proc.pid}) was killed by {signal.Signals(-code).name}"
        return f"(pid {proc.pid}) exited with status {code}"

    async def _catch_up(self, slot: Slot) -> None:
        """What a worker (or the owner) joining before it listens must hear of the pod's changes,
        under the control lock."""
        assert slot.channel is not None
        async with self._lock:
            ops: list[tuple] = []
            if self.owner is None or slot is self.owner:
                ops += self._models.values()
            if slot is not self.owner:
                ops += self._regions.values()
                if self.owner is not None:
                    await slot.channel.call("follow", specs=await self._owner_models(), reload=[])
            if self._log_changes:
                ops.append(("log_settings", self._log_changes))
            for model, changes in self._trace_changes.items():
                ops.append(("trace_settings", model, changes))
            lost = await slot.channel.call("replay", ops=ops)
            await self.drop_regions([(owner, name) for owner, name in lost or ()])
            if self.owner is None or slot is self.owner:
                await self._same_files(slot)
            slot.member, slot.owner_ready_told = True, None
            if self._keys is not None and slot is not self.owner:
                # The keys file may have changed since this worker read it as it started, and
                # the watcher tells only the members: the pod's keys now, before it listens
                # (read once it is a member, so that a change the watcher is reading meanwhile
                # reaches it one way or the other; a second telling is a no-op).
                await slot.channel.call("keys_reload", signature=tuple(self._keys.signature), timeout=30)
            self._tell_owner_ready()  # (a front worker: before it listens, not at the next read)

    def _handlers(self, slot: Slot) -> dict:
        async def hello(pid: int) -> dict:
            owner = slot is self.owner
            return {
                "settings": self.worker_settings(slot),
                "name": _named(slot),
                "workers": 1 if owner else self.n,
                "grpc_address": self.owner_address if owner else "",
                "leader": slot.index == 0,
            }

        async def join() -> None:  # before it listens: catch up, under the lock
            assert slot.channel is not None
            # Its figures are read from now on, so that one hung while catching up (holding the
            # lock: every pod-wide change waits behind it) is killed as a ready one would be.
            slot.joining, slot.answered_at, slot.stale = True, time.monotonic(), False
            try:
                await self._catch_up(slot)
            finally:
                slot.joining = False

        async def ready(http_port: int, grpc_port: int) -> None:
            if self.settings.drift and self._drift_start is None and slot is not self.owner:
                self._drift_start = asyncio.ensure_future(self._start_drift(slot))  # once, by the first
            slot.ready, slot.stale, slot.answered_at = True, False, time.monotonic()  # (it answered just now)
            await self._publish()
            if slot.first is not None and not slot.first.done():
                slot.first.set_result(True)
            elif slot.restarts:
                log.info("%s (pid %d) serves again", _named(slot), slot.proc.pid if slot.proc else -1)

        async def failed(reason: str) -> None:
            slot.failure = reason

        async def vote(txn: int) -> None:
            t = self._txns.get(txn)
            if t is None:
                raise GatewayError(ErrorCode.UNAVAILABLE, "the load was called off")
            await t.vote(slot.index)

        async def statistics() -> dict:
            return (await self.gather(fresh_s=STATS_FRESH_S)).stats

        return {
            "hello": hello,
            "join": join,
            "ready": ready,
            "failed": failed,
            "vote": vote,
            "load": _detached(self.load),
            "unload": _detached(self.unload),
            "shm_register": _detached(self.shm_register),
            "shm_unregister": _detached(self.shm_unregister),
            "statistics": statistics,
            "log_settings": _detached(self.log_settings),
            "trace_settings": _detached(self.trace_settings),
            "route_windows": lambda name, outputs=True: self._route_windows(slot, name, outputs),
            "route_share": lambda name, doc, new_windows: self._route_share(slot, name, doc, new_windows),
            "route_states": lambda: self._route_states(slot),
            "drift_samples": self._drift_samples,
            "audit": self._audit,
            "disagreement": self._disagreement,
            "drift_status": self._drift_status,
            "drift_command": self._drift_command,
        }

    # ------------------------------------------------------------------ stop
    async def stop(self) -> bool:
        """SIGTERM to every worker (each drains: refuses new work, finishes what it accepted),
        wait for the slowest; True if every one exited cleanly."""
        self.stopping = True
        await self._publish()  # NOT_SERVING on the health port while the workers drain
        procs = [s.proc for s in self.slots if s.proc is not None]
        # A worker not listening yet (started again) holds no request, and may die of the SIGTERM
        # before its interpreter can catch it: that is no failed drain.
        starting = {s.proc for s in self.slots if s.proc is not None and not s.ready}
        owner = self.owner.proc if self.owner is not None else None
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        log.info("supervisor: draining %d workers", len(procs))
        grace = self.settings.server.exit_timeout_s + 15  # their grace period, then closing
        deadline = time.monotonic() + grace  # one for all: they drain at the same time
        clean = True
        for p in procs:
            try:
                code = await asyncio.wait_for(p.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.error("worker (pid %d) did not exit in %.0f s: killed", p.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                code = await p.wait()
            clean = clean and (code == 0 or (code == -signal.SIGTERM and p in starting))
        if owner is not None:  # the workers drained into it; now it drains too
            with contextlib.suppress(ProcessLookupError):
                owner.send_signal(signal.SIGTERM)
            try:
                clean = await asyncio.wait_for(owner.wait(), grace) == 0 and clean
            except TimeoutError:
                owner.kill()
                clean = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._drift_start is not None:
            with contextlib.suppress(BaseException):
                await self._drift_start
        if self.drift is not None:
            await asyncio.to_thread(self.drift.stop)
        if self._metrics_server is not None:  # (a scrape in progress may wait on this loop)
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        if self._health_grpc is not None:
            await self._health_grpc.stop(1.0)
        for sock in self._reserved.values():
            sock.close()
        if self._private is not None:
            self._private.remove()
        if self.disagreements is not None:
            self.disagreements.close()
        self._state_writes.shutdown(wait=True)
        log.info("supervisor: stopped")
        return clean


async def supervise(settings: Settings) -> int:
    """``batchgate serve`` with workers > 1: start, wait for SIGTERM / SIGINT, drain, exit."""
    sup = Supervisor(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if not await start_unless_stopped(sup.start(), stop):  # SIGTERM while the workers load
            await sup.stop()
            return 0
    except ConfigError as e:
        log.error("configuration error: %s", e)
        await sup.stop()
        return 2
    except (WorkerFailed, OSError) as e:
        log.error("batchgate could not start: %s", e)
        await sup.stop()
        return 2 if "configuration error" in str(e) else 1
    await stop.wait()
    log.info("shutdown signal received")
    return 0 if await sup.stop() else 1
