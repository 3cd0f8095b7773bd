"""The README's two data-engine examples, run for real: Spark's ``mapInPandas`` (local mode, a
JVM: skipped where no ``java`` is on the PATH) and Ray Data's ``map_batches`` (a local Ray
cluster), each scoring through :func:`batchgate.score.score_batches` and checked row by row
against ONNX Runtime."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgate.demo import _save, classifier_model

pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
COLUMNS = ["features=amount,age,balance,hour"]
N = 1000


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("engine_models"))
    _save(classifier_model(), root, "fraud", config="max_batch_size: 64\n")
    return root


def _transactions() -> pd.DataFrame:
    x = np.random.default_rng(3).random((N, 4), dtype=np.float32) * 0.5
    names = ("amount", "age", "balance", "hour")
    frame = pd.DataFrame({"id": np.arange(N), **{c: x[:, i] for i, c in enumerate(names)}})
    frame.loc[7, "age"] = np.nan  # one row the checks refuse: kept, with its reason
    return frame


def _check(repo: str, frame: pd.DataFrame, got: pd.DataFrame) -> None:
    got = got.sort_values("id").reset_index(drop=True)
    assert list(got["id"]) == list(range(N))
    assert "missing value" in got.loc[7, "batchgate_error"] and got.loc[7, "probabilities"] is None
    ok = got.drop(index=7)
    assert ok["batchgate_error"].isna().all()
    x = frame.drop(index=7)[["amount", "age", "balance", "hour"]].to_numpy(np.float32)
    sess = ort.InferenceSession(os.path.join(repo, "fraud", "1", "model.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(np.stack([np.asarray(p, np.float32) for p in ok["probabilities"]]), want, rtol=1e-5)


@pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a JVM: no java on the PATH")
def test_spark_map_in_pandas_example(repo, monkeypatch):
    from pyspark.sql import SparkSession

    from batchgate.score import score_batches

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("batchgate-score-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    try:
        frame = _transactions()
        df = spark.createDataFrame(frame).repartition(3)
        out = df.mapInPandas(
            lambda frames: score_batches("fraud", frames, model_repository=repo, columns=COLUMNS, keep=["id"]),
            schema="id long, probabilities array<float>, batchgate_error string",
        )
        _check(repo, frame, out.toPandas())
    finally:
        spark.stop()
        _stop_jvm()


def _stop_jvm() -> None:
    """Spark's JVM outlives ``spark.stop()``; the rest of the suite does not need its memory."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is not None:
        proc = getattr(gateway, "proc", None)
        gateway.shutdown()
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        SparkContext._gateway = SparkContext._jvm = None


def test_ray_data_map_batches_example_through_a_server(repo, tmp_path):
    import ray

    from batchgate.score import score_batches
    from processes import Proc, serve_args

    frame = _transactions()
    src = str(tmp_path / "transactions.parquet")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), src, row_group_size=300)
    server = Proc(serve_args(repo))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2)
    try:
        server.wait_ready()
        target = server.grpc
        ds = ray.data.read_parquet(src)
        scored = ds.map_batches(
            lambda batch: next(score_batches("fraud", [batch], target=target, columns=COLUMNS, keep=["id"])),
            batch_format="pyarrow",
        )
        got = pa.concat_tables(ray.get(scored.to_arrow_refs())).to_pandas()
    finally:
        ray.shutdown()
        server.kill()
    _check(repo, frame, got)
