"""The attribution engine: one classifier, its forward session and its gradient sessions.

Gradient graphs are built once per (backward rule, score) and kept in memory and on disk.
"""

import hashlib

import numpy as np

from .gradient import GraphCache, build_gradient_graph, gradient_output
from .prepare import LOGITS, ONEHOT, PROB, add_score_head, prepare_forward
from .errors import OnnxAttrError
from .runtime import make_session, run_batched

VANILLA = "vanilla"


class AttributionEngine:
    """Runs forward passes and d score / d image for one classifier on one device."""

    def __init__(self, classifier, device="cpu", cache=None, threads=None):
        self.classifier = classifier
        self.device = device
        self.threads = threads
        self.cache = cache or GraphCache()
        self._forward_graph = None
        self._forward_session = None
        self._last_forward = (None, None)
        self._gradient_sessions = {}

    @property
    def forward_graph(self):
        """The prepared forward graph (outputs prob, logits)."""
        if self._forward_graph is None:
            self._forward_graph = prepare_forward(self.classifier)
        return self._forward_graph

    def forward(self, pixels, batch_size=None):
        """Class probabilities and logits for pixels [N, C, H, W].

        The last result is kept: several methods on the same images (the CLI's --method all,
        integrated gradients' S(I)) classify them once.
        """
        key = (pixels.shape, hashlib.blake2b(np.ascontiguousarray(pixels).tobytes()).digest())
        if self._last_forward[0] != key:
            if self._forward_session is None:
                self._forward_session = make_session(self.forward_graph, self.device,
                                                     self.threads)
            self._last_forward = (key, tuple(run_batched(
                self._forward_session, {self.classifier.input_name: pixels}, [PROB, LOGITS],
                batch_size)))
        return self._last_forward[1]

    def gradient_graph(self, rule=VANILLA, score=PROB):
        """The gradient graph for a backward rule and score, built or read from the cache."""
        def build():
            scored = add_score_head(self.forward_graph, score)
            graph = build_gradient_graph(scored, self.classifier.input_name)
            if rule != VANILLA:
                from .rewrite import rewrite_relu_gradients
                graph = rewrite_relu_gradients(graph, rule, forward=scored)
            return graph
        return self.cache.get_or_build(build, self.classifier.digest, rule=rule, score=score)

    def runnable_graph(self, rule=VANILLA, score=PROB):
        """The gradient graph as the engine runs it: lowered to standard ops (onnxattr.lower)
        where the model's opset and the lowering rules allow (on CPU GoogLeNet's runs in 97
        instead of 113 ms at batch 1, the same at batch 10), else as built."""
        from .lower import TARGET_OPSET, lower_graph

        graph = self.gradient_graph(rule, score)
        if self.classifier.opset < TARGET_OPSET:
            return graph
        try:
            return lower_graph(graph)
        except OnnxAttrError:  # an op without a lowering rule runs on the training kernels
            return graph

    def gradient(self, pixels, targets, rule=VANILLA, score=PROB, batch_size=None):
        """d score[n, targets[n]] / d pixels[n] for every row n; returns (gradient, prob, logits)."""
        key = (rule, score)
        if key not in self._gradient_sessions:
            self._gradient_sessions[key] = make_session(self.runnable_graph(rule, score),
                                                        self.device, self.threads)
        onehot = np.zeros((len(pixels), self.classifier.num_classes), np.float32)
        onehot[np.arange(len(pixels)), targets] = 1.0
        feeds = {self.classifier.input_name: pixels.astype(np.float32, copy=False), ONEHOT: onehot}
        outputs = [gradient_output(self.classifier.input_name), PROB, LOGITS]
        return tuple(run_batched(self._gradient_sessions[key], feeds, outputs, batch_size))



class CompiledEngine:
    """Runs a compiled attribution model (`onnxattr compile`) on stock onnxruntime.

    The model holds one backward rule and one score (its metadata says which); asking for
    another is an OnnxAttrError naming the compiled method. No gradient graph is built, so
    onnxruntime-training is not needed. A model compiled for the probability computes no
    logits: `forward` and `gradient` return log-probabilities in their place (the logits up to
    a per-row constant); one compiled for the logit returns softmax(logits) as probabilities.
    """

    def __init__(self, classifier, device="cpu", cache=None, threads=None):
        from .lower import METHOD_RULES

        self.classifier = classifier
        self.device = device
        self.threads = threads
        self.method = classifier.compiled["method"]
        self.score = classifier.compiled["score"]
        self.rule = METHOD_RULES.get(self.method)
        self._class_output = PROB if classifier.prob_output else LOGITS
        self._session = None
        self._forward_session = None

    def _both(self, values):
        """(prob, logits) from the model's one class output."""
        values = values.astype(np.float32, copy=False)
        if self._class_output == PROB:
            with np.errstate(divide="ignore"):
                return values, np.log(values)
        shifted = np.exp(values - values.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True), values

    def forward(self, pixels, batch_size=None):
        """Class probabilities and logits for pixels [N, C, H, W] (the forward half only)."""
        if self._forward_session is None:
            from .lower import forward_part
            self._forward_session = make_session(forward_part(self.classifier.proto),
                                                 self.device, self.threads)
        (values,) = run_batched(self._forward_session,
                                {"image": pixels.astype(np.float32, copy=False)},
                                [self._class_output], batch_size)
        return self._both(values)

    def gradient_graph(self, rule=VANILLA, score=PROB):
        raise OnnxAttrError("a compiled attribution model has no gradient graph to build; "
                            "it is one already")

    def check(self, rule, score):
        """Refuse a backward rule or score the model was not compiled for."""
        from .lower import METHOD_RULES

        if rule != self.rule:
            wanted = {r: m for m, r in METHOD_RULES.items()}.get(rule, rule)
            raise OnnxAttrError(f"this model is compiled for method '{self.method}' only; "
                                f"'{wanted}' needs a model compiled for it (onnxattr compile "
                                f"--method {wanted}) or the source model with "
                                "onnxruntime-training")
        if score != self.score:
            raise OnnxAttrError(f"this model is compiled for score '{self.score}' only (asked "
                                f"for '{score}'; compile with --score {score})")

    def gradient(self, pixels, targets, rule=VANILLA, score=PROB, batch_size=None):
        """The compiled method's attribution for every row n; returns (attribution, prob, logits)."""
        self.check(rule, score)
        if self._session is None:
            self._session = make_session(self.classifier.proto, self.device, self.threads)
        feeds = {"image": pixels.astype(np.float32, copy=False),
                 "target": np.asarray(targets, np.int64).reshape(len(pixels))}
        attribution, values = run_batched(self._session, feeds,
                                          ["attribution", self._class_output], batch_size)
        return (attribution, *self._both(values))


def make_engine(classifier, device="cpu", cache=None, threads=None):
    """The engine for a classifier: CompiledEngine for compiled attribution models."""
    kind = CompiledEngine if classifier.compiled else AttributionEngine
    return kind(classifier, device, cache, threads)
