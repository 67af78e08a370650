"""Model-parameter randomization test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

If a map explains the model, it must change when the model's learned weights are replaced by
random ones. `run_sanity` randomizes the classifier's layers and measures how similar each
method's map stays to the map of the original model:

- **cascading**: randomize the top layer (the classifier), then also the one below, and so on
  down to the first convolution; step k has the k + 1 layers closest to the output randomized.
- **independent**: randomize each layer alone, the rest keeping the trained weights.

**Layers** (`parameter_layers`) are the parameterised nodes: Conv, Gemm and MatMul with an
initializer weight, and BatchNormalization with initializer scale and bias. They are ordered
from the output back to the input: a topological order of the nodes that feed the class logits,
reversed. Grouping (`grouping="prefix"`, the default) joins nodes whose names share the part
before the first "/" (a leading "/" is ignored), so a GoogLeNet inception module
("inception_5b/1x1", "inception_5b/3x3", ...) is one step; a name without "/" (or with an empty
first part) is its own group, and a node without a name is its own group named
"<op>:<weight>". Groups are ordered by their member nearest the output. `grouping="node"` makes
every parameterised node its own step.

**Randomization** (`randomize_proto`): each layer's draw comes from a generator seeded by
(seed, layer index), so the cascading and independent modes use the same random weights for a
layer. Distribution `"own-std"` (default): weights ~ normal(0, std of the layer's trained
weights), truncated at 2 std (redrawn); `"he"`: the same truncated normal with std
sqrt(2 / fan_in). Conv/Gemm/MatMul biases are set to zero (biases that live in a separate Add
node are not touched). BatchNormalization scale and bias are redrawn as truncated normals with
the trained tensor's own mean and std; the running mean and variance are statistics and stay.

**Similarity** (`similarity`) of a map to the original one, all computed on (H, W) maps:
Spearman rank correlation of the channel sum of |attribution| and of the signed channel sum,
SSIM (`ssim`, Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1) of the
rendered maps (`render.attribution_map` defaults), and the Pearson correlation of the HOG
features (`hog`: 8x8-pixel cells, 9 unsigned orientation bins, 2x2-cell blocks, L2-Hys) of the
rendered maps. SSIM and HOG are implemented here with numpy.

**Speed**: the structure of a gradient graph does not depend on the weight values, so each
backward rule's gradient graph is built once for the original model; a randomized model gets a
copy of it with its initializers replaced by the randomized model's (after the same forward
fixes, so folded BatchNormalization weights follow) and a new session. Randomized graphs never
reach the on-disk graph cache: they are made in memory (`swap=False` rebuilds them with the
gradient builder, also in memory; the tests check both give the same attribution).
"""

import gc
import hashlib
import json
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from onnx import numpy_helper

from . import render
from .engine import AttributionEngine
from .errors import OnnxAttrError
from .files import atomic_path
from .methods import get_method
from .model import describe_model

MODES = ("cascading", "independent")
METRICS = {  # key -> label in figures
    "spearman_abs": "Spearman rank corr. |attribution|",
    "spearman_signed": "Spearman rank corr. (signed)",
    "ssim": "SSIM of the maps",
    "hog_pearson": "Pearson corr. of HOG features",
}
PARAMETERISED = ("Conv", "Gemm", "MatMul", "BatchNormalization")
GROUPINGS = ("prefix", "node")


# --- layers ------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One randomization step: a group of parameterised nodes and the initializers they own."""

    name: str
    nodes: list = field(default_factory=list)  # node names (or "<op>:<weight>" when unnamed)
    weights: list = field(default_factory=list)  # initializer names redrawn as weights
    biases: list = field(default_factory=list)  # initializer names zeroed (Conv/Gemm/MatMul)
    affine: list = field(default_factory=list)  # BatchNormalization scale/bias, redrawn
    fan_in: dict = field(default_factory=dict)  # weight name -> fan-in (for "he")


def _node_parameters(node, initializers):
    """(weights, biases, affine, fan_in) of one node, or None when it has no learned weight."""
    if node.op_type == "BatchNormalization":
        affine = [n for n in node.input[1:3] if n in initializers]
        return ([], [], affine, {}) if affine else None
    params = [n for n in node.input if n in initializers]
    weights = [n for n in params if len(initializers[n].dims) >= 2]
    if node.op_type not in ("Conv", "Gemm", "MatMul") or not weights:
        return None
    biases = [n for n in params if len(initializers[n].dims) < 2 and n not in weights]
    if node.op_type == "MatMul":
        biases = []
    fan_in = {}
    for name in weights:
        dims = list(initializers[name].dims)
        if node.op_type == "Conv":
            fan_in[name] = int(np.prod(dims[1:]))
        elif node.op_type == "Gemm":
            trans = {"transA": 0, "transB": 0}
            trans.update({a.name: a.i for a in node.attribute if a.name in trans})
            position = list(node.input).index(name)
            if position == 1:
                fan_in[name] = dims[1] if trans["transB"] else dims[0]
            else:
                fan_in[name] = dims[0] if trans["transA"] else dims[1]
        else:
            fan_in[name] = dims[-2] if list(node.input).index(name) == 1 else dims[-1]
    return weights, biases, [], fan_in


def _reversed_topological(graph, output):
    """Nodes that feed tensor `output`, in a topological order reversed (output first)."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    needed, stack = set(), [output]
    while stack:
        tensor = stack.pop()
        i = producers.get(tensor)
        if i is None or i in needed:
            continue
        needed.add(i)
        stack.extend(graph.node[i].input)
    # Kahn's algorithm on the needed nodes, ties broken by file order (stable for sorted graphs)
    consumers = {i: [] for i in needed}
    waiting = {}
    for i in needed:
        sources = {producers[t] for t in graph.node[i].input if t in producers} & needed
        waiting[i] = len(sources)
        for j in sources:
            consumers[j].append(i)
    ready = sorted(i for i in needed if waiting[i] == 0)
    order = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for j in consumers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
        ready.sort()
    if len(order) != len(needed):
        raise OnnxAttrError("the model graph has a cycle")
    return [graph.node[i] for i in reversed(order)]


def _group_key(node, weight, grouping):
    if not node.name:
        return f"{node.op_type}:{weight}"
    if grouping == "node":
        return node.name
    stripped = node.name.lstrip("/")
    first = stripped.split("/", 1)[0]
    return first if "/" in stripped and first else node.name


def parameter_layers(proto, output=None, grouping="prefix"):
    """The randomization steps of a model, from the output back to the input (see module doc).

    `output`: the tensor to walk back from (default: the classifier's logits tensor).
    """
    if grouping not in GROUPINGS:
        raise OnnxAttrError(f"unknown grouping '{grouping}' (choose {' or '.join(GROUPINGS)})")
    graph = proto.graph
    if output is None:
        output = describe_model(proto, "", "model").logits_output
    initializers = {t.name: t for t in graph.initializer}
    layers, seen = {}, set()
    for node in _reversed_topological(graph, output):
        if node.op_type not in PARAMETERISED:
            continue
        found = _node_parameters(node, initializers)
        if found is None:
            continue
        weights, biases, affine, fan_in = found
        key = _group_key(node, (weights or affine)[0], grouping)
        layer = layers.setdefault(key, Layer(key))
        layer.nodes.append(node.name or key)
        for target, names in ((layer.weights, weights), (layer.biases, biases),
                              (layer.affine, affine)):
            target.extend(n for n in names if n not in seen)
        seen.update(weights + biases + affine)
        layer.fan_in.update(fan_in)
    if not layers:
        raise OnnxAttrError("the model has no parameterised layers (Conv, Gemm, MatMul with an "
                            "initializer weight, BatchNormalization) to randomize")
    return list(layers.values())


# --- randomization -----------------------------------------------------------------------------

DISTRIBUTIONS = ("own-std", "he")


def _truncated_normal(rng, shape, mean, std):
    """normal(mean, std) truncated at 2 std: values outside are redrawn."""
    z = rng.standard_normal(shape)
    outside = np.abs(z) > 2
    while outside.any():
        z[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(z) > 2
    return mean + std * z


def random_parameters(layer, initializers, seed, index, distribution="own-std"):
    """{initializer name: new float32 array} for one layer; the draw depends on (seed, index)."""
    if distribution not in DISTRIBUTIONS:
        raise OnnxAttrError(f"unknown distribution '{distribution}' "
                            f"(choose {' or '.join(DISTRIBUTIONS)})")
    rng = np.random.default_rng([int(seed), int(index)])
    values = {}
    for name in layer.weights:
        trained = initializers[name]
        std = (np.sqrt(2.0 / max(layer.fan_in.get(name, 1), 1)) if distribution == "he"
               else float(trained.std()))
        values[name] = _truncated_normal(rng, trained.shape, 0.0, std).astype(trained.dtype)
    for name in layer.biases:
        values[name] = np.zeros_like(initializers[name])
    for name in layer.affine:
        trained = initializers[name]
        values[name] = _truncated_normal(rng, trained.shape, float(trained.mean()),
                                         float(trained.std())).astype(trained.dtype)
    return values


def randomize_proto(proto, layers, seed, distribution="own-std", indices=None):
    """A copy of `proto` with `layers` randomized. `indices`: each layer's index in the model's
    full layer list (its random stream); default 0, 1, ... in the order given."""
    indices = range(len(layers)) if indices is None else indices
    names = {n for layer in layers for n in (*layer.weights, *layer.biases, *layer.affine)}
    trained = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
               if t.name in names}
    values = {}
    for layer, index in zip(layers, indices):
        values.update(random_parameters(layer, trained, seed, index, distribution))
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for tensor in copy.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    return copy


# --- engines for randomized copies -------------------------------------------------------------


class MemoryCache:
    """A graph cache in memory (GraphCache's interface); nothing is written to disk."""

    def __init__(self):
        self.graphs = {}

    def get_or_build(self, build, model_digest, **options):
        key = (model_digest, *sorted(options.items()))
        if key not in self.graphs:
            self.graphs[key] = build()
        return self.graphs[key]


class _SwappedCache:
    """A graph cache for one randomized model: the original model's gradient graph with the
    randomized forward graph's initializers swapped in. Falls back to `build()` (in memory)
    when some randomized initializer is not in the gradient graph under its own name."""

    def __init__(self, originals, engine_ref):
        self.originals = originals  # shared: {(rule, score): graph} of the original model
        self.engine_ref = engine_ref  # () -> the randomized engine
        self.graphs = {}

    def get_or_build(self, build, model_digest, **options):
        key = tuple(sorted(options.items()))
        if key not in self.graphs:
            self.graphs[key] = self._swap(options) or build()
        return self.graphs[key]

    def _swap(self, options):
        base = self.originals.graph(**options)
        forward = self.engine_ref().forward_graph
        original_forward = self.originals.engine.forward_graph
        before = {t.name: t for t in original_forward.graph.initializer}
        replaced = {t.name: t for t in forward.graph.initializer
                    if t.name not in before
                    or t.SerializeToString() != before[t.name].SerializeToString()}
        graph = onnx.ModelProto()
        graph.CopyFrom(base)
        done = set()
        for tensor in graph.graph.initializer:
            new = replaced.get(tensor.name)
            if new is not None:
                if list(new.dims) != list(tensor.dims) or new.data_type != tensor.data_type:
                    return None
                tensor.CopyFrom(new)
                done.add(tensor.name)
        return graph if done == set(replaced) else None


class _OriginalGraphs:
    """The original model's gradient graphs, kept in memory once loaded or built."""

    def __init__(self, engine):
        self.engine = engine
        self.graphs = {}

    def graph(self, **options):
        key = tuple(sorted(options.items()))
        if key not in self.graphs:
            self.graphs[key] = self.engine.gradient_graph(**options)
        return self.graphs[key]


def randomized_engine(base_engine, proto, tag, swap=True, originals=None):
    """An AttributionEngine for `proto` (a randomized copy of `base_engine`'s model).

    Its digest is derived from the original's and `tag`; its gradient graphs are kept in memory
    only: swapped from the original's (`swap=True`) or rebuilt (`swap=False`).
    """
    digest = hashlib.sha256(f"{base_engine.classifier.digest}|sanity|{tag}".encode()).hexdigest()
    classifier = describe_model(proto, digest, f"randomized ({tag})")
    if not swap:
        return AttributionEngine(classifier, base_engine.device, MemoryCache(),
                                 base_engine.threads)
    cache = _SwappedCache(originals or _OriginalGraphs(base_engine), None)
    engine = AttributionEngine(classifier, base_engine.device, cache, base_engine.threads)
    cache.engine_ref = weakref.ref(engine)  # no reference cycle: sessions go with the engine
    return engine


# --- similarity metrics ------------------------------------------------------------------------


def _ranks(x):
    """1-based ranks of a flat array, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def pearson(a, b):
    """Pearson correlation of two arrays of the same size; nan when one is constant."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def spearman(a, b):
    """Spearman rank correlation (average ranks for ties); nan when one is constant."""
    return pearson(_ranks(np.asarray(a).ravel()), _ranks(np.asarray(b).ravel()))


def _gaussian_window(size, sigma):
    x = np.arange(size) - (size - 1) / 2.0
    w = np.exp(-x * x / (2 * sigma * sigma))
    return w / w.sum()


def _filter_valid(image, window):
    """Separable 'valid' filtering of a 2-D array by a 1-D window along both axes."""
    n = len(window)
    rows = sum(w * image[i:image.shape[0] - n + 1 + i] for i, w in enumerate(window))
    return sum(w * rows[:, i:rows.shape[1] - n + 1 + i] for i, w in enumerate(window))


def ssim(x, y, data_range=1.0, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """Mean structural similarity of two 2-D images (Wang et al. 2004), Gaussian window,
    over the positions where the window lies inside the image (a smaller odd window on small
    images)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise OnnxAttrError(f"ssim needs two 2-D images of one shape, got {x.shape} and {y.shape}")
    size = min(window, min(x.shape) - (1 - min(x.shape) % 2))
    if size < 1:
        raise OnnxAttrError("images too small for SSIM")
    w = _gaussian_window(size, sigma * size / window)
    mx, my = _filter_valid(x, w), _filter_valid(y, w)
    vx = _filter_valid(x * x, w) - mx * mx
    vy = _filter_valid(y * y, w) - my * my
    cxy = _filter_valid(x * y, w) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def hog_cells(image, cell=8, bins=9):
    """Per-cell histograms of unsigned gradient orientation, weighted by gradient magnitude:
    float64 (H // cell, W // cell, bins). Gradients are central differences (zero on the border
    rows/columns); bin b is centred on b * 180 / bins degrees (0 = a horizontal gradient, i.e.
    a vertical edge) and each pixel's magnitude is split linearly between the two nearest bins."""
    image = np.asarray(image, np.float64)
    gx, gy = np.zeros_like(image), np.zeros_like(image)
    gx[:, 1:-1] = image[:, 2:] - image[:, :-2]
    gy[1:-1, :] = image[2:, :] - image[:-2, :]
    magnitude = np.hypot(gx, gy)
    position = (np.degrees(np.arctan2(gy, gx)) % 180.0) / (180.0 / bins)
    low = np.floor(position).astype(int) % bins
    share = position - np.floor(position)
    cy, cx = image.shape[0] // cell, image.shape[1] // cell
    if cy < 1 or cx < 1:
        raise OnnxAttrError(f"image {image.shape} is smaller than one HOG cell ({cell} pixels)")
    crop = (slice(0, cy * cell), slice(0, cx * cell))
    cell_index = ((np.arange(cy * cell) // cell)[:, None] * cx + np.arange(cx * cell) // cell)
    hist = np.zeros((cy * cx, bins))
    flat = cell_index.ravel()
    m, lo, sh = magnitude[crop].ravel(), low[crop].ravel(), share[crop].ravel()
    np.add.at(hist, (flat, lo), m * (1 - sh))
    np.add.at(hist, (flat, (lo + 1) % bins), m * sh)
    return hist.reshape(cy, cx, bins)


def hog(image, cell=8, bins=9, block=2, clip=0.2):
    """HOG feature vector (Dalal & Triggs 2005): `hog_cells`, then overlapping blocks of
    `block` x `block` cells (stride one cell), each L2-Hys normalised (L2, clip at `clip`,
    L2 again). A map smaller than a block gives its single normalised cell grid."""
    cells = hog_cells(image, cell, bins)
    by, bx = min(block, cells.shape[0]), min(block, cells.shape[1])
    blocks = np.lib.stride_tricks.sliding_window_view(cells, (by, bx), axis=(0, 1))
    blocks = blocks.reshape(blocks.shape[0] * blocks.shape[1], -1)
    eps = 1e-6
    blocks = blocks / np.sqrt((blocks ** 2).sum(axis=1, keepdims=True) + eps ** 2)
    blocks = np.minimum(blocks, clip)
    blocks = blocks / np.sqrt((blocks ** 2).sum(axis=1, keepdims=True) + eps ** 2)
    return blocks.ravel()


def similarity(original, other):
    """The four similarities (see METRICS) of attribution `other` (C, H, W) to `original`."""
    original = np.asarray(original, np.float64)
    other = np.asarray(other, np.float64)
    rendered_a, rendered_b = render.attribution_map(original), render.attribution_map(other)
    return {
        "spearman_abs": spearman(np.abs(original).sum(0), np.abs(other).sum(0)),
        "spearman_signed": spearman(original.sum(0), other.sum(0)),
        "ssim": ssim(rendered_a, rendered_b),
        "hog_pearson": pearson(hog(rendered_a), hog(rendered_b)),
    }


# --- the test ----------------------------------------------------------------------------------


@dataclass
class SanityResult:
    """All numbers of a randomization test, and the seed-0 maps for the figures."""

    model: str
    image: str
    target: int
    label: str
    score: str
    methods: list
    modes: list
    seeds: list
    grouping: str
    distribution: str
    layers: list  # [Layer], output first
    original: dict  # method -> attribution (C, H, W) of the original model
    maps: dict  # mode -> method -> [attribution per step] for the first seed
    metrics: dict  # mode -> method -> metric -> float array (seeds, steps)
    seconds: float = 0.0
    swap: bool = True

    def steps(self, mode):
        """Column names of a mode: the layer randomized at each step."""
        return [layer.name for layer in self.layers]

    def summary(self, mode, method, metric):
        """(mean, std) over seeds per step."""
        values = self.metrics[mode][method][metric]
        return np.nanmean(values, axis=0), np.nanstd(values, axis=0)

    def to_dict(self):
        def clean(values):
            return [[None if not np.isfinite(v) else round(float(v), 6) for v in row]
                    for row in np.atleast_2d(values)]

        results = {}
        for mode in self.modes:
            per_method = {}
            for method in self.methods:
                per_metric = {}
                for metric in METRICS:
                    mean, std = self.summary(mode, method, metric)
                    per_metric[metric] = {"per_seed": clean(self.metrics[mode][method][metric]),
                                          "mean": clean(mean)[0], "std": clean(std)[0]}
                per_method[method] = per_metric
            names = self.steps(mode)
            randomized = ([names[:k + 1] for k in range(len(names))] if mode == "cascading"
                          else [[n] for n in names])
            results[mode] = {"steps": names, "randomized": randomized, "methods": per_method}
        return {
            "model": self.model, "image": self.image, "target": self.target,
            "label": self.label, "score": self.score, "methods": self.methods,
            "modes": self.modes, "seeds": self.seeds, "grouping": self.grouping,
            "distribution": self.distribution, "swap": self.swap,
            "seconds": round(self.seconds, 2),
            "metrics": {k: v for k, v in METRICS.items()},
            "layers": [{"name": layer.name, "nodes": layer.nodes,
                        "parameters": layer.weights + layer.biases + layer.affine}
                       for layer in self.layers],
            "results": results,
        }


def _parse_modes(mode):
    if mode in ("both", None):
        return list(MODES)
    modes = [mode] if isinstance(mode, str) else list(mode)
    for m in modes:
        if m not in MODES:
            raise OnnxAttrError(f"unknown mode '{m}' (choose cascading, independent or both)")
    return modes


def run_sanity(model, image, methods=("gradient",), mode="both", seeds=1, seed=0, target=None,
               score="logit", grouping="prefix", distribution="own-std", method_options=None,
               device="cpu", cache_dir=None, threads=None, swap=True, progress=None):
    """Run the model-parameter randomization test for one image; returns a SanityResult.

    `model`: a path or an Explainer. `methods`: names from onnxattr.methods.METHODS.
    `mode`: "cascading", "independent" or "both". `seeds`: how many random draws (seeds
    `seed`, `seed` + 1, ...). `target`: class to explain (default: the original model's top-1
    class), fixed for every randomized model. `score`: "logit" (default; a randomized top layer
    can push the softmax probability of the class so low that its gradient underflows) or
    "prob". `method_options`: {method: {option: value}}. `progress(n)` is called after each
    map with the number of maps done since the last call; the total is
    `len(methods) * (1 + seeds * steps * len(modes))`.
    """
    from .explainer import Explainer

    started = time.perf_counter()
    explainer = model if isinstance(model, Explainer) else Explainer(
        model, device=device, cache_dir=cache_dir, threads=threads)
    modes = _parse_modes(mode)
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise OnnxAttrError("no methods given")
    chosen = {m: get_method(m) for m in methods}
    options = method_options or {}
    unknown = set(options) - set(methods)
    if unknown:
        raise OnnxAttrError(f"options given for methods not run: {', '.join(sorted(unknown))}")
    if int(seeds) < 1:
        raise OnnxAttrError("seeds must be at least 1")
    if score not in ("prob", "logit"):
        raise OnnxAttrError(f"unknown score '{score}' (choose prob or logit)")
    progress = progress or (lambda n: None)
    base = explainer.engine
    if not isinstance(base, AttributionEngine):
        raise OnnxAttrError("the sanity check randomizes the source model's weights; give the "
                            "source ONNX classifier, not a compiled attribution model")
    proto = explainer.classifier.proto
    layers = parameter_layers(proto, explainer.classifier.logits_output, grouping)
    pixels = explainer.pixels([image])
    if target is None:
        prob, _ = base.forward(pixels)
        index = int(np.argmax(prob[0]))
    else:
        index = explainer.target_index(target)
    targets = np.array([index])

    def attribute(engine, method):
        attribution, _ = chosen[method].compute(engine, pixels, targets, score, None,
                                                **options.get(method, {}))
        progress(1)
        return np.asarray(attribution[0], np.float32)

    original = {m: attribute(base, m) for m in methods}
    originals = _OriginalGraphs(base)
    seed_list = [int(seed) + k for k in range(int(seeds))]
    metrics = {md: {m: {k: np.full((len(seed_list), len(layers)), np.nan) for k in METRICS}
                    for m in methods} for md in modes}
    maps = {md: {m: [] for m in methods} for md in modes}
    for s, current_seed in enumerate(seed_list):
        for md in modes:
            for step in range(len(layers)):
                chosen_layers = (list(range(step + 1)) if md == "cascading" else [step])
                randomized = randomize_proto(proto, [layers[i] for i in chosen_layers],
                                             current_seed, distribution, chosen_layers)
                tag = f"{distribution}|seed={current_seed}|{md}|step={step}"
                engine = randomized_engine(base, randomized, tag, swap, originals)
                for m in methods:
                    attribution = attribute(engine, m)
                    for k, v in similarity(original[m], attribution).items():
                        metrics[md][m][k][s, step] = v
                    if s == 0:
                        maps[md][m].append(attribution)
                del engine, randomized
                gc.collect()  # free the step's sessions before the next one is made
    name = "" if isinstance(model, Explainer) else str(model)
    return SanityResult(name, str(image),
                        index, explainer.labels[index], score, methods, modes, seed_list,
                        grouping, distribution, layers, original, maps, metrics,
                        time.perf_counter() - started, swap)


# --- outputs -----------------------------------------------------------------------------------

CELL_INCHES = 1.05


def _canvas(width, height):
    fig = Figure(figsize=(width, height), dpi=render.DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=render.DPI, bbox_inches="tight", pad_inches=0.1,
                    facecolor="white")
    return path


def save_maps_figure(path, result, mode="cascading"):
    """The paper's figure: rows = methods, columns = the original map and each step's map
    (seed 0), each column titled by the layer randomized at that step."""
    steps = result.steps(mode)
    columns = 1 + len(steps)
    rows = len(result.methods)
    fig = _canvas(CELL_INCHES * columns + 0.8, rows * CELL_INCHES + 0.9)
    axes = fig.subplots(rows, columns, squeeze=False)
    what = ("cascading randomization, from the output down" if mode == "cascading"
            else "independent randomization, one layer at a time")
    fig.suptitle(f"Model-parameter randomization ({what}); class: {result.label}", fontsize=9)
    for r, method in enumerate(result.methods):
        cells = [result.original[method]] + result.maps[mode][method]
        for c, attribution in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(render.colorize(render.attribution_map(attribution)), interpolation="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("0.8")
                spine.set_linewidth(0.5)
            if r == 0:
                ax.set_title("original" if c == 0 else steps[c - 1], fontsize=6,
                             rotation=30 if max(map(len, steps)) > 10 else 0)
            if c == 0:
                ax.set_ylabel(get_method(method).title, fontsize=6)
    return _save(fig, path)


def save_curve_figure(path, result):
    """Similarity to the original map against randomization depth: one subplot per metric
    (a row per mode), a line per method (mean over seeds, band mean +/- std when seeds > 1)."""
    rows, columns = len(result.modes), len(METRICS)
    fig = _canvas(3.3 * columns, 2.9 * rows + 0.4)
    axes = fig.subplots(rows, columns, squeeze=False)
    colors = [f"C{i}" for i in range(len(result.methods))]
    for r, mode in enumerate(result.modes):
        steps = result.steps(mode)
        x = np.arange(len(steps) + 1)
        for c, (metric, label) in enumerate(METRICS.items()):
            ax = axes[r, c]
            for method, color in zip(result.methods, colors):
                mean, std = result.summary(mode, method, metric)
                mean = np.concatenate([[1.0], mean])
                std = np.concatenate([[0.0], std])
                ax.plot(x, mean, "o-", color=color, markersize=2.5, linewidth=1.2,
                        label=get_method(method).title)
                if len(result.seeds) > 1:
                    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2,
                                    linewidth=0)
            ax.axhline(0.0, color="0.6", linewidth=0.6)
            ax.set_ylim(-0.5, 1.05)
            ax.set_xticks(x)
            ax.set_xticklabels(["original", *steps], rotation=90, fontsize=6)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(f"{label}\n({mode})", fontsize=8)
            ax.grid(alpha=0.3, linewidth=0.5)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(result.methods),
               fontsize=7, frameon=False)
    spread = " (band: mean ± std over seeds)" if len(result.seeds) > 1 else ""
    fig.suptitle(f"Similarity to the original map vs randomization depth; "
                 f"{len(result.seeds)} seed(s){spread}", fontsize=9)
    return _save(fig, path)


def save_json(path, result):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return path


def write_outputs(result, out_dir, stem="sanity"):
    """Write `<stem>_sanity_<mode>.png` per mode, `<stem>_sanity_curve.png` and
    `<stem>_sanity.json` under `out_dir`; returns the paths."""
    from pathlib import Path

    out_dir = Path(out_dir)
    written = [save_maps_figure(out_dir / f"{stem}_sanity_{mode}.png", result, mode)
               for mode in result.modes]
    written.append(save_curve_figure(out_dir / f"{stem}_sanity_curve.png", result))
    written.append(save_json(out_dir / f"{stem}_sanity.json", result))
    return written


def format_table(result, metrics=("spearman_abs",)):
    """Plain-text tables (a row per step, a column per method) of the mean over seeds."""
    lines = []
    width = max(12, *(len(m) + 1 for m in result.methods))
    for mode in result.modes:
        steps = result.steps(mode)
        name_width = max(10, *(len(s) for s in steps))
        for metric in metrics:
            lines.append(f"{mode}: {METRICS[metric]} (mean over {len(result.seeds)} seed(s))")
            lines.append("step".ljust(name_width) + "".join(m.rjust(width)
                                                           for m in result.methods))
            means = [result.summary(mode, m, metric)[0] for m in result.methods]
            for i, step in enumerate(steps):
                lines.append(step.ljust(name_width)
                             + "".join(f"{mean[i]:{width}.3f}" for mean in means))
    return "\n".join(lines)
