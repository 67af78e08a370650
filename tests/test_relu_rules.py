"""Guided backpropagation and Zeiler-Fergus (onnxattr.graph.relu_rules), through both builders: the
rewrite of the training builder's ReluGrad nodes (onnxattr.graph.training) and the native builder,
checked exactly on a one-ReLU graph, against float64 PyTorch with the same
modified ReLU backward on BVLC GoogLeNet and on a small residual network, and its refusals."""

import copy
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper, numpy_helper

from onnxattr import Explainer, OnnxAttrError
from onnxattr.graph.prepare import (
    ONEHOT,
    TRAINING_FIXES,
    add_score_head,
    gradient_output,
    prepare_forward,
)
from onnxattr.graph.runtime import make_session
from onnxattr.graph.training import rewrite_relu_gradients, training_builder_graph
from onnxattr.io.model import describe_model
from onnxattr.io.render import colorize, save_map_figure, save_photo_figure

from small_models import SIZE, _weights, classifier, save
from tolerance import float32_bound, rel_l2

onnxruntime.set_default_logger_severity(3)

torch = pytest.importorskip("torch")
from tiny_resnet import export_tiny_resnet  # noqa: E402 (needs torch)

MAPS_DIR = Path("/tmp/onnxattr_rewrite_maps")
METHOD_RULES = {"gradient": "vanilla", "guided-backprop": "guided",
                "zeiler-fergus": "zeiler-fergus"}
# The reference of each rule: dX from the Relu's input X and the incoming gradient dY (numpy or
# torch arrays alike).
RELU_BACKWARD = {
    "vanilla": lambda x, dy: (x > 0) * dy,
    "guided": lambda x, dy: (x > 0) * (dy > 0) * dy,
    "zeiler-fergus": lambda x, dy: (dy > 0) * dy,
}
TOLERANCE = 1e-3  # relative L2 error against float64 torch (the tiny residual network)


class ReferenceRelu(torch.autograd.Function):
    """relu(x) whose backward is `RELU_BACKWARD[rule]`."""

    @staticmethod
    def forward(ctx, x, rule):
        ctx.save_for_backward(x)
        ctx.rule = rule
        return torch.relu(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return RELU_BACKWARD[ctx.rule](x, dy), None


def torch_attribution(model, pixels, targets, dtype=torch.float64):
    """d prob[n, targets[n]] / d pixels[n], in float64 unless `dtype` says otherwise."""
    x = torch.tensor(pixels, dtype=dtype, requires_grad=True)
    prob = model(x)
    prob[torch.arange(len(targets)), torch.as_tensor(targets)].sum().backward()
    return x.grad.numpy()


def explain(explainer, images, method, targets):
    return np.stack([e.attribution for e in explainer.explain(list(images), method, list(targets))])


# --- 1. one ReLU, exact -------------------------------------------------------------------------

def one_relu_model():
    """image -> Relu -> Flatten -> Gemm -> Softmax: X is the image itself."""
    nodes = [helper.make_node("Relu", ["image"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten")]
    return classifier(nodes, {"__features__": 3 * SIZE * SIZE}, "f", classes=5)


def concat_of_relus(seed=0):
    """Conv -> Relu -> Conv -> Relu, the two Relus concatenated: two chained ReluGrads."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Concat", ["r1", "r2"], ["cat"], name="concat", axis=1),
        helper.make_node("Flatten", ["cat"], ["f"], name="flatten"),
    ]
    return classifier(nodes, {"w1": _weights(rng, 4, 3, 3, 3), "w2": _weights(rng, 4, 4, 3, 3),
                              "__features__": 8 * SIZE * SIZE}, "f", seed=seed)


def scored(model):
    """The scored forward model the engine differentiates."""
    return add_score_head(prepare_forward(describe_model(model, "digest"), TRAINING_FIXES))


def test_one_relu_exact(tmp_path):
    model = one_relu_model()
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    explainer = Explainer(save(model, tmp_path / "one_relu.onnx"), cache_dir=tmp_path / "cache")
    pixels = np.random.default_rng(1).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    targets = np.array([0, 3, 4])
    x = pixels.astype(np.float64)
    logits = x.clip(0).reshape(3, -1) @ weights["head_w"].T + weights["head_b"]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    onehot = np.eye(5)[targets]
    d_logits = (prob * onehot).sum(1, keepdims=True) * (onehot - prob)  # d p_t / d logits
    dy = (d_logits @ weights["head_w"]).reshape(x.shape)
    assert (x > 0).any() and (x < 0).any() and (dy > 0).any() and (dy < 0).any()
    for rule, backward in RELU_BACKWARD.items():
        got, _, _ = explainer.engine.gradient(pixels, targets, rule)
        want = backward(x, dy)
        assert np.array_equal(got == 0, want == 0), rule
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * np.abs(want).max())


def test_vanilla_rule_reproduces_relugrad():
    scored_model = scored(concat_of_relus())
    built = training_builder_graph(scored_model, "image")
    rewritten = rewrite_relu_gradients(built, "vanilla", scored_model)
    assert {n.op_type for n in built.graph.node} >= {"ReluGrad"}
    assert "ReluGrad" not in {n.op_type for n in rewritten.graph.node}
    pixels = np.random.default_rng(2).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    feeds = {"image": pixels, ONEHOT: np.eye(5, dtype=np.float32)[[1, 2]]}
    output = [gradient_output("image")]
    before = make_session(built).run(output, feeds)[0]
    after = make_session(rewritten).run(output, feeds)[0]
    assert np.array_equal(before, after) and np.abs(before).max() > 0


# --- 2. BVLC GoogLeNet against float64 PyTorch ---------------------------------------------------


@contextmanager
def relu_modules_rule(model, rule):
    """Give every nn.ReLU of `model` the backward `rule` while inside the block."""
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    for relu in relus:
        relu.forward = lambda x: ReferenceRelu.apply(x, rule)
    try:
        yield model
    finally:
        for relu in relus:
            del relu.forward


@pytest.mark.parametrize("method", ["guided-backprop", "zeiler-fergus"])
def test_googlenet_matches_torch(googlenet, torch_reference, googlenet_float32, photos, method):
    """Each photo's top-1 class alone, then one batch with the k-th ranked class for photo k,
    against float64 torch at GoogLeNet's float32 error (tests/tolerance.py)."""
    rule = METHOD_RULES[method]
    float32_error, references = googlenet_float32
    top1, singles = references[rule]
    pixels = googlenet.pixels(photos)
    ranked = np.argsort(-googlenet.engine.forward(pixels)[0], axis=1)
    assert ranked[:, 0].tolist() == top1.tolist()
    errors = [rel_l2(explain(googlenet, [photo], method, [target]), want[None])
              for photo, target, want in zip(photos, top1, singles)]
    targets = ranked[np.arange(len(photos)), np.arange(len(photos)) % ranked.shape[1]]
    with relu_modules_rule(torch_reference, rule):
        want = torch_attribution(torch_reference, pixels, targets)
    got = explain(googlenet, photos, method, targets.tolist())
    errors += [rel_l2(g, w) for g, w in zip(got, want)]
    print(f"\nGoogLeNet {method} relative L2 errors (singles, then batch rows):",
          " ".join(f"{e:.2e}" for e in errors), f"bound {float32_bound([float32_error]):.1e}")
    assert max(errors) <= float32_bound([float32_error])


# --- 3. a residual network with functional ReLUs -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    """(Explainer of the exported TinyResNet, its float64 torch twin)."""
    path = tmp_path_factory.mktemp("resnet") / "tiny_resnet.onnx"
    net = export_tiny_resnet(path)
    model = onnx.load(path)
    assert sum(n.op_type == "Relu" for n in model.graph.node) == 5
    assert sum(n.op_type == "Add" for n in model.graph.node) == 2
    explainer = Explainer(path, cache_dir=tmp_path_factory.mktemp("resnet_cache"))
    return explainer, copy.deepcopy(net).double()


def test_tiny_resnet_matches_torch(tiny_resnet):
    explainer, reference = tiny_resnet
    images = list(np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    pixels = explainer.pixels(images)
    prob = explainer.engine.forward(pixels)[0]
    assert 0.2 < prob.max() < 0.99  # neither uniform nor saturated (10 classes)
    targets = [1, 4, 7, int(np.argmax(prob[3]))]
    results = {}
    for method, rule in METHOD_RULES.items():
        reference.relu = lambda x, rule=rule: ReferenceRelu.apply(x, rule)
        results[method] = explain(explainer, images, method, targets)
        want = torch_attribution(reference, pixels, targets)
        errors = [rel_l2(g, w) for g, w in zip(results[method], want)]
        print(f"\nTinyResNet {method} relative L2 errors:", " ".join(f"{e:.2e}" for e in errors))
        assert max(errors) <= TOLERANCE
    for method in ("guided-backprop", "zeiler-fergus"):  # the rules change the result
        assert rel_l2(results[method], results["gradient"]) > 0.1


# --- 4. refusals --------------------------------------------------------------------------------

def small_model_path(tmp_path, activation_nodes, extra=None, name="model"):
    """image -> Conv -> <activation_nodes: c1 -> a> -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1",
                              pads=[1, 1, 1, 1]),
             *activation_nodes, helper.make_node("Flatten", ["a"], ["f"], name="flatten")]
    inits = {"w1": _weights(rng, 4, 3, 3, 3, scale=0.003), "b1": _weights(rng, 4),  # 0..255 input
             "__features__": 4 * SIZE * SIZE, **(extra or {})}
    return save(classifier(nodes, inits, "f"), tmp_path / f"{name}.onnx")


IMAGE = np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
RECTIFIERS = {
    "LeakyRelu": ([helper.make_node("LeakyRelu", ["c1"], ["a"], name="leaky", alpha=0.1)], {}),
    "Clip": ([helper.make_node("Clip", ["c1", "zero", "six"], ["a"], name="relu6")],
             {"zero": np.float32(0), "six": np.float32(6)}),
    "PRelu": ([helper.make_node("PRelu", ["c1", "slope"], ["a"], name="prelu")],
              {"slope": np.full((4, 1, 1), 0.1, np.float32)}),
    "Relu and LeakyRelu": ([helper.make_node("Relu", ["c1"], ["r"], name="relu"),
                            helper.make_node("LeakyRelu", ["r"], ["a"], name="leaky")], {}),
}


@pytest.mark.parametrize("method", ["guided-backprop", "zeiler-fergus"])
def test_model_without_relu_is_refused(tmp_path, method, builder):
    path = small_model_path(tmp_path, [helper.make_node("MaxPool", ["c1"], ["a"], name="pool",
                                                        kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    explainer = Explainer(path, cache_dir=tmp_path / "cache", builder=builder)
    with pytest.raises(OnnxAttrError, match="has no Relu between"):
        explainer.explain(IMAGE, method)
    assert np.abs(explainer.explain(IMAGE, "gradient").attribution).max() > 0


@pytest.mark.parametrize("method", ["guided-backprop", "zeiler-fergus"])
@pytest.mark.parametrize("case", RECTIFIERS)
def test_other_rectifiers_are_refused(tmp_path, case, method):
    nodes, extra = RECTIFIERS[case]
    explainer = Explainer(small_model_path(tmp_path, nodes, extra), cache_dir=tmp_path / "cache",
                          builder="onnxruntime")
    op = case.split()[-1]
    with pytest.raises(OnnxAttrError, match=f"{op}") as error:
        explainer.explain(IMAGE, method)
    assert "\n" not in str(error.value)
    if op != "PRelu":  # the builder cannot differentiate PRelu at all
        assert np.abs(explainer.explain(IMAGE, "gradient").attribution).max() > 0


def node(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], name=output, **attrs)


CONSTANTS = {"one": np.float32(1), "half": np.float32(0.5), "root2": np.float32(np.sqrt(2)),
             "three": np.float32(3), "cubic": np.float32(0.044715),
             "scale": np.float32(np.sqrt(2 / np.pi))}
# c1 -> the activation -> t, each as torch exports it; then Relu(t) -> a
ACTIVATIONS = {
    "Erf GELU": ([node("Div", ["c1", "root2"], "scaled"), node("Erf", ["scaled"], "erf"),
                  node("Add", ["erf", "one"], "erf1"), node("Mul", ["c1", "erf1"], "gelu"),
                  node("Mul", ["gelu", "half"], "t")], "Erf 'erf'"),
    "tanh GELU": ([node("Pow", ["c1", "three"], "cube"), node("Mul", ["cube", "cubic"], "small"),
                   node("Add", ["c1", "small"], "inner"), node("Mul", ["inner", "scale"], "u"),
                   node("Tanh", ["u"], "tanh"), node("Add", ["tanh", "one"], "tanh1"),
                   node("Mul", ["c1", "half"], "halfx"), node("Mul", ["halfx", "tanh1"], "t")],
                  "Tanh 'tanh'"),
    "SiLU": ([node("Sigmoid", ["c1"], "sigmoid"), node("Mul", ["c1", "sigmoid"], "t")],
             "Sigmoid 'sigmoid'"),
    "Mish": ([node("Softplus", ["c1"], "softplus"), node("Tanh", ["softplus"], "tanh"),
              node("Mul", ["c1", "tanh"], "t")], "Softplus 'softplus', Tanh 'tanh'"),
    "HardSigmoid": ([node("HardSigmoid", ["c1"], "t")], "HardSigmoid 't'"),
    "HardSwish": ([node("HardSwish", ["c1"], "t")], "HardSwish 't'"),
    "Sigmoid": ([node("Sigmoid", ["c1"], "t")], "Sigmoid 't'"),
}


@pytest.mark.parametrize("method", ["guided-backprop", "zeiler-fergus"])
@pytest.mark.parametrize("case", ACTIVATIONS)
def test_smooth_activations_with_relus_are_refused_alike(tmp_path, case, method):
    """A model with ReLUs and a smooth activation or other rectifier (as an op or as the
    pattern torch exports) between the image and the score: both builders refuse, in the same
    words, naming it; the plain gradient works."""
    nodes, found = ACTIVATIONS[case]
    path = small_model_path(tmp_path, [*nodes, node("Relu", ["t"], "a")], CONSTANTS)
    errors = []
    for builder in ("native", "onnxruntime"):
        explainer = Explainer(path, cache_dir=tmp_path / "cache", builder=builder)
        with pytest.raises(OnnxAttrError) as error:
            explainer.explain(IMAGE, method)
        errors.append(str(error.value))
    explainer = Explainer(path, cache_dir=tmp_path / "cache")  # (training: no Softplus gradient)
    assert np.abs(explainer.explain(IMAGE, "gradient").attribution).max() > 0
    rule = METHOD_RULES[method]
    assert errors[0] == errors[1] == (
        f"the '{rule}' ReLU backward rule is defined for Relu (and Clip with min 0) only; the "
        f"model has {found} between 'image' and 'score' (use the plain gradient)")


@pytest.mark.parametrize("gate", ["Sigmoid", "HardSigmoid"])
def test_squeeze_excite_gate_is_not_a_rectifier(tmp_path, gate, builder):
    """Relu -> squeeze-excite (pool, 1x1 conv, Relu, 1x1 conv, gate) times the Relu's output:
    the gate multiplies another tensor, so the rules apply at the two Relus."""
    rng = np.random.default_rng(5)
    nodes = [node("Relu", ["c1"], "r1"), node("GlobalAveragePool", ["r1"], "pooled"),
             node("Conv", ["pooled", "w_down"], "down"), node("Relu", ["down"], "r2"),
             node("Conv", ["r2", "w_up"], "up"), node(gate, ["up"], "gate"),
             node("Mul", ["r1", "gate"], "a")]
    path = small_model_path(tmp_path, nodes, {"w_down": _weights(rng, 2, 4, 1, 1),
                                              "w_up": _weights(rng, 4, 2, 1, 1)})
    explainer = Explainer(path, cache_dir=tmp_path / "cache", builder=builder)
    maps = {m: explainer.explain(IMAGE, m).attribution for m in METHOD_RULES}
    assert explainer.engine.builders_used[("guided", "prob", None)] == builder
    for method in ("guided-backprop", "zeiler-fergus"):
        assert np.abs(maps[method]).max() > 0
        assert rel_l2(maps[method], maps["gradient"]) > 0.01


def test_relus_off_the_gradient_path_are_not_counted(tmp_path):
    """A Relu feeding nothing, and one reaching the score only through Shape, have no ReluGrad."""
    nodes = [helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Relu", ["image"], ["dead"], name="dead_relu"),
             helper.make_node("Relu", ["c1"], ["sized"], name="shape_only_relu"),
             helper.make_node("Shape", ["sized"], ["shape"], name="shape"),
             helper.make_node("Reshape", ["r", "shape"], ["a"], name="reshape")]
    explainer = Explainer(small_model_path(tmp_path, nodes), cache_dir=tmp_path / "cache",
                          builder="onnxruntime")
    guided = explainer.explain(IMAGE, "guided-backprop").attribution
    assert np.abs(guided).max() > 0
    graph = explainer.engine.gradient_graph("guided")
    assert not any(n.op_type == "ReluGrad" for n in graph.graph.node)


def test_relugrad_count_mismatch_and_unknown_rule_are_refused():
    one, two = scored(one_relu_model()), scored(concat_of_relus())
    built = training_builder_graph(one, "image")
    with pytest.raises(OnnxAttrError, match="1 ReluGrad nodes for 2 Relu nodes"):
        rewrite_relu_gradients(built, "guided", two)
    with pytest.raises(OnnxAttrError, match="unknown ReLU backward rule 'smooth'"):
        rewrite_relu_gradients(built, "smooth", one)


# --- 5. the maps --------------------------------------------------------------------------------

def gini(map_):
    """Gini coefficient of the map's pixel values: 0 for mass spread evenly over the image,
    towards 1 for mass on a few pixels (as for a sharp, structured map)."""
    values = np.sort(map_, axis=None)
    cumulative = np.cumsum(values)
    return float(1 + 1 / values.size - 2 * cumulative.sum() / (cumulative[-1] * values.size))


def test_guided_map_is_sharper_than_gradient(googlenet, photos):
    """Sharpness = Gini coefficient of |attribution| summed over channels. On the four shared
    photos guided > gradient (by 0.03 to 0.16) and Zeiler-Fergus < guided (by 0.13 to 0.29)."""
    photo = next((p for p in photos if p.stem == "chelsea"), photos[0])
    MAPS_DIR.mkdir(exist_ok=True)
    sharpness = {}
    for method in METHOD_RULES:
        explanation = googlenet.explain(photo, method)
        sharpness[method] = gini(np.abs(explanation.attribution).sum(0))
        save_map_figure(MAPS_DIR / f"{photo.stem}_{method}.png", colorize(explanation.map),
                        explanation.title)
    save_photo_figure(MAPS_DIR / f"{photo.stem}.png", explanation.photo,
                      f"{explanation.label} ({explanation.score:.2f})")
    print("\nGini sharpness:", {k: round(v, 3) for k, v in sharpness.items()})
    assert sharpness["guided-backprop"] > sharpness["gradient"] + 0.05
    assert sharpness["zeiler-fergus"] < sharpness["guided-backprop"] - 0.05


def test_a_clip_on_the_shape_path_is_no_rectifier(tmp_path, builder):
    """An int64 Clip with min 0 that computes a Reshape's shape (EfficientNetV2 has such) is
    shape arithmetic, not an activation: guided backprop applies at the Relu and names no Clip
    (the training builder refused the model, naming the Clip as a ReLU6)."""
    nodes = [helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero_index"], ["batch"], name="batch", axis=0),
             helper.make_node("Clip", ["batch", "zero_int"], ["clipped"], name="shape_clip"),
             helper.make_node("Concat", ["clipped", "minus_one"], ["new_shape"], name="cat",
                              axis=0),
             helper.make_node("Reshape", ["r", "new_shape"], ["flat"], name="reshape"),
             helper.make_node("Reshape", ["flat", "back"], ["a"], name="back")]
    extra = {"zero_index": np.array([0], np.int64), "zero_int": np.array(0, np.int64),
             "minus_one": np.array([-1], np.int64), "back": np.array([0, 4, SIZE, SIZE], np.int64)}
    path = small_model_path(tmp_path, nodes, extra)
    explainer = Explainer(path, cache_dir=tmp_path / "cache", builder=builder)
    guided = explainer.explain(IMAGE, "guided-backprop", target=1).attribution
    plain = explainer.explain(IMAGE, "gradient", target=1).attribution
    assert np.abs(guided).max() > 0 and not np.allclose(guided, plain)


def test_the_training_builder_suggests_the_native_one_only_where_it_can():
    """An op the training builder cannot differentiate: --builder native is suggested only
    when the native builder has a rule for it (LeViT's refusals pointed to a builder that
    refused too)."""
    from onnxattr.graph.training import _builder_error

    message = "Gradient for op {} has not been registered: {} for node n1"
    assert "use --builder native" in _builder_error(message.format("LRN", "LRN"))
    unknown = _builder_error(message.format("Unheard", "Unheard"))
    assert "the native builder cannot either" in unknown and "--builder native" not in unknown
