"""Time the candidate forms of onnxattr/graph/backward_forms.py on onnxruntime (CPU, GoogLeNet's layer
sizes, batch 1): medians of interleaved runs, the ratio to the first form, and the largest
difference between forms (they must agree exactly, or to float rounding for convolutions).

    python scripts/bench_backward_forms.py [--threads 2] [--runs 30] [--only conv|pool|relu|googlenet]
        [--googlenet models/googlenet.onnx]
"""

import argparse
import contextlib
import time

import numpy as np
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from onnxattr.graph import backward_forms as forms
from onnxattr.graph.autodiff import build_native_gradient
from onnxattr.graph.lowering import lower_graph
from onnxattr.graph.prepare import TRAINING_FIXES, add_score_head, prepare_forward
from onnxattr.graph.toolkit import Emitter, GraphEditor
from onnxattr.graph.training import training_builder_graph
from onnxattr.io.model import load_model

# name: (batch, in channels, out channels, size, kernel, stride, pad)
CONV_LAYERS = {
    "conv2/3x3 64->192 56x56 k3": (1, 64, 192, 56, 3, 1, 1),
    "64->64 112x112 k3": (1, 64, 64, 112, 3, 1, 1),
    "inception_3a/3x3 96->128 28x28 k3": (1, 96, 128, 28, 3, 1, 1),
    "inception_4a/5x5 16->48 14x14 k5": (1, 16, 48, 14, 5, 1, 2),
    "inception_3a/1x1 192->64 28x28 k1": (1, 192, 64, 28, 1, 1, 0),
    "conv1/7x7_s2 3->64 224x224 (stride 2)": (1, 3, 64, 224, 7, 2, 3),
}
# name: (batch, channels, size, kernel, stride, pad, ceil_mode)
POOL_LAYERS = {
    "pool1/3x3_s2 64x112x112": (1, 64, 112, 3, 2, 0, 1),
    "pool2/3x3_s2 192x56x56": (1, 192, 56, 3, 2, 0, 1),
    "inception_3a/pool 192x28x28 s1 p1": (1, 192, 28, 3, 1, 1, 0),
    "pool3/3x3_s2 480x28x28": (1, 480, 28, 3, 2, 0, 1),
    "inception_4a/pool 480x14x14 s1 p1": (1, 480, 14, 3, 1, 1, 0),
}
RELU_LAYERS = {"conv 64->64 112x112 k3 + relu": (1, 64, 64, 112, 3, 1, 1),
               "conv 192->192 28x28 k3 + relu": (1, 192, 192, 28, 3, 1, 1)}


def build(inputs, emit, initializers=(), output_shape=None):
    """A model with graph inputs `inputs` {name: shape} (float32) whose outputs `emit(em)` names
    (the training build's MaxPoolGrad needs its `output_shape` declared)."""
    graph = helper.make_graph([], "bench", [helper.make_tensor_value_info(
        name, TensorProto.FLOAT, shape) for name, shape in inputs.items()], [],
        [numpy_helper.from_array(v, k) for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    em = Emitter(GraphEditor(model))
    outputs = emit(em)
    model.graph.node.extend(em.nodes)
    model.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, output_shape)
                        for o in ([outputs] if isinstance(outputs, str) else outputs))
    return model


def session(model, threads):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def bench_conv(threads, runs):
    rng = np.random.default_rng(0)
    for title, (n, cin, cout, size, k, s, p) in CONV_LAYERS.items():
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        out = (size + 2 * p - k) // s + 1
        feeds = {"dy": rng.standard_normal((n, cout, out, out)).astype(np.float32)}
        geometry = dict(size=[size, size], kernel=[k, k], strides=[s, s], pads=[p] * 4,
                        dilations=[1, 1], group=1, weight_shape=list(w.shape))
        candidates = {}
        names = ["conv_transpose"] + (["flipped_conv"] if s == 1 else [])
        for form in names:
            candidates[form] = build({"dy": [n, cout, out, out]}, lambda em, form=form:
                                     forms.conv_input_grad(em, "dy", "W", form=form, **geometry),
                                     {"W": w})
        x = {"x": rng.standard_normal((n, cin, size, size)).astype(np.float32)}
        candidates["(forward Conv, for scale)"] = build(
            {"x": [n, cin, size, size]},
            lambda em: em.op("Conv", "x", "W", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4),
            {"W": w})
        feeds_all = {**feeds, **x}
        sessions_feeds = {name: {i.name: feeds_all[i.name] for i in m.graph.input}
                          for name, m in candidates.items()}
        compare(f"Conv input gradient, {title}", candidates, sessions_feeds, threads, runs)


def compare(title, candidates, feeds, threads, runs):
    """Time the candidate models interleaved ({name: feeds} each: a forward reference, named
    "(...)", may read other inputs) and print each one's median, its ratio to the first and
    whether all its outputs equal the first's ("equal", else the largest |difference|)."""
    sessions = {name: session(model, threads) for name, model in candidates.items()}
    results = {name: s.run(None, feeds[name]) for name, s in sessions.items()}
    times = {name: [] for name in sessions}
    for _ in range(3):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    first = next(iter(sessions))
    base = np.median(times[first])
    print(f"\n{title}")
    for name in sessions:
        median = np.median(times[name])
        pairs = list(zip(results[name], results[first]))
        diff = ""
        if not name.startswith("(") and all(a.shape == b.shape for a, b in pairs):
            diff = ("equal" if all(np.array_equal(a, b) for a, b in pairs) else
                    f"max|diff| {max(float(np.abs(a - b).max()) for a, b in pairs):.1e}")
        print(f"  {name:<44} {median * 1e3:8.2f} ms  x{median / base:5.2f}  {diff}")


def bench_pool(threads, runs):
    rng = np.random.default_rng(1)
    training = hasattr(onnxruntime.capi._pybind_state, "GradientGraphBuilder")
    for title, (n, c, size, k, s, p, ceil) in POOL_LAYERS.items():
        pads = [p] * 4
        out = forms.window_output_size([size, size], [k, k], [s, s], pads, [1, 1], ceil)
        # post-ReLU activations: a third exact zeros, so all-zero windows and ties are common
        x = np.maximum(rng.standard_normal((n, c, size, size)), -0.2).astype(np.float32)
        x[x < 0] = 0
        dy = rng.standard_normal((n, c, *out)).astype(np.float32)
        attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=pads, ceil_mode=ceil)
        geometry = dict(size=[size, size], kernel=[k, k], strides=[s, s], pads=pads,
                        dilations=[1, 1], out_size=out)
        inputs = {"x": [n, c, size, size], "dy": [n, c, *out]}

        def emit(em, form):
            y = em.op("MaxPool", "x", **attrs)
            return forms.max_pool_grad(em, "x", y, "dy", form=form, **geometry)
        candidates = {f"{form}": build(inputs, lambda em, form=form: emit(em, form))
                      for form in ("indices", "slices", "unfold", "separable")}
        if training:
            def emit_training(em):
                _, indices = em.op("MaxPool", "x", outputs=2, **attrs)
                return em.op("MaxPoolGrad", "dy", indices, **attrs)
            candidates["training MaxPoolGrad (training build)"] = build(
                inputs, emit_training, output_shape=[n, c, size, size])
        candidates["(forward MaxPool alone)"] = build(
            inputs, lambda em: em.op("Add", em.op("MaxPool", "x", **attrs), "dy"))
        candidates["(forward MaxPool with Indices)"] = build(
            inputs, lambda em: em.op("Add", em.op("MaxPool", "x", outputs=2, **attrs)[0], "dy"))
        feeds = {"x": x, "dy": dy}
        compare(f"MaxPool backward (incl. forward MaxPool), {title}", candidates,
                       {name: feeds for name in candidates}, threads, runs)


def bench_relu(threads, runs):
    rng = np.random.default_rng(2)
    for title, (n, cin, cout, size, k, _, p) in RELU_LAYERS.items():
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        feeds = {"x": rng.standard_normal((n, cin, size, size)).astype(np.float32),
                 "dy": rng.standard_normal((n, cout, size, size)).astype(np.float32)}
        inputs = {"x": [n, cin, size, size], "dy": [n, cout, size, size]}

        def emit(em, read, gate):
            pre = em.op("Conv", "x", "W", kernel_shape=[k, k], pads=[p] * 4)
            y = em.op("Relu", pre)
            active = forms.relu_active(em, pre, y, read)
            return [forms.gate(em, "dy", active, gate), y]
        candidates = {f"active from the Relu's {read}, {gate}": build(
            inputs, lambda em, read=read, gate=gate: emit(em, read, gate), {"W": w})
            for read, gate in (("input", "where"), ("output", "where"), ("output", "mul"))}
        compare(f"Conv + Relu forward and the Relu backward, {title}", candidates,
                       {name: feeds for name in candidates}, threads, runs)


GOOGLENET_VARIANTS = {  # name: backward_forms.FORMS overrides
    "chosen forms": {},
    "Conv input gradient as ConvTranspose": {"conv_input_grad": "conv_transpose"},
    "MaxPool backward: indices": {"max_pool_grad": "indices"},
    "MaxPool backward: slices": {"max_pool_grad": "slices"},
    "MaxPool backward: separable": {"max_pool_grad": "separable"},
    "ReLU gate as Where": {"gate": "where"},
    "ReLU active from its input": {"relu_active": "input"},
}


LOWERED_VARIANTS = {  # name suffix: backward_forms.FORMS overrides
    " (prepared forward)": {},
    # what lower.py emitted before it used the chosen forms
    " with ConvTranspose, Where": {"conv_input_grad": "conv_transpose", "gate": "where"},
    ", MaxPool separable": {"max_pool_grad": "separable"},
}


@contextlib.contextmanager
def forms_as(overrides):
    """backward_forms.FORMS with `overrides` while the block runs."""
    saved = dict(forms.FORMS)
    forms.FORMS.update(overrides)
    try:
        yield
    finally:
        forms.FORMS.clear()
        forms.FORMS.update(saved)


def bench_googlenet(path, threads, runs):
    """Whole GoogLeNet gradient graphs (batch 1, target 285): the native builder with each
    variant of the forms, and the training builder's graph lowered to standard ops."""
    classifier = load_model(path)
    scored = add_score_head(prepare_forward(classifier))
    candidates = {}
    for name, overrides in GOOGLENET_VARIANTS.items():
        with forms_as(overrides):
            candidates[f"native, {name}"] = build_native_gradient(scored, "image")
    try:
        built = training_builder_graph(add_score_head(prepare_forward(classifier,
                                                                      TRAINING_FIXES)), "image")
        for name, overrides in LOWERED_VARIANTS.items():
            with forms_as(overrides):
                candidates[f"training builder, lowered{name}"] = lower_graph(built)
    except Exception as err:  # stock onnxruntime: no training builder
        print(f"(no training builder: {err})")
    rng = np.random.default_rng(3)
    onehot = np.zeros((1, 1000), np.float32)
    onehot[0, 285] = 1
    feeds = {"image": rng.uniform(0, 255, (1, 3, 224, 224)).astype(np.float32),
             "onehot": onehot}
    sessions = {name: session(m, threads) for name, m in candidates.items()}
    outputs = {name: s.run(["image_grad"], feeds)[0] for name, s in sessions.items()}
    times = {name: [] for name in sessions}
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(["image_grad"], feeds)
            times[name].append(time.perf_counter() - start)
    first = next(iter(sessions))
    base = np.median(times[first])
    print("\nGoogLeNet gradient, batch 1 (whole graph)")
    for name in sessions:
        median = np.median(times[name])
        error = np.linalg.norm(outputs[name] - outputs[first]) / np.linalg.norm(outputs[first])
        print(f"  {name:<52} {median * 1e3:8.1f} ms  x{median / base:5.2f}  "
              f"rel. L2 to the first {error:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only", choices=["conv", "pool", "relu", "googlenet"])
    parser.add_argument("--googlenet", metavar="ONNX",
                        help="an exported BVLC GoogLeNet (onnxattr.io.caffe.export) to time whole "
                             "gradient graphs")
    args = parser.parse_args()
    onnxruntime.set_default_logger_severity(3)
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} threads, median of "
          f"{args.runs} interleaved runs")
    for name, bench in (("conv", bench_conv), ("pool", bench_pool), ("relu", bench_relu)):
        if args.only in (None, name):
            bench(args.threads, args.runs)
    if args.googlenet and args.only in (None, "googlenet"):
        bench_googlenet(args.googlenet, args.threads, max(args.runs // 3, 5))


if __name__ == "__main__":
    main()
