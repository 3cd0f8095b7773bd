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
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import cores, logs
from .config import ConfigError, RemoteModel, Settings
from .control import Channel
from .core.errors import ErrorCode, GatewayError
from .monitoring.metrics import Metrics, RuntimeFamily, Snapshot, by_worker, exposition
from .route_table import SYSTEM

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    import grpc

    from .monitoring.drift import DriftService

log = logging.getLogger("batchgate")

BACKOFF_S = (0.5, 30.0)  # the first restart's delay, doubled per quick death up to the second
STEADY_S = 60.0  # a worker up this long has its backoff reset
STATS_FRESH_S = 0.5  # V2 statistics asked of any worker reuse the workers' figures read this recently
POLL_S = 2.0  # how often the workers' figures are read (what a killed worker leaves behind is this old at most)
SNAPSHOT_TIMEOUT_S = 5.0
# Front mode: each worker batches what it receives before the hop to the owner (one call carries
# many requests, so the owner's per-call cost is shared), waiting at most this long for more; the
# owner batches again across the workers. Calls in flight from one worker to the owner, at most:
FRONT_QUEUE_DELAY_US = 500
FRONT_INFLIGHT = 4


class WorkerFailed(Exception):
    """A worker could not start the first time (the pod does not start)."""


@dataclasses.dataclass(eq=False)
class Slot:
    """One worker position: the process in it now, and what its earlier lives left behind."""

    index: int
    label: str = ""  # "0", "1", ... or "owner" (the model-owning process behind front workers)
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    member: bool = False  # joined the control plane: repository changes reach it
    ready: bool = False  # listening
    models_ready: bool = True  # what the worker's own readiness says (its models), as of its last read
    failure: str = ""  # why the process in it said it could not start
    restarts: int = 0
    last: Snapshot | None = None  # the running process's last figures
    process: list[RuntimeFamily] = dataclasses.field(default_factory=list)
    gone: Snapshot = dataclasses.field(default_factory=Snapshot)  # counters of its earlier lives
    first: asyncio.Future | None = None  # the first start's outcome


class _Txn:
    """A two-phase load across the member workers: each votes once its new versions are built;
    all yes: commit; one failure (or one worker gone) before that: every worker rolls back."""

    def __init__(self, members: set[int]):
        self.members = members
        self.yes: set[int] = set()
        self.failed: dict[int, BaseException] = {}
        self.decision: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def vote(self, slot: int) -> None:
        self.yes.add(slot)
        if self.yes >= self.members and not self.decision.done():
            self.decision.set_result(True)
        # Shielded: the voter's handler is cancelled when its worker dies; the verdict the
        # other voters wait for must not be cancelled with it.
        if not await asyncio.shield(self.decision):
            raise GatewayError(ErrorCode.UNAVAILABLE, "the load failed on another worker: rolled back")

    def ended(self, slot: int, fut: asyncio.Future) -> None:
        """A worker's load call ended: before the verdict, a failure (or an end without a vote:
        that worker built nothing, e.g. it was stopping) calls the load off everywhere."""
        error = asyncio.CancelledError() if fut.cancelled() else fut.exception()  # (read: never "unretrieved")
        if self.decision.done():
            return
        if error is None and slot not in self.yes:
            error = GatewayError(ErrorCode.UNAVAILABLE, "the worker ended the load without building the model")
        if error is not None:
            self.failed[slot] = error
            self.decision.set_result(False)


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.n = cores.resolve_workers(settings.server.workers)
        self.slots = [Slot(i, str(i)) for i in range(self.n)]
        # workers_mode front: the workers forward to one process that owns the models and batches.
        self.owner = Slot(-1, "owner") if settings.server.workers_mode == "front" else None
        self._private: str = ""  # a 0700 directory holding the owner's Unix socket
        self.metrics = Metrics()  # only its own process collectors: the figures are the workers'
        self.stopping = False
        self._lock = asyncio.Lock()  # one pod-wide change at a time; a joining worker catches up under it
        self._txns: dict[int, _Txn] = {}
        self._txn_ids = 0
        self._models: dict[str, tuple] = {}  # name -> the last load / unload to replay, in order
        self._regions: dict[tuple[str | None, str], tuple] = {}  # (owner, name) -> registration
        self._log_changes: dict[str, Any] = {}  # the logging extension's changes, all of them
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
        if s.auth.api_keys_file:
            from .security.auth import KeyStore

            self._keys = KeyStore(s.auth.api_keys_file)  # a bad file: ConfigError, nothing started
            self._tasks.append(asyncio.ensure_future(self._watch_keys()))
        if srv.metrics_port >= 0:
            from .monitoring.serve import serve_metrics

            keys = self._keys if s.auth.metrics_requires_key else None
            self._metrics_server = serve_metrics(self._exposition, srv.host, srv.metrics_port, keys)
            self.metrics_port = self._metrics_server.server_port
        if srv.health_port >= 0:
            from grpc_health.v1._async import HealthServicer

            from .security.tls import plaintext_health_server

            self._health = HealthServicer()
            await self._publish()
            self._health_grpc, self.health_port = plaintext_health_server(
                self._health, _join(srv.host, srv.health_port)
            )
            await self._health_grpc.start()
        if self.owner is not None:
            self._private = tempfile.mkdtemp(prefix="batchgate-")
            log.info("supervisor (pid %d): starting the model-owning process", os.getpid())
            self._launch(self.owner)
            assert self.owner.first is not None
            await self.owner.first  # WorkerFailed: the caller stops
        log.info("supervisor (pid %d): starting %d worker processes", os.getpid(), self.n)
        for slot in self.slots:
            self._launch(slot)
        self._tasks.append(asyncio.ensure_future(self._poll()))
        if s.repository.model_control_mode == "poll":
            self._tasks.append(asyncio.ensure_future(self._rescans()))
        firsts = [slot.first for slot in self.slots if slot.first is not None]
        done, _ = await asyncio.wait(firsts, return_when=asyncio.FIRST_EXCEPTION)
        for f in done:
            f.result()  # WorkerFailed: the caller stops the others
        log.info(
            "batchgate: %d workers serving: HTTP on %s, gRPC on %s, metrics on %s",
            self.n,
            _join(srv.host, self.ports["http_port"]),
            _join(srv.host, self.ports["grpc_port"]),
            _join(srv.host, self.metrics_port) if self.metrics_port is not None else "off",
        )

    def _launch(self, slot: Slot) -> None:
        assert self._loop is not None
        slot.first = self._loop.create_future()
        self._tasks.append(asyncio.ensure_future(self._keep(slot)))

    @property
    def owner_address(self) -> str:
        return f"unix:{os.path.join(self._private, 'models.sock')}"

    def _reserve(self, name: str, host: str, port: int) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
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
        slot.last, slot.process, slot.channel, slot.proc = None, [], None, None
        await self._publish()
        if code < 0:
            return f"(pid {proc.pid}) was killed by {signal.Signals(-code).name}"
        return f"(pid {proc.pid}) exited with status {code}"

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
                await slot.channel.call("replay", ops=ops)
                slot.member = True

        async def ready(http_port: int, grpc_port: int) -> None:
            if self.settings.drift and self._drift_start is None and slot is not self.owner:
                self._drift_start = asyncio.ensure_future(self._start_drift(slot))  # once, by the first
            slot.ready = True
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
            "route_windows": lambda name: self._route_windows(slot, name),
            "route_share": lambda name, doc, new_windows: self._route_share(slot, name, doc, new_windows),
            "route_states": lambda: self._route_states(slot),
            "drift_samples": self._drift_samples,
            "audit": self._audit,
            "disagreement": self._disagreement,
            "drift_status": self._drift_status,
            "drift_command": self._drift_command,
        }

    def _members(self, fronts: bool = False) -> list[Slot]:
        """The processes that hold the models (the owner in front mode), or with ``fronts`` those
        that serve clients (the workers)."""
        slots = [self.owner] if self.owner is not None and not fronts else self.slots
        return [s for s in slots if s.member and s.channel is not None]

    async def _owner_models(self) -> list[RemoteModel]:
        """The owner's models, as the remote models the front workers serve (its name, raw
        forwarding over the Unix socket, its own batching)."""
        assert self.owner is not None and self.owner.channel is not None
        names = await self.owner.channel.call("models")
        return [
            RemoteModel(
                name=n,
                upstreams=(self.owner_address,),
                batching="gateway",
                max_queue_delay_us=FRONT_QUEUE_DELAY_US,
                max_inflight=FRONT_INFLIGHT,
                retries=0,
            )
            for n in names
        ]

    async def _follow(self, reload: list[str]) -> None:
        """Front mode: every worker serves what the owner serves now."""
        if self.owner is None:
            return
        specs = await self._owner_models()
        self._followed = sorted(s.name for s in specs)
        members = self._members(True)
        results = await asyncio.gather(
            *(s.channel.call("follow", specs=specs, reload=reload) for s in members if s.channel),
            return_exceptions=True,
        )
        for s, r in zip(members, results):
            if isinstance(r, BaseException):
                log.error("%s could not follow the model owner's models: %s", _named(s), r)

    # ------------------------------------------------------------------ the control plane
    async def load(self, name: str, config: str | None, files: dict[str, bytes] | None) -> None:
        """Load ``name`` on every worker, or on none: each builds and warms up the new versions
        while the old ones serve, then waits; once all have, all switch. A failure on one (or a
        worker gone meanwhile) makes the others close what they built; the answer says so."""
        async with self._lock:
            await self._two_phase("load", name=name, config=config, files=files)
            self._models.pop(name, None)
            self._models[name] = ("load", name, config, files)
            await self._follow([name])

    async def _two_phase(self, op: str, **args: Any) -> None:
        """``op`` (a load) on every member worker, each voting once built; all switch or none
        (the caller holds the lock)."""
        members = self._members()
        if not members:
            raise GatewayError(ErrorCode.UNAVAILABLE, "no worker is running: try again")
        self._txn_ids += 1
        tid = self._txn_ids
        txn = self._txns[tid] = _Txn({s.index for s in members})
        calls = []
        for s in members:
            assert s.channel is not None
            call = asyncio.ensure_future(s.channel.call(op, txn=tid, **args))
            call.add_done_callback(functools.partial(txn.ended, s.index))
            calls.append(call)
        try:
            await asyncio.gather(*calls, return_exceptions=True)
        finally:
            self._txns.pop(tid, None)
        if txn.decision.done() and txn.decision.result():
            return
        slot, error = next(iter(txn.failed.items()))
        others = len(members) - 1
        called_off = f"; the load was called off on the other {others} worker(s)" if others else ""
        what = error.message if isinstance(error, GatewayError) else f"worker {slot} went away during the load"
        code = error.code if isinstance(error, GatewayError) else ErrorCode.UNAVAILABLE
        raise GatewayError(code, f"{what} (worker {slot}{called_off}: no worker switched versions)")

    async def _rescans(self) -> None:
        """Poll mode with several workers: the rescan is the supervisor's, so that a changed
        model is loaded two-phase like an explicit load (every worker or none) and a removed one
        unloaded everywhere. One worker says what changed; a failed build keeps the old versions
        on every worker (and is not retried until the files change again)."""
        interval = self.settings.repository.repository_poll_s
        while not self.stopping:
            await asyncio.sleep(interval)
            if self.stopping:
                return
            try:
                await self._rescan()
            except Exception:  # the rescans must outlive any one failed pass (as in one process)
                log.exception("repository rescan failed")

    async def _rescan(self) -> None:
        # Every member says what it sees changed (a worker started meanwhile may have built the
        # new files already; the others still need them): the union is loaded.
        members = [s for s in self._members() if s.ready and s.channel is not None]
        plans = await asyncio.gather(
            *(s.channel.call("rescan_plan", timeout=60) for s in members if s.channel), return_exceptions=True
        )
        load = sorted({n for p in plans if isinstance(p, dict) for n in p["load"]})
        unload = sorted({n for p in plans if isinstance(p, dict) for n in p["unload"]})
        for name in load:  # the lock per model: joins and other changes go on between them
            if self.stopping:
                return
            async with self._lock:
                try:
                    await self._two_phase("poll_load", name=name)
                except GatewayError as e:
                    log.error("repository rescan: model '%s' not reloaded on any worker: %s", name, e.message)
        for name in unload:
            async with self._lock:
                with contextlib.suppress(GatewayError, TimeoutError):
                    await self._everywhere("poll_unload", self._members(), name=name)
        if load or unload:
            async with self._lock:
                await self._follow(load)

    async def unload(self, name: str) -> None:
        async with self._lock:
            await self._everywhere("unload", self._members(), name=name)
            self._models.pop(name, None)
            self._models[name] = ("unload", name)
            await self._follow([])

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int, owner: str | None) -> None:
        async with self._lock:
            done = await self._everywhere(
                "shm_register",
                self._members(True),
                name=name,
                key=key,
                offset=offset,
                byte_size=byte_size,
                owner=owner,
                undo=True,
            )
            if done is not None:  # registered nowhere now; the first error is the answer
                raise done
            self._regions[(owner, name)] = ("shm_register", name, key, offset, byte_size, owner)

    async def shm_unregister(self, name: str, owner: str | None) -> None:
        async with self._lock:
            try:
                await self._everywhere("shm_unregister", self._members(True), name=name, owner=owner)
            finally:  # gone from the replay even where a worker did not hold it
                for k in [k for k in self._regions if k[0] == owner and (not name or k[1] == name)]:
                    self._regions.pop(k)

    async def log_settings(self, changes: dict[str, Any]) -> None:
        """The logging extension's changes (checked by the worker that took them): every worker's
        logs and the supervisor's own."""
        async with self._lock:
            logs.change_log_settings(changes)
            self._log_changes.update(changes)
            every = self._members(True) + ([self.owner] if self.owner is not None and self.owner.member else [])
            await self._everywhere("log_settings", every, changes=changes)

    async def _everywhere(self, op: str, members: list[Slot], undo: bool = False, **args: Any) -> GatewayError | None:
        """``op`` on each of ``members``; the first error raised (with ``undo``: the successful
        registrations unregistered again and the error returned)."""
        if not members:
            raise GatewayError(ErrorCode.UNAVAILABLE, "no worker is running: try again")
        results = await asyncio.gather(
            *(s.channel.call(op, **args) for s in members if s.channel is not None), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return None
        first = errors[0] if isinstance(errors[0], GatewayError) else GatewayError(ErrorCode.INTERNAL, str(errors[0]))
        if not undo:
            raise first
        for s, r in zip(members, results):
            if not isinstance(r, BaseException) and s.channel is not None:
                with contextlib.suppress(GatewayError):
                    await s.channel.call("shm_unregister", name=args["name"], owner=args["owner"])
        return first

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
        """The keys file, watched here for the pod: when it changes every worker reads it at
        once (a revoked key stops working everywhere within one poll)."""
        a, keys = self.settings.auth, self._keys
        while not self.stopping:
            await asyncio.sleep(a.api_keys_poll_s)
            try:
                if not await asyncio.to_thread(keys.reload_if_changed):
                    continue
            except Exception:  # never let the watcher die: revocation depends on it
                log.exception("checking the API keys file %s failed", a.api_keys_file)
                continue
            members = self._members(True)
            await asyncio.gather(
                *(s.channel.call("keys_reload", timeout=30) for s in members if s.channel), return_exceptions=True
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

    async def _route_windows(self, slot: Slot, name: str) -> list[dict]:
        """The other workers' windows of a route, for the leader's rollout controller; a worker
        that does not answer in time is left out of this interval."""
        replies = await asyncio.gather(
            *(s.channel.call("route_windows", name=name, timeout=5) for s in self._others(slot) if s.channel),
            return_exceptions=True,
        )
        return [r for r in replies if isinstance(r, dict) and r]

    async def _route_share(self, slot: Slot, name: str, doc: dict | None, new_windows: bool) -> None:
        """The leader changed a route (a rollout step, the admin API; None: the route is gone):
        kept here, and in state_dir, and every other worker follows."""
        if doc is None:
            self._route_docs.pop(name, None)
        else:
            self._route_docs[name] = doc
        if self._state is not None:
            fn = self._state.remove if doc is None else functools.partial(self._state.save, doc=doc)
            self._state_writes.submit(_logged_write, fn, "route", name)  # in order, off the loop
        for s in self._others(slot):
            if s.channel is not None:
                s.channel.tell("route_state", name=name, doc=doc, new_windows=new_windows)

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

    async def _drift_command(self, name: str, args: dict) -> dict:
        return await self._monitor().command(name, args)

    # ------------------------------------------------------------------ one metrics view
    async def gather(self, fresh_s: float = 0.0) -> Snapshot:
        """Every worker's figures now, summed, with what exited workers left behind. In front
        mode the workers give what clients see (requests, refusals, connections, the hop to the
        owner) and the owner what the models did (queues, batches, executions, V2 statistics)."""
        every = self.slots + ([self.owner] if self.owner is not None else [])
        if time.monotonic() - self._gathered_at > fresh_s:  # else the last read serves (statistics)
            live = [(s, s.channel) for s in every if s.channel is not None and s.ready]
            replies = await asyncio.gather(
                *(ch.call("snapshot", timeout=SNAPSHOT_TIMEOUT_S) for _, ch in live), return_exceptions=True
            )
            for (s, ch), r in zip(live, replies):
                if isinstance(r, dict) and r and s.channel is ch:  # still that process (not exited meanwhile)
                    s.last, s.process, s.models_ready = r["snapshot"], r["process"], bool(r["ready"])
            self._gathered_at = time.monotonic()
            await self._publish()
        total = Snapshot()
        for s in every:
            mine = s.gone if s.last is None else s.gone.merge(s.last)
            if self.owner is not None:
                mine = mine.part(FRONT_FAMILIES, s is not self.owner)
            total = total.merge(mine)
        if self.drift is not None:  # the detector's figures, here
            total = total.merge(self.metrics.snapshot())
        return total

    async def _scrape(self) -> bytes:
        snap = await self.gather()
        snap.add("batchgate_workers", (), self.n)
        for s in self.slots + ([self.owner] if self.owner is not None else []):
            w = (s.label,)
            snap.add("batchgate_worker_up", w, int(s.ready))
            snap.add("batchgate_worker_restarts", w, s.restarts)
            answered = _requests(s.gone) + (_requests(s.last) if s.last is not None else 0)
            snap.add("batchgate_worker_requests", w, answered)
        runtime = {s.label: s.process for s in self.slots if s.process}
        if self.owner is not None and self.owner.process:
            runtime["owner"] = self.owner.process
        runtime["supervisor"] = self.metrics.runtime_samples()
        return exposition(snap, by_worker(runtime), self.settings.server.triton_metrics)

    def _exposition(self) -> bytes:
        """``/metrics`` (called on the metrics server's thread)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._scrape(), self._loop).result(SNAPSHOT_TIMEOUT_S * 2)

    async def _poll(self) -> None:
        while not self.stopping:
            await asyncio.sleep(POLL_S)
            with contextlib.suppress(Exception):
                await self.gather()
            if self.owner is not None and self.owner.member and self.owner.channel is not None:
                with contextlib.suppress(Exception):  # the owner rescanned (poll mode) or restarted
                    async with self._lock:
                        names = sorted(await self.owner.channel.call("models", timeout=SNAPSHOT_TIMEOUT_S))
                        restarted = self.owner.restarts != self._owner_lives
                        if names != self._followed or restarted:
                            self._owner_lives = self.owner.restarts
                            await self._follow(names if restarted else [])

    @property
    def ready(self) -> bool:
        """Ready while at least one worker listens and says it is ready (its models, strict
        readiness); the others may be starting. Not ready once the pod drains."""
        return not self.stopping and any(s.ready and s.models_ready for s in self.slots)

    async def _publish(self) -> None:
        if self._health is None:
            return
        from grpc_health.v1 import health_pb2

        on = health_pb2.HealthCheckResponse.SERVING if self.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "inference.GRPCInferenceService"):
            await self._health.set(service, on)

    # ------------------------------------------------------------------ stop
    async def stop(self) -> bool:
        """SIGTERM to every worker (each drains: refuses new work, finishes what it accepted),
        wait for the slowest; True if every one exited cleanly."""
        self.stopping = True
        await self._publish()  # NOT_SERVING on the health port while the workers drain
        procs = [s.proc for s in self.slots if s.proc is not None]
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
            clean = clean and code == 0
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
        if self._private:
            shutil.rmtree(self._private, ignore_errors=True)
        if self.disagreements is not None:
            self.disagreements.close()
        self._state_writes.shutdown(wait=True)
        log.info("supervisor: stopped")
        return clean


# Front mode: the families the front workers give (what clients see); the owner gives the rest.
FRONT_FAMILIES = frozenset(
    {
        "batchgate_requests",
        "batchgate_request_duration_seconds",
        "batchgate_refusals",
        "batchgate_request_errors",
        "batchgate_http_connections_refused",
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
    }
)


def _detached(op):
    """A pod-wide operation a worker asked for, run to its end even if that worker dies meanwhile
    (its handler is then cancelled; the other workers must not be left half-changed)."""

    async def run(**args: Any) -> Any:
        return await asyncio.shield(asyncio.ensure_future(op(**args)))

    return run


def _logged_write(fn, kind: str, name: str) -> None:
    try:
        fn(kind, name)
    except (OSError, ValueError) as e:
        log.error("route '%s': cannot keep its state in state_dir: %s", name, e)


def _named(slot: Slot) -> str:
    return "model owner" if slot.label == "owner" else f"worker {slot.label}"


def _requests(snap: Snapshot) -> float:
    return sum(v for v in snap.values.get("batchgate_requests", {}).values() if not isinstance(v, tuple))


def _join(host: str, port: Any) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def supervise(settings: Settings) -> int:
    """``batchgate serve`` with workers > 1: start, wait for SIGTERM / SIGINT, drain, exit."""
    sup = Supervisor(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(sup.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # SIGTERM while the workers load: they drain as they are
        log.info("shutdown signal received while starting")
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await sup.stop()
        return 0
    try:
        starting.result()
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
