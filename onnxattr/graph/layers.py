"""Which layer a layer attribution method (Grad-CAM) reads: the default, and checks of a name.

A layer is an activation, the output of a node, of shape [N, K, h, w]. The default is the last
spatial feature map before the classifier: walking back from the logits through the nodes that
feed them, nearest first (a topological order of the logits' ancestors, reversed), the first
node output whose inferred shape is [N, K, h, w] with h * w > 1. For GoogLeNet that is
`inception_5b/output` (the input of the global average pool pool5), for torchvision's ResNets
layer4's output (the input of GlobalAveragePool): the layer Selvaraju et al. use.
"""

from ..errors import OnnxAttrError
from .prepare import LOGITS
from .toolkit import ancestors_nearest_first, infer_shapes

CANDIDATES = 5  # layer names an error suggests


def spatial_layers(forward):
    """[(name, shape)] of the node outputs of `forward` (a prepared forward graph) that are
    [N, K, h, w] with h * w > 1 and feed the logits, nearest the logits first."""
    shapes, _ = infer_shapes(forward, symbolic=True)
    found = []
    for node in ancestors_nearest_first(forward.graph, LOGITS):
        for name in node.output:
            shape = shapes.get(name)
            if (name and shape is not None and len(shape) == 4
                    and all(isinstance(d, int) for d in shape[2:]) and shape[2] * shape[3] > 1):
                found.append((name, shape))
    return list(dict(found).items())


def default_layer(forward):
    """The default layer of `forward` (see the module docstring)."""
    found = spatial_layers(forward)
    if not found:
        raise OnnxAttrError("no activation of shape [N, K, h, w] with h * w > 1 feeds the "
                            "logits; name a layer (--layer)")
    return found[0][0]


def check_layer(forward, layer):
    """`layer` if it names an activation of `forward` that is (or may be: shape inference does
    not know every tensor) [N, K, h, w]; else an OnnxAttrError suggesting a few layers."""
    if not isinstance(layer, str) or not layer:
        raise OnnxAttrError(f"layer must be a tensor name, got {layer!r}{_suggestions(forward)}")
    graph = forward.graph
    if layer not in {name for node in graph.node for name in node.output}:
        if layer in {t.name for t in graph.initializer} | {i.name for i in graph.input}:
            problem = "is an input or a weight of the model, not a layer's activation"
        else:
            problem = "is not a tensor of the model"
        raise OnnxAttrError(f"layer '{layer}' {problem}{_suggestions(forward)}")
    shape = infer_shapes(forward, symbolic=True)[0].get(layer)
    if shape is not None and len(shape) != 4:
        raise OnnxAttrError(f"layer '{layer}' has shape {_show(shape)}, not [N, K, h, w]"
                            f"{_suggestions(forward)}")
    return layer


def check_activation(layer, activation):
    """The activation a run returned for `layer`, if it is [N, K, h, w] (for tensors whose
    shape inference did not know)."""
    if activation.ndim != 4:
        raise OnnxAttrError(f"layer '{layer}' has shape {list(activation.shape)}, not "
                            "[N, K, h, w]")
    return activation


def _show(shape):
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _suggestions(forward):
    found = spatial_layers(forward)
    if not found:
        return ""
    names = ", ".join(f"{name} {_show(shape)}" for name, shape in found[:CANDIDATES])
    more = f" and {len(found) - CANDIDATES} more" if len(found) > CANDIDATES else ""
    return f" (layers nearest the output: {names}{more})"
