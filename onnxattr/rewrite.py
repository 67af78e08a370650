"""Modified ReLU backward passes (guided backpropagation, Zeiler-Fergus) as a graph rewrite.

The gradient builder emits one `com.microsoft::ReluGrad(dY, T)` per forward Relu on the path
from the image to the score, where T is the Relu's output Y or its input X (the builder picks
either; X > 0 exactly where Y > 0). `rewrite_relu_gradients` replaces each of them by the
standard-op subgraph of one rule from `RULES`:

    vanilla        dX = (X > 0) * dY               what ReluGrad computes
    guided         dX = (X > 0) * (dY > 0) * dY    Springenberg et al. (2015)
    zeiler-fergus  dX = (dY > 0) * dY = Relu(dY)   Zeiler & Fergus (2014), "deconvnet"

A new rule is one function `(editor, dy, t, dx, name, zero) -> [nodes]` and one entry.

The rewrite refuses rather than return a partly modified gradient under a modified label:
every Relu between the image and the score must have exactly one ReluGrad (onnxruntime-training
1.19.2 fuses no ReLU gradient, and cannot differentiate fused ops such as FusedConv; any future
fusion shows up as a count mismatch), and a model without such a Relu is refused.

Other rectifiers: the modified rules are defined for Relu only. A model with one of
`OTHER_RECTIFIERS` (LeakyRelu, PRelu, Clip such as ReLU6, ELU-like and smooth ReLUs) between
the image and the score is refused for them; the plain gradient works for it. ReLUs written as
other ops (e.g. Max(x, 0) or Where) are not recognised and keep their plain gradient.
"""

import numpy as np
import onnx

from .errors import OnnxAttrError
from .prepare import ONEHOT, SCORE, GraphEditor

VANILLA = "vanilla"
OTHER_RECTIFIERS = frozenset({"LeakyRelu", "PRelu", "Clip", "ThresholdedRelu", "Elu", "Selu",
                              "Celu", "Gelu", "HardSwish", "Softplus", "Mish"})
NO_GRADIENT = frozenset({"Shape", "Size"})  # ops whose output carries no gradient to their input


def _where_positive(editor, t, value, out, name, zero):
    """out = value where t > 0, else 0."""
    mask = editor.unique(f"{name}/mask")
    return [editor.node("Greater", [t, zero], [mask], name),
            editor.node("Where", [mask, value, zero], [out], name)]


def _vanilla(editor, dy, t, dx, name, zero):
    return _where_positive(editor, t, dy, dx, name, zero)


def _guided(editor, dy, t, dx, name, zero):
    positive = editor.unique(f"{name}/positive_grad")
    return [editor.node("Relu", [dy], [positive], name),
            *_where_positive(editor, t, positive, dx, name, zero)]


def _zeiler_fergus(editor, dy, t, dx, name, zero):
    return [editor.node("Relu", [dy], [dx], name)]


RULES = {VANILLA: _vanilla, "guided": _guided, "zeiler-fergus": _zeiler_fergus}


def score_path(forward):
    """The nodes of `forward` on a path from its image input to its `score` output, in order."""
    graph = forward.graph
    initializers = {t.name for t in graph.initializer}
    reached = {i.name for i in graph.input} - initializers - {ONEHOT}
    downstream = []
    for node in graph.node:  # topological order: one pass finds everything fed by the image
        if reached.intersection(node.input):
            reached.update(node.output)
            downstream.append(node)
    needed, path = {SCORE}, []
    for node in reversed(downstream):
        if needed.intersection(node.output):
            path.append(node)
            if node.op_type not in NO_GRADIENT:
                needed.update(node.input)
    return path[::-1]


def rewrite_relu_gradients(gradient_graph, rule, forward):
    """A copy of `gradient_graph` whose ReluGrad nodes compute `rule`'s dX instead.

    `forward` is the scored forward model the gradient graph was built from; it fixes how many
    ReluGrad nodes there must be. Raises OnnxAttrError on an unknown rule, a count mismatch,
    and, for the modified rules, a model without Relu or with another rectifier on the path.
    """
    if rule not in RULES:
        raise OnnxAttrError(f"unknown ReLU backward rule '{rule}' (choose from {', '.join(RULES)})")
    path = score_path(forward)
    expected = sum(node.op_type == "Relu" for node in path)
    if rule != VANILLA:
        _check_rectifiers(path, rule, expected)
    model = onnx.ModelProto()
    model.CopyFrom(gradient_graph)
    editor = GraphEditor(model.graph)
    zero = editor.constant("relu_rule/zero", np.float32(0.0))
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type == "ReluGrad" and node.domain == "com.microsoft":
            dy, t = node.input
            nodes.extend(RULES[rule](editor, dy, t, node.output[0], node.name or "ReluGrad", zero))
            count += 1
        else:
            nodes.append(node)
    if count != expected:
        raise OnnxAttrError(f"the gradient graph has {count} ReluGrad nodes for {expected} Relu "
                            f"nodes between the image and the score; cannot apply the '{rule}' "
                            "rule to every ReLU")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _check_rectifiers(path, rule, relus):
    others = [node for node in path if node.op_type in OTHER_RECTIFIERS]
    if others:
        found = ", ".join(f"{n.op_type} '{n.name}'" for n in others[:3])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        raise OnnxAttrError(f"the '{rule}' ReLU backward rule is defined for Relu only; the "
                            f"model has {found}{more} between the image and the score (use the "
                            "plain gradient)")
    if relus == 0:
        raise OnnxAttrError(f"the model has no Relu between the image and the score, so the "
                            f"'{rule}' ReLU backward rule does not apply (use the plain gradient)")
