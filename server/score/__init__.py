"""Batch scoring (``batchgate score``): files scored through the models and backends batchgate
serves; and :func:`score_batches`, the same for batches a data engine hands over (Spark's
``mapInPandas``, Ray Data's ``map_batches``)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["Scorer", "score_batches"]

ERROR_COLUMN = "batchgate_error"


class Scorer:
    """One model, loaded once (a local repository) or reached once (a server), scoring batches
    synchronously: the model's event loop runs on a thread of its own. Batches are pandas
    DataFrames or pyarrow RecordBatches / Tables; the answer is of the same kind: the ``keep``
    columns, one column per output, and ``batchgate_error`` (null for a scored row; for a row
    that failed its checks or the model, the reason, its outputs null). Through a server
    (``target``): ``tls`` (the system's CAs, or ``tls_ca``), ``tls_cert``/``tls_key`` for mTLS;
    a server that stays unreachable or refuses the key raises ``TargetError``."""

    def __init__(
        self,
        model: str,
        *,
        model_repository: str | None = None,
        target: str | None = None,
        protocol: str = "grpc",
        token: str = "",
        tls: bool = False,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        columns: Iterable[str] = (),
        keep: Iterable[str] = (),
        allow_nan: bool = False,
    ):
        if (model_repository is None) == (target is None):
            raise ValueError("give model_repository or target, one of them")
        self.columns, self.keep, self.allow_nan = tuple(columns), tuple(keep), allow_nan
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="batchgate-score", daemon=True)
        self._thread.start()
        from .remote import RemoteTarget, Tls
        from .run import LocalModel

        secure = Tls(tls_ca, tls_cert, tls_key) if tls or tls_ca or tls_cert else None
        opening = (
            LocalModel.open(model_repository, model)
            if model_repository is not None
            else RemoteTarget.open(target or "", protocol, model, token, secure)
        )
        try:
            self.model = self._run(opening)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._mapping = None

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def score(self, batch: Any) -> Any:
        import pyarrow as pa

        from .run import score_table

        pandas = not isinstance(batch, (pa.RecordBatch, pa.Table))
        if pandas:
            rb = pa.RecordBatch.from_pandas(batch, preserve_index=False)
        elif isinstance(batch, pa.Table):
            empty = pa.RecordBatch.from_pylist([], schema=batch.schema)  # (its columns, no row)
            rb = batch.combine_chunks().to_batches()[0] if batch.num_rows else empty
        else:
            rb = batch
        table, self._mapping = self._run(
            score_table(self.model, rb, self.columns, self.keep, self.allow_nan, self._mapping, ERROR_COLUMN)
        )
        return table.to_pandas() if pandas else table

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.model.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_open: dict[tuple, Scorer] = {}
_lock = threading.Lock()


def score_batches(model: str, batches: Iterable[Any], **kw: Any) -> Iterator[Any]:
    """Score each batch of ``batches`` (see :class:`Scorer` for the arguments and the answer).
    The model is loaded once per process and kept for the next call with the same arguments
    (a Spark executor or a Ray worker scores many partitions with one copy)."""
    key = (model, *sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in kw.items()))
    with _lock:
        scorer = _open.get(key)
        if scorer is None:
            scorer = _open[key] = Scorer(model, **kw)
    for batch in batches:
        yield scorer.score(batch)


@atexit.register
def _close_all() -> None:
    for s in list(_open.values()):
        with contextlib.suppress(Exception):  # the process is ending
            s.close()
