"""Forward-graph fixes so onnxruntime-training can differentiate the model, and the score head.

The gradient builder has no gradient for BatchNormalization in inference mode, LRN or Dropout.
Each fix below replaces one such op by ops with the same forward output that it can
differentiate; `FIXES` maps the op type to its rule, so another op is one more entry.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import OnnxAttrError

MAX_OPSET = 21  # the newest default-domain opset onnxruntime-training 1.19.2 runs
MAX_IR_VERSION = 10
SCORE = "score"
ONEHOT = "onehot"
PROB = "prob"
LOGITS = "logits"


class GraphEditor:
    """Small helpers for editing one graph: constants, unique names, producers and consumers."""

    def __init__(self, graph, opset_imports=None):
        self.graph = graph
        # the opsets shape inference reads the graph's ops at: the model's own where known
        self.opset_imports = list(opset_imports or [helper.make_opsetid("", MAX_OPSET)])
        self._names = {n for node in graph.node for n in (*node.input, *node.output, node.name)}
        self._names |= {t.name for t in graph.initializer}
        self._shapes = None

    def unique(self, base):
        """A tensor or node name not yet used in the graph."""
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def constant(self, base, array):
        """Add an initializer holding `array`; return its name."""
        name = self.unique(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def value(self, name):
        """The numpy value of an initializer or Constant node output, or None."""
        for tensor in self.graph.initializer:
            if tensor.name == name:
                return numpy_helper.to_array(tensor)
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                return numpy_helper.to_array(node.attribute[0].t)
        return None

    def inferred_shape(self, name):
        """The shape of tensor `name` from shape inference: an int, or None where unknown, per
        dimension; None when inference knows nothing of the tensor."""
        if self._shapes is None:
            inferred = onnx.shape_inference.infer_shapes(
                helper.make_model(self.graph, opset_imports=self.opset_imports))
            graph = inferred.graph
            self._shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                                     for d in v.type.tensor_type.shape.dim]
                            for v in (*graph.value_info, *graph.input, *graph.output)
                            if v.type.tensor_type.HasField("shape")}
            self._shapes.update({t.name: list(t.dims) for t in graph.initializer})
        return self._shapes.get(name)

    def shape(self, name):
        """The static shape of tensor `name` (batch may be symbolic), or an OnnxAttrError."""
        shape = self.inferred_shape(name)
        if not shape or any(d is None for d in shape[1:]):
            raise OnnxAttrError(f"cannot infer a static shape for tensor '{name}'")
        return shape

    def consumers(self, name):
        return [node for node in self.graph.node if name in node.input]

    def producer(self, name):
        return next((node for node in self.graph.node if name in node.output), None)

    def node(self, op_type, inputs, outputs, base, **attrs):
        """A new node with a unique name (not yet placed in the graph)."""
        return helper.make_node(op_type, inputs, outputs, name=self.unique(base), **attrs)


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _fix_dropout(editor, node):
    """Dropout at inference is the identity."""
    if len(node.output) > 1 and node.output[1] and editor.consumers(node.output[1]):
        raise OnnxAttrError(f"Dropout node '{node.name}': its mask output is used; cannot remove it")
    return [editor.node("Identity", [node.input[0]], [node.output[0]], node.name)]


def _fix_lrn(editor, node):
    """LRN as primitive ops: x * exp(-beta * log(bias + alpha * mean_window(x^2))).

    The window sum over `size` neighbouring channels is a Conv with a (size, 1) kernel of ones
    over x^2 reshaped to [N, 1, C, H*W]. The square is x * Identity(x) and the power goes
    through Exp/Log: the builder's gradients of Pow, of Mul with one tensor on both inputs, and
    of AveragePool fail at run time in onnxruntime-training 1.19.2.
    """
    size = _attr(node, "size", None)
    alpha, beta, bias = (_attr(node, "alpha", 1e-4), _attr(node, "beta", 0.75),
                         _attr(node, "bias", 1.0))
    before, after = (size - 1) // 2, size // 2
    x, y, n = node.input[0], node.output[0], node.name
    channels = editor.shape(x)[1]
    t = {k: editor.unique(f"{n}/{k}") for k in ("copy", "square", "stacked", "sum", "shape",
                                                 "window", "base", "shifted", "log",
                                                 "scaled_log", "scale")}
    stacked_shape = editor.constant(f"{n}/stacked_shape", np.array([0, 1, channels, -1], np.int64))
    return [
        editor.node("Identity", [x], [t["copy"]], n),
        editor.node("Mul", [x, t["copy"]], [t["square"]], n),
        editor.node("Reshape", [t["square"], stacked_shape], [t["stacked"]], n),
        editor.node("Conv", [t["stacked"], editor.constant(f"{n}/ones", np.ones(
            (1, 1, size, 1), np.float32))], [t["sum"]], n, pads=[before, 0, after, 0]),
        editor.node("Shape", [x], [t["shape"]], n),
        editor.node("Reshape", [t["sum"], t["shape"]], [t["window"]], n),
        editor.node("Mul", [t["window"], editor.constant(f"{n}/alpha", np.float32(alpha / size))],
                    [t["base"]], n),
        editor.node("Add", [t["base"], editor.constant(f"{n}/bias", np.float32(bias))],
                    [t["shifted"]], n),
        editor.node("Log", [t["shifted"]], [t["log"]], n),
        editor.node("Mul", [t["log"], editor.constant(f"{n}/minus_beta", np.float32(-beta))],
                    [t["scaled_log"]], n),
        editor.node("Exp", [t["scaled_log"]], [t["scale"]], n),
        editor.node("Mul", [x, t["scale"]], [y], n),
    ]


def _fix_batchnorm(editor, node):
    """Inference BatchNormalization: folded into the Conv before it, else a per-channel Mul+Add."""
    params = [editor.value(name) for name in node.input[1:5]]
    if any(p is None for p in params):
        raise OnnxAttrError(f"BatchNormalization node '{node.name}' has non-constant parameters")
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + _attr(node, "epsilon", 1e-5))
    shift = beta - mean * scale
    conv = editor.producer(node.input[0])
    if conv is not None and conv.op_type == "Conv" and len(editor.consumers(conv.output[0])) == 1:
        weight = editor.value(conv.input[1])
        if weight is not None:
            bias = editor.value(conv.input[2]) if len(conv.input) > 2 else 0.0
            shape = (-1,) + (1,) * (weight.ndim - 1)
            folded_weight = editor.constant(f"{conv.name}/W_bn", (weight * scale.reshape(shape))
                                            .astype(np.float32))
            folded_bias = editor.constant(f"{conv.name}/B_bn", (bias * scale + shift)
                                          .astype(np.float32))
            conv.input[:] = [conv.input[0], folded_weight, folded_bias]
            return [editor.node("Identity", [conv.output[0]], [node.output[0]], node.name)]
    shape = (1, -1, 1, 1)
    scaled = editor.unique(f"{node.name}/scaled")
    return [
        editor.node("Mul", [node.input[0], editor.constant(f"{node.name}/scale", scale.reshape(
            shape).astype(np.float32))], [scaled], node.name),
        editor.node("Add", [scaled, editor.constant(f"{node.name}/shift", shift.reshape(shape)
                                                     .astype(np.float32))], [node.output[0]],
                    node.name),
    ]


def _fix_average_pool(editor, node):
    """AveragePool as a depthwise Conv with weights 1/kernel size (the builder's AveragePoolGrad
    returns an empty batch in onnxruntime-training 1.19.2). Without count_include_pad, border
    outputs are divided by the share of the window that lies inside the image."""
    if _attr(node, "ceil_mode", 0) or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise OnnxAttrError(f"AveragePool node '{node.name}' with ceil_mode or auto_pad is not "
                            "supported")
    x, y, n = node.input[0], node.output[0], node.name
    shape = editor.shape(x)
    kernel = list(_attr(node, "kernel_shape", None))
    strides = list(_attr(node, "strides", [1] * len(kernel)))
    pads = list(_attr(node, "pads", [0] * 2 * len(kernel)))
    weight = np.full((shape[1], 1, *kernel), 1.0 / np.prod(kernel), np.float32)
    attrs = dict(group=shape[1], kernel_shape=kernel, strides=strides, pads=pads)
    if _attr(node, "count_include_pad", 0) or not any(pads):
        return [editor.node("Conv", [x, editor.constant(f"{n}/weight", weight)], [y], n, **attrs)]
    inside = np.ones((1, 1, *shape[2:]), np.float64)
    share = _window_share(inside, kernel, strides, pads).astype(np.float32)
    summed = editor.unique(f"{n}/padded_mean")
    return [editor.node("Conv", [x, editor.constant(f"{n}/weight", weight)], [summed], n, **attrs),
            editor.node("Div", [summed, editor.constant(f"{n}/share", share)], [y], n)]


def _window_share(inside, kernel, strides, pads):
    """For each pooling window: the fraction of its cells inside the (unpadded) image."""
    rank = len(kernel)
    padded = np.pad(inside, [(0, 0), (0, 0)] + [(pads[i], pads[i + rank]) for i in range(rank)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=tuple(range(2, 2 + rank)))
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
    return windows.mean(axis=tuple(range(-rank, 0)))


FIXES = {"AveragePool": _fix_average_pool, "Dropout": _fix_dropout, "LRN": _fix_lrn,
         "BatchNormalization": _fix_batchnorm}


def prepare_forward(classifier):
    """A copy of the classifier's graph the builder can differentiate, with outputs prob, logits.

    The forward outputs are unchanged (tests check this); unused initializers are kept.
    """
    model = onnx.ModelProto()
    model.CopyFrom(classifier.proto)
    opset = classifier.opset
    if opset > MAX_OPSET:
        raise OnnxAttrError(f"model uses opset {opset}; onnxruntime-training supports at most "
                            f"{MAX_OPSET} (re-export with opset <= {MAX_OPSET})")
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    graph = model.graph
    editor = GraphEditor(graph, model.opset_import)
    nodes = []
    for node in list(graph.node):
        fix = FIXES.get(node.op_type)
        nodes.extend(fix(editor, node) if fix else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    _expose_class_outputs(editor, classifier, opset)
    return model


def _expose_class_outputs(editor, classifier, opset):
    """Make the graph's outputs exactly `prob` and `logits`, adding a Softmax if it has none."""
    graph = editor.graph
    nodes = []
    if classifier.logits_output != LOGITS:
        nodes.append(editor.node("Identity", [classifier.logits_output], [LOGITS], LOGITS))
    if classifier.prob_output is None:
        nodes.append(editor.node("Softmax", [classifier.logits_output], [PROB], PROB,
                                 axis=1 if opset < 13 else -1))
    elif classifier.prob_output != PROB:
        nodes.append(editor.node("Identity", [classifier.prob_output], [PROB], PROB))
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", classifier.num_classes])
        for name in (PROB, LOGITS))


def add_score_head(forward, score="prob"):
    """Add input `onehot` [N, K] and scalar output `score` = sum(onehot * <prob or logits>).

    One target class per row of the batch; rows do not interact, so d score / d image[n] is the
    gradient of row n's target score alone. The class outputs stay as outputs.
    """
    if score not in (PROB, "logit"):
        raise OnnxAttrError(f"unknown score '{score}' (choose prob or logit)")
    model = onnx.ModelProto()
    model.CopyFrom(forward)
    graph = model.graph
    num_classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
    graph.input.append(helper.make_tensor_value_info(ONEHOT, onnx.TensorProto.FLOAT,
                                                     ["N", num_classes]))
    editor = GraphEditor(graph)
    selected = editor.unique("score/selected")
    graph.node.extend([
        editor.node("Mul", [PROB if score == PROB else LOGITS, ONEHOT], [selected], "score/select"),
        editor.node("ReduceSum", [selected], [SCORE], "score/sum", keepdims=0),
    ])
    graph.output.insert(0, helper.make_tensor_value_info(SCORE, onnx.TensorProto.FLOAT, []))
    return model
