"""Outputs of an ONNX graph whose number of rows can follow the input values, not only their
shapes: those computed from a NonZero (``x[mask]``, ``torch.where(cond)``), a
NonMaxSuppression (a detector's selected boxes, ``[num_selected, 3]``), a Compress or a
Unique. A run on zeros at load cannot tell whether such an output's first dimension is the
batch (zeros may happen to keep every row), and a batch that merges several callers' requests
would cut it at the wrong rows (or give the indices of the merged batch, not the caller's)."""

from __future__ import annotations

import onnx

VALUE_SHAPED = frozenset({"NonZero", "NonMaxSuppression", "Compress", "Unique"})
_STANDARD = ("", "ai.onnx")


def value_shaped_outputs(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """Each of the graph outputs ``names`` that depends on a value-shaped op, with that op's
    type (also one inside a subgraph of an If or Loop, or of a model-local function)."""
    functions = {(f.domain, f.name): f for f in model.functions}
    producer = {o: node for node in model.graph.node for o in node.output}
    found: dict[str, str] = {}
    for name in names:
        seen: set[str] = set()
        todo = [name]
        while todo and name not in found:
            tensor = todo.pop()
            node = producer.get(tensor)
            if node is None or tensor in seen:
                continue
            seen.add(tensor)
            op = _value_shaped_op(node, functions, set())
            if op:
                found[name] = op
                break
            todo.extend(_uses(node))
    return found


def _value_shaped_op(node: onnx.NodeProto, functions: dict, visiting: set) -> str:
    """The value-shaped op type ``node`` is or holds ("" if none)."""
    if node.op_type in VALUE_SHAPED and node.domain in _STANDARD:
        return node.op_type
    for g in _subgraphs(node):
        for inner in g.node:
            op = _value_shaped_op(inner, functions, visiting)
            if op:
                return op
    key = (node.domain, node.op_type)
    f = functions.get(key)
    if f is not None and key not in visiting:
        visiting.add(key)
        for inner in f.node:
            op = _value_shaped_op(inner, functions, visiting)
            if op:
                return op
    return ""


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _uses(node: onnx.NodeProto) -> list[str]:
    """The tensors ``node`` reads: its inputs, and those its subgraphs read from the outer scope
    (a branch of an If names them directly)."""
    names = [n for n in node.input if n]
    for g in _subgraphs(node):
        for inner in g.node:
            names.extend(_uses(inner))
    return names
