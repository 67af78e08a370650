"""ReLU backward rules: the plain gradient, guided backpropagation and Zeiler-Fergus.

A rule turns the cotangent `dy` of a rectifier's output into the cotangent of its input, given
`active`, a boolean tensor that is true where the forward unit passes its input through
(x > 0 for Relu; lo < x < hi for Clip as ReLU6):

    vanilla        dX = active * dY                 the ordinary derivative
    guided         dX = active * (dY > 0) * dY      Springenberg et al. (2015)
    zeiler-fergus  dX = (dY > 0) * dY = Relu(dY)    Zeiler & Fergus (2014), "deconvnet"

Both gradient builders emit every rectifier's backward through `RELU_RULES`: the native
builder where it reaches a Relu or Clip, the onnxruntime-training path by replacing each
ReluGrad node the training builder wrote. A new rule is one function and one entry.
"""

from .backward_forms import gate
from .errors import OnnxAttrError

VANILLA = "vanilla"


def vanilla(em, dy, active, out=None):
    result = gate(em, dy, active, out=out)  # the fastest exact "dy where active, else 0"
    return result if out is None else [out]


def guided(em, dy, active, out=None):
    return vanilla(em, em.op("Relu", dy), active, out)


def zeiler_fergus(em, dy, active, out=None):
    return em.op("Relu", dy, outputs=_outs(out))


RELU_RULES = {VANILLA: vanilla, "guided": guided, "zeiler-fergus": zeiler_fergus}


def relu_rule(name):
    """The rule called `name`, or an OnnxAttrError listing the known ones."""
    if name not in RELU_RULES:
        raise OnnxAttrError(f"unknown ReLU backward rule '{name}' (choose from "
                            f"{', '.join(RELU_RULES)})")
    return RELU_RULES[name]


def _outs(out):
    return 1 if out is None else [out]
