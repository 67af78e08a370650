"""Portable attribution models: a classifier and one backward rule compiled into one ONNX file
of standard ops, and the engine that runs such a file.

`compile_model` turns a classifier into one self-contained attribution model (inputs `image`,
`target`; outputs `prob` or `logits`, and `attribution`) that stock onnxruntime,
onnxruntime-gpu or onnxruntime-node run without the training build. The gradient graph comes
from either builder (the native one's is standard ops already; the training builder's is
lowered). A source model with a fixed batch size keeps it: the compiled model declares the same
batch, so a runtime refuses other batch sizes instead of mixing rows. A row whose `target` is
not a class index (negative, or >= the number of classes) gets NaN in both outputs, never an
all-zero or another class's attribution.
"""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from .._version import __version__
from ..errors import OnnxAttrError
from ..graph.builders import GraphCache
from ..graph.engine import AttributionEngine, EngineSessions
from ..graph.lowering import lower_graph
from ..graph.prepare import (
    LOGITS,
    ONEHOT,
    PROB,
    SCORES,
    check_score,
    contract_metadata,
    gradient_output,
    select_scores,
)
from ..graph.relu_rules import RELU_RULES, VANILLA
from ..graph.toolkit import GraphEditor, copy_model, prune
from ..io.files import atomic_path
from ..io.model import CONTRACT_KEY, LABELS_KEY, METHOD_KEY, SCORE_KEY, load_model
from .table import compilable_methods, get_method

IMAGE, TARGET, ATTRIBUTION = "image", "target", "attribution"
CHECKED = "target/check/"  # the node making output X NaN for a bad target is named CHECKED + X


def compile_model(model, method="gradient", score=PROB, output=None, cache_dir=None,
                  builder="auto"):
    """A portable attribution model of the classifier at path `model` for `method` and `score`.

    Inputs `image` (float32 [N, C, H, W], RGB pixels 0..255: the source model's pixel contract
    is built in) and `target` (int64 [N], class index; out of range: NaN outputs in that row);
    outputs `prob` (or `logits` for score "logit") and `attribution` (float32 [N, C, H, W]).
    Standard ai.onnx ops only; labels, input contract, method and score are in its metadata.
    Written atomically to `output` when given; returns the ModelProto. `model` may also be a
    ClassifierModel (onnxattr.io.model).
    """
    rule = _compiled_rule(method)
    check_score(score)
    classifier = load_model(model) if not hasattr(model, "proto") else model
    if classifier.compiled:
        raise OnnxAttrError(f"{model} is already a compiled attribution model "
                            f"(method {classifier.compiled['method']})")
    engine = AttributionEngine(classifier, cache=GraphCache(cache_dir), builder=builder)
    graph = lower_graph(engine.shared_weights().restore(
        engine.gradient_graph(rule, score, portable=True)))  # the weights in the file
    compiled = _attribution_model(graph, classifier, method, score)
    if output is not None:
        with atomic_path(output) as tmp:
            onnx.save(compiled, tmp)
    return compiled


def _compiled_rule(method):
    """The ReLU rule a compilable method's graph holds."""
    choices = compilable_methods()
    if method not in choices:
        raise OnnxAttrError(f"method '{method}' cannot be compiled (choose from "
                            f"{', '.join(choices)}; integrated-gradients, input-x-gradient and "
                            "the smoothed methods run on a compiled gradient model, occlusion on "
                            "any compiled model; grad-cam and guided-grad-cam need the source "
                            "model)")
    return get_method(method).relu_rule


def _attribution_model(gradient_graph, classifier, method, score):
    """Rename the gradient graph's interface to image, target -> class output, attribution."""
    model = copy_model(gradient_graph)
    graph = model.graph
    source_input = classifier.input_name
    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    for name in (TARGET, ATTRIBUTION) + ((IMAGE,) if source_input != IMAGE else ()):
        if name in taken:
            raise OnnxAttrError(f"cannot compile: the model already has a tensor named '{name}'")
    if source_input != IMAGE:
        for node in graph.node:
            node.input[:] = [IMAGE if i == source_input else i for i in node.input]
    editor = GraphEditor(model)
    class_output = SCORES[score]
    unchecked = editor.unique(f"{class_output}/unchecked")
    for node in graph.node:
        node.input[:] = [unchecked if i == class_output else i for i in node.input]
        node.output[:] = [unchecked if o == class_output else o for o in node.output]
    depth = editor.constant("target/depth", np.array([classifier.num_classes], np.int64))
    values = editor.constant("target/values", np.array([0.0, 1.0], np.float32))
    editor.set_nodes([
        editor.node("OneHot", [TARGET, depth, values], [ONEHOT], "target/onehot", axis=-1),
        *graph.node,
        *_nan_unless_valid(editor, depth, [(unchecked, class_output, 2),
                                           (gradient_output(source_input), ATTRIBUTION, 4)])])
    batch = classifier.batch or "N"
    image_shape = [batch, classifier.channels, classifier.height, classifier.width]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, image_shape),
                        helper.make_tensor_value_info(TARGET, TensorProto.INT64, [batch])])
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info(SCORES[score], TensorProto.FLOAT,
                                      [batch, classifier.num_classes]),
        helper.make_tensor_value_info(ATTRIBUTION, TensorProto.FLOAT, image_shape)])
    prune(model)
    graph.name = f"onnxattr {method} ({score})"
    model.producer_name, model.producer_version = "onnxattr", __version__
    metadata = {LABELS_KEY: json.dumps(classifier.labels),
                CONTRACT_KEY: contract_metadata(classifier),
                METHOD_KEY: method, SCORE_KEY: score}
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def _nan_unless_valid(editor, depth, outputs):
    """Nodes that copy each (tensor, output, rank) to `output`, NaN in the rows whose target is
    not a class index (< 0 or >= depth): OneHot gives such a row all zeros (or wraps a negative
    index), whose attribution would read as "nothing matters" instead of an error."""
    low, high, valid = (editor.unique(f"target/{n}") for n in ("at_least_0", "below", "valid"))
    nodes = [editor.node("GreaterOrEqual", [TARGET, editor.constant("target/zero", np.int64(0))],
                         [low], low),
             editor.node("Less", [TARGET, depth], [high], high),
             editor.node("And", [low, high], [valid], valid)]
    nan = editor.constant("target/nan", np.float32(np.nan))
    for tensor, output, rank in outputs:
        axes = editor.constant(f"target/axes{rank}", np.arange(1, rank, dtype=np.int64))
        row = editor.unique(f"target/valid_rank{rank}")
        nodes += [editor.node("Unsqueeze", [valid, axes], [row], row),
                  helper.make_node("Where", [row, tensor, nan], [output], name=f"{CHECKED}{output}")]
    return nodes


def forward_part(compiled):
    """The class-output half of a compiled model: input `image` only, output prob or logits
    (as computed, without the target check)."""
    forward = copy_model(compiled)
    outputs = [o for o in forward.graph.output if o.name != ATTRIBUTION]
    del forward.graph.output[:]
    forward.graph.output.extend(outputs)
    for node in forward.graph.node:
        if node.name == f"{CHECKED}{node.output[0]}":
            node.CopyFrom(helper.make_node("Identity", [node.input[1]], node.output, node.name))
    prune(forward)
    return forward


class CompiledEngine(EngineSessions):
    """Runs a compiled attribution model (`onnxattr compile`) on any onnxruntime.

    The model holds one backward rule and one score (its metadata says which); asking for
    another is an OnnxAttrError naming the compiled method. No gradient graph is built, so
    onnxruntime-training is not needed. A model compiled for the probability computes no
    logits: `forward` and `gradient` return log-probabilities in their place (the logits up to
    a per-row constant); one compiled for the logit returns softmax(logits) as probabilities.
    So forward-only methods (occlusion) run on it for its own score, or for the probability
    of a logit model. Layer methods (Grad-CAM) are refused: the file holds the gradient with
    respect to the image only, and compiling a layer's gradient is not offered (yet).
    """

    def __init__(self, classifier, device="cpu", threads=None, precision="float32",
                 workers=None):
        self.classifier = classifier
        self.device = device
        self.threads = threads
        self.workers = workers
        self.precision = precision
        self.method = classifier.compiled["method"]
        self.score = classifier.compiled["score"]
        self.rule = get_method(self.method).relu_rule if self.method in compilable_methods() \
            else None
        self._class_output = PROB if classifier.prob_output else LOGITS
        self._session = None

    def _both(self, values):
        """(prob, logits) from the model's one class output."""
        values = values.astype(np.float32, copy=False)
        if self._class_output == PROB:
            with np.errstate(divide="ignore"):
                return values, np.log(values)
        shifted = np.exp(values - values.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True), values

    def forward_model(self):
        """The compiled model's forward half (EngineSessions; its sessions share the model's
        weights as the source model's do, so both compute alike)."""
        return forward_part(self.classifier.proto)

    def forward(self, pixels, batch_size=None):
        """Class probabilities and logits for pixels [N, C, H, W] (the forward half only)."""
        (values,) = self._forward_pool().run({IMAGE: pixels.astype(np.float32, copy=False)},
                                              [self._class_output], batch_size)
        return self._both(values)

    def target_scores(self, pixels, targets, score=PROB, batch_size=None):
        """Each row's target score, float64 [N]; a model compiled for the probability has no
        logits to give."""
        check_score(score)
        if score != PROB and self._class_output == PROB:
            raise OnnxAttrError(f"this model is compiled for score '{self.score}' and has no "
                                f"logits (asked for '{score}'; compile with --score {score})")
        return select_scores(*self.forward(pixels, batch_size), targets, score)

    def resolve_layer(self, layer=None):
        raise OnnxAttrError("a compiled attribution model holds the gradient with respect to "
                            "the image only; layer methods (grad-cam, guided-grad-cam) need "
                            "the source model")

    def layer_gradient(self, pixels, targets, layer, score=PROB, batch_size=None):
        self.resolve_layer(layer)

    def gradient_graph(self, rule=VANILLA, score=PROB):
        raise OnnxAttrError("a compiled attribution model has no gradient graph to build; "
                            "it is one already")

    def check(self, rule, score):
        """Refuse a backward rule or score the model was not compiled for."""
        if rule != self.rule:
            wanted = RELU_RULES[rule].method if rule in RELU_RULES else rule
            raise OnnxAttrError(f"this model is compiled for method '{self.method}' only; "
                                f"'{wanted}' needs a model compiled for it (onnxattr compile "
                                f"--method {wanted}) or the source model")
        if score != self.score:
            raise OnnxAttrError(f"this model is compiled for score '{self.score}' only (asked "
                                f"for '{score}'; compile with --score {score})")

    def gradient(self, pixels, targets, rule=VANILLA, score=PROB, batch_size=None):
        """The compiled method's attribution for every row n; returns (attribution, prob, logits)."""
        self.check(rule, score)
        if self._session is None:
            self._session = self.session(self.classifier.proto)
        feeds = {IMAGE: pixels.astype(np.float32, copy=False),
                 TARGET: np.asarray(targets, np.int64).reshape(len(pixels))}
        attribution, values = self._session.run(feeds, [ATTRIBUTION, self._class_output],
                                                batch_size)
        return (attribution, *self._both(values))
