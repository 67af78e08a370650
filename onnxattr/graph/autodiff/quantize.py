"""Vector-Jacobian rules of QuantizeLinear and DequantizeLinear: the clipped straight-through
estimator (onnxattr.graph.quantization says why and where it comes from).

The integer tensor q between the two carries a float cotangent, dL/dq with q read as a real
number (the walk lets QuantizeLinear's integer output through, and gives it the float dtype of
its rule's result):

    DequantizeLinear   y = (q - zp) s                       dq = dy * s
    QuantizeLinear     q = saturate(round(x / s) + zp)      dx = dq / s where lo <= x <= hi, else 0

round's derivative taken as 1, saturation's as that of clip(x, lo, hi), lo = (qmin - zp) s,
hi = (qmax - zp) s. So a Q -> DQ pair with one scale is clip(x, lo, hi)'s derivative: dy inside
the range (the identity), 0 outside. A QuantizeLinear that replaced a ReLU
(quantization.rectifies) goes through the configured ReLU rule with active = 0 < x <= hi: the
plain gradient is the same mask, guided backpropagation and Zeiler-Fergus apply there as at a
Relu. Scales and zero points are constants and carry no gradient (weights quantized as Q/DQ on
initializers are not on the path).
"""

from .. import backward_forms
from ..quantization import clip_range, rectifies
from .registry import vjp


def _range(g, name):
    """(lo, hi, scale) of this node as constants of tensor `name`'s dtype, shaped to broadcast
    against it."""
    shape = g.shape(name)
    lo, hi, scale = clip_range(g.walk.editor, g.node, None if shape is None else len(shape))
    return [g.const(v, like=name) for v in (lo, hi, scale)]


@vjp("DequantizeLinear")
def dequantize(g):
    """y = (q - zp) s:  dq = dy * s."""
    return g.op("Mul", g.dy(), _range(g, g.y())[2])


@vjp("QuantizeLinear", integer_outputs=True)
def quantize(g):
    """q = saturate(round(x / s) + zp):  dx = dq / s where lo <= x <= hi (a rectifier: where
    0 < x <= hi, through the ReLU rule)."""
    x = g.x()
    lo, hi, scale = _range(g, x)
    dx = g.op("Div", g.dy(), scale)
    below_top = g.op("LessOrEqual", x, hi)
    if rectifies(g.walk.editor, g.node):
        return g.relu_rule(dx, g.op("And", g.op("Greater", x, lo), below_top))
    return backward_forms.gate(g.em, dx, g.op("And", g.op("GreaterOrEqual", x, lo), below_top))
