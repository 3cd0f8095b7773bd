"""The Python API of batch scoring (what a Spark ``mapInPandas`` or a Ray Data ``map_batches``
calls): pandas and pyarrow batches in, the same kind out, every row kept in order with its
outputs or the reason it was not scored; the model loaded once per process."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pytest
from onnx import TensorProto

import batchgate.score as score_api
from batchgate.demo import _save, classifier_model, identity_model
from route_support import failing_classifier


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("api_models"))
    _save(classifier_model(), root, "clf", config="max_batch_size: 16\n")
    _save(failing_classifier(), root, "clf_bad", config="max_batch_size: 16\n")
    _save(identity_model("ids", TensorProto.INT64, ("batch", 2)), root, "ids", config="max_batch_size: 16\n")
    return root


def _want(repo: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(f"{repo}/clf/1/model.onnx", providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_pandas_batches_in_pandas_out_every_row_kept(repo):
    rng = np.random.default_rng(0)
    frames = []
    for k in range(3):
        x = rng.random((50, 4), dtype=np.float32) * 0.5
        frames.append(pd.DataFrame({"id": np.arange(50) + 50 * k, **{f"f{i}": x[:, i] for i in range(4)}}))
    frames[1].loc[5, "f2"] = np.nan
    outs = list(
        score_api.score_batches(
            "clf", iter(frames), model_repository=repo, columns=["features=f0,f1,f2,f3"], keep=["id"]
        )
    )
    assert [len(o) for o in outs] == [50, 50, 50] and list(outs[0].columns) == [
        "id",
        "probabilities",
        "batchgate_error",
    ]
    bad = outs[1].loc[5]
    assert bad["probabilities"] is None and "missing value" in bad["batchgate_error"]  # pandas' NaN is missing
    ok = outs[0]
    x = frames[0][[f"f{i}" for i in range(4)]].to_numpy(np.float32)
    np.testing.assert_allclose(np.stack(ok["probabilities"].to_numpy()), _want(repo, x), rtol=1e-5)
    assert ok["batchgate_error"].isna().all()
    # the same arguments: the loaded model is reused
    before = dict(score_api._open)
    list(
        score_api.score_batches(
            "clf", iter(frames[:1]), model_repository=repo, columns=["features=f0,f1,f2,f3"], keep=["id"]
        )
    )
    assert score_api._open == before


def test_arrow_batches_and_rows_the_model_fails(repo):
    x = np.full((20, 4), 0.1, np.float32)
    x[[3, 11], 0] = 3.0  # the failing model fails on these rows
    batch = pa.RecordBatch.from_pydict({"features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)})
    with score_api.Scorer("clf_bad", model_repository=repo) as s:
        out = s.score(batch)
    assert isinstance(out, pa.Table) and out.num_rows == 20
    errors = out.column("batchgate_error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [3, 11]
    assert out.column("probabilities").null_count == 2


def test_a_scorer_needs_one_place_to_find_the_model(repo):
    with pytest.raises(ValueError, match="model_repository or target"):
        score_api.Scorer("clf")


def test_a_kept_column_with_the_name_of_an_output_or_of_the_error_column_is_refused(repo):
    """A kept 'probabilities' was replaced by the model's, and a kept 'batchgate_error' came out
    twice: the caller's own column lost."""
    frame = pd.DataFrame({"features": [[0.1, 0.2, 0.3, 0.4]], "probabilities": ["truth"], "batchgate_error": ["x"]})
    for keep in ("probabilities", "batchgate_error"):
        with score_api.Scorer("clf", model_repository=repo, keep=[keep]) as s, pytest.raises(ValueError, match=keep):
            s.score(frame)


def test_a_batch_with_no_row_scored_still_has_every_output_column(repo):
    """A batch whose rows all failed their checks came back without the output columns (a Spark
    schema or a Ray dataset of the other batches' columns does not take it), and an empty
    pyarrow table raised IndexError (Ray Data hands empty blocks over)."""
    frame = pd.DataFrame({"id": [1, 2], "features": [[0.1, np.nan, 0.1, 0.1], None]})
    with score_api.Scorer("clf", model_repository=repo, keep=["id"]) as s:
        out = s.score(frame)
        assert list(out.columns) == ["id", "probabilities", "batchgate_error"] and out["batchgate_error"].notna().all()
        empty = s.score(pa.table({"id": pa.array([], pa.int64()), "features": pa.array([], pa.list_(pa.float32()))}))
        assert empty.num_rows == 0 and empty.column_names == ["id", "probabilities", "batchgate_error"]
        assert empty.schema.field("probabilities").type == pa.list_(pa.float32(), 3)


def test_an_integer_output_keeps_its_values_in_pandas_when_a_row_of_the_batch_is_not_scored(repo):
    """A row not scored made the values of an output's fixed-size lists null as well as the row,
    and pandas read every row's values as floats: 2**53 + 1 came back as 2**53 in a row scored."""
    big = 2**53 + 1
    frame = pd.DataFrame({"id": [1, 2, 3], "INPUT": [[big, 7], [1, 2, 3], [-big, 0]]})  # row 2: 3 values for 2
    with score_api.Scorer("ids", model_repository=repo, keep=["id"]) as s:
        out = s.score(frame)
        table = s.score(pa.Table.from_pandas(frame))
    assert out["batchgate_error"].notna().tolist() == [False, True, False]
    got = out["OUTPUT"].tolist()
    assert got[1] is None and [v.dtype.kind for v in (got[0], got[2])] == ["i", "i"]
    assert [got[0].tolist(), got[2].tolist()] == [[big, 7], [-big, 0]]
    assert table.column("OUTPUT").to_pylist() == [[big, 7], None, [-big, 0]]
    assert table.column("OUTPUT").combine_chunks().values.null_count == 0  # null at the row alone
