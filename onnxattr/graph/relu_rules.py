"""ReLU backward rules: the plain gradient, guided backpropagation and Zeiler-Fergus.

A rule turns the cotangent `dy` of a rectifier's output into the cotangent of its input, given
`active`, a boolean tensor that is true where the forward unit passes its input through
(x > 0 for Relu; lo < x < hi for Clip as ReLU6):

    vanilla        dX = active * dY                 the ordinary derivative
    guided         dX = active * (dY > 0) * dY      Springenberg et al. (2015)
    zeiler-fergus  dX = (dY > 0) * dY = Relu(dY)    Zeiler & Fergus (2014), "deconvnet"

Both gradient builders emit every rectifier's backward through `RELU_RULES`: the native
builder where it reaches a Relu or Clip, the onnxruntime-training path by replacing each
ReluGrad node the training builder wrote. Each entry is also an attribution method (its name
and figure title are in the entry; onnxattr.methods.table lists one method per rule), so a new rule
is one function and one entry, and nothing else.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import OnnxAttrError
from .backward_forms import gate
from .quantization import rectifies
from .toolkit import attribute

VANILLA = "vanilla"
GUIDED = "guided"  # guided backpropagation's rule (guided Grad-CAM uses it too)
# rectifiers and smooth activations the modified rules are not defined for: they pass a gradient
# below their threshold or are smooth (Erf: torch's GELU, x/2 (1 + erf(x/sqrt 2)); Softplus:
# Mish, x tanh(softplus x)); a Clip is one unless its min is 0 (ReLU6, see is_gated_clip)
NOT_RELU = frozenset({"LeakyRelu", "PRelu", "ThresholdedRelu", "Elu", "Selu", "Celu", "Gelu",
                      "HardSwish", "Softplus", "Softsign", "Mish", "Erf", "Clip"})
SQUASHING = frozenset({"Sigmoid", "HardSigmoid", "Tanh"})  # a gate or an activation, by its use
# ops that map their (first) input to their output element by element, values or layout
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Abs", "Exp", "Log",
                         "Reciprocal", "Identity", "Cast"})
LAYOUT = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Transpose"})
REPLACES = "onnxattr replaces "  # doc_string of a node that stands for another op (prepare.py)


def vanilla(em, dy, active, out=None):
    return gate(em, dy, active, out=out)  # the fastest exact "dy where active, else 0"


def guided(em, dy, active, out=None):
    return vanilla(em, em.op("Relu", dy), active, out)


def zeiler_fergus(em, dy, active, out=None):
    return em.op("Relu", dy, outputs=_outs(out))


@dataclass(frozen=True)
class ReluRule:
    """A ReLU backward rule and the attribution method it makes."""

    method: str  # the method's name: "guided-backprop"
    title: str  # its figure title: "Guided Backpropagation"
    backward: Callable  # (emitter, dy, active, out=None) -> dx

    def __call__(self, em, dy, active, out=None):
        return self.backward(em, dy, active, out)


RELU_RULES = {
    VANILLA: ReluRule("gradient", "Gradient Attribution Map", vanilla),
    GUIDED: ReluRule("guided-backprop", "Guided Backpropagation", guided),
    "zeiler-fergus": ReluRule("zeiler-fergus", "Zeiler-Fergus", zeiler_fergus),
}


def relu_rule(name):
    """The rule called `name`, or an OnnxAttrError listing the known ones."""
    if name not in RELU_RULES:
        raise OnnxAttrError(f"unknown ReLU backward rule '{name}' (choose from "
                            f"{', '.join(RELU_RULES)})")
    return RELU_RULES[name]


def _outs(out):
    return 1 if out is None else [out]


def zero_like(em, like):
    """A zero scalar of the dtype of tensor `like`."""
    return np.zeros((), em.dtype(like))


def is_gated_clip(editor, node):
    """A Clip the ReLU rules treat as a ReLU: its min is a constant 0 (ReLU6 and the like)."""
    if node.op_type != "Clip":
        return False
    if len(node.input) > 1 and node.input[1]:
        low = editor.value(node.input[1])
    else:
        low = attribute(node, "min")
        low = None if low is None else np.array(low)
    return low is not None and np.size(low) == 1 and float(np.reshape(low, ())) == 0.0


def replaces(node, original):
    """Mark `node` as standing for node `original` in the rectifier check (the Clip of a
    forward fix's HardSigmoid); returns `node`."""
    node.doc_string = f"{REPLACES}{original.op_type} '{original.name}'"
    return node


def _original(node):
    """(op type, "<op> '<name>'") of the op `node` computes: its own, or the one it replaces."""
    if node.doc_string.startswith(REPLACES):
        label = node.doc_string[len(REPLACES):]
        return label.split(" ", 1)[0], label
    return node.op_type, f"{node.op_type} '{node.name}'"


def check_rule_applies(rule, editor, path, wrt, output, gates_clip=True):
    """The Relu nodes (and gated Clips) of `path`, the nodes through which `output` depends on
    `wrt` (in graph order, `editor` over their graph), at which a modified ReLU `rule`
    applies; an OnnxAttrError when it does not apply to the model. Both builders call it, so
    they accept the same models and refuse the others with the same message.

    Refused, wherever they are on the path and whatever else the model has: a rectifier or
    smooth activation other than ReLU (NOT_RELU; a Clip with min 0, ReLU6, is a ReLU with a cap
    and gated like one, unless `gates_clip` is false: the training builder cannot rewrite its
    gradient of Clip), and a SQUASHING op (Sigmoid, HardSigmoid, Tanh) used as an activation.
    A squashing op is a gate, not an activation, when each use of its output (through
    elementwise ops with constants, such as torch's Add 1 and Div 6, and layout ops) is a Mul
    with a tensor not computed element by element from the squashing op's input: the Sigmoid
    of squeeze-excite, sigmoid(fc(pool x)) * x, or of a gated linear unit, a * sigmoid(b). A
    gate's gradient is the plain one, as for MaxPool or Softmax, which the papers leave as they
    are. Multiplied by what its own input is made from, it is an activation: SiLU/Swish x *
    sigmoid(x), HardSwish x * hardsigmoid(x), tanh-GELU x/2 (1 + tanh(c (x + 0.044715 x^3))).
    With no Relu on the path there is nothing to apply the rule to: refused too. A
    QuantizeLinear that replaced a Relu (quantization.rectifies) counts as a Relu."""
    others, relus, clips = [], [], []
    for node in path:
        op, label = _original(node)
        if rectifies(editor, node):
            relus.append(node)  # the quantizer's ReLU, dropped into the QuantizeLinear after it
            continue
        if not np.issubdtype(editor.dtype(node.output[0]), np.floating):
            continue  # shape arithmetic (an int64 Clip before a Reshape), not an activation
        if op == "Relu":
            relus.append(node)
        elif op == "Clip" and is_gated_clip(editor, node):
            clips.append(node)
        elif op in NOT_RELU or (op in SQUASHING and not _is_gate(editor, node)):
            others.append(label)
    if rule == VANILLA:
        return relus + clips if gates_clip else relus
    where = f"between '{wrt}' and '{output}'"
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        raise OnnxAttrError(f"the '{rule}' ReLU backward rule is defined for Relu (and Clip with "
                            f"min 0) only; the model has {', '.join(others[:3])}{more} {where} "
                            "(use the plain gradient)")
    if clips and not gates_clip:
        raise OnnxAttrError(f"the onnxruntime builder cannot apply the '{rule}' ReLU backward "
                            f"rule at Clip '{clips[0].name}' (ReLU6) {where}; use --builder "
                            "native, which gates it")
    if not relus + clips:
        raise OnnxAttrError(f"the model has no Relu {where}, so the '{rule}' ReLU backward rule "
                            "does not apply (use the plain gradient)")
    return relus + clips


def _is_gate(editor, node):
    """Whether squashing `node`'s output is only ever a factor multiplying another tensor
    (see check_rule_applies)."""
    own = _elementwise_sources(editor, node.input[0])
    products, stack = [], [node.output[0]]
    while stack:
        name = stack.pop()
        if editor.is_output(name):
            return False
        for user in editor.consumers(name):
            operands = [i for i in user.input if i and i != name and not editor.is_constant(i)]
            if user.op_type in LAYOUT or (user.op_type in ELEMENTWISE and not operands):
                stack.append(user.output[0])
            elif user.op_type == "Mul" and len(operands) == 1:
                products.append(operands[0])
            else:
                return False
    return bool(products) and not any(own & _elementwise_sources(editor, p) for p in products)


def _elementwise_sources(editor, name):
    """`name` and the non-constant tensors it is computed from element by element (through
    arithmetic, activations and layout ops)."""
    seen, stack = set(), [name]
    while stack:
        name = stack.pop()
        if name in seen or editor.is_constant(name):
            continue
        seen.add(name)
        node = editor.producer(name)
        if node is not None and node.op_type in ELEMENTWISE | NOT_RELU | SQUASHING | {"Relu"}:
            stack.extend(i for i in node.input if i)
        elif node is not None and node.op_type in LAYOUT:
            stack.append(node.input[0])
    return seen
