"""Portable attribution models: every lowering rule (onnxattr.graph.lowering) against the training
build's kernel on tiny graphs, and compiled GoogLeNet and residual-network models run on STOCK
onnxruntime (the latest release from PyPI, in a virtual environment made once per checkout)
against the training-build gradient graphs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxattr import Explainer, OnnxAttrError
from onnxattr.graph import backward_forms
from onnxattr.graph.lowering import LOWERING_RULES, lower_graph
from onnxattr.io.model import METHOD_KEY, SCORE_KEY, load_model
from onnxattr.methods.compile import compile_model

from tolerance import float32_bound, rel_l2

onnxruntime.set_default_logger_severity(3)

REPO = Path(__file__).resolve().parents[1]
METHOD_RULES = {"gradient": "vanilla", "guided-backprop": "guided",
                "zeiler-fergus": "zeiler-fergus"}
TOLERANCE = 1e-5  # relative L2, compiled model on stock onnxruntime vs the training build


# --- 1. one rule at a time, against the training build's kernel ---------------------------------

def run(model, feeds, outputs):
    return onnxruntime.InferenceSession(model.SerializeToString()).run(outputs, feeds)


def op_model(nodes, inputs, outputs, initializers=()):
    """A model with the training op(s) `nodes`; inputs/outputs are (name, elem type, shape)."""
    graph = helper.make_graph(
        nodes, "op", [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def check_lowering(model, feeds, output="dX", rtol=1e-6):
    """The lowered model: only standard ops, and the same output as the training kernel."""
    lowered = lower_graph(model)
    assert {(n.domain, n.op_type) for n in lowered.graph.node if n.domain or n.op_type in
            LOWERING_RULES} == set()
    assert [(o.domain, o.version) for o in lowered.opset_import] == [("", 17)]
    want = run(model, feeds, [output])[0]
    inputs = {i.name for i in lowered.graph.input}  # unused inputs are pruned
    got = run(lowered, {k: v for k, v in feeds.items() if k in inputs}, [output])[0]
    assert got.shape == want.shape
    assert rel_l2(got, want) <= rtol, rel_l2(got, want)
    return got, want


CONV_CASES = {  # (in channels, out channels, size, kernel, strides, pads, dilations, group)
    "plain": (3, 4, (7, 7), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "stride 2, odd size (output_padding)": (3, 4, (8, 9), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    "stride 3, uncovered border": (2, 3, (11, 10), (2, 3), (3, 3), (0, 0, 0, 0), (1, 1), 1),
    "asymmetric pads": (3, 2, (7, 6), (3, 3), (2, 1), (0, 2, 1, 0), (1, 1), 1),
    "dilation 2": (3, 4, (9, 9), (3, 3), (1, 2), (2, 1, 2, 1), (2, 2), 1),
    "group 2": (4, 6, (6, 7), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2),
    "depthwise, stride 2": (4, 4, (9, 8), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4),
    "1x1 stride 2 projection": (8, 16, (9, 9), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    "7x7 stride 2 pad 3 (GoogLeNet conv1)": (3, 4, (23, 23), (7, 7), (2, 2), (3, 3, 3, 3), (1, 1),
                                              1),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_grad(case):
    cin, cout, size, kernel, strides, pads, dilations, group = CONV_CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cin, *size)).astype(np.float32)
    w = rng.standard_normal((cout, cin // group, *kernel)).astype(np.float32)
    out = [(s + pads[i] + pads[i + 2] - ((k - 1) * d + 1)) // st + 1
           for i, (s, k, st, d) in enumerate(zip(size, kernel, strides, dilations))]
    dy = rng.standard_normal((2, cout, *out)).astype(np.float32)
    node = helper.make_node("ConvGrad", ["dY", "X", "W"], ["dX", "dW", "dB"], name="conv_grad",
                            domain="com.microsoft", kernel_shape=list(kernel),
                            strides=list(strides), pads=list(pads), dilations=list(dilations),
                            group=group)
    model = op_model([node], [("dY", TensorProto.FLOAT, ["N", cout, *out]),
                              ("X", TensorProto.FLOAT, ["N", cin, *size])],
                     [("dX", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")])
    check_lowering(model, {"dY": dy, "X": x})


def test_conv_grad_weight_output_in_use_is_refused():
    node = helper.make_node("ConvGrad", ["dY", "X", "W"], ["dX", "dW"], name="conv_grad",
                            domain="com.microsoft", kernel_shape=[3, 3])
    model = op_model([node], [("dY", TensorProto.FLOAT, [1, 2, 3, 3]),
                              ("X", TensorProto.FLOAT, [1, 2, 5, 5]),
                              ("W", TensorProto.FLOAT, [2, 2, 3, 3])],
                     [("dX", TensorProto.FLOAT, None), ("dW", TensorProto.FLOAT, None)])
    with pytest.raises(OnnxAttrError, match="ConvGrad node 'conv_grad'.*'dW' is used"):
        lower_graph(model)


MAXPOOL_CASES = {  # kernel, strides, pads, ceil_mode, input size
    "3x3 stride 2 ceil_mode (overlapping)": ((3, 3), (2, 2), (0, 0, 0, 0), 1, (8, 8)),
    "3x3 stride 2 floor, odd size": ((3, 3), (2, 2), (0, 0, 0, 0), 0, (9, 7)),
    "3x3 stride 1 pad 1 (inception pool)": ((3, 3), (1, 1), (1, 1, 1, 1), 1, (6, 6)),
    "2x2 stride 2": ((2, 2), (2, 2), (0, 0, 0, 0), 0, (6, 6)),
}


@pytest.mark.parametrize("form", ["indices", "separable"])
@pytest.mark.parametrize("case", MAXPOOL_CASES)
def test_max_pool_grad(case, form, monkeypatch):
    """The lowering emits backward_forms' default form (the separable one only in benchmarks):
    each sums the gradients of windows that share their maximum, as MaxPoolGrad does."""
    monkeypatch.setitem(backward_forms.FORMS, "max_pool_grad", form)
    kernel, strides, pads, ceil_mode, size = MAXPOOL_CASES[case]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, *size)).astype(np.float32)
    x[0, 0, 2, 2] = 10.0  # one large value that several overlapping windows pick
    attrs = dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                 ceil_mode=ceil_mode)
    pool = helper.make_node("MaxPool", ["X"], ["Y", "I"], name="pool", **attrs)
    y, indices = run(op_model([pool], [("X", TensorProto.FLOAT, ["N", 3, *size])],
                              [("Y", TensorProto.FLOAT, None), ("I", TensorProto.INT64, None)]),
                     {"X": x}, ["Y", "I"])
    dy = rng.standard_normal(y.shape).astype(np.float32)
    grad = helper.make_node("MaxPoolGrad", ["dY", "I"], ["dX"], name="pool_grad", **attrs)
    model = op_model([pool, grad], [("X", TensorProto.FLOAT, ["N", 3, *size]),
                                    ("dY", TensorProto.FLOAT, ["N", 3, *y.shape[2:]])],
                     [("dX", TensorProto.FLOAT, [2, 3, *size])])  # the training kernel needs it
    got, _ = check_lowering(model, {"X": x, "dY": dy})
    scatters = [n for n in lower_graph(model).graph.node if n.op_type == "ScatterElements"]
    assert bool(scatters) == (form == "indices")
    overlapping = np.unique(indices, return_counts=True)[1].max() > 1
    if case.startswith("3x3"):
        assert overlapping  # gradients of windows sharing their maximum must add up
    expected = np.zeros(x.size, np.float32)
    np.add.at(expected, indices.ravel(), dy.ravel())
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", [1, -1, 0])
@pytest.mark.parametrize("op", ["SoftmaxGrad_13", "LogSoftmaxGrad_13", "SoftmaxGrad"])
def test_softmax_grads(op, axis):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 4, 5)).astype(np.float32)
    y = np.exp(logits - logits.max(axis, keepdims=True))
    y = (y / y.sum(axis, keepdims=True)).astype(np.float32)
    if op.startswith("Log"):
        y = np.log(y)
    node = helper.make_node(op, ["dY", "Y"], ["dX"], name="softmax_grad", domain="com.microsoft",
                            axis=axis)
    model = op_model([node], [("dY", TensorProto.FLOAT, [3, 4, 5]),
                              ("Y", TensorProto.FLOAT, [3, 4, 5])],
                     [("dX", TensorProto.FLOAT, None)])
    check_lowering(model, {"dY": rng.standard_normal((3, 4, 5)).astype(np.float32), "Y": y},
                   rtol=1e-5)


def test_relu_grad_uses_output_or_input():
    node = helper.make_node("ReluGrad", ["dY", "T"], ["dX"], name="relu_grad",
                            domain="com.microsoft")
    model = op_model([node], [("dY", TensorProto.FLOAT, [2, 3, 4]),
                              ("T", TensorProto.FLOAT, [2, 3, 4])],
                     [("dX", TensorProto.FLOAT, None)])
    rng = np.random.default_rng(3)
    t = rng.standard_normal((2, 3, 4)).astype(np.float32)
    t[0, 0, :2] = 0.0  # Relu(x) = 0 at x = 0: no gradient there
    check_lowering(model, {"dY": rng.standard_normal((2, 3, 4)).astype(np.float32), "T": t},
                   rtol=0)


@pytest.mark.parametrize("scale_down", [0, 1])
@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_scale(scale_down, dtype):
    node = helper.make_node("Scale", ["X", "S"], ["dX"], name="scale", domain="com.microsoft",
                            scale_down=scale_down)
    model = op_model([node], [("X", TensorProto.FLOAT, [2, 3]),
                              ("S", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [])],
                     [("dX", TensorProto.FLOAT, None)])
    x = np.random.default_rng(4).standard_normal((2, 3)).astype(np.float32)
    check_lowering(model, {"X": x, "S": np.array(49, dtype)})


@pytest.mark.parametrize("axis, indices", [(1, [[0, 2], [2, -1]]), (0, 1), (-1, [3, 0, 3])])
def test_gather_grad(axis, indices):
    shape = [3, 4, 5]
    indices = np.array(indices, np.int64)
    axis_n = axis % 3
    dy_shape = shape[:axis_n] + list(indices.shape) + shape[axis_n + 1:]
    node = helper.make_node("GatherGrad", ["shape", "I", "dY"], ["dX"], name="gather_grad",
                            domain="com.microsoft", axis=axis)
    model = op_model([node], [("dY", TensorProto.FLOAT, dy_shape)],
                     [("dX", TensorProto.FLOAT, None)],
                     [numpy_helper.from_array(np.array(shape, np.int64), "shape"),
                      numpy_helper.from_array(indices, "I")])
    dy = np.random.default_rng(5).standard_normal(dy_shape).astype(np.float32)
    check_lowering(model, {"dY": dy})


def test_sigmoid_grad():
    """EfficientNet and RegNet (SiLU, squeeze-excitation) could not compile without it."""
    node = helper.make_node("SigmoidGrad", ["dY", "Y"], ["dX"], name="sigmoid_grad",
                            domain="com.microsoft")
    model = op_model([node], [("dY", TensorProto.FLOAT, [2, 5]), ("Y", TensorProto.FLOAT, [2, 5])],
                     [("dX", TensorProto.FLOAT, None)])
    rng = np.random.default_rng(6)
    y = 1 / (1 + np.exp(-rng.standard_normal((2, 5)))).astype(np.float32)
    check_lowering(model, {"dY": rng.standard_normal((2, 5)).astype(np.float32), "Y": y},
                   rtol=1e-6)


def test_op_without_rule_is_named():
    node = helper.make_node("TanhGrad", ["dY", "Y"], ["dX"], name="tanh_grad",
                            domain="com.microsoft")
    model = op_model([node], [("dY", TensorProto.FLOAT, [2]), ("Y", TensorProto.FLOAT, [2])],
                     [("dX", TensorProto.FLOAT, None)])
    with pytest.raises(OnnxAttrError, match=r"no lowering rule for training op "
                                            r"com\.microsoft::TanhGrad \(node 'tanh_grad'\)"):
        lower_graph(model)


def test_out_of_range_target_gives_nan_not_zeros(tmp_path):
    """A class index < 0 or >= the number of classes: NaN attribution and class output in that
    row (OneHot gave zeros for 5000 and wrapped -1 to the last class); other rows unchanged."""
    import small_models

    source = small_models.save(small_models.conv_relu_maxpool_lrn(), tmp_path / "small.onnx")
    pixels = np.random.default_rng(6).uniform(0, 255, (3, 3, 8, 8)).astype(np.float32)
    for method in ("gradient", "guided-backprop"):
        compiled = compile_model(source, method, "prob", cache_dir=tmp_path / "cache")
        session = onnxruntime.InferenceSession(compiled.SerializeToString())
        feeds = {"image": pixels, "target": np.array([5000, -1, 2], np.int64)}
        attribution, prob = session.run(["attribution", "prob"], feeds)
        assert np.isnan(attribution[:2]).all() and np.isnan(prob[:2]).all(), method
        want = session.run(["attribution", "prob"], {**feeds, "target": np.array([0, 4, 2])})
        assert np.array_equal(attribution[2], want[0][2]) and np.array_equal(prob[2], want[1][2])
        assert np.abs(attribution[2]).max() > 0 and np.isfinite(want[0]).all()


# --- 2. compiled models on stock onnxruntime ------------------------------------------------------

STOCK_RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime
    from onnxruntime.capi import _pybind_state
    assert not hasattr(_pybind_state, "GradientGraphBuilder"), "not a stock onnxruntime"
    for job in json.load(open(sys.argv[1])):
        session = onnxruntime.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
        feeds = dict(np.load(job["inputs"]))
        np.save(job["output"], session.run(["attribution"], feeds)[0])
    print(onnxruntime.__version__)
""")


def run_stock(python, tmp_path, jobs):
    """Run compiled models [(model path, pixels, targets)] on stock onnxruntime; attributions."""
    specs = []
    for i, (model, pixels, targets) in enumerate(jobs):
        np.savez(tmp_path / f"in{i}.npz", image=pixels, target=np.asarray(targets, np.int64))
        specs.append({"model": str(model), "inputs": str(tmp_path / f"in{i}.npz"),
                      "output": str(tmp_path / f"out{i}.npy")})
    (tmp_path / "jobs.json").write_text(json.dumps(specs))
    (tmp_path / "runner.py").write_text(STOCK_RUNNER)
    done = subprocess.run([str(python), str(tmp_path / "runner.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"\nstock onnxruntime {done.stdout.strip()}")
    return [np.load(s["output"]) for s in specs]


def check_portable(path):
    model = onnx.load(path)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert all(onnx.defs.has(n.op_type) for n in model.graph.node)
    assert [o.domain for o in model.opset_import] == [""]
    assert 16 <= model.opset_import[0].version <= 21 and model.ir_version <= 10
    assert [i.name for i in model.graph.input] == ["image", "target"]
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def googlenet(googlenet_path, tmp_path_factory):
    """(source path, training-build Explainer, folder of compiled models, graph cache)."""
    cache = tmp_path_factory.mktemp("lower_cache")
    return googlenet_path, Explainer(googlenet_path, cache_dir=cache), \
        tmp_path_factory.mktemp("compiled"), cache


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    """TinyResNet (tests/tiny_resnet.py: residual Adds, functional ReLUs), exported."""
    pytest.importorskip("torch")
    from tiny_resnet import export_tiny_resnet

    folder = tmp_path_factory.mktemp("resnet")
    path = folder / "tiny_resnet.onnx"
    export_tiny_resnet(path)
    model = onnx.load(path)
    assert {"Add", "ReduceMean"} <= {n.op_type for n in model.graph.node}
    cache = folder / "cache"
    return path, Explainer(path, cache_dir=cache), folder, cache


@pytest.mark.parametrize("network", ["googlenet", "tiny_resnet"])
def test_compiled_models_match_training_build_on_stock_onnxruntime(network, request, stock_python,
                                                                    tmp_path):
    source, trained, folder, cache = request.getfixturevalue(network)
    # Well-conditioned cases: photos (not noise, whose many near-tied ReLU and MaxPool inputs
    # flip between two runtimes' float32 kernels: 3e-4 on one noise image, seen here) and each
    # row's top-1 and top-2 classes (not a class of probability 1e-5: 3.8e-4, seen once).
    photos = [p for p in request.getfixturevalue("photos") if p.stem in ("chelsea", "raccoon")]
    pixels = trained.pixels(photos)
    ranked = np.argsort(-trained.engine.forward(pixels)[0], axis=1)
    targets = [int(ranked[0, 0]), int(ranked[1, 1])]
    # Every rule and score on the tiny network; GoogLeNet (a full build per case, the suite's
    # slowest test before) runs the two the last check needs: its MaxPool, LRN and Concat
    # backward are the same in every rule.
    cases = [(m, "prob") for m in METHOD_RULES] + [("gradient", "logit")]
    if network == "googlenet":
        cases = cases[:2]
    jobs, wanted = [], []
    for method, score in cases:
        path = folder / f"{method}-{score}.onnx"
        compile_model(source, method, score, path, cache_dir=cache)
        model = check_portable(path)
        metadata = {p.key: p.value for p in model.metadata_props}
        assert metadata[METHOD_KEY] == method and metadata[SCORE_KEY] == score
        assert [o.name for o in model.graph.output] == [
            "prob" if score == "prob" else "logits", "attribution"]
        jobs.append((path, pixels, targets))
        wanted.append(trained.engine.gradient(pixels, targets, METHOD_RULES[method], score)[0])
    # GoogLeNet on two runtime releases: its float32 error (tests/tolerance.py); the tiny
    # residual network's spread is measured on one machine only (tests/README.md)
    bound = (float32_bound([request.getfixturevalue("googlenet_float32")[0]])
             if network == "googlenet" else TOLERANCE)
    for (method, score), got, want in zip(cases, run_stock(stock_python, tmp_path, jobs), wanted):
        errors = [rel_l2(g, w) for g, w in zip(got, want)]
        print(f"{network} {method} ({score}): relative L2 per row",
              " ".join(f"{e:.1e}" for e in errors))
        assert max(errors) <= bound, (method, score, errors)
    guided = run_stock(stock_python, tmp_path, [jobs[1]])[0]
    assert rel_l2(guided, wanted[0]) > 0.1  # the rule is really compiled in


def test_integrated_gradients_through_compiled_model(googlenet):
    source, trained, folder, cache = googlenet
    path = folder / "ig-gradient.onnx"
    compile_model(source, "gradient", "prob", path, cache_dir=cache)
    compiled = Explainer(path)
    assert compiled.classifier.compiled == {"method": "gradient", "score": "prob"}
    photo = REPO / "samples" / "chelsea.png"
    options = dict(steps=8)
    got = compiled.explain(photo, "integrated-gradients", **options)
    want = trained.explain(photo, "integrated-gradients", **options)
    assert got.class_index == want.class_index and got.label == want.label
    assert abs(got.score - want.score) < 1e-6
    assert rel_l2(got.attribution, want.attribution) <= TOLERANCE
    assert got.convergence_delta == pytest.approx(want.convergence_delta, abs=1e-5)
    smooth = dict(smooth="smoothgrad", samples=3, seed=2)
    assert rel_l2(compiled.explain(photo, **smooth).attribution,
                  trained.explain(photo, **smooth).attribution) <= TOLERANCE
    with pytest.raises(OnnxAttrError, match="compiled for method 'gradient' only; "
                                            "'guided-backprop' needs"):
        compiled.explain(photo, "guided-backprop")
    with pytest.raises(OnnxAttrError, match="compiled for score 'prob' only"):
        compiled.explain(photo, score="logit")
    with pytest.raises(OnnxAttrError, match="already a compiled attribution model"):
        compile_model(path, "gradient")


def test_runtime_only_install(googlenet, torch_reference, googlenet_float32, stock_python,
                              tmp_path):
    """onnxattr installed with stock onnxruntime and no training build (Python 3.13 where it is
    installed): an Explainer on a compiled guided-backprop model works, and a source model is
    explained through the native builder ("auto" says so once) with the training build's
    label. Both maps are float32 from another runtime release (and the native one from another
    forward graph), so each is checked against float64 torch at GoogLeNet's float32 error
    (tests/tolerance.py): a fixed bound against the training build failed on a near-tied
    MaxPool (5.6e-5)."""
    source, trained, folder, cache = googlenet
    path = folder / "runtime-guided.onnx"
    compile_model(source, "guided-backprop", "prob", path, cache_dir=cache)
    photo = str(REPO / "samples" / "chelsea.png")
    script = textwrap.dedent(f"""
        import sys, warnings
        import numpy as np
        import onnxruntime
        from onnxattr import Explainer
        from onnxattr.graph.training import has_training_builder
        assert not has_training_builder() and "torch" not in sys.modules
        r = Explainer({str(path)!r}).explain({photo!r}, "guided-backprop")
        np.save({str(tmp_path / "compiled.npy")!r}, r.attribution)
        source = Explainer({str(source)!r}, cache_dir={str(tmp_path / "cache")!r})
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always")
            s = source.explain({photo!r}, "guided-backprop")
        np.save({str(tmp_path / "native.npy")!r}, s.attribution)
        print(sys.version_info[:2], onnxruntime.__version__, len(notes))
        print(r.label)
        print(s.label, source.engine.builders_used)
    """)
    done = subprocess.run([str(stock_python), "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    versions, label, native = done.stdout.strip().splitlines()[-3:]
    print(f"\nruntime-only install: Python, onnxruntime, notes: {versions}")
    want = trained.explain(REPO / "samples" / "chelsea.png", "guided-backprop")
    assert label == want.label and native.startswith(want.label)
    assert "'native'" in native
    pixels = trained.pixels([REPO / "samples" / "chelsea.png"])
    from test_relu_rules import relu_modules_rule, torch_attribution

    with relu_modules_rule(torch_reference, "guided"):
        reference = torch_attribution(torch_reference, pixels, [want.class_index])[0]
    bound = float32_bound([googlenet_float32[0]])
    for name in ("compiled", "native"):
        error = rel_l2(np.load(tmp_path / f"{name}.npy"), reference)
        print(f"{name}: relative L2 against float64 torch {error:.1e} (bound {bound:.1e})")
        assert error <= bound
    assert rel_l2(np.load(tmp_path / "native.npy"), want.attribution) <= bound


def test_compile_command(googlenet, tmp_path):
    source, _, _, cache = googlenet
    out = tmp_path / "cli" / "zf.onnx"
    done = subprocess.run([sys.executable, "-m", "onnxattr", "compile", str(source), "--method",
                           "zeiler-fergus", "--score", "logit", "--output", str(out)],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "ONNXATTR_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    classifier = load_model(out)
    assert classifier.compiled == {"method": "zeiler-fergus", "score": "logit"}
    assert classifier.labels[285] == "Egyptian cat" and classifier.contract
    assert not list(out.parent.glob(".*"))  # no temporary file left behind
    bad = subprocess.run([sys.executable, "-m", "onnxattr", "compile", str(source), "--method",
                          "integrated-gradients", "--output", str(out)], capture_output=True,
                         text=True, cwd=REPO)
    assert bad.returncode != 0
