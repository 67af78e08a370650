"""The attribution engine: one classifier, its forward session and its gradient sessions.

Gradient graphs are built once per (builder, ReLU rule, score, layer) and kept in memory and on
disk (builders.GraphCache). A gradient is d score / d image, or, for layer attribution methods
(Grad-CAM), d score / d a layer's activation: the same machinery, differentiating with respect
to that tensor instead, which both builders do (the graph then also outputs the activation).
The forward passes run the model as it is (with its pixel contract in front); the gradient
graphs are standard ops: the native builder's as built, the training builder's lowered
(onnxattr.graph.lowering; on CPU GoogLeNet's runs in 97 instead of 113 ms at batch 1, the same at
batch 10) where the lowering rules allow, else on the training kernels.
"""

import hashlib

import numpy as np

from ..errors import OnnxAttrError
from .builders import BUILDERS, FORWARD_FIXES, GraphCache, candidates, check_builder, note_fallback
from .layers import as_feature_maps, check_layer, default_layer
from .lowering import lower_graph
from .prepare import (
    LOGITS,
    ONEHOT,
    PROB,
    add_score_head,
    check_score,
    gradient_output,
    prepare_forward,
    select_scores,
)
from .relu_rules import VANILLA
from .runtime import SessionPool


class EngineSessions:
    """What both engines share (this module's and a compiled model's, onnxattr.methods.compile):
    sessions whose graphs share the model's weights, and the forward session, opened once. An
    engine sets classifier, device, threads, precision and workers, and has forward_model()."""

    _forward_session = None

    def shared_weights(self):
        """The model's SharedWeights (onnxattr.io.weights), which its proto references."""
        return self.classifier.weights

    def session(self, graph):
        """A SessionPool for `graph` whose sessions share the model's weights (one copy of
        them in the process)."""
        return SessionPool(graph, self.device, self.threads, self.precision, self.workers,
                           self.classifier.batch, self.shared_weights())

    def open(self):
        """Open the forward session now, so a model onnxruntime cannot load fails before any
        image."""
        self._forward_pool().open()

    def _forward_pool(self):
        if self._forward_session is None:
            self._forward_session = self.session(self.forward_model())
        return self._forward_session


class AttributionEngine(EngineSessions):
    """Runs forward passes and d score / d image for one classifier on one device.

    `builder`: "auto", "onnxruntime" or "native" (onnxattr.graph.builders). `precision`: "float32"
    or "tf32" (CUDA only; see onnxattr.graph.runtime). `workers`: sessions that share a batched run
    (None: runtime.default_workers).
    """

    def __init__(self, classifier, device="cpu", cache=None, threads=None, builder="auto",
                 precision="float32", workers=None):
        self.classifier = classifier
        self.device = device
        self.threads = threads
        self.workers = workers
        self.cache = cache or GraphCache()
        self.builder = check_builder(builder)
        self.precision = precision
        self.builders_used = {}  # (rule, score, layer) -> the builder that made that graph
        self.last_builder = None  # the builder of the last gradient graph run
        self._layers = {}  # a layer asked for (None: the default) -> the checked layer name
        self._last_forward = (None, None)
        self._gradient_sessions = {}

    def forward_graph(self, builder="native", layer=None):
        """The prepared forward graph (outputs prob, logits, and `layer` when given) with
        `builder`'s forward fixes: made anew at each call, not kept (it holds a copy of the
        weights; the sessions share one, onnxattr.io.weights). For the native builder it
        keeps the model's references to the shared arrays (no copy of them per graph) unless
        preparing it reads them (an opset conversion, float16 weights: prepare_forward)."""
        return prepare_forward(self.classifier, FORWARD_FIXES[builder], [layer] if layer else [],
                               references=builder == "native")

    def forward_model(self):
        """The graph of the forward session (EngineSessions)."""
        return self.forward_graph()

    def forward(self, pixels, batch_size=None, reuse=True):
        """Class probabilities and logits for pixels [N, C, H, W].

        The last result is kept: several methods on the same images (the CLI's --method all,
        integrated gradients' S(I)) classify them once; `reuse=False` runs the model anyway.
        """
        key = (pixels.shape, hashlib.blake2b(np.ascontiguousarray(pixels).tobytes()).digest())
        if self._last_forward[0] != key or not reuse:
            self._last_forward = (key, tuple(self._forward_pool().run(
                {self.classifier.input_name: pixels}, [PROB, LOGITS], batch_size)))
        return self._last_forward[1]

    def gradient_graph(self, rule=VANILLA, score=PROB, layer=None, portable=False):
        """The runnable gradient graph for a ReLU rule and score, with respect to the image or
        (`layer`, a checked layer name) that layer's activation, built or read from the cache:
        from the first builder that can make it (see onnxattr.graph.builders). `portable`: only a
        graph of standard ops will do (onnxattr compile): a training graph some op of which has
        no lowering rule counts as refused."""
        check_score(score)
        refused = []
        for builder in candidates(self.builder):
            try:
                graph = self.built_graph(builder, rule, score, layer)
                if portable:
                    lower_graph(graph)  # standard ops already, or the op without a rule
            except OnnxAttrError as err:
                refused.append((builder, err))
                continue
            for other, err in refused:  # said only when another builder could do it
                note_fallback(other, err, builder)
            self.builders_used[(rule, score, layer)] = builder
            return graph
        raise refused[-1][1]

    def describe_builder(self, builder):
        """`builder`'s name, with why `auto` took the native builder: "native
        (onnxruntime-training not installed)"."""
        if self.builder != "auto" or builder != "native":
            return builder
        if "onnxruntime" not in candidates("auto"):
            return "native (onnxruntime-training not installed)"
        return "native (the onnxruntime builder cannot do this model: see the note)"

    def built_graph(self, builder, rule, score, layer=None):
        """The runnable gradient graph of one builder (from the cache, or built now). The
        cache key has the layer only when there is one, so image gradients keep their keys.
        The native builder's graphs reference the shared weights instead of holding them (a
        cache entry of a few kilobytes; SharedWeights.repoint)."""
        graph = self.cache.get_or_build(lambda: self._build(builder, rule, score, layer),
                                        self.classifier.digest, builder=builder, rule=rule,
                                        score=score, **({"layer": layer} if layer else {}))
        return self.shared_weights().repoint(graph)

    def _build(self, builder, rule, score, layer):
        forward = self.forward_graph(builder, layer)
        if builder == "native":  # it needs the weights' shapes only
            forward = self.shared_weights().strip(forward)[0]
        scored = add_score_head(forward, score)
        graph = BUILDERS[builder](scored, layer or self.classifier.input_name, rule)
        if builder != "onnxruntime":
            return graph
        try:
            return lower_graph(graph)
        except OnnxAttrError:  # an op without a lowering rule runs on the training kernels
            return graph

    def target_scores(self, pixels, targets, score=PROB, batch_size=None):
        """Each row's target score, float64 [N] (from a forward pass)."""
        return select_scores(*self.forward(pixels, batch_size), targets, score)

    def gradient(self, pixels, targets, rule=VANILLA, score=PROB, batch_size=None):
        """d score[n, targets[n]] / d pixels[n] for every row n; returns (gradient, prob, logits)."""
        return self._run_gradient(pixels, targets, rule, score, None, batch_size)

    def resolve_layer(self, layer=None):
        """The checked name of `layer`, an activation [N, K, h, w]; None: the default layer
        (onnxattr.graph.layers: the last spatial feature map before the classifier)."""
        known = self._layers.get(layer) if layer is None or isinstance(layer, str) else None
        if known is None:  # anything but a name fails the check, and is never kept
            forward = self.forward_graph()
            known = default_layer(forward) if layer is None else check_layer(forward, layer)
            self._layers[layer] = known
        return known

    def layer_gradient(self, pixels, targets, layer, score=PROB, batch_size=None):
        """The activation A [N, K, h, w] of `layer` and d score[n, targets[n]] / d A[n] for
        every row n (plain gradient: layer methods take no ReLU rule); returns
        (A, dS/dA, prob, logits)."""
        layer = self.resolve_layer(layer)
        activation, gradient, *rest = self._run_gradient(pixels, targets, VANILLA, score, layer,
                                                         batch_size)
        return (*as_feature_maps(layer, pixels.shape[2:], activation, gradient), *rest)

    def _run_gradient(self, pixels, targets, rule, score, layer, batch_size):
        """Run the gradient graph of (rule, score, layer): ([the activation,] the gradient,
        prob, logits)."""
        key = (rule, score, layer)
        if key not in self._gradient_sessions:
            self._gradient_sessions[key] = self.session(self.gradient_graph(rule, score, layer))
        onehot = np.zeros((len(pixels), self.classifier.num_classes), np.float32)
        onehot[np.arange(len(pixels)), targets] = 1.0
        feeds = {self.classifier.input_name: pixels.astype(np.float32, copy=False), ONEHOT: onehot}
        wrt = layer or self.classifier.input_name
        outputs = [*([layer] if layer else []), gradient_output(wrt), PROB, LOGITS]
        self.last_builder = self.builders_used[key]
        return tuple(self._gradient_sessions[key].run(feeds, outputs, batch_size))
