"""Time backward forms that were tried for issue 14 and not kept, against the form onnxattr
emits (onnxruntime CPU, batch 1, medians of interleaved runs; every candidate is checked
against the kept form). The kept forms are in onnxattr/backward_forms.py; this script is the
record of why the others lost.

    python scripts/bench_rejected_forms.py [--threads 1] [--runs 21]
        [--only strided|gate|scatter|sums] [--googlenet models/googlenet.onnx]

strided  a strided convolution's input gradient (ResNet-18's and MobileNetV2's strided layers):
         ConvTranspose (kept) against zero insertion (dY spread onto the stride grid with
         Reshape/Pad/Reshape, then the stride-1 flipped-weight Conv) and, for depthwise layers,
         phase convolutions (one depthwise Conv per stride phase with that phase's taps,
         Concat, DepthToSpace, Slice) and the same as one grouped Conv.
gate     a ReLU's and a ReLU6's gate: dY * Cast(Y > 0) and dY * Cast((Y > 0) And (Y < 6))
         (kept) against dY * Sign(Y), dY * Sign(Min(Y, 6 - Y)) and Where.
scatter  MaxPool's backward scatter: ScatterElements (kept) against ScatterND.
sums     GoogLeNet's gradient graph with each n-ary Sum of branch gradients as a chain of
         binary Adds (which onnxruntime keeps in its NCHWc layout), or with the 1x1 Conv
         adjoints of an inception module's branches merged into one Conv over their
         concatenated dYs: the whole graph's time.
"""

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxattr.runtime import make_session, onnxruntime  # noqa: E402

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
node = helper.make_node
# name: (out channels M, in channels C, kernel, stride, pad, input size, group)
STRIDED = {
    "resnet18 stem 7x7/2 3->64 224": (64, 3, 7, 2, 3, 224, 1),
    "resnet18 3x3/2 64->128 56": (128, 64, 3, 2, 1, 56, 1),
    "resnet18 3x3/2 256->512 14": (512, 256, 3, 2, 1, 14, 1),
    "resnet18 1x1/2 64->128 56": (128, 64, 1, 2, 0, 56, 1),
    "mobilenet_v2 depthwise 3x3/2 96 112": (96, 96, 3, 2, 1, 112, 96),
    "mobilenet_v2 depthwise 3x3/2 144 56": (144, 144, 3, 2, 1, 56, 144),
    "mobilenet_v2 depthwise 3x3/2 576 14": (576, 576, 3, 2, 1, 14, 576),
}
GATE_SHAPES = [(1, 96, 112, 112), (1, 144, 56, 56), (16, 144, 56, 56)]
# (X cells, dY cells): GoogLeNet's pool1, inception_4a's pool
SCATTERS = [(64 * 112 * 112, 64 * 56 * 56), (480 * 14 * 14, 480 * 14 * 14)]


def model(nodes, inputs, initializers=None, opset=17):
    """A float32 model from nodes, graph inputs {name: (type, shape)} and initializers; its
    output is "dx"."""
    graph = helper.make_graph(
        nodes, "candidate",
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape)
         in inputs.items()],
        [helper.make_tensor_value_info("dx", FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in (initializers or {}).items()])
    made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    made.ir_version = 8
    return made


def race(title, candidates, feeds, threads, runs, exact):
    """Print each candidate's median time and its largest difference from the first, over all
    outputs (relative to each output's largest magnitude)."""
    sessions = {name: make_session(m, threads=threads) for name, m in candidates.items()}
    results = {name: s.run(None, feeds) for name, s in sessions.items()}
    kept = next(iter(results.values()))
    times = {name: [] for name in sessions}
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    print(title)
    base = np.median(times[next(iter(times))])
    for name, values in times.items():
        equal = all(np.array_equal(a, b) for a, b in zip(results[name], kept))
        diff = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                   for a, b in zip(results[name], kept))
        agree = "equal" if equal else f"max diff {diff:.1e}"
        if exact and not equal:
            agree += " (NOT EXACT)"
        print(f"  {name:32s} {np.median(values) * 1e3:8.2f} ms  {np.median(values) / base:5.2f}x"
              f"  {agree}")


def flipped(w, group):
    """Weights of the stride-1 adjoint Conv: per group in/out swapped, spatially reversed."""
    m, c_per, k, _ = w.shape
    w = w.reshape(group, m // group, c_per, k, k).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(w.reshape(group * c_per, m // group, k, k)[:, :, ::-1, ::-1])


def strided_candidates(m, c, k, s, p, size, group, rng):
    out = (size + 2 * p - k) // s + 1
    w = rng.standard_normal((m, c // group, k, k)).astype(np.float32)
    inputs = {"dy": (FLOAT, [1, m, out, out])}
    output_padding = size - ((out - 1) * s - 2 * p + k)
    kept = model([node("ConvTranspose", ["dy", "w"], ["dx"], kernel_shape=[k, k], strides=[s, s],
                       pads=[p] * 4, output_padding=[output_padding] * 2, group=group)],
                 inputs, {"w": w})
    # zero insertion: dY at every s-th cell of an (out*s)^2 grid, then the stride-1 adjoint
    grid = out * s
    end = size + p - grid  # the Conv's end pad; negative: crop the grid instead
    nodes = [node("Reshape", ["dy", "shape6"], ["dy6"]), node("Pad", ["dy6", "pads"], ["z6"]),
             node("Reshape", ["z6", "shape4"], ["z"])]
    inits = {"shape6": np.array([1, m, out, 1, out, 1], np.int64),
             "pads": np.array([0] * 9 + [s - 1, 0, s - 1], np.int64),
             "shape4": np.array([1, m, grid, grid], np.int64), "wf": flipped(w, group)}
    if end < 0:
        inits.update(start=np.array([0, 0], np.int64), stop=np.array([grid + end] * 2, np.int64),
                     axes=np.array([2, 3], np.int64))
        nodes.append(node("Slice", ["z", "start", "stop", "axes"], ["z_cropped"]))
    nodes.append(node("Conv", [nodes[-1].output[0], "wf"], ["dx"], kernel_shape=[k, k],
                      group=group, pads=[k - 1 - p] * 2 + [max(end, 0)] * 2))
    candidates = {"ConvTranspose (kept)": kept, "zero insertion + Conv": model(nodes, inputs, inits)}
    if group == m == c and (k, s, p) == (3, 2, 1):
        candidates.update(depthwise_phase_candidates(w, m, out, size, inputs))
    return candidates, {"dy": rng.standard_normal((1, m, out, out)).astype(np.float32)}


def depthwise_phase_candidates(w, channels, out, size, inputs):
    """A 3x3 stride-2 pad-1 depthwise adjoint by stride phase: even cells take tap 1, odd cells
    taps 2 and 0 of the next output cell (per axis)."""
    taps = {0: ([1], (0, 0)), 1: ([2, 0], (0, 1))}
    nodes, inits, phases = [], {}, []
    grouped = np.zeros((channels, 4, 2, 2), np.float32)
    for a in (0, 1):
        for b in (0, 1):
            (rows, row_pads), (cols, col_pads) = taps[a], taps[b]
            kernel = np.ascontiguousarray(w[:, :, rows][:, :, :, cols])
            inits[f"w{a}{b}"] = kernel
            nodes.append(node("Conv", ["dy", f"w{a}{b}"], [f"phase{a}{b}"],
                              kernel_shape=[len(rows), len(cols)], group=channels,
                              pads=[row_pads[0], col_pads[0], row_pads[1], col_pads[1]]))
            phases.append(f"phase{a}{b}")
            grouped[:, 2 * a + b, :len(rows), :len(cols)] = kernel[:, 0]
    crop = {"start": np.array([0, 0], np.int64), "end": np.array([size, size], np.int64),
            "axes": np.array([2, 3], np.int64)}
    nodes += [node("Concat", phases, ["stacked"], axis=1),
              node("DepthToSpace", ["stacked"], ["grid"], blocksize=2, mode="DCR"),
              node("Slice", ["grid", "start", "end", "axes"], ["dx"])]
    one_conv = [node("Conv", ["dy", "wg"], ["stacked"], kernel_shape=[2, 2], pads=[0, 0, 1, 1],
                     group=channels),
                node("DepthToSpace", ["stacked"], ["grid"], blocksize=2, mode="CRD"),
                node("Slice", ["grid", "start", "end", "axes"], ["dx"])]
    return {"4 phase depthwise Convs": model(nodes, inputs, {**inits, **crop}),
            "1 grouped Conv (4 per group)": model(
                one_conv, inputs, {"wg": grouped.reshape(4 * channels, 1, 2, 2), **crop})}


def gate_candidates():
    inputs = {"y": (FLOAT, None), "dy": (FLOAT, None)}
    zero, six = np.array(0, np.float32), np.array(6, np.float32)
    relu6_mask = [node("Greater", ["y", "zero"], ["above"]), node("Less", ["y", "six"], ["below"]),
                  node("And", ["above", "below"], ["inside"])]
    return {
        "relu: Greater, Cast, Mul (kept)": model(
            [node("Greater", ["y", "zero"], ["inside"]), node("Cast", ["inside"], ["m"], to=FLOAT),
             node("Mul", ["dy", "m"], ["dx"])], inputs, {"zero": zero}),
        "relu: Sign, Mul": model([node("Sign", ["y"], ["m"]), node("Mul", ["dy", "m"], ["dx"])],
                                 inputs),
        "relu6: And, Cast, Mul (kept)": model(
            relu6_mask + [node("Cast", ["inside"], ["m"], to=FLOAT),
                          node("Mul", ["dy", "m"], ["dx"])], inputs, {"zero": zero, "six": six}),
        "relu6: Sign(Min(y, 6 - y))": model(
            [node("Sub", ["six", "y"], ["room"]), node("Min", ["y", "room"], ["margin"]),
             node("Sign", ["margin"], ["m"]), node("Mul", ["dy", "m"], ["dx"])],
            inputs, {"six": six}),
        "relu6: Where": model(relu6_mask + [node("Where", ["inside", "dy", "zero"], ["dx"])],
                              inputs, {"zero": zero, "six": six}),
    }


def bench_strided(args):
    rng = np.random.default_rng(0)
    for title, layer in STRIDED.items():
        candidates, feeds = strided_candidates(*layer, rng)
        race(title, candidates, feeds, args.threads, args.runs, exact=False)


def bench_gate(args):
    rng = np.random.default_rng(0)
    candidates = gate_candidates()
    for shape in GATE_SHAPES:
        y = np.clip(rng.standard_normal(shape).astype(np.float32) * 4, 0, 6)
        feeds = {"y": y, "dy": rng.standard_normal(shape).astype(np.float32)}
        for kind in ("relu:", "relu6:"):
            race(f"{kind[:-1]} gate {shape}",
                 {name: m for name, m in candidates.items() if name.startswith(kind)},
                 feeds, args.threads, args.runs, exact=True)


def bench_scatter(args):
    rng = np.random.default_rng(0)
    inputs = {"data": (FLOAT, None), "index": (INT64, None), "update": (FLOAT, None)}
    elements = model([node("ScatterElements", ["data", "index", "update"], ["dx"], axis=0,
                           reduction="add")], inputs, opset=18)
    nd = model([node("Unsqueeze", ["index", "last"], ["index2"]),
                node("ScatterND", ["data", "index2", "update"], ["dx"], reduction="add")],
               inputs, {"last": np.array([1], np.int64)}, opset=18)
    for cells, updates in SCATTERS:
        feeds = {"data": np.zeros(cells, np.float32),
                 "index": np.sort(rng.integers(0, cells, updates)),
                 "update": rng.standard_normal(updates).astype(np.float32)}
        race(f"scatter-add of {updates} into {cells}",
             {"ScatterElements (kept)": elements, "ScatterND": nd}, feeds, args.threads,
             args.runs, exact=True)


def chained_adds(graph):
    """The graph with every Sum of more than two inputs as a chain of binary Adds."""
    chained = onnx.ModelProto()
    chained.CopyFrom(graph)
    nodes = []
    for n in chained.graph.node:
        if n.op_type != "Sum" or len(n.input) <= 2:
            nodes.append(n)
            continue
        total = n.input[0]
        for i, term in enumerate(n.input[1:], 1):
            name = n.output[0] if i == len(n.input) - 1 else f"{n.output[0]}_partial{i}"
            nodes.append(node("Add", [total, term], [name]))
            total = name
    del chained.graph.node[:]
    chained.graph.node.extend(nodes)
    return chained


def merged_pointwise_adjoints(graph):
    """The graph with the 1x1 Conv adjoints that one Sum adds (an inception module's branches
    into their common input) merged: one Conv of the concatenated dYs with the concatenated
    weights, at the Sum's place (its inputs are all made before it)."""
    merged = onnx.ModelProto()
    merged.CopyFrom(graph)
    producer = {out: n for n in merged.graph.node for out in n.output}
    uses = collections.Counter(name for n in merged.graph.node for name in n.input)

    def pointwise(name):
        conv = producer.get(name)
        if conv is None or conv.op_type != "Conv" or uses[name] != 1 or len(conv.input) != 2:
            return False
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        return (list(attrs.get("kernel_shape", [])) == [1, 1] and attrs.get("group", 1) == 1
                and set(attrs.get("strides", [1])) == {1} and not any(attrs.get("pads", [])))

    nodes, merged_convs = [], set()
    for n in merged.graph.node:
        terms = [name for name in n.input if pointwise(name)] if n.op_type == "Sum" else []
        if len(terms) < 2:
            nodes.append(n)
            continue
        convs = [producer[name] for name in terms]
        merged_convs.update(id(c) for c in convs)
        out = n.output[0]
        nodes += [node("Concat", [c.input[0] for c in convs], [f"{out}_dys"], axis=1),
                  node("Concat", [c.input[1] for c in convs], [f"{out}_weights"], axis=1),
                  node("Conv", [f"{out}_dys", f"{out}_weights"], [f"{out}_merged"],
                       kernel_shape=[1, 1]),
                  node("Sum", [name for name in n.input if name not in terms]
                       + [f"{out}_merged"], [out])]
    del merged.graph.node[:]
    merged.graph.node.extend(n for n in nodes if id(n) not in merged_convs)
    return merged


def bench_sums(args):
    from onnxattr import Explainer
    from onnxattr.prepare import ONEHOT

    explainer = Explainer(args.googlenet, builder="native", threads=args.threads)
    engine = explainer.engine
    graph = engine.gradient_graph()
    onehot = np.zeros((1, engine.classifier.num_classes), np.float32)
    onehot[0, 0] = 1.0
    feeds = {engine.classifier.input_name: explainer.pixels([REPO / "samples" / "chelsea.png"]),
             ONEHOT: onehot}
    race("GoogLeNet gradient graph (native builder)",
         {"n-ary Sums (kept)": graph, "chains of binary Adds": chained_adds(graph),
          "sibling 1x1 adjoints merged": merged_pointwise_adjoints(graph)}, feeds, args.threads,
         args.runs, exact=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--only", choices=["strided", "gate", "scatter", "sums"])
    parser.add_argument("--googlenet", default=str(REPO / "models" / "googlenet.onnx"))
    args = parser.parse_args(argv)
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), medians of "
          f"{args.runs}")
    for part, bench in {"strided": bench_strided, "gate": bench_gate, "scatter": bench_scatter,
                        "sums": bench_sums}.items():
        if args.only in (None, part):
            bench(args)


if __name__ == "__main__":
    main()
