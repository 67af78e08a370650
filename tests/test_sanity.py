"""The model-parameter randomization test (onnxattr.app.sanity) on small conv nets, and its metrics."""

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxattr.app import sanity, similarity
from onnxattr.app.cli import main
from onnxattr.graph import randomize
from onnxattr.methods.explainer import Explainer

import small_models

SIZE = 16


def three_conv(seed=0, size=SIZE):
    """Conv-Relu-Conv-Relu-MaxPool-Conv-Relu-Flatten-Gemm-Softmax on [N, 3, 16, 16], He weights."""
    rng = np.random.default_rng(seed)

    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)

    inits = {"c1/w": he(8, 3, 3, 3), "c1/b": np.full(8, 0.1, np.float32),
             "c2/w": he(8, 8, 3, 3), "c2/b": np.zeros(8, np.float32),
             "c3/w": he(8, 8, 3, 3), "c3/b": np.zeros(8, np.float32),
             "fc/w": he(5, 8 * (size // 2) ** 2), "fc/b": np.zeros(5, np.float32)}
    node = helper.make_node
    nodes = [node("Conv", ["image", "c1/w", "c1/b"], ["a1"], name="c1/conv", pads=[1] * 4),
             node("Relu", ["a1"], ["r1"], name="c1/relu"),
             node("Conv", ["r1", "c2/w", "c2/b"], ["a2"], name="c2/conv", pads=[1] * 4),
             node("Relu", ["a2"], ["r2"], name="c2/relu"),
             node("MaxPool", ["r2"], ["p2"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p2", "c3/w", "c3/b"], ["a3"], name="c3/conv", pads=[1] * 4),
             node("Relu", ["a3"], ["r3"], name="c3/relu"),
             node("Flatten", ["r3"], ["f"], name="flatten"),
             node("Gemm", ["f", "fc/w", "fc/b"], ["logits"], name="fc", transB=1),
             node("Softmax", ["logits"], ["prob"], name="softmax", axis=1)]
    graph = helper.make_graph(
        nodes, "three_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def setup(tmp_path):
    """A saved three-conv model, an explainer with a private cache, and a noise photo."""
    path = small_models.save(three_conv(), tmp_path / "three.onnx")
    explainer = Explainer(path, cache_dir=tmp_path / "cache")
    photo = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    return tmp_path, path, explainer, photo


# --- layers --------------------------------------------------------------------------------------


def test_layers_go_from_the_output_back_to_the_input():
    layers = randomize.parameter_layers(three_conv())
    assert [layer.name for layer in layers] == ["fc", "c3", "c2", "c1"]
    assert layers[0].weights == ["fc/w"] and layers[0].biases == ["fc/b"]
    assert layers[-1].fan_in == {"c1/w": 27}


def test_layer_order_follows_the_graph_not_the_file_order():
    model = three_conv()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # not topologically sorted any more
    assert [layer.name for layer in randomize.parameter_layers(model, "logits")] == [
        "fc", "c3", "c2", "c1"]


def test_grouping_by_prefix_and_per_node():
    model = small_models.concat_batchnorm()  # conv_a, conv_b, bn_b, bn_input, head
    by_node = randomize.parameter_layers(model, grouping="node")
    assert by_node[0].name == "head"
    assert {layer.name for layer in by_node} == {"head", "conv_a", "conv_b", "bn_b", "bn_input"}
    assert next(layer for layer in by_node if layer.name == "bn_b").affine == ["g", "beta"]
    # the three-conv nodes are "c1/conv" etc.: grouped by prefix they are c1, c2, c3
    assert [layer.nodes for layer in randomize.parameter_layers(three_conv())][1:] == [
        ["c3/conv"], ["c2/conv"], ["c1/conv"]]


# --- metrics -------------------------------------------------------------------------------------


def test_ssim_of_an_image_with_itself_is_one_and_of_unrelated_noise_near_zero():
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 64)), rng.random((64, 64))
    assert similarity.ssim(x, x) == pytest.approx(1.0)
    assert abs(similarity.ssim(x, y)) < 0.05
    assert similarity.ssim(x, np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1)) > 0.8


def test_hog_puts_a_vertical_edge_in_the_horizontal_gradient_bin():
    image = np.zeros((32, 32))
    image[:, 16:] = 1.0  # a vertical edge: the gradient points along x (0 degrees)
    cells = similarity.hog_cells(image)
    assert cells.shape == (4, 4, 9)
    energy = cells.sum(axis=(0, 1))
    assert energy[0] > 0 and np.all(energy[1:] == 0)
    horizontal = similarity.hog_cells(image.T).sum(axis=(0, 1))  # 90 degrees: bins 4 and 5
    assert horizontal[4] == pytest.approx(horizontal[5]) and horizontal[4] > 0
    assert horizontal.sum() == pytest.approx(horizontal[4] + horizontal[5])
    features = similarity.hog(image)
    assert features.shape == (3 * 3 * 2 * 2 * 9,)
    assert similarity.pearson(features, similarity.hog(image)) == pytest.approx(1.0)


def test_spearman_handles_ties_and_monotone_maps():
    a = np.array([1.0, 2.0, 2.0, 3.0])
    assert similarity.spearman(a, a ** 3) == pytest.approx(1.0)
    assert similarity.spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(similarity.spearman(a, np.zeros(4)))
    assert similarity._ranks(a).tolist() == [1.0, 2.5, 2.5, 4.0]


# --- randomization -------------------------------------------------------------------------------


def test_randomizing_nothing_gives_similarity_one(setup):
    _, _, explainer, photo = setup
    engine = randomize.randomized_engine(explainer.engine, randomize.randomize_proto(
        explainer.classifier.proto, [], seed=0), "nothing")
    pixels = explainer.pixels([photo])
    original, _, _ = explainer.engine.gradient(pixels, [2], score="logit")
    same, _, _ = engine.gradient(pixels, [2], score="logit")
    for value in similarity.similarity(original[0], same[0]).values():
        assert value == pytest.approx(1.0, abs=1e-6)


def test_randomization_is_seeded_and_keeps_the_weight_scale():
    model = three_conv()
    layers = randomize.parameter_layers(model)
    a = randomize.randomize_proto(model, layers, seed=3)
    b = randomize.randomize_proto(model, layers, seed=3)
    c = randomize.randomize_proto(model, layers, seed=4)
    trained, first, again, other = ({t.name: numpy_helper.to_array(t)
                                      for t in m.graph.initializer} for m in (model, a, b, c))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["c2/w"], other["c2/w"])
    assert first["c2/w"].std() == pytest.approx(trained["c2/w"].std() * 0.88, rel=0.15)
    assert np.abs(first["c2/w"]).max() <= 2 * trained["c2/w"].std() + 1e-6
    assert not first["c1/b"].any()
    he = randomize.randomize_proto(model, layers[-1:], seed=0, distribution="he", indices=[3])
    drawn = numpy_helper.to_array(next(t for t in he.graph.initializer if t.name == "c1/w"))
    assert drawn.std() == pytest.approx(np.sqrt(2 / 27) * 0.88, rel=0.2)


@pytest.mark.parametrize("make, methods", [(three_conv, ["gradient", "guided-backprop"]),
                                           (small_models.concat_batchnorm, ["gradient"])])
def test_swapping_initializers_equals_rebuilding_the_gradient_graph(tmp_path, make, methods):
    model = make()
    path = small_models.save(model, tmp_path / "m.onnx")
    explainer = Explainer(path, cache_dir=tmp_path / "cache")
    size = explainer.input_size
    pixels = explainer.pixels([np.random.default_rng(2).integers(0, 256, (*size, 3), np.uint8)])
    layers = randomize.parameter_layers(model, grouping="node")
    randomized = randomize.randomize_proto(model, layers, seed=7)
    swapped = randomize.randomized_engine(explainer.engine, randomized, "t", swap=True)
    rebuilt = randomize.randomized_engine(explainer.engine, randomized, "t", swap=False)
    original, _, _ = explainer.engine.gradient(pixels, [1], score="logit")
    for method in methods:
        rule = {"gradient": "vanilla", "guided-backprop": "guided"}[method]
        a, _, _ = swapped.gradient(pixels, [1], rule, "logit")
        b, _, _ = rebuilt.gradient(pixels, [1], rule, "logit")
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
        assert not np.allclose(a, original, rtol=1e-2)  # the swap did change the weights


def test_full_randomization_decorrelates_the_gradient_and_leaves_the_cache_alone(setup):
    tmp_path, _, explainer, photo = setup
    result = sanity.run_sanity(explainer, photo, ["gradient"], mode="cascading", seeds=3)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 1  # the original model's vanilla gradient graph only
    metrics = result.metrics["cascading"]["gradient"]
    assert metrics["spearman_abs"].shape == (3, 4)
    everything = {k: v[:, -1] for k, v in metrics.items()}
    assert abs(everything["spearman_abs"].mean()) < 0.3
    assert abs(everything["spearman_signed"].mean()) < 0.3
    assert abs(everything["ssim"].mean()) < 0.3
    assert result.steps("cascading") == ["fc", "c3", "c2", "c1"]


# --- command line --------------------------------------------------------------------------------


def test_cli_writes_the_figures_and_the_json(setup, monkeypatch, capsys):
    from PIL import Image

    tmp_path, path, _, photo = setup
    monkeypatch.setenv("ONNXATTR_CACHE", str(tmp_path / "cli-cache"))
    Image.fromarray(photo).save(tmp_path / "photo.png")
    monkeypatch.setattr(sys, "argv", ["onnxattr", "sanity", str(tmp_path / "photo.png"),
                                      "--model", str(path), "--methods",
                                      "gradient,guided-backprop", "--mode", "cascading",
                                      "--seeds", "2", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "photo_sanity.json", "photo_sanity_cascading.png", "photo_sanity_curve.png"]
    numbers = json.loads((tmp_path / "out" / "photo_sanity.json").read_text())
    cascading = numbers["results"]["cascading"]
    assert cascading["steps"] == ["fc", "c3", "c2", "c1"]
    assert cascading["randomized"][-1] == ["fc", "c3", "c2", "c1"]
    assert len(cascading["methods"]["guided-backprop"]["ssim"]["per_seed"]) == 2
    assert set(cascading["methods"]["gradient"]) == set(sanity.METRICS)
    assert "c1" in out
    assert len(list((tmp_path / "cli-cache").iterdir())) == 2  # original graphs only


def test_prefix_grouping_of_torch_export_names():
    """torch's exporter names nodes "/net/<module path>/<op>": the shared "/net" is dropped and
    the grouping descends until it finds enough steps (one group per model used to be "net")."""
    model = three_conv()
    names = {"c1/conv": "/net/features/features.0/Conv", "c2/conv": "/net/features/features.2/Conv",
             "c3/conv": "/net/features/features.5/Conv", "fc": "/net/classifier/classifier.1/Gemm"}
    for node in model.graph.node:
        node.name = names.get(node.name, node.name)
    layers = randomize.parameter_layers(model, "logits")
    assert [layer.name for layer in layers] == ["classifier/classifier.1", "features/features.5",
                                                "features/features.2", "features/features.0"]
