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
and figure title are in the entry; onnxattr.methods lists one method per rule), so a new rule
is one function and one entry, and nothing else.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .backward_forms import gate
from .errors import OnnxAttrError
from .graph import attribute

VANILLA = "vanilla"
GUIDED = "guided"  # guided backpropagation's rule (guided Grad-CAM uses it too)
# rectifiers the modified rules are not defined for: they pass a gradient below the threshold
# or are smooth (a Clip with min 0, ReLU6, is gated like a Relu by the native builder)
OTHER_RECTIFIERS = frozenset({"LeakyRelu", "PRelu", "Clip", "ThresholdedRelu", "Elu", "Selu",
                              "Celu", "Gelu", "HardSwish", "Softplus", "Mish"})


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
