"""From a PyTorch or scikit-learn model to a verified entry of a batchgate model repository.

    from batchgate.converters import convert_torch, convert_sklearn
    result = convert_torch("mypkg.models:build", ["x:FP32:-1,3,32,32"], "models", "cnn")

Every conversion runs the original model and the ONNX model under ONNX Runtime on the same
inputs (several batch sizes, other sizes of the dynamic dimensions, and the user's samples)
and writes nothing when an output differs beyond the tolerance. A version added beside others
must fit the config.pbtxt they share, which is then left as it is (``versions.py``). torch,
skl2onnx and scikit-learn are imported only when a conversion needs them (``pip install
'batchgate[convert]'``); the server never imports this package.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace

from .pipeline import Check, Job, Result, Tolerance, run
from .spec import TENSOR_NAME, TENSOR_RULE, ConversionError, InputSpec, drawn_from
from .versions import require_fit, shared_config, spec_tensors

DEFAULT_TOLERANCE = Tolerance(1e-4, 1e-3)
DEFAULT_FP16_TOLERANCE = Tolerance(1e-2, 1e-2)
MAX_BATCH_SIZE = 2**31 - 1  # max_batch_size is an int32 in model_config.proto


def _specs(inputs, batched: bool) -> list[InputSpec]:
    if not inputs:
        raise ConversionError("at least one --input NAME:DTYPE:SHAPE is needed")
    specs = [i if isinstance(i, InputSpec) else InputSpec.parse(i, batched) for i in inputs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConversionError(f"input names must differ: {names}")
    return specs


def _tolerances(tolerance: Tolerance, optimize: Tolerance | None, fp16: Tolerance | None) -> None:
    """Refuse a tolerance no element can meet (negative, NaN): the parity check would fail every
    inexact output and blame the model."""
    for flag, tol in (("", tolerance), ("optimize-", optimize), ("fp16-", fp16)):
        if tol is None:
            continue
        for kind in ("atol", "rtol"):
            value = getattr(tol, kind)
            if not value >= 0:
                raise ConversionError(f"--{flag}{kind} {value}: a tolerance is a number, 0 or more")


def _batching(batched: bool, max_batch_size: int) -> None:
    if batched and max_batch_size < 1:
        raise ConversionError("--max-batch-size must be at least 1 (or convert with --no-batch)")
    if batched and max_batch_size > MAX_BATCH_SIZE:  # (the config's field is an int32: it failed at the write)
        raise ConversionError(f"--max-batch-size {max_batch_size}: at most {MAX_BATCH_SIZE}, what a config holds")


def _job(specs, outputs, repository, name, version, batched, max_batch_size, gpu, force) -> Job:
    """Where and how a conversion is written, before the model is exported (the reference, the
    checks and the record are added with ``dataclasses.replace`` once they are known)."""
    _batching(batched, max_batch_size)
    return Job(
        specs=specs,
        output_names=outputs,
        reference=None,
        repository=repository,
        name=name,
        version=version,
        batched=batched,
        max_batch_size=max_batch_size,
        gpu=gpu,
        force=force,
    )


def convert_torch(
    model,
    inputs,
    repository: str,
    name: str,
    version: int = 1,
    *,
    outputs=(),
    batched: bool = True,
    max_batch_size: int = 64,
    exporter: str = "auto",
    opset: int | None = None,
    samples: str | None = None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    optimize: Tolerance | None = None,
    fp16: Tolerance | None = None,
    gpu: bool = False,
    force: bool = False,
    progress=lambda s: None,
) -> Result:
    """Export ``model`` (an nn.Module, ``pkg.module:factory`` or a TorchScript file), check it and
    write it to ``repository/name/version``. Raises ConversionError, having written nothing: among
    other causes, when the model already has versions whose config this one does not fit (found
    before the export)."""
    from . import torch_model as tm
    from .inputs import load_samples
    from .pipeline import check_name, check_repository, destination

    check_name(name, version)
    check_repository(repository)
    if samples is not None and not samples.strip():  # (it was ignored: a check on real rows silently left out)
        raise ConversionError("--samples is empty: name an .npz file, or leave the option out")
    _tolerances(tolerance, optimize, fp16)
    _batching(batched, max_batch_size)  # (before the model loads)
    if opset is not None and opset < 1:  # (0 was taken as no --opset: the exporter's own was written)
        raise ConversionError(f"--opset {opset}: an opset is a number from 1 up")
    specs = _specs(inputs, batched)
    strings = [s.name for s in specs if s.dtype.v2 == "BYTES"]
    if strings:  # (it failed after the load, as an input "the model does not accept", with a --samples hint)
        raise ConversionError(
            f"input(s) {', '.join(strings)}: BYTES (strings) cannot reach a PyTorch model, which takes tensors "
            "of numbers or booleans; encode them first (token ids: INT64)"
        )
    for o in outputs:  # (an empty name failed in ONNX Runtime; "a b" or "../x" was served as a name)
        if not TENSOR_NAME.fullmatch(o):
            raise ConversionError(f"--output {o!r} is not a valid tensor name (the rule of the inputs': {TENSOR_RULE})")
    if samples:  # (a bad file is told before the model loads) its integers and strings feed the generated inputs
        job = _job(specs, [], repository, name, version, batched, max_batch_size, gpu, force)
        specs = drawn_from(specs, load_samples(samples, specs, job)[0])
    # The caller's module is handed back in the modes it came in (a model still being trained).
    modes = [] if isinstance(model, str) else [(m, m.training) for m in model.modules()]
    try:
        if isinstance(model, str):
            progress(f"loading {model}")
            module, scripted = tm.load(model)
            label = model
        else:
            # (a ScriptModule handed over is a TorchScript file's module: the same rules apply)
            scripted = isinstance(model, tm._torch().jit.ScriptModule)
            module, label = model.eval(), type(model).__name__
        # the specs in the order the model takes them (the config lists them as given)
        module, call = tm.by_name(module, specs, scripted)
        names = tm.output_names(module, call, list(outputs))
        torch = tm._torch()
        # Refuse an existing version before the (slow) export.
        probe = _job(specs, names, repository, name, version, batched, max_batch_size, gpu or fp16 is not None, force)
        probe = replace(probe, samples=samples, tolerance=tolerance, optimize=optimize, fp16=fp16)
        destination(probe)
        shared = shared_config(probe)
        if shared is not None:  # a version joining others: its tensors and settings must fit their config
            progress(f"checking the new version against {shared.path}")
            outputs_seen = tm.output_signature(module, call, names, batched)
            require_fit(probe, shared, spec_tensors(specs, batched), outputs_seen, observed=True)
        with tempfile.TemporaryDirectory(prefix="batchgate-export-") as work:
            progress(f"exporting with torch.onnx.export (exporter: {exporter})")
            onx, used, failed = tm.export(
                module, scripted, call, names, batched, exporter, opset, os.path.join(work, "model.onnx")
            )
        if failed:
            progress(f"exported with the {used} exporter after: {failed}")
        opset_used = tm.default_opset(onx)
        source = f"torch {torch.__version__}, torch.onnx.export {used} exporter, opset {opset_used}"
        record = {
            "converter": "torch",
            "model": label,
            "exporter": used,
            "opset": opset_used,
            "torch": torch.__version__,
            "exporter_fallback_after": failed or None,
        }
        return run(onx, replace(probe, reference=tm.reference(module, call), source=source, record=record), progress)
    finally:
        for m, training in modes:
            m.training = training


def convert_sklearn(
    model,
    inputs,
    repository: str,
    name: str,
    version: int = 1,
    *,
    batched: bool = True,
    max_batch_size: int = 64,
    opset: int | None = None,
    samples: str | None = None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    optimize: Tolerance | None = None,
    fp16: Tolerance | None = None,
    gpu: bool = False,
    force: bool = False,
    progress=lambda s: None,
) -> Result:
    """Convert a scikit-learn estimator or pipeline (an object, or a pickle/joblib file) the same way."""
    from . import sklearn_model as sm
    from .inputs import load_samples
    from .pipeline import check_name, check_repository, destination

    check_name(name, version)
    check_repository(repository)
    if samples is not None and not samples.strip():  # (it was ignored: a check on real rows silently left out)
        raise ConversionError("--samples is empty: name an .npz file, or leave the option out")
    _tolerances(tolerance, optimize, fp16)
    _batching(batched, max_batch_size)  # (before the model loads)
    if opset is not None and opset < 1:  # (0 was taken as no --opset: the exporter's own was written)
        raise ConversionError(f"--opset {opset}: an opset is a number from 1 up")
    specs = _specs(inputs, batched)
    if fp16 is not None:
        raise ConversionError(
            "--fp16 is for neural networks on GPUs: scikit-learn models keep their ONNX-ML "
            "operators in FP32, so they are converted without it"
        )
    probe = _job(specs, [], repository, name, version, batched, max_batch_size, gpu, force)
    probe = replace(probe, samples=samples, tolerance=tolerance, optimize=optimize, fp16=fp16)
    destination(probe)  # (before the file is loaded: unpickling runs its code, and is refused last)
    if isinstance(model, str):
        progress(f"loading {model} (a pickle runs code as it loads: convert only files you trust)")
        label, model = model, sm.load(model)
    else:
        label = type(model).__name__
    if samples:  # its integers and strings feed the generated inputs (categories the model knows)
        specs = drawn_from(specs, load_samples(samples, specs, probe)[0])
        probe = replace(probe, specs=specs)
    # The outputs are known once skl2onnx has converted the model (in memory); run() checks them.
    require_fit(probe, shared_config(probe), spec_tensors(specs, batched))
    import skl2onnx
    import sklearn

    progress("converting with skl2onnx")
    onx, names = sm.export(model, specs, batched, opset)
    opsets = {o.domain or "ai.onnx": o.version for o in onx.opset_import}
    source = f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, opset {opsets.get('ai.onnx')}"
    record = {
        "converter": "sklearn",
        "model": label,
        "estimator": type(model).__name__,
        "opsets": opsets,
        "sklearn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
    }
    job = replace(
        probe,
        output_names=names,
        reference=sm.reference(model, specs, names),
        source=source,
        record=record,
        exact=frozenset(names[:1]) if len(names) == 2 else frozenset(),  # a classifier's labels
    )
    return run(onx, job, progress)


__all__ = [
    "Check",
    "ConversionError",
    "InputSpec",
    "Result",
    "Tolerance",
    "convert_sklearn",
    "convert_torch",
    "DEFAULT_TOLERANCE",
    "DEFAULT_FP16_TOLERANCE",
]
