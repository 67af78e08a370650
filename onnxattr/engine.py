"""The attribution engine: one classifier, its forward session and its gradient sessions.

Gradient graphs are built once per (backward rule, score) and kept in memory and on disk.
"""

import numpy as np

from .gradient import GraphCache, build_gradient_graph, gradient_output
from .prepare import LOGITS, ONEHOT, PROB, add_score_head, prepare_forward
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
        self._gradient_sessions = {}

    @property
    def forward_graph(self):
        """The prepared forward graph (outputs prob, logits)."""
        if self._forward_graph is None:
            self._forward_graph = prepare_forward(self.classifier)
        return self._forward_graph

    def forward(self, pixels, batch_size=None):
        """Class probabilities and logits for pixels [N, C, H, W]."""
        if self._forward_session is None:
            self._forward_session = make_session(self.forward_graph, self.device, self.threads)
        prob, logits = run_batched(self._forward_session, {self.classifier.input_name: pixels},
                                   [PROB, LOGITS], batch_size)
        return prob, logits

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

    def gradient(self, pixels, targets, rule=VANILLA, score=PROB, batch_size=None):
        """d score[n, targets[n]] / d pixels[n] for every row n; returns (gradient, prob, logits)."""
        key = (rule, score)
        if key not in self._gradient_sessions:
            self._gradient_sessions[key] = make_session(self.gradient_graph(rule, score),
                                                        self.device, self.threads)
        onehot = np.zeros((len(pixels), self.classifier.num_classes), np.float32)
        onehot[np.arange(len(pixels)), targets] = 1.0
        feeds = {self.classifier.input_name: pixels.astype(np.float32, copy=False), ONEHOT: onehot}
        outputs = [gradient_output(self.classifier.input_name), PROB, LOGITS]
        return tuple(run_batched(self._gradient_sessions[key], feeds, outputs, batch_size))

