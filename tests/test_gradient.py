"""The plain gradient: central finite differences on small models, float64 PyTorch on GoogLeNet."""

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import GRADIENT_BUILDERS
from onnx import helper

from onnxattr import Explainer, OnnxAttrError
from onnxattr.errors import OnnxAttrNote
from onnxattr.graph import builders
from onnxattr.graph.builders import BUILDERS
from onnxattr.io.image import load_pixels

import small_models
from tolerance import float32_bound
from tolerance import rel_l2 as relative_l2

SMALL_MODELS = {
    "conv-relu-maxpool(ceil)-lrn-gemm-softmax": small_models.conv_relu_maxpool_lrn,
    "concat-batchnorm-dropout-avgpool-gemm-softmax": small_models.concat_batchnorm,
    "concat-batchnorm, logits only": lambda: small_models.concat_batchnorm(softmax=False),
}


def central_differences(model, pixels, targets, score, eps=1e-4):
    """d score / d pixels by central differences on a float64 copy of `model`: every pixel of
    every image moved up and down by `eps`, all of them in one batch of the reference
    evaluator (the rows of a classifier are independent)."""
    evaluator = small_models.reference_evaluator(model)
    has_prob = any(o.name == "prob" for o in model.graph.output)
    x = pixels.astype(np.float64)
    size = x[0].size
    steps = np.eye(size).reshape(size, *x.shape[1:]) * eps
    moved = np.concatenate([np.concatenate([image + steps, image - steps]) for image in x])
    if score == "prob" and has_prob:
        values = evaluator.run(["prob"], {"image": moved})[0]
    else:
        values = evaluator.run(["logits"], {"image": moved})[0]
        if score == "prob":  # the engine appends a softmax to a logits-only model
            values = np.exp(values) / np.exp(values).sum(axis=1, keepdims=True)
    chosen = values.reshape(len(x), 2, size, -1)[np.arange(len(x)), :, :, targets]
    return ((chosen[:, 0] - chosen[:, 1]) / (2 * eps)).reshape(x.shape)


@pytest.fixture
def small_explainer(tmp_path, builder):
    def make(model):
        return Explainer(small_models.save(model, tmp_path / "small.onnx"),
                         cache_dir=tmp_path / "cache", builder=builder)
    return make


@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize("score", ["prob", "logit"])
def test_gradient_matches_central_differences(name, score, small_explainer):
    model = SMALL_MODELS[name]()
    explainer = small_explainer(model)
    pixels = np.random.default_rng(3).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    targets = np.array([1, 4])
    engine_gradient, _, _ = explainer.engine.gradient(pixels, targets, score=score)
    reference = central_differences(model, pixels, targets, score)
    assert relative_l2(engine_gradient, reference) < 1e-4


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_prepared_forward_graph_keeps_the_outputs(name, small_explainer):
    model = SMALL_MODELS[name]()
    explainer = small_explainer(model)
    pixels = np.random.default_rng(4).uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32)
    original = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"image": pixels})
    prob, logits = explainer.engine.forward(pixels)
    np.testing.assert_allclose(prob if model.graph.output[0].name == "prob" else logits,
                               original[0], rtol=1e-5, atol=1e-6)
    fixed_ops = {n.op_type for n in explainer.engine.forward_graph("onnxruntime").graph.node}
    assert not fixed_ops & {"LRN", "BatchNormalization", "Dropout", "AveragePool"}
    onnxruntime_fixed = explainer.engine.forward_graph("onnxruntime")
    fixed = onnxruntime.InferenceSession(onnxruntime_fixed.SerializeToString()).run(
        ["prob", "logits"], {"image": pixels})
    np.testing.assert_allclose(fixed[0], prob, rtol=1e-5, atol=1e-6)


def test_auto_pad_is_its_explicit_pads(tmp_path, builder):
    """Windows with auto_pad SAME (jax2onnx's) have the forward and gradient of the explicit
    pads they mean, on both builders (the onnxruntime builder's AveragePool needs pads)."""
    pixels = np.random.default_rng(5).uniform(0, 255, (2, 3, 8, 8)).astype(np.float32)
    results = []
    for explicit in (False, True):
        model = small_models.auto_padded(explicit=explicit)
        path = small_models.save(model, tmp_path / f"explicit_{explicit}.onnx")
        engine = Explainer(path, cache_dir=tmp_path / "cache", builder=builder).engine
        results.append(engine.gradient(pixels, [1, 4]))
        original = onnxruntime.InferenceSession(model.SerializeToString()).run(
            ["prob"], {"image": pixels})[0]
        np.testing.assert_allclose(results[-1][1], original, rtol=1e-5, atol=1e-6)
    for auto, explicit in zip(*results):  # gradient, prob, logits
        np.testing.assert_array_equal(auto, explicit)


@pytest.mark.parametrize("size", [3, 5])
def test_prepared_lrn_sums_its_window_with_a_channel_mixing_conv(size, small_explainer):
    """The LRN the training builder sees sums x^2 over its window of channels with one 1x1 Conv
    of C channels (a band of ones), not a Conv of one channel over x^2 reshaped to [N, 1, C,
    H*W]: onnxruntime's NCHWc layout pads that one channel to its block (16 on AVX-512) and
    reorders 16 times the tensor; its forward equals onnxruntime's LRN."""
    model = small_models.conv_relu_maxpool_lrn()
    lrn = next(n for n in model.graph.node if n.op_type == "LRN")
    next(a for a in lrn.attribute if a.name == "size").i = size
    explainer = small_explainer(model)
    pixels = np.random.default_rng(6).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    original = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"image": pixels})
    fixed = explainer.engine.forward_graph("onnxruntime")
    window = [n for n in fixed.graph.node if n.name.startswith("lrn1") and n.op_type == "Conv"]
    weights = {i.name: i for i in fixed.graph.initializer}
    assert [list(weights[n.input[1]].dims) for n in window] == [[4, 4, 1, 1]]
    assert not [n for n in fixed.graph.node if n.op_type == "Reshape"]
    np.testing.assert_allclose(explainer.engine.forward(pixels)[0], original[0], rtol=1e-5,
                               atol=1e-6)


def test_gradient_graph_is_cached_on_disk(tmp_path, monkeypatch, builder):
    path = small_models.save(small_models.conv_relu_maxpool_lrn(), tmp_path / "m.onnx")
    pixels = np.ones((1, 3, 8, 8), np.float32)

    def explainer(cache):
        return Explainer(path, cache_dir=tmp_path / cache, builder=builder)
    first = explainer("cache").engine.gradient(pixels, [0])[0]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached gradient graph")
    monkeypatch.setitem(BUILDERS, builder, no_rebuild)
    second = explainer("cache").engine.gradient(pixels, [0])[0]
    np.testing.assert_array_equal(first, second)
    with pytest.raises(AssertionError, match="rebuilt"):
        explainer("other").engine.gradient(pixels, [0])


def test_undifferentiable_op_is_named(tmp_path, builder):
    model = small_models.concat_batchnorm()
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type, node.name = "Round", "rounding_node"
    explainer = Explainer(small_models.save(model, tmp_path / "m.onnx"), cache_dir=tmp_path,
                          builder=builder)
    with pytest.raises(OnnxAttrError, match="op Round.*node 'rounding_node'") as error:
        explainer.engine.gradient(np.ones((1, 3, 8, 8), np.float32), [0])
    assert "\n" not in str(error.value)


# --- BVLC GoogLeNet against the float64 PyTorch reference --------------------------------------


def torch_gradient(reference, pixels, targets, score="prob"):
    import torch

    x = torch.tensor(pixels, dtype=torch.float64, requires_grad=True)
    out = reference(x, score=score)
    out[torch.arange(len(pixels)), torch.as_tensor(targets)].sum().backward()
    return x.grad.numpy()


def test_googlenet_gradient_matches_torch_per_photo(googlenet, googlenet_float32, photos):
    float32_error, references = googlenet_float32
    targets, expected = references["vanilla"]
    for photo, target, want in zip(photos, targets, expected):
        result = googlenet.explain(photo)
        assert result.class_index == target
        error = relative_l2(result.attribution, want)
        print(f"{photo.name}: gradient relative L2 against float64 torch {error:.2e}")
        assert error <= float32_bound([float32_error]), f"{photo.name}: relative L2 {error:.2e}"


def test_googlenet_batch_rows_are_independent(googlenet, torch_reference, googlenet_float32,
                                              photos):
    targets = [285, 967, 3, 999][:len(photos)]
    batch = googlenet.explain(photos, target=targets, score="logit")
    pixels = np.stack([load_pixels(p, (224, 224)) for p in photos])
    expected = torch_gradient(torch_reference, pixels, targets, score="logit")
    for row, (result, photo, target) in enumerate(zip(batch, photos, targets)):
        assert result.class_index == target
        assert relative_l2(result.attribution, expected[row]) <= float32_bound(
            [googlenet_float32[0]])
        alone = googlenet.explain(photo, target=target, score="logit")
        np.testing.assert_allclose(result.attribution, alone.attribution, rtol=1e-4,
                                   atol=1e-4 * np.abs(alone.attribution).max())


def test_explanation_fields(googlenet, photos):
    result = googlenet.explain(photos[0], target="Egyptian cat")
    assert result.attribution.shape == (3, 224, 224) and result.attribution.dtype == np.float32
    assert result.map.shape == (224, 224) and result.map.min() == 0 and result.map.max() == 1
    assert result.class_index == 285 and result.label == "Egyptian cat"
    assert 0 < result.score < 1
    assert result.title == "Gradient Attribution Map (Egyptian cat)"


def ceil_mode_average_pool():
    """Conv -> AveragePool(ceil_mode): the training builder's forward fixes refuse ceil_mode."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["c"], ["p"], name="ceil_pool", kernel_shape=[3, 3],
                         strides=[2, 2], ceil_mode=1),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
    ]
    return small_models.classifier(nodes, {"w": small_models._weights(rng, 4, 3, 3, 3),
                                           "__features__": 4 * 4 * 4}, "f")


def test_auto_falls_back_to_native_and_says_why_once(tmp_path):
    model = ceil_mode_average_pool()
    path = small_models.save(model, tmp_path / "m.onnx")
    pixels = np.random.default_rng(3).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    explainer = Explainer(path, cache_dir=tmp_path / "cache")
    with pytest.warns(OnnxAttrNote) as notes:
        gradient = explainer.engine.gradient(pixels, [1, 4])[0]
        explainer.engine.gradient(pixels, [1, 4])
    assert len(notes) == 1
    assert "the onnxruntime builder cannot do this" in str(notes[0].message)
    assert "AveragePool node 'ceil_pool'" in str(notes[0].message)
    assert explainer.engine.builders_used == {("vanilla", "prob", None): "native"}
    reference = central_differences(model, pixels, [1, 4], "prob")
    assert relative_l2(gradient, reference) < 1e-4
    with pytest.raises(OnnxAttrError, match="ceil_mode"):
        Explainer(path, cache_dir=tmp_path / "c2", builder="onnxruntime").engine.gradient(
            pixels, [1, 4])


def test_cache_keys_include_the_builder(tmp_path):
    path = small_models.save(small_models.conv_relu_maxpool_lrn(), tmp_path / "m.onnx")
    pixels = np.random.default_rng(3).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    for builder in GRADIENT_BUILDERS:
        Explainer(path, cache_dir=tmp_path / "cache", builder=builder).engine.gradient(pixels, [0])
    graphs = list((tmp_path / "cache").glob("*.graph"))
    assert len(graphs) == 2
    ops = [{n.op_type for n in onnx.load_from_string(g.read_bytes().partition(b"\n")[2]).graph.node}
           for g in graphs]  # (an entry: a line of JSON, then the graph)
    assert any("Where" in o or "Mul" in o for o in ops) and ops[0] != ops[1]


def test_cache_keys_change_with_the_code_that_builds_graphs(tmp_path, monkeypatch):
    """A graph built by other onnxattr code (same version number) is rebuilt, not reused."""
    cache = builders.GraphCache(tmp_path)
    before = cache.path("digest", builder="native")
    assert cache.path("digest", builder="native") == before
    monkeypatch.setattr(builders, "code_digest", lambda: "another build of the same version")
    assert cache.path("digest", builder="native") != before
