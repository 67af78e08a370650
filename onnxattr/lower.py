"""Portable attribution models: gradient graphs lowered to standard ONNX ops.

The gradient builder of onnxruntime-training emits training-only ops (com.microsoft ConvGrad,
ReluGrad, SoftmaxGrad_13, Scale, GatherGrad, the onnx-domain MaxPoolGrad that only the
training build registers). `lower_graph` replaces each of them by standard ai.onnx ops, one rule
per op in `LOWERINGS` (found by op type, as onnx's reference evaluator finds its kernels):

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
naming it. `compile_model` turns a classifier into one self-contained attribution model
(inputs `image`, `target`; outputs `prob` or `logits`, and `attribution`) that stock
onnxruntime, onnxruntime-gpu or onnxruntime-node run without the training build.
"""

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import __version__, backward_forms
from .errors import OnnxAttrError
from .files import atomic_path
from .model import CONTRACT_KEY, LABELS_KEY, METHOD_KEY, SCORE_KEY, default_opset, load_model
from .graph import Emitter
from .graph import GraphEditor as Editor
from .prepare import LOGITS, ONEHOT, PROB, GraphEditor

TARGET_OPSET = 17  # ScatterElements with reduction="add" needs >= 16; stock runtimes all run 17
MAX_IR_VERSION = 10
STANDARD_DOMAINS = ("", "ai.onnx")
IMAGE, TARGET, ATTRIBUTION = "image", "target", "attribution"
LOGIT = "logit"
# method name (methods.METHODS) -> ReLU backward rule of the engine (rewrite.RULES)
METHOD_RULES = {"gradient": "vanilla", "guided-backprop": "guided",
                "zeiler-fergus": "zeiler-fergus"}
SCORE_OUTPUTS = {PROB: PROB, LOGIT: LOGITS}


# --- the lowering rules --------------------------------------------------------------------------

class Lowering:
    """What a rule sees: the graph editor, static shapes, producers, and which tensors are used."""

    def __init__(self, model):
        self.editor = Editor(model.graph, model.opset_import)
        self.producers = {o: n for n in model.graph.node for o in n.output if o}
        self.used = {i for n in model.graph.node for i in n.input} | {
            o.name for o in model.graph.output}
        self._consts = {}

    def shape(self, name):
        """The inferred shape of `name`: a list of ints or None per dim; None if unknown."""
        return self.editor.inferred_shape(name)

    def spatial(self, name, node, what):
        """Static spatial dims (all but N, C) of `name`, or an error naming the node."""
        shape = self.shape(name)
        if not shape or len(shape) < 3 or any(d is None for d in shape[2:]):
            raise OnnxAttrError(f"cannot lower {node.op_type} node '{node.name}': the {what} "
                                f"'{name}' has no static spatial shape")
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


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _explicit_pads(node, attrs, size, kernel, strides, dilations):
    """The forward op's begin+end pads, auto_pad resolved against the static input size."""
    auto_pad = _text(attrs.get("auto_pad", "NOTSET")) or "NOTSET"
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise OnnxAttrError(f"cannot lower {node.op_type} node '{node.name}': auto_pad {auto_pad}")
    return backward_forms.explicit_pads(auto_pad, attrs.get("pads"), size, kernel, strides,
                                        dilations)


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
    attrs = _attrs(node)
    size = low.spatial(x, node, "input")
    weight_shape = low.shape(w)
    kernel = list(attrs.get("kernel_shape") or (weight_shape or [None, None])[2:])
    if not kernel or any(k is None for k in kernel):
        raise OnnxAttrError(f"cannot lower ConvGrad node '{node.name}': unknown kernel shape")
    if not weight_shape or any(d is None for d in weight_shape):
        raise OnnxAttrError(f"cannot lower ConvGrad node '{node.name}': unknown weight shape")
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = _explicit_pads(node, attrs, size, kernel, strides, dilations)
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
    (backward_forms.max_pool_grad, form "indices").

    Indices count over the whole N*C*H*W input (row-major, storage_order 0), so overlapping
    windows that pick the same cell add up, as MaxPoolGrad does.
    """
    dy, indices = node.input[:2]
    pool = low.producers.get(indices)
    if pool is None or pool.op_type != "MaxPool" or list(pool.output[1:2]) != [indices]:
        raise OnnxAttrError(f"cannot lower MaxPoolGrad node '{node.name}': its Indices do not "
                            "come from a forward MaxPool")
    if _attrs(pool).get("storage_order", 0) != 0:
        raise OnnxAttrError(f"cannot lower MaxPoolGrad node '{node.name}': MaxPool "
                            f"'{pool.name}' has storage_order 1")
    em = low.emitter(node)
    kernel = list(_attrs(pool)["kernel_shape"])
    result = backward_forms.max_pool_grad(em, pool.input[0], pool.output[0], dy, None, kernel,
                                          None, None, None, None, form="indices",
                                          indices=indices)
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
    return _softmax_grad(low, node, dy, y, node.output[0], _attrs(node).get("axis", -1))


def lower_softmax_grad(low, node):
    """Opset < 13 semantics: the softmax ran over all axes from `axis` on (coerced to 2-D)."""
    dy, y = node.input[:2]
    axis = _attrs(node).get("axis", 1)
    t = {k: low.tmp(node, k) for k in ("dy2d", "y2d", "dx2d", "shape")}
    return [low.make("Flatten", [dy], [t["dy2d"]], node, axis=axis),
            low.make("Flatten", [y], [t["y2d"]], node, axis=axis),
            *_softmax_grad(low, node, t["dy2d"], t["y2d"], t["dx2d"], 1),
            low.make("Shape", [dy], [t["shape"]], node),
            low.make("Reshape", [t["dx2d"], t["shape"]], [node.output[0]], node)]


def lower_log_softmax_grad_13(low, node):
    """dX = dY - exp(Y) * sum(dY, axis)."""
    dy, y = node.input[:2]
    axes = low.const(f"axis{_attrs(node).get('axis', -1)}",
                     np.array([_attrs(node).get("axis", -1)], np.int64))
    t = {k: low.tmp(node, k) for k in ("sum", "prob", "scaled")}
    return [low.make("ReduceSum", [dy, axes], [t["sum"]], node, keepdims=1),
            low.make("Exp", [y], [t["prob"]], node),
            low.make("Mul", [t["prob"], t["sum"]], [t["scaled"]], node),
            low.make("Sub", [dy, t["scaled"]], [node.output[0]], node)]


def lower_scale(low, node):
    """X * scale, or X / scale with scale_down (the scale may be an integer tensor)."""
    x, scale = node.input[:2]
    as_float = low.tmp(node, "scale")
    op = "Div" if _attrs(node).get("scale_down", 0) else "Mul"
    return [low.make("Cast", [scale], [as_float], node, to=TensorProto.FLOAT),
            low.make(op, [x, as_float], [node.output[0]], node)]


def lower_gather_grad(low, node):
    """zeros(shape) with dY scatter-added at the (possibly repeated, negative) indices on `axis`.

    dY has shape shape[:axis] + I.shape + shape[axis+1:]; it is reshaped so the index axis is
    one flat axis of I.size entries, the indices broadcast over the other axes, and
    ScatterElements(reduction "add") accumulates repeated indices.
    """
    shape, indices, dy = node.input[:3]
    axis = _attrs(node).get("axis", 0)
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


LOWERINGS = {
    "ConvGrad": lower_conv_grad,
    "ReluGrad": lower_relu_grad,
    "MaxPoolGrad": lower_max_pool_grad,
    "SoftmaxGrad_13": lower_softmax_grad_13,
    "SoftmaxGrad": lower_softmax_grad,
    "LogSoftmaxGrad_13": lower_log_softmax_grad_13,
    "Scale": lower_scale,
    "GatherGrad": lower_gather_grad,
}


def is_standard(node):
    """Whether `node` is a standard ONNX op (an ai.onnx op with a schema in onnx)."""
    return node.domain in STANDARD_DOMAINS and onnx.defs.has(node.op_type)


def lower_graph(model, opset=TARGET_OPSET):
    """A copy of `model` with every non-standard op replaced by standard ai.onnx ops.

    Unused nodes, initializers and inputs are removed; the result imports only the default
    domain at `opset` (the model's own default opset when higher) and IR version <= 10.
    """
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    low = Lowering(lowered)
    nodes = []
    for node in lowered.graph.node:
        if is_standard(node):
            nodes.append(node)
            continue
        rule = LOWERINGS.get(node.op_type)
        if rule is None:
            raise OnnxAttrError(f"no lowering rule for training op {node.domain or 'ai.onnx'}::"
                                f"{node.op_type} (node '{node.name}'): cannot make a portable "
                                f"model (rules exist for {', '.join(sorted(LOWERINGS))})")
        nodes.extend(rule(low, node))
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    prune(lowered)
    own = default_opset(model) or opset
    del lowered.opset_import[:]
    lowered.opset_import.append(helper.make_opsetid("", max(opset, own)))
    lowered.ir_version = min(lowered.ir_version, MAX_IR_VERSION)
    for node in lowered.graph.node:
        node.domain = ""
    del lowered.graph.value_info[:]
    return lowered


def prune(model):
    """Remove nodes, initializers and inputs that no graph output depends on (in place)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)


# --- compiled attribution models -----------------------------------------------------------------

def compile_model(model, method="gradient", score=PROB, output=None, cache_dir=None):
    """A portable attribution model of the classifier at path `model` for `method` and `score`.

    Inputs `image` (float32 [N, C, H, W], the source model's pixel contract) and `target`
    (int64 [N], class index); outputs `prob` (or `logits` for score "logit") and `attribution`
    (float32 [N, C, H, W]). Standard ai.onnx ops only; labels, input contract, method and score
    are in its metadata. Written atomically to `output` when given; returns the ModelProto.
    """
    from .engine import AttributionEngine
    from .gradient import GraphCache

    if method not in METHOD_RULES:
        raise OnnxAttrError(f"method '{method}' cannot be compiled (choose from "
                            f"{', '.join(METHOD_RULES)}; integrated-gradients and smoothgrad run "
                            "on a compiled gradient model)")
    if score not in SCORE_OUTPUTS:
        raise OnnxAttrError(f"unknown score '{score}' (choose prob or logit)")
    classifier = load_model(model)
    if classifier.compiled:
        raise OnnxAttrError(f"{model} is already a compiled attribution model "
                            f"(method {classifier.compiled['method']})")
    classifier = _at_least_opset(classifier, TARGET_OPSET)
    engine = AttributionEngine(classifier, cache=GraphCache(cache_dir))
    graph = engine.gradient_graph(METHOD_RULES[method], score)
    compiled = _attribution_model(lower_graph(graph), classifier, method, score)
    if output is not None:
        with atomic_path(output) as tmp:
            onnx.save(compiled, tmp)
    return compiled


def _at_least_opset(classifier, opset):
    """The classifier converted to default-domain `opset` if it uses an older one."""
    if (classifier.opset or opset) >= opset:
        return classifier
    try:
        from onnx import version_converter
        converted = version_converter.convert_version(classifier.proto, opset)
    except Exception as err:
        raise OnnxAttrError(f"cannot convert the model from opset {classifier.opset} to {opset}: "
                            f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}"
                            ) from None
    return replace(classifier, proto=converted, digest=f"{classifier.digest}@opset{opset}")


def _attribution_model(lowered, classifier, method, score):
    """Rename the lowered gradient graph's interface to image, target -> class, attribution."""
    graph = lowered.graph
    source_input = classifier.input_name
    gradient = f"{source_input}_grad"
    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    for name in (TARGET, ATTRIBUTION) + ((IMAGE,) if source_input != IMAGE else ()):
        if name in taken:
            raise OnnxAttrError(f"cannot compile: the model already has a tensor named '{name}'")
    if source_input != IMAGE:
        for node in graph.node:
            node.input[:] = [IMAGE if i == source_input else i for i in node.input]
    editor = GraphEditor(graph)
    depth = editor.constant("target/depth", np.array([classifier.num_classes], np.int64))
    values = editor.constant("target/values", np.array([0.0, 1.0], np.float32))
    class_output = SCORE_OUTPUTS[score]
    front = [editor.node("OneHot", [TARGET, depth, values], [ONEHOT], "target/onehot", axis=-1)]
    graph.node.insert(0, front[0])
    graph.node.append(editor.node("Identity", [gradient], [ATTRIBUTION], "attribution"))
    batch = "N"
    del graph.input[:]
    graph.input.extend([
        helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, [batch, classifier.channels,
                                                                 classifier.height,
                                                                 classifier.width]),
        helper.make_tensor_value_info(TARGET, TensorProto.INT64, [batch])])
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info(class_output, TensorProto.FLOAT,
                                      [batch, classifier.num_classes]),
        helper.make_tensor_value_info(ATTRIBUTION, TensorProto.FLOAT,
                                      [batch, classifier.channels, classifier.height,
                                       classifier.width])])
    prune(lowered)
    graph.name = f"onnxattr {method} ({score})"
    lowered.producer_name, lowered.producer_version = "onnxattr", __version__
    metadata = {LABELS_KEY: json.dumps(classifier.labels),
                CONTRACT_KEY: json.dumps(classifier.contract),
                METHOD_KEY: method, SCORE_KEY: score}
    del lowered.metadata_props[:]
    for key, value in metadata.items():
        lowered.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(lowered)
    return lowered


def compile_stats(model, method="gradient", score=PROB, output=None, cache_dir=None):
    """compile_model, timed: (seconds, bytes written or serialized size)."""
    start = time.perf_counter()
    compiled = compile_model(model, method, score, output, cache_dir)
    seconds = time.perf_counter() - start
    size = Path(output).stat().st_size if output else compiled.ByteSize()
    return seconds, size


def forward_part(compiled):
    """The class-output half of a compiled model: input `image` only, output prob or logits."""
    forward = onnx.ModelProto()
    forward.CopyFrom(compiled)
    outputs = [o for o in forward.graph.output if o.name != ATTRIBUTION]
    del forward.graph.output[:]
    forward.graph.output.extend(outputs)
    prune(forward)
    return forward
