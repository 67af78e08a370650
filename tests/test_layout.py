"""Models as other frameworks export them: channels-last inputs (tf2onnx, jax2onnx), BGR
pixel contracts (Caffe, Keras "caffe" preprocessing), several outputs, labels from a file, and
Grad-CAM's default layer on them."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_cli import assert_one_line_error, run_cli
from test_gradient import central_differences

from onnxattr import Explainer, OnnxAttrError
from onnxattr.io.model import CONTRACT_KEY, describe_model, load_model

import small_models
from tolerance import rel_l2

PHOTO = np.random.default_rng(5).integers(0, 256, (8, 6, 3), np.uint8)  # RGB (H, W, 3)


def with_input(model, shape, contract=None):
    """`model` with its image input declared `shape` (and onnxattr.input `contract`)."""
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("image", TensorProto.FLOAT, shape))
    if contract is not None:
        helper.set_model_props(model, {CONTRACT_KEY: json.dumps(contract)})
    return model


@pytest.mark.parametrize("shape, layout, expected", [
    ([1, 8, 6, 3], None, ("NHWC", 8, 6)),
    (["N", 3, 8, 6], None, ("NCHW", 8, 6)),
    ([1, 3, 8, 3], "nhwc", ("NHWC", 3, 8)),
    ([1, 3, 5, 4], "NCHW", ("NCHW", 5, 4)),
])
def test_layout_from_the_shape_or_as_stated(shape, layout, expected):
    classifier = describe_model(with_input(small_models.conv_relu_maxpool_lrn(), shape),
                                "digest", "m.onnx", layout)
    assert (classifier.layout, classifier.height, classifier.width) == expected
    assert classifier.channels == 3


@pytest.mark.parametrize("shape", [[1, 3, 3, 3], [1, 3, "H", 3], [1, 3, 8, 4]])
def test_ambiguous_layout_is_refused_naming_the_flag(shape):
    model = with_input(small_models.conv_relu_maxpool_lrn(), shape)
    with pytest.raises(OnnxAttrError, match="give --layout nchw or --layout nhwc") as error:
        describe_model(model, "digest", "m.onnx")
    assert "\n" not in str(error.value)
    stated = with_input(model, [1, 3, 8, 3], {"layout": "NHWC"})
    assert describe_model(stated, "digest", "m.onnx").layout == "NHWC"


def test_layout_channel_order_and_output_are_in_the_cache_key(tmp_path):
    path = small_models.save(with_input(small_models.conv_relu_maxpool_lrn(), [1, 3, 8, 3]),
                             tmp_path / "m.onnx")
    nchw, nhwc = load_model(path, "nchw"), load_model(path, "nhwc")
    bgr = nchw.with_contract(channel_order="bgr")
    named = load_model(path, "nchw", output="prob")
    assert len({nchw.digest, nhwc.digest, bgr.digest, named.digest}) == 4


@pytest.fixture
def channels_last(tmp_path):
    return small_models.save(small_models.channels_last_cnn(), tmp_path / "nhwc.onnx")


def test_channels_last_gradient_in_the_models_layout(channels_last, tmp_path, builder):
    """The attribution of a channels-last model is (H, W, C), d prob / d pixel by central
    differences in float64 through the model's own [N, H, W, C] input (contract 0..1)."""
    explainer = Explainer(channels_last, cache_dir=tmp_path / "c", builder=builder,
                          pixel_range="0..1")
    result = explainer.explain(PHOTO, "gradient", target=2)
    assert explainer.classifier.layout == "NHWC" and result.attribution.shape == (8, 6, 3)
    pixels = PHOTO[None].astype(np.float64)
    reference = central_differences(onnx.load(channels_last), pixels / 255, [2], "prob")[0] / 255
    assert rel_l2(result.attribution, reference) < 1e-4
    assert result.map.shape == (8, 6) and result.render().shape == (8, 6, 3)


def test_channels_last_grad_cam_reads_the_conv_output(channels_last, tmp_path):
    """tf2onnx's Transpose(0, 2, 3, 1) before Flatten ([N, 4, 3, 6]) is no layer: the default is
    the last convolution's output; a Keras layer name finds it; the transposed tensor is
    refused."""
    engine = Explainer(channels_last, cache_dir=tmp_path / "c", pixel_range="0..1").engine
    assert engine.resolve_layer() == "model/conv2/Relu:0"
    assert engine.resolve_layer("conv2") == "model/conv2/Relu:0"
    with pytest.raises(OnnxAttrError, match="'nhwc' .* is NHWC, not channels-first"):
        engine.resolve_layer("nhwc")


def padded_before_a_strided_conv():
    """The end of a small Keras MobileNetV2 (32x32 input): image [N, 3, 8, 8] -> Conv (stride 2)
    -> Relu -> Conv (stride 2) -> Relu `r2` [N, 4, 2, 2] -> Pad (ZeroPadding2D, bottom and right)
    [N, 4, 3, 3] -> Conv (stride 2, no padding) -> Relu [N, 6, 1, 1] -> GlobalAveragePool ->
    Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Pad", ["r2", "pads"], ["padded"], name="block_13_pad"),
        helper.make_node("Conv", ["padded", "w3"], ["c3"], name="conv3", strides=[2, 2]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
    ]
    weights = {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3), "w3": (6, 4, 3, 3)}
    return small_models.classifier(nodes, {
        **{k: rng.standard_normal(s).astype(np.float32) for k, s in weights.items()},
        "pads": np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "__features__": 6}, "f")


def test_a_pad_before_a_strided_conv_is_not_the_last_feature_map(tmp_path):
    """The last maps are 1x1 (no map for Grad-CAM), and the padded [N, 4, 3, 3] is its input
    plus a border, not the image's grid: the default is the map the Pad reads."""
    engine = Explainer(small_models.save(padded_before_a_strided_conv(), tmp_path / "m.onnx"),
                       cache_dir=tmp_path / "c").engine
    assert engine.resolve_layer() == "r2"


def token_model():
    """A model of token sequences: image [N, 3, 8, 8] -> 64 tokens of 3 -> MatMul to 8 features
    -> Reshape to "heads" [N, 2, 32, 8] -> Relu -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(0)
    ints = {"tokens": np.array([0, 3, 64], np.int64), "heads": np.array([0, 2, 32, 8], np.int64)}
    nodes = [
        helper.make_node("Reshape", ["image", "tokens"], ["t"], name="tokens"),
        helper.make_node("Transpose", ["t"], ["tt"], name="tokens_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["tt", "embed"], ["e"], name="embed"),
        helper.make_node("Reshape", ["e", "heads"], ["h"], name="heads"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
    ]
    return small_models.classifier(nodes, {**ints, "embed": rng.standard_normal((3, 8)).astype(
        np.float32), "__features__": 2 * 32 * 8}, "f")


def test_no_feature_map_on_the_image_grid_is_one_line(tmp_path):
    engine = Explainer(small_models.save(token_model(), tmp_path / "m.onnx"),
                       cache_dir=tmp_path / "c").engine
    with pytest.raises(OnnxAttrError, match="no channels-first feature map .* name a layer"):
        engine.resolve_layer()


def test_bgr_contract_equals_a_manual_bgr_pipeline(tmp_path, builder):
    """Keras "caffe" preprocessing: RGB -> BGR, then mean subtraction (here also / std, in
    0..1): forward and gradient equal the model run on the manually preprocessed input."""
    model = small_models.conv_relu_global_pool(size=(8, 6))
    mean, std = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.6, 0.7])
    explainer = Explainer(small_models.save(model, tmp_path / "m.onnx"), cache_dir=tmp_path / "c",
                          builder=builder, channel_order="bgr", pixel_range="0..1",
                          mean=tuple(mean), std=tuple(std))
    pixels = explainer.pixels([PHOTO])
    gradient, prob, _ = explainer.engine.gradient(pixels, [3])
    shape = (1, 3, 1, 1)
    manual = (pixels[:, ::-1].astype(np.float64) / 255 - mean.reshape(shape)) / std.reshape(shape)
    want = small_models.reference_evaluator(model).run(["prob"], {"image": manual})[0]
    assert rel_l2(prob, want) < 1e-6
    reference = central_differences(model, manual, [3], "prob") / std.reshape(shape) / 255
    assert rel_l2(gradient, reference[:, ::-1]) < 1e-4


def two_outputs():
    """conv_relu_global_pool's classifier with a second output `aux` [N, 3] before it."""
    model = small_models.conv_relu_global_pool(size=(8, 6))
    graph = model.graph
    rng = np.random.default_rng(1)
    graph.initializer.extend([onnx.numpy_helper.from_array(rng.standard_normal((3, 6)).astype(
        np.float32), "aux_w")])
    graph.node.append(helper.make_node("Gemm", ["f", "aux_w"], ["aux"], name="aux", transB=1))
    graph.output.insert(0, helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 3]))
    return model


def test_output_and_labels_through_the_cli(tmp_path, monkeypatch, capsys):
    """The softmax output is the default; --output picks the other, --labels names either's
    classes (a line each, or a JSON list), and must count them right."""
    model = small_models.save(two_outputs(), tmp_path / "m.onnx")
    photo = small_models.random_photo(tmp_path / "p.png", size=(8, 6))
    (tmp_path / "aux.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "prob.json").write_text(json.dumps(["a", "b", "c", "d", "e"]))
    common = ["classify", photo, "--model", model, "--top", 5]
    code, out, err = run_cli(monkeypatch, capsys, *common, "--labels", tmp_path / "aux.txt")
    assert_one_line_error(code, err, "labels: 3 names for the model's 5 classes")
    code, out, _ = run_cli(monkeypatch, capsys, *common, "--output", "aux", "--labels",
                           tmp_path / "aux.txt")
    assert code == 0 and {"red", "green", "blue"} <= set(out.split())
    code, out, _ = run_cli(monkeypatch, capsys, *common, "--output", "prob", "--labels",
                           tmp_path / "prob.json")
    assert code == 0 and set("abcde") <= set(out.split())
    code, _, err = run_cli(monkeypatch, capsys, *common, "--output", "f")
    assert_one_line_error(code, err, "has no output 'f' (outputs: aux ['N', 3]")


def test_layout_and_channel_order_flags_through_the_cli(tmp_path, monkeypatch, capsys):
    model = with_input(small_models.channels_last_cnn(size=(3, 3)), ["N", 3, 3, 3])
    path = small_models.save(model, tmp_path / "m.onnx")
    photo = small_models.random_photo(tmp_path / "p.png", size=(3, 3))
    code, _, err = run_cli(monkeypatch, capsys, "classify", photo, "--model", path)
    assert_one_line_error(code, err, "give --layout nchw or --layout nhwc")
    code, out, _ = run_cli(monkeypatch, capsys, "explain", photo, "--model", path, "--layout",
                           "nhwc", "--channel-order", "bgr", "--out", tmp_path / "out",
                           "--save-raw")
    assert code == 0
    assert np.load(tmp_path / "out" / "p_gradient.npy").shape == (3, 3, 3)
