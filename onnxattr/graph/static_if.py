"""Folding `If` nodes whose condition is known before any image is seen: a constant, or a value
computed from constants and static tensor shapes only (torch writes `x.shape[1] == 3` as
Shape -> Gather -> Equal). Each such If is replaced by the nodes of the branch it takes, so
both gradient builders see a graph without it; an If whose condition depends on pixel values
stays, and the builders refuse it in one line (control_flow.refuse_control_flow).
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from .control_flow import reads
from .toolkit import GraphEditor, attribute

SHAPE_OPS = frozenset({"Shape", "Size"})


def fold_static_ifs(model):
    """Replace (in place) every top-level If of `model` whose condition is static by its
    chosen branch, until none is left (a folded branch may hold another If); returns how many
    were folded."""
    folded = 0
    while True:
        editor = GraphEditor(model)
        for position, node in enumerate(model.graph.node):
            if node.op_type == "If":
                condition = static_condition(editor, node.input[0])
                if condition is not None:
                    _inline_branch(editor, position, bool(condition))
                    folded += 1
                    break
        else:
            return folded


def static_condition(editor, name):
    """The value of tensor `name` when constants and static shapes decide it, else None."""
    known, nodes = {}, []
    if not _collect(editor, name, known, nodes, set()):
        return None
    graph = helper.make_graph(
        nodes[::-1], "condition", [], [helper.make_tensor_value_info(name, 0, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in known.items()])
    model = helper.make_model(graph, opset_imports=editor.opset_imports)
    try:
        value = ReferenceEvaluator(model).run(None, {})[0]
    except Exception:  # noqa: BLE001 - an op the evaluator lacks: the If stays, refused later
        return None
    return value.reshape(-1)[0] if np.size(value) == 1 else None


def _collect(editor, name, known, nodes, seen):
    """Walk back from tensor `name`: fill `known` with the leaves' values (constants, static
    shapes) and `nodes` with the nodes between them; False when a leaf is not static."""
    if name in seen or name == "":
        return True
    seen.add(name)
    value = editor.value(name)
    if value is None:
        value = _static_shape_value(editor, name)
    if value is not None:
        known[name] = value
        return True
    node = editor.producer(name)
    if node is None or node.op_type in SHAPE_OPS or node.op_type in ("If", "Loop", "Scan"):
        return False
    nodes.append(node)
    return all(_collect(editor, i, known, nodes, seen) for i in node.input)


def _static_shape_value(editor, name):
    """The value of `name` when it is Shape/Size of a tensor, or a constant Gather of a Shape,
    and the dimensions it reads are static; else None."""
    node = editor.producer(name)
    if node is None:
        return None
    if node.op_type == "Gather" and attribute(node, "axis", 0) == 0:
        source, indices = editor.producer(node.input[0]), editor.value(node.input[1])
        if source is None or source.op_type != "Shape" or indices is None:
            return None
        dims = _shape_slice(editor, source)
        if dims is None:
            return None
        picked = [dims[i] for i in np.asarray(indices).reshape(-1)]
        if any(d is None for d in picked):
            return None
        return np.array(picked, np.int64).reshape(np.shape(indices))
    if node.op_type in SHAPE_OPS:
        dims = _shape_slice(editor, node) if node.op_type == "Shape" else \
            editor.inferred_shape(node.input[0])
        if dims is None or any(d is None for d in dims):
            return None
        return np.array(dims, np.int64) if node.op_type == "Shape" else np.int64(np.prod(dims))
    return None


def _shape_slice(editor, shape_node):
    """The dimensions (int or None) a Shape node outputs, from shape inference; None if unknown."""
    dims = editor.inferred_shape(shape_node.input[0])
    if dims is None:
        return None
    start, end = attribute(shape_node, "start", 0), attribute(shape_node, "end", None)
    return list(dims)[start:end]


def _inline_branch(editor, position, condition):
    """Replace the If node at `position` by the nodes of its then (or else) branch: the branch's
    own tensors get fresh names, its outputs become the If's outputs, its initializers move to
    the graph."""
    graph_nodes = list(editor.graph.node)
    node = graph_nodes[position]
    branch = attribute(node, "then_branch" if condition else "else_branch")
    produced = {out for inner in branch.node for out in inner.output if out}
    renamed = {out: editor.unique(f"{node.name}/{out}") for out in produced}
    renamed.update({t.name: editor.constant(f"{node.name}/{t.name}", numpy_helper.to_array(t))
                    for t in branch.initializer})
    # an output the branch computes takes the If's output name; one it passes through (an outer
    # tensor or a branch initializer) reaches it through an Identity
    passed = [editor.node("Identity", [renamed.get(output.name, output.name)], [outer], node.name)
              for output, outer in zip(branch.output, node.output) if output.name not in produced]
    renamed.update({output.name: outer for output, outer in zip(branch.output, node.output)
                    if output.name in produced})
    nodes = []
    for inner in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        _rename(copy, renamed)
        nodes.append(copy)
    editor.set_nodes([*graph_nodes[:position], *nodes, *passed, *graph_nodes[position + 1:]])


def _rename(node, renamed):
    """Rename `node`'s inputs, outputs and the outer names its subgraphs read (in place)."""
    node.input[:] = [renamed.get(i, i) for i in node.input]
    node.output[:] = [renamed.get(o, o) for o in node.output]
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for inner in sub.node:
                if reads(inner) & renamed.keys():
                    _rename(inner, renamed)
