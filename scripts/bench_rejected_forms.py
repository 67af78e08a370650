"""Time backward forms that were tried for issue 14 and not kept, against the form onnxattr
emits (onnxruntime CPU, batch 1, medians of interleaved runs; every candidate's outputs are
compared with the kept form's: "equal" bit for bit, else the largest difference). The kept
forms are in onnxattr/graph/backward_forms.py; this script is the record of why the others lost.

    python scripts/bench_rejected_forms.py [--threads 1] [--runs 21]
        [--only strided|gate|scatter|pool|sums|layout] [--googlenet models/googlenet.onnx]

strided  a strided convolution's input gradient (ResNet-18's and MobileNetV2's strided layers):
         ConvTranspose (kept) against zero insertion (dY spread onto the stride grid with
         Reshape/Pad/Reshape, then the stride-1 flipped-weight Conv) and, for depthwise layers,
         phase convolutions (one depthwise Conv per stride phase with that phase's taps,
         Concat, DepthToSpace, Slice) and the same as one grouped Conv; for the other layers
         (issue 28), stride phases as one stride-1 Conv of dY to S*S*C channels (each phase's
         taps, in and out channels swapped, flipped), DepthToSpace and Slice (also with its
         output channels padded to a multiple of 8 or 16, the NCHWc block). GoogLeNet's
         conv1/7x7_s2 has the ResNet-18 stem's geometry. Shared 2-core machine under load, 1
         thread, medians of 15-25: the stem 0.81-1.13x ConvTranspose's time over seven runs (1
         and 2 threads: within noise); 3x3/2 64->128 3.3x, 256->512 0.82-1.06x, 1x1/2 3.5x.
         Not kept: no gain on GoogLeNet's stem, slower on two of ResNet-18's layers.
gate     a ReLU's and a ReLU6's gate: dY * Cast(Y > 0) and dY * Cast((Y > 0) And (Y < 6))
         (kept) against dY * Sign(Y), dY * Sign(Min(Y, 6 - Y)) and Where.
scatter  MaxPool's backward scatter: ScatterElements (kept) against ScatterND.
pool     MaxPool's backward at GoogLeNet's pools (issue 28), each with the forward MaxPool:
         the kept form (backward_forms.max_pool_grad "indices": MaxPool with Indices, dY
         scattered at them) against a windowed equality mask of the same argmax: Equal of the
         Indices (Mod H*W) to a constant [1, k*k, out...] of each window cell's index, so one
         cell per window, the first maximum, ties included, takes dY (Cast, Mul), and the
         cells go back with one-hot kernels through the adjoint convolution
         (backward_forms.conv_input_grad: a flipped Conv at stride 1, ConvTranspose at stride
         2), either over N*C one-channel images or as one Conv grouped by channel; and, with
         no indexed MaxPool, the windows unfolded by a grouped one-hot Conv (which onnxruntime
         may run in its NCHWc layout) and the first maximum their ArgMax. All route dY to the
         kept form's cells (bit for bit with integer values: tests/test_bench.py); with real
         values their sums of overlapping windows round in another order (max|diff| 1e-6).
         All lost at every pool, 1 thread, medians of 15 interleaved runs on the shared 2-core
         machine under load (ratios to the kept form within one run; two runs): N*C images
         1.27-3.1x, grouped 1.28-2.4x, unfold 1.31-2.1x (inception_4a/pool up to 6x in the
         noisier run). The one-hot adjoint over k*k channels costs more than the scatter it
         replaces, and the unfolding Conv more than the indexed MaxPool.
layout   GoogLeNet's gradient graph (the engine's: the training builder's, lowered) with each
         ReLU gate's mask Cast(Y > 0) made in onnxruntime's NCHWc layout: two depthwise 1x1
         Convs of weight 2^127 with a fused Clip(0, 1) (twice, so that subnormal Y > 0 reach 1
         too; exact for every Y). The masks stay NCHWc, but onnxruntime's NCHWc Mul needs both
         inputs NCHWc with shapes it can prove equal: dY comes from a Split (an inception
         module's concat) or has no inferred shape, so every mask is reordered back before its
         Mul. 0.99x the whole graph's time (2 threads, 11 interleaved runs, load average 5-8 on
         the 2 cores): within noise, not kept. Also the gates of each inception module's
         branches moved before the Split of its concat's gradient (one gate of the concat's
         gradient and output: bit for bit the same, and the concat output, which onnxruntime
         reorders for the next MaxPool anyway, replaces the branch outputs that were each
         reordered for their gate and for the Shape sizing the Split, now constant sizes): 36
         fewer reorders, 27 fewer gates, but 1.01x, 0.96x, 0.99x the whole graph's time
         (2 threads 31 and 41 runs, 1 thread 31) and in onnxruntime's profile the reorders and
         gates together 0.92x and 1.23x (two runs of 20): within noise, not kept.
sums     GoogLeNet's gradient graph with each n-ary Sum of branch gradients as a chain of
         binary Adds (which onnxruntime keeps in its NCHWc layout), or with the 1x1 Conv
         adjoints of an inception module's branches merged into one Conv over their
         concatenated dYs: the whole graph's time.
"""

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_backward_forms import POOL_LAYERS, build, compare  # noqa: E402

from onnxattr.graph import backward_forms as forms  # noqa: E402
from onnxattr.graph.runtime import onnxruntime  # noqa: E402
from onnxattr.graph.toolkit import prune  # noqa: E402

node = helper.make_node
# name: (out channels M, in channels C, kernel, stride, pad, input size, group); every layer
# has (out - 1) * stride + kernel = size + 2 * pad: its stride grid is the grid of a stride-1 Conv
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


def ints(em, values):
    return em.const(np.array(values, np.int64))


def race(title, candidates, feeds, args):
    """bench_backward_forms.compare with the same feeds for every candidate."""
    compare(title, candidates, dict.fromkeys(candidates, feeds), args.threads, args.runs)


def strided_candidates(m, c, k, s, p, size, group, rng):
    """The kept adjoint (backward_forms.conv_input_grad: ConvTranspose at stride 2) and the
    rejected ones, as models of dY."""
    out = (size + 2 * p - k) // s + 1
    w = rng.standard_normal((m, c // group, k, k)).astype(np.float32)
    geometry = dict(kernel=[k, k], pads=[p] * 4, dilations=[1, 1], group=group,
                    weight_shape=list(w.shape))

    def zero_insertion(em):
        """dY at every s-th cell of the stride grid, then the stride-1 adjoint over that grid."""
        spread = em.op("Pad", em.op("Reshape", "dy", ints(em, [1, m, out, 1, out, 1])),
                       ints(em, [0] * 9 + [s - 1, 0, s - 1]))
        grid = em.op("Reshape", spread, ints(em, [1, m, out * s, out * s]))
        return forms.conv_input_grad(em, grid, "w", [size, size], strides=[1, 1],
                                     out_size=[out * s] * 2, form="flipped_conv", **geometry)

    inputs = {"dy": [1, m, out, out]}
    candidates = {
        "ConvTranspose (kept)": build(inputs, lambda em: forms.conv_input_grad(
            em, "dy", "w", [size, size], strides=[s, s], **geometry), {"w": w}),
        "zero insertion + Conv": build(inputs, zero_insertion, {"w": w})}
    if group == m == c and (k, s, p) == (3, 2, 1):
        candidates.update(depthwise_phase_candidates(w, m, size, inputs))
    if group == 1:
        for block in (None, 8, 16):
            candidates["stride phases, 1 Conv" + (f" (out padded to {block})" if block else "")] = (
                build(inputs, lambda em, block=block: stride_phases(
                    em, "dy", "w", (m, c, k, s, p, size, out), block), {"w": w}))
    return candidates, {"dy": rng.standard_normal((1, m, out, out)).astype(np.float32)}


def stride_phases(em, dy, w, layer, block=None):
    """dX of a square Conv (group 1, stride s > 1) by stride phase: phase (a, b) of dX, the
    cells s*i + a, s*j + b, is a stride-1 correlation of dY with the taps k = s*t + a + p
    (t = i - o), all phases one Conv of dY to s*s*C channels (channel (a*s + b)*C + c, zero
    taps where a phase has fewer), interleaved by DepthToSpace (DCR) and cropped to X.
    `block`: the Conv's output channels padded to a multiple of it (then sliced)."""
    m, c, k, s, p, size, out = layer
    t_hi, t_lo = (k - 1 - p) // s, -((s - 1 + p) // s)
    taps = t_hi - t_lo + 1
    before, after = -(s * t_lo + p), s * t_hi + s - 1 + p - (k - 1)
    padded = em.op("Pad", w, ints(em, [0, 0, before, before, 0, 0, after, after]))
    split = em.op("Reshape", padded, ints(em, [m, c, taps, s, taps, s]))
    last = np.iinfo(np.int64).min
    flipped = em.op("Slice", split, ints(em, [-1, -1]), ints(em, [last, last]), ints(em, [2, 4]),
                    ints(em, [-1, -1]))
    phases = s * s * c
    weights = em.op("Reshape", em.op("Transpose", flipped, perm=[3, 5, 1, 0, 2, 4]),
                    ints(em, [phases, m, taps, taps]))
    extra = -(-size // s) - out  # phase rows beyond dY's
    if block and phases % block:
        weights = em.op("Pad", weights, ints(em, [0, 0, 0, 0, block - phases % block, 0, 0, 0]))
    grid = em.op("Conv", dy, weights, kernel_shape=[taps, taps],
                 pads=[t_hi, t_hi, -t_lo + extra, -t_lo + extra])
    if block and phases % block:
        grid = em.op("Slice", grid, ints(em, [0]), ints(em, [phases]), ints(em, [1]))
    spread = em.op("DepthToSpace", grid, blocksize=s, mode="DCR")
    return em.op("Slice", spread, ints(em, [0, 0]), ints(em, [size, size]), ints(em, [2, 3]))


def depthwise_phase_candidates(w, channels, size, inputs):
    """A 3x3 stride-2 pad-1 depthwise adjoint by stride phase: even cells take tap 1, odd cells
    taps 2 and 0 of the next output cell (per axis)."""
    taps = {0: ([1], (0, 0)), 1: ([2, 0], (0, 1))}
    kernels, grouped = {}, np.zeros((channels, 4, 2, 2), np.float32)
    for a in (0, 1):
        for b in (0, 1):
            (rows, _), (cols, _) = taps[a], taps[b]
            kernels[a, b] = np.ascontiguousarray(w[:, :, rows][:, :, :, cols])
            grouped[:, 2 * a + b, :len(rows), :len(cols)] = kernels[a, b][:, 0]

    def crop(em, grid):
        return em.op("Slice", grid, ints(em, [0, 0]), ints(em, [size, size]), ints(em, [2, 3]))

    def four_convs(em):
        phases = [em.op("Conv", "dy", em.const(kernel), kernel_shape=list(kernel.shape[2:]),
                        group=channels, pads=[taps[a][1][0], taps[b][1][0], taps[a][1][1],
                                              taps[b][1][1]])
                  for (a, b), kernel in kernels.items()]
        stacked = em.op("Concat", *phases, axis=1)
        return crop(em, em.op("DepthToSpace", stacked, blocksize=2, mode="DCR"))

    def one_conv(em):
        stacked = em.op("Conv", "dy", em.const(grouped.reshape(4 * channels, 1, 2, 2)),
                        kernel_shape=[2, 2], pads=[0, 0, 1, 1], group=channels)
        return crop(em, em.op("DepthToSpace", stacked, blocksize=2, mode="CRD"))

    return {"4 phase depthwise Convs": build(inputs, four_convs),
            "1 grouped Conv (4 per group)": build(inputs, one_conv)}


def gate_candidates():
    """The kept gates (backward_forms.gate, as the Relu and Clip rules emit them) and the
    rejected ones, as models of y and dy."""
    def scalar(em, value):
        return em.const(np.array(value, np.float32))

    def inside_relu6(em):
        return em.op("And", em.op("Greater", "y", scalar(em, 0)),
                     em.op("Less", "y", scalar(em, 6)))

    emits = {
        "relu: Greater, Cast, Mul (kept)": lambda em: forms.gate(
            em, "dy", forms.relu_active(em, "y", "y")),
        "relu: Sign, Mul": lambda em: em.op("Mul", "dy", em.op("Sign", "y")),
        "relu6: And, Cast, Mul (kept)": lambda em: forms.gate(em, "dy", inside_relu6(em)),
        "relu6: Sign(Min(y, 6 - y))": lambda em: em.op("Mul", "dy", em.op("Sign", em.op(
            "Min", "y", em.op("Sub", scalar(em, 6), "y")))),
        "relu6: Where": lambda em: em.op("Where", inside_relu6(em), "dy", scalar(em, 0)),
    }
    return {name: build({"y": None, "dy": None}, emit) for name, emit in emits.items()}


def bench_strided(args):
    rng = np.random.default_rng(0)
    for title, layer in STRIDED.items():
        candidates, feeds = strided_candidates(*layer, rng)
        race(title, candidates, feeds, args)


def bench_gate(args):
    rng = np.random.default_rng(0)
    candidates = gate_candidates()
    for shape in GATE_SHAPES:
        y = np.clip(rng.standard_normal(shape).astype(np.float32) * 4, 0, 6)
        feeds = {"y": y, "dy": rng.standard_normal(shape).astype(np.float32)}
        for kind in ("relu:", "relu6:"):
            race(f"{kind[:-1]} gate {shape}",
                 {name: m for name, m in candidates.items() if name.startswith(kind)},
                 feeds, args)


def bench_scatter(args):
    """ScatterElements, the op of the kept form (backward_forms.max_pool_grad), against
    ScatterND; the indices are constants here."""
    rng = np.random.default_rng(0)
    for cells, updates in SCATTERS:
        index = np.sort(rng.integers(0, cells, updates))

        def elements(em, index=index):
            return em.op("ScatterElements", "data", em.const(index), "update", axis=0,
                         reduction="add")

        def nd(em, index=index):
            return em.op("ScatterND", "data", em.const(index[:, None]), "update",
                         reduction="add")

        feeds = {"data": np.zeros(cells, np.float32),
                 "update": rng.standard_normal(updates).astype(np.float32)}
        inputs = {"data": [cells], "update": [updates]}
        race(f"scatter-add of {updates} into {cells}",
             {"ScatterElements (kept)": build(inputs, elements),
              "ScatterND": build(inputs, nd)}, feeds, args)


def window_cell_indices(size, kernel, strides, pads, out_size):
    """[1, k*k, out...] int64: the flat spatial index (row * W + column) in X of window cell j
    (scan order) of each output cell; -1 where the cell is padding (no Indices value is)."""
    (h, w), (kh, kw), (sh, sw) = size, kernel, strides
    rows = (np.arange(out_size[0])[None, :] * sh - pads[0] + np.arange(kh)[:, None])
    cols = (np.arange(out_size[1])[None, :] * sw - pads[1] + np.arange(kw)[:, None])
    r, c = rows[:, None, :, None], cols[None, :, None, :]
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    return np.where(inside, r * w + c, -1).reshape(1, kh * kw, *out_size).astype(np.int64)


def masked_pool_grad(em, x, dy, size, kernel, strides, pads, out_size, ceil, layout):
    """MaxPool's dX as a windowed equality mask of the first maximum times dY, put back by
    one-hot kernels (see the module docstring, "pool"). `layout`: "images" (the Indices' mask
    over N*C one-channel images), "grouped" (the same as a Conv grouped by channel) or
    "unfold" (grouped, the first maximum the ArgMax of the unfolded windows)."""
    cells, c = int(np.prod(kernel)), em.inferred_shape(x)[1]
    onehot = forms._unfold_kernels(kernel, np.float32)
    if layout == "unfold":
        end = [s * (o - 1) + k - x_ - p for s, o, k, x_, p in zip(strides, out_size, kernel,
                                                                   size, pads)]
        padded = em.op("Pad", x, ints(em, [0, 0, *pads[:2], 0, 0, *end]),
                       em.const(np.array(forms.FLOAT_MIN[np.dtype(np.float32)], np.float32)))
        unfolded = em.op("Conv", padded, em.const(np.tile(onehot, (c, 1, 1, 1))),
                         kernel_shape=list(kernel), strides=list(strides), group=c)
        first = em.op("ArgMax", em.op("Reshape", unfolded, ints(em, [0, c, cells, *out_size])),
                      axis=2, keepdims=1)
        hit = em.op("Equal", first, em.const(np.arange(cells).reshape(1, 1, cells, 1, 1)))
    else:
        _, indices = em.op("MaxPool", x, outputs=2, kernel_shape=list(kernel),
                           strides=list(strides), pads=list(pads), ceil_mode=ceil)
        spatial = em.op("Mod", indices, ints(em, [size[0] * size[1]]))
        index = window_cell_indices(size, kernel, strides, pads, out_size)
    if layout == "images":  # [N*C, 1, out...] against [1, k*k, out...]
        images = ints(em, [-1, 1, *out_size])
        hit = em.op("Equal", em.op("Reshape", spatial, images), em.const(index))
        dy_cells, shape, group = em.op("Reshape", dy, images), [-1, cells, *out_size], 1
    else:  # [N, C, 1, out...] against [1, 1, k*k, out...]: [N, C * k*k, out...]
        if layout == "grouped":
            hit = em.op("Equal", em.op("Unsqueeze", spatial, ints(em, [2])),
                        em.const(index[None]))
        dy_cells = em.op("Unsqueeze", dy, ints(em, [2]))
        shape, group, onehot = [0, c * cells, *out_size], c, np.tile(onehot, (c, 1, 1, 1))
    routed = em.op("Reshape", em.op("Mul", dy_cells, em.op("Cast", hit, to=1)), ints(em, shape))
    back = forms.conv_input_grad(em, routed, em.const(onehot), list(size), list(kernel),
                                 list(strides), list(pads), [1, 1], group, list(onehot.shape),
                                 out_size=list(out_size))
    return em.op("Reshape", back, ints(em, [-1, c, *size])) if layout == "images" else back


def bench_pool(args):
    """The kept MaxPool backward against the masked forms, at GoogLeNet's pools; the inputs are
    post-ReLU (a third exact zeros), so all-zero windows and ties are common."""
    rng = np.random.default_rng(1)
    for title, (n, c, size, k, s, p, ceil) in POOL_LAYERS.items():
        geometry = dict(size=[size, size], kernel=[k, k], strides=[s, s], pads=[p] * 4)
        out = forms.window_output_size(dilations=[1, 1], ceil_mode=ceil, **geometry)
        x = np.maximum(rng.standard_normal((n, c, size, size)), 0).astype(np.float32)
        feeds = {"x": x, "dy": rng.standard_normal((n, c, *out)).astype(np.float32)}
        inputs = {"x": [n, c, size, size], "dy": [n, c, *out]}

        def kept(em):
            y = em.op("MaxPool", "x", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4,
                      ceil_mode=ceil)
            return forms.max_pool_grad(em, "x", y, "dy", dilations=[1, 1], out_size=out,
                                       form="indices", **geometry)

        def masked(em, layout):
            return masked_pool_grad(em, "x", "dy", out_size=out, ceil=ceil, layout=layout,
                                    **geometry)

        race(f"MaxPool backward, {title}",
             {"Indices, ScatterElements (kept)": build(inputs, kept),
              "Indices mask, one-hot adjoint on N*C images": build(
                  inputs, lambda em: masked(em, "images")),
              "Indices mask, one-hot adjoint grouped by C": build(
                  inputs, lambda em: masked(em, "grouped")),
              "unfolding grouped Conv, ArgMax mask, grouped": build(
                  inputs, lambda em: masked(em, "unfold"))}, feeds, args)


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


def googlenet_gradient(args, builder="auto"):
    """GoogLeNet's gradient graph of `builder` with its own weights, and its feeds (the sample
    photo, class 0)."""
    from onnxattr import Explainer
    from onnxattr.graph.prepare import ONEHOT

    explainer = Explainer(args.googlenet, builder=builder, threads=args.threads)
    engine = explainer.engine
    graph = engine.shared_weights().restore(engine.gradient_graph())
    onehot = np.zeros((1, engine.classifier.num_classes), np.float32)
    onehot[0, 0] = 1.0
    return graph, {engine.classifier.input_name:
                   explainer.pixels([REPO / "samples" / "chelsea.png"]), ONEHOT: onehot}


def bench_sums(args):
    graph, feeds = googlenet_gradient(args, "native")
    race("GoogLeNet gradient graph (native builder)",
         {"n-ary Sums (kept)": graph, "chains of binary Adds": chained_adds(graph),
          "sibling 1x1 adjoints merged": merged_pointwise_adjoints(graph)}, feeds, args)


def nchwc_masks(graph):
    """The graph with each ReLU gate's Cast(Greater(Y, 0)) replaced by Clip(0, 1) of Y times
    2^127 by a depthwise 1x1 Conv, twice (see the module docstring, "layout")."""
    masked = onnx.ModelProto()
    masked.CopyFrom(graph)
    inferred = onnx.shape_inference.infer_shapes(masked).graph
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value
                for v in [*inferred.value_info, *inferred.input]
                if len(v.type.tensor_type.shape.dim) == 4}
    producer = {out: n for n in masked.graph.node for out in n.output}
    nodes, weights = [], {}
    for n in masked.graph.node:
        greater = producer.get(n.input[0]) if n.op_type == "Cast" else None
        y = greater.input[0] if greater is not None and greater.op_type == "Greater" else None
        if not channels.get(y):
            nodes.append(n)
            continue
        c = channels[y]
        weights.setdefault(c, numpy_helper.from_array(np.full((c, 1, 1, 1), 2.0 ** 127,
                                                              np.float32), f"mask_weight_{c}"))
        for out in (f"{n.output[0]}_half", n.output[0]):
            nodes += [node("Conv", [y, weights[c].name], [f"{out}_scaled"], group=c,
                           kernel_shape=[1, 1]),
                      node("Clip", [f"{out}_scaled", "mask_low", "mask_high"], [out])]
            y = out
    read = {name for n in nodes for name in n.input}
    del masked.graph.node[:]
    masked.graph.node.extend(n for n in nodes if n.op_type != "Greater" or n.output[0] in read)
    masked.graph.initializer.extend([*weights.values(), numpy_helper.from_array(
        np.float32(0), "mask_low"), numpy_helper.from_array(np.float32(1), "mask_high")])
    return masked


def gates_before_splits(graph):
    """The graph with the ReLU gates of each channel Concat's branches, Mul(dY_i, Cast(Y_i >
    0)) on the outputs of the Split of the Concat's gradient, as one gate of the Concat's
    gradient and output before the Split, whose sizes become constants (see the module
    docstring, "layout")."""
    hoisted = onnx.ModelProto()
    hoisted.CopyFrom(graph)
    nodes = list(hoisted.graph.node)
    inferred = onnx.shape_inference.infer_shapes(hoisted).graph
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in inferred.value_info
                if len(v.type.tensor_type.shape.dim) == 4}
    producer = {out: n for n in nodes for out in n.output}
    readers = collections.defaultdict(list)
    for n in nodes:
        for name in n.input:
            readers[name].append(n)
    concats = {tuple(n.input): n.output[0] for n in nodes if n.op_type == "Concat"
               and helper.get_attribute_value(n.attribute[0]) == 1}

    def gate_of(name):
        """(the gate's Mul, the forward tensor it reads) when `name` only feeds a gate."""
        mul = readers[name][0] if len(readers[name]) == 1 else None
        cast = producer.get(mul.input[1]) if mul is not None and mul.op_type == "Mul" else None
        greater = producer.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" \
            else None
        return (mul, greater.input[0]) if greater is not None and greater.op_type == "Greater" \
            else (None, None)

    dropped, before = set(), {}
    for split in (n for n in nodes if n.op_type == "Split"):
        gates = [gate_of(name) for name in split.output]
        ys = tuple(y for _, y in gates)
        if ys not in concats:
            continue
        sizes = numpy_helper.from_array(np.array([channels[y] for y in ys], np.int64),
                                        f"{split.name}/sizes")
        hoisted.graph.initializer.append(sizes)
        name = f"{split.name}/gated"
        before[id(split)] = [
            node("Greater", [concats[ys], f"{name}_zero"], [f"{name}_on"]),
            node("Cast", [f"{name}_on"], [f"{name}_mask"], to=onnx.TensorProto.FLOAT),
            node("Mul", [split.input[0], f"{name}_mask"], [name]),
            node("Split", [name, sizes.name], [mul.output[0] for mul, _ in gates], axis=1)]
        hoisted.graph.initializer.append(numpy_helper.from_array(np.float32(0), f"{name}_zero"))
        dropped.update(id(n) for n in [split, *(mul for mul, _ in gates)])
    del hoisted.graph.node[:]
    hoisted.graph.node.extend(new for n in nodes
                              for new in before.get(id(n), []) + ([] if id(n) in dropped else [n]))
    prune(hoisted)
    return hoisted


def bench_layout(args):
    graph, feeds = googlenet_gradient(args)
    race("GoogLeNet gradient graph (the engine's)",
         {"Greater, Cast masks (kept)": graph, "NCHWc depthwise-Conv masks": nchwc_masks(graph),
          "gates before the concats' Splits": gates_before_splits(graph)},
         feeds, args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--only", choices=["strided", "gate", "scatter", "pool", "sums",
                                           "layout"])
    parser.add_argument("--googlenet", default=str(REPO / "models" / "googlenet.onnx"))
    args = parser.parse_args(argv)
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), medians of "
          f"{args.runs}")
    for part, bench in {"strided": bench_strided, "gate": bench_gate, "scatter": bench_scatter,
                        "pool": bench_pool, "sums": bench_sums,
                        "layout": bench_layout}.items():
        if args.only in (None, part):
            bench(args)


if __name__ == "__main__":
    main()
