"""scikit-learn models (estimators and pipelines) through skl2onnx.

Classifiers are exported without skl2onnx's ZipMap, so they answer two tensors: ``label``
(the predicted class, as ``predict`` gives it) and ``probabilities`` (``predict_proba``).
Regressors answer ``variable`` ([batch, targets]); transformers (no ``predict``) answer
``variable`` too, what ``transform`` gives. A model fit on a DataFrame may take one input per
column (named after it, one value a row), as skl2onnx matches them to a ColumnTransformer's
column names; its reference runs it on a DataFrame of those columns.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from .graph import rename_values
from .spec import ConversionError, InputSpec


def load(path: str):
    if not os.path.isfile(path):
        raise ConversionError(f"--model {path}: no such file")
    try:
        import joblib
        from sklearn.base import BaseEstimator
    except ImportError:
        raise ConversionError("scikit-learn is not installed: pip install 'batchgate[convert]'") from None
    try:
        model = joblib.load(path)  # reads plain pickles too
    except Exception as e:  # noqa: BLE001 - unpickling raises anything
        raise ConversionError(f"--model {path}: cannot load it with joblib/pickle: {type(e).__name__}: {e}") from None
    if not isinstance(model, BaseEstimator):
        raise ConversionError(f"--model {path}: holds a {type(model).__name__}, not a scikit-learn estimator")
    return model


def _initial_type(spec: InputSpec, batched: bool):
    from skl2onnx.common import data_types as t

    kinds = {
        "FP32": t.FloatTensorType,
        "FP64": t.DoubleTensorType,
        "INT64": t.Int64TensorType,
        "INT32": t.Int32TensorType,
        "BOOL": t.BooleanTensorType,
        "BYTES": t.StringTensorType,
    }
    kind = kinds.get(spec.dtype.v2)
    if kind is None:
        raise ConversionError(f"input '{spec.name}': skl2onnx takes {', '.join(kinds)}, not {spec.dtype.v2}")
    dims = [None if (isinstance(d, str) or d == -1) else d for d in spec.dims]
    if batched:
        dims[0] = None
    return kind(dims)


def _columns(model, specs: list[InputSpec]) -> list[str]:
    """The DataFrame columns of a model given one input per column, in the order it was fit on
    (skl2onnx matches a ColumnTransformer's column names with the input names)."""
    fitted = getattr(model, "feature_names_in_", None)
    names = [s.name for s in specs]
    if fitted is None:
        raise ConversionError(
            f"{type(model).__name__} was fit on an array, not a DataFrame: it takes one input tensor (its feature "
            f"matrix); {len(specs)} --input specs were given"
        )
    fitted = [str(c) for c in fitted]
    if sorted(fitted) != sorted(names):
        raise ConversionError(
            f"{type(model).__name__} was fit on the DataFrame columns {', '.join(fitted)}: give one --input per "
            f"column, named after it (the inputs name {', '.join(names)})"
        )
    for s in specs:
        if len(s.dims) != 2 or s.dims[1] != 1:
            raise ConversionError(
                f"input '{s.name}': a DataFrame column is one value a row, shape -1,1 (e.g. {s.name}:{s.dtype.v2}:-1,1)"
            )
    return fitted


def export(model, specs: list[InputSpec], batched: bool, opset: int | None) -> tuple[onnx.ModelProto, list[str]]:
    from skl2onnx import convert_sklearn
    from sklearn.base import is_classifier

    if is_classifier(model) and not hasattr(model, "predict_proba"):
        raise ConversionError(
            f"{type(model).__name__} gives no probabilities (no predict_proba): batchgate converts "
            "classifiers that do (e.g. LogisticRegression, tree ensembles, or wrap it in "
            "CalibratedClassifierCV)"
        )
    if len(specs) > 1:
        _columns(model, specs)
    try:
        onx = convert_sklearn(
            model,
            initial_types=[(s.name, _initial_type(s, batched)) for s in specs],
            options={"zipmap": False} if is_classifier(model) else None,
            target_opset=opset,
        )
    except Exception as e:  # noqa: BLE001 - skl2onnx raises many types for models it cannot convert
        raise ConversionError(f"skl2onnx cannot convert {type(model).__name__}: {type(e).__name__}: {e}") from None
    outputs = [o.name for o in onx.graph.output]
    renamed = [s.name for s in specs if s.name in outputs]
    if renamed:  # skl2onnx renames such an input (variable -> variable1): callers would send a name it lacks
        raise ConversionError(
            f"input(s) {', '.join(renamed)} of {type(model).__name__} have the name of its output(s) "
            f"({', '.join(outputs)}): a name is one tensor's; name the input(s) otherwise"
        )
    # skl2onnx makes names with "." or "-" into others ("x.1" -> "x_1"): the model takes its specs' names.
    given = [i.name for i in onx.graph.input]
    if len(given) == len(specs):  # (in the order of initial_types)
        rename_values(onx.graph, given, [s.name for s in specs])
    for o in onx.graph.output:  # (MultiOutputClassifier's probabilities: a sequence, one tensor per target)
        kind = o.type.WhichOneof("value")
        if kind != "tensor_type":
            raise ConversionError(
                f"skl2onnx answers {type(model).__name__}'s output '{o.name}' as a {str(kind).removesuffix('_type')} "
                "of tensors, not a tensor: batchgate serves tensors only (convert one estimator per target)"
            )
    classes = getattr(model, "classes_", None)
    if is_classifier(model) and isinstance(classes, np.ndarray) and classes.dtype == np.bool_:
        _bool_label(onx)
    return onx, [o.name for o in onx.graph.output]


def _bool_label(onx: onnx.ModelProto) -> None:
    """skl2onnx answers a classifier trained on bool labels with INT64 0 and 1, where the
    estimator predicts False and True: the label output is cast back to BOOL."""
    label = onx.graph.output[0]
    inner = f"{label.name}_as_int64"
    for node in onx.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == label.name:
                    names[i] = inner
    onx.graph.node.append(onnx.helper.make_node("Cast", [inner], [label.name], to=onnx.TensorProto.BOOL))
    label.type.tensor_type.elem_type = onnx.TensorProto.BOOL


def _frame(model, feeds: dict[str, np.ndarray]):
    """The inputs as the DataFrame the model was fit on: one column each, strings as str."""
    try:
        import pandas as pd  # type: ignore[import-untyped]  # (the model was fit with it)
    except ImportError:
        raise ConversionError(
            "a model given one input per DataFrame column is run on a DataFrame: pip install pandas"
        ) from None
    columns = {}
    for name in (str(c) for c in model.feature_names_in_):
        col = feeds[name].reshape(len(feeds[name]), -1)[:, 0]
        if col.dtype == object:
            col = np.array([v.decode() if isinstance(v, bytes) else v for v in col], dtype=object)
        columns[name] = col
    return pd.DataFrame(columns)


def reference(model, specs: list[InputSpec], names: list[str]):
    """What the estimator itself answers, shaped as the ONNX outputs are."""
    from sklearn.base import is_classifier

    classifier = is_classifier(model)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = feeds[specs[0].name] if len(specs) == 1 else _frame(model, feeds)
        if classifier:
            return [np.asarray(model.predict(x)), np.asarray(model.predict_proba(x), dtype=np.float32)]
        if hasattr(model, "predict"):
            y = np.asarray(model.predict(x), dtype=np.float32)
        else:  # a transformer (a scaler, PCA, a pipeline ending in one): what transform gives
            y = model.transform(x)
            y = np.asarray(y.toarray() if hasattr(y, "toarray") else y)  # (a sparse matrix, OneHotEncoder's)
        return [y.reshape(len(x), -1)]

    if classifier and len(names) != 2 or not classifier and len(names) != 1:
        raise ConversionError(f"unexpected outputs {names} from skl2onnx for {type(model).__name__}")
    return run
