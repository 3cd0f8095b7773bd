"""PyTorch models: load them, export them with ``torch.onnx.export``, run them for reference.

Torch is imported here only, and only when a conversion asks for it: the server never does.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import re
import sys
import warnings
import zipfile
from typing import Any

import numpy as np
import onnx

from batchgate.core.types import BY_NUMPY

from .graph import rename_values
from .spec import BATCH, TENSOR_NAME, ConversionError, InputSpec, example_sizes, generate

EXPORTERS = ("auto", "dynamo", "legacy")


def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "PyTorch is not installed: pip install 'batchgate[convert]' (here: pip install torch==2.13.0)"
        ) from None
    return torch


def load(model: str):
    """An ``nn.Module`` in eval mode from ``pkg.module:factory`` (a module instance, a class or a
    function returning one), or a TorchScript file. Returns (module, is_torchscript)."""
    torch = _torch()
    if os.path.isfile(model):
        try:
            return torch.jit.load(model, map_location="cpu").eval(), True
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError and others
            saved = _saved_not_scripted(model)
            raise ConversionError(
                f"--model {model}: " + (saved or f"not a TorchScript file ({_first_line(e)})") + "; save one with "
                "torch.jit.save(torch.jit.script(model), path), or pass module:factory"
                + (", a function returning the module with its weights loaded" if saved else "")
            ) from None
    mod_name, sep, attr = model.partition(":")
    if not sep or not mod_name or not attr:
        if model.endswith((".pt", ".pth", ".ts")):
            raise ConversionError(f"--model {model}: no such file")
        raise ConversionError(f"--model {model!r} must be pkg.module:factory or a TorchScript file")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module beside the user, as `python -m` would find it
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConversionError(f"--model {model}: cannot import module '{mod_name}': {e}") from None
    except Exception as e:  # noqa: BLE001 - the module's own code failed
        raise ConversionError(f"--model {model}: importing '{mod_name}' failed: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConversionError(f"--model {model}: module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise ConversionError(f"--model {model}: '{attr}' is neither an nn.Module nor a factory of one")
        try:
            obj = obj()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"--model {model}: calling '{attr}()' failed: {type(e).__name__}: {e}") from None
        if not isinstance(obj, torch.nn.Module):
            raise ConversionError(f"--model {model}: '{attr}()' returned {type(obj).__name__}, not an nn.Module")
    return obj.eval(), False


def _saved_not_scripted(path: str) -> str | None:
    """What a file written by torch.save holds, said instead of torch.jit.load's own error (which
    calls it corrupted); None for any other file. Read with ``weights_only``: no code runs."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if not any(m.endswith("/data.pkl") for m in members) or any(m.endswith("/constants.pkl") for m in members):
        return None
    try:
        held = _torch().load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not weights alone: a pickled module, whose code is not run here
        return "a file saved with torch.save (a pickled module, not TorchScript: batchgate does not unpickle it)"
    if isinstance(held, dict):
        return (
            f"a state_dict or checkpoint saved with torch.save ({len(held)} entries, weights without the "
            "module's code), not TorchScript"
        )
    return f"a {type(held).__name__} saved with torch.save, not TorchScript"


def by_name(module, specs: list[InputSpec], scripted: bool = False):
    """``(module, specs)`` to call it with, so that each input reaches the forward() parameter of
    its name; the specs are those to export and run the model with, in the order it takes them.

    Inputs go to forward() by position, in the order of the specs: a model served with ``b`` and
    ``a`` given to ``forward(a, b)`` would compute with the two swapped, and the parity check,
    which calls it the same way, would agree. When every input names a parameter of forward()
    they reach it by name: in forward's order when they are its first parameters, else (a
    parameter skipped, keyword-only ones) through a module passing them as keywords. When only
    some do, one that would reach another parameter than its namesake is refused."""
    found = _parameters(module)
    if found is None:  # nothing to read names from: by position
        return module, specs
    params, positional, keywords = found
    names = [s.name for s in specs]
    if sorted(names) == sorted(positional[: len(names)]):
        return module, sorted(specs, key=lambda s: positional.index(s.name))
    if all(n in keywords for n in names):
        if scripted:  # the legacy exporter cannot trace a TorchScript module called from a Python one
            raise ConversionError(
                f"the inputs {names} name parameters of forward({', '.join(params)}) that are not its first "
                f"{len(names)}: a TorchScript module is exported with its inputs by position; give inputs for "
                "its first parameters, or convert the nn.Module"
            )
        return _by_name_module(module, names), specs
    for i, n in enumerate(names):
        at = positional[i] if i < len(positional) else None
        if n in positional + keywords and at != n:
            raise ConversionError(
                f"input '{n}' would be passed to forward() as its argument {i + 1}"
                + (f" (parameter '{at}')" if at else "")
                + f", not as its parameter '{n}': inputs are passed by position unless every --input names "
                f"a parameter of forward({', '.join(params)}); rename the inputs after its "
                "parameters, or give them in its order under other names"
            )
    return module, specs


def _first_line(e: BaseException, lines: int = 1) -> str:
    text = str(e).strip() or type(e).__name__
    return " | ".join(text.splitlines()[:lines])


def _parameters(module) -> tuple[list[str], list[str], list[str]] | None:
    """forward()'s parameter names: all, those taken by position, those taken by keyword. A
    TorchScript module loaded from a file has no Python signature; its schema names them."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        schema = getattr(getattr(module, "forward", None), "schema", None)
        if schema is None:
            return None
        args = [a for a in schema.arguments if a.name != "self"]
        names = [a.name for a in args]
        return names, [a.name for a in args if not a.kwarg_only], names
    kinds = inspect.Parameter
    params = list(sig.parameters.values())
    return (
        [p.name for p in params],
        [p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)],
        [p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)],
    )


def _by_name_module(inner, names: list[str]):
    """A module whose forward(*inputs) calls ``inner`` with them as keyword arguments (see
    ``by_name``); ``_export`` gives the dynamo exporter its dynamic shapes as those of one
    ``*args`` parameter."""
    module: Any = _torch().nn.Module  # (torch is imported at run time only)

    class ByName(module):
        by_name = tuple(names)

        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(self.by_name, args)))

    return ByName()


def _flatten(out) -> list:
    torch = _torch()
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        flat = []
        for o in out:
            flat.extend(_flatten(o))
        return flat
    raise ConversionError(
        f"the model returned {type(out).__name__}; it must return tensors (a tensor, or a tuple, list or dict of them)"
    )


def reference(module, specs: list[InputSpec]):
    torch = _torch()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in specs]
        with torch.no_grad():
            return [t.detach().cpu().numpy() for t in _flatten(module(*args))]

    return run


def output_names(module, specs: list[InputSpec], given: list[str]) -> list[str]:
    """The names given, or ``output`` / ``output0..n``; their number checked against what the
    model returns for an example input."""
    torch = _torch()
    example = generate(specs, example_sizes(specs, 2), np.random.default_rng(0))
    try:
        args = [torch.from_numpy(np.ascontiguousarray(example[s.name])) for s in specs]
        with torch.no_grad():
            raw = module(*args)
        n = len(_flatten(raw))
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - most often the input specs do not fit the model
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in example.items())
        made_up = [s.name for s in specs if not s.values and (s.dtype.v2 == "BYTES" or s.dtype.np_dtype.kind in "iu")]
        hint = (
            f"; if {', '.join(made_up)} take(s) some values only (indices into a small embedding), give real "
            "rows with --samples: generated inputs are then drawn from their values"
            if made_up
            else ""
        )
        # Each -1 gets a size of its own: dimensions that must be equal (a sequence and its mask) need a name.
        unnamed = [f"{s.name}[{i}]" for s in specs for i, d in enumerate(s.dims) if d == -1]
        if len(unnamed) > 1:
            hint += (
                f"; the dimensions written -1 ({', '.join(unnamed)}) are given sizes of their own: give those "
                "that must be equal one name (e.g. ids:INT64:batch,seq and mask:FP32:batch,seq)"
            )
        raise ConversionError(
            f"the model does not accept inputs shaped like the specs ({shapes}): "
            f"{type(e).__name__}: {_first_line(e, 3)}{hint}"
        ) from None
    if given:
        if len(given) != n:
            raise ConversionError(f"the model returns {n} output(s); --output names {len(given)}")
        clash = sorted({g for g in given if given.count(g) > 1} | (set(given) & {s.name for s in specs}))
        if clash:
            raise ConversionError(f"--output names must differ from each other and from the inputs: {clash}")
        return list(given)
    # A dict of tensors names its outputs by its keys (when they can be tensor names).
    inputs = {s.name for s in specs}
    if isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values()):
        keys = [str(k) for k in raw]
        if all(TENSOR_NAME.fullmatch(k) for k in keys) and not inputs & set(keys):
            return keys
    names = ["output"] if n == 1 else [f"output{i}" for i in range(n)]
    taken = [o for o in names if o in inputs]
    if taken:  # (an input and an output of one name: the export renamed the input, and the model lost it)
        raise ConversionError(
            f"the model's outputs would be named {', '.join(names)}, and input(s) {', '.join(taken)} have "
            "that name: a name is one tensor's; name the outputs with --output"
        )
    return names


def output_signature(module, specs: list[InputSpec], names: list[str], batched: bool) -> list[dict]:
    """The outputs as a config would declare them, known before any export: the model is run at
    two sets of sizes, and a dimension that differs between them is dynamic (-1). The batch
    dimension is left out when batching (run() checks that it is one)."""
    runs = []
    for batch, step in ((2, 0), (3, 1)):
        feeds = generate(specs, example_sizes(specs, batch, step), np.random.default_rng(step))
        try:
            runs.append(reference(module, specs)(feeds))
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - the model's own failure, on inputs the specs allow
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise ConversionError(
                f"the model fails on inputs of shapes {shapes}: {type(e).__name__}: {_first_line(e, 3)}"
            ) from None
    out = []
    for name, a, b in zip(names, *runs):
        dt = BY_NUMPY.get(a.dtype)
        if a.ndim == b.ndim:
            dims = [x if x == y else -1 for x, y in zip(a.shape, b.shape)]
        else:
            dims = [-1] * a.ndim
        out.append({"name": name, "datatype": dt.v2 if dt else str(a.dtype), "dims": dims[1:] if batched else dims})
    return out


def export(
    module,
    scripted: bool,
    specs: list[InputSpec],
    outputs: list[str],
    batched: bool,
    exporter: str,
    opset: int | None,
    path: str,
) -> tuple[onnx.ModelProto, str, str]:
    """Export to ``path``; returns (model, exporter used, a note of what failed before)."""
    if exporter not in EXPORTERS:
        raise ConversionError(f"--exporter must be one of {', '.join(EXPORTERS)}")
    if scripted and exporter == "dynamo":
        raise ConversionError("the dynamo exporter cannot export a TorchScript module; use --exporter legacy")
    order = ["legacy"] if scripted else (["dynamo", "legacy"] if exporter == "auto" else [exporter])
    errors: list[str] = []
    for which in order:
        try:
            _export(module, which, specs, outputs, batched, opset, path)
            model = onnx.load(path)
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters raise many types; the text says why
            errors.append(f"{which} exporter: {type(e).__name__}: {_first_line(e, 6)}")
            continue
        written = default_opset(model)
        if opset and written != opset:  # the dynamo exporter writes at least its own opset, whatever is asked
            errors.append(f"{which} exporter: it wrote opset {written}, not the --opset {opset} asked for")
            continue
        return model, which, "; ".join(errors)
    older = order == ["dynamo"] and errors[-1].endswith("asked for")
    hint = " (the legacy exporter writes older opsets: --exporter legacy or auto)" if older else ""
    raise ConversionError("the model could not be exported to ONNX: " + "; ".join(errors) + hint)


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default (ai.onnx) operator set the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _dim_name(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _export(module, which: str, specs, outputs, batched, opset, path) -> None:
    torch = _torch()
    example = generate(specs, example_sizes(specs, 2), np.random.default_rng(0))
    args = tuple(torch.from_numpy(example[s.name]) for s in specs)
    names = [s.name for s in specs]
    kwargs: dict = {}
    if opset:
        kwargs["opset_version"] = opset
    if which == "dynamo":
        dims: dict[tuple, object] = {}
        taken: set[str] = set()
        shapes = []
        for s in specs:
            per = {}
            for i, d in enumerate(s.dims):
                if isinstance(d, str) or d == -1:
                    # a named dim is shared by name; an unnamed one belongs to its input alone
                    key = ("named", d) if isinstance(d, str) else ("unnamed", s.name, i)
                    if key not in dims:
                        label = _dim_name(d if isinstance(d, str) else f"{s.name}_{i}")
                        while label in taken:
                            label += "_"
                        taken.add(label)
                        dims[key] = torch.export.Dim(label)
                    per[i] = dims[key]
            shapes.append(per or None)
        # Names are set afterwards: the dynamo exporter names inner values after the modules that
        # make them, and an output named like one (say "embedding") would clash.
        dynamic: tuple = tuple(shapes)
        if getattr(module, "by_name", None) is not None:  # forward(*args): one parameter
            dynamic = (dynamic,)
        kwargs.update(dynamo=True, dynamic_shapes=dynamic)
    else:
        axes = {
            s.name: {
                i: (d if isinstance(d, str) else f"{s.name}__dim{i}")
                for i, d in enumerate(s.dims)
                if isinstance(d, str) or d == -1
            }
            for s in specs
        }
        if batched:
            for o in outputs:
                axes[o] = {0: BATCH}
        kwargs.update(
            dynamo=False, dynamic_axes={k: v for k, v in axes.items() if v}, input_names=names, output_names=outputs
        )
    sink = io.StringIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. "torchvision is not installed", once per process
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, path, **kwargs)
    finally:
        quiet.setLevel(level)
    if which == "dynamo":
        model = onnx.load(path)
        rename_values(model.graph, [i.name for i in model.graph.input], names)
        rename_values(model.graph, [o.name for o in model.graph.output], outputs)
        onnx.save(model, path)
    else:
        model = onnx.load(path)
        if restore_unused_inputs(model.graph, specs):
            onnx.save(model, path)


def restore_unused_inputs(graph, specs: list[InputSpec]) -> list[str]:
    """Put back the inputs the legacy exporter leaves out because the model does not read them
    (the dynamo exporter keeps them): the model takes every input its specs name, so callers
    send the same tensors whichever exporter wrote it. Returns the names put back."""
    have = {i.name: i for i in graph.input}
    missing = [s for s in specs if s.name not in have]
    if not missing:
        return []
    named = {s.name for s in specs}
    ordered = []
    for s in specs:
        if s.name in have:
            ordered.append(have[s.name])
            continue
        shape = [d if isinstance(d, str) else (d if d > 0 else f"{s.name}__dim{i}") for i, d in enumerate(s.dims)]
        elem = onnx.helper.np_dtype_to_tensor_dtype(s.dtype.np_dtype)
        ordered.append(onnx.helper.make_tensor_value_info(s.name, elem, shape))
    rest = [i for i in graph.input if i.name not in named]
    del graph.input[:]
    graph.input.extend(ordered + rest)
    return [s.name for s in missing]
