"""One worker process under the supervisor (``supervisor.py``): a whole :class:`Gateway` that
shares the HTTP and gRPC ports with the other workers (SO_REUSEPORT) and talks to the supervisor
over its control channel (``control.py``).

Started fresh by the supervisor (``python -m batchgate.worker FD``), never forked: FD is its end
of the control socket. The supervisor sends the settings; the worker loads its models, catches
up with what was loaded, unloaded and registered since the pod started (under the supervisor's
control lock, so no change slips in between), then listens and says it is ready. SIGTERM drains
it like a single server; so does the supervisor going away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

from . import cores, logs
from .control import Channel
from .core.errors import ConfigError, ErrorCode, GatewayError
from .lifecycle import leave, start_unless_stopped

log = logging.getLogger("batchgate")

DRIFT_BACKLOG_BYTES = 64 * 2**20  # drift samples waiting to be written to the supervisor, at most


class WorkerLink:
    """The worker's side of the control channel: the supervisor's calls it answers, and the
    :class:`~batchgate.dataplane.Coordinator` its data plane uses for pod-wide changes."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.gateway: Any = None  # the Gateway, once built
        # front mode: whether the model-owning process says it is ready (its strict readiness)
        self.owner_ready = True

    def handlers(self) -> dict:
        return {
            "snapshot": self._snapshot,
            "load": self._load,
            "unload": self._unload,
            "replay": self._replay,
            "shm_register": self._shm_register,
            "shm_unregister": self._shm_unregister,
            "log_settings": self._log_settings,
            "trace_settings": self._trace_settings,
            "models": self._models,
            "not_loaded": self._not_loaded,
            "wanted_reason": self._wanted_reason,
            "owner_ready": self._owner_ready,
            "follow": self._follow,
            "drift_signatures": self._drift_signatures,
            "rescan_plan": self._rescan_plan,
            "poll_load": self._poll_load,
            "poll_unload": self._poll_unload,
            "route_windows": self._route_windows,
            "route_state": self._route_state,
            "route_states": self._route_states,
            "keys_reload": self._keys_reload,
        }

    # the supervisor's calls ---------------------------------------------------------
    async def _snapshot(self) -> dict:
        gw = self.gateway
        if gw is None:
            return {}
        return {
            "snapshot": gw.metrics.snapshot(),
            "process": gw.metrics.runtime_samples(),
            "ready": gw.dataplane.accepting and gw.dataplane.ready(),
            "in_flight": gw.dataplane.in_flight,
        }

    async def _load(self, txn: int, name: str, config: str | None, files: dict[str, bytes] | None) -> None:
        channel = self.channel
        assert channel is not None

        async def vote() -> None:  # built and warmed up: wait for the other workers' verdict
            await channel.call("vote", txn=txn)

        await self.gateway.repository.load(name, config, files, vote=vote)

    async def _unload(self, name: str) -> list[int]:
        """The versions the model served last (kept by the supervisor for a worker joining later)."""
        await self.gateway.repository.unload(name)
        entry = self.gateway.repository.models.get(name)
        return list(entry.served_versions) if entry is not None else []

    async def _rescan_plan(self) -> dict:
        return self.gateway.repository.rescan_plan()

    async def _poll_load(self, txn: int, name: str) -> None:
        channel = self.channel
        assert channel is not None

        async def vote() -> None:
            await channel.call("vote", txn=txn)

        await self.gateway.repository.polled_load(name, vote)

    async def _poll_unload(self, name: str) -> None:
        await self.gateway.repository.polled_unload(name)

    async def _replay(self, ops: list[tuple]) -> list[list]:
        """What was changed in the pod before this worker joined, in order. Returns the
        shared-memory regions it could not register, as [owner, name] (their segments changed
        since: the supervisor drops them everywhere, so no two workers disagree about them)."""
        lost: list[list] = []
        for op, *args in ops:
            try:
                if op == "load":
                    await self.gateway.repository.load(*args)
                elif op == "unload":  # (a name it never had, an upload unloaded since: listed as the others do)
                    if args[0] in self.gateway.repository.models:
                        await self.gateway.repository.unload(args[0])
                    self.gateway.repository.served_before(args[0], args[1])
                elif op == "want":  # a load that failed on the other workers: not ready here either
                    if self.gateway.repository.ready(args[0]):  # (loaded at start: load_model)
                        await self.gateway.repository.unload(args[0])
                    self.gateway.repository.want(*args)
                elif op == "shm_register":
                    self.gateway.dataplane.shm.register(*args, counted=False)
                elif op == "log_settings":
                    logs.change_log_settings(*args)
                elif op == "trace_settings":
                    await self._trace_settings(*args)
            except (GatewayError, ValueError) as e:
                why = e.message if isinstance(e, GatewayError) else str(e)
                repository = self.gateway.repository
                if op == "load" and str(args[0]) in repository.remote:  # an upstream down for now:
                    repository.load_later(str(args[0]))  # retried in the background, as at start
                elif op == "load":  # a worker without a model the others serve must not listen: it starts again
                    raise GatewayError(
                        ErrorCode.UNAVAILABLE,
                        f"catching up with the other workers: load {str(args[0])[:128]} failed: {why}",
                    ) from None
                log.warning("catching up with the other workers: %s %s failed: %s", op, str(args[0])[:128], why)
                if op == "shm_register":
                    lost.append([args[4], args[0]])
        return lost

    async def _shm_register(self, name: str, key: str, offset: int, byte_size: int, owner: str | None) -> None:
        self.gateway.dataplane.shm.register(name, key, offset, byte_size, owner, counted=False)

    async def _shm_unregister(self, name: str, owner: str | None) -> None:
        self.gateway.dataplane.shm.unregister(name, owner, counted=False)

    async def _log_settings(self, changes: dict[str, Any]) -> None:
        logs.change_log_settings(changes)

    async def _trace_settings(self, model: str, changes: dict[str, Any]) -> None:
        tracing = self.gateway.tracing
        if tracing is not None:
            tracing.change(model, changes)

    async def _models(self) -> list[str]:
        """The models this process serves (the model-owning process behind front workers)."""
        return sorted({r["name"] for r in self.gateway.repository.index(ready_only=True)})

    async def _not_loaded(self, name: str, reason: str | None) -> None:
        """A model the workers beside this one do not serve: not served here either (``_strays``);
        with a ``reason`` they should, and are not ready: nor is this one."""
        repository = self.gateway.repository
        await repository.not_loaded(name)
        if reason is not None:
            from .repository.entry import ModelEntry

            repository.models[name] = ModelEntry(name)
            repository.want(name, reason)

    async def _owner_ready(self, ready: bool) -> None:
        self.owner_ready = ready

    async def _wanted_reason(self, name: str) -> str | None:
        return self.gateway.repository.wanted_reason(name)

    async def _drift_signatures(self) -> dict:
        return self.gateway.drift_signatures()

    async def _keys_reload(self, signature: tuple[int, ...]) -> bool:
        """The supervisor saw the keys file change and stand still (its ``signature``): read it
        now (every worker at once), if it still has that signature."""
        keys = self.gateway.dataplane.access.keys if self.gateway is not None else None
        return keys is not None and await keys.reload_settled(signature)

    def _routes(self):
        return self.gateway.routes if self.gateway is not None else None

    async def _route_windows(self, name: str, outputs: bool = True) -> dict:
        table = self._routes()
        route = table.routes.get(name) if table is not None else None
        return {} if route is None else {v: w.export(outputs) for v, w in route.windows.items()}

    async def _route_state(self, name: str, doc: dict | None, new_windows: bool) -> bool:
        table = self._routes()
        return table is not None and table.apply_state(name, doc, new_windows)

    async def _route_states(self) -> dict:
        table = self._routes()
        return {} if table is None else table.states()

    async def catch_up_routes(self) -> None:
        """After this worker built its routes: the weights and rollout states the pod has now."""
        table = self._routes()
        if table is None:
            return
        try:
            docs = await self.states()
        except (GatewayError, TimeoutError) as e:  # starts with the configuration's; the leader shares on
            log.warning("could not take the pod's route state: %s", e)
            return
        for name, doc in docs.items():
            table.apply_state(name, doc, False)

    async def states(self) -> dict[str, dict[str, Any]]:
        return await self._sup().call("route_states", timeout=30)

    async def _follow(self, specs: list, reload: list[str]) -> None:
        """A front worker: serve exactly these remote models (those of the model-owning process)."""
        await self.gateway.repository.follow(specs, reload)

    # the DriftLink: samples to the supervisor's detector, its status and commands --
    def forward(self, message: tuple) -> None:
        ch = self.channel
        if ch is None or ch.closed.is_set() or ch.backlog() > DRIFT_BACKLOG_BYTES:
            for model, _, _, _, count in message[1]:  # the supervisor is behind (or gone): dropped, counted
                self.gateway.drift._dropped(model, count)
            return
        ch.tell("drift_samples", message=message)

    async def call(self, op: str, **args: Any) -> Any:
        return await self._sup().call(op, **args)

    # the RoutePeer: the leader's route table reaches the other workers ------------
    async def windows(self, name: str, outputs: bool = True) -> list[dict[str, dict[str, Any]]]:
        return await self._sup().call("route_windows", name=name, outputs=outputs, timeout=10)

    def share(self, name: str, doc: dict[str, Any] | None, new_windows: bool) -> None:
        if self.channel is not None and not self.channel.closed.is_set():
            self.channel.tell("route_share", name=name, doc=doc, new_windows=new_windows)

    # the pod's files, written by the supervisor ------------------------------------
    def audit_log(self, path: str) -> _AuditLine:
        return _AuditLine(self, path)

    def disagreement(self, text: str) -> None:
        if self.channel is not None and not self.channel.closed.is_set():
            self.channel.tell("disagreement", text=text)

    # the Coordinator: this worker's data plane asks the supervisor -----------------
    def _sup(self) -> Channel:
        if self.channel is None or self.channel.closed.is_set():
            raise GatewayError(ErrorCode.UNAVAILABLE, "the supervisor is gone: this worker is shutting down")
        return self.channel

    async def load(self, name: str, config: str | None, files: dict[str, bytes] | None) -> None:
        await self._sup().call("load", name=name, config=config, files=files)

    async def unload(self, name: str) -> None:
        await self._sup().call("unload", name=name)

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int, owner: str | None) -> None:
        await self._sup().call("shm_register", name=name, key=key, offset=offset, byte_size=byte_size, owner=owner)

    async def shm_unregister(self, name: str, owner: str | None) -> None:
        await self._sup().call("shm_unregister", name=name, owner=owner)

    async def statistics(self) -> dict[tuple[str, str], dict[str, Any]]:
        return await self._sup().call("statistics", timeout=10)

    async def log_settings(self, changes: dict[str, Any]) -> None:
        await self._sup().call("log_settings", changes=changes)

    async def trace_settings(self, model: str, changes: dict[str, Any]) -> None:
        await self._sup().call("trace_settings", model=model, changes=changes)


def _die_with_parent() -> None:
    """Linux: SIGTERM to this worker when the supervisor dies, even while it still loads its
    models (it then drains like on any SIGTERM); without it an orphan would keep the port."""
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the supervisor died before the call
        os.kill(os.getpid(), signal.SIGTERM)


class _AuditLine:
    """The audit log as a worker process writes it: each record to the supervisor, which appends
    and fsyncs it before the call returns (so an action is still on disk before it is answered)."""

    def __init__(self, link: WorkerLink, path: str):
        self.link, self.path = link, path

    async def arecord(self, **fields: Any) -> None:
        try:
            await self.link._sup().call("audit", fields=fields, timeout=30)
        except GatewayError as e:  # the access layer logs an OSError as a failure to write
            raise OSError(e.message) from None


async def run(fd: int) -> int:
    _die_with_parent()
    link = WorkerLink()
    channel = await Channel.over(socket.socket(fileno=fd), link.handlers())
    link.channel = channel
    reading = asyncio.ensure_future(channel.serve())
    hello = await channel.call("hello", pid=os.getpid())
    settings = hello["settings"]
    logs.setup(settings.server.log_format, settings.server.log_level, worker=hello["name"])
    cores.set_workers(hello["workers"])

    from .app import Gateway, WorkerRole  # (after GRPC_EXPERIMENTS is set: grpc is imported here)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        role = WorkerRole(link, leader=hello.get("leader", False), grpc_address=hello.get("grpc_address", ""))
        gateway = Gateway(settings, role=role)
    except ConfigError as e:
        channel.tell("failed", reason=f"configuration error: {e}")
        return 2
    link.gateway = gateway
    gateway.dataplane.coordinator = link
    try:
        starting = gateway.start(before_listening=lambda: channel.call("join"), routes_ready=link.catch_up_routes)
        if not await start_unless_stopped(starting, stop):
            await gateway.stop(0.1)
            channel.close()
            reading.cancel()
            return 0
    except ConfigError as e:
        channel.tell("failed", reason=f"configuration error: {e}")
        await gateway.stop(0.1)
        return 2
    except Exception as e:  # noqa: BLE001 - said to the supervisor, which decides what follows
        channel.tell("failed", reason=f"could not start: {type(e).__name__}: {e}")
        await gateway.stop(0.1)
        return 1
    # Said before the supervisor hears it: the supervisor's own "serving" line (once every worker
    # is ready) then never comes before a worker's ready line.
    log.info("%s (pid %d) ready", hello["name"], os.getpid())
    await channel.call("ready", http_port=gateway.http_port, grpc_port=gateway.grpc_port)
    gone = asyncio.ensure_future(channel.closed.wait())
    await asyncio.wait([asyncio.ensure_future(stop.wait()), gone], return_when=asyncio.FIRST_COMPLETED)
    if gone.done() and not stop.is_set():
        log.warning("%s: the supervisor is gone; draining", hello["name"])
    clean = await gateway.stop()
    if await channel.settle(10):  # a request's handler waited on one: a moment to write its answer
        await asyncio.sleep(0.1)
    channel.close()
    reading.cancel()
    return 0 if clean else 1


def main() -> int:
    from .cli import prefer_legacy_grpc_io

    prefer_legacy_grpc_io()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - non-Linux
        pass
    return leave(asyncio.run(run(int(sys.argv[1]))))


if __name__ == "__main__":
    raise SystemExit(main())
