"""Vector-Jacobian rules of pooling: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool."""

import numpy as np

from .. import backward_forms
from .registry import vjp


def _pool_geometry(g):
    """(spatial size, kernel, strides, pads, dilations, output size), all static."""
    kernel = list(g.attr("kernel_shape"))
    rank = len(kernel)
    size = g.static_shape(g.x(), axes=range(2, 2 + rank))
    strides = list(g.attr("strides") or [1] * rank)
    dilations = list(g.attr("dilations") or [1] * rank)
    pads = backward_forms.explicit_pads(g.attr("auto_pad", "NOTSET"), g.attr("pads"), size,
                                        kernel, strides, dilations)
    out = g.shape(g.y())
    if out and all(isinstance(d, int) for d in out[2:]):
        out_size = list(out[2:])
    else:
        out_size = backward_forms.window_output_size(size, kernel, strides, pads, dilations,
                                                     bool(g.attr("ceil_mode", 0)))
    return size, kernel, strides, pads, dilations, out_size


@vjp("MaxPool")
def max_pool(g):
    """y = max over each window of x:  dx = dy routed to each window's first maximum (scan
    order, as onnxruntime breaks ties), overlapping windows adding up
    (backward_forms.max_pool_grad). The Indices output carries no gradient."""
    size, kernel, strides, pads, dilations, out_size = _pool_geometry(g)
    return backward_forms.max_pool_grad(g.em, g.x(), g.y(), g.dy(), size, kernel, strides,
                                        pads, dilations, out_size)


@vjp("AveragePool")
def average_pool(g):
    """y = mean over each window of x:  dx = each window's dy / (its cell count: inside x, or
    inside the padded x with count_include_pad) spread over its cells
    (backward_forms.average_pool_grad)."""
    size, kernel, strides, pads, dilations, out_size = _pool_geometry(g)
    return backward_forms.average_pool_grad(g.em, g.x(), g.dy(), size, kernel, strides, pads,
                                            dilations, out_size,
                                            bool(g.attr("count_include_pad", 0)))


@vjp("GlobalAveragePool")
def global_average_pool(g):
    """y[n, c] = mean of x[n, c, ...]:  dx = expand(dy) / (number of spatial cells)."""
    x = g.x()
    spatial = g.shape(x)[2:]
    if all(isinstance(d, int) for d in spatial):
        share = g.op("Mul", g.dy(), g.scalar(1.0 / max(int(np.prod(spatial)), 1), x))
    else:
        count = g.op("ReduceProd", g.op("Shape", x, start=2), keepdims=0)
        share = g.op("Div", g.dy(), g.cast_like(count, x))
    return g.op("Expand", share, g.op("Shape", x))


@vjp("GlobalMaxPool")
def global_max_pool(g):
    """y[n, c] = max of x[n, c, ...]:  dx = dy at the first maximum of each x[n, c] (ArgMax
    over the flattened spatial cells), 0 elsewhere."""
    x = g.x()
    flat = g.op("Reshape", x, g.ints([0, 0, -1]))
    first = g.op("ArgMax", flat, axis=2, keepdims=1)
    cells = g.op("Shape", flat, start=2)
    number = g.op("Range", g.const(np.array(0, np.int64)),
                  g.op("Squeeze", cells, g.ints([0])), g.const(np.array(1, np.int64)))
    chosen = g.op("Equal", first, number)
    routed = g.op("Where", chosen, g.op("Reshape", g.dy(), g.ints([0, 0, 1])), g.scalar(0, x))
    return g.op("Reshape", routed, g.op("Shape", x))
