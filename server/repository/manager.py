"""The model repository: which models exist, their state, and loading, swapping and unloading them.

Layout: ``<repo>/<model>/config.pbtxt`` (optional) and ``<repo>/<model>/<version>/model.onnx``.
Control modes, as Triton names them:

- ``none``: load every model at start; the load/unload API is refused.
- ``poll``: as ``none``, then rescan every ``poll_interval_s``: new or changed models are
  (re)loaded, removed ones unloaded.
- ``explicit``: load only what ``load_models`` names at start (``*`` = all); afterwards only
  through the load/unload API.

A (re)load builds every served version completely (``build.py``) before one routine,
:meth:`ModelRepository._swap`, puts it in place; requests already on the old versions finish
there. Local and remote models share that routine.

Remote models (``remote_models`` in the settings) sit beside the repository's own: they load at
start whatever the mode (their signature is read from an upstream), are retried in the
background while no upstream answers, and, in explicit mode, answer the load/unload API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import Executor
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from ..backends.remote import SAID_DOWN
from ..config import ConfigError, RemoteModel
from ..core.errors import ErrorCode, GatewayError, ModelConfigError, not_found
from ..core.types import clip, is_version_text, printable, version_number
from ..model import ModelVersion
from ..monitoring.metrics import Metrics
from .build import VersionBuilder
from .config import config_from_json
from .entry import LOADING, READY, UNAVAILABLE, UNLOADING, ModelEntry, index_rows
from .scan import fingerprint, hide_paths, model_names, write_files
from .upload import checked_upload

log = logging.getLogger("batchgate.repository")

CONTROL_MODES = ("none", "poll", "explicit")


class ModelRepository:
    def __init__(
        self,
        root: str,
        builder: VersionBuilder,
        pool: Executor,
        metrics: Metrics,
        control_mode: str = "none",
        poll_interval_s: float = 15.0,
        load_models: tuple[str, ...] = (),
        retire_grace_s: float = 30.0,
        remote_models: tuple[RemoteModel, ...] = (),
        rescans: bool = True,
    ):
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {CONTROL_MODES}, not {control_mode!r}")
        self.root = os.path.abspath(root) if root else ""
        self.remote = {m.name: m for m in remote_models}
        self.builder = builder
        self.pool = pool  # loading runs here, never on the inference threads
        self.metrics = metrics
        self.mode = control_mode
        self.poll_interval_s = poll_interval_s
        self.load_models = load_models
        # poll mode: rescan here (False: a supervisor drives the rescans of several workers)
        self.rescans = rescans
        self.retire_grace_s = retire_grace_s
        self.models: dict[str, ModelEntry] = {}
        self._retrying: dict[str, asyncio.Task] = {}  # remote models waiting for an upstream
        self._reloads: set[asyncio.Task] = set()  # remote models loaded again: their upstreams changed
        self._generation: dict[str, int] = {}  # bumped by each unload: older loads stand down
        self._stopping = False
        self._wanted: set[str] = set()  # models that should be loaded (strict readiness)
        self._failing: dict[str, str] = {}  # remote model -> why its retried load last failed
        self._followed: set[str] = set()  # remote models a front worker follows (the pod's owner's)
        self._poller: asyncio.Task | None = None
        self._background: set[asyncio.Future] = set()
        # Called with a model's name whenever the versions it serves change (routes.py).
        self.listeners: list[Callable[[str], None]] = []
        # Names the routes hold (route_table.py): a folder of that name is never loaded, since a
        # route and a model cannot share a name (the next start would refuse the configuration).
        self.reserved: frozenset[str] = frozenset()
        self._told_reserved: set[str] = set()

    # ---------------------------------------------------------------- lookups (hot path)
    def resolve(self, name: str, version: str) -> ModelVersion:
        entry = self.models.get(name)
        if entry is None:
            raise not_found(f"unknown model '{printable(clip(name))}'")
        if version:
            served = entry.versions.get(version_number(version))
            if served is None:
                if entry.versions:
                    raise not_found(
                        f"model '{name}' has no version {version} loaded; loaded versions: "
                        f"{', '.join(str(v) for v in sorted(entry.versions))}"
                    )
                raise GatewayError(ErrorCode.UNAVAILABLE, f"model '{name}' is not ready: {entry.reason}")
            return served
        served = entry.latest
        if served is None:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"model '{name}' is not ready: {entry.reason}")
        return served

    def entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise not_found(f"unknown model '{printable(clip(name))}'")
        return entry

    def ready(self, name: str, version: str = "") -> bool:
        """Whether ``name`` (``version``) serves; a version that is no number is the caller's error."""
        if version:
            version_number(version)
        try:
            return self.resolve(name, version).ready()
        except GatewayError:
            return False

    def all_ready(self) -> bool:
        """Triton's strict readiness: every model that should be loaded is ready. A remote
        model counts until it has served once: a later outage of its upstreams makes that
        model UNAVAILABLE, but must not take every replica out of its Service. A model a front
        worker follows is no such upstream: it is the pod's own model-owning process, and the
        worker is ready only while that one serves it."""
        for name in self._wanted:
            entry = self.models.get(name)
            if entry is None:
                return False
            if name in self.remote and name not in self._followed:
                if not entry.loaded_once:
                    return False
            elif entry.latest is None or not entry.latest.ready():
                return False
        return True

    def wanted_reason(self, name: str) -> str | None:
        """Why ``name``, which should be loaded (strict readiness), serves nothing; None if it is not so."""
        entry = self.models.get(name)
        return entry.reason if name in self._wanted and entry is not None and not entry.versions else None

    def want(self, name: str, reason: str) -> None:
        """``name`` should be loaded but is not (its load failed on the pod's other workers): as here."""
        entry = self.models.get(name)
        if entry is not None and not entry.versions:
            entry.state, entry.reason = UNAVAILABLE, reason
            self._wanted.add(name)

    def served_before(self, name: str, versions: list[int]) -> None:
        """An unloaded ``name`` last served ``versions`` on the pod's other workers: listed so here
        too, also when this worker never knew it (a load call's upload, unloaded before it started)."""
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name, UNAVAILABLE, "unloaded")
        if not entry.versions and not entry.served_versions:
            entry.served_versions = tuple(versions)

    async def not_loaded(self, name: str) -> None:
        """``name`` is not served after all (the pod's other workers do not serve it): as unread."""
        await self._unload(name, forget=True)

    def served(self) -> list[ModelVersion]:
        return [s for e in self.models.values() for _, s in sorted(e.versions.items())]

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        self._discover()
        return [row for name in sorted(self.models) for row in index_rows(self.models[name], ready_only)]

    # ---------------------------------------------------------------- start, stop, poll
    def has_folder(self, name: str) -> bool:
        """Whether the repository holds a model folder ``name`` (loaded or not)."""
        return bool(self.root) and name in model_names(self.root)

    def _discover(self, polled: bool = False) -> list[str]:
        """The repository's model folders, entered in ``models``; a rescan (``polled``) leaves out
        a folder named as a remote model (at start the two are refused together), as any run
        leaves out one named as a route: until 2026-12-06 it replaced the remote model."""
        for n in self.remote:
            self.models.setdefault(n, ModelEntry(n))
        if not self.root:
            return []
        names = model_names(self.root)
        taken = self.reserved | set(self.remote) if polled else self.reserved
        if taken:
            for n in sorted(taken.intersection(names) - self._told_reserved):
                self._told_reserved.add(n)
                owner = "a remote model" if n in self.remote else "a route"
                log.warning("model folder '%s' is not loaded: %s has that name; rename one of them", n, owner)
            names = [n for n in names if n not in taken]
        for n in names:
            self.models.setdefault(n, ModelEntry(n))
        return names

    async def start(self) -> None:
        names = self._discover()
        both = sorted(set(names) & set(self.remote))
        if both:
            raise ConfigError(
                f"model(s) {', '.join(both)}: both a directory in the model repository and a remote model; rename one"
            )
        self._wanted.update(self.remote)
        for spec in self.remote.values():
            await self._load_remote(spec)
        if self.mode == "explicit":
            wanted = names if "*" in self.load_models else [n for n in self.load_models if n not in self.remote]
        else:
            wanted = names
        self._wanted.update(wanted)
        for n in wanted:
            await self._load(n, fail_missing=self.mode == "explicit")
        if self.mode == "poll" and self.rescans:
            self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        self._stopping = True
        if self._poller:
            self._poller.cancel()
        for t in self._retrying.values():
            t.cancel()
        await asyncio.gather(*(s.close_now() for s in self.served()), return_exceptions=True)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # pragma: no cover - a poll must never end polling
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        plan = self.rescan_plan()
        for name in plan["load"]:
            try:
                await self._load(name)
            except Exception:  # one model's failure never keeps the others from loading
                log.exception("model '%s' could not be loaded", name)
        for name in plan["unload"]:
            try:
                await self._unload(name, forget=True)
            except Exception:
                log.exception("model '%s' could not be unloaded", name)

    def rescan_plan(self) -> dict[str, list[str]]:
        """What a rescan finds: models whose files changed (or are new), and models gone."""
        present = set(self._discover(polled=True))
        self._wanted = present | set(self.remote)
        changed = [n for n in sorted(present) if fingerprint(os.path.join(self.root, n)) != self.models[n].fingerprint]
        gone = [n for n in self.models if n not in present and n not in self.remote]
        return {"load": changed, "unload": gone}

    async def polled_load(self, name: str, vote: Vote) -> None:
        """A rescan's reload, with the other workers (``vote``); a failed build keeps the old
        versions (and ends without voting, which calls the load off on the others)."""
        self._wanted.add(name)
        await asyncio.shield(self._load(name, vote=vote))

    async def polled_unload(self, name: str) -> None:
        self._wanted.discard(name)
        await asyncio.shield(self._unload(name, forget=True))

    # ---------------------------------------------------------------- the load / unload API
    def _explicit_only(self) -> None:
        if self.mode != "explicit":
            raise GatewayError(
                ErrorCode.UNAVAILABLE,
                f"explicit model load / unload is not allowed in model control mode '{self.mode}'; "
                "start with --model-control-mode=explicit",
            )

    async def load(
        self,
        name: str,
        config_json: str | None = None,
        files: dict[str, bytes] | None = None,
        vote: Vote | None = None,
    ) -> None:
        """The load API (explicit mode): load or reload ``name``. A model loaded through the API
        is one that should be loaded once it is ready (strict readiness).

        With ``vote`` (one of several worker processes loading together), the new versions are
        built while the old ones serve, then ``vote()`` is awaited before they are put in place:
        if it raises, they are closed, the old ones go on serving and the error is the load's."""
        self._explicit_only()
        # Shielded: a caller that gives up (a gRPC deadline) does not cancel the load half-way;
        # it finishes under the model's lock and leaves a consistent state behind.
        await asyncio.shield(self._load_api(name, config_json, files, vote))

    async def _load_api(
        self, name: str, config_json: str | None, files: dict[str, bytes] | None, vote: Vote | None = None
    ) -> None:
        if name in self.remote:
            if config_json is not None or files:
                raise GatewayError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"model '{name}' is a remote model: its config "
                    "comes from its upstreams, so a load takes no config or files",
                )
            await self._load_remote(self.remote[name], fail=True, vote=vote)
            return
        if files:
            staged, override = checked_upload(name, files, config_json)  # all checked first
            # One private directory per load, removed whatever happens: the files are read
            # while the versions are built, and nothing of them stays behind.
            with tempfile.TemporaryDirectory(prefix="batchgate-load-") as d:
                try:
                    await asyncio.get_running_loop().run_in_executor(self.pool, write_files, d, staged)
                except OSError as e:
                    raise GatewayError(
                        ErrorCode.INVALID_ARGUMENT,
                        f"model '{name}': the files given with the load cannot be written: "
                        f"{hide_paths(e.strerror or str(e), d)}",
                    ) from None
                self._wanted.add(name)  # asked for: strict readiness waits for it, loaded or failed
                await self._load(name, fail_missing=True, override=override, model_dir=d, vote=vote)
            return
        if name not in self._discover() and config_json is None:
            raise not_found(f"model '{printable(clip(name))}' is not in the model repository")
        override = config_from_json(config_json, name) if config_json is not None else None
        # Asked for: strict readiness waits for it from now on, as Triton's does (a load that fails
        # leaves the server not ready until the model loads or is unloaded).
        self._wanted.add(name)
        await self._load(name, fail_missing=True, override=override, vote=vote)

    async def unload(self, name: str) -> None:
        self._explicit_only()
        self.entry(name)
        await asyncio.shield(self._unload(name))

    async def follow(self, specs: Iterable[RemoteModel], reload: Iterable[str] = ()) -> None:
        """Serve exactly the remote models ``specs`` (a front worker following the process that
        owns the models): new ones and those named in ``reload`` are loaded (read again from the
        upstream), the others unloaded and forgotten. One that cannot load is logged and left
        unavailable; its retries go on as at start."""
        want = {s.name: s for s in specs}
        self._followed = set(want)
        again = set(reload)
        for name in [n for n in self.remote if n not in want]:
            self.remote.pop(name)
            await self._unload(name, forget=True)
        for name, spec in want.items():
            if name in self.remote and name not in again and self.remote[name] == spec:
                continue
            self.remote[name] = spec
            self._wanted.add(name)
            await self._load_remote(spec)

    def _later(self, coro: Coroutine[Any, Any, Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- the state machine
    def _swap(self, entry: ModelEntry, new: dict[int, ModelVersion], seconds: float, fp: tuple = ()) -> None:
        """Put freshly built versions in place of the entry's current ones (the one routine
        local and remote loads share); the old versions retire once their requests finish."""
        for s in new.values():
            s.loaded_in(seconds)
        old = entry.versions
        # One assignment each: requests resolving from now on see the new versions.
        entry.versions = new
        entry.latest = new[max(new)]
        entry.served_versions = tuple(sorted(new))
        entry.state, entry.reason, entry.fingerprint = READY, "", fp
        entry.loaded_once = True
        self._wanted.add(entry.name)  # loaded: strict readiness expects it from now on
        backend = entry.latest.backend
        log.info(
            "model '%s' ready: versions %s on %s (%.0f ms)",
            entry.name,
            sorted(new),
            ", ".join(backend.providers() if backend else ()),
            seconds * 1000,
        )
        self._changed(entry.name)
        for s in old.values():
            self._later(s.retire(self.retire_grace_s))

    def _changed(self, name: str) -> None:
        for listener in self.listeners:
            try:
                listener(name)
            except Exception:  # a listener's bug must not break loading
                log.exception("a listener failed on the change of model '%s'", name)

    def _failed(self, entry: ModelEntry, msg: str, counted: bool = True) -> None:
        """A load failed: the entry keeps serving what it had, or says why it cannot."""
        if counted:
            self.metrics.load_failed(entry.name)
        if entry.versions:
            entry.reason = f"reload failed, still serving the old versions: {msg}"
        else:
            entry.state, entry.reason = UNAVAILABLE, msg

    async def _load(
        self,
        name: str,
        fail_missing: bool = False,
        override: mc.ModelConfig | None = None,
        model_dir: str | None = None,
        vote: Vote | None = None,
    ) -> None:
        while True:
            entry = self.models.setdefault(name, ModelEntry(name))
            async with entry.lock:
                if self.models.get(name) is not entry:
                    continue  # a failed load of a new name dropped this entry while we waited
                await self._load_locked(entry, name, fail_missing, override, model_dir, vote)
                return

    async def _load_locked(
        self,
        entry: ModelEntry,
        name: str,
        fail_missing: bool,
        override: mc.ModelConfig | None,
        model_dir: str | None,
        vote: Vote | None = None,
    ) -> None:
        """The load itself (the caller holds the entry's lock)."""
        model_dir = model_dir or os.path.join(self.root, name)
        known = name in self.remote or bool(self.root and os.path.isdir(os.path.join(self.root, name)))
        fp = fingerprint(model_dir)
        if not entry.versions:
            entry.state = LOADING
        t0 = time.perf_counter()
        log.info("model '%s' loading", name)  # (a large model takes minutes: the log says why)
        try:
            new = await asyncio.get_running_loop().run_in_executor(
                self.pool, self.builder.local, name, model_dir, override
            )
        except Exception as e:  # noqa: BLE001 - any failure leaves the model unavailable, with the reason
            # Errors name files relative to the model directory, never a server path; an engine's
            # message may quote the model's own names at any length: bounded.
            msg = clip(hide_paths(e.message if isinstance(e, GatewayError) else str(e), model_dir, self.root), 1024)
            log.error("model '%s' failed to load: %s", name, msg)
            if known or entry.versions:
                self._failed(entry, msg)
                entry.fingerprint = fp
            else:  # a name only this load brought: nothing of it stays (index, metrics, readiness:
                # with no entry to unload, a wanted name would keep the server not ready for good)
                if self.models.get(name) is entry:
                    self.models.pop(name)
                self._wanted.discard(name)
                self.metrics.load_failed("")
            if fail_missing:
                raise GatewayError(
                    ErrorCode.INVALID_ARGUMENT if isinstance(e, ModelConfigError) else ErrorCode.UNAVAILABLE,
                    f"failed to load model '{name}': {msg}",
                ) from None
            return
        if vote is not None:
            await self._voted(entry, vote, new.values(), known)
        self._swap(entry, new, time.perf_counter() - t0, fp)

    async def _load_remote(self, spec: RemoteModel, fail: bool = False, vote: Vote | None = None) -> None:
        """Read the remote model's signature from an upstream and serve it. While no upstream
        answers, the model is UNAVAILABLE with the reason, and the load is retried. An unload
        or a stop that happens meanwhile wins: the load then closes what it opened and stops."""
        name = spec.name
        generation = self._generation.get(name, 0)
        entry = self.models.setdefault(name, ModelEntry(name))
        retry = self._retrying.get(name)
        if retry is not None and retry is not asyncio.current_task():
            self._retrying.pop(name).cancel()

        def wanted() -> bool:
            return not self._stopping and self._generation.get(name, 0) == generation

        def mine() -> None:  # this task was the pending retry: it is done
            if self._retrying.get(name) is asyncio.current_task():
                self._retrying.pop(name)

        async with entry.lock:
            if not wanted():
                return
            t0 = time.perf_counter()
            if not entry.versions:
                entry.state = LOADING
            backend = self.builder.remote_backend(spec)
            try:
                cfg = await backend.open()
                version = backend.version if is_version_text(backend.version) else "1"
                served = self.builder.version(cfg, version, backend)
            except asyncio.CancelledError:  # e.g. the caller of an explicit load gave up
                await asyncio.shield(backend.close())
                if not entry.versions:
                    entry.state, entry.reason = UNAVAILABLE, "load cancelled"
                raise
            except Exception as e:  # noqa: BLE001 - a remote model that cannot load never stops the others
                msg = e.message if isinstance(e, GatewayError) else f"{type(e).__name__}: {e}"
                await backend.close()
                # Retried until an upstream answers: logged and counted once for the series (again
                # only if the reason changes), not at every retry.
                again = self._failing.get(name) == msg
                self._failed(entry, msg, counted=not again)
                if wanted() and not fail:  # at start: retried until an upstream answers
                    self._failing[name] = msg
                    (log.debug if again else log.error)(
                        "remote model '%s' failed to load: %s; retrying every %g s", name, msg, spec.probe_interval_s
                    )
                    self._retrying[name] = asyncio.ensure_future(self._retry_remote(spec, generation))
                else:  # an explicit load the caller is told failed: not loaded later behind its back
                    log.error("remote model '%s' failed to load: %s", name, msg)
                    mine()
                if fail:
                    raise GatewayError(ErrorCode.UNAVAILABLE, f"failed to load model '{name}': {msg}") from None
                return
            mine()
            self._failing.pop(name, None)
            if not wanted():  # unloaded or stopped while the upstream answered
                await served.retire(None)
                return
            if vote is not None:
                await self._voted(entry, vote, (served,), True)
            self._swap(entry, {int(version): served}, time.perf_counter() - t0)
            self.metrics.keep_upstreams(name, spec.upstreams)  # (those a reload left out go)
            # (its upstreams now serve another version: load it again; a front worker's model
            # follows the owner's the same way, the owner being its upstream)
            backend.on_change = lambda: self._again(spec, generation)

    async def _voted(self, entry: ModelEntry, vote: Vote, new: Iterable[ModelVersion], known: bool) -> None:
        """Await the other workers' verdict on versions built, not yet serving. Called off: they are
        closed, the old ones serve on, and it ends as a load failed here would (never LOADING)."""
        try:
            await vote()
        except BaseException as e:
            await asyncio.gather(*(s.retire(None) for s in new), return_exceptions=True)
            if known or entry.versions:
                self._failed(entry, e.message if isinstance(e, GatewayError) else "called off", counted=False)
            elif self.models.get(entry.name) is entry:  # a name only this load brought: nothing stays
                self.models.pop(entry.name)
                self._wanted.discard(entry.name)
            raise

    def load_later(self, name: str) -> None:
        """A remote model whose load failed (upstreams down for now): loaded in the background, as at start."""
        spec = self.remote.get(name)
        if spec is not None:
            self._again(spec, self._generation.get(name, 0))

    def _again(self, spec: RemoteModel, generation: int) -> None:
        if not self._stopping and self._generation.get(spec.name, 0) == generation:
            task = asyncio.ensure_future(self._load_remote(spec))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    async def _retry_remote(self, spec: RemoteModel, generation: int) -> None:
        await asyncio.sleep(spec.probe_interval_s)
        if (
            self._retrying.get(spec.name) is asyncio.current_task()
            and not self._stopping
            and self._generation.get(spec.name, 0) == generation
        ):
            await self._load_remote(spec)

    async def _unload(self, name: str, forget: bool = False) -> None:
        self._generation[name] = self._generation.get(name, 0) + 1  # a load in progress stands down
        self._failing.pop(name, None)  # (a failing series said once ends with it)
        SAID_DOWN.pop(name, None)
        retry = self._retrying.pop(name, None)
        if retry is not None and retry is not asyncio.current_task():
            retry.cancel()
        entry = self.models.get(name)
        if entry is None:
            return
        async with entry.lock:
            self._wanted.discard(name)
            old = entry.versions
            entry.state, entry.reason = UNLOADING, "unloading"  # (a refusal meanwhile says why)
            entry.versions, entry.latest = {}, None
            self._changed(name)
            await asyncio.gather(*(s.retire(self.retire_grace_s) for s in old.values()))
            entry.state, entry.reason, entry.fingerprint = UNAVAILABLE, "unloaded", ()
            self.metrics.keep_upstreams(name, ())  # (a remote model's: gone with it, as a route's)
            if forget:
                self.models.pop(name, None)
            log.info("model '%s' unloaded", name)


Vote = Callable[[], Awaitable[None]]
