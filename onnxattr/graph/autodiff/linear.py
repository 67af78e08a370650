"""Vector-Jacobian rules of the linear ops: Conv, ConvTranspose, Gemm, MatMul, Einsum.

Only input cotangents are built (attribution needs no weight gradient): Conv and
ConvTranspose differentiate their data input only; Gemm, MatMul and Einsum every operand on
the path (either may be the activation).
"""

import numpy as np
from onnx import numpy_helper

from .. import backward_forms
from .registry import vjp


def _window_attributes(g, size, kernel):
    rank = len(kernel)
    strides = list(g.attr("strides") or [1] * rank)
    dilations = list(g.attr("dilations") or [1] * rank)
    pads = backward_forms.explicit_pads(g.attr("auto_pad", "NOTSET"), g.attr("pads"), size,
                                        kernel, strides, dilations)
    return strides, dilations, pads


@vjp("Conv")
def conv(g):
    """y = conv(x, w) + b:  dx = the adjoint convolution of dy (backward_forms.conv_input_grad:
    stride 1 as a Conv with flipped, transposed weights; else a ConvTranspose with the
    output_padding that restores x's size)."""
    x, w = g.x(0), g.x(1)
    weight_shape = g.static_shape(w)
    kernel = list(g.attr("kernel_shape") or weight_shape[2:])
    size = g.static_shape(x, axes=range(2, 2 + len(kernel)))
    strides, dilations, pads = _window_attributes(g, size, kernel)
    out = g.shape(g.y())
    out_size = out[2:] if out and all(isinstance(d, int) for d in out[2:]) else None
    return backward_forms.conv_input_grad(
        g.em, g.dy(), w, size, kernel, strides, pads, dilations, g.attr("group", 1),
        weight_shape, out_size=out_size)


@vjp("ConvTranspose")
def conv_transpose(g):
    """y = conv_transpose(x, w):  dx = conv(dy, w) with the same strides, dilations, group and
    pads (the convolution whose adjoint ConvTranspose is; output_padding cells of y are read by
    no window)."""
    w = g.x(1)
    weight_shape = g.static_shape(w)
    kernel = list(g.attr("kernel_shape") or weight_shape[2:])
    rank = len(kernel)
    strides = list(g.attr("strides") or [1] * rank)
    dilations = list(g.attr("dilations") or [1] * rank)
    auto_pad = g.attr("auto_pad", "NOTSET")
    if g.attr("output_shape") or auto_pad not in ("NOTSET", "VALID"):
        raise g.error("ConvTranspose with output_shape or auto_pad SAME is not supported "
                      "(re-export with explicit pads)")
    pads = [0] * 2 * rank if auto_pad == "VALID" else list(g.attr("pads") or [0] * 2 * rank)
    dx = g.op("Conv", g.dy(), w, kernel_shape=kernel, strides=strides, pads=pads,
              dilations=dilations, group=g.attr("group", 1))
    return dx


@vjp("Gemm", inputs=(0, 1, 2))
def gemm(g):
    """y = alpha a' b' + beta c, a' = a or a^T (transA), b' likewise:
    da = alpha dy b'^T (transposed back with transA), db = alpha a'^T dy (likewise),
    dc = beta dy summed to c's shape. Each is one Gemm with the right trans flags."""
    a, b, dy = g.x(0), g.x(1), g.dy()
    alpha, beta = g.attr("alpha", 1.0), g.attr("beta", 1.0)
    trans_a, trans_b = g.attr("transA", 0), g.attr("transB", 0)
    grads = [None, None, None]
    if g.wants(0):
        grads[0] = (g.op("Gemm", b, dy, alpha=alpha, transA=trans_b, transB=1) if trans_a else
                    g.op("Gemm", dy, b, alpha=alpha, transB=1 - trans_b))
    if g.wants(1):
        grads[1] = (g.op("Gemm", dy, a, alpha=alpha, transA=1, transB=trans_a) if trans_b else
                    g.op("Gemm", a, dy, alpha=alpha, transA=1 - trans_a))
    if g.wants(2):
        scaled = dy if beta == 1.0 else g.op("Mul", dy, g.scalar(beta, g.y()))
        grads[2] = g.unbroadcast(scaled, g.x(2))
    return grads


@vjp("MatMul", inputs=(0, 1))
def matmul(g):
    """y = a @ b (numpy matmul: batched, broadcast, 1-D operands promoted):
    da = dy @ b^T, db = a^T @ dy (last two axes transposed), each summed over the batch axes
    broadcasting added; a 1-D operand is promoted to a matrix (a: [1, k], b: [k, 1]) and the
    promoted axis removed again."""
    a, b, dy = g.x(0), g.x(1), g.dy()
    shape_a, shape_b, shape_y = g.shape(a), g.shape(b), g.shape(g.y())
    if shape_a is None or shape_b is None or shape_y is None:
        raise g.error("the operands' ranks are unknown")
    if len(shape_a) == 1 and len(shape_b) == 1:  # a dot product: y is a scalar
        return [g.op("Mul", dy, b) if g.wants(0) else None,
                g.op("Mul", dy, a) if g.wants(1) else None]
    # promote 1-D operands and the cotangent to matrices
    full_a, full_b = a, b
    if len(shape_a) == 1:
        full_a, shape_a = g.unsqueeze(a, [0]), [1] + shape_a
        dy, shape_y = g.unsqueeze(dy, [-2]), shape_y[:-1] + [1, shape_y[-1]]
    if len(shape_b) == 1:
        full_b, shape_b = g.unsqueeze(b, [1]), shape_b + [1]
        dy, shape_y = g.unsqueeze(dy, [-1]), shape_y + [1]
    batch = shape_y[:-2]
    grads = [None, None]
    if g.wants(0):
        da = g.op("MatMul", dy, _swap_last(g, full_b, len(shape_b)))
        da = g.unbroadcast(da, full_a, grad_shape=batch + shape_a[-2:], target_shape=shape_a)
        grads[0] = da if full_a == a else g.reshape_like(da, a)
    if g.wants(1):
        db = g.op("MatMul", _swap_last(g, full_a, len(shape_a)), dy)
        db = g.unbroadcast(db, full_b, grad_shape=batch + shape_b[-2:], target_shape=shape_b)
        grads[1] = db if full_b == b else g.reshape_like(db, b)
    return grads


def _swap_last(g, name, rank):
    perm = list(range(rank))
    perm[-2:] = perm[-1], perm[-2]
    return g.op("Transpose", name, perm=perm)


@vjp("Einsum", inputs=None)
def einsum(g):
    """y = einsum(eq, x_0, x_1, ...) without ellipses or repeated letters within one operand:
    dx_i = einsum("<y>,<others> -> <x_i>", dy, the other operands); a letter of x_i found
    nowhere else (summed in the forward) is broadcast back by an extra operand of ones of x_i's
    shape."""
    equation = g.attr("equation").replace(" ", "")
    inputs_part, _, output_part = equation.partition("->")
    terms = inputs_part.split(",")
    if "." in equation or any(len(set(t)) != len(t) for t in terms):
        raise g.error(f"Einsum equation '{equation}' has an ellipsis or a diagonal")
    if not _:
        letters = "".join(terms)
        output_part = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    grads = []
    for i, term in enumerate(terms):
        if not g.wants(i):
            grads.append(None)
            continue
        others = [(t, name) for j, (t, name) in enumerate(zip(terms, g.node.input)) if j != i]
        operands = [(output_part, g.dy())] + others
        if set(term) - set("".join(t for t, _ in operands)):
            operands.append((term, g.op("ConstantOfShape", g.op("Shape", g.x(i)),
                                        value=_one(g.dtype(g.x(i))))))
        spec = ",".join(t for t, _ in operands) + "->" + term
        grads.append(g.op("Einsum", *[name for _, name in operands], equation=spec))
    return grads


def _one(dtype):
    return numpy_helper.from_array(np.ones(1, dtype))
