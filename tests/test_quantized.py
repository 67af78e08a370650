"""int8 models from onnxruntime's static quantizer (onnxattr.graph.quantization): the forward is
the quantized model's own, the backward passes through QuantizeLinear/DequantizeLinear with the
clipped straight-through estimator, a QuantizeLinear that replaced a ReLU is a rectifier for
the ReLU rules, the training builder refuses Q/DQ in one line, QOperator models are refused in
one line."""

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from onnxattr import Explainer, OnnxAttrError
from onnxattr.errors import OnnxAttrNote
from onnxattr.graph import relu_rules
from onnxattr.graph.autodiff import build_native_gradient
from onnxattr.graph.toolkit import GraphEditor
from onnxattr.graph.training import has_training_builder, score_path

import small_models
from tolerance import rel_l2

SIZE = (16, 16)


class Images(CalibrationDataReader):
    """A few seeded random images, pixels 0..255, for the quantizer's calibration."""

    def __init__(self, count=4):
        rng = np.random.default_rng(7)
        self.batches = iter([{"image": rng.uniform(0, 255, (1, 3, *SIZE)).astype(np.float32)}
                             for _ in range(count)])

    def get_next(self):
        return next(self.batches, None)


def quantized(model, tmp_path, quant_format=QuantFormat.QDQ, name="int8.onnx"):
    """`model` (float, saved beside) quantized by onnxruntime's quantize_static; its path."""
    source = small_models.save(model, tmp_path / "float.onnx")
    quantize_static(source, tmp_path / name, Images(), quant_format=quant_format)
    return tmp_path / name


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def maps(tmp_path, method, builder="native"):
    """(the float model's attribution, the int8 QDQ model's) of one method on one image."""
    model = small_models.conv_relu_global_pool(size=SIZE)
    paths = [small_models.save(model, tmp_path / "float.onnx"), quantized(model, tmp_path)]
    image = np.random.default_rng(1).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    return [Explainer(path, builder=builder, cache_dir=tmp_path / "cache").explain(
        image, method, target=2, score="logit").attribution for path in paths]


# --- the clipped straight-through rule ----------------------------------------------------------

PAIRS = {  # (Q/DQ integer type, scale, zero point, axis): per tensor and per channel
    "uint8": (TensorProto.UINT8, np.float32(0.05), np.uint8(40), None),
    "int8 per channel": (TensorProto.INT8, np.array([0.03, 0.05, 0.02], np.float32),
                         np.array([-20, 5, 0], np.int8), 1),
}


def qdq_graph(kind, weight, factor):
    """x [2, 3, 4, 4] -> Mul(weight) -> QuantizeLinear -> DequantizeLinear -> Mul(factor) ->
    ReduceSum -> score."""
    elem_type, scale, zero_point, axis = PAIRS[kind]
    axis_attr = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("Mul", ["x", "w"], ["a"], name="scale_in"),
             helper.make_node("QuantizeLinear", ["a", "s", "zp"], ["q"], name="quantize",
                              **axis_attr),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], name="dequantize",
                              **axis_attr),
             helper.make_node("Mul", ["d", "c"], ["m"], name="scale_out"),
             helper.make_node("ReduceSum", ["m"], ["score"], name="total", keepdims=0)]
    initializers = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(factor, "c"),
                    numpy_helper.from_array(scale, "s"),
                    helper.make_tensor("zp", elem_type, zero_point.shape,
                                       np.ravel(zero_point).tolist())]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", PAIRS)
def test_clipped_straight_through_rule_is_the_gradient_of_clip(kind):
    """Q -> DQ differentiates as clip(a, lo, hi), lo = (qmin - zp) s, hi = (qmax - zp) s: the
    native gradient against float64 central differences of that float function, with some
    cells of `a` below lo, some above hi, none within 1e-3 of either."""
    elem_type, scale, zero_point, axis = PAIRS[kind]
    info = np.iinfo(helper.tensor_dtype_to_np_dtype(elem_type))
    shape = (1, 3, 1, 1) if axis else ()
    lo = ((info.min - zero_point.astype(np.float64)) * scale).reshape(shape)
    hi = ((info.max - zero_point.astype(np.float64)) * scale).reshape(shape)
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.5, 2, (1, 3, 4, 4)).astype(np.float32)
    factor = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    x = (rng.uniform(1.3 * lo, 1.3 * hi, (2, 3, 4, 4)) / weight).astype(np.float32)
    a = x.astype(np.float64) * weight
    assert np.all(np.minimum(np.abs(a - lo), np.abs(a - hi)) > 1e-3)
    assert (a < lo).any() and (a > hi).any() and ((a > lo) & (a < hi)).mean() > 0.5

    def float_model(x):
        return (np.clip(x * weight, lo, hi) * factor).sum()
    eps = 1e-6
    steps = np.eye(x.size).reshape(x.size, *x.shape) * eps
    x64 = x.astype(np.float64)
    reference = np.array([(float_model(x64 + step) - float_model(x64 - step)) / (2 * eps)
                          for step in steps]).reshape(x.shape)
    graph = build_native_gradient(qdq_graph(kind, weight, factor), "x")
    gradient = onnxruntime.InferenceSession(graph.SerializeToString()).run(
        ["x_grad"], {"x": x})[0]
    assert rel_l2(gradient, reference) < 1e-6


# --- a quantized CNN ------------------------------------------------------------------------------


def test_the_forward_is_the_int8_models_own(tmp_path):
    """The prepared graph's probabilities are the int8 model's (its output, DequantizeLinear of
    a quantized Softmax, is read as probabilities), to one step of their quantization."""
    path = quantized(small_models.conv_relu_global_pool(size=SIZE), tmp_path)
    pixels = np.random.default_rng(2).uniform(0, 255, (3, 3, *SIZE)).astype(np.float32)
    own = onnxruntime.InferenceSession(str(path)).run(["prob"], {"image": pixels})[0]
    explainer = Explainer(path, builder="native", cache_dir=tmp_path / "c")
    assert explainer.engine.classifier.prob_output == "prob"
    np.testing.assert_allclose(explainer.engine.forward(pixels)[0], own, rtol=0, atol=1 / 255)


def test_int8_gradient_follows_the_float_models(tmp_path):
    """The Done-when of issue 22 on a small CNN: finite, non-zero, |gradient| correlated >= 0.5
    with the float model's."""
    float_map, int8_map = maps(tmp_path, "gradient")
    assert np.isfinite(int8_map).all() and np.abs(int8_map).max() > 0
    assert correlation(np.abs(float_map), np.abs(int8_map)) >= 0.5


def test_a_quantize_that_replaced_a_relu_is_a_rectifier(tmp_path):
    """The quantizer drops each Relu into the QuantizeLinear after it (zero point at the type's
    minimum: the clip at 0 is the ReLU); Q nodes with that range whose input is never negative
    (the image, after GlobalAveragePool or Softmax) are not rectifiers."""
    model = onnx.load(quantized(small_models.conv_relu_global_pool(size=SIZE), tmp_path))
    assert "Relu" not in {node.op_type for node in model.graph.node}
    scored = onnx.shape_inference.infer_shapes(model)
    path = score_path(scored, "image", "prob")
    gated = relu_rules.check_rule_applies("guided", GraphEditor(scored), path, "image", "prob")
    assert [node.name for node in gated] == ["r1_QuantizeLinear", "r2_QuantizeLinear"]


def test_guided_backprop_applies_at_the_quantize_nodes(tmp_path):
    float_map, int8_map = maps(tmp_path, "guided-backprop")
    assert np.abs(int8_map).max() > 0
    assert correlation(float_map, int8_map) >= 0.5


def test_auto_falls_back_to_native_and_the_training_builder_refuses_in_one_line(tmp_path):
    path = quantized(small_models.conv_relu_global_pool(size=SIZE), tmp_path)
    pixels = np.random.default_rng(2).uniform(0, 255, (1, 3, *SIZE)).astype(np.float32)
    with pytest.raises(OnnxAttrError, match="onnxruntime-training cannot differentiate "
                       "QuantizeLinear .*use --builder native") as error:
        Explainer(path, builder="onnxruntime", cache_dir=tmp_path / "c").engine.gradient(
            pixels, [0])
    assert "\n" not in str(error.value)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        auto = Explainer(path, builder="auto", cache_dir=tmp_path / "c").engine.gradient(
            pixels, [0])[0]
    native = Explainer(path, builder="native", cache_dir=tmp_path / "c").engine.gradient(
        pixels, [0])[0]
    np.testing.assert_array_equal(auto, native)
    if has_training_builder():  # auto tried it first and says why it did not use it
        assert any(issubclass(n.category, OnnxAttrNote) and "QuantizeLinear" in str(n.message)
                   for n in notes)


def test_qoperator_models_are_refused_in_one_line(tmp_path):
    """At load, and by the native builder given such a graph."""
    path = quantized(small_models.conv_relu_global_pool(size=SIZE), tmp_path,
                     QuantFormat.QOperator, "qoperator.onnx")
    with pytest.raises(OnnxAttrError, match="QLinearConv node .*QDQ format") as error:
        Explainer(path, cache_dir=tmp_path / "c")
    assert "\n" not in str(error.value)
    with pytest.raises(OnnxAttrError, match="'prob' depends on 'image' through QLinearConv node "
                       ".*QDQ format") as error:
        build_native_gradient(onnx.load(path), "image", output="prob")
    assert "\n" not in str(error.value)


# --- the zoo's ResNet-18 (the Done-when's model) ------------------------------------------------


class Pixels(CalibrationDataReader):
    def __init__(self, pixels):
        self.batches = iter([{"image": row[None]} for row in pixels])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """The zoo's tiny ResNet-18 (torchscript export) and its folder."""
    pytest.importorskip("torchvision")
    import zoo_models as zoo

    module = zoo.build("resnet18", "tiny", seed=0)
    folder = tmp_path_factory.mktemp("resnet18_int8")
    zoo.export(module, folder / "float.onnx")
    return module, folder


@pytest.mark.slow
@pytest.mark.parametrize("activations", ["QInt8", "QUInt8"])
def test_int8_resnet18_gradient_follows_the_float_models(resnet18, activations):
    """Issue 22's Done-when: ResNet-18 as int8 QDQ from onnxruntime's quantizer (per-channel
    weights, 8 calibration images; int8 activations put the ReLU's Q at zero point -128, uint8
    at 0): the plain gradient of the probability finite and non-zero, |gradient| correlated
    >= 0.5 with the float32 model's on each image; guided backprop, applied at the Q nodes
    that replaced the ReLUs, correlated >= 0.5 with the float model's."""
    import zoo_models as zoo

    module, folder = resnet18
    path = folder / f"{activations}.onnx"
    quantize_static(folder / "float.onnx", path, Pixels(zoo.random_pixels(module, 8, seed=5)),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, activations))
    pixels = zoo.random_pixels(module, count=2, seed=0)
    targets = zoo.reference_forward(module, pixels).argmax(axis=1)
    explainers = [Explainer(p, builder="native", cache_dir=folder / "cache")
                  for p in (folder / "float.onnx", path)]
    for rule, of in (("vanilla", np.abs), ("guided", lambda g: g)):
        want, got = (e.engine.gradient(pixels, targets, rule=rule)[0] for e in explainers)
        assert np.isfinite(got).all() and np.abs(got).max() > 0
        assert min(correlation(of(w), of(g)) for w, g in zip(want, got)) >= 0.5, rule
