"""Vector-Jacobian rules of normalizations: BatchNormalization (inference),
InstanceNormalization, LayerNormalization, LRN, Softmax and LogSoftmax.

Only the data input differentiates; scale, bias and statistics inputs are parameters.
"""

import numpy as np

from .. import backward_forms
from .registry import vjp


@vjp("BatchNormalization")
def batch_normalization(g):
    """y = (x - mean) / sqrt(var + eps) * scale + bias, per channel (axis 1), statistics
    constant (inference):  dx = dy * scale / sqrt(var + eps)."""
    if g.attr("training_mode", 0):
        raise g.error("BatchNormalization in training mode is not supported")
    x = g.x()
    rank = g.rank(x)
    eps = g.attr("epsilon", 1e-5)
    scale, var = g.value(g.x(1)), g.value(g.x(4))
    if scale is not None and var is not None:
        factor = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps))
        factor = g.const(factor.reshape(-1, *[1] * (rank - 2)), x, "bn_factor")
    else:
        root = g.op("Sqrt", g.op("Add", g.cast_like(g.x(4), x), g.scalar(eps, x)))
        factor = g.op("Reshape", g.op("Div", g.cast_like(g.x(1), x), root),
                      g.ints([-1] + [1] * (rank - 2)))
    return g.op("Mul", g.dy(), factor)


def _normalized_backward(g, x, dxhat, axes, count):
    """The cotangent of x for x_hat = (x - mean) / sqrt(var + eps) over `axes`, given the
    cotangent of x_hat: (dxhat - mean(dxhat) - x_hat * mean(dxhat * x_hat)) / sqrt(var + eps).
    Returns (dx, x_hat, inverse std) so that extra outputs can reuse them."""
    centered = g.op("Sub", x, _mean(g, x, axes, count))
    var = _mean(g, g.op("Mul", centered, centered), axes, count)
    eps = g.scalar(g.attr("epsilon", 1e-5), x)
    inv_std = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, eps)))
    xhat = g.op("Mul", centered, inv_std)
    term = g.op("Add", _mean(g, dxhat, axes, count),
                g.op("Mul", xhat, _mean(g, g.op("Mul", dxhat, xhat), axes, count)))
    return g.op("Mul", g.op("Sub", dxhat, term), inv_std), xhat, inv_std


def _mean(g, value, axes, count):
    """Mean over `axes` (keepdims): ReduceSum times 1/count with a static count, else
    ReduceMean."""
    if count is not None:
        return g.op("Mul", g.reduce_sum(value, axes), g.scalar(1.0 / count, g.x()))
    return g.reduce("ReduceMean", value, axes)


def _count(g, x, axes):
    shape = g.shape(x)
    dims = [shape[a] for a in axes]
    return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None


@vjp("InstanceNormalization")
def instance_normalization(g):
    """y = x_hat * scale[c] + bias[c], x_hat normalized over the spatial axes of each (n, c):
    dx_hat = dy * scale, dx = (dx_hat - mean(dx_hat) - x_hat mean(dx_hat x_hat)) / std."""
    x = g.x()
    rank = g.rank(x)
    axes = list(range(2, rank))
    scale = g.op("Reshape", g.x(1), g.ints([-1] + [1] * (rank - 2)))
    dxhat = g.op("Mul", g.dy(), scale)
    return _normalized_backward(g, x, dxhat, axes, _count(g, x, axes))[0]


@vjp("LayerNormalization")
def layer_normalization(g):
    """y = x_hat * scale + bias, x_hat normalized over the axes from `axis` on; optional
    outputs mean and inv_std_dev r = (var + eps)^-1/2:
    dx = (dx_hat - mean(dx_hat) - x_hat mean(dx_hat x_hat)) r with dx_hat = dy * scale,
    plus dmean / count (from the mean output) and -dr r^2 x_hat / count (from inv_std_dev)."""
    x = g.x()
    rank = g.rank(x)
    axis = g.attr("axis", -1)
    axes = list(range(axis % rank, rank))
    count = _count(g, x, axes)
    dy = g.dy(0) or g.zeros_like(g.y(0))
    dxhat = g.op("Mul", dy, g.x(1))
    dx, xhat, inv_std = _normalized_backward(g, x, dxhat, axes, count)
    extra = []
    if g.dy(1):  # mean output
        extra.append(_spread(g, g.cast_like(g.dy(1), x), x, axes, count))
    if g.dy(2):  # inverse standard deviation output
        dr = g.cast_like(g.dy(2), x)
        extra.append(_spread(g, g.op("Neg", g.op("Mul", dr, g.op("Mul", inv_std, inv_std))),
                             x, axes, count, xhat))
    for term in extra:
        dx = g.op("Add", dx, term)
    return dx


def _spread(g, value, x, axes, count, times=None):
    """value (kept-dims statistic shape) / count broadcast over x (times `times`)."""
    if count is not None:
        share = g.op("Mul", value, g.scalar(1.0 / count, x))
    else:
        cells = g.op("ReduceProd", g.op("Gather", g.op("Shape", x), g.ints(axes)), keepdims=0)
        share = g.op("Div", value, g.cast_like(cells, x))
    if times is not None:
        return g.op("Mul", times, share)
    return g.op("Expand", share, g.op("Shape", x))


@vjp("LRN")
def lrn(g):
    """y = x d^-beta, d = bias + alpha / size * S, S_c = sum of x^2 over the channel window
    [c - (size-1)//2, c + size//2]:
    dx = dy d^-beta - 2 alpha beta / size * x * S'(dy x d^-beta / d), where S' sums over the
    transposed window [c - size//2, c + (size-1)//2]. A window sum is a 1x1 Conv with a band
    of ones (backward_forms.channel_window_weights) where C is static, else a Sum of `size`
    channel Slices of the zero-padded tensor; d^-beta is exp(-beta ln d): at GoogLeNet's
    conv2/norm2 (192x56x56) the two window sums took 13.6 ms as a Conv over [N, 1, C, H*W]
    and the Pow 21 ms."""
    x, dy = g.x(), g.dy()
    size = g.attr("size")
    alpha, beta, bias = g.attr("alpha", 1e-4), g.attr("beta", 0.75), g.attr("bias", 1.0)
    before, after = (size - 1) // 2, size // 2
    rank = g.rank(x)

    channels = g.shape(x)[1]

    def window_sum(value, pads):
        if isinstance(channels, int) and rank > 2:
            weights = backward_forms.channel_window_weights(channels, *pads, g.dtype(x))
            return g.op("Conv", value, g.const(weights.reshape(channels, channels,
                                                               *[1] * (rank - 2))),
                        kernel_shape=[1] * (rank - 2))
        count = g.op("Shape", x, start=1, end=2)
        padded = g.op("Pad", value, g.ints([0, pads[0]] + [0] * (rank - 2) +
                                           [0, pads[1]] + [0] * (rank - 2)))
        parts = [g.op("Slice", padded, g.ints([k]), g.op("Add", count, g.ints([k])),
                      g.ints([1])) for k in range(size)]
        return parts[0] if size == 1 else g.op("Sum", *parts)

    squares = window_sum(g.op("Mul", x, x), (before, after))
    d = g.op("Add", g.op("Mul", squares, g.scalar(alpha / size, x)), g.scalar(bias, x))
    power = g.op("Exp", g.op("Mul", g.op("Log", d), g.scalar(-beta, x)))  # d^-beta
    scaled = g.op("Mul", dy, power)
    spread = window_sum(g.op("Div", g.op("Mul", scaled, x), d), (after, before))
    return g.op("Sub", scaled,
                g.op("Mul", g.op("Mul", x, spread), g.scalar(2 * alpha * beta / size, x)))


def _softmax_axes(g):
    """The axis a (Log)Softmax normalizes over. The graph is at opset >= 17 (an older model is
    converted first, which rewrites a Softmax of opset < 13, over every axis from `axis` on,
    into opset-13 ops), so `axis` alone."""
    return [g.attr("axis", -1) % g.rank(g.x())]


@vjp("Softmax")
def softmax(g):
    """y = exp(x) / sum(exp(x)):  dx = y * (dy - sum(dy * y)) over the softmax axes."""
    y, dy = g.y(), g.dy()
    total = g.reduce_sum(g.op("Mul", dy, y), _softmax_axes(g))
    return g.op("Mul", y, g.op("Sub", dy, total))


@vjp("LogSoftmax")
def log_softmax(g):
    """y = x - log(sum(exp(x))):  dx = dy - exp(y) * sum(dy) over the softmax axes."""
    y, dy = g.y(), g.dy()
    total = g.reduce_sum(dy, _softmax_axes(g))
    return g.op("Sub", dy, g.op("Mul", g.op("Exp", y), total))
