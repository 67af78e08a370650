"""Portable attribution models: gradient graphs lowered to standard ONNX ops.

The gradient builder of onnxruntime-training emits training-only ops (com.microsoft ConvGrad,
ReluGrad, SoftmaxGrad_13, Scale, GatherGrad, the onnx-domain MaxPoolGrad that only the
training build registers). `lower_graph` replaces each of them by standard ai.onnx ops, one rule
per op in `LOWERING_RULES` (found by op type, as onnx's reference evaluator finds its kernels):

    ConvGrad(dY, X, W)        dX = the adjoint convolution (backward_forms.conv_input_grad:
                              stride 1 a Conv with flipped, transposed weights, else a
                              ConvTranspose with the output_padding that restores X's size)
    ReluGrad(dY, Y)           dX = dY * (Y > 0) (backward_forms.gate)
    MaxPoolGrad(dY, Indices)  dX = the flattened zeros of X's size, dY scatter-added at the
                              forward MaxPool's Indices (backward_forms.max_pool_grad, form
                              "indices")
    SoftmaxGrad_13(dY, Y)     dX = Y * (dY - ReduceSum(dY * Y, axis))
    SoftmaxGrad(dY, Y)        the same on the input coerced to 2-D at `axis` (opset < 13)
    LogSoftmaxGrad_13(dY, Y)  dX = dY - Exp(Y) * ReduceSum(dY, axis)
    Scale(X, s)               X * s, or X / s with scale_down
    GatherGrad(shape, I, dY)  zeros(shape) with dY scatter-added at I along `axis`

Only the outputs the graph uses are lowered (ConvGrad's dW and dB are requested by the builder
but unused here); a used output without a rule, or an op without a rule, is an OnnxAttrError
naming it. The builder also makes every forward MaxPool output its Indices, which only a
MaxPoolGrad reads: the others lose them again (a layer's gradient for Grad-CAM reads none, and
GoogLeNet's MaxPools run 13.5 ms with Indices against 0.6 ms without). Shapes come from shape
inference with constant propagation (graph.infer_shapes), so the forward tensors of models
whose reshapes are computed in the graph (ShuffleNet's channel shuffle) still have static
spatial sizes.
"""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxAttrError
from . import backward_forms
from .toolkit import (
    MAX_IR_VERSION,
    MIN_OPSET,
    Emitter,
    GraphEditor,
    attributes,
    copy_model,
    default_opset,
    is_standard,
    prune,
)


class Lowering:
    """What a rule sees: the graph editor, static shapes, producers, and which tensors are used."""

    def __init__(self, model):
        self.editor = GraphEditor(model)
        self.used = {i for n in model.graph.node for i in n.input} | {
            o.name for o in model.graph.output}
        self._consts = {}

    def shape(self, name):
        """The inferred shape of `name`: a list of ints or None per dim; None if unknown."""
        return self.editor.inferred_shape(name)

    def producer(self, name):
        return self.editor.producer(name)

    def spatial(self, name, node, what):
        """Static spatial dims (all but N, C) of `name`, or an error naming the node."""
        shape = self.shape(name)
        if not shape or len(shape) < 3 or any(d is None for d in shape[2:]):
            raise OnnxAttrError(f"cannot lower {node.op_type} node '{node.name}': the {what} "
                                f"'{name}' has no static spatial shape (shape inference cannot "
                                "follow the model's reshapes; use --builder native)")
        return shape[2:]

    def const(self, base, array):
        """A shared initializer for a small constant (one per distinct value)."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.editor.constant(f"lower/{base}", array)
        return self._consts[key]

    def tmp(self, node, what):
        return self.editor.unique(f"{node.name or node.op_type}/{what}")

    def make(self, op_type, inputs, outputs, node, **attrs):
        return self.editor.node(op_type, inputs, outputs, node.name or node.op_type, **attrs)

    def needed(self, name):
        return bool(name) and name in self.used

    def emitter(self, node):
        """An Emitter for the nodes of one rule (backward_forms functions emit through it)."""
        return Emitter(self.editor, prefix=f"{node.name or node.op_type}/")

    def finish(self, em, result, output, node):
        """The emitted nodes, with `result` written to the rule's `output` name."""
        return em.nodes + [self.make("Identity", [result], [output], node)]


def _window(node, attrs, size, kernel):
    """The forward Conv's or MaxPool's (strides, begin+end pads, dilations), auto_pad resolved
    against the static input size."""
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise OnnxAttrError(f"cannot lower {node.op_type} node '{node.name}': auto_pad {auto_pad}")
    pads = backward_forms.explicit_pads(auto_pad, attrs.get("pads"), size, kernel, strides,
                                        dilations)
    return strides, pads, dilations


def _only_first_output(low, node, what="dX"):
    for extra in node.output[1:]:
        if low.needed(extra):
            raise OnnxAttrError(f"cannot lower {node.op_type} node '{node.name}': its output "
                                f"'{extra}' is used, and only {what} has a lowering rule")


def lower_conv_grad(low, node):
    """dX of Conv: the adjoint convolution of dY (backward_forms.conv_input_grad)."""
    _only_first_output(low, node)
    dy, x, w = node.input[:3]
    dx = node.output[0]
    if not low.needed(dx):
        return []
    attrs = attributes(node)
    size = low.spatial(x, node, "input")
    weight_shape = low.shape(w)
    kernel = list(attrs.get("kernel_shape") or (weight_shape or [None, None])[2:])
    if not kernel or any(k is None for k in kernel):
        raise OnnxAttrError(f"cannot lower ConvGrad node '{node.name}': unknown kernel shape")
    if not weight_shape or any(d is None for d in weight_shape):
        raise OnnxAttrError(f"cannot lower ConvGrad node '{node.name}': unknown weight shape")
    strides, pads, dilations = _window(node, attrs, size, kernel)
    em = low.emitter(node)
    result = backward_forms.conv_input_grad(em, dy, w, size, kernel, strides, pads, dilations,
                                            attrs.get("group", 1), list(weight_shape))
    return low.finish(em, result, dx, node)


def lower_relu_grad(low, node):
    """dX = dY where T > 0, else 0 (the builder passes the Relu's output or its input as T)."""
    dy, t = node.input
    em = low.emitter(node)
    backward_forms.gate(em, dy, backward_forms.relu_active(em, t, t), out=node.output[0])
    return em.nodes


def lower_max_pool_grad(low, node):
    """dY scatter-added at the forward MaxPool's flat Indices into zeros of X's size
    (backward_forms.max_pool_grad's default form "indices"; its other forms, which read X and
    Y instead, for the benchmarks).

    Indices count over the whole N*C*H*W input (row-major, storage_order 0), so overlapping
    windows that pick the same cell add up, as MaxPoolGrad does.
    """
    dy, indices = node.input[:2]
    pool = low.producer(indices)
    if pool is None or pool.op_type != "MaxPool" or list(pool.output[1:2]) != [indices]:
        raise OnnxAttrError(f"cannot lower MaxPoolGrad node '{node.name}': its Indices do not "
                            "come from a forward MaxPool")
    attrs = attributes(pool)
    if attrs.get("storage_order", 0) != 0:
        raise OnnxAttrError(f"cannot lower MaxPoolGrad node '{node.name}': MaxPool "
                            f"'{pool.name}' has storage_order 1")
    em = low.emitter(node)
    size = low.spatial(pool.input[0], node, "input")
    kernel = list(attrs["kernel_shape"])
    strides, pads, dilations = _window(pool, attrs, size, kernel)
    out_size = backward_forms.window_output_size(size, kernel, strides, pads, dilations,
                                                 bool(attrs.get("ceil_mode", 0)))
    result = backward_forms.max_pool_grad(em, pool.input[0], pool.output[0], dy, size, kernel,
                                          strides, pads, dilations, out_size, indices=indices)
    return low.finish(em, result, node.output[0], node)


def _softmax_grad(low, node, dy, y, dx, axis):
    axes = low.const(f"axis{axis}", np.array([axis], np.int64))
    t = {k: low.tmp(node, k) for k in ("dy_y", "sum", "centered")}
    return [low.make("Mul", [dy, y], [t["dy_y"]], node),
            low.make("ReduceSum", [t["dy_y"], axes], [t["sum"]], node, keepdims=1),
            low.make("Sub", [dy, t["sum"]], [t["centered"]], node),
            low.make("Mul", [y, t["centered"]], [dx], node)]


def lower_softmax_grad_13(low, node):
    """dX = Y * (dY - sum(dY * Y, axis))."""
    dy, y = node.input[:2]
    return _softmax_grad(low, node, dy, y, node.output[0], attributes(node).get("axis", -1))


def lower_softmax_grad(low, node):
    """Opset < 13 semantics: the softmax ran over all axes from `axis` on (coerced to 2-D)."""
    dy, y = node.input[:2]
    axis = attributes(node).get("axis", 1)
    t = {k: low.tmp(node, k) for k in ("dy2d", "y2d", "dx2d", "shape")}
    return [low.make("Flatten", [dy], [t["dy2d"]], node, axis=axis),
            low.make("Flatten", [y], [t["y2d"]], node, axis=axis),
            *_softmax_grad(low, node, t["dy2d"], t["y2d"], t["dx2d"], 1),
            low.make("Shape", [dy], [t["shape"]], node),
            low.make("Reshape", [t["dx2d"], t["shape"]], [node.output[0]], node)]


def lower_log_softmax_grad_13(low, node):
    """dX = dY - exp(Y) * sum(dY, axis)."""
    dy, y = node.input[:2]
    axes = low.const(f"axis{attributes(node).get('axis', -1)}",
                     np.array([attributes(node).get("axis", -1)], np.int64))
    t = {k: low.tmp(node, k) for k in ("sum", "prob", "scaled")}
    return [low.make("ReduceSum", [dy, axes], [t["sum"]], node, keepdims=1),
            low.make("Exp", [y], [t["prob"]], node),
            low.make("Mul", [t["prob"], t["sum"]], [t["scaled"]], node),
            low.make("Sub", [dy, t["scaled"]], [node.output[0]], node)]


def lower_scale(low, node):
    """X * scale, or X / scale with scale_down (the scale may be an integer tensor)."""
    x, scale = node.input[:2]
    as_float = low.tmp(node, "scale")
    op = "Div" if attributes(node).get("scale_down", 0) else "Mul"
    return [low.make("Cast", [scale], [as_float], node, to=TensorProto.FLOAT),
            low.make(op, [x, as_float], [node.output[0]], node)]


def lower_gather_grad(low, node):
    """zeros(shape) with dY scatter-added at the (possibly repeated, negative) indices on `axis`.

    dY has shape shape[:axis] + I.shape + shape[axis+1:]; it is reshaped so the index axis is
    one flat axis of I.size entries, the indices broadcast over the other axes, and
    ScatterElements(reduction "add") accumulates repeated indices.
    """
    shape, indices, dy = node.input[:3]
    axis = attributes(node).get("axis", 0)
    rank = (low.shape(shape) or [None])[0]
    if rank is None:
        raise OnnxAttrError(f"cannot lower GatherGrad node '{node.name}': unknown input rank")
    axis = axis + rank if axis < 0 else axis
    t = {k: low.tmp(node, k) for k in ("dim", "flat_i", "i64", "negative", "wrapped", "fixed_i",
                                      "index_shape", "shaped_i", "dy_shape", "flat_dy",
                                      "updates_shape", "expanded_i", "zeros")}
    starts, ends = low.const(f"at{axis}", np.array([axis], np.int64)), low.const(
        f"at{axis + 1}", np.array([axis + 1], np.int64))
    begin, end = low.const("at0", np.array([0], np.int64)), low.const(
        "at_end", np.array([np.iinfo(np.int64).max], np.int64))
    flat = low.const("flat", np.array([-1], np.int64))
    zero = low.const("zero_i64", np.int64(0))
    ones_before = low.const(f"ones{axis}", np.ones(axis, np.int64))
    ones_after = low.const(f"ones{rank - axis - 1}", np.ones(rank - axis - 1, np.int64))
    head, tail = low.tmp(node, "head"), low.tmp(node, "tail")
    return [
        low.make("Slice", [shape, starts, ends], [t["dim"]], node),
        low.make("Reshape", [indices, flat], [t["flat_i"]], node),
        low.make("Cast", [t["flat_i"]], [t["i64"]], node, to=TensorProto.INT64),
        low.make("Less", [t["i64"], zero], [t["negative"]], node),
        low.make("Add", [t["i64"], t["dim"]], [t["wrapped"]], node),
        low.make("Where", [t["negative"], t["wrapped"], t["i64"]], [t["fixed_i"]],
                 node),
        low.make("Concat", [ones_before, flat, ones_after], [t["index_shape"]], node, axis=0),
        low.make("Reshape", [t["fixed_i"], t["index_shape"]], [t["shaped_i"]], node),
        low.make("Slice", [shape, begin, starts], [head], node),
        low.make("Slice", [shape, ends, end], [tail], node),
        low.make("Concat", [head, flat, tail], [t["dy_shape"]], node, axis=0),
        low.make("Reshape", [dy, t["dy_shape"]], [t["flat_dy"]], node),
        low.make("Shape", [t["flat_dy"]], [t["updates_shape"]], node),
        low.make("Expand", [t["shaped_i"], t["updates_shape"]], [t["expanded_i"]], node),
        low.make("ConstantOfShape", [shape], [t["zeros"]], node,
                 value=numpy_helper.from_array(np.zeros(1, np.float32))),
        low.make("ScatterElements", [t["zeros"], t["expanded_i"], t["flat_dy"]],
                 [node.output[0]], node, axis=axis, reduction="add"),
    ]


def lower_sigmoid_grad(low, node):
    """dX = dY * Y * (1 - Y)."""
    dy, y = node.input[:2]
    t = {k: low.tmp(node, k) for k in ("complement", "slope")}
    return [low.make("Sub", [low.const("one", np.float32(1)), y], [t["complement"]], node),
            low.make("Mul", [y, t["complement"]], [t["slope"]], node),
            low.make("Mul", [dy, t["slope"]], [node.output[0]], node)]


LOWERING_RULES = {
    "ConvGrad": lower_conv_grad,
    "ReluGrad": lower_relu_grad,
    "MaxPoolGrad": lower_max_pool_grad,
    "SoftmaxGrad_13": lower_softmax_grad_13,
    "SoftmaxGrad": lower_softmax_grad,
    "LogSoftmaxGrad_13": lower_log_softmax_grad_13,
    "Scale": lower_scale,
    "GatherGrad": lower_gather_grad,
    "SigmoidGrad": lower_sigmoid_grad,
}


def lower_graph(model, opset=MIN_OPSET):
    """A copy of `model` with every non-standard op replaced by standard ai.onnx ops.

    Unused nodes, initializers and inputs are removed; the result imports only the default
    domain at `opset` (the model's own default opset when higher) and IR version <= 10.
    """
    lowered = copy_model(model)
    low = Lowering(lowered)
    nodes = []
    for node in lowered.graph.node:
        if is_standard(node):
            nodes.append(node)
            continue
        rule = LOWERING_RULES.get(node.op_type)
        if rule is None:
            raise OnnxAttrError(f"no lowering rule for training op {node.domain or 'ai.onnx'}::"
                                f"{node.op_type} (node '{node.name}'): cannot make a portable "
                                f"model (rules exist for {', '.join(sorted(LOWERING_RULES))}); "
                                "use --builder native")
        nodes.extend(rule(low, node))
    low.editor.set_nodes(nodes)
    prune(lowered)
    _drop_unread_indices(lowered)
    own = default_opset(model) or opset
    del lowered.opset_import[:]
    lowered.opset_import.append(helper.make_opsetid("", max(opset, own)))
    lowered.ir_version = min(lowered.ir_version, MAX_IR_VERSION)
    for node in lowered.graph.node:
        node.domain = ""
    del lowered.graph.value_info[:]
    return lowered


def _drop_unread_indices(model):
    """Remove the Indices output of every MaxPool whose Indices nothing reads (in place)."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1] not in read:
            del node.output[1:]
