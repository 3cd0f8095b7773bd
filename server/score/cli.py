"""``batchgate score``: a file scored through one model of a model repository, into numbered
part files and a manifest (see run.py); resumable, with rejects kept and counted."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import zipfile
from typing import Any

EXIT_OK, EXIT_REJECTS, EXIT_USAGE, EXIT_TARGET, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


class Terminated(Exception):
    """SIGTERM (a job scheduler, Kubernetes, docker stop): the run stopped as for Ctrl-C."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score a Parquet, CSV, JSON Lines or .npy/.npz file through a model, into part files",
        description="Score every row of a file through one model of a model repository (only that model is "
        "loaded; the same backends and batcher as `batchgate serve`). The output folder gets numbered part "
        "files (read as one dataset: the bookkeeping, _manifest.json and _rejects*.jsonl, is skipped by readers); "
        "a run restarted with the same arguments keeps the parts already written. "
        "Rows that fail their checks or the model go to the rejects file with the reason.",
    )
    p.add_argument("--model", required=True, help="the model to score with")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-repository", metavar="DIR", help="the Triton-layout model repository (loaded here)")
    where.add_argument("--target", metavar="HOST:PORT", help="a V2 server (batchgate, Triton) to score through")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="with --target (grpc)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--token", default="", help="with --target: an API key, sent as Authorization: Bearer")
    key.add_argument(
        "--token-file",
        default="",
        metavar="FILE",
        help="with --target: a file holding the API key (kept off the command line, where other users see it)",
    )
    p.add_argument("--tls", action="store_true", help="with --target: TLS (the system's CAs unless --tls-ca)")
    p.add_argument("--tls-ca", default="", metavar="FILE", help="the CA certificate the server's is signed by")
    p.add_argument("--tls-cert", default="", metavar="FILE", help="a client certificate, for a server asking one")
    p.add_argument("--tls-key", default="", metavar="FILE", help="the private key of --tls-cert")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="with --target: seconds to wait for one request's answer before sending it again (300)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=8,
        metavar="N",
        help="with --target: times a request is sent again after an overloaded answer (8); the server's "
        "Retry-After is waited, else 50 ms doubling to 2 s",
    )
    p.add_argument(
        "--input", required=True, metavar="FILE", help=".parquet, .csv, .jsonl, .npy or .npz; .csv.gz and .jsonl.gz too"
    )
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
    p.add_argument("--rejects", default="", metavar="FILE", help="JSON lines of rejected rows (OUTPUT/_rejects.jsonl)")
    p.add_argument(
        "--max-rejects",
        type=int,
        default=0,
        metavar="N",
        help="stop (exit 1) as soon as more rows than this are rejected; the parts written are kept (0: any number)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (the summary still goes to stderr)")


def main(args: argparse.Namespace) -> int:
    try:  # (the score extra: pyarrow reads and writes the tables, rich draws the progress bar)
        import pyarrow  # noqa: F401
        import rich  # noqa: F401

        from .remote import TargetError
        from .run import TooManyRejects
        from .tables import ScoreError
    except ImportError as e:
        print(f"batchgate score: {e.name} is missing: pip install 'batchgate[score]'", file=sys.stderr)
        return EXIT_USAGE

    if (
        args.batch_size < 1
        or args.concurrency < 1
        or args.max_rejects < 0
        or args.max_retries < 0
        or not args.timeout > 0
    ):
        print(
            "batchgate score: --batch-size and --concurrency must be at least 1, --max-rejects and --max-retries "
            "0 or more, --timeout above 0",
            file=sys.stderr,
        )
        return EXIT_USAGE
    for path, what in ((args.input, "--input"), (args.model_repository, "--model-repository")):
        if path and not os.path.exists(path):
            print(f"batchgate score: {what} {path} does not exist", file=sys.stderr)
            return EXIT_USAGE
    from ..core.types import MODEL_NAME, MODEL_NAME_RULE, is_host_port, printable
    from .output import input_in_output, rejects_in_the_way

    problem = ""
    if not MODEL_NAME.fullmatch(args.model):  # (a path here loaded a model from outside the repository)
        problem = f"--model must be a model name ({MODEL_NAME_RULE}), not {printable(args.model[:128])!r}"
    elif args.target and not is_host_port(args.target):  # (a URL failed every call "Misformatted domain name")
        problem = f"--target must be HOST:PORT (no scheme), not {printable(args.target[:128])!r}"
    elif os.path.exists(args.output) and not os.path.isdir(args.output):
        problem = f"--output {args.output} is a file, not a folder"
    elif args.rejects and os.path.exists(args.rejects) and os.path.samefile(args.rejects, args.input):
        problem = f"--rejects {args.rejects} is the input file, which the rejects would replace"
    elif args.rejects and os.path.isdir(args.rejects):
        problem = f"--rejects {args.rejects} is a folder, not a file"
    elif (
        args.rejects
        and not _made_by_the_run(args.rejects, args.output)
        and not os.path.isdir(folder := os.path.dirname(os.path.abspath(args.rejects)))
    ):
        # (told before the run, not once every row is scored and the rejects are gathered)
        problem = f"--rejects {args.rejects}: its folder {folder} does not exist"
    elif args.rejects and not _made_by_the_run(args.rejects, args.output) and (why := _unwritable(args.rejects)):
        problem = f"--rejects {args.rejects}: cannot write there ({why})"
    else:  # (told before the model is loaded; run() checks it too)
        problem = input_in_output(args.input, args.output) or rejects_in_the_way(args.rejects, args.output)
    if problem:
        print(f"batchgate score: {problem}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("batchgate").setLevel(logging.ERROR)  # (a server's notices, such as open access, do not apply)
    if (args.tls or args.tls_ca or args.tls_cert) and not args.target:
        print("batchgate score: the --tls options go with --target", file=sys.stderr)
        return EXIT_USAGE
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                args.token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            print(f"batchgate score: --token-file {args.token_file} cannot be read: {e}", file=sys.stderr)
            return EXIT_USAGE
        if not args.token:
            print(f"batchgate score: --token-file {args.token_file} is empty", file=sys.stderr)
            return EXIT_USAGE
    try:
        counts = asyncio.run(_stoppable(args))
    except TargetError as e:
        print(f"batchgate score: {e}; the parts written are kept: run again to resume", file=sys.stderr)
        return EXIT_TARGET
    except ScoreError as e:
        print(f"batchgate score: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # an input that cannot be read, a file in the way
        print(f"batchgate score: {type(e).__name__}: {printable(str(e)[:300])}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("batchgate score: interrupted; the parts written are kept: run again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("batchgate score: stopped by SIGTERM; the parts written are kept: run again to resume", file=sys.stderr)
        return EXIT_TERMINATED
    except TooManyRejects as e:
        _summary(e.counts, args, "stopped after ")
        from .output import REJECTS

        rejects = args.rejects or os.path.join(args.output, REJECTS)
        print(
            f"batchgate score: stopped: {e} (see {rejects}); the parts written are kept: run again with a larger "
            "--max-rejects (0: any number) to resume",
            file=sys.stderr,
        )
        return EXIT_REJECTS
    _summary(counts, args)
    rejects = counts.rejected + counts.failed
    if counts.scored + rejects != counts.input:  # pragma: no cover - every row is counted once
        return EXIT_REJECTS
    return EXIT_OK


def _summary(counts: Any, args: argparse.Namespace, lead: str = "") -> None:
    print(
        f"batchgate score: {lead}{counts.input} rows: {counts.scored} scored, {counts.rejected} rejected by their "
        f"checks, {counts.failed} failed by the model; {counts.parts} parts in {args.output}"
        + (f" ({counts.skipped_parts} kept from an earlier run)" if counts.skipped_parts else ""),
        file=sys.stderr,
    )
    if counts.retried:
        print(
            f"batchgate score: the server was overloaded: {counts.retried} requests sent again after waiting "
            f"{counts.waited_s:.1f} s in all",
            file=sys.stderr,
        )


async def _stoppable(args: argparse.Namespace):
    """:func:`_score`, stopped on SIGTERM as on Ctrl-C: the task cancelled, so that the run
    records the parts written, removes those it had not, and closes the model. Without this,
    SIGTERM killed the process where it stood (exit 143, no message), leaving up to a second
    of recorded parts unsaved and unrecorded parts in the folder."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    stopped: list[bool] = []

    def stop() -> None:
        if not stopped and task is not None:  # (a second SIGTERM does not cut the cleanup short)
            stopped.append(True)
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
    except (NotImplementedError, RuntimeError):  # (Windows; not the main thread)
        return await _score(args)
    try:
        return await _score(args)
    except asyncio.CancelledError:
        if stopped:
            raise Terminated() from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _score(args: argparse.Namespace):
    from .run import Job, LocalModel, run

    if args.target:
        from .remote import RemoteTarget, Tls

        tls = Tls(args.tls_ca, args.tls_cert, args.tls_key) if args.tls or args.tls_ca or args.tls_cert else None
        model: Any = await RemoteTarget.open(
            args.target, args.protocol, args.model, args.token, tls, retries=args.max_retries, timeout_s=args.timeout
        )
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
            max_rejects=args.max_rejects,
        )
        if args.quiet or not sys.stderr.isatty():
            return _with_retries(await run(job), model)
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
            return _with_retries(await run(job), model)
    finally:
        await model.close()


def _made_by_the_run(rejects: str, output: str) -> bool:
    """Whether ``rejects`` is in the --output folder and that folder is yet to be made by the run
    (a first run's --rejects OUT/_bad.jsonl was refused, its folder not existing)."""
    folder = os.path.dirname(os.path.abspath(rejects))
    return folder == os.path.abspath(output) and not os.path.exists(output)


def _unwritable(path: str) -> str:
    """Why the rejects cannot be written where ``path`` says (empty when they can): the file they
    are written to first is made and removed, so that a folder that takes no new file (read-only,
    not ours) is told before the run rather than once every row is scored."""
    from .output import partial_path

    tmp = partial_path(path)
    try:
        with open(tmp, "wb"):
            pass
        os.remove(tmp)
    except OSError as e:
        return e.strerror or type(e).__name__
    return ""


def _with_retries(counts: Any, model: Any) -> Any:
    counts.retried, counts.waited_s = getattr(model, "retried", 0), getattr(model, "waited_s", 0.0)
    return counts


def _rows(path: str) -> int | None:
    """The input's row count when the file says it cheaply (Parquet metadata, .npy header)."""
    if path.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.endswith(".npy"):
        import numpy as np

        return int(np.load(path, mmap_mode="r").shape[0])
    return None
