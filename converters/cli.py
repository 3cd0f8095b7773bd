"""``batchgate convert torch|sklearn``: the command line of the converters."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from . import (
    DEFAULT_FP16_TOLERANCE,
    DEFAULT_TOLERANCE,
    ConversionError,
    Result,
    Tolerance,
)


def add_parser(sub) -> None:
    conv = sub.add_parser(
        "convert",
        help="convert a PyTorch or scikit-learn model into a verified model repository entry",
        description="Export a model to ONNX, check that it computes what the original does "
        "(ONNX Runtime against the original, on generated inputs at several batch "
        "sizes and on --samples), and write MODEL/VERSION/model.onnx and "
        "MODEL/config.pbtxt into the repository. Nothing is written if a check fails. "
        "A version added to a model that has a config.pbtxt and other versions must fit that config "
        "(the same inputs, outputs, max_batch_size and instance kind); the config is never rewritten "
        "then, and a version that does not fit is refused before the export.",
    )
    kinds = conv.add_subparsers(dest="kind", required=True)
    t = kinds.add_parser("torch", help="a PyTorch nn.Module (module:factory) or TorchScript file")
    _common(t, "pkg.module:factory (an nn.Module, its class, or a function returning one) or a TorchScript file")
    t.add_argument(
        "--output",
        action="append",
        default=[],
        help="output name, in the order the model returns them (repeatable; default output, or output0, output1, ...)",
    )
    t.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "legacy"),
        default="auto",
        help="torch.onnx.export's exporter (auto: dynamo, then legacy if dynamo fails)",
    )
    s = kinds.add_parser(
        "sklearn",
        help="a scikit-learn estimator or pipeline saved with joblib or pickle (loading a pickle runs its code: "
        "convert only files you trust)",
    )
    _common(s, "a .pkl or .joblib file")


def _common(p, model_help: str) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="NAME:DTYPE:SHAPE",
        help="an input, e.g. x:FP32:-1,3,224,224 or ids:INT64:batch,seq (repeatable). The first "
        "dimension is the batch dimension; -1 or a name marks a dynamic dimension",
    )
    p.add_argument("--repository", required=True, help="model repository to write into")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument(
        "--version",
        type=int,
        default=1,
        help="version folder to write (default: %(default)s). A new version of an existing model must fit "
        "the config.pbtxt its other versions share",
    )
    p.add_argument("--no-batch", action="store_true", help="no batch dimension (max_batch_size 0)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        metavar="N",
        help="max_batch_size in the config: the largest batch (size of the first dimension) a request may "
        "send and the server runs at once; the parity check tries batches 1, 2 and 5 up to it (default: "
        "%(default)s; not used with --no-batch). A version added to an existing model must ask for the "
        "value its config has",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the converter's)")
    p.add_argument("--samples", help=".npz of real inputs (one array per input name) for the parity check")
    p.add_argument("--atol", type=float, default=DEFAULT_TOLERANCE.atol)
    p.add_argument("--rtol", type=float, default=DEFAULT_TOLERANCE.rtol)
    p.add_argument(
        "--optimize", action="store_true", help="save ONNX Runtime's graph optimizations into the model (checked again)"
    )
    p.add_argument("--optimize-atol", type=float)
    p.add_argument("--optimize-rtol", type=float)
    p.add_argument(
        "--fp16",
        action="store_true",
        help="convert weights and arithmetic to FP16 for GPU serving, "
        "inputs and outputs unchanged (checked again; implies --gpu; default: off)",
    )
    p.add_argument("--fp16-atol", type=float, default=DEFAULT_FP16_TOLERANCE.atol)
    p.add_argument("--fp16-rtol", type=float, default=DEFAULT_FP16_TOLERANCE.rtol)
    p.add_argument(
        "--gpu",
        action="store_true",
        help="instance_group kind KIND_GPU in the config: the server runs the model with ONNX Runtime's CUDA "
        "provider (on the CPU, with a warning, where CUDA is missing). Default: off, KIND_CPU. A version added "
        "to an existing model must ask for the kind its config has",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing version (with its config.pbtxt when it is the model's only version; "
        "a version beside others must fit their config)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")


def _say(msg: str) -> None:
    print(f"batchgate convert: {msg}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    from . import convert_sklearn, convert_torch

    common = dict(
        batched=not args.no_batch,
        max_batch_size=args.max_batch_size,
        opset=args.opset,
        samples=args.samples,
        tolerance=Tolerance(args.atol, args.rtol),
        optimize=Tolerance(
            args.optimize_atol if args.optimize_atol is not None else args.atol,
            args.optimize_rtol if args.optimize_rtol is not None else args.rtol,
        )
        if args.optimize
        else None,
        fp16=Tolerance(args.fp16_atol, args.fp16_rtol) if args.fp16 else None,
        gpu=args.gpu,
        force=args.force,
        progress=_say,
    )
    try:
        # What the model or the exporters print goes to stderr: stdout holds the summary alone
        # (a model's print had come before the JSON of --json)
        with contextlib.redirect_stdout(sys.stderr):
            if args.kind == "torch":
                result = convert_torch(
                    args.model,
                    args.input,
                    args.repository,
                    args.name,
                    args.version,
                    outputs=args.output,
                    exporter=args.exporter,
                    **common,
                )
            else:
                result = convert_sklearn(args.model, args.input, args.repository, args.name, args.version, **common)
    except ConversionError as e:
        failed = getattr(e, "result", None)
        if failed is not None:
            print(failed_json(failed) if args.json else table(failed))
        print(f"batchgate convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file the conversion reads or writes; no traceback for it
        print(f"batchgate convert: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:  # most often an input dimension mistyped: its generated inputs do not fit
        print(
            f"batchgate convert: error: out of memory ({e or 'MemoryError'}); are the --input sizes right? "
            "Nothing was written",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(result.as_dict(), indent=2, default=str) if args.json else table(result))
    return 0


def failed_json(result: Result) -> str:
    return json.dumps(result.as_dict(), indent=2, default=str)


def table(r: Result) -> str:
    lines = [
        f"model      {r.name} version {r.version} -> {r.path}" + ("" if r.written else "  (NOT written)"),
        f"source     {r.source}",
        f"batching   max_batch_size {r.max_batch_size}" + (" (dynamic_batching on)" if r.max_batch_size else ""),
        f"config     {r.config if r.written or r.config != 'written' else 'not written'}",
        f"stages     {' -> '.join(r.stages)}",
        "",
        f"{'tensor':24} {'kind':7} {'datatype':9} dims",
    ]
    for kind, ts in (("input", r.inputs), ("output", r.outputs)):
        for t in ts:
            lines.append(f"{t['name']:24} {kind:7} {t['datatype']:9} {t['dims']}")
    lines += [
        "",
        f"{'parity check':12} {'output':20} {'cases':>5} {'max abs err':>12} {'max rel err':>12} "
        f"{'atol':>8} {'rtol':>8}  result",
    ]
    for c in r.checks:
        lines.append(
            f"{c.stage:12} {c.output:20} {c.cases:>5} {c.max_abs:>12.3g} {c.max_rel:>12.3g} {c.atol:>8g} "
            f"{c.rtol:>8g}  {'ok' if c.ok else f'FAIL ({c.mismatches} elements)'}"
        )
    return "\n".join(lines)
