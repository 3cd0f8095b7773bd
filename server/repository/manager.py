"""The model repository: scan Triton's layout, load and unload models, answer lookups.

Layout: ``<repo>/<model>/config.pbtxt`` (optional) and ``<repo>/<model>/<version>/model.onnx``.
Control modes, as Triton names them:

- ``none``: load every model at start; the load/unload API is refused.
- ``poll``: as ``none``, then rescan every ``poll_interval_s``: new or changed
  models are (re)loaded, removed ones unloaded.
- ``explicit``: load only what ``load_models`` names at start (``*`` = all);
  afterwards only through the load/unload API.

A (re)load builds every served version completely before one assignment swaps
it in; requests already on the old versions finish there.

Remote models (``remote_models`` in the settings) sit beside the repository's own:
they load at start whatever the mode (their signature is read from an upstream),
are retried in the background while no upstream answers, and, in explicit mode,
answer the load/unload API like any other model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from tritonclient.grpc import model_config_pb2 as mc

from ..backends.onnx import OnnxBackend, choose_providers
from ..backends.triton import TritonBackend
from ..config import RemoteModel
from ..core.errors import ErrorCode, GatewayError, not_found
from ..model import ServedModel
from ..monitoring.metrics import Metrics
from ..workers import WorkerPool
from .config import ConfigError, complete_config, config_from_json, read_config, versions_to_serve

log = logging.getLogger("batchgate.repository")

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"
CONTROL_MODES = ("none", "poll", "explicit")


@dataclass
class ModelEntry:
    name: str
    state: str = UNAVAILABLE
    reason: str = "not loaded"
    versions: dict[int, ServedModel] = field(default_factory=dict)
    latest: ServedModel | None = None
    fingerprint: tuple = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def list_versions(model_dir: str) -> list[int]:
    out = []
    try:
        names = os.listdir(model_dir)
    except OSError:
        return out
    for n in names:
        if n.isdigit() and not n.startswith("0") and os.path.isdir(os.path.join(model_dir, n)):
            out.append(int(n))
    return sorted(out)


def fingerprint(model_dir: str) -> tuple:
    """What a poll compares: every file's path, size and modification time."""
    items = []
    for root, _dirs, files in os.walk(model_dir):
        for f in files:
            p = os.path.join(root, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            items.append((os.path.relpath(p, model_dir), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))


class ModelRepository:
    def __init__(
        self,
        root: str,
        pool: Executor,
        workers: WorkerPool,
        metrics: Metrics,
        control_mode: str = "none",
        poll_interval_s: float = 15.0,
        load_models: tuple[str, ...] = (),
        default_max_batch_size: int = 4,
        max_queue_size: int = 4096,
        retire_grace_s: float = 30.0,
        warm_up: bool = True,
        gpu_device_id: int = 0,
        inline_max_us: int = 0,
        batching_policy: str = "triton",
        model_batching_policy: dict[str, str] | None = None,
        remote_models: tuple[RemoteModel, ...] = (),
        max_message_bytes: int = 64 * 1024 * 1024,
    ):
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {CONTROL_MODES}, not {control_mode!r}")
        self.root = os.path.abspath(root) if root else ""
        self.remote = {m.name: m for m in remote_models}
        self.max_message_bytes = max_message_bytes
        self._retrying: dict[str, asyncio.Task] = {}  # remote models waiting for an upstream
        self._generation: dict[str, int] = {}  # bumped by each unload: older loads stand down
        self._stopping = False
        self.pool = pool
        self.workers = workers
        self.metrics = metrics
        self.mode = control_mode
        self.poll_interval_s = poll_interval_s
        self.load_models = load_models
        self.default_max_batch_size = default_max_batch_size
        self.max_queue_size = max_queue_size
        self.retire_grace_s = retire_grace_s
        self.warm_up = warm_up
        self.gpu_device_id = gpu_device_id
        self.inline_max_us = inline_max_us
        self.batching_policy = batching_policy
        self.model_batching_policy = model_batching_policy or {}
        self.models: dict[str, ModelEntry] = {}
        self._poller: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._overrides: dict[str, str] = {}  # model -> temporary dir holding files given with a load

    # ---------------------------------------------------------------- lookups (hot path)
    def resolve(self, name: str, version: str) -> ServedModel:
        entry = self.models.get(name)
        if entry is None:
            raise not_found(f"unknown model '{name}'")
        if version:
            try:
                served = entry.versions.get(int(version))
            except ValueError:
                raise GatewayError(ErrorCode.INVALID_ARGUMENT,
                                   f"model version must be a number, not '{version}'") from None
            if served is None:
                if entry.versions:
                    raise not_found(
                        f"model '{name}' has no version {version} loaded; loaded versions: "
                        f"{', '.join(str(v) for v in sorted(entry.versions))}")
                raise GatewayError(ErrorCode.UNAVAILABLE, f"model '{name}' is not ready: {entry.reason}")
            return served
        served = entry.latest
        if served is None:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"model '{name}' is not ready: {entry.reason}")
        return served

    def ready(self, name: str, version: str = "") -> bool:
        try:
            return self.resolve(name, version).ready()
        except GatewayError:
            return False

    def served(self) -> list[ServedModel]:
        return [s for e in self.models.values() for _, s in sorted(e.versions.items())]

    def index(self, ready_only: bool = False) -> list[dict]:
        self._discover()
        rows = []
        for name in sorted(self.models):
            e = self.models[name]
            if e.versions:
                for v in sorted(e.versions):
                    served = e.versions[v]
                    if served.ready():
                        rows.append({"name": name, "version": str(v), "state": READY, "reason": ""})
                    elif not ready_only:
                        rows.append({"name": name, "version": str(v), "state": UNAVAILABLE,
                                     "reason": served.backend.not_ready_reason() if served.backend else "retired"})
                if e.state != READY and not ready_only:
                    rows.append({"name": name, "version": "", "state": e.state, "reason": e.reason})
            elif not ready_only:
                rows.append({"name": name, "version": "", "state": e.state, "reason": e.reason})
        return rows

    # ---------------------------------------------------------------- lifecycle
    def _discover(self) -> list[str]:
        for n in self.remote:
            self.models.setdefault(n, ModelEntry(n))
        if not self.root:
            return []
        try:
            names = sorted(
                n for n in os.listdir(self.root)
                if os.path.isdir(os.path.join(self.root, n)) and not n.startswith(".")
            )
        except OSError as e:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"cannot read model repository {self.root}: {e}") from None
        for n in names:
            self.models.setdefault(n, ModelEntry(n))
        return names

    async def start(self) -> None:
        names = self._discover()
        both = sorted(set(names) & set(self.remote))
        if both:
            raise ConfigError(f"model(s) {', '.join(both)}: both a directory in the model repository and a "
                              "remote model; rename one")
        for spec in self.remote.values():
            await self._load_remote(spec)
        if self.mode == "explicit":
            wanted = names if "*" in self.load_models else [n for n in self.load_models]
        else:
            wanted = names
        for n in wanted:
            await self._load(n, fail_missing=self.mode == "explicit")
        if self.mode == "poll":
            self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        self._stopping = True
        if self._poller:
            self._poller.cancel()
        for t in self._retrying.values():
            t.cancel()
        for e in self.models.values():
            for s in e.versions.values():
                s.scheduler.close()
        await asyncio.gather(*(s.scheduler.drain() for s in self.served()), return_exceptions=True)
        await asyncio.gather(*(s.backend.aclose() for s in self.served() if s.remote and s.backend),
                             return_exceptions=True)
        for d in self._overrides.values():
            shutil.rmtree(d, ignore_errors=True)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # pragma: no cover - a poll must never end polling
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        present = set(self._discover())
        for name in sorted(present):
            e = self.models[name]
            if name in self._overrides:
                continue
            if fingerprint(os.path.join(self.root, name)) != e.fingerprint:
                await self._load(name)
        for name in [n for n in self.models if n not in present and n not in self.remote]:
            await self._unload(name, forget=True)

    async def load(self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None) -> None:
        """The load API (explicit mode): load or reload ``name``."""
        if self.mode != "explicit":
            raise GatewayError(
                ErrorCode.UNAVAILABLE,
                f"explicit model load / unload is not allowed in model control mode '{self.mode}'; "
                "start with --model-control-mode=explicit")
        if name in self.remote:
            if config_json is not None or files:
                raise GatewayError(ErrorCode.INVALID_ARGUMENT, f"model '{name}' is a remote model: its config "
                                   "comes from its upstreams, so a load takes no config or files")
            await self._load_remote(self.remote[name], fail=True)
            return
        model_dir = None
        if files:
            if config_json is None:
                raise GatewayError(ErrorCode.INVALID_ARGUMENT,
                                   f"model '{name}': files given with a load need a 'config' too")
            model_dir = self._write_override(name, files)
        elif name not in self._discover() and config_json is None:
            raise not_found(f"model '{name}' is not in the model repository {self.root}")
        override = config_from_json(config_json, name) if config_json is not None else None
        await self._load(name, fail_missing=True, override=override, model_dir=model_dir)

    async def unload(self, name: str) -> None:
        if self.mode != "explicit":
            raise GatewayError(
                ErrorCode.UNAVAILABLE,
                f"explicit model load / unload is not allowed in model control mode '{self.mode}'")
        if name not in self.models:
            raise not_found(f"unknown model '{name}'")
        await self._unload(name)

    def _write_override(self, name: str, files: dict[str, bytes]) -> str:
        old = self._overrides.pop(name, None)
        d = tempfile.mkdtemp(prefix=f"batchgate-{name}-")
        for key, data in files.items():
            rel = os.path.normpath(key)
            if rel.startswith("..") or os.path.isabs(rel):
                shutil.rmtree(d, ignore_errors=True)
                raise GatewayError(ErrorCode.INVALID_ARGUMENT, f"model '{name}': file path '{key}' leaves the model directory")
            path = os.path.join(d, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        self._overrides[name] = d
        if old:
            self._later(asyncio.to_thread(shutil.rmtree, old, True))
        return d

    def _later(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _load(self, name: str, fail_missing: bool = False, override: mc.ModelConfig | None = None,
                    model_dir: str | None = None) -> None:
        entry = self.models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            model_dir = model_dir or self._overrides.get(name) or os.path.join(self.root, name)
            fp = fingerprint(model_dir)
            prev_state = entry.state
            entry.state = LOADING if not entry.versions else entry.state
            t0 = time.perf_counter()
            try:
                new = await asyncio.get_running_loop().run_in_executor(
                    self.pool, self._build, name, model_dir, override)
            except (ConfigError, GatewayError, OSError, ValueError, RuntimeError) as e:
                msg = e.message if isinstance(e, GatewayError) else str(e)
                self.metrics.load_failed(name)
                log.error("model '%s' failed to load: %s", name, msg)
                entry.fingerprint = fp
                if entry.versions:
                    entry.state, entry.reason = prev_state, f"reload failed, still serving the old versions: {msg}"
                else:
                    entry.state, entry.reason = UNAVAILABLE, msg
                if fail_missing:
                    raise GatewayError(ErrorCode.INVALID_ARGUMENT if isinstance(e, ConfigError)
                                       else ErrorCode.UNAVAILABLE,
                                       f"failed to load model '{name}': {msg}") from None
                return
            seconds = time.perf_counter() - t0
            for s in new.values():
                s._metrics.load_seconds = seconds
            old = entry.versions
            # The swap: one assignment each; requests resolving from now on see the new versions.
            entry.versions = new
            entry.latest = new[max(new)]
            entry.state, entry.reason, entry.fingerprint = READY, "", fp
            providers = new[max(new)].backend.providers()
            log.info("model '%s' ready: versions %s on %s (%.0f ms)", name, sorted(new),
                     ", ".join(providers), seconds * 1000)
            for s in old.values():
                self._later(s.retire(self.retire_grace_s))

    async def _load_remote(self, spec: RemoteModel, fail: bool = False) -> None:
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

        async with entry.lock:
            if not wanted():
                return
            t0 = time.perf_counter()
            if not entry.versions:
                entry.state = LOADING
            backend = TritonBackend(spec, self.metrics, self.max_message_bytes)
            try:
                cfg = await backend.open()
                version = backend.version if backend.version.isdigit() else "1"
                served = ServedModel(cfg, version, backend, self.pool, self.workers,
                                     self.metrics.bind(name, version), self.max_queue_size, 0,
                                     self.model_batching_policy.get(name, self.batching_policy))
            except asyncio.CancelledError:  # e.g. the caller of an explicit load gave up
                await asyncio.shield(backend.aclose())
                if not entry.versions:
                    entry.state, entry.reason = UNAVAILABLE, "load cancelled"
                raise
            except Exception as e:  # noqa: BLE001 - a remote model that cannot load never stops the others
                msg = e.message if isinstance(e, GatewayError) else f"{type(e).__name__}: {e}"
                self.metrics.load_failed(name)
                await backend.aclose()
                if not entry.versions:
                    entry.state, entry.reason = UNAVAILABLE, msg
                if wanted():
                    log.error("remote model '%s' failed to load: %s; retrying every %g s", name, msg,
                              spec.probe_interval_s)
                    self._retrying[name] = asyncio.ensure_future(self._retry_remote(spec, generation))
                elif self._retrying.get(name) is asyncio.current_task():
                    self._retrying.pop(name)
                if fail:
                    raise GatewayError(ErrorCode.UNAVAILABLE, f"failed to load model '{name}': {msg}") from None
                return
            if self._retrying.get(name) is asyncio.current_task():
                self._retrying.pop(name)
            if not wanted():  # unloaded or stopped while the upstream answered
                await served.retire(None)
                return
            served._metrics.load_seconds = time.perf_counter() - t0
            old = entry.versions
            entry.versions = {int(version): served}
            entry.latest = served
            entry.state, entry.reason = READY, ""
            log.info("remote model '%s' ready: upstream model '%s' version %s on %s", name, spec.target,
                     version, ", ".join(backend.providers()))
            for s in old.values():
                self._later(s.retire(self.retire_grace_s))

    async def _retry_remote(self, spec: RemoteModel, generation: int) -> None:
        await asyncio.sleep(spec.probe_interval_s)
        if (self._retrying.get(spec.name) is asyncio.current_task() and not self._stopping
                and self._generation.get(spec.name, 0) == generation):
            await self._load_remote(spec)

    async def _unload(self, name: str, forget: bool = False) -> None:
        self._generation[name] = self._generation.get(name, 0) + 1  # a load in progress stands down
        retry = self._retrying.pop(name, None)
        if retry is not None and retry is not asyncio.current_task():
            retry.cancel()
        entry = self.models.get(name)
        if entry is None:
            return
        async with entry.lock:
            old = entry.versions
            entry.state = UNLOADING
            entry.versions, entry.latest = {}, None
            await asyncio.gather(*(s.retire(self.retire_grace_s) for s in old.values()))
            entry.state, entry.reason, entry.fingerprint = UNAVAILABLE, "unloaded", ()
            if forget:
                self.models.pop(name, None)
            log.info("model '%s' unloaded", name)

    def _build(self, name: str, model_dir: str, override: mc.ModelConfig | None) -> dict[int, ServedModel]:
        """Runs in a worker thread: read the config, open every served version, warm it up."""
        cfg = override if override is not None else read_config(model_dir, name)
        available = list_versions(model_dir)
        if not available:
            raise ConfigError(f"model '{name}' has no version directory (e.g. {name}/1/model.onnx)")
        versions = versions_to_serve(cfg, available)
        if not versions:
            raise ConfigError(f"model '{name}': the version policy selects none of the versions {available}")
        built: dict[int, ServedModel] = {}
        for v in versions:
            filename = cfg.default_model_filename or "model.onnx"
            path = os.path.join(model_dir, str(v), filename)
            if os.path.isdir(path):
                path = os.path.join(path, "model.onnx")
            if not os.path.exists(path):
                raise ConfigError(f"model '{name}' version {v}: {os.path.relpath(path, model_dir)} is missing")
            backend = self._open_backend(cfg, path)
            full = complete_config(cfg, backend.platform, backend.inputs(), backend.outputs(),
                                   self.default_max_batch_size)
            if self.warm_up:
                backend.warm_up()
            built[v] = ServedModel(full, str(v), backend, self.pool, self.workers, self.metrics.bind(name, str(v)),
                                   self.max_queue_size, self.inline_max_us,
                                   self.model_batching_policy.get(name, self.batching_policy))
        return built

    def _open_backend(self, cfg: mc.ModelConfig, path: str) -> OnnxBackend:
        if cfg.platform and cfg.platform != "onnxruntime_onnx" or cfg.backend and cfg.backend != "onnxruntime":
            raise ConfigError(f"model '{cfg.name}': platform '{cfg.platform or cfg.backend}' is not served; "
                              "batchgate serves ONNX models (platform onnxruntime_onnx)")
        want_gpu = any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group)
        accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        want_trt = any(a.name.lower() == "tensorrt" for a in accel)
        gpus = [g for grp in cfg.instance_group for g in grp.gpus]
        providers = choose_providers(want_gpu, want_trt, gpus[0] if gpus else self.gpu_device_id)
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        try:
            intra = int(params.get("intra_op_thread_count", "0") or 0)
            inter = int(params.get("inter_op_thread_count", "0") or 0)
        except ValueError:
            raise ConfigError(f"model '{cfg.name}': intra_op_thread_count / inter_op_thread_count must be integers")
        try:
            return OnnxBackend(path, providers, intra, inter)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ConfigError(f"model '{cfg.name}': ONNX Runtime cannot load {os.path.basename(path)}: {e}") from None
