"""int8 models: the facts about QuantizeLinear/DequantizeLinear that the gradient builders use.

onnxruntime's static quantizer in QDQ format (the usual CPU deployment form) leaves a float graph
with each activation passed through QuantizeLinear -> DequantizeLinear,
y = (saturate(round(x / s) + zp) - zp) s. The native builder keeps that forward as it is and
differentiates the pair with the clipped straight-through estimator (autodiff/quantize.py): y is
read as clip(x, lo, hi) with

    lo = (qmin - zp) s,  hi = (qmax - zp) s     (qmin, qmax: the integer type's range)

so dx = dy where lo <= x <= hi, else 0 (Bengio, Leonard & Courville 2013 for the
straight-through estimator; Hubara et al. 2016 and Jacob et al. 2018 for the clipped form).

The quantizer drops each Relu (and ReLU6's Clip) into the QuantizeLinear after it, whose range
then starts at 0 (zp = qmin): that clip at 0 is the ReLU. `rectifies` tells those nodes apart
from the other Q nodes whose range starts at 0 (the ones after a Relu it kept, after pooling of
rectified values, after a Softmax): a rectifier clips a tensor that can be negative.

QOperator models (QLinearConv, QLinearMatMul, QGemm, ConvInteger, MatMulInteger, ...) compute
in integers between the Q and DQ nodes: refused when the model is loaded
(onnxattr.io.quantized), and by the native builder given such a graph
(`refuse_quantized_operators`).
"""

import numpy as np

from ..errors import OnnxAttrError
from ..io.quantized import is_integer_operator
from .toolkit import attribute

QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
# ops whose output is never negative, and those whose output is where all their float inputs are
NON_NEGATIVE = frozenset({"Relu", "Softmax", "Sigmoid", "HardSigmoid", "Exp", "Abs", "Sqrt",
                          "Softplus"})
KEEP_NON_NEGATIVE = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
    "Transpose", "Squeeze", "Unsqueeze", "Identity", "Resize", "Slice", "Gather", "Pad",
    "Expand", "Tile", "Concat", "Split", "Add", "Mul", "Div", "Max", "Min", "Sum", "Mean",
    "Clip", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "DepthToSpace",
    "SpaceToDepth"})


def refuse_quantized_operators(nodes, wrt, output):
    """OnnxAttrError naming the first QOperator node of `nodes` (through which `output` depends
    on `wrt`)."""
    for node in nodes:
        if is_integer_operator(node):
            raise OnnxAttrError(
                f"'{output}' depends on '{wrt}' through {node.op_type} node '{node.name}', an "
                "integer op (QOperator format) that onnxattr cannot differentiate: quantize the "
                "model in QDQ format (onnxruntime.quantization.quantize_static with "
                "quant_format=QuantFormat.QDQ), or explain the float model")


def integer_range(editor, node):
    """(qmin, qmax) of the integer type of a Q or DQ node: its zero point's, else (no zero
    point) that of its integer tensor."""
    zero_point = _zero_point(editor, node)
    name = node.output[0] if node.op_type == QUANTIZE else node.input[0]
    dtype = zero_point.dtype if zero_point is not None else np.dtype(editor.dtype(name))
    if not np.issubdtype(dtype, np.integer) or dtype.itemsize > 2:
        raise _error(node, f"it quantizes to {dtype}; onnxattr differentiates 8- and 16-bit "
                     "integer quantization only")
    info = np.iinfo(dtype)
    return info.min, info.max


def _zero_point(editor, node):
    """The zero point's value (None when absent); an error when it is not a constant."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    value = editor.value(node.input[2])
    if value is None:
        raise _error(node, "its zero point must be a constant")
    return np.asarray(value)


def scale_and_zero_point(editor, node, like_rank):
    """(scale, zero point) of a Q or DQ node as float64 arrays shaped to broadcast against its
    float tensor of rank `like_rank` (per tensor: scalars; per axis: along `axis`, which needs
    the rank: None when unknown)."""
    if attribute(node, "block_size", 0):
        raise _error(node, "blocked quantization (block_size) is not supported")
    scale = editor.value(node.input[1])
    if scale is None:
        raise _error(node, "its scale must be a constant")
    zero_point = _zero_point(editor, node)
    scale = np.asarray(scale, np.float64)
    zero_point = np.zeros(()) if zero_point is None else zero_point.astype(np.float64)
    if scale.size == 1:
        return scale.reshape(()), zero_point.reshape(())
    if like_rank is None:
        raise _error(node, f"the rank of its input '{node.input[0]}' is unknown")
    shape = [1] * like_rank
    shape[attribute(node, "axis", 1) % like_rank] = scale.size
    return scale.reshape(shape), zero_point.reshape(shape if zero_point.size > 1 else ())


def clip_range(editor, node, like_rank):
    """(lo, hi, scale): the float range a Q or DQ node's integers stand for, lo = (qmin - zp) s,
    hi = (qmax - zp) s, and its scale, as float64 arrays (see scale_and_zero_point)."""
    qmin, qmax = integer_range(editor, node)
    scale, zero_point = scale_and_zero_point(editor, node, like_rank)
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale, scale


def starts_at_zero(editor, node):
    """Whether a Q or DQ node's integers stand for values >= 0 only (zp = qmin everywhere)."""
    qmin, _ = integer_range(editor, node)
    zero_point = _zero_point(editor, node)
    return bool(np.all((0 if zero_point is None else zero_point) == qmin))


def rectifies(editor, node):
    """Whether QuantizeLinear `node` is a rectifier: its range starts at 0 and its input can be
    negative (not known non-negative: see `non_negative`)."""
    return (node.op_type == QUANTIZE and starts_at_zero(editor, node)
            and not non_negative(editor, node.input[0]))


def non_negative(editor, name, known=None):
    """Whether tensor `name` is never negative, as the graph shows: a graph input (onnxattr feeds
    pixels 0..255), a constant >= 0, the output of an op in NON_NEGATIVE, of a Clip with a
    constant min >= 0, of a DequantizeLinear whose range starts at 0, or of an op in
    KEEP_NON_NEGATIVE whose float inputs are all never negative."""
    known = {} if known is None else known  # the answers so far, for shared branches
    if name not in known:
        known[name] = _non_negative(editor, name, known)
    return known[name]


def _non_negative(editor, name, known):
    value = editor.value(name)
    if value is not None:
        return bool(np.all(np.asarray(value) >= 0))
    node = editor.producer(name)
    if node is None:
        return True  # a graph input: pixels
    if node.op_type in NON_NEGATIVE:
        return True
    if node.op_type == DEQUANTIZE:
        return starts_at_zero(editor, node)
    if node.op_type == "Clip":
        low = editor.value(node.input[1]) if len(node.input) > 1 and node.input[1] else \
            attribute(node, "min")
        if low is not None and np.all(np.asarray(low) >= 0):
            return True
    if node.op_type in KEEP_NON_NEGATIVE:
        floats = [i for i in node.input if i and np.issubdtype(editor.dtype(i), np.floating)]
        return all(non_negative(editor, i, known) for i in floats)
    return False


def _error(node, what):
    return OnnxAttrError(f"onnxattr cannot differentiate {node.op_type} node '{node.name}': {what}")
