"""Attribution methods: numpy around the engine's d score / d image.

Each method is one entry of `METHODS`: a title for figures and a function
`(engine, pixels, targets, score, batch_size, **options) -> (attribution, extras)` where
`attribution` is float32 [N, C, H, W] and `extras` is a list of per-image dicts of numbers
(e.g. a completeness delta). A new method is one function and one entry.
"""

from dataclasses import dataclass
from typing import Callable

from .errors import OnnxAttrError


@dataclass(frozen=True)
class Method:
    title: str  # figure title, "<title> (<class>)"
    compute: Callable


def _backprop(rule):
    """The gradient with the given ReLU backward rule (`vanilla` is the plain gradient)."""
    def compute(engine, pixels, targets, score, batch_size, **options):
        _no_options(options)
        attribution, _, _ = engine.gradient(pixels, targets, rule, score, batch_size)
        return attribution, [{} for _ in pixels]
    return compute


def _no_options(options):
    if options:
        raise OnnxAttrError(f"unknown option(s) for this method: {', '.join(sorted(options))}")


METHODS = {
    "gradient": Method("Gradient Attribution Map", _backprop("vanilla")),
    "guided-backprop": Method("Guided Backpropagation", _backprop("guided")),
    "zeiler-fergus": Method("Zeiler-Fergus", _backprop("zeiler-fergus")),
}


def get_method(name):
    """The method called `name`, or an error listing the known ones."""
    if name not in METHODS:
        raise OnnxAttrError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]
