"""Small ONNX classifiers built in the tests, each exercising a few ops, and a float64 copy.

Every model takes `image` [N, 3, 8, 8] and outputs `prob` (softmax) or only `logits`.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

OPSET = 17
SIZE = 8
LABELS = ["apple", "banana", "cherry", "date", "elderberry"]  # of the 5-class models


def _weights(rng, *shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def classifier(nodes, initializers, features, classes=5, softmax=True, seed=0, size=(SIZE, SIZE),
               channels_last=False):
    """Wrap `nodes` (image -> `features` [N, F]) with a Gemm head and optionally a Softmax;
    the image is [N, 3, *size], or [N, *size, 3] `channels_last`."""
    rng = np.random.default_rng(seed + 100)
    dim = initializers.pop("__features__")
    initializers = dict(initializers, head_w=_weights(rng, classes, dim, scale=0.3),
                        head_b=_weights(rng, classes, scale=0.1))
    nodes = list(nodes) + [helper.make_node("Gemm", [features, "head_w", "head_b"], ["logits"],
                                            name="head", transB=1)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1))
        outputs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", classes])]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info(
            "image", TensorProto.FLOAT, ["N", *size, 3] if channels_last else ["N", 3, *size])],
        outputs,
        [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_relu_maxpool_lrn(seed=0):
    """Conv -> Relu -> MaxPool(ceil_mode) -> LRN -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[3, 3],
                         strides=[2, 2], ceil_mode=1),
        helper.make_node("LRN", ["p1"], ["n1"], name="lrn1", size=3, alpha=0.5, beta=0.75,
                         bias=1.0),
        helper.make_node("Flatten", ["n1"], ["f"], name="flatten"),
    ]
    # 8x8 -> conv (pad 1) 8x8 -> maxpool 3/2 ceil -> 4x4 (floor would give 3x3)
    return classifier(nodes, {"w1": _weights(rng, 4, 3, 3, 3), "b1": _weights(rng, 4),
                              "__features__": 4 * 4 * 4}, "f", seed=seed)


def conv_relu_global_pool(size=(9, 7), seed=0):
    """Conv -> Relu -> Conv (stride 2) -> Relu -> GlobalAveragePool -> Flatten -> Gemm ->
    Softmax, on images of any `size` (the default's sides are odd and unequal)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
    ]
    return classifier(nodes, {"w1": _weights(rng, 4, 3, 3, 3), "b1": _weights(rng, 4),
                              "w2": _weights(rng, 6, 4, 3, 3), "b2": _weights(rng, 6),
                              "__features__": 6}, "f", seed=seed, size=size)


def channels_last_cnn(seed=0, size=(8, 6)):
    """A CNN as tf2onnx writes a Keras one (channels-last, the default): image [N, H, W, 3] ->
    Transpose to NCHW -> Conv -> Relu -> Conv (stride 2) -> Relu -> Transpose(0, 2, 3, 1) back
    to channels-last [N, h, w, 6] -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(seed)
    height, width = (size[0] + 1) // 2, (size[1] + 1) // 2
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="model/conv2/BiasAdd",
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["model/conv2/Relu:0"], name="model/conv2/Relu"),
        helper.make_node("Transpose", ["model/conv2/Relu:0"], ["nhwc"], name="Transpose__96",
                         perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["nhwc"], ["f"], name="flatten"),
    ]
    return classifier(nodes, {"w1": _weights(rng, 4, 3, 3, 3), "b1": _weights(rng, 4),
                              "w2": _weights(rng, 6, 4, 3, 3), "b2": _weights(rng, 6),
                              "__features__": 6 * height * width}, "f", seed=seed, size=size,
                      channels_last=True)


def concat_batchnorm(seed=0, softmax=True):
    """Two Conv branches (one with BatchNormalization) -> Concat -> Relu -> GlobalAveragePool."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "wa", "ba"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["image", "wb"], ["b0"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["b0", "g", "beta", "mean", "var"], ["b"],
                         name="bn_b", epsilon=1e-3),
        helper.make_node("BatchNormalization", ["image", "g3", "beta3", "mean3", "var3"], ["nb"],
                         name="bn_input"),
        helper.make_node("Concat", ["a", "b", "nb"], ["cat"], name="concat", axis=1),
        helper.make_node("Relu", ["cat"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["d"], name="dropout"),
        helper.make_node("AveragePool", ["d"], ["p"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
    ]
    inits = {"wa": _weights(rng, 3, 3, 1, 1), "ba": _weights(rng, 3), "wb": _weights(rng, 4, 3, 3, 3),
             "g": 1 + _weights(rng, 4, scale=0.2), "beta": _weights(rng, 4),
             "mean": _weights(rng, 4), "var": 0.5 + np.abs(_weights(rng, 4)),
             "g3": 1 + _weights(rng, 3, scale=0.2), "beta3": _weights(rng, 3),
             "mean3": _weights(rng, 3), "var3": 0.5 + np.abs(_weights(rng, 3)),
             "__features__": 10 * 4 * 4}
    return classifier(nodes, inits, "f", softmax=softmax, seed=seed)


def auto_padded(seed=0, explicit=False):
    """Conv (stride 2, auto_pad SAME_UPPER) -> Relu -> MaxPool (2x2, SAME_LOWER) -> AveragePool
    (3x3, stride 2, SAME_UPPER) -> Flatten -> Gemm -> Softmax, as jax2onnx writes windows; or,
    `explicit`, the same with the pads auto_pad means at 8x8 written out."""
    rng = np.random.default_rng(seed)
    windows = {"conv": ("SAME_UPPER", [0, 0, 1, 1]), "maxpool": ("SAME_LOWER", [1, 1, 0, 0]),
               "avgpool": ("SAME_UPPER", [0, 0, 1, 1])}
    pad = {name: {"pads": pads} if explicit else {"auto_pad": auto}
           for name, (auto, pads) in windows.items()}
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv", kernel_shape=[3, 3],
                         strides=[2, 2], **pad["conv"]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("MaxPool", ["r1"], ["m"], name="maxpool", kernel_shape=[2, 2],
                         **pad["maxpool"]),
        helper.make_node("AveragePool", ["m"], ["a"], name="avgpool", kernel_shape=[3, 3],
                         strides=[2, 2], **pad["avgpool"]),
        helper.make_node("Flatten", ["a"], ["f"], name="flatten"),
    ]
    return classifier(nodes, {"w1": _weights(rng, 4, 3, 3, 3), "b1": _weights(rng, 4),
                              "__features__": 4 * 2 * 2}, "f", seed=seed)


def as_float64(model):
    """A float64 copy of a float32 model, for a reference evaluation in double precision."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor)
                                                    .astype(np.float64), tensor.name))
    for value in (*graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return copy


def random_photo(path, seed=0, size=(20, 30)):
    """Save a random RGB photo of `size` (height, width) at `path`; returns the path."""
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8)).save(path)
    return path


def save(model, path):
    onnx.save(model, path)
    return path


class LRN(OpRun):
    """ONNX LRN written out from the operator spec (onnx 1.23's reference LRN disagrees with
    onnxruntime and PyTorch, which agree with each other and with the spec)."""

    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        before, after = (size - 1) // 2, size // 2
        padded = np.pad(x * x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
        window = sum(padded[:, i:i + x.shape[1]] for i in range(size))
        return (x / (bias + alpha / size * window) ** beta,)


class AveragePool(OpRun):
    """ONNX AveragePool (2-D, explicit pads, ceil_mode both ways) vectorised: onnx's reference
    loops over every output cell in Python (4 s for one batch of central differences, 0.01
    here). A window's divisor counts its cells inside the image, or inside the padded image
    with count_include_pad (never the cells ceil_mode adds past the padding)."""

    op_domain = ""

    def _run(self, x, kernel_shape=None, strides=None, pads=None, count_include_pad=0,
             ceil_mode=0, auto_pad=None, dilations=None):
        if auto_pad not in (None, "NOTSET", b"NOTSET") or len(kernel_shape) != 2:
            raise NotImplementedError("the tests' AveragePool: 2-D, explicit pads")
        strides, pads = strides or [1, 1], pads or [0, 0, 0, 0]
        rounding = np.ceil if ceil_mode else np.floor
        padded = [x.shape[2 + i] + pads[i] + pads[i + 2] for i in range(2)]
        out = [int(rounding((padded[i] - kernel_shape[i]) / strides[i])) + 1 for i in range(2)]
        extra = [max(0, (out[i] - 1) * strides[i] + kernel_shape[i] - padded[i]) for i in range(2)]
        width = [(pads[i], pads[i + 2] + extra[i]) for i in range(2)]
        counted = np.pad(np.ones(x.shape[2:]), [(pads[i], pads[i + 2]) for i in range(2)],
                         constant_values=1.0 if count_include_pad else 0.0)
        counted = np.pad(counted, [(0, e) for e in extra])

        def window_sums(a):
            windows = np.lib.stride_tricks.sliding_window_view(a, kernel_shape, axis=(-2, -1))
            return windows[..., ::strides[0], ::strides[1], :, :].sum(axis=(-2, -1))
        total = window_sums(np.pad(x, [(0, 0), (0, 0), *width]))
        return ((total / window_sums(counted)).astype(x.dtype),)


def reference_evaluator(model):
    """An onnx reference evaluator of the float64 copy of `model`, with a spec-true LRN and a
    vectorised AveragePool."""
    return ReferenceEvaluator(as_float64(model), new_ops=[LRN, AveragePool])
