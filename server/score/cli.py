"""``batchgate score``: a file scored through one model of a model repository, into numbered
part files and a manifest (see run.py); resumable, with rejects kept and counted."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

EXIT_OK, EXIT_REJECTS, EXIT_USAGE = 0, 1, 2


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score a Parquet, CSV, JSON Lines or .npy/.npz file through a model, into part files",
        description="Score every row of a file through one model of a model repository (only that model is "
        "loaded; the same backends and batcher as `batchgate serve`). The output folder gets numbered part "
        "files and manifest.json; a run restarted with the same arguments keeps the parts already written. "
        "Rows that fail their checks or the model go to the rejects file with the reason.",
    )
    p.add_argument("--model", required=True, help="the model to score with")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-repository", metavar="DIR", help="the Triton-layout model repository (loaded here)")
    where.add_argument("--target", metavar="HOST:PORT", help="a V2 server (batchgate, Triton) to score through")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="with --target (grpc)")
    p.add_argument("--token", default="", help="with --target: an API key, sent as Authorization: Bearer")
    p.add_argument("--tls", action="store_true", help="with --target: TLS (--tls-ca FILE: the CA to trust)")
    p.add_argument("--tls-ca", default="", metavar="FILE", help="the CA certificate the server's is signed by")
    p.add_argument("--input", required=True, metavar="FILE", help=".parquet, .csv, .jsonl, .npy or .npz")
    p.add_argument("--output", required=True, metavar="DIR", help="the folder for the parts and the manifest")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="the parts' format (parquet)")
    p.add_argument(
        "--columns",
        action="append",
        default=[],
        metavar="INPUT=COL,...",
        help="columns stacked into a model input, in order (repeatable); default: the column named after each "
        "input, or for a one-input model every numeric column but --keep's",
    )
    p.add_argument("--keep", default="", metavar="COL,...", help="input columns carried into the output (ids, keys)")
    p.add_argument("--batch-size", type=int, default=4096, metavar="ROWS", help="rows per chunk and part (4096)")
    p.add_argument("--concurrency", type=int, default=2, metavar="N", help="chunks scored at once (2)")
    p.add_argument("--allow-nan", action="store_true", help="score rows holding NaN or infinity")
    p.add_argument("--rejects", default="", metavar="FILE", help="JSON lines of rejected rows (OUTPUT/rejects.jsonl)")
    p.add_argument(
        "--max-rejects", type=int, default=0, metavar="N", help="exit 1 past this many rejected rows (0: any number)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (the summary still goes to stderr)")


def main(args: argparse.Namespace) -> int:
    from .tables import ScoreError

    if args.batch_size < 1 or args.concurrency < 1 or args.max_rejects < 0:
        print(
            "batchgate score: --batch-size and --concurrency must be at least 1, --max-rejects 0 or more",
            file=sys.stderr,
        )
        return EXIT_USAGE
    for path, what in ((args.input, "--input"), (args.model_repository, "--model-repository")):
        if path and not os.path.exists(path):
            print(f"batchgate score: {what} {path} does not exist", file=sys.stderr)
            return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("batchgate").setLevel(logging.ERROR)  # (a server's notices, such as open access, do not apply)
    try:
        counts = asyncio.run(_score(args))
    except ScoreError as e:
        print(f"batchgate score: {e}", file=sys.stderr)
        return EXIT_USAGE
    rejects = counts.rejected + counts.failed
    print(
        f"batchgate score: {counts.input} rows: {counts.scored} scored, {counts.rejected} rejected by their "
        f"checks, {counts.failed} failed by the model; {counts.parts} parts in {args.output}"
        + (f" ({counts.skipped_parts} kept from an earlier run)" if counts.skipped_parts else ""),
        file=sys.stderr,
    )
    if counts.scored + rejects != counts.input:  # pragma: no cover - every row is counted once
        return EXIT_REJECTS
    if args.max_rejects and rejects > args.max_rejects:
        print(f"batchgate score: {rejects} rows rejected, more than --max-rejects {args.max_rejects}", file=sys.stderr)
        return EXIT_REJECTS
    return EXIT_OK


async def _score(args: argparse.Namespace):
    from .run import Job, LocalModel, run

    if args.target:
        from .run import RemoteTarget

        model: Any = await RemoteTarget.open(args.target, args.protocol, args.model, args.token, args.tls, args.tls_ca)
    else:
        model = await LocalModel.open(args.model_repository, args.model)
    try:
        job = Job(
            model,
            args.input,
            args.output,
            fmt=args.format,
            columns=tuple(args.columns),
            keep=tuple(c.strip() for c in args.keep.split(",") if c.strip()),
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            allow_nan=args.allow_nan,
            rejects=args.rejects,
        )
        if args.quiet or not sys.stderr.isatty():
            return await run(job)
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        total = _rows(args.input)
        with Progress(
            TextColumn("scoring"),
            BarColumn(),
            TextColumn("{task.completed:,} rows"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task("score", total=total, rate="")

            def advance(rows: int) -> None:
                bar.advance(task, rows)
                speed = bar.tasks[0].speed
                bar.update(task, rate=f"{speed:,.0f} rows/s" if speed else "")

            job.progress = advance
            return await run(job)
    finally:
        await model.close()


def _rows(path: str) -> int | None:
    """The input's row count when the file says it cheaply (Parquet metadata, .npy header)."""
    if path.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.endswith(".npy"):
        import numpy as np

        return int(np.load(path, mmap_mode="r").shape[0])
    return None
