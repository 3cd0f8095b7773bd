"""What every conversion shares once an ONNX model exists: the parity checks, the optional
ONNX Runtime optimization and FP16 conversion (each checked again), the config, and the
write into the model repository (all or nothing).

Nothing here imports torch or scikit-learn: the caller hands over the exported model and a
``reference`` function that computes the original model's outputs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from batchgate.core.types import BY_ONNX, MODEL_NAME, MODEL_NAME_RULE, is_version_text

from .inputs import cases
from .spec import BATCH, ConversionError, InputSpec
from .versions import Shared, kept, require_fit, shared_config, still_the_same

Reference = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
REL_FLOOR = 1e-6  # relative error is measured against max(|expected|, this)


@dataclass
class Tolerance:
    atol: float
    rtol: float


@dataclass
class Check:
    """One output of one stage against the original model, over every case."""

    stage: str  # onnx | optimized | fp16
    output: str
    cases: int
    max_abs: float
    max_rel: float
    mismatches: int  # elements outside atol + rtol * |expected| (or unequal, for exact outputs)
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


@dataclass
class Result:
    name: str
    version: int
    path: str  # the version folder written
    source: str  # e.g. "torch 2.13.0, exporter dynamo, opset 18"
    inputs: list[dict]
    outputs: list[dict]
    max_batch_size: int
    checks: list[Check] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    written: bool = False
    config: str = ""  # "written", or why the model's config.pbtxt was kept as it is

    def as_dict(self) -> dict:
        d = asdict(self)
        d["checks"] = [{**asdict(c), "ok": c.ok} for c in self.checks]
        return d


@dataclass
class Job:
    """Everything the pipeline needs besides the model itself."""

    specs: list[InputSpec]
    output_names: list[str]
    reference: Reference | None  # the original model's outputs; None only before the export (a probe)
    repository: str
    name: str
    version: int = 1
    batched: bool = True
    max_batch_size: int = 64
    max_queue_delay_us: int = 500
    instances: int = 1
    gpu: bool = False
    force: bool = False
    samples: str | None = None
    tolerance: Tolerance = field(default_factory=lambda: Tolerance(1e-4, 1e-3))
    optimize: Tolerance | None = None
    fp16: Tolerance | None = None
    exact: frozenset[str] = frozenset()  # outputs compared for equality (labels)
    source: str = ""
    record: dict = field(default_factory=dict)  # written to conversion.json


def check_name(name: str, version: int) -> None:
    """Refuse a model name or version the repository cannot take (told before the model is
    loaded: loading imports torch, seconds)."""
    if version < 1:
        raise ConversionError(f"--version must be 1 or more, not {version}")
    if not is_version_text(str(version)):  # the server skips a version folder it could not name (past int64)
        raise ConversionError(f"--version {version}: a version is a number of at most 18 digits")
    if not MODEL_NAME.fullmatch(name):  # (the server's own rule: a name it would skip is refused here)
        raise ConversionError(f"--name {name[:128]!r}: {MODEL_NAME_RULE}")


def check_repository(repository) -> None:
    """Refuse an empty --repository: Path("") is the current directory, where the model would land
    unasked (a script's unset variable)."""
    if not str(repository).strip():
        raise ConversionError("--repository is empty: name the model repository to write into")


def destination(job: Job) -> Path:
    """The version folder to write; refused at once if it exists and ``force`` is not set."""
    check_name(job.name, job.version)
    check_repository(job.repository)
    root = Path(job.repository)
    if root.exists() and not root.is_dir():
        raise ConversionError(f"--repository {root} is not a directory")
    target = root / job.name / str(job.version)
    if target.exists() and not job.force:
        raise ConversionError(f"{target} already exists; pass --force to replace it")
    # write() stages the entry in the repository and renames it into the model's folder: both
    # must take new entries, which is best known by making one.
    for where in (root, target.parent) if target.parent.exists() else (root,):
        _writable(where, root)
    return target


def _writable(path: Path, root: Path) -> None:
    """Refuse ``path`` (or, if it does not exist yet, its nearest existing parent) unless a
    directory can be made in it."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConversionError(f"--repository {root}: {existing} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".batchgate-convert-probe-", dir=existing))
    except OSError as e:
        raise ConversionError(f"--repository {root}: cannot write in {existing} ({e.strerror or e})") from None


# ---------------------------------------------------------------------------- checks


def session(model: onnx.ModelProto, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Fatal only: a run that fails is told by the caller, as a ConversionError or not at all (an
    # input set the original model refuses too), never as ONNX Runtime's own error line on stderr.
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=list(providers))


def compare(
    stage: str, model: onnx.ModelProto, job: Job, inputs: list[dict], expected: list[list[np.ndarray]], tol: Tolerance
) -> list[Check]:
    try:
        sess = session(model)
        got = [sess.run(job.output_names, feeds) for feeds in inputs]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; the cause is in the text
        raise ConversionError(f"{stage}: ONNX Runtime cannot run the model: {e}") from None
    checks = []
    for k, name in enumerate(job.output_names):
        max_abs = max_rel = 0.0
        bad = 0
        for g, want in zip(got, expected):
            a, b = np.asarray(g[k]), np.asarray(want[k])
            if a.shape != b.shape:
                raise ConversionError(
                    f"{stage}: output '{name}' has shape {list(a.shape)}, the original model's {list(b.shape)}"
                )
            abs_err, rel_err, off = differences(a, b, tol, name in job.exact)
            max_abs, max_rel, bad = max(max_abs, abs_err), max(max_rel, rel_err), bad + off
        checks.append(Check(stage, name, len(inputs), max_abs, max_rel, bad, tol.atol, tol.rtol))
    return checks


def differences(a: np.ndarray, b: np.ndarray, tol: Tolerance, exact: bool = False) -> tuple[float, float, int]:
    """(max abs error, max rel error, elements outside ``atol + rtol * |b|``) of ``a`` against the
    expected ``b``, of one shape. Labels, ids and strings must be equal (abs error 1 if any is not)."""
    if exact or a.dtype.kind in "OSUbiu" or b.dtype.kind in "OSUbiu":
        unequal = int(np.count_nonzero(a != b))
        return float(unequal > 0), 0.0, unequal
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))  # NaN or inf on both sides agree
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a64 - b64))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only: as far off as it gets
    if not diff.size:
        return 0.0, 0.0, 0
    with np.errstate(invalid="ignore", over="ignore"):
        rel = diff / np.maximum(np.abs(np.nan_to_num(b64)), REL_FLOOR)
    # (an infinite expected value made the bound infinite: a finite answer for it passed)
    bad = int(np.count_nonzero(~same & ~(np.isfinite(diff) & (diff <= tol.atol + tol.rtol * np.abs(b64)))))
    return float(diff.max()), float(np.nan_to_num(rel, nan=np.inf).max()), bad


def rows_alone(model: onnx.ModelProto, job: Job, inputs: list[dict], tol: Tolerance) -> dict | None:
    """Refuse a batched model whose answer for a row depends on the other rows of its batch (a
    normalisation over the batch, say): the parity check cannot see it, the original computing
    the same, but the server's dynamic batching would make one caller's answer depend on the
    requests batched with it. The largest input set is run whole and row by row."""
    if not job.batched or not inputs:
        return None
    first = job.specs[0].name
    feeds = max(inputs, key=lambda f: f[first].shape[0])
    rows = feeds[first].shape[0]
    if rows < 2:
        return None
    sess = session(model)
    whole = sess.run(job.output_names, feeds)
    worst = dict.fromkeys(job.output_names, 0.0)
    for r in range(rows):
        alone = sess.run(job.output_names, {k: v[r : r + 1] for k, v in feeds.items()})
        for name, w, a in zip(job.output_names, whole, alone):
            in_batch, a = np.asarray(w)[r : r + 1], np.asarray(a)
            if a.shape != in_batch.shape:
                off, abs_err = 1, float("inf")
            else:
                abs_err, _, off = differences(a, in_batch, tol, name in job.exact)
            worst[name] = max(worst[name], abs_err)
            if off:
                raise ConversionError(
                    f"output '{name}' is not computed row by row: row {r} of a batch of {rows} answers "
                    f"{'another shape' if a.shape != in_batch.shape else f'{abs_err:.3g} off'} when run alone "
                    f"(atol {tol.atol:g}, rtol {tol.rtol:g}). Dynamic batching would make a caller's answer "
                    "depend on the requests batched with it; convert with --no-batch. Nothing was written"
                )
    return {"rows": rows, "max_abs": worst}


def optimized(model: onnx.ModelProto, workdir: str) -> onnx.ModelProto:
    """ONNX Runtime's extended graph optimizations (fusions that any machine can run), saved."""
    import onnxruntime as ort

    path = os.path.join(workdir, "optimized.onnx")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = path
    ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    return onnx.load(path)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and arithmetic in FP16, inputs and outputs kept in their types (onnxruntime's
    own converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def answered_shapes(
    model: onnx.ModelProto, job: Job, inputs: list[dict], progress: Callable[[str], None]
) -> onnx.ModelProto:
    """The model with its outputs declared as ONNX Runtime answers them on ``inputs``.

    The config's dims come from the shapes a model declares, and a converter can declare a wrong
    size (skl2onnx declares a regressor's ``variable`` [N, 1] however many targets it has): a size
    the answers contradict becomes the size they show (or dynamic, where it changes), so the config
    states what the server will send. A model ONNX Runtime cannot run is left to compare() to tell."""
    try:
        sess = session(model)
        got = [sess.run(None, feeds) for feeds in inputs]
    except Exception:  # noqa: BLE001 - compare() runs it again and says why it fails
        return model
    fixed: dict[str, tuple[list | None, list]] = {}
    for k, out in enumerate(model.graph.output):
        shapes = {np.shape(g[k]) for g in got}
        if not out.type.HasField("tensor_type") or len({len(s) for s in shapes}) != 1:
            continue
        tt = out.type.tensor_type
        rank = len(next(iter(shapes)))
        sizes = [{s[i] for s in shapes} for i in range(rank)]
        declared = list(tt.shape.dim) if tt.HasField("shape") else None
        if declared is not None and len(declared) == rank:
            wrong = [i for i, d in enumerate(declared) if d.HasField("dim_value") and sizes[i] != {d.dim_value}]
        else:
            wrong = list(range(rank))
        if not wrong:
            continue
        before = None if declared is None else [d.dim_value if d.HasField("dim_value") else -1 for d in declared]
        new = onnx.TensorShapeProto()
        for i in range(rank):
            dim = new.dim.add()
            if i not in wrong and declared is not None:
                dim.CopyFrom(declared[i])
            elif len(sizes[i]) == 1 and not (job.batched and i == 0):
                dim.dim_value = next(iter(sizes[i]))
            else:
                dim.dim_param = BATCH if job.batched and i == 0 else f"{out.name}_dim{i}"
        tt.shape.CopyFrom(new)
        fixed[out.name] = (before, [d.dim_value if d.HasField("dim_value") else -1 for d in new.dim])
    for name, (before, after) in fixed.items():
        progress(f"the exported model declares output '{name}' {before} but answers {after}: declared {after}")
    if fixed:
        job.record["declared_shapes_corrected"] = {n: {"declared": b, "answered": a} for n, (b, a) in fixed.items()}
    return model


# ---------------------------------------------------------------------------- config


def signature(model: onnx.ModelProto, job: Job) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs as the config declares them, from the final model."""
    sess = session(model)
    names = [i.name for i in sess.get_inputs()]
    if sorted(names) != sorted(s.name for s in job.specs):
        raise ConversionError(
            f"the exported model's inputs are {names}; the input specs name {[s.name for s in job.specs]}"
        )

    def entry(arg) -> dict:
        dt = BY_ONNX.get(arg.type)
        if dt is None:
            raise ConversionError(f"tensor '{arg.name}' has ONNX type {arg.type}, which batchgate cannot serve")
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
        if job.batched:
            if not dims:
                raise ConversionError(
                    f"output '{arg.name}' is a scalar: it has no batch dimension; convert with batching off"
                )
            dims = dims[1:]
        return {"name": arg.name, "datatype": dt.v2, "config": dt.config, "dims": dims}

    by_name = {i.name: i for i in sess.get_inputs()}
    inputs = [entry(by_name[s.name]) for s in job.specs]
    for spec, got in zip(job.specs, inputs):
        if got["datatype"] != spec.dtype.v2:
            raise ConversionError(
                f"input '{spec.name}': the spec says {spec.dtype.v2}, the exported model takes {got['datatype']}"
            )
    outputs = [entry(o) for o in sess.get_outputs()]
    return inputs, outputs


def config_text(job: Job, inputs: list[dict], outputs: list[dict]) -> str:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = mc.ModelConfig(
        name=job.name, platform="onnxruntime_onnx", max_batch_size=job.max_batch_size if job.batched else 0
    )
    for src, dst in ((inputs, cfg.input), (outputs, cfg.output)):
        for t in src:
            entry = dst.add(name=t["name"], data_type=mc.DataType.Value(t["config"]), dims=t["dims"])
            if not t["dims"]:  # one value a row (batched) or a scalar: Triton wants dims [1], reshaped to []
                entry.dims.append(1)
                entry.reshape.SetInParent()
    if job.batched:
        cfg.dynamic_batching.max_queue_delay_microseconds = job.max_queue_delay_us
    kind = mc.ModelInstanceGroup.KIND_GPU if job.gpu else mc.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=job.instances, kind=kind)
    cfg.parameters["converted_by"].string_value = job.source
    header = (
        f"# Written by batchgate convert ({job.source}) on {time.strftime('%Y-%m-%d')}.\n"
        f"# Parity checks: {job.name}/{job.version}/conversion.json\n"
    )
    return header + text_format.MessageToString(cfg)


# ---------------------------------------------------------------------------- the whole run


def run(model: onnx.ModelProto, job: Job, progress: Callable[[str], None] = lambda s: None) -> Result:
    target = destination(job)
    shared = shared_config(job)
    inputs = cases(job)
    model = answered_shapes(model, job, inputs, progress)
    if shared is not None:  # a version joining others: the exported model must fit their config before any check
        progress(f"checking the exported model against {shared.path}")
        require_fit(job, shared, *signature(model, job))
    progress(f"running the original model on {len(inputs)} input sets")
    reference = job.reference
    assert reference is not None, "a job is run with the original model's reference"
    expected, answered, skipped = [], [], []
    samples = 1 if job.samples else 0  # (the last input set)
    for i, feeds in enumerate(inputs):
        try:
            expected.append(reference(feeds))
            answered.append(feeds)
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the model raises, say which input it was
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            why = f"the original model fails on {'--samples' if i >= len(inputs) - samples else 'generated'} inputs "
            why += f"of shapes {shapes}: {type(e).__name__}: {e}"
            if i >= len(inputs) - samples or not samples:  # (a model taking some values only: real rows then)
                hint = (
                    "" if samples else "; if it takes some values only (categories, indices), give real rows: --samples"
                )
                raise ConversionError(why + hint) from None
            skipped.append(why)
    if skipped:  # checked on the samples (and the generated inputs it takes) instead
        progress(f"{len(skipped)} generated input set(s) left out of the parity check: {skipped[0]}")
        job.record["parity_left_out"] = skipped
    inputs = answered
    if job.batched:  # every output must have the batch as its first dimension, or batching would split it wrong
        for feeds, arrays in zip(inputs, expected):
            rows = feeds[job.specs[0].name].shape[0]
            for name, o in zip(job.output_names, arrays):
                if np.ndim(o) == 0 or np.shape(o)[0] != rows:
                    raise ConversionError(
                        f"output '{name}' has shape {list(np.shape(o))} for a batch of {rows}: its "
                        "first dimension is not the batch dimension; convert with --no-batch"
                    )
    checks: list[Check] = []
    stages = ["onnx"]
    progress("parity check: ONNX model under ONNX Runtime vs the original")
    checks += compare("onnx", model, job, inputs, expected, job.tolerance)
    # Known before --optimize, which may add FP32 casts for the CPU (ONNX Runtime's stand-ins for
    # FP16 kernels it lacks): the FP16 converter then breaks the model it cannot load.
    in_fp16 = not any(
        t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for t in (*model.graph.input, *model.graph.output)
    ) and not any(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer)
    with tempfile.TemporaryDirectory(prefix="batchgate-convert-") as work:
        if job.optimize is not None:
            progress("ONNX Runtime graph optimizations, then the parity check again")
            model = optimized(model, work)
            stages.append("optimized")
            checks += compare("optimized", model, job, inputs, expected, job.optimize)
        if job.fp16 is not None:
            if in_fp16:  # nothing to convert: the model is checked as it is
                progress("FP16 conversion: the weights, inputs and outputs are FP16 already; the parity check again")
                job.record["fp16_conversion"] = "none: the exported model computes in FP16 already"
            else:
                progress("FP16 conversion, then the parity check again")
                model = to_fp16(model)
            stages.append("fp16")
            checks += compare("fp16", model, job, inputs, expected, job.fp16)
    ins, outs = signature(model, job)
    require_fit(job, shared, ins, outs)  # the final model, after --optimize and --fp16
    result = Result(
        job.name,
        job.version,
        str(target),
        job.source,
        ins,
        outs,
        job.max_batch_size if job.batched else 0,
        checks,
        stages,
        config="written" if shared is None else kept(job, shared),
    )
    failed = [c for c in checks if not c.ok]
    if failed:
        worst = "; ".join(
            f"{c.stage} '{c.output}': {c.mismatches} element(s) off, max abs error {c.max_abs:.3g} "
            f"(atol {c.atol:g}, rtol {c.rtol:g})"
            for c in failed
        )
        err = ConversionError(f"parity check failed, nothing written: {worst}")
        err.result = result  # type: ignore[attr-defined]
        raise err
    last = job.fp16 if job.fp16 is not None else job.optimize if job.optimize is not None else job.tolerance
    progress("checking that each row of a batch is answered as it is alone")
    job.record["batch_rows_alone"] = rows_alone(model, job, inputs, last)
    text = config_text(job, ins, outs) if shared is None else None
    write(model, job, target, text, {**job.record, **result.as_dict()}, shared)
    result.written = True
    return result


def write(
    model: onnx.ModelProto, job: Job, target: Path, config: str | None, record: dict, shared: Shared | None = None
) -> None:
    """Build the entry in a hidden folder beside the model, then move it into place: a reader
    (or a polling server) sees the old entry or the new one, never half of one. ``config`` None:
    the version joins ``shared``, whose file is not touched."""
    try:
        _write(model, job, target, config, record, shared)
    except OSError as e:  # a full disk, a folder made read-only since destination() looked
        raise ConversionError(f"writing {target} failed ({e.strerror or e}); nothing was written") from None


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux's ``renameat2`` with ``RENAME_EXCHANGE``): True
    when done, False where the system or its file system cannot (then nothing moved)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:  # (not Linux, or a C library older than glibc 2.28)
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _write(
    model: onnx.ModelProto, job: Job, target: Path, config: str | None, record: dict, shared: Shared | None
) -> None:
    model_dir = target.parent
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{job.name}-convert-", dir=model_dir.parent))
    try:
        version_dir = staging / str(job.version)
        version_dir.mkdir()
        onnx.save(model, str(version_dir / "model.onnx"))
        (version_dir / "conversion.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if config is not None:
            (staging / "config.pbtxt").write_text(config)
        still_the_same(job, shared)
        if not model_dir.exists():  # a new model: the whole entry appears with one rename
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it private
            staging.rename(model_dir)
            return
        replaced = target.exists()
        # --force: the new version and the old one trade places in one step where the system can
        # (the old one is then in staging, removed with it); else the old one goes in one rename
        # and the new one comes in the next, and a repository poll in between saw no version
        swapped = replaced and exchange(version_dir, target)
        if replaced and not swapped:
            target.rename(staging / "replaced")
        try:
            if not swapped:
                version_dir.rename(target)
            if config is not None:
                os.replace(staging / "config.pbtxt", model_dir / "config.pbtxt")
        except OSError as e:  # put the old entry back as it was
            if swapped:
                exchange(version_dir, target)
            else:
                if target.exists():
                    target.rename(staging / "failed")
                if replaced:
                    (staging / "replaced").rename(target)
            raise ConversionError(f"writing {target} failed ({e}); the old entry is kept") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["Check", "Job", "Result", "Tolerance", "run", "BATCH"]
