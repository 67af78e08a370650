"""Which layer a layer attribution method (Grad-CAM) reads: the default, and checks of a name.

A layer is an activation, the output of a node, of shape [N, K, h, w]: channels-first, on the
image's grid. The default is the last spatial feature map before the classifier: walking back
from the logits through the nodes that feed them, nearest first (a topological order of the
logits' ancestors, reversed), the first node output that is a feature map. For GoogLeNet that
is `inception_5b/output` (the input of the global average pool pool5), for torchvision's ResNets
layer4's output (the input of GlobalAveragePool): the layer Selvaraju et al. use.

A feature map is a 4-D tensor with h * w > 1 that is channels-first and on the image's grid.
Channels-first is known by following each tensor's layout from the prepared graph's image input
[N, C, H, W]: Transposes permute it, convolutions, pooling and the channels-first norms (ONNX's
Conv, BatchNormalization ...) make NCHW, shape-keeping ops (activations, Add, Concat, a
LayerNormalization over the last axis) keep it, a MatMul over channels-last features keeps
NHWC, and any other op (Reshape, Flatten) loses it. So the Transpose(0, 2, 3, 1) that tf2onnx
and jax2onnx put before Flatten, and the channels-last blocks of ConvNeXt, are never read as
channels: a tensor known channels-last is no layer, one of unknown layout is one only if its
grid is the image's (h <= H, w <= W, the two downsampling factors within a factor 2: an
attention tensor [N, heads, tokens, dim] is not). A Pad's output is no layer either: it is its
input plus a border (Keras' ZeroPadding2D before a strided convolution), so where a small input
leaves 1x1 maps at the end (MobileNetV2 at 32x32) the default is the map the last Pad reads,
not the padded one. A model without any gets one line asking for --layer.

A layer named with --layer may also be a token sequence [N, T, C] (a ViT's): read as its h x w
grid, the image's downsampled (H / h = W / w: square patches), after a class token when
T = 1 + h * w, else with T = h * w; tokens row by row, as pytorch-grad-cam's `reshape_transform`
for ViTs (`tensor[:, 1:, :].reshape(N, h, w, C)`, then channels first) reads them. Its activation
and gradient both become [N, C, h, w] (`as_feature_maps`), and Grad-CAM is the usual.
"""

from ..errors import OnnxAttrError
from .prepare import LOGITS
from .toolkit import ancestors_nearest_first, attribute, infer_shapes

CANDIDATES = 5  # layer names an error suggests
CHANNELS_FIRST_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool",
                      "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxUnpool",
                      "BatchNormalization", "InstanceNormalization", "LRN", "DepthToSpace",
                      "SpaceToDepth"}
LOSES_LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Gemm", "Einsum"}
MAX_STRIDE_RATIO = 2.0  # how much the two downsampling factors of a map on the grid may differ
TOKENS = "nor tokens [N, 1 + h*w, C] or [N, h*w, C] on the image's h x w grid"


def tensor_layouts(forward, shapes):
    """{tensor: "NCHW", "NHWC" or another axis order} of the 4-D tensors of `forward` whose
    layout is known (see the module docstring); `shapes` from infer_shapes."""
    layouts = {i.name: "NCHW" for i in forward.graph.input if len(shapes.get(i.name) or ()) == 4}
    for node in forward.graph.node:
        known = [(layouts[i], shapes.get(i)) for i in node.input if i in layouts]
        for name in (o for o in node.output if o and len(shapes.get(o) or ()) == 4):
            layout = _output_layout(node, known, shapes.get(name))
            if layout:
                layouts[name] = layout
    return layouts


def _output_layout(node, known, shape):
    """The layout of a 4-D output of `node`, from its inputs' known (layout, shape)."""
    if node.op_type in CHANNELS_FIRST_OPS:
        return "NCHW"
    if not known or node.op_type in LOSES_LAYOUT:
        return None
    if node.op_type == "Transpose":
        layout = known[0][0]
        return "".join(layout[p] for p in attribute(node, "perm", [3, 2, 1, 0]))
    if node.op_type == "MatMul":  # a Linear over channels-last features (ConvNeXt)
        return "NHWC" if known[0][0] == "NHWC" else None
    if node.op_type in ("Concat", "Pad", "Slice", "Resize"):
        return known[0][0]
    same_grid = [layout for layout, input_shape in known
                 if input_shape is not None and shape is not None
                 and _grid(layout, input_shape) == _grid(layout, shape)]
    return same_grid[0] if same_grid else None


def _grid(layout, shape):
    return tuple(shape[layout.index(axis)] for axis in "HW")


def spatial_layers(forward):
    """[(name, shape)] of the node outputs of `forward` (a prepared forward graph) that are
    feature maps [N, K, h, w] (see the module docstring) and feed the logits, nearest the logits
    first."""
    shapes, _ = infer_shapes(forward, symbolic=True)
    layouts = tensor_layouts(forward, shapes)
    image = shapes.get(forward.graph.input[0].name) or [None] * 4
    found = []
    for node in ancestors_nearest_first(forward.graph, LOGITS):
        for name in node.output if node.op_type != "Pad" else ():
            shape = shapes.get(name)
            if (name and shape is not None and len(shape) == 4
                    and all(isinstance(d, int) for d in shape[2:]) and shape[2] * shape[3] > 1
                    and layouts.get(name, "NCHW") == "NCHW" and _on_grid(shape, image)):
                found.append((name, shape))
    return list(dict(found).items())


def _on_grid(shape, image):
    """Whether a map [N, K, h, w] can be the image [N, C, H, W] downsampled."""
    height, width = image[2:]
    if not (isinstance(height, int) and isinstance(width, int)):
        return True
    h, w = shape[2:]
    if h > height or w > width:
        return False
    strides = sorted((height / h, width / w))
    return strides[1] <= MAX_STRIDE_RATIO * strides[0]


def default_layer(forward):
    """The default layer of `forward` (see the module docstring)."""
    found = spatial_layers(forward)
    if not found:
        raise OnnxAttrError("no channels-first feature map [N, K, h, w] on the image's grid "
                            "feeds the logits; name a layer (--layer: a token sequence "
                            "[N, 1 + h*w, C] is read as its h x w grid)")
    return found[0][0]


def check_layer(forward, layer):
    """The name of the activation `layer` names: a tensor of `forward` that is (or may be: shape
    inference does not know every tensor) [N, K, h, w] channels-first, or a Keras layer's name
    (a path component of tf2onnx's tensor names: the layer's last feature map); else an
    OnnxAttrError suggesting a few layers."""
    if not isinstance(layer, str) or not layer:
        raise OnnxAttrError(f"layer must be a tensor name, got {layer!r}{_suggestions(forward)}")
    graph = forward.graph
    if layer not in {name for node in graph.node for name in node.output}:
        named = [name for name, _ in spatial_layers(forward)
                 if layer in name.split(":")[0].split("/")[:-1]]
        if named:
            return named[0]
        if layer in {t.name for t in graph.initializer} | {i.name for i in graph.input}:
            problem = "is an input or a weight of the model, not a layer's activation"
        else:
            problem = "is not a tensor of the model"
        raise OnnxAttrError(f"layer '{layer}' {problem}{_suggestions(forward)}")
    shapes = infer_shapes(forward, symbolic=True)[0]
    shape = shapes.get(layer)
    image = shapes.get(graph.input[0].name) or [None] * 4
    if shape is not None and len(shape) != 4 and not (
            len(shape) == 3 and token_grid(shape[1], image[2:]) is not None):
        raise OnnxAttrError(f"layer '{layer}' has shape {_show(shape)}, not [N, K, h, w] "
                            f"{TOKENS}{_suggestions(forward)}")
    layout = tensor_layouts(forward, shapes).get(layer, "NCHW")
    if layout != "NCHW":
        raise OnnxAttrError(f"layer '{layer}' {_show(shape)} is {layout}, not channels-first "
                            f"[N, K, h, w]{_suggestions(forward)}")
    return layer


def token_grid(count, size):
    """(h, w, first) where a sequence of `count` tokens is the image's grid (`size` (H, W)
    downsampled, H / h = W / w) after `first` leading tokens (1: a class token, tried first;
    0: none); None where neither is, or the size or count is unknown."""
    height, width = size
    if not all(isinstance(d, int) for d in (count, height, width)):
        return None
    for first in (1, 0):
        cells = count - first
        for h in range(1, min(cells, height) + 1):
            if cells % h == 0 and height * (cells // h) == width * h:
                return h, cells // h, first
    return None


def as_feature_maps(layer, size, activation, gradient):
    """A run's activation of `layer` and the score's gradient there as [N, K, h, w]: as they
    are, or a token sequence [N, T, C] read as its grid (see the module docstring); else (for
    tensors whose shape inference did not know) an OnnxAttrError."""
    if activation.ndim == 4:
        return activation, gradient
    grid = token_grid(activation.shape[1], size) if activation.ndim == 3 else None
    if grid is None:
        raise OnnxAttrError(f"layer '{layer}' has shape {list(activation.shape)}, not "
                            f"[N, K, h, w] {TOKENS}")
    h, w, first = grid
    return tuple(tensor[:, first:].reshape(len(tensor), h, w, -1).transpose(0, 3, 1, 2)
                 for tensor in (activation, gradient))


def _show(shape):
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _suggestions(forward):
    found = spatial_layers(forward)
    if not found:
        return ""
    names = ", ".join(f"{name} {_show(shape)}" for name, shape in found[:CANDIDATES])
    more = f" and {len(found) - CANDIDATES} more" if len(found) > CANDIDATES else ""
    return f" (layers nearest the output: {names}{more})"
