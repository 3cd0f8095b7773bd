"""Adding a version to a model that has one already.

The versions of a model share one ``config.pbtxt``: the server reads it once and serves every
version with it. A conversion into a model directory that already holds a config and other
versions therefore leaves that file exactly as it is, and the new version has to fit it: the
tensors (names, datatypes, dims) and the settings the conversion asks for (``max_batch_size``,
the instance kind ``--gpu`` and ``--fp16`` ask for, the platform and the model file name) must be
what the config already says. Each difference is named, before the export where it can be
known then, and nothing is written.

What a conversion has no option for (the dynamic batching delay, instance counts, parameters,
``optimization``, the version policy) is the model's own setting and is kept as the config has
it. ``--optimize``, ``--fp16`` (inputs and outputs keep their types), ``--opset`` and the
exporter change the new model file only, so they may differ from one version to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchgate.core.types import BY_CONFIG, BY_NUMPY, DATATYPES, DataType
from batchgate.repository.config import CONFIG_FILE, versions_to_serve
from batchgate.repository.scan import list_versions

from .spec import ConversionError, InputSpec

if TYPE_CHECKING:
    from .pipeline import Job

ONNX_PLATFORMS = ("onnxruntime_onnx", "onnxruntime")
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class Shared:
    """A config.pbtxt that a new version joins; ``text`` is kept to prove it unchanged at the end."""

    path: Path
    text: bytes
    config: Any  # tritonclient's model_config_pb2.ModelConfig
    versions: tuple[int, ...]  # the versions already served with it, besides the one being written

    def describe(self) -> str:
        if not self.versions:
            return "no version yet"
        return ("version " if len(self.versions) == 1 else "versions ") + ", ".join(map(str, self.versions))


def shared_config(job: Job) -> Shared | None:
    """The config the new version must fit, or None when this conversion writes the config
    itself: a new model, or ``--force`` replacing the model's only version."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    model_dir = Path(job.repository) / job.name
    if not model_dir.is_dir():
        return None
    others = tuple(v for v in list_versions(str(model_dir)) if v != job.version)
    path = model_dir / CONFIG_FILE
    if not path.exists():
        if others:
            listed = ", ".join(map(str, others))
            raise ConversionError(
                f"{model_dir} has version(s) {listed} and no {CONFIG_FILE}: the server completes their "
                f"config from their model files, and the {CONFIG_FILE} this conversion writes would change "
                f"how they are served. Write a {CONFIG_FILE} for them first (the new version must then fit "
                "it), or convert under a new --name. Nothing was written."
            )
        return None
    if not others and (model_dir / str(job.version)).is_dir() and job.force:
        return None  # --force replaces the whole entry: the only version and its config
    cfg = mc.ModelConfig()
    try:
        text = path.read_bytes()  # (a folder, or a file this user may not read: OSError)
        text_format.Parse(text.decode("utf-8"), cfg)
    except (text_format.ParseError, UnicodeDecodeError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ConversionError(
            f"{path} cannot be read ({why}); a new version must fit the config of the model it joins. "
            "Mend it, or convert under a new --name. Nothing was written."
        ) from None
    return Shared(path, text, cfg, others)


def spec_tensors(specs: list[InputSpec], batched: bool) -> list[dict]:
    """The inputs as the config would declare them, from the input specs alone."""
    return [{"name": s.name, "datatype": s.dtype.v2, "dims": s.config_dims(batched)} for s in specs]


def require_fit(
    job: Job,
    shared: Shared | None,
    inputs: list[dict] | None = None,
    outputs: list[dict] | None = None,
    *,
    observed: bool = False,
) -> None:
    """Refuse, naming every difference, a version that does not fit ``shared``.

    ``inputs`` / ``outputs`` are ``{"name", "datatype", "dims"}`` with the config's dims (batch
    dimension left out when batching); None skips them. ``observed``: the output dims come from
    running the original model at two sizes, so -1 means "changes with the input", not "unknown"
    as it does when they are read from an ONNX model."""
    if shared is None:
        return
    settings, hints = _settings(job, shared.config)
    batched_alike = (shared.config.max_batch_size > 0) == job.batched  # else dims differ by the batch dimension
    tensors: list[str] = []
    for kind, new in (("input", inputs), ("output", outputs)):
        if new is None:
            continue
        where, declared = _declared(shared, kind)
        if declared is None:
            continue  # nothing to compare with: the server completes them from the new version's model
        tensors += _tensor_misfits(kind, where, declared, new, batched_alike, loose=kind == "output" and not observed)
    lines = settings + tensors
    if not lines:
        return
    # Misfits no option of this command can change: the platform or file the config names.
    fixed = [line for line in settings if line.startswith(("platform:", "default_model_filename:"))]
    if shared.versions:
        head = (
            f"model '{job.name}' has {shared.describe()} served with {shared.path}; version {job.version} would "
            "share it, and does not fit it:"
        )
    else:
        head = f"model '{job.name}' has {shared.path} and no version yet; version {job.version} does not fit it:"
    if hints and not fixed:
        tail = f"convert with options that match it ({'; '.join(hints)}), or convert under a new --name."
    else:
        why = ["the versions of a model take and give the same tensors"] if tensors else []
        if fixed:
            why.append("the versions of a model share its platform and model file, which this conversion cannot change")
        tail = f"convert under a new --name ({'; '.join(why)})."
    if not shared.versions:
        tail += f" No version uses it yet: remove {shared.path} to have this conversion write a new one."
    body = "\n".join(f"  - {line}" for line in lines)
    raise ConversionError(f"{head}\n{body}\nNothing was written and the config is left as it is: {tail}")


def _settings(job: Job, cfg) -> tuple[list[str], list[str]]:
    from tritonclient.grpc import model_config_pb2 as mc

    lines: list[str] = []
    hints: list[str] = []
    platform = cfg.platform or cfg.backend or ONNX_PLATFORMS[0]
    if platform not in ONNX_PLATFORMS:
        lines.append(f"platform: the config has '{platform}', this conversion writes an ONNX model (onnxruntime_onnx)")
    filename = cfg.default_model_filename or MODEL_FILE
    if filename != MODEL_FILE:
        lines.append(f"default_model_filename: the config has '{filename}', this conversion writes {MODEL_FILE}")
    want = job.max_batch_size if job.batched else 0
    if cfg.max_batch_size != want:
        asked = f"--max-batch-size {job.max_batch_size}" if job.batched else "--no-batch"
        lines.append(f"max_batch_size: the config has {cfg.max_batch_size}, this conversion asks for {want} ({asked})")
        if cfg.max_batch_size == 0:
            hints.append("--no-batch")
        else:
            hints.append(f"--max-batch-size {cfg.max_batch_size}" + ("" if job.batched else " without --no-batch"))
    kinds = sorted({mc.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group})
    has_gpu = "KIND_GPU" in kinds  # what the server looks at: any GPU group asks for CUDA
    if has_gpu != job.gpu:
        have = ", ".join(kinds) if kinds else "no instance_group (KIND_CPU)"
        if job.fp16 is not None:
            asked = "KIND_GPU (--fp16, which implies --gpu)"
        else:
            asked = "KIND_GPU (--gpu)" if job.gpu else "KIND_CPU (no --gpu)"
        lines.append(f"instance kind: the config has {have}, this conversion asks for {asked}")
        hints.append("--gpu" if has_gpu else "no --gpu and no --fp16")
    return lines, hints


def _declared(shared: Shared, kind: str) -> tuple[str, list[dict] | None]:
    """What the server serves the versions with: the config's tensors of ``kind`` or, where the
    config lists none, the latest other version's model file (the server completes them from it)."""
    from tritonclient.grpc import model_config_pb2 as mc

    entries = shared.config.input if kind == "input" else shared.config.output
    if entries:
        out = []
        for e in entries:
            name = mc.DataType.Name(e.data_type)
            dt = BY_CONFIG.get(name)
            dims = e.reshape.shape if e.HasField("reshape") else e.dims  # (the model's own shape)
            out.append({"name": e.name, "datatype": dt.v2 if dt else name, "dims": [int(d) for d in dims]})
        return "the config", out
    if not shared.versions:
        return "the config", None
    latest = shared.versions[-1]
    path = shared.path.parent / str(latest) / (shared.config.default_model_filename or MODEL_FILE)
    return f"version {latest}'s model", _model_tensors(path, kind, shared.config.max_batch_size > 0)


def _model_tensors(path: Path, kind: str, batched: bool) -> list[dict] | None:
    """A model file's inputs or outputs, read from its graph (weights left on disk)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - missing or unreadable: the server could not serve it either
        return None
    graph = model.graph
    if kind == "input":
        weights = {i.name for i in graph.initializer}
        values = [v for v in graph.input if v.name not in weights]
    else:
        values = list(graph.output)
    out = []
    for v in values:
        tt = v.type.tensor_type
        dt: DataType | None
        if tt.elem_type == onnx.TensorProto.STRING:
            dt = DATATYPES["BYTES"]
        else:
            try:
                dt = BY_NUMPY.get(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
            except (KeyError, TypeError, ValueError):
                dt = None
        datatype = dt.v2 if dt else onnx.TensorProto.DataType.Name(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
        out.append({"name": v.name, "datatype": datatype, "dims": dims[1:] if batched else dims})
    return out


def _tensor_misfits(kind: str, where: str, declared: list[dict], new: list[dict], dims: bool, loose: bool) -> list[str]:
    lines = []
    have = {t["name"]: t for t in declared}
    got = {t["name"]: t for t in new}
    for name in have:
        if name not in got:
            lines.append(f"{kind} '{name}': in {where}, not in this model (its {kind}s: {_names(got)})")
    for name, t in got.items():
        old = have.get(name)
        if old is None:
            lines.append(f"{kind} '{name}': in this model, not in {where} (its {kind}s: {_names(have)})")
            continue
        if t["datatype"] != old["datatype"]:
            lines.append(f"{kind} '{name}': datatype {old['datatype']} in {where}, {t['datatype']} in this model")
        if dims and not _dims_fit(old["dims"], t["dims"], kind == "output", loose):
            lines.append(f"{kind} '{name}': dims {old['dims']} in {where}, {t['dims']} in this model")
    return lines


def _dims_fit(have: list[int], new: list[int], output: bool, loose: bool) -> bool:
    """Inputs must be declared alike. An output fits where the config's dim is -1 (any size) or
    the same size; a -1 read from an ONNX model (``loose``) is a size it does not state."""
    if len(have) != len(new):
        return False
    if not output:
        return list(have) == list(new)
    return all(h == -1 or h == n or (loose and n == -1) for h, n in zip(have, new))


def _names(tensors: dict) -> str:
    return ", ".join(f"'{n}'" for n in tensors) or "none"


def kept(job: Job, shared: Shared) -> str:
    """What the result says about the config it left alone; notes a version policy that will
    not serve the new version."""
    text = f"kept as it is (shared with {shared.describe()})"
    served = versions_to_serve(shared.config, [*shared.versions, job.version])
    if job.version not in served:
        text += f"; its version_policy serves version(s) {', '.join(map(str, served))}, not {job.version}"
    return text


def still_the_same(job: Job, before: Shared | None) -> None:
    """Just before the write: the model directory must be as it was when checked (another
    conversion or an editor may have changed it during the export and the checks)."""
    now = shared_config(job)
    if (before is None) != (now is None) or (before is not None and now is not None and before.text != now.text):
        raise ConversionError(
            f"{Path(job.repository) / job.name} changed while this conversion ran (its {CONFIG_FILE} or "
            "versions); nothing was written. Run the conversion again."
        )
