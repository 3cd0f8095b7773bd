"""Classifiers whose probabilities come out of a ZipMap (``ai.onnx.ml``): skl2onnx adds one to
every classifier unless told ``options={"zipmap": False}``, so most scikit-learn models a user
brings answer a list of ``{class label: probability}`` maps, which no V2 datatype can carry
(Triton's ONNX Runtime backend refuses such a model too).

batchgate serves the probabilities instead as the tensor the ZipMap was given: FP32
``[batch, classes]``, one column per class in the order of the node's labels (scikit-learn's
``classes_``), under the output's own name. The graph is rewritten in memory at load (the
ZipMap becomes an Identity); the file is not touched."""

from __future__ import annotations

import logging

import onnx
import onnxruntime as ort
from onnx import helper

log = logging.getLogger("batchgate.backends")

_LABELS = ("classlabels_int64s", "classlabels_strings")


def without_zipmap(path: str | bytes, shown_as: str) -> bytes | None:
    """The model at ``path`` (or the model's bytes) with each ZipMap that gives a graph output (and feeds nothing
    else) turned into an Identity of its probability tensor; None when it has none. ``shown_as``
    names the file in the log line (model/version/file)."""
    proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(path)
    graph = proto.graph
    outputs = {o.name: o for o in graph.output}
    consumed = {name for node in graph.node for name in node.input}
    changed = False
    for i, node in enumerate(graph.node):
        if node.op_type != "ZipMap" or node.domain != "ai.onnx.ml":
            continue
        out = node.output[0]
        if out not in outputs or out in consumed:
            continue
        labels: list = []
        for attr in node.attribute:
            if attr.name in _LABELS:
                labels = [s.decode("utf-8", "replace") for s in attr.strings] if attr.strings else list(attr.ints)
        graph.node[i].CopyFrom(helper.make_node("Identity", [node.input[0]], [out], name=f"{node.name}_as_tensor"))
        outputs[out].type.CopyFrom(helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, ["batch", len(labels)]))
        shown = ", ".join(str(x)[:32] for x in labels[:20]) + (", ..." if len(labels) > 20 else "")
        log.info(
            "%s: output '%s' is a ZipMap (a {label: probability} map per row): served as FP32 "
            "[batch, %d], one column per class in this order: %s",
            shown_as,
            out[:128],
            len(labels),
            shown,
        )
        changed = True
    return proto.SerializeToString() if changed else None


def open_session(path: str | bytes, shown_as: str, **options) -> ort.InferenceSession:
    """An ONNX Runtime session on the model at ``path`` (or on the model's bytes; ``options``: InferenceSession's), its
    ZipMap outputs served as tensors (``without_zipmap``)."""
    session = ort.InferenceSession(path, **options)
    if any(o.type.startswith("seq(map(") for o in session.get_outputs()):
        unwrapped = without_zipmap(path, shown_as)
        if unwrapped is not None:
            session = ort.InferenceSession(unwrapped, **options)
    return session
