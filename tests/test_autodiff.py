"""The native gradient builder's contract (onnxattr.graph.autodiff.build_native_gradient): sums of
contributions, kept outputs, an intermediate tensor as wrt, any batch size, its refusals, the
ReLU rules and their policy, standard ops only; the shared backward forms against the training
build's kernels; and whole models against the onnxruntime-training builder."""

import time

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_autodiff_rules import central_differences, reference

from onnxattr import OnnxAttrError
from onnxattr.graph import backward_forms
from onnxattr.graph.autodiff import VJP_RULES, build_native_gradient
from onnxattr.graph.autodiff.registry import Rule
from onnxattr.graph.lowering import lower_graph
from onnxattr.graph.prepare import ONEHOT, TRAINING_FIXES, add_score_head, gradient_output, prepare_forward
from onnxattr.graph.toolkit import Emitter, GraphEditor
from onnxattr.graph.training import build_training_gradient
from onnxattr.io.model import describe_model

import small_models
from tolerance import rel_l2

onnxruntime.set_default_logger_severity(3)

RULES = ["vanilla", "guided", "zeiler-fergus"]
TOLERANCE = 1e-5  # relative L2, native against the training builder (float32, onnxruntime)


def run(model, feeds, outputs):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(outputs, {k: v for k, v in feeds.items() if k in names})


def graph_model(nodes, inputs, outputs, initializers=(), opset=17, dtype=TensorProto.DOUBLE):
    """A model of `nodes`; inputs and outputs as {name: shape}."""
    graph = helper.make_graph(
        nodes, "contract", [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, dtype, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def check_standard(model):
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert all(onnx.defs.has(n.op_type) for n in model.graph.node)
    assert model.ir_version <= 10


# --- the reverse walk ------------------------------------------------------------------------

def shared_tensor_model():
    """a = relu(x); score = sum(w1 * a * a + w2 * (a + x)) + sum(exp(x) * w3): x and a are
    each read by several nodes; `other` is an output the score does not need."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Mul", ["a", "a"], ["sq"], name="square"),
             helper.make_node("Add", ["a", "x"], ["ax"], name="add"),
             helper.make_node("Mul", ["sq", "w1"], ["t1"]),
             helper.make_node("Mul", ["ax", "w2"], ["t2"]),
             helper.make_node("Exp", ["x"], ["e"]),
             helper.make_node("Mul", ["e", "w3"], ["t3"]),
             helper.make_node("Sum", ["t1", "t2", "t3"], ["total"]),
             helper.make_node("ReduceSum", ["total"], ["score"], keepdims=0),
             helper.make_node("Tanh", ["x"], ["other"], name="unused_branch")]
    weights = {f"w{i}": rng.uniform(0.5, 1.5, (2, 3)) for i in (1, 2, 3)}
    return graph_model(nodes, {"x": [2, 3]}, {"score": [], "other": [2, 3]}, weights)


def test_contributions_of_several_consumers_add_up():
    model = shared_tensor_model()
    x = np.random.default_rng(1).choice([-1, 1], (2, 3)) * np.random.default_rng(2).uniform(
        0.2, 1, (2, 3))
    gradient = build_native_gradient(model, "x")
    check_standard(gradient)
    got = reference(gradient).run(["x_grad"], {"x": x})[0]
    assert rel_l2(got, central_differences(model, {"x": x}, "x")) < 1e-6
    assert [o.name for o in gradient.graph.output] == ["score", "other", "x_grad"]
    assert "unused_branch" in {n.name for n in gradient.graph.node}  # forward nodes all kept
    backward = gradient.graph.node[len(model.graph.node):]
    assert not {"Tanh"} & {n.op_type for n in backward}  # nothing for the unused output
    assert sum(n.op_type == "Sum" for n in backward) == 2  # a (square twice, add), x (3 paths)


def cut_at(model, name):
    """The part of `model` downstream of tensor `name`, which becomes a graph input."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    producer = next(n for n in cut.graph.node if name in n.output)
    nodes = [n for n in cut.graph.node if n is not producer]
    del cut.graph.node[:]
    cut.graph.node.extend(nodes)
    cut.graph.input.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, None))
    return cut


def test_gradient_with_respect_to_an_intermediate_tensor():
    """Grad-CAM's case: d score / d (an inner activation), here the first Conv's output."""
    model = small_models.as_float64(native_scored(small_models.conv_relu_maxpool_lrn()))
    gradient = build_native_gradient(model, "c1")
    check_standard(gradient)
    output = next(o for o in gradient.graph.output if o.name == "c1_grad")
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == \
        ["N", 4, 8, 8] and output.type.tensor_type.elem_type == TensorProto.DOUBLE
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 3, 8, 8))
    onehot = np.eye(5)[[2]]
    got, c1 = small_models.reference_evaluator(gradient).run(["c1_grad", "c1"], {
        "image": image, ONEHOT: onehot})
    cut = cut_at(model, "c1")
    want = central_differences(cut, {"c1": c1, ONEHOT: onehot, "image": image}, "c1")
    assert rel_l2(got, want) < 1e-5
    # the forward part upstream of c1 gets no backward nodes
    assert not any(n.name.startswith("grad/conv1/") for n in gradient.graph.node)
    assert any(n.name.startswith("grad/relu1/") for n in gradient.graph.node)


def test_lrn_window_sums_are_channel_mixing_convs():
    """LRN's two window sums (of x^2, and the transposed one of the backward) are 1x1 Convs
    with a band of ones over the C channels, which onnxruntime runs in its NCHWc layout, not
    Sums of channel Slices (one pass per window cell); test_autodiff_rules checks the values."""
    gradient = build_native_gradient(native_scored(SMALL["conv-relu-maxpool(ceil)-lrn-gemm-softmax"]()),
                                     "image")
    lrn = [n for n in gradient.graph.node if n.name.startswith("grad/lrn1/")]
    constants = {n.output[0]: n.attribute[0].t for n in gradient.graph.node
                 if n.op_type == "Constant"}
    constants.update({i.name: i for i in gradient.graph.initializer})
    convs = [n for n in lrn if n.op_type == "Conv"]
    assert [list(constants[n.input[1]].dims) for n in convs] == [[4, 4, 1, 1]] * 2
    assert not [n for n in lrn if n.op_type in ("Slice", "Pad")]


@pytest.mark.parametrize("name", ["conv-relu-maxpool(ceil)-lrn-gemm-softmax",
                                  "concat-batchnorm-dropout-avgpool-gemm-softmax"])
def test_any_batch_size_rows_independent(name):
    """Built once for a symbolic batch: batch 3 gives each row its own batch-1 gradient."""
    gradient = build_native_gradient(native_scored(SMALL[name]()), "image")
    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32)
    onehot = np.eye(5, dtype=np.float32)[[0, 3, 4]]
    batch = run(gradient, {"image": images, ONEHOT: onehot}, ["image_grad"])[0]
    for row in range(3):
        alone = run(gradient, {"image": images[row:row + 1], ONEHOT: onehot[row:row + 1]},
                    ["image_grad"])[0]
        np.testing.assert_allclose(batch[row:row + 1], alone, rtol=1e-5, atol=1e-7)


def test_opset_and_ir_version():
    model = native_scored(small_models.conv_relu_maxpool_lrn())
    model.ir_version = 8
    gradient = build_native_gradient(model, "image")
    assert [(o.domain, o.version) for o in gradient.opset_import] == [("", 17)]
    check_standard(gradient)
    nodes = [helper.make_node("Gelu", ["x"], ["g"]),
             helper.make_node("ReduceSum", ["g"], ["score"], keepdims=0)]
    newer = graph_model(nodes, {"x": [2]}, {"score": []}, opset=20)
    newer.ir_version = 11
    built = build_native_gradient(newer, "x")
    assert built.opset_import[0].version == 20 and built.ir_version == 10


def test_model_local_functions_are_inlined():
    """A dynamo-style export: the work happens in a model-local function."""
    function = helper.make_function(
        "pkg.local", "ScaledTanh", ["a"], ["b"],
        [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(
            np.array(2.0))),
         helper.make_node("Tanh", ["a"], ["t"]),
         helper.make_node("Mul", ["t", "two"], ["b"])],
        [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("ScaledTanh", ["x"], ["y"], domain="pkg.local", name="call"),
             helper.make_node("ReduceSum", ["y"], ["score"], keepdims=0)]
    model = graph_model(nodes, {"x": [3]}, {"score": []})
    model.opset_import.append(helper.make_opsetid("pkg.local", 1))
    model.functions.append(function)
    gradient = build_native_gradient(model, "x")
    check_standard(gradient)
    assert not gradient.functions
    x = np.array([-0.5, 0.1, 0.9])
    got = reference(gradient).run(["x_grad"], {"x": x})[0]
    np.testing.assert_allclose(got, 2 * (1 - np.tanh(x) ** 2), rtol=1e-12)


def test_float64_seed_and_constants():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("ReduceMean", ["s"], ["score"], keepdims=0)]
    model = graph_model(nodes, {"x": [4]}, {"score": []})
    gradient = build_native_gradient(model, "x")
    doubles = {t.name for t in gradient.graph.initializer if t.data_type == TensorProto.DOUBLE}
    floats = {t.name for t in gradient.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert doubles and not floats
    x = np.linspace(-1, 1, 4)
    got = reference(gradient).run(["x_grad"], {"x": x})[0]
    s = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(got, s * (1 - s) / 4, rtol=1e-12)
    x = np.array([[-0.5, 0.3, 0.8], [0.6, -0.2, 0.4]])  # the ReLU rules in float64 too
    for rule in RULES:
        modified = build_native_gradient(shared_tensor_model(), "x", relu_rule=rule)
        assert reference(modified).run(["x_grad"], {"x": x})[0].dtype == np.float64


# --- refusals ----------------------------------------------------------------------------------

def test_missing_rule_is_one_line_naming_op_and_node():
    model = native_scored(small_models.concat_batchnorm())
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type, node.name = "Round", "rounding_node"
    with pytest.raises(OnnxAttrError) as error:
        build_native_gradient(model, "image")
    message = str(error.value)
    assert "\n" not in message
    assert "no rule for op Round (node 'rounding_node')" in message
    assert "--builder onnxruntime" in message


def test_other_errors():
    model = shared_tensor_model()
    with pytest.raises(OnnxAttrError, match="no tensor 'nope'"):
        build_native_gradient(model, "nope")
    with pytest.raises(OnnxAttrError, match="unknown ReLU backward rule 'sideways'"):
        build_native_gradient(model, "x", relu_rule="sideways")
    with pytest.raises(OnnxAttrError, match="'score' does not depend on 'other'"):
        build_native_gradient(model, "other")
    clip = graph_model([helper.make_node("Clip", ["x", "x"], ["y"], name="self_clip"),
                        helper.make_node("ReduceSum", ["y"], ["score"], keepdims=0)],
                       {"x": [3]}, {"score": []})
    with pytest.raises(OnnxAttrError, match="Clip node 'self_clip'.*input 1"):
        build_native_gradient(clip, "x")


# --- the ReLU rules ------------------------------------------------------------------------------

def rectifier_model(rectifier, extra_relu=True):
    """x -> Conv -> rectifier -> (Relu) -> Flatten -> Gemm -> score, float32."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])]
    nodes += rectifier("c", "r")
    last = "r"
    if extra_relu:
        nodes.append(helper.make_node("Relu", ["r"], ["r2"], name="relu_after"))
        last = "r2"
    nodes += [helper.make_node("Flatten", [last], ["f"]),
              helper.make_node("Gemm", ["f", "head"], ["logits"], transB=1),
              helper.make_node("Mul", ["logits", ONEHOT], ["picked"]),
              helper.make_node("ReduceSum", ["picked"], ["score"], keepdims=0)]
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 2,
             "head": rng.standard_normal((5, 4 * 4 * 4)).astype(np.float32)}
    return graph_model(nodes, {"x": ["N", 3, 4, 4], ONEHOT: ["N", 5]},
                       {"score": [], "logits": ["N", 5]}, inits, dtype=TensorProto.FLOAT)


def relu6(x, y):
    return [helper.make_node("Clip", [x, "zero", "six"], [y], name="relu6")]


def leaky(x, y):
    return [helper.make_node("LeakyRelu", [x], [y], name="leaky", alpha=0.1)]


def test_relu6_is_gated_by_the_modified_rules():
    model = rectifier_model(relu6)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), "zero"),
                                    numpy_helper.from_array(np.array(6, np.float32), "six")])
    rng = np.random.default_rng(1)
    feeds = {"x": rng.uniform(-1, 1, (2, 3, 4, 4)).astype(np.float32),
             ONEHOT: np.eye(5, dtype=np.float32)[[1, 3]]}
    c, r = run(model_with_outputs(model, ["c", "r"]), feeds, ["c", "r"])
    assert (c > 6).any() and (c < 0).any() and ((c > 0) & (c < 6)).any()
    grads = {rule: run(build_native_gradient(model, "r", relu_rule=rule), feeds, ["r_grad"])[0]
             for rule in RULES}  # d score / d (ReLU6 output): only the last Relu's rule
    at_c = {rule: run(build_native_gradient(model, "c", relu_rule=rule), feeds, ["c_grad"])[0]
            for rule in RULES}
    active = (c > 0) & (c < 6)
    for rule in RULES:
        dy = grads[rule]
        want = {"vanilla": active * dy, "guided": active * np.maximum(dy, 0),
                "zeiler-fergus": np.maximum(dy, 0)}[rule]
        np.testing.assert_array_equal(at_c[rule], want)


def model_with_outputs(model, names):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                             for n in names)
    return copy


def test_modified_rules_refuse_other_rectifiers_and_graphs_without_relu():
    model = rectifier_model(leaky)
    for rule in ("guided", "zeiler-fergus"):
        with pytest.raises(OnnxAttrError, match="LeakyRelu 'leaky'.*use the plain gradient"):
            build_native_gradient(model, "x", relu_rule=rule)
    build_native_gradient(model, "x")  # the plain gradient is fine
    no_relu = rectifier_model(lambda x, y: [helper.make_node("Neg", [x], [y])],
                              extra_relu=False)
    with pytest.raises(OnnxAttrError, match="no Relu between 'x' and 'score'"):
        build_native_gradient(no_relu, "x", relu_rule="guided")
    # a Clip with another minimum is a rectifier the rules do not cover
    other_clip = rectifier_model(lambda x, y: [helper.make_node("Clip", [x, "lo"], [y],
                                                                name="clip_lo")])
    other_clip.graph.initializer.append(numpy_helper.from_array(np.array(-1, np.float32), "lo"))
    with pytest.raises(OnnxAttrError, match="Clip 'clip_lo'"):
        build_native_gradient(other_clip, "x", relu_rule="guided")


def test_rule_count_check(monkeypatch):
    """A Relu whose backward skipped the configured rule is refused, not half-modified."""
    model = native_scored(small_models.conv_relu_maxpool_lrn())
    original = VJP_RULES["Relu"]

    def plain(g):
        return g.op("Where", g.op("Greater", g.y(), g.scalar(0, g.y())), g.dy(),
                    g.scalar(0, g.y()))
    monkeypatch.setitem(VJP_RULES, "Relu", Rule("Relu", plain, original.inputs))
    with pytest.raises(OnnxAttrError, match="applied the 'guided' ReLU rule 0 times for 1"):
        build_native_gradient(model, "image", relu_rule="guided")


# --- the shared backward forms ---------------------------------------------------------------------

def form_model(inputs, emit, output_shape=None):
    graph = helper.make_graph([], "form", [helper.make_tensor_value_info(
        n, TensorProto.FLOAT, s) for n, s in inputs.items()], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    em = Emitter(GraphEditor(model))
    out = emit(em)
    model.graph.node.extend(em.nodes)
    model.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                            output_shape))
    return model, out


POOLS = {  # kernel, strides, pads, dilations, ceil_mode, size
    "3x3 stride 2 ceil (GoogLeNet)": ((3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1, (9, 9)),
    "3x3 stride 1 pads 1": ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 0, (6, 7)),
    "2x2 stride 2": ((2, 2), (2, 2), (0, 0, 0, 0), (1, 1), 0, (6, 6)),
    "3x2 stride (3, 1) asymmetric pads": ((3, 2), (3, 1), (1, 0, 2, 1), (1, 1), 0, (8, 5)),
    "dilation 2 stride 2 ceil": ((2, 2), (2, 2), (1, 1, 1, 1), (2, 2), 1, (7, 8)),
    "1x1 stride 3 (cells no window reads)": ((1, 1), (3, 3), (0, 0, 0, 0), (1, 1), 0, (7, 7)),
}


@pytest.mark.parametrize("form", ["indices", "slices", "unfold", "separable"])
@pytest.mark.parametrize("pool", POOLS)
def test_max_pool_forms_equal_the_training_kernel_on_ties(pool, form):
    """Post-ReLU inputs (a third exact zeros, small integers: many tied windows) and integer
    dY, so that sums are exact: every form must route each window's dY to the same cell as
    onnxruntime-training's MaxPoolGrad (the first maximum in scan order)."""
    kernel, strides, pads, dilations, ceil, size = POOLS[pool]
    rng = np.random.default_rng(7)
    x = np.maximum(rng.integers(-2, 4, (2, 3, *size)), 0).astype(np.float32)
    attrs = dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                 dilations=list(dilations), ceil_mode=ceil)
    out = backward_forms.window_output_size(list(size), list(kernel), list(strides), list(pads),
                                            list(dilations), ceil)
    dy = rng.integers(-4, 5, (2, 3, *out)).astype(np.float32)
    inputs = {"x": [2, 3, *size], "dy": [2, 3, *out]}

    def training(em):
        _, indices = em.op("MaxPool", "x", outputs=2, **attrs)
        return em.op("MaxPoolGrad", "dy", indices, **attrs)

    def native(em):
        y = em.op("MaxPool", "x", **attrs)
        return backward_forms.max_pool_grad(em, "x", y, "dy", list(size), list(kernel),
                                            list(strides), list(pads), list(dilations), out,
                                            form=form)
    want = run(*[form_model(inputs, training, [2, 3, *size])[0]], {"x": x, "dy": dy},
               None)[0]
    got = run(form_model(inputs, native)[0], {"x": x, "dy": dy}, None)[0]
    assert (x == 0).mean() > 0.3
    np.testing.assert_array_equal(got, want)


CONVS = {  # in, out, size, kernel, strides, pads, dilations, group
    "3x3 pad 1": (3, 4, (7, 7), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "5x5 pad 2 groups 2": (4, 6, (6, 5), (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 2),
    "dilation 2 asymmetric pads": (3, 2, (9, 8), (3, 3), (1, 1), (2, 0, 1, 2), (2, 2), 1),
    "1x1": (8, 4, (5, 5), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "stride 2 (ConvTranspose only)": (3, 4, (8, 9), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
}


@pytest.mark.parametrize("conv", CONVS)
def test_conv_input_gradient_forms_agree_with_conv_grad(conv):
    cin, cout, size, kernel, strides, pads, dilations, group = CONVS[conv]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin // group, *kernel)).astype(np.float32)
    x = rng.standard_normal((2, cin, *size)).astype(np.float32)
    out = backward_forms.window_output_size(list(size), list(kernel), list(strides),
                                            list(pads), list(dilations))
    dy = rng.standard_normal((2, cout, *out)).astype(np.float32)
    attrs = dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                 dilations=list(dilations), group=group)
    inputs = {"dy": [2, cout, *out], "x": [2, cin, *size]}

    def training(em):
        return em.op("ConvGrad", "dy", "x", em.const(w), outputs=3, domain="com.microsoft",
                     **attrs)[0]
    training_model, _ = form_model(inputs, training, [2, cin, *size])
    training_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    want = run(training_model, {"dy": dy, "x": x}, None)[0]
    forms = ["conv_transpose"] + (["flipped_conv"] if set(strides) == {1} else [])
    for form in forms:
        model, _ = form_model(inputs, lambda em: backward_forms.conv_input_grad(
            em, "dy", em.const(w), list(size), list(kernel), list(strides), list(pads),
            list(dilations), group, list(w.shape), form=form))
        got = run(model, {"dy": dy, "x": x}, None)[0]
        assert got.shape == want.shape
        assert rel_l2(got, want) < 1e-6, form


# --- whole models against the onnxruntime-training builder ----------------------------------------

def native_scored(model, score="prob"):
    """The scored model the native builder differentiates: the classifier's own forward graph
    (no forward fixes), outputs prob and logits, the score head."""
    return add_score_head(prepare_forward(describe_model(model, "digest")), score)


def training_gradient(model, rule, score="prob"):
    """The engine's graph: forward fixes, score head, the training builder, the ReLU rewrite,
    the lowering to standard ops."""
    classifier = describe_model(model, "digest")
    scored = add_score_head(prepare_forward(classifier, TRAINING_FIXES), score)
    return lower_graph(build_training_gradient(scored, classifier.input_name, rule))


def compare_with_training(model, rule, pixels, targets, score="prob"):
    classifier = describe_model(model, "digest")
    name = classifier.input_name
    onehot = np.eye(classifier.num_classes, dtype=np.float32)[targets]
    feeds = {name: pixels, ONEHOT: onehot}
    native = build_native_gradient(native_scored(model, score), name, relu_rule=rule)
    check_standard(native)
    got = run(native, feeds, [gradient_output(name)])[0]
    want = run(training_gradient(model, rule, score), feeds, [gradient_output(name)])[0]
    assert np.abs(want).max() > 0
    return rel_l2(got, want)


SMALL = {
    "conv-relu-maxpool(ceil)-lrn-gemm-softmax": small_models.conv_relu_maxpool_lrn,
    "concat-batchnorm-dropout-avgpool-gemm-softmax": small_models.concat_batchnorm,
    "concat-batchnorm, logits only": lambda: small_models.concat_batchnorm(softmax=False),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", SMALL)
def test_small_models_match_the_training_builder(name, rule):
    pixels = np.random.default_rng(3).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    for score in ("prob", "logit"):
        error = compare_with_training(SMALL[name](), rule, pixels, [1, 4], score)
        assert error <= TOLERANCE, f"{score}: relative L2 {error:.2e}"


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    pytest.importorskip("torch")
    from tiny_resnet import export_tiny_resnet

    path = tmp_path_factory.mktemp("resnet") / "tiny_resnet.onnx"
    export_tiny_resnet(path)
    return onnx.load(path)


@pytest.mark.parametrize("rule", RULES)
def test_tiny_resnet_matches_the_training_builder(tiny_resnet, rule):
    pixels = np.random.default_rng(4).uniform(0, 255, (2, 3, 32, 32)).astype(np.float32)
    error = compare_with_training(tiny_resnet, rule, pixels, [3, 7])
    assert error <= TOLERANCE, f"relative L2 {error:.2e}"


STOCK_RUNNER = """
import json, sys
import numpy as np
import onnxruntime
from onnxruntime.capi import _pybind_state
assert not hasattr(_pybind_state, "GradientGraphBuilder"), "not a stock onnxruntime"
for job in json.load(open(sys.argv[1])):
    session = onnxruntime.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
    np.save(job["output"], session.run([job["name"]], dict(np.load(job["inputs"])))[0])
print(onnxruntime.__version__)
"""


def test_native_graphs_run_on_stock_onnxruntime(stock_python, tiny_resnet, tmp_path):  # noqa: F811
    """The native graphs (standard ops only) on the latest stock onnxruntime from PyPI give
    what the training build's runtime gives."""
    import json
    import subprocess

    pixels = np.random.default_rng(8).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    models = {name: make() for name, make in SMALL.items()}
    models["tiny resnet"] = tiny_resnet
    jobs, wanted = [], []
    for model in models.values():
        size = describe_model(model, "digest").height
        images = (pixels if size == 8 else np.random.default_rng(9).uniform(
            0, 255, (2, 3, size, size)).astype(np.float32))
        onehot = np.eye(describe_model(model, "digest").num_classes, dtype=np.float32)[[1, 3]]
        for rule in RULES:
            graph = build_native_gradient(native_scored(model), "image", relu_rule=rule)
            path = tmp_path / f"{len(jobs)}.onnx"
            onnx.save(graph, path)
            np.savez(tmp_path / f"{len(jobs)}.npz", image=images, onehot=onehot)
            jobs.append({"model": str(path), "inputs": str(tmp_path / f"{len(jobs)}.npz"),
                         "output": str(tmp_path / f"{len(jobs)}.npy"), "name": "image_grad"})
            wanted.append(run(graph, {"image": images, ONEHOT: onehot}, ["image_grad"])[0])
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "runner.py").write_text(STOCK_RUNNER)
    done = subprocess.run([str(stock_python), str(tmp_path / "runner.py"),
                           str(tmp_path / "jobs.json")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"stock onnxruntime {done.stdout.strip()}")
    for job, want in zip(jobs, wanted):
        assert rel_l2(np.load(job["output"]), want) <= 1e-6


# --- BVLC GoogLeNet ------------------------------------------------------------------------------

def timed(graphs, feeds, runs=3):
    """{name: (image_grad, median seconds of `runs` batch-1 runs on 2 threads)}, the graphs
    run in turn so that load on the machine hits them alike."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    sessions = {name: onnxruntime.InferenceSession(graph.SerializeToString(), options,
                                                   providers=["CPUExecutionProvider"])
                for name, graph in graphs.items()}
    results = {name: s.run(["image_grad"], feeds)[0] for name, s in sessions.items()}
    times = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(["image_grad"], feeds)
            times[name].append(time.perf_counter() - start)
    return {name: (results[name], float(np.median(times[name]))) for name in sessions}


@pytest.mark.slow
def test_googlenet_matches_the_training_builder(googlenet_path, photos, torch_reference):
    """Real GoogLeNet, three rules. On the forward graph the training builder differentiates
    (prepare_forward: BN folded, LRN and AveragePool rewritten, Dropout removed) the native
    gradient equals the builder's to float rounding. On the model's own forward graph (what the
    native builder is for: LRN, AveragePool, Dropout as they are) float32 rounding differs, and
    a few near-tied MaxPool windows pick another cell (1e-3 on some photos): that one is checked
    against float64 PyTorch as test_gradient checks the engine. Prints the batch-1 run times."""
    from test_gradient import torch_gradient

    from onnxattr.io.image import load_pixels

    model = onnx.load(googlenet_path)
    classifier = describe_model(model, "digest")
    pixels = load_pixels(photos[0], (224, 224))[None]
    onehot = np.zeros((1, 1000), np.float32)
    onehot[0, 285] = 1
    feeds = {"image": pixels, ONEHOT: onehot}
    prepared = add_score_head(prepare_forward(classifier, TRAINING_FIXES))
    own = native_scored(model)
    for rule in RULES:
        runs = timed({"training": training_gradient(model, rule),
                      "same forward": build_native_gradient(prepared, "image", relu_rule=rule),
                      "native": build_native_gradient(own, "image", relu_rule=rule)}, feeds)
        (training, training_time), (same_forward, _), (native, native_time) = runs.values()
        error = rel_l2(same_forward, training)
        drift = rel_l2(native, training)
        print(f"GoogLeNet {rule}: native vs training builder {error:.1e} on the same forward "
              f"graph, {drift:.1e} on the model's own; batch-1 run (median of 3, 2 threads): "
              f"native {native_time * 1e3:.0f} ms, training builder lowered "
              f"{training_time * 1e3:.0f} ms")
        assert error <= TOLERANCE
        assert drift <= 1e-2
        if rule == "vanilla":
            want = torch_gradient(torch_reference, pixels, [285])
            assert rel_l2(native, want) <= 1e-2
