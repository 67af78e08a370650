"""Control flow (If, Loop, Scan) in a graph: what a node reads through its subgraphs, and the
one refusal both gradient builders give when the score depends on the image through it."""

import onnx

from ..errors import OnnxAttrError

CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


def reads(node):
    """The names `node` reads: its inputs and the outer-scope names its subgraphs read."""
    return {*node.input, *_subgraph_inputs(node)} - {""}


def refuse_control_flow(path, wrt, output):
    """OnnxAttrError naming the first control-flow node (If, Loop, Scan) of `path`, the nodes
    through which tensor `output` depends on `wrt`: neither builder differentiates through one
    (onnxruntime-training's builder aborts the whole process on an If)."""
    for node in path:
        if node.op_type in CONTROL_FLOW:
            raise OnnxAttrError(f"'{output}' depends on '{wrt}' through control flow "
                                f"({node.op_type} node '{node.name}'), which onnxattr cannot "
                                "differentiate (re-export the model without it)")


def _subgraph_inputs(node):
    """Outer-scope names that a node's subgraphs (If, Loop, Scan bodies) read."""
    names = set()
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names
