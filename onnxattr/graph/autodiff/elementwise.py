"""Vector-Jacobian rules of elementwise ops: arithmetic with numpy broadcasting, activations,
rectifiers (through the ReLU rules), Where, Cast, and the variadic Max/Min/Sum/Mean.

Notation: x (input 0), y (output), dy (the output's cotangent); a, b for two operands.
Broadcast operands get their cotangent summed back to their own shape (`g.unbroadcast`).
"""

import math

import numpy as np

from .. import backward_forms
from ..relu_rules import is_gated_clip
from .registry import vjp

# --- arithmetic ------------------------------------------------------------------------------------

@vjp("Add", inputs=(0, 1))
def add(g):
    """y = a + b:  da = dy, db = dy (each summed to its operand's shape)."""
    return [g.unbroadcast(g.dy(), g.x(0)) if g.wants(0) else None,
            g.unbroadcast(g.dy(), g.x(1)) if g.wants(1) else None]


@vjp("Sub", inputs=(0, 1))
def sub(g):
    """y = a - b:  da = dy, db = -dy."""
    return [g.unbroadcast(g.dy(), g.x(0)) if g.wants(0) else None,
            g.unbroadcast(g.op("Neg", g.dy()), g.x(1)) if g.wants(1) else None]


@vjp("Mul", inputs=(0, 1))
def mul(g):
    """y = a * b:  da = dy * b, db = dy * a."""
    return [g.unbroadcast(g.op("Mul", g.dy(), g.x(1)), g.x(0)) if g.wants(0) else None,
            g.unbroadcast(g.op("Mul", g.dy(), g.x(0)), g.x(1)) if g.wants(1) else None]


@vjp("Div", inputs=(0, 1))
def div(g):
    """y = a / b:  da = dy / b, db = -dy * y / b."""
    return [g.unbroadcast(g.op("Div", g.dy(), g.x(1)), g.x(0)) if g.wants(0) else None,
            g.unbroadcast(g.op("Neg", g.op("Div", g.op("Mul", g.dy(), g.y()), g.x(1))), g.x(1))
            if g.wants(1) else None]


@vjp("Pow", inputs=(0, 1))
def pow_(g):
    """y = a ** b:  da = dy * b * a ** (b - 1) (a constant b - 1 is folded), db = dy * y * ln a.
    """
    a, b = g.x(0), g.x(1)
    grads = [None, None]
    if g.wants(0):
        exponent = g.value(b)
        if exponent is not None:
            exponent = np.asarray(exponent, g.dtype(a))
            if exponent.size == 1 and float(exponent) == 1.0:
                slope = None
            elif exponent.size == 1 and float(exponent) == 2.0:
                slope = g.op("Mul", a, g.scalar(2.0, a))
            else:
                slope = g.op("Mul", g.op("Pow", a, g.const(exponent - 1, a)), g.const(exponent))
        else:
            b_like = g.cast_like(b, a) if g.dtype(b) != g.dtype(a) else b
            slope = g.op("Mul", g.op("Pow", a, g.op("Sub", b_like, g.scalar(1, a))), b_like)
        grads[0] = g.unbroadcast(g.dy() if slope is None else g.op("Mul", g.dy(), slope), a)
    if g.wants(1):
        grads[1] = g.unbroadcast(g.op("Mul", g.op("Mul", g.dy(), g.y()),
                                      g.op("Log", a)), b)
    return grads


@vjp("Neg")
def neg(g):
    """y = -x:  dx = -dy."""
    return g.op("Neg", g.dy())


@vjp("Abs")
def abs_(g):
    """y = |x|:  dx = dy * sign(x)."""
    return g.op("Mul", g.dy(), g.op("Sign", g.x()))


@vjp("Reciprocal")
def reciprocal(g):
    """y = 1 / x:  dx = -dy * y * y."""
    return g.op("Neg", g.op("Mul", g.dy(), g.op("Mul", g.y(), g.y())))


@vjp("Exp")
def exp(g):
    """y = exp(x):  dx = dy * y."""
    return g.op("Mul", g.dy(), g.y())


@vjp("Log")
def log(g):
    """y = ln x:  dx = dy / x."""
    return g.op("Div", g.dy(), g.x())


@vjp("Sqrt")
def sqrt(g):
    """y = sqrt(x):  dx = dy * 0.5 / y."""
    return g.op("Div", g.op("Mul", g.dy(), g.scalar(0.5, g.x())), g.y())


@vjp("Identity", "Dropout")
def identity(g):
    """y = x (Dropout at inference):  dx = dy."""
    if g.node.op_type == "Dropout" and g.x(2) and not _constant_false(g, g.x(2)):
        raise g.error("Dropout in training mode is random")
    return g.dy()


def _constant_false(g, name):
    value = g.value(name)
    return value is not None and not bool(np.asarray(value).reshape(-1)[0])


@vjp("Cast")
def cast(g):
    """y = cast(x) between float types:  dx = cast(dy) back to x's type."""
    return g.cast_like(g.dy(), g.x())


# --- smooth activations ----------------------------------------------------------------------------

@vjp("Sigmoid")
def sigmoid(g):
    """y = 1 / (1 + exp(-x)):  dx = dy * y * (1 - y)."""
    y = g.y()
    return g.op("Mul", g.dy(), g.op("Mul", y, g.op("Sub", g.scalar(1, y), y)))


@vjp("Tanh")
def tanh(g):
    """y = tanh(x):  dx = dy * (1 - y^2)."""
    y = g.y()
    return g.op("Mul", g.dy(), g.op("Sub", g.scalar(1, y), g.op("Mul", y, y)))


@vjp("Erf")
def erf(g):
    """y = erf(x):  dx = dy * 2 / sqrt(pi) * exp(-x^2)."""
    x = g.x()
    bell = g.op("Exp", g.op("Neg", g.op("Mul", x, x)))
    return g.op("Mul", g.dy(), g.op("Mul", bell, g.scalar(2 / math.sqrt(math.pi), x)))


@vjp("Gelu")
def gelu(g):
    """y = x * Phi(x):  dx = dy * (Phi(x) + x * phi(x)), Phi(x) = (1 + erf(x / sqrt 2)) / 2,
    phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
    approximate="tanh": y = x (1 + t) / 2, t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3):
    dx = dy * ((1 + t) / 2 + x (1 - t^2) / 2 * sqrt(2/pi) (1 + 3 * 0.044715 x^2))."""
    x = g.x()
    c = lambda v: g.scalar(v, x)  # noqa: E731
    square = g.op("Mul", x, x)
    if g.attr("approximate", "none") == "tanh":
        k = math.sqrt(2 / math.pi)
        u = g.op("Mul", g.op("Add", x, g.op("Mul", g.op("Mul", square, x), c(0.044715))), c(k))
        t = g.op("Tanh", u)
        left = g.op("Mul", g.op("Add", t, c(1)), c(0.5))
        du = g.op("Mul", g.op("Add", g.op("Mul", square, c(3 * 0.044715)), c(1)), c(k))
        right = g.op("Mul", g.op("Mul", g.op("Mul", x, c(0.5)),
                                 g.op("Sub", c(1), g.op("Mul", t, t))), du)
        slope = g.op("Add", left, right)
    else:
        cdf = g.op("Mul", g.op("Add", g.op("Erf", g.op("Mul", x, c(1 / math.sqrt(2)))), c(1)),
                   c(0.5))
        pdf = g.op("Mul", g.op("Exp", g.op("Mul", square, c(-0.5))), c(1 / math.sqrt(2 * math.pi)))
        slope = g.op("Add", cdf, g.op("Mul", x, pdf))
    return g.op("Mul", g.dy(), slope)


@vjp("Softplus")
def softplus(g):
    """y = ln(1 + exp(x)):  dx = dy * sigmoid(x)."""
    return g.op("Mul", g.dy(), g.op("Sigmoid", g.x()))


@vjp("Elu")
def elu(g):
    """y = x (x > 0), alpha (exp(x) - 1) (x <= 0):  dx = dy (x > 0), dy * (y + alpha) (x <= 0).
    """
    x, dy = g.x(), g.dy()
    alpha = g.attr("alpha", 1.0)
    below = g.op("Mul", dy, g.op("Add", g.y(), g.scalar(alpha, x)))
    return g.op("Where", g.op("Greater", x, g.scalar(0, x)), dy, below)


@vjp("HardSigmoid")
def hard_sigmoid(g):
    """y = max(0, min(1, alpha x + beta)):  dx = dy * alpha where 0 < alpha x + beta < 1."""
    x = g.x()
    alpha, beta = g.attr("alpha", 0.2), g.attr("beta", 0.5)
    inner = g.op("Add", g.op("Mul", x, g.scalar(alpha, x)), g.scalar(beta, x))
    inside = g.op("And", g.op("Greater", inner, g.scalar(0, x)),
                  g.op("Less", inner, g.scalar(1, x)))
    return backward_forms.gate(g.em, g.op("Mul", g.dy(), g.scalar(alpha, x)), inside)


@vjp("HardSwish")
def hard_swish(g):
    """y = x * max(0, min(1, x / 6 + 1/2)):  dx = 0 (x < -3), dy (x > 3), dy * (x / 3 + 1/2)
    between."""
    x = g.x()
    middle = g.op("Add", g.op("Mul", x, g.scalar(1 / 3, x)), g.scalar(0.5, x))
    slope = g.op("Where", g.op("Less", x, g.scalar(-3, x)), g.scalar(0, x),
                 g.op("Where", g.op("Greater", x, g.scalar(3, x)), g.scalar(1, x), middle))
    return g.op("Mul", g.dy(), slope)


# --- rectifiers ------------------------------------------------------------------------------------

@vjp("Relu")
def relu(g):
    """y = max(x, 0):  the configured ReLU rule with active = y > 0 (vanilla: dx = dy where
    y > 0). Reading y, not x, lets onnxruntime fuse the Conv before the Relu; see
    backward_forms.relu_active for the measurement."""
    return g.relu_rule(g.dy(), backward_forms.relu_active(g.em, g.x(), g.y()))


@vjp("Clip")
def clip(g):
    """y = min(max(x, lo), hi):  dx = dy where lo < y < hi (the same cells as lo < x < hi).
    With a constant lo = 0 (ReLU6) this goes through the configured ReLU rule."""
    y = g.y()
    low, high = g.x(1), g.x(2)  # inputs from opset 11; attributes before
    if not low and g.attr("min") is not None:
        low = g.scalar(g.attr("min"), y)
    if not high and g.attr("max") is not None:
        high = g.scalar(g.attr("max"), y)
    # a bound of another float type (onnx's version converter writes float32 ones) is cast
    low, high = [g.cast_like(b, y) if b and g.dtype(b) != g.dtype(y) else b for b in (low, high)]
    tests = []
    if low:
        tests.append(g.op("Greater", y, low))
    if high:
        tests.append(g.op("Less", y, high))
    if not tests:
        active = None
    else:
        active = tests[0] if len(tests) == 1 else g.op("And", *tests)
    if is_gated_clip(g.walk.editor, g.node):
        return g.relu_rule(g.dy(), active)
    return g.dy() if active is None else backward_forms.gate(g.em, g.dy(), active)


@vjp("LeakyRelu")
def leaky_relu(g):
    """y = x (x > 0), alpha x (else):  dx = dy (x > 0), alpha dy (else)."""
    x, dy = g.x(), g.dy()
    return g.op("Where", g.op("Greater", x, g.scalar(0, x)), dy,
                g.op("Mul", dy, g.scalar(g.attr("alpha", 0.01), x)))


@vjp("PRelu")
def prelu(g):
    """y = x (x > 0), slope x (else), slope broadcast to x:  dx = dy (x > 0), slope dy (else)."""
    x, dy = g.x(), g.dy()
    return g.op("Where", g.op("Greater", x, g.scalar(0, x)), dy, g.op("Mul", dy, g.x(1)))


# --- selection and variadic ops --------------------------------------------------------------------

@vjp("Where", inputs=(1, 2))
def where(g):
    """y = where(c, a, b):  da = where(c, dy, 0), db = where(c, 0, dy) (c carries none)."""
    condition, dy = g.x(0), g.dy()
    zero = g.scalar(0, g.y())
    return [None,
            g.unbroadcast(g.op("Where", condition, dy, zero), g.x(1)) if g.wants(1) else None,
            g.unbroadcast(g.op("Where", condition, zero, dy), g.x(2)) if g.wants(2) else None]


@vjp("Sum", inputs=None)
def sum_(g):
    """y = x_0 + x_1 + ...:  dx_i = dy."""
    return [g.unbroadcast(g.dy(), name) if g.wants(i) else None
            for i, name in enumerate(g.node.input)]


@vjp("Mean", inputs=None)
def mean(g):
    """y = (x_0 + ... + x_{n-1}) / n:  dx_i = dy / n."""
    share = g.op("Mul", g.dy(), g.scalar(1 / len(g.node.input), g.y()))
    return [g.unbroadcast(share, name) if g.wants(i) else None
            for i, name in enumerate(g.node.input)]


@vjp("Max", "Min", inputs=None)
def max_min(g):
    """y = max(x_0, x_1, ...) (or min):  dx_i = dy where x_i is the first operand equal to y
    (a tie goes to the first; the others get 0)."""
    y, dy = g.y(), g.dy()
    grads, taken = [], None
    for i, name in enumerate(g.node.input):
        if len(g.node.input) == 1:
            return [dy]
        hit = g.op("Equal", name, y)
        first = hit if taken is None else g.op("And", hit, g.op("Not", taken))
        grads.append(g.unbroadcast(backward_forms.gate(g.em, dy, first), name) if g.wants(i)
                     else None)
        if i + 1 < len(g.node.input):
            taken = hit if taken is None else g.op("Or", taken, hit)
    return grads
