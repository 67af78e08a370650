"""Vector-Jacobian rules of the Reduce ops: axes as an attribute (ReduceSum before opset 13,
the others before 18) or as a constant input, keepdims either way, noop_with_empty_axes.

Each rule first brings dy back to the kept-dims shape (`_kept`), then broadcasts it over x.
"""

import numpy as np

from .registry import vjp


def _axes(g):
    """The reduced axes of x (normalized, sorted), or None for no reduction at all."""
    rank = g.rank(g.x())
    if len(g.node.input) > 1 and g.x(1):
        axes = g.constant(g.x(1), "axes")
        axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    else:
        axes = g.attr("axes")
        axes = list(axes) if axes is not None else []
    if not axes:
        if g.attr("noop_with_empty_axes", 0):
            return None
        return list(range(rank))
    return sorted(a % rank for a in axes)


def _kept(g, value, axes):
    """`value` (a reduced-shape tensor, dy or y) with the reduced axes as size-1 axes."""
    if g.attr("keepdims", 1):
        return value
    return g.unsqueeze(value, axes)


def _count(g, axes):
    shape = g.shape(g.x())
    dims = [shape[a] for a in axes]
    if all(isinstance(d, int) for d in dims):
        return g.scalar(1.0 / max(int(np.prod(dims)), 1), g.x()), "Mul"
    cells = g.op("ReduceProd", g.op("Gather", g.op("Shape", g.x()), g.ints(axes)), keepdims=0)
    return g.cast_like(cells, g.x()), "Div"


@vjp("ReduceSum")
def reduce_sum(g):
    """y = sum of x over axes:  dx = dy broadcast over the reduced axes."""
    axes = _axes(g)
    if axes is None:
        return g.dy()
    return g.op("Expand", _kept(g, g.dy(), axes), g.op("Shape", g.x()))


@vjp("ReduceMean")
def reduce_mean(g):
    """y = mean of x over axes:  dx = dy / (number of reduced cells), broadcast."""
    axes = _axes(g)
    if axes is None:
        return g.dy()
    factor, op = _count(g, axes)
    return g.op("Expand", g.op(op, _kept(g, g.dy(), axes), factor), g.op("Shape", g.x()))


@vjp("ReduceMax", "ReduceMin")
def reduce_max_min(g):
    """y = max (min) of x over axes:  dx = dy / t at the t cells equal to y, 0 elsewhere (ties
    share the gradient evenly, as torch's amax does)."""
    axes = _axes(g)
    if axes is None:
        return g.dy()
    x = g.x()
    hit = g.cast_like(g.op("Equal", x, _kept(g, g.y(), axes)), x)
    ties = g.reduce_sum(hit, axes, keepdims=1)
    return g.op("Mul", hit, g.op("Div", _kept(g, g.dy(), axes), ties))


@vjp("ReduceSumSquare")
def reduce_sum_square(g):
    """y = sum of x^2 over axes:  dx = 2 x dy."""
    axes = _axes(g)
    x = g.x()
    dy = g.dy() if axes is None else _kept(g, g.dy(), axes)
    return g.op("Mul", g.op("Mul", x, g.scalar(2, x)), dy)


@vjp("ReduceL2")
def reduce_l2(g):
    """y = sqrt(sum of x^2):  dx = dy x / y."""
    axes = _axes(g)
    x = g.x()
    if axes is None:
        return g.op("Mul", g.dy(), g.op("Sign", x))
    return g.op("Mul", x, g.op("Div", _kept(g, g.dy(), axes), _kept(g, g.y(), axes)))


@vjp("ReduceL1")
def reduce_l1(g):
    """y = sum of |x|:  dx = dy sign(x)."""
    axes = _axes(g)
    x = g.x()
    dy = g.dy() if axes is None else _kept(g, g.dy(), axes)
    return g.op("Mul", g.op("Sign", x), dy)


@vjp("ReduceLogSumExp")
def reduce_log_sum_exp(g):
    """y = log(sum of exp(x)):  dx = dy exp(x - y)."""
    axes = _axes(g)
    x = g.x()
    if axes is None:
        return g.dy()
    weight = g.op("Exp", g.op("Sub", x, _kept(g, g.y(), axes)))
    return g.op("Mul", weight, _kept(g, g.dy(), axes))
