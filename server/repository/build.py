"""Building served model versions: open the backends, complete the config, choose the
scheduling, wrap each version in a :class:`ModelVersion`.

Local models are built on a thread (opening a model file blocks); remote models are
opened on the event loop (their config comes from an upstream).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from ..backends import onnx as _onnx  # noqa: F401 - registers the ONNX Runtime backend
from ..backends import torchscript as _torchscript  # noqa: F401 - registers TorchScript (imports torch only to load)
from ..backends.base import Backend, LocalOptions, Reshaped, local_backend, local_platforms
from ..backends.remote import RemoteV2Backend
from ..config import RemoteModel, batching_policies
from ..core.errors import ModelConfigError
from ..core.types import clip, is_version_text, printable
from ..model import ModelVersion
from ..monitoring.metrics import Metrics
from ..threads import InferenceThreads
from .config import (
    BACKEND_NAMES,
    CONFIG_FILE,
    batch_doubts,
    check_instance_groups,
    complete_config,
    instances_of,
    queue_bound,
    read_config,
    schedule_of,
    settle_instance_kinds,
    shared_dims,
    signature_of,
    versions_to_serve,
)
from .scan import hide_paths, list_versions

log = logging.getLogger("batchgate.repository")

DEFAULT_PLATFORM = "onnxruntime_onnx"
DEFAULT_MODEL_FILENAME = "model.onnx"

# A model whose config names no platform (or that has no config) is recognised, as Triton does,
# by the file its version directory holds under a platform's default name, or by the extension
# of its default_model_filename; the first match wins. Only some of these platforms are served
# (local_platforms()); the others are named so that their load error says what the model is.
MODEL_FILES = (
    ("model.onnx", "onnxruntime_onnx"),
    ("model.pt", "pytorch_libtorch"),
    ("model.plan", "tensorrt_plan"),
    ("model.savedmodel", "tensorflow_savedmodel"),
    ("model.graphdef", "tensorflow_graphdef"),
    ("model.py", "python"),
    ("model.xml", "openvino"),
)
EXTENSIONS = {
    ".onnx": "onnxruntime_onnx",
    ".pt": "pytorch_libtorch",
    ".pth": "pytorch_libtorch",
    ".plan": "tensorrt_plan",
    ".savedmodel": "tensorflow_savedmodel",
    ".graphdef": "tensorflow_graphdef",
    ".py": "python",
    ".xml": "openvino",
}


def infer_platform(model_dir: str, versions: list[int], filename: str) -> tuple[str, str]:
    """The platform of a model whose config names none, and what says so: the file (relative to
    the model directory) or the config's file name; "" when nothing does and the default
    platform is assumed. ``filename``, when given, has been checked to be a plain name."""
    if filename:
        platform = EXTENSIONS.get(os.path.splitext(filename)[1].lower())
        return (platform, f"default_model_filename {filename}") if platform else (DEFAULT_PLATFORM, "")
    for v in sorted(versions, reverse=True):
        for name, platform in MODEL_FILES:
            if os.path.exists(os.path.join(model_dir, str(v), name)):
                return platform, os.path.join(str(v), name)
    return DEFAULT_PLATFORM, ""


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
            signature_of(cfg, shared_dims(cfg, getattr(backend, "inputs", list)()), backend.kind == "local"),
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
        if len(cfg.model_repository_agents.agents):  # (Triton without the agent fails the load too)
            agents = ", ".join(printable(clip(a.name, 64)) for a in cfg.model_repository_agents.agents[:8])
            raise ModelConfigError(
                f"model '{name}': model_repository_agents ({agents}) are not supported: batchgate runs no "
                "repository agent, so what they check or change would not be done; remove them to serve the model"
            )
        check_instance_groups(cfg)  # (before any backend opens a device for it)
        cfg = settle_instance_kinds(cfg)
        given = cfg.default_model_filename
        # (a control character or more than NAME_MAX bytes: no file has that name, and it was echoed whole)
        if (
            given in (".", "..")
            or any(c in given for c in "/\\")
            or printable(given) != given
            or len(given.encode()) > 255
        ):
            raise ModelConfigError(
                f"model '{name}': default_model_filename must be a plain file name inside the version directory "
                f"(at most 255 bytes, no control characters), not '{printable(clip(given))}'"
            )
        available = list_versions(model_dir)
        versions = versions_to_serve(cfg, available)
        # The platform first: a model batchgate cannot serve (an ensemble, say, with no version
        # directory) is told so, not that a file is missing.
        platform, evidence = cfg.platform or cfg.backend, ""
        if not platform:
            platform, evidence = infer_platform(model_dir, versions, cfg.default_model_filename)
        try:
            cls = local_backend(platform)
            if cfg.platform and cfg.backend and local_backend(cfg.backend) is not cls:
                raise KeyError(cfg.backend)
        except KeyError:
            if cfg.platform and cfg.backend and platform in local_platforms():
                # (Triton refuses such a pair too; served by one, the config would tell clients the other)
                raise ModelConfigError(
                    f"model '{name}': platform '{printable(clip(cfg.platform))}' and backend "
                    f"'{printable(clip(cfg.backend))}' do not name the same backend; give one of them, or a pair "
                    f"that agrees ({', '.join(f'{p} with {b}' for p, b in BACKEND_NAMES.items())})"
                ) from None
            seen = f" (recognised by {printable(clip(evidence))})" if evidence else ""
            raise ModelConfigError(
                f"model '{name}': platform '{printable(clip(platform))}'{seen} is not served; "
                f"batchgate serves {', '.join(local_platforms())}"
            ) from None
        default_file = getattr(cls, "default_model_filename", DEFAULT_MODEL_FILENAME)
        if not available and not os.path.isdir(model_dir):
            raise ModelConfigError(f"model '{name}': the repository has no directory '{name}'")
        if not available:
            raise ModelConfigError(
                f"model '{name}' has no version directory (e.g. {name}/1/{default_file}){_no_versions(model_dir)}"
            )
        if not versions:
            raise ModelConfigError(f"model '{name}': the version policy selects none of the versions {available}")
        if cfg.version_policy.WhichOneof("policy_choice") == "specific":
            missing = sorted(set(cfg.version_policy.specific.versions) - set(available))
            if missing:  # (as Triton says it: the versions found are served, the rest named)
                log.warning(
                    "model '%s': version_policy names version(s) %s, which have no directory; serving %s",
                    name,
                    ", ".join(map(str, missing[:16])) + (", ..." if len(missing) > 16 else ""),
                    ", ".join(map(str, versions)),
                )
        filename = cfg.default_model_filename or default_file
        # Every version's backend opens before any version is made: a failure part-way leaves
        # nothing registered (no metrics, no gauges) for versions that will never serve.
        opened: dict[int, tuple[mc.ModelConfig, Backend]] = {}
        for v in versions:
            path = os.path.join(model_dir, str(v), filename)
            if os.path.isdir(path) and cls.platform == DEFAULT_PLATFORM:
                path = os.path.join(path, DEFAULT_MODEL_FILENAME)  # an ONNX model may be a directory
            if not os.path.exists(path):
                raise ModelConfigError(
                    f"model '{name}' version {v}: {os.path.relpath(path, model_dir)} is missing"
                    + _other_file(model_dir, v, cls.platform)
                )
            try:
                backend = cls.load(path, cfg, LocalOptions(self.options.gpu_device_id))
                if Reshaped.wanted(cfg):
                    backend = Reshaped(backend, cfg)  # type: ignore[assignment]
            except ModelConfigError as e:
                raise ModelConfigError(f"model '{name}': {e}") from None
            except Exception as e:  # an engine raises its own exception types for bad files
                raise ModelConfigError(
                    f"model '{name}': {cls.engine} cannot load {os.path.relpath(path, model_dir)}: "
                    f"{hide_paths(str(e), model_dir)}"
                ) from None
            full = _complete(cfg, backend, self.options.default_max_batch_size)
            full = self._warm_up(name, v, cfg, full, backend, model_dir)
            opened[v] = (full, backend)
        if cfg.HasField("sequence_batching"):
            # (README, Not supported) said once a load, since the config still says it to clients
            log.warning(
                "model '%s': sequence_batching is not acted on: served without a sequence scheduler (no correlation "
                "IDs, control inputs or state); sequence_id, sequence_start and sequence_end are ignored",
                printable(clip(name)),
            )
        ignored = _not_acted_on(cfg)
        if ignored:  # (README, Not supported: the config still says them to clients, so said once a load)
            log.warning("model '%s': not acted on (see README, Not supported): %s", printable(clip(name)), ignored)
        return {
            v: self.version(full, str(v), backend, self.options.inline_max_us) for v, (full, backend) in opened.items()
        }

    def _warm_up(
        self, name: str, v: int, cfg: mc.ModelConfig, full: mc.ModelConfig, backend: Any, model_dir: str
    ) -> mc.ModelConfig:
        """Run the version once on zeros: so that its first caller does not pay for it (when
        ``warm_up`` is on) and, when it batches, to see that every output's first dimension
        follows the batch where the dimension names could not tell (always). Returns ``full``,
        without batching where the completion chose batching and the run shows it wrong."""
        batch = min(2, full.max_batch_size)  # (two rows tell a batch dimension from one of 1)
        unsure = batch_doubts(backend.inputs(), backend.outputs())[1] if batch else []
        shaped = _value_shaped(backend, unsure, model_dir)
        if shaped:  # (zeros may keep every row of such an output: the run below cannot tell)
            out, op = next(iter(shaped.items()))
            why = f"the rows of output '{printable(clip(out))}' may follow the input values (it comes from a {op})"
            if cfg.max_batch_size == 0:  # the completion chose batching: serve it whole
                log.info("model '%s' version %s: %s, so it is served without batching", name, v, why)
                full, batch, unsure = _complete(cfg, backend, 0), 0, []
            else:
                log.warning(
                    "model '%s' version %s: max_batch_size is %s but %s: a request whose answer has another "
                    "number of rows fails, and callers whose requests share a batch may be given each other's "
                    "rows. Set max_batch_size: 0 unless its first dimension is the batch",
                    name,
                    v,
                    cfg.max_batch_size,
                    why,
                )
        if not (self.options.warm_up or unsure):
            return full
        # Also with the other dynamic dimensions 3, not 1: an output that flattens the batch with
        # another (token logits as [batch * sequence, classes]) has 2 rows for 2 rows of length 1.
        wide = _wide_run(backend, batch) if unsure else None
        try:
            outs = backend.warm_up(batch)
        except ModelConfigError as e:  # what the model gives does not match its config
            raise ModelConfigError(f"model '{name}' version {v}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a warm-up is a courtesy, never a reason not to serve
            if wide is None:
                return self._failed_warm_up(name, v, cfg, full, backend, model_dir, unsure, batch, e)
            outs, wide = wide, None  # (zeros of 1 did not fit, zeros of 3 did: that run tells)
        if not batch:
            return full
        runs = [outs] if wide is None else [outs, wide]
        wrong = [
            (o.name, tuple(a.shape))
            for got in runs
            for o, a in zip(backend.outputs(), got)
            if np.ndim(a) < 1 or len(a) != batch
        ]
        if not wrong:
            return full
        out, shape = wrong[0]
        why = f"output '{printable(clip(out))}' has shape {list(shape)} for a batch of {batch} rows"
        if cfg.max_batch_size == 0:  # the completion chose batching: serve it whole, one request at a time
            log.info("model '%s' version %s: %s, so it is served without batching", name, v, why)
            return _complete(cfg, backend, 0)
        raise ModelConfigError(
            f"model '{name}' version {v}: max_batch_size is {cfg.max_batch_size} but {why}: its first dimension "
            "is not the batch, and callers whose requests shared a batch would be given each other's rows. "
            "Set max_batch_size: 0 and give the full dims"
        )

    def _failed_warm_up(
        self,
        name: str,
        v: int,
        cfg: mc.ModelConfig,
        full: mc.ModelConfig,
        backend: Any,
        model_dir: str,
        unsure: list[str],
        batch: int,
        e: Exception,
    ) -> mc.ModelConfig:
        """The config to serve when the run on zeros failed with ``e``."""
        if batch > 1 and cfg.max_batch_size == 0 and _runs(backend):
            # The completion chose batching, but only one row runs (a model exported with its
            # batch of 1 fixed inside): served whole, one request at a time.
            log.info(
                "model '%s' version %s: a batch of %s rows on zeros failed but one row runs, so it is "
                "served without batching: %s",
                name,
                v,
                batch,
                hide_paths(str(e), model_dir)[:300],
            )
            return _complete(cfg, backend, 0)
        # Zeros with every dynamic dimension 1 do not fit every model (a convolution
        # over a 1x1 image); Triton warms up only when asked. The model serves; its
        # first request pays for what the warm-up would have done.
        log.warning(
            "model '%s' version %s: warm-up on zeros failed, serving without it%s: %s",
            name,
            v,
            f" (and without knowing that output(s) {', '.join(unsure)} follow the batch)" if unsure else "",
            hide_paths(str(e), model_dir)[:300],
        )
        return full

    def remote_backend(self, spec: RemoteModel) -> RemoteV2Backend:
        return RemoteV2Backend(spec, self._metrics, self.options.max_message_bytes)


def _complete(cfg: mc.ModelConfig, backend: Any, default_max_batch_size: int) -> mc.ModelConfig:
    """``cfg`` completed from and checked against the backend's signature, with the tensors a
    run may be given beside its inputs (ONNX initializers that are graph inputs too)."""
    get = getattr(backend, "overridable_inputs", None)
    overridable = get() if get is not None else []
    return complete_config(
        cfg, backend.platform, backend.inputs(), backend.outputs(), default_max_batch_size, overridable
    )


def _value_shaped(backend: Any, outputs: list[str], model_dir: str) -> dict[str, str]:
    """Those of ``outputs`` whose rows may follow the input values, each with the op that makes
    it so; none for an engine that cannot tell (TorchScript)."""
    find = getattr(backend, "value_shaped_outputs", None)
    if find is None or not outputs:
        return {}
    try:
        return find(outputs)
    except Exception as e:  # noqa: BLE001 - the session opened: a graph the reader cannot walk is left to the run
        why = hide_paths(str(e), model_dir)[:300]
        log.warning("cannot read the graph to see which outputs follow the batch: %s", why)
        return {}


def _wide_run(backend: Any, batch: int) -> list | None:
    """The outputs of a run on zeros of ``batch`` rows, the other dynamic dimensions 3; None
    when the model cannot run on them (a config mismatch is told by the ordinary run)."""
    try:
        return backend.warm_up(batch, 3)
    except Exception:  # noqa: BLE001 - any failure: this run tells nothing
        return None


def _runs(backend: Any) -> bool:
    """Whether the version runs on zeros of one row."""
    try:
        backend.warm_up(1)
    except Exception:  # noqa: BLE001 - any failure: it does not
        return False
    return True


def _no_versions(model_dir: str) -> str:
    """What a model directory with no version directory holds instead, as a hint ("" if nothing
    tells): an MLServer model's settings, or directories that are not version numbers."""
    if os.path.isfile(os.path.join(model_dir, "model-settings.json")):
        return (
            "; it holds model-settings.json, an MLServer model: batchgate serves Triton's layout of ONNX and "
            "TorchScript models (convert the model with batchgate convert, or serve it from MLServer as a "
            "remote model)"
        )
    for file, _ in MODEL_FILES:  # (a model file without a version, or a model's own directory as the repository)
        if os.path.exists(os.path.join(model_dir, file)):
            name = os.path.basename(model_dir)
            if _one_models_directory(os.path.dirname(model_dir)):  # (its version directory, taken for a model)
                return (
                    f"; '{name}' is a version directory holding {file}: --model-repository names one model's own "
                    "directory; give it the folder that holds the model directories (the parent of this one)"
                )
            return (
                f"; {file} lies in the model directory itself: move it into a version directory "
                f"({name}/1/{file}), or, if this is one model's directory, give --model-repository the folder "
                "that holds the model directories"
            )
    try:
        others = sorted(n for n in os.listdir(model_dir) if os.path.isdir(os.path.join(model_dir, n)))
    except OSError:
        return ""
    if not others:
        return ""
    shown = ", ".join(printable(clip(n, 32)) for n in others[:8]) + (", ..." if len(others) > 8 else "")
    return f"; not versions (a version directory is a number of at most 18 digits without a leading 0): {shown}"


def _one_models_directory(repository: str) -> bool:
    """Whether the repository looks like one model's own directory: a config.pbtxt of its own,
    or version numbers for all its subdirectories."""
    try:
        names = os.listdir(repository)
    except OSError:
        return False
    dirs = [n for n in names if os.path.isdir(os.path.join(repository, n))]
    return CONFIG_FILE in names or (bool(dirs) and all(is_version_text(n) and not n.startswith("0") for n in dirs))


def _other_file(model_dir: str, version: int, platform: str) -> str:
    """When the expected file is missing: the model file of another platform the version
    directory holds, as a hint that the config names the wrong platform ("" if none)."""
    for name, other in MODEL_FILES:
        if other != platform and os.path.exists(os.path.join(model_dir, str(version), name)):
            return f'; the version directory holds {name}, a {other} model (set platform: "{other}" in config.pbtxt)'
    return ""


def version_builder(settings: Any, threads: Any, metrics: Any) -> VersionBuilder:
    """The builder of ``settings`` (sections repository, limits, batching): how ``batchgate
    serve`` and ``batchgate score`` build every model version alike."""
    repo, lim, bat = settings.repository, settings.limits, settings.batching
    return VersionBuilder(
        BuildOptions(
            default_max_batch_size=repo.default_max_batch_size,
            max_queue_size=lim.max_queue_size,
            warm_up=repo.warm_up,
            gpu_device_id=repo.gpu_device_id,
            inline_max_us=bat.inline_execution_max_us,
            batching_policy=bat.batching_policy,
            model_batching_policy=batching_policies(settings),
            max_message_bytes=lim.max_request_bytes,
        ),
        threads,
        metrics,
    )


def _not_acted_on(cfg: mc.ModelConfig) -> str:
    """The settings of ``cfg`` that batchgate reads and does not act on (Triton features it does
    not have), as one phrase; "" when it has none."""
    found = []
    if cfg.model_transaction_policy.decoupled:
        found.append("model_transaction_policy.decoupled (every request gets exactly one response)")
    if cfg.response_cache.enable:
        found.append("response_cache (nothing is cached)")
    if any(g.HasField("rate_limiter") for g in cfg.instance_group):
        found.append("instance_group rate_limiter")
    if any(g.passive for g in cfg.instance_group):
        found.append("instance_group passive (its instances take requests like the others)")
    on_gpu = any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group)
    gpus = list(dict.fromkeys(n for g in cfg.instance_group for n in g.gpus))  # (the first: as the backends pick)
    if on_gpu and len(gpus) > 1:  # (Triton makes count instances on each GPU listed; a backend opens one session)
        found.append(
            f"instance_group gpus past the first (the model runs on GPU {gpus[0]} alone; a group's count is "
            "its executions at once there, not per GPU listed)"
        )
    if any(i.allow_ragged_batch for i in cfg.input):
        found.append("allow_ragged_batch")
    if len(cfg.batch_input) or len(cfg.batch_output):
        found.append("batch_input / batch_output")
    if len(cfg.model_warmup):
        found.append("model_warmup (every model is warmed up with zeros)")
    if len(cfg.metric_tags):
        found.append("metric_tags (not added to the metrics' labels)")
    if len(cfg.model_operations.op_library_filename):
        found.append("model_operations (no op library is loaded)")
    if len(cfg.cc_model_filenames):
        found.append("cc_model_filenames (the version's model file is default_model_filename on every device)")
    accel = cfg.optimization.execution_accelerators
    others = [a.name for a in accel.cpu_execution_accelerator]
    others += [a.name for a in accel.gpu_execution_accelerator if a.name.lower() != "tensorrt"]
    if others:
        found.append("execution accelerators " + ", ".join(printable(clip(n, 64)) for n in others[:8]))
    # (a config listing no tensors has its max_batch_size completed: 0 there reads as not given)
    if cfg.HasField("dynamic_batching") and cfg.max_batch_size == 0 and (len(cfg.input) or len(cfg.output)):
        found.append(
            "dynamic_batching (max_batch_size is 0, so each request runs alone: set max_batch_size and give dims "
            "without the batch dimension to batch)"
        )
    if any(o.label_filename for o in cfg.output):
        found.append("label_filename (no classification: class_count is refused, and the file is not read)")
    return "; ".join(found)
