"""The forward graph every builder differentiates: the pixel contract in front, the class
outputs `prob` and `logits` behind, and the score head; plus the forward fixes
onnxruntime-training needs.

`prepare_forward` makes the graph take RGB pixels 0..255, channels-first [N, C, H, W], whatever
the model expects: a model whose input is scaled (0..1, -1..1) or normalised ((x - mean) / std)
gets one Mul and one Add in front (`PixelContract`), a BGR model a Gather that reorders the
channels before them, a channels-last model ([N, H, W, C], as tf2onnx and jax2onnx export) a
Transpose after them. So gradients are always with respect to real RGB pixel values, and every
builder, method and metric sees a channels-first input whatever the model's layout.

onnxruntime-training 1.19.2 has no gradient for inference BatchNormalization, LRN, Dropout,
HardSigmoid or HardSwish, returns an empty batch from AveragePoolGrad, and asserts on a
LayerNormalization without its optional Mean and InvStdDev outputs. Each entry of
`TRAINING_FIXES` replaces one such op by ops with the same forward output that it can
differentiate (tests check the forward outputs do not change); the native builder needs none.
"""

import json
import re

import numpy as np
import onnx
from onnx import helper

from ..errors import OnnxAttrError
from ..io.layout import TO_CHANNELS_FIRST, TO_CHANNELS_LAST
from ..io.model import PIXEL_RANGE
from .backward_forms import channel_window_weights, explicit_pads
from .opset import converts, fit_opset
from .precision import HALF, to_float32
from .relu_rules import replaces
from .static_if import fold_static_ifs
from .toolkit import GraphEditor, attribute, copy_model, default_opset

SCORE = "score"
ONEHOT = "onehot"
PROB = "prob"
LOGITS = "logits"
SCORES = {"prob": PROB, "logit": LOGITS}  # score name -> the class output it differentiates


# --- the pixel contract and the class outputs ----------------------------------------------------


def _prepend_contract(editor, classifier):
    """Make the image input take RGB pixels 0..255, channels-first [N, C, H, W]: input ->
    Gather (RGB to BGR, for a BGR model) -> Mul(a) -> Add(b) (the range and normalisation) ->
    Transpose (to a channels-last model's [N, H, W, C]) -> the old input; each op only where
    the model needs it."""
    contract, name = classifier.contract, classifier.input_name
    if contract.is_identity and classifier.layout == "NCHW":
        return []
    if any(output.name == name for output in editor.graph.output):
        raise OnnxAttrError("the image input is also a graph output; cannot prepend the "
                            "pixel contract")
    inner = editor.unique(f"{name}/model_input")
    for node in editor.graph.node:
        node.input[:] = [inner if i == name else i for i in node.input]
    steps = []  # (op, second input or None, attributes)
    if contract.channel_order == "BGR":
        steps.append(("Gather", editor.constant(f"{name}/bgr", np.array([2, 1, 0], np.int64)),
                      dict(axis=1)))
    scale, shift = contract.scale_shift(classifier.channels)
    if (scale != 1).any() or shift.any():
        steps += [(op, editor.constant(f"{name}/contract_{what}", value.reshape(1, -1, 1, 1)
                                       .astype(np.float32)), {})
                  for op, what, value in (("Mul", "scale", scale), ("Add", "shift", shift))]
    if classifier.layout == "NHWC":
        steps.append(("Transpose", None, dict(perm=list(TO_CHANNELS_LAST))))
        _declare_channels_first(editor.graph, name)
    nodes, current = [], name
    for index, (op, operand, attributes) in enumerate(steps):
        out = inner if index == len(steps) - 1 else editor.unique(f"{name}/{op.lower()}")
        nodes.append(editor.node(op, [current, *([operand] if operand else [])], [out],
                                 "contract", **attributes))
        current = out
    return nodes


def _declare_channels_first(graph, name):
    """Declare the graph input `name` [N, H, W, C] as [N, C, H, W]."""
    value = next(i for i in graph.input if i.name == name)
    dims = list(value.type.tensor_type.shape.dim)
    copies = [onnx.TensorShapeProto.Dimension() for _ in dims]
    for copy, source in zip(copies, (dims[i] for i in TO_CHANNELS_FIRST)):
        copy.CopyFrom(source)
    del value.type.tensor_type.shape.dim[:]
    value.type.tensor_type.shape.dim.extend(copies)


# --- forward fixes for onnxruntime-training ------------------------------------------------------


def _fix_dropout(editor, node):
    """Dropout at inference is the identity."""
    if len(node.output) > 1 and node.output[1] and editor.consumers(node.output[1]):
        raise OnnxAttrError(f"Dropout node '{node.name}': its mask output is used; cannot remove it")
    return [editor.node("Identity", [node.input[0]], [node.output[0]], node.name)]


def _fix_lrn(editor, node):
    """LRN as primitive ops: x * exp(-beta * log(bias + alpha * mean_window(x^2))).

    The window sum over `size` neighbouring channels is a 1x1 Conv of x^2 with a band of ones
    [C, C, 1, 1] (C^2 multiply-adds per pixel where the window needs `size`, but onnxruntime
    runs it in its NCHWc layout and folds the alpha / size Mul into it). The earlier form, a
    Conv with a (size, 1) kernel over x^2 reshaped to [N, 1, C, H*W], was a one-channel Conv
    that the NCHWc layout pads to its channel block (16 on AVX-512), and reordered back 16
    times the tensor: GoogLeNet's gradient 0.92-0.95x the time with the band (whole graph,
    interleaved medians, shared machine; docs/benchmarks.md). The square is x * Identity(x)
    and the power goes through Exp/Log: the builder's gradients of Pow, of Mul with one tensor
    on both inputs, and of AveragePool fail at run time in onnxruntime-training 1.19.2.
    """
    size = attribute(node, "size")
    alpha, beta, bias = (attribute(node, "alpha", 1e-4), attribute(node, "beta", 0.75),
                         attribute(node, "bias", 1.0))
    before, after = (size - 1) // 2, size // 2
    x, y, n = node.input[0], node.output[0], node.name
    band = channel_window_weights(editor.shape(x, node)[1], before, after)
    t = {k: editor.unique(f"{n}/{k}") for k in ("copy", "square", "window", "base", "shifted",
                                                 "log", "scaled_log", "scale")}
    return [
        editor.node("Identity", [x], [t["copy"]], n),
        editor.node("Mul", [x, t["copy"]], [t["square"]], n),
        editor.node("Conv", [t["square"], editor.constant(f"{n}/band", band)], [t["window"]], n,
                    kernel_shape=[1, 1]),
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
    """Inference BatchNormalization: folded into the Conv before it, else a per-channel Mul+Add.
    Parameters may reach it through Identity nodes (torch's exporter shares equal tensors)."""
    params = [editor.value(name) for name in node.input[1:5]]
    if any(p is None for p in params):
        raise OnnxAttrError(f"BatchNormalization node '{node.name}' has non-constant parameters")
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + attribute(node, "epsilon", 1e-5))
    shift = beta - mean * scale
    conv = editor.producer(node.input[0])
    if conv is not None and conv.op_type == "Conv" and len(editor.consumers(conv.output[0])) == 1 \
            and not editor.is_output(conv.output[0]):
        weight = editor.value(conv.input[1])
        if weight is not None:
            bias = editor.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else 0.0
            if bias is not None:
                shape = (-1,) + (1,) * (weight.ndim - 1)
                folded_weight = editor.constant(f"{conv.name}/W_bn", (
                    weight * scale.reshape(shape)).astype(np.float32))
                folded_bias = editor.constant(f"{conv.name}/B_bn", (bias * scale + shift)
                                              .astype(np.float32))
                conv.input[:] = [conv.input[0], folded_weight, folded_bias]
                return [editor.node("Identity", [conv.output[0]], [node.output[0]], node.name)]
    rank = editor.rank(node.input[0]) or 4
    shape = (1, -1) + (1,) * (rank - 2)
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
    outputs are divided by the share of the window that lies inside the image. An auto_pad
    (jax2onnx's SAME) becomes the pads it means at the input's static size."""
    if attribute(node, "ceil_mode", 0):
        raise OnnxAttrError(f"AveragePool node '{node.name}' with ceil_mode is not supported by "
                            "the onnxruntime-training builder (try --builder native)")
    x, y, n = node.input[0], node.output[0], node.name
    shape = editor.shape(x, node)
    kernel = list(attribute(node, "kernel_shape"))
    strides = list(attribute(node, "strides", [1] * len(kernel)))
    pads = explicit_pads(attribute(node, "auto_pad", "NOTSET"), attribute(node, "pads"),
                         shape[2:], kernel, strides, [1] * len(kernel))
    weight = np.full((shape[1], 1, *kernel), 1.0 / np.prod(kernel), np.float32)
    attrs = dict(group=shape[1], kernel_shape=kernel, strides=strides, pads=pads)
    if attribute(node, "count_include_pad", 0) or not any(pads):
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


def _hard_sigmoid(editor, node, x, y, original):
    """y = Clip(alpha * x + beta, 0, 1), as Mul, Add and Clip; the Clip stands for node
    `original` in the rectifier check (relu_rules.check_rule_applies)."""
    alpha, beta = attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5)
    scaled, shifted = editor.unique(f"{node.name}/scaled"), editor.unique(f"{node.name}/shifted")
    return [editor.node("Mul", [x, editor.constant(f"{node.name}/alpha", np.float32(alpha))],
                        [scaled], node.name),
            editor.node("Add", [scaled, editor.constant(f"{node.name}/beta", np.float32(beta))],
                        [shifted], node.name),
            replaces(editor.node("Clip", [shifted, editor.constant(f"{node.name}/zero",
                                                                    np.float32(0)),
                                          editor.constant(f"{node.name}/one", np.float32(1))],
                                 [y], node.name), original)]


def _fix_hard_sigmoid(editor, node):
    """HardSigmoid(x) = Clip(alpha * x + beta, 0, 1)."""
    return _hard_sigmoid(editor, node, node.input[0], node.output[0], node)


def _fix_hard_swish(editor, node):
    """HardSwish(x) = x * HardSigmoid(x) with alpha 1/6, beta 1/2."""
    gate = editor.unique(f"{node.name}/gate")
    spec = helper.make_node("HardSigmoid", node.input, [gate], name=node.name, alpha=1 / 6,
                            beta=0.5)
    return [*_hard_sigmoid(editor, spec, node.input[0], gate, node),
            editor.node("Mul", [node.input[0], gate], [node.output[0]], node.name)]


def _fix_layer_norm(editor, node):
    """LayerNormalization with its optional Mean and InvStdDev outputs named (the builder
    asserts without them)."""
    outputs = list(node.output) + [""] * (3 - len(node.output))
    outputs[1:] = [o or editor.unique(f"{node.name}/{k}")
                   for o, k in zip(outputs[1:], ("mean", "inv_std_dev"))]
    fixed = onnx.NodeProto()
    fixed.CopyFrom(node)
    fixed.output[:] = outputs
    return [fixed]


TRAINING_FIXES = {"AveragePool": _fix_average_pool, "Dropout": _fix_dropout, "LRN": _fix_lrn,
                  "BatchNormalization": _fix_batchnorm, "HardSigmoid": _fix_hard_sigmoid,
                  "HardSwish": _fix_hard_swish, "LayerNormalization": _fix_layer_norm}


# --- the prepared forward graph ------------------------------------------------------------------


def prepare_forward(classifier, fixes=None, outputs=(), references=False):
    """A copy of the classifier's graph (at opset 17 to 21 where it converts: opset.fit_opset)
    with the pixel contract in front, the `fixes` (an op -> rule table such as TRAINING_FIXES)
    applied, and outputs exactly `prob` and `logits`, then the intermediate tensors named in
    `outputs` (a layer for layer attribution).

    The forward outputs are unchanged (tests check this); unused initializers are kept. The
    extra outputs are outputs while the fixes run, so no fix changes what they hold (a Conv
    whose output is a graph output keeps its BatchNormalization unfolded).

    The graph has the model's weights, or with `references` (for `fixes` that read no large
    weight) the references to them of the classifier's proto (onnxattr.io.weights) where
    preparing reads none: no opset conversion, no float16 weights.
    """
    proto = classifier.proto
    if not references or converts(proto) or any(t.data_type in HALF
                                                for t in proto.graph.initializer):
        proto = classifier.full_proto()
    model = fit_opset(proto)
    if model is classifier.proto:
        model = copy_model(model)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    fold_static_ifs(model)
    to_float32(model, classifier.input_name)
    editor = GraphEditor(model)
    class_outputs = _free_reserved_names(editor, classifier, outputs)
    editor.set_nodes([*_prepend_contract(editor, classifier), *model.graph.node])
    extra = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs]
    model.graph.output.extend(extra)
    nodes = []
    for node in list(model.graph.node):
        fix = (fixes or {}).get(node.op_type)
        nodes.extend(fix(editor, node) if fix else [node])
    editor.set_nodes(nodes)
    _expose_class_outputs(editor, classifier, *class_outputs, default_opset(model))
    model.graph.output.extend(extra)
    return model


def _free_reserved_names(editor, classifier, layers):
    """Rename the model's tensors that have a name onnxattr or a builder gives a tensor of its
    own: the class outputs and the score head's (`prob`, `logits`, `score`, `onehot`), unless
    the tensor is that one already (the model's `prob` output), and the gradients (`x_grad`,
    and the training builder's partial sums `x_grad_1`, ..., of any tensor `x`). `x` becomes
    `model/x`. Returns the names of the (prob, logits) tensors."""
    own = {PROB: classifier.prob_output, LOGITS: classifier.logits_output}
    heads = {PROB, LOGITS, SCORE, ONEHOT}
    made = {name for node in editor.graph.node for name in node.output}
    tensors = made | {i.name for i in editor.graph.input} | heads | set(layers)
    new = {}
    for name in sorted(made):
        gradient = re.fullmatch(r"(.+)_grad(_\d+)?", name)
        if (name in heads and own.get(name) != name) or (gradient and gradient[1] in tensors):
            new[name] = editor.unique(f"model/{name}")
            _rename(editor.graph, name, new[name])
    return (new.get(classifier.prob_output, classifier.prob_output),
            new.get(classifier.logits_output, classifier.logits_output))


def _expose_class_outputs(editor, classifier, prob_output, logits_output, opset):
    """Make the graph's outputs exactly `prob` and `logits` (the model's tensors `prob_output`,
    None if it has none, and `logits_output`), adding a Softmax if it has none."""
    graph = editor.graph
    nodes = []
    if logits_output != LOGITS:
        nodes.append(editor.node("Identity", [logits_output], [LOGITS], LOGITS))
    if prob_output is None:
        nodes.append(editor.node("Softmax", [logits_output], [PROB], PROB,
                                 axis=1 if opset < 13 else -1))
    elif prob_output != PROB:
        nodes.append(editor.node("Identity", [prob_output], [PROB], PROB))
    editor.set_nodes([*graph.node, *nodes])
    batch = classifier.batch or "N"
    del graph.output[:]
    graph.output.extend(
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [batch, classifier.num_classes])
        for name in (PROB, LOGITS))


def _rename(graph, name, new):
    """Rename tensor `name` of `graph` (made by a node) to `new`."""
    for node in graph.node:
        node.input[:] = [new if i == name else i for i in node.input]
        node.output[:] = [new if o == name else o for o in node.output]


def gradient_output(wrt):
    """Name of the output holding d score / d `wrt` (the same for both builders)."""
    return f"{wrt}_grad"


def check_score(score):
    """`score` if it is a known score name, else an OnnxAttrError."""
    if score not in SCORES:
        raise OnnxAttrError(f"unknown score '{score}' (choose {' or '.join(SCORES)})")
    return score


def select_scores(prob, logits, targets, score):
    """Each row's target score, float64 [N]: the probability or the logit by `score`."""
    values = prob if check_score(score) == "prob" else logits
    return values[np.arange(len(values)), np.asarray(targets)].astype(np.float64)


def add_score_head(forward, score="prob"):
    """Add input `onehot` [N, K] and scalar output `score` = sum(onehot * <prob or logits>).

    One target class per row of the batch; rows do not interact, so d score / d image[n] is the
    gradient of row n's target score alone. The class outputs stay as outputs.
    """
    model = copy_model(forward)
    graph = model.graph
    class_dims = graph.output[0].type.tensor_type.shape.dim
    batch = class_dims[0].dim_value or "N"
    graph.input.append(helper.make_tensor_value_info(ONEHOT, onnx.TensorProto.FLOAT,
                                                     [batch, class_dims[1].dim_value]))
    editor = GraphEditor(model)
    selected = editor.unique("score/selected")
    graph.node.extend([
        editor.node("Mul", [SCORES[check_score(score)], ONEHOT], [selected], "score/select"),
        editor.node("ReduceSum", [selected], [SCORE], "score/sum", keepdims=0),
    ])
    graph.output.insert(0, helper.make_tensor_value_info(SCORE, onnx.TensorProto.FLOAT, []))
    return model


def contract_metadata(classifier):
    """The onnxattr.input metadata of a graph that takes pixels 0..255 (contract built in)."""
    return json.dumps({"layout": "NCHW", "channels": "RGB", "range": list(PIXEL_RANGE),
                       "preprocessing": f"built in: the model's own contract "
                                        f"({classifier.contract.describe()}, "
                                        f"{classifier.layout} input)"})
