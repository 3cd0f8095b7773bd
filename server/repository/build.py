"""Building served model versions: open the backends, complete the config, choose the
scheduling, wrap each version in a :class:`ModelVersion`.

Local models are built on a thread (opening a model file blocks); remote models are
opened on the event loop (their config comes from an upstream).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from tritonclient.grpc import model_config_pb2 as mc

from ..backends import onnx as _onnx  # noqa: F401 - registers the ONNX Runtime backend
from ..backends.base import Backend, LocalOptions, local_backend, local_platforms
from ..backends.remote import RemoteV2Backend
from ..config import RemoteModel
from ..core.errors import ModelConfigError
from ..core.types import clip, printable
from ..model import ModelVersion
from ..monitoring.metrics import Metrics
from ..threads import InferenceThreads
from .config import (
    complete_config,
    instances_of,
    queue_bound,
    read_config,
    schedule_of,
    signature_of,
    versions_to_serve,
)
from .scan import hide_paths, list_versions

DEFAULT_PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class BuildOptions:
    default_max_batch_size: int = 4
    max_queue_size: int = 4096
    warm_up: bool = True
    gpu_device_id: int = 0
    inline_max_us: int = 0
    batching_policy: str = "triton"
    model_batching_policy: Mapping[str, str] = field(default_factory=dict)
    max_message_bytes: int = 64 * 1024 * 1024


class VersionBuilder:
    def __init__(self, options: BuildOptions, threads: InferenceThreads, metrics: Metrics):
        self.options = options
        self._threads = threads
        self._metrics = metrics

    def version(self, cfg: mc.ModelConfig, version: str, backend: Backend, inline_max_us: int = 0) -> ModelVersion:
        """Wrap a complete config and an open backend into a served version."""
        o = self.options
        policy = o.model_batching_policy.get(cfg.name, o.batching_policy)
        try:
            schedule = schedule_of(cfg, o.max_queue_size, policy)
        except ValueError as e:
            raise ModelConfigError(f"model '{cfg.name}': {e}") from None
        return ModelVersion(
            cfg,
            signature_of(cfg),
            version,
            backend,
            schedule,
            instances_of(cfg),
            queue_bound(cfg, o.max_queue_size),
            self._threads,
            self._metrics.bind(cfg.name, version),
            inline_max_us,
        )

    def local(self, name: str, model_dir: str, override: mc.ModelConfig | None) -> dict[int, ModelVersion]:
        """Blocking (call it on a thread): read the config, open every served version, warm it up."""
        cfg = override if override is not None else read_config(model_dir, name)
        available = list_versions(model_dir)
        if not available:
            raise ModelConfigError(f"model '{name}' has no version directory (e.g. {name}/1/model.onnx)")
        versions = versions_to_serve(cfg, available)
        if not versions:
            raise ModelConfigError(f"model '{name}': the version policy selects none of the versions {available}")
        platform = cfg.platform or cfg.backend or DEFAULT_PLATFORM
        try:
            cls = local_backend(platform)
        except KeyError:
            raise ModelConfigError(
                f"model '{name}': platform '{platform}' is not served; batchgate serves {', '.join(local_platforms())}"
            ) from None
        filename = cfg.default_model_filename or "model.onnx"
        if filename in (".", "..") or any(c in filename for c in "/\\\0"):
            raise ModelConfigError(
                f"model '{name}': default_model_filename must be a plain file name inside the version directory, "
                f"not '{printable(clip(filename))}'"
            )
        # Every version's backend opens before any version is made: a failure part-way leaves
        # nothing registered (no metrics, no gauges) for versions that will never serve.
        opened: dict[int, tuple[mc.ModelConfig, Backend]] = {}
        for v in versions:
            path = os.path.join(model_dir, str(v), filename)
            if os.path.isdir(path):
                path = os.path.join(path, "model.onnx")
            if not os.path.exists(path):
                raise ModelConfigError(f"model '{name}' version {v}: {os.path.relpath(path, model_dir)} is missing")
            try:
                backend = cls.load(path, cfg, LocalOptions(self.options.gpu_device_id))
            except ModelConfigError as e:
                raise ModelConfigError(f"model '{name}': {e}") from None
            except Exception as e:  # an engine raises its own exception types for bad files
                raise ModelConfigError(
                    f"model '{name}': {cls.engine} cannot load {os.path.relpath(path, model_dir)}: "
                    f"{hide_paths(str(e), model_dir)}"
                ) from None
            full = complete_config(
                cfg, backend.platform, backend.inputs(), backend.outputs(), self.options.default_max_batch_size
            )
            if self.options.warm_up:
                backend.warm_up()
            opened[v] = (full, backend)
        return {
            v: self.version(full, str(v), backend, self.options.inline_max_us) for v, (full, backend) in opened.items()
        }

    def remote_backend(self, spec: RemoteModel) -> RemoteV2Backend:
        return RemoteV2Backend(spec, self._metrics, self.options.max_message_bytes)
