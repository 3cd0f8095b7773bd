"""Batch scoring's engine: a file read in chunks, each chunk's rows checked, scored through the
model (the same builder, backends and batcher as ``batchgate serve``), and written as a part, in
input order, with at most ``concurrency`` chunks in flight (memory stays flat: a chunk is read
only when one is written). A chunk the backend fails is bisected down to the rows that fail;
those and the rows that failed their checks go to the rejects with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from ..core.batcher_config import BatcherConfig
from ..core.errors import ErrorCode, GatewayError
from ..core.signature import ModelSignature
from ..core.types import RequestLimits, Tensor, new_request
from .output import (
    MANIFEST,
    PART_DIGITS,
    REJECTS,
    Manifest,
    digest,
    encode,
    input_in_output,
    only_writer,
    output_columns,
    part_name,
    part_width,
    partial_path,
    py_values,
    reject_line,
    rejects_in_the_way,
    rejects_name,
    write_atomically,
)
from .remote import OFFLINE
from .tables import Mapping, Plan, ScoreError, prepare, read_batches

T = TypeVar("T")
LIMITS = RequestLimits(max_inputs=1024, max_outputs=1024, max_request_parameters=8)
LOCAL_RETRIES = 8  # a request a local model's queue refuses all the same is sent again, so many times
# a local model's queue refusing (full) or dropping (its queue timeout) a request: never the rows'
# fault (the scorer's requests carry no deadline of their own)
LOCAL_TRANSIENT = (ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.DEADLINE_EXCEEDED)
DEFAULT_ROOM = 1024  # requests at a local model at once when its queue has no bound


class LocalModel:
    """One model of a model repository, loaded alone (explicit mode, only that name)."""

    def __init__(self, gateway: Any, name: str):
        self.gateway, self.name = gateway, name
        self.served = gateway.repository.resolve(name, "")
        self.signature: ModelSignature = self.served.signature
        self.version = str(self.served.version)  # the version that scores (in the run's key: see run())
        # requests at the model at once: no more than its queue holds. The chunks' requests were all
        # sent together (a chunk of 4,096 rows is 512 requests of 8), and those past a bounded
        # queue (max_queue_size, a dynamic_batching queue policy's) were refused as an overload,
        # which the bisection took for the rows' own failure: healthy rows marked failed
        self._room: asyncio.Semaphore | None = None
        self.room = _queue_room(self.served.scheduler)

    @classmethod
    async def open(cls, repository: str, name: str) -> LocalModel:
        """The parts ``batchgate serve`` builds a model with (builder, inference threads, the
        repository's load), without its listeners (nor their imports: grpc, uvicorn)."""
        from concurrent.futures import ThreadPoolExecutor
        from types import SimpleNamespace

        from .. import cores
        from ..config import load_settings
        from ..monitoring.metrics import Metrics
        from ..repository.build import version_builder
        from ..repository.manager import ModelRepository
        from ..threads import InferenceThreads

        s = load_settings(
            flags={"model_repository": repository, "model_control_mode": "explicit", "load_model": [name]},
            environ={},
        )
        metrics = Metrics(triton=False)
        threads = InferenceThreads(max(4, cores.share()))
        pool = ThreadPoolExecutor(2, thread_name_prefix="batchgate-admin")
        builder = version_builder(s, threads, metrics)
        repository_ = ModelRepository(
            s.repository.model_repository, builder, pool, metrics, control_mode="explicit", load_models=(name,)
        )
        parts = SimpleNamespace(repository=repository_, threads=threads, pool=pool)
        try:
            await repository_.start()
        except GatewayError as e:
            await cls._close(parts)
            raise ScoreError(e.message) from None
        return cls(parts, name)

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sig = self.signature
        tensors = [Tensor(k, t.dtype.v2, tuple(feeds[k].shape), feeds[k]) for k, t in _inputs(sig, feeds)]
        if self._room is None:  # (made on the loop that scores)
            self._room = asyncio.Semaphore(self.room)
        wait = 0.05
        async with self._room:
            for attempt in range(LOCAL_RETRIES + 1):
                request = new_request(sig.name, "", tensors, None, "", None, OFFLINE, time.monotonic(), "score", LIMITS)
                try:
                    response = await self.served.submit(request)
                    break
                except GatewayError as e:  # a queue full or timed out all the same: wait, send again
                    if e.code not in LOCAL_TRANSIENT or attempt == LOCAL_RETRIES:
                        raise
                    await asyncio.sleep(min(e.retry_after_s or wait, 2.0))
                    wait = min(wait * 2, 2.0)
        return {t.name: np.asarray(t.data) for t in response.outputs}

    async def close(self) -> None:
        await self._close(self.gateway)

    @staticmethod
    async def _close(gateway: Any) -> None:
        await gateway.repository.stop()
        gateway.pool.shutdown(wait=False, cancel_futures=True)
        gateway.threads.shutdown()


def _queue_room(scheduler: Any) -> int:
    """The most requests a model's queue takes at once (its max_queue_size, or its default
    priority level's own bound when smaller); with a queue timeout that rejects, one per
    instance, none waiting: each request is a full batch already, so the queue adds no speed,
    and a request queued behind a whole chunk (a queue timeout of milliseconds, set for online
    latency) expired, 'failed by the model'."""
    bounds: list[int] = [scheduler.max_queue_size]
    cfg = getattr(scheduler, "config", None)
    if isinstance(cfg, BatcherConfig):
        policy = cfg.policy_of(cfg.default_priority_level if cfg.priority_levels else 0)
        bounds.append(policy.max_queue_size)
        if policy.timeout_s and not policy.delay:
            bounds.append(cfg.instances)
    return min((b for b in bounds if b > 0), default=DEFAULT_ROOM)


def _inputs(sig: ModelSignature, feeds: dict[str, np.ndarray]):
    return [(t.name, t) for t in sig.inputs if t.name in feeds]


@dataclass
class Counts:
    input: int = 0
    scored: int = 0
    rejected: int = 0
    failed: int = 0
    skipped_parts: int = 0
    parts: int = 0
    retried: int = 0  # through a server: requests sent again after an overloaded answer
    waited_s: float = 0.0


@dataclass
class Job:
    model: Any  # LocalModel (or anything with .signature and async .infer(feeds))
    input: str
    out_dir: str
    fmt: str = "parquet"
    columns: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    batch_size: int = 4096
    concurrency: int = 2
    allow_nan: bool = False
    rejects: str = ""
    max_rejects: int = 0  # the run stops once more rows than this are rejected or failed (0: any number)
    progress: Callable[[int], None] = lambda rows: None
    width: int = PART_DIGITS  # the digits of the parts' numbers (part_width: set by run)
    counts: Counts = field(default_factory=Counts)


class TooManyRejects(Exception):
    """More rows rejected or failed than ``Job.max_rejects``: the run stopped at the part that
    passed it (the parts recorded are kept, and a rerun with a larger limit resumes)."""

    def __init__(self, counts: Counts, limit: int):
        super().__init__(f"{counts.rejected + counts.failed} rows rejected, more than --max-rejects {limit}")
        self.counts, self.limit = counts, limit


async def run(job: Job) -> Counts:
    """Score the whole input; the counts of what happened to every row."""
    sig = job.model.signature
    problem = input_in_output(job.input, job.out_dir) or rejects_in_the_way(job.rejects, job.out_dir)
    if problem:
        raise ScoreError(problem)
    os.makedirs(job.out_dir, exist_ok=True)
    with only_writer(job.out_dir):
        return await _run(job, sig)


async def _run(job: Job, sig: ModelSignature) -> Counts:
    key = {
        "model": sig.name,
        "model_version": getattr(job.model, "version", ""),  # a version added since: the parts are scored again
        "input": os.path.abspath(job.input),
        "input_size": os.path.getsize(job.input),
        "input_mtime_ns": os.stat(job.input).st_mtime_ns,
        "format": job.fmt,
        "columns": list(job.columns),
        "keep": list(job.keep),
        "batch_size": job.batch_size,
        "allow_nan": job.allow_nan,
    }
    job.width = part_width(job.input, job.batch_size)
    manifest = Manifest(job.out_dir, key, job.width)
    job.counts.skipped_parts = manifest.resume()
    # (a folder without a manifest is not a scoring's: its files are left alone, and part files
    # there are refused rather than overwritten or read with this run's as one dataset)
    if not manifest.found and (foreign := _foreign_parts(job.out_dir)):
        raise ScoreError(
            f"--output {job.out_dir} holds part files that no manifest of batchgate score records "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}: another tool's output, or a run whose "
            f"{MANIFEST} was removed); this run would overwrite some of them and leave the others to be read with "
            "its rows: remove them, or give another --output"
        )
    if manifest.found:  # the folder then holds this run's parts only: another run's (other input, batch size...)
        _drop_unrecorded(job.out_dir, manifest)  # and parts not recorded are removed
    manifest.save()
    pending: list[asyncio.Task] = []
    try:
        await _scoring(job, sig, manifest, pending)
    except BaseException as e:  # a run stopped (the target gone, Ctrl-C, --max-rejects): the parts in flight
        for t in pending:  # are dropped, not recorded
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        manifest.save()  # what was recorded since the last save
        _drop_unrecorded(job.out_dir, manifest)
        if isinstance(e, TooManyRejects):  # the rows that stopped it, to read why
            _gather_rejects(job, manifest)
        raise
    manifest.done = True
    manifest.save()
    _gather_rejects(job, manifest)
    return job.counts


async def _scoring(job: Job, sig: ModelSignature, manifest: Manifest, pending: list[asyncio.Task]) -> None:
    plan = Plan(sig, job.columns, job.keep)  # the mapping, built from the file's first rows
    batches = read_batches(job.input, job.batch_size, plan)
    index = -1
    while True:  # the next chunk is read on a thread, while the model works on the others
        batch = await asyncio.to_thread(next, batches, None)
        if batch is None:
            break
        index += 1
        mapping = plan.mapping
        assert mapping is not None
        start = index * job.batch_size
        if index in manifest.parts:  # written and intact: not scored again
            _count(job.counts, manifest.parts[index])
            job.progress(batch.num_rows)
            _check_rejects(job)
        else:
            pending.append(asyncio.ensure_future(_part(job, sig, mapping, batch, index, start)))
            if len(pending) >= job.concurrency:
                _finish(job, manifest, await pending[0])
                pending.pop(0)
    while pending:
        _finish(job, manifest, await pending[0])
        pending.pop(0)


def _finish(job: Job, manifest: Manifest, part: dict[str, Any]) -> None:
    """Parts are recorded in input order (each is written when scored; the manifest says which)."""
    manifest.record(part)
    _count(job.counts, part)
    job.progress(part["input"])
    _check_rejects(job)


def _check_rejects(job: Job) -> None:
    """Judged after each part, in input order, so that an input whose rows are all bad stops at
    once rather than after the whole file has been read and scored."""
    if job.max_rejects and job.counts.rejected + job.counts.failed > job.max_rejects:
        raise TooManyRejects(job.counts, job.max_rejects)


def _count(c: Counts, part: dict[str, Any]) -> None:
    c.input += part["input"]
    c.scored += part["scored"]
    c.rejected += part["rejected"]
    c.failed += part["failed"]
    c.parts += 1


async def _part(
    job: Job, sig: ModelSignature, mapping: Mapping, batch: pa.RecordBatch, index: int, start: int
) -> dict[str, Any]:
    good, rejected, outputs, failed = await _checked_and_scored(job.model, sig, batch, mapping, job.allow_nan)
    rows = len(good)
    ok = np.array([i for i in range(rows) if i not in failed], dtype=np.int64)
    kept = pa.Table.from_batches([batch]).select(list(mapping.keep))
    keep = kept.take(pa.array(good[ok]))
    table = output_columns(keep, {k: v[ok] for k, v in outputs.items()}, job.fmt, _variable(sig))
    data = await asyncio.to_thread(encode, table, job.fmt)
    name = part_name(index, job.fmt, job.width)
    rejects = [(int(i), reason, "rejected") for i, reason in rejected]
    rejects += [(int(good[i]), reason, "failed") for i, reason in sorted(failed.items())]
    rejects.sort()
    lines = []
    held = {c: py_values(kept.column(c)) for c in mapping.keep} if rejects else {}
    for i, reason, kind in rejects:
        row = {"row": start + i, "outcome": kind, "reason": reason}
        row.update({c: held[c][i] for c in mapping.keep})
        lines.append(reject_line(row))
    reject_name = rejects_name(index, job.width)
    reject_data = ("\n".join(lines) + "\n" if lines else "").encode()
    write_atomically(os.path.join(job.out_dir, reject_name), reject_data)
    write_atomically(os.path.join(job.out_dir, name), data)
    return {
        "index": index,
        "file": name,
        "sha256": digest(data),
        "rejects_file": reject_name,
        "rejects_sha256": digest(reject_data),
        "input": batch.num_rows,
        "scored": int(len(ok)),
        "rejected": len(rejected),
        "failed": len(failed),
    }


async def score_table(
    model: Any,
    batch: pa.RecordBatch,
    columns: tuple[str, ...],
    keep: tuple[str, ...],
    allow_nan: bool,
    mapping: Mapping | None,
    error_column: str,
) -> tuple[pa.Table, Mapping]:
    """One batch scored for the Python API: every row kept, in order; the outputs as columns
    (null where the row was not scored) and ``error_column`` with the reason (null when scored)."""
    sig = model.signature
    mapping = mapping or Mapping.build(sig, batch.schema, columns, keep)
    if error_column in mapping.keep:
        raise ScoreError(f"the kept column '{error_column}' has the name of the column of the reasons; do not keep it")
    good, rejected, outputs, failed = await _checked_and_scored(model, sig, batch, mapping, allow_nan)
    n = batch.num_rows
    errors: list[str | None] = [None] * n
    for i, reason in rejected:
        errors[i] = reason
    for j, reason in failed.items():
        errors[int(good[j])] = reason
    scored = np.zeros(n, bool)
    scored[good] = True
    for j in failed:
        scored[int(good[j])] = False
    full = {}
    for name, arr in outputs.items():
        spread = (
            np.empty((n, *arr.shape[1:]), object) if arr.dtype.kind == "O" else np.zeros((n, *arr.shape[1:]), arr.dtype)
        )
        spread[good] = arr
        full[name] = spread
    keep_table = pa.Table.from_batches([batch]).select(list(mapping.keep))
    table = output_columns(keep_table, full, "parquet", _variable(sig))
    mask = pa.array(~scored)
    for name in full:
        col = table.column(name).combine_chunks()
        table = table.set_column(table.schema.get_field_index(name), name, _masked(col, mask))
    return table.append_column(error_column, pa.array(errors, pa.string())), mapping


async def _checked_and_scored(
    model: Any, sig: ModelSignature, batch: pa.RecordBatch, mapping: Mapping, allow_nan: bool
) -> tuple[np.ndarray, list[tuple[int, str]], dict[str, np.ndarray], dict[int, str]]:
    """The batch's rows checked and scored: the positions of the rows that passed their checks
    (in order), the rejected ones with the reason, the outputs of the passed rows, and which of
    those (indices into the positions) the model failed. Rows whose list values differ in length
    where an input has a variable dimension are scored in groups of one length (a request is one
    tensor), when the model's outputs have fixed shapes so that the groups' answers stack."""
    groups = _length_groups(batch, sig, mapping)
    if groups is None:
        prepared = await asyncio.to_thread(prepare, batch, sig, mapping, allow_nan)
        outputs, failed = await _score(model, sig, prepared.feeds, len(prepared.good))
        return prepared.good, prepared.rejects, outputs, failed
    goods, rejected, answers, failures, offset = [], [], [], {}, 0
    for rows in groups:
        prepared = await asyncio.to_thread(prepare, batch.take(pa.array(rows)), sig, mapping, allow_nan)
        outputs, failed = await _score(model, sig, prepared.feeds, len(prepared.good))
        goods.append(rows[prepared.good])
        rejected += [(int(rows[i]), reason) for i, reason in prepared.rejects]
        answers.append(outputs)
        failures.update({offset + j: reason for j, reason in failed.items()})
        offset += len(prepared.good)
    good = np.concatenate(goods)
    order = np.argsort(good, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    merged = {k: np.concatenate([a[k] for a in answers])[order] for k in answers[0]}
    return good[order], sorted(rejected), merged, {int(rank[j]): reason for j, reason in failures.items()}


def _length_groups(batch: pa.RecordBatch, sig: ModelSignature, mapping: Mapping) -> list[np.ndarray] | None:
    """The batch's row positions by the lengths of the list columns that feed an input of a
    variable dimension, when they differ and every output's shape is fixed; else None."""
    import pyarrow.compute as pc

    if any(d <= 0 for t in sig.outputs for d in t.dims):
        return None  # (answers of different shapes would not stack: tables.py rejects the odd rows)
    lengths = []
    for spec in sig.inputs:
        cols = mapping.sources.get(spec.name, ())
        dims = spec.dims if sig.max_batch_size > 0 or not spec.dims or spec.dims[0] != -1 else spec.dims[1:]
        if len(cols) != 1 or all(d > 0 for d in dims):
            continue
        col = batch.column(batch.schema.get_field_index(cols[0]))
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lengths.append(pc.list_value_length(col).fill_null(-1).to_numpy(zero_copy_only=False))
    if not lengths:
        return None
    keys, inverse = np.unique(np.stack(lengths, axis=1), axis=0, return_inverse=True)
    if len(keys) == 1:
        return None
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == g) for g in range(len(keys))]


def _variable(sig: ModelSignature) -> frozenset[str]:
    """The outputs with a variable dimension (besides the batch)."""
    return frozenset(t.name for t in sig.outputs if any(d <= 0 for d in t.dims))


def _masked(col: pa.Array, mask: pa.Array) -> pa.Array:
    """``col`` with nulls where ``mask`` is true. A (nested) fixed-size list is null at the row
    alone: if_else made its values null too, and pandas then read every row's values of an
    integer output as floats (2**53 + 1 came back as 2**53), also the rows scored."""
    import pyarrow.compute as pc

    if pa.types.is_fixed_size_list(col.type):
        size = col.type.list_size
        values = col.values.slice(col.offset * size, len(col) * size)
        nulls = pc.or_(mask, col.is_null())
        return pa.FixedSizeListArray.from_arrays(values, type=col.type, mask=nulls)
    return pc.if_else(mask, pa.scalar(None, col.type), col)


async def _score(
    model: Any, sig: ModelSignature, feeds: dict[str, np.ndarray], rows: int
) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Every row's outputs (rows that failed: zeros in their place) and the failed rows' reasons.
    Requests carry at most the model's max_batch_size rows (one row each for a model that does
    not batch); a request the backend fails is split in halves down to the failing rows."""
    if rows == 0:
        return _unanswered(sig, {}, 0), {}
    step = sig.max_batch_size if sig.max_batch_size > 0 else 1
    spans = [(s, min(rows, s + step)) for s in range(0, rows, step)]
    results = await _all([_bisect(model, sig, feeds, a, b) for a, b in spans])
    failed: dict[int, str] = {}
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for got, bad in results:
        failed.update(bad)
        for _, out in got:
            for k, v in out.items():
                shapes.setdefault(k, (v.shape[1:], v.dtype))
    merged: dict[str, np.ndarray] = {}
    for k, (shape, dtype) in shapes.items():
        merged[k] = np.empty((rows, *shape), object) if dtype.kind == "O" else np.zeros((rows, *shape), dtype=dtype)
    for got, _ in results:
        for (a, b), out in got:
            for k, v in out.items():
                merged[k][a:b] = v
    return _unanswered(sig, merged, rows), failed


def _unanswered(sig: ModelSignature, merged: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``merged`` with the outputs no request answered (no row to score, or every one failed)
    shaped as the signature declares, so that every part has every output column."""
    for t in sig.outputs:
        if t.name not in merged:
            shape = (rows, *[max(d, 0) for d in t.dims])
            merged[t.name] = (
                np.empty(shape, object) if t.dtype.np_dtype == np.object_ else np.zeros(shape, t.dtype.np_dtype)
            )
    return merged


async def _bisect(
    model: Any, sig: ModelSignature, feeds: dict[str, np.ndarray], a: int, b: int
) -> tuple[list[tuple[tuple[int, int], dict[str, np.ndarray]]], dict[int, str]]:
    try:
        part = {k: v[a:b] if sig.max_batch_size > 0 else v[a] for k, v in feeds.items()}
        out = await model.infer(part)
        if sig.max_batch_size <= 0:
            out = {k: v[np.newaxis] for k, v in out.items()}
        wrong = next((k for k, v in out.items() if v.ndim == 0 or v.shape[0] != b - a), None)
        if wrong is not None:  # a model that answers for other rows than it was asked: split as for a failure
            raise GatewayError(
                ErrorCode.INTERNAL, f"output '{wrong}' has {out[wrong].shape[:1]} rows for {b - a} rows asked"
            )
        return [((a, b), out)], {}
    except GatewayError as e:
        if b - a == 1:
            return [], {a: e.message[:512]}
        mid = (a + b) // 2
        left, right = await _all([_bisect(model, sig, feeds, a, mid), _bisect(model, sig, feeds, mid, b)])
        return left[0] + right[0], {**left[1], **right[1]}


async def _all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result, in order; when one raises (the target gone: a TargetError), the others are
    cancelled rather than left calling a server the run has stopped using."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


PART_FILE = re.compile(r"part-\d{5,}\.(?:parquet|csv)")


def _foreign_parts(out_dir: str) -> list[str]:
    """The files of ``out_dir`` named as this command names its parts, sorted."""
    return sorted(name for name in os.listdir(out_dir) if PART_FILE.fullmatch(name))


def _drop_unrecorded(out_dir: str, manifest: Manifest) -> None:
    """Parts (and their rejects, and files half-written by a run killed) that the manifest does not
    record: a stopped run's (a rerun writes them again), or another run's."""
    recorded = {p[k] for p in manifest.parts.values() for k in ("file", "rejects_file") if k in p}
    for name in os.listdir(out_dir):
        # (also an earlier version's names: rejects-NNNNN.jsonl, NAME.partial)
        if re.fullmatch(r"\.?(?:part-\d{5,}\.(?:parquet|csv)|_?rejects-\d{5,}\.jsonl)(?:\.partial)?", name) and (
            name not in recorded
        ):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, name))


def _gather_rejects(job: Job, manifest: Manifest) -> None:
    """The parts' rejects, in input order, into one file (--rejects, else _rejects.jsonl)."""
    path = job.rejects or os.path.join(job.out_dir, REJECTS)
    with open(partial_path(path), "wb") as out:
        for i in sorted(manifest.parts):
            name = manifest.parts[i].get("rejects_file")
            if name:
                with open(os.path.join(job.out_dir, name), "rb") as f:
                    out.write(f.read())
    os.replace(partial_path(path), path)
