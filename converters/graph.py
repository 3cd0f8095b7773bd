"""Renaming the values of an ONNX graph (its inputs and outputs) everywhere they appear: the
exporters name a model's tensors their own way (the dynamo exporter after forward()'s
parameters, skl2onnx with its own rules), and a served model takes the names its specs give."""

from __future__ import annotations

import onnx


def rename_values(graph, old: list[str], new: list[str]) -> None:
    """Rename graph inputs or outputs ``old`` to ``new`` everywhere they appear; an inner value
    that already has one of the new names is renamed out of the way first."""
    used = _value_names(graph)
    for a, b in zip(old, new):
        if a == b:
            continue
        if b in used:
            spare, n = f"{b}__inner", 0
            while spare in used:
                n += 1
                spare = f"{b}__inner{n}"
            _rename(graph, b, spare)
            used.add(spare)
        _rename(graph, a, b)
        used.add(b)


def _value_names(graph) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in _subgraphs(node):
            names |= _value_names(sub)
    return names


def _subgraphs(node):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _rename(graph, a: str, b: str) -> None:
    for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if v.name == a:
            v.name = b
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == a:
                    seq[i] = b
        for sub in _subgraphs(node):
            _rename(sub, a, b)
