"""Batch scoring of a file of thousands of columns (one feature a column, as wide CSV exports
are): the work of reading the header and mapping its columns grows with the columns, not with
their square. A CSV of 60,000 columns and 5 rows ran for over ten minutes before scoring a row.
The counts below are of the operations that were repeated per pair of columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from batchgate.core.signature import ModelSignature, TensorSpec
from batchgate.core.types import DATATYPES
from batchgate.score.tables import Mapping, read_batches

WIDTH = 2000


def _signature(width: int) -> ModelSignature:
    spec = TensorSpec("x", DATATYPES["FP32"], (width,))
    return ModelSignature("wide", "onnxruntime_onnx", 16, (spec,), (TensorSpec("y", DATATYPES["FP32"], (1,)),))


class ListedSchema:
    """A schema that counts how often its list of names is made (pyarrow makes a new list of
    every name at each use of ``names``)."""

    def __init__(self, schema: pa.Schema):
        self.schema, self.listed = schema, 0

    @property
    def names(self) -> list[str]:
        self.listed += 1
        return self.schema.names

    def __iter__(self):
        return iter(self.schema)


def test_mapping_a_wide_header_lists_its_names_a_few_times_not_once_per_column():
    schema = ListedSchema(pa.schema([("id", pa.int64())] + [(f"f{i}", pa.float64()) for i in range(WIDTH)]))
    mapping = Mapping.build(_signature(WIDTH), schema, (), ("id",))  # type: ignore[arg-type]
    assert mapping.sources["x"] == tuple(f"f{i}" for i in range(WIDTH))
    assert schema.listed <= 5  # (it was once per column mapped: 2,000 lists of 2,001 names)


class Name(str):
    """A column name that counts the comparisons made with it."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        Name.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


class WidePlan:
    """Every column but ``id`` feeds the model's one input; ``id`` is kept."""

    def __call__(self, schema: pa.Schema) -> dict[str, object]:
        return {Name(c): (None if c == "id" else np.dtype(np.float32)) for c in schema.names}

    def no_rows(self, schema: pa.Schema) -> None:
        raise AssertionError("the file has rows")


def test_reading_a_wide_csv_compares_each_column_name_a_few_times(tmp_path):
    src = tmp_path / "wide.csv"
    header = ["id"] + [f"f{i}" for i in range(WIDTH)]
    rows = [",".join([str(r)] + [str(r + i / 10) for i in range(WIDTH)]) for r in range(3)]
    src.write_text(",".join(header) + "\n" + "\n".join(rows) + "\n")
    Name.compared = 0
    (batch,) = list(read_batches(str(src), 10, WidePlan()))
    assert batch.num_rows == 3 and batch.column("f1999").to_pylist() == ["199.9", "200.9", "201.9"]
    # each column's name is looked up a few times (it was looked for in a list of the columns
    # read as text: about 2 million comparisons here)
    assert Name.compared <= 4 * WIDTH
