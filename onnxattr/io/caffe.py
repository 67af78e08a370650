"""Convert a Caffe classifier (deploy.prototxt + raw float32 weight files) to ONNX.

The directory layout is BVLC GoogLeNet's as shared with this project: `deploy.prototxt`,
`synset_words.txt` and `weights/<layer>_filter.bin`, `weights/<layer>_bias.bin`, raw
little-endian float32 with convolution filters stored as (out, kh, kw, in).

The exported model takes what every onnxattr model takes: `image`, float32 [N,3,H,W], RGB,
pixel values 0..255. Caffe's own preprocessing lives inside the graph:
- a Sub node (named after the Caffe input layer) subtracts the mean pixel (R 123, G 117, B 104);
- Caffe networks read BGR, so the convolution reading the input gets its filter's in-channel
  axis reversed: conv(bgr, W) == conv(rgb, W[:, ::-1]), with no extra node in the graph.
The outputs are `logits` (the input of the final Softmax) and `prob`.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxattr.errors import OnnxAttrError
from onnxattr.io.files import atomic_path

OPSET = 17
IR_VERSION = 8  # onnxruntime(-training) 1.19 reads IR <= 10; recent onnx stamps newer ones
MEAN_RGB = (123.0, 117.0, 104.0)  # BVLC's mean pixel (B 104, G 117, R 123), in RGB order
CAFFE_PREPROCESSING = (
    "Subtracts the mean pixel (R 123, G 117, B 104); the RGB to BGR swap the Caffe weights "
    "expect is folded into the first convolution's filter."
)

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|#[^\n]*|[{}:]|[^\s{}:"#]+')
_FILLERS = {"weight_filler", "bias_filler"}  # training-only fields, ignored


def parse_prototxt(text):
    """Parse protobuf text format into nested dicts.

    Every field name maps to the list of its values (fields may repeat): sub-messages are
    dicts, quoted strings are unquoted, numbers become int or float, enums stay strings.
    """
    tokens = iter(t for t in _TOKEN.findall(text) if not t.startswith("#"))
    try:
        return _message(tokens)
    except StopIteration:
        raise OnnxAttrError("prototxt ends inside a message or field") from None


def _message(tokens):
    fields = {}
    for key in tokens:
        if key == "}":
            break
        value = next(tokens)
        if value == ":":
            value = next(tokens)
        value = _message(tokens) if value == "{" else _scalar(value)
        fields.setdefault(key, []).append(value)
    return fields


def _scalar(token):
    if token.startswith('"'):
        return token[1:-1]
    for kind in (int, float):
        try:
            return kind(token)
        except ValueError:
            pass
    return token


def read_labels(path):
    """Class labels from synset_words.txt: the first synonym on each `nXXXXXXXX name, ...` line."""
    lines = _read_text(path).splitlines()
    return [line.split(" ", 1)[-1].split(",")[0].strip() for line in lines if line.strip()]


def input_metadata(preprocessing, height=224, width=224):
    """The `onnxattr.input` contract: RGB NCHW pixels 0..255, and what the graph does to them."""
    return {"name": "image", "layout": "NCHW", "channels": "RGB", "range": [0, 255],
            "height": height, "width": width, "preprocessing": preprocessing}


def set_metadata(model, labels, source, input_info):
    """Store labels, the input contract and the source in the model's metadata_props."""
    helper.set_model_props(model, {
        "onnxattr.labels": json.dumps(labels),
        "onnxattr.input": json.dumps(input_info),
        "onnxattr.source": source,
    })


def save_model(model, path):
    """Check `model` and write it to `path` atomically."""
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, tmp)
    return Path(path)


def build_model(caffe_dir, source="BVLC GoogLeNet (Caffe)"):
    """Build the ONNX model (with metadata) of the Caffe network in `caffe_dir`."""
    caffe_dir = Path(caffe_dir)
    if not caffe_dir.is_dir():
        raise OnnxAttrError(f"Caffe model directory not found: {caffe_dir}")
    net = parse_prototxt(_read_text(caffe_dir / "deploy.prototxt"))
    labels = read_labels(caffe_dir / "synset_words.txt")
    graph = _Converter(caffe_dir / "weights").convert(net.get("layer", []))
    if len(labels) != graph.output[1].type.tensor_type.shape.dim[1].dim_value:
        raise OnnxAttrError(f"{caffe_dir / 'synset_words.txt'}: {len(labels)} labels do not match "
                            "the classifier's outputs")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="onnxattr")
    _, _, height, width = (d.dim_value for d in graph.input[0].type.tensor_type.shape.dim)
    set_metadata(model, labels, source, input_metadata(CAFFE_PREPROCESSING, height, width))
    return model


def export(caffe_dir, output):
    """Convert the Caffe network in `caffe_dir` and save it to `output`; return the path."""
    return save_model(build_model(caffe_dir), output)


def _read_text(path):
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise OnnxAttrError(f"missing file: {path}") from None


def _params(layer, group, **defaults):
    """Fields of the layer's `group` message as {name: first value}, over `defaults`.

    A default of None marks a required field; fields not in `defaults` are unsupported.
    """
    fields = {key: values[0] for key, values in layer.get(group, [{}])[0].items()
              if key not in _FILLERS}
    name = layer["name"][0]
    if unsupported := sorted(set(fields) - set(defaults)):
        raise OnnxAttrError(f"layer {name}: unsupported {group} fields {unsupported}")
    params = {**defaults, **fields}
    if missing := [key for key, value in params.items() if value is None]:
        raise OnnxAttrError(f"layer {name}: {group} lacks {missing}")
    return params


def _pooled_size(size, kernel, stride, pad):
    """Caffe's pooled output size: ceil rounding, without windows starting in the padding."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    return out - 1 if pad and (out - 1) * stride >= size + pad else out


class _Converter:
    """Walk Caffe layers in order, emitting ONNX nodes named after the layers.

    `blobs` maps each Caffe blob to (ONNX tensor name, (C, H, W)); in-place layers such as
    ReLU rebind their blob to the new tensor, which is named after the layer.
    """

    def __init__(self, weights_dir):
        self.weights_dir = weights_dir
        self.nodes, self.initializers, self.blobs = [], [], {}
        self.inputs, self.input_blob = [], None

    def convert(self, layers):
        """Return the ONNX graph of `layers`; the last must be the Softmax giving `prob`."""
        handlers = {"Input": self._input, "Convolution": self._convolution, "ReLU": self._relu,
                    "Pooling": self._pooling, "LRN": self._lrn, "Concat": self._concat,
                    "Dropout": self._dropout, "InnerProduct": self._inner_product,
                    "Softmax": self._softmax}
        for layer in layers:
            kind, name = layer["type"][0], layer["name"][0]
            if kind not in handlers:
                raise OnnxAttrError(f"layer {name}: unsupported Caffe layer type {kind}")
            if self.input_blob in layer.get("bottom", []) and kind != "Convolution":
                raise OnnxAttrError(f"layer {name}: only convolutions may read the input")
            handlers[kind](layer, name)
        if not layers or layers[-1]["type"][0] != "Softmax" or not self.inputs:
            raise OnnxAttrError("the network must have an Input layer and end with a Softmax")
        logits, shape = self.blobs[layers[-1]["bottom"][0]]
        self._rename({logits: "logits", self.blobs[layers[-1]["top"][0]][0]: "prob"})
        outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", shape[0]])
                   for n in ("logits", "prob")]
        return helper.make_graph(self.nodes, "caffe", self.inputs, outputs, self.initializers)

    def _rename(self, names):
        for node in self.nodes:
            node.input[:] = [names.get(n, n) for n in node.input]
            node.output[:] = [names.get(n, n) for n in node.output]

    def _bottom(self, layer):
        return self.blobs[layer["bottom"][0]]

    def _emit(self, layer, op, inputs, shape, name=None, **attrs):
        """Add one node named `name` (default: the layer's) and bind its output to the top blob."""
        name = name or layer["name"][0]
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        self.blobs[layer["top"][0]] = (name, shape)

    def _constant(self, name, array):
        array = np.ascontiguousarray(array, dtype=np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def _weight(self, layer_name, kind, shape):
        path = self.weights_dir / f"{layer_name}_{kind}.bin"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise OnnxAttrError(f"missing weight file: {path}") from None
        if len(data) != 4 * math.prod(shape):
            raise OnnxAttrError(f"{path}: {len(data)} bytes, expected float32 {shape}")
        return np.frombuffer(data, "<f4").reshape(shape)

    def _input(self, layer, name):
        dims = _params(layer, "input_param", shape=None)["shape"]["dim"]
        if len(dims) != 4 or dims[1] != 3:
            raise OnnxAttrError(f"layer {name}: expected a [N,3,H,W] input, got {dims}")
        self.inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *dims[1:]])]
        mean = self._constant(f"{name}/mean", np.reshape(MEAN_RGB, (1, 3, 1, 1)))
        self._emit(layer, "Sub", ["image", mean], tuple(dims[1:]))
        self.input_blob = layer["top"][0]

    def _convolution(self, layer, name):
        p = _params(layer, "convolution_param", num_output=None, kernel_size=None, stride=1, pad=0)
        (x, (c, h, w)), n, k = self._bottom(layer), p["num_output"], p["kernel_size"]
        weight = self._weight(name, "filter", (n, k, k, c)).transpose(0, 3, 1, 2)
        if layer["bottom"][0] == self.input_blob:
            weight = weight[:, ::-1]  # BGR filter applied to RGB input
        inputs = [x, self._constant(f"{name}/filter", weight),
                  self._constant(f"{name}/bias", self._weight(name, "bias", (n,)))]
        size = [(s + 2 * p["pad"] - k) // p["stride"] + 1 for s in (h, w)]
        self._emit(layer, "Conv", inputs, (n, *size), kernel_shape=[k, k],
                   strides=[p["stride"]] * 2, pads=[p["pad"]] * 4)

    def _relu(self, layer, name):
        _params(layer, "relu_param")
        x, shape = self._bottom(layer)
        self._emit(layer, "Relu", [x], shape)

    def _pooling(self, layer, name):
        p = _params(layer, "pooling_param", pool="MAX", kernel_size=None, stride=1, pad=0)
        (x, (c, h, w)), k, s, pad = self._bottom(layer), p["kernel_size"], p["stride"], p["pad"]
        attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4)
        if p["pool"] == "MAX":
            self._emit(layer, "MaxPool", [x], (c, *(_pooled_size(d, k, s, pad) for d in (h, w))),
                       ceil_mode=1, **attrs)
        elif p["pool"] == "AVE" and pad == 0 and (h - k) % s == 0 and (w - k) % s == 0:
            # exact tiling: Caffe's ceil rounding and ONNX's floor agree, no partial windows
            self._emit(layer, "AveragePool", [x], (c, (h - k) // s + 1, (w - k) // s + 1), **attrs)
        else:
            raise OnnxAttrError(f"layer {name}: only MAX pooling and unpadded, exactly tiling "
                                f"AVE pooling are supported ({p['pool']} {k}x{k} on {h}x{w})")

    def _lrn(self, layer, name):
        p = _params(layer, "lrn_param", local_size=5, alpha=1.0, beta=0.75, k=1.0,
                    norm_region="ACROSS_CHANNELS")
        if p["norm_region"] != "ACROSS_CHANNELS":
            raise OnnxAttrError(f"layer {name}: only ACROSS_CHANNELS LRN is supported")
        x, shape = self._bottom(layer)
        self._emit(layer, "LRN", [x], shape, size=p["local_size"], alpha=float(p["alpha"]),
                   beta=float(p["beta"]), bias=float(p["k"]))

    def _concat(self, layer, name):
        if _params(layer, "concat_param", axis=1)["axis"] != 1:
            raise OnnxAttrError(f"layer {name}: only channel concatenation is supported")
        parts = [self.blobs[b] for b in layer["bottom"]]
        if len({shape[1:] for _, shape in parts}) != 1:
            raise OnnxAttrError(f"layer {name}: inputs differ in height or width")
        channels = sum(shape[0] for _, shape in parts)
        self._emit(layer, "Concat", [t for t, _ in parts], (channels, *parts[0][1][1:]), axis=1)

    def _dropout(self, layer, name):
        """Dropout is the identity at inference: the top blob is the bottom one."""
        self.blobs[layer["top"][0]] = self._bottom(layer)

    def _inner_product(self, layer, name):
        n = _params(layer, "inner_product_param", num_output=None)["num_output"]
        x, shape = self._bottom(layer)
        flat = f"{name}/flatten"
        self.nodes.append(helper.make_node("Flatten", [x], [flat], name=flat, axis=1))
        weight = self._weight(name, "filter", (n, math.prod(shape)))
        inputs = [flat, self._constant(f"{name}/filter", weight),
                  self._constant(f"{name}/bias", self._weight(name, "bias", (n,)))]
        self._emit(layer, "Gemm", inputs, (n, 1, 1), transB=1)

    def _softmax(self, layer, name):
        if _params(layer, "softmax_param", axis=1)["axis"] != 1:
            raise OnnxAttrError(f"layer {name}: only a Softmax over channels is supported")
        x, shape = self._bottom(layer)
        self._emit(layer, "Softmax", [x], shape, axis=1)
