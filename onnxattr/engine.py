"""The attribution engine: one classifier, its forward session and its gradient sessions.

Gradient graphs are built once per (builder, ReLU rule, score) and kept in memory and on disk
(builders.GraphCache). The forward passes run the model as it is (with its pixel contract in
front); the gradient graphs are standard ops: the native builder's as built, the training
builder's lowered (onnxattr.lowering; on CPU GoogLeNet's runs in 97 instead of 113 ms at batch
1, the same at batch 10) where the lowering rules allow, else on the training kernels.
"""

import hashlib

import numpy as np

from .builders import BUILDERS, FORWARD_FIXES, GraphCache, candidates, check_builder, note_fallback
from .errors import OnnxAttrError
from .lowering import lower_graph
from .prepare import (
    LOGITS,
    ONEHOT,
    PROB,
    add_score_head,
    check_score,
    gradient_output,
    prepare_forward,
)
from .relu_rules import VANILLA
from .runtime import make_session, run_batched


class AttributionEngine:
    """Runs forward passes and d score / d image for one classifier on one device.

    `builder`: "auto", "onnxruntime" or "native" (onnxattr.builders). `precision`: "float32"
    or "tf32" (CUDA only; see onnxattr.runtime).
    """

    def __init__(self, classifier, device="cpu", cache=None, threads=None, builder="auto",
                 precision="float32"):
        self.classifier = classifier
        self.device = device
        self.threads = threads
        self.cache = cache or GraphCache()
        self.builder = check_builder(builder)
        self.precision = precision
        self.builders_used = {}  # (rule, score) -> the builder that made that graph
        self._forward_graphs = {}
        self._forward_session = None
        self._last_forward = (None, None)
        self._gradient_sessions = {}

    def forward_graph(self, builder="native"):
        """The prepared forward graph (outputs prob, logits) with `builder`'s forward fixes."""
        if builder not in self._forward_graphs:
            self._forward_graphs[builder] = prepare_forward(self.classifier,
                                                            FORWARD_FIXES[builder])
        return self._forward_graphs[builder]

    def session(self, graph):
        return make_session(graph, self.device, self.threads, self.precision)

    def run(self, session, feeds, outputs, batch_size=None):
        """A batched run at the model's fixed batch, padding on CUDA (one shape per session)."""
        return run_batched(session, feeds, outputs, batch_size, self.classifier.batch,
                           pad_last=self.device == "cuda")

    def forward(self, pixels, batch_size=None):
        """Class probabilities and logits for pixels [N, C, H, W].

        The last result is kept: several methods on the same images (the CLI's --method all,
        integrated gradients' S(I)) classify them once.
        """
        key = (pixels.shape, hashlib.blake2b(np.ascontiguousarray(pixels).tobytes()).digest())
        if self._last_forward[0] != key:
            if self._forward_session is None:
                self._forward_session = self.session(self.forward_graph())
            self._last_forward = (key, tuple(self.run(
                self._forward_session, {self.classifier.input_name: pixels}, [PROB, LOGITS],
                batch_size)))
        return self._last_forward[1]

    def gradient_graph(self, rule=VANILLA, score=PROB, portable=False):
        """The runnable gradient graph for a ReLU rule and score, built or read from the cache:
        from the first builder that can make it (see onnxattr.builders). `portable`: only a
        graph of standard ops will do (onnxattr compile): a training graph some op of which has
        no lowering rule counts as refused."""
        check_score(score)
        refused = []
        for builder in candidates(self.builder):
            try:
                graph = self.built_graph(builder, rule, score)
                if portable:
                    lower_graph(graph)  # standard ops already, or the op without a rule
            except OnnxAttrError as err:
                refused.append((builder, err))
                continue
            for other, err in refused:  # said only when another builder could do it
                note_fallback(other, err, builder)
            self.builders_used[(rule, score)] = builder
            return graph
        raise refused[-1][1]

    def built_graph(self, builder, rule, score):
        """The runnable gradient graph of one builder (from the cache, or built now)."""
        return self.cache.get_or_build(lambda: self._build(builder, rule, score),
                                       self.classifier.digest, builder=builder, rule=rule,
                                       score=score)

    def _build(self, builder, rule, score):
        scored = add_score_head(self.forward_graph(builder), score)
        graph = BUILDERS[builder](scored, self.classifier.input_name, rule)
        if builder != "onnxruntime":
            return graph
        try:
            return lower_graph(graph)
        except OnnxAttrError:  # an op without a lowering rule runs on the training kernels
            return graph

    def gradient(self, pixels, targets, rule=VANILLA, score=PROB, batch_size=None):
        """d score[n, targets[n]] / d pixels[n] for every row n; returns (gradient, prob, logits)."""
        key = (rule, score)
        if key not in self._gradient_sessions:
            self._gradient_sessions[key] = self.session(self.gradient_graph(rule, score))
        onehot = np.zeros((len(pixels), self.classifier.num_classes), np.float32)
        onehot[np.arange(len(pixels)), targets] = 1.0
        feeds = {self.classifier.input_name: pixels.astype(np.float32, copy=False), ONEHOT: onehot}
        outputs = [gradient_output(self.classifier.input_name), PROB, LOGITS]
        return tuple(self.run(self._gradient_sessions[key], feeds, outputs, batch_size))
