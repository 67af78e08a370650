"""Randomized copies of a model for the sanity checks (onnxattr.app.sanity).

**Layers** (`parameter_layers`) are the parameterised nodes: Conv, Gemm and MatMul with an
initializer weight, and BatchNormalization with initializer scale and bias. They are ordered
from the output back to the input: a topological order of the nodes that feed the class logits,
reversed. Grouping (`grouping="prefix"`, the default) joins nodes by the module path in their
names (the "/"-separated parts before the last): the parts every node shares are dropped (torch
exports put "/net/..." or "/model/..." in front of everything), then nodes are grouped by the
first remaining part, or by the first two, three ... parts while that gives fewer than
`MIN_GROUPS` groups. So a GoogLeNet inception module ("inception_5b/1x1", "inception_5b/3x3",
...) is one step, a torch ResNet's "layer4" is one step, and SqueezeNet's
"features/features.3" is one. A name without "/" is its own group, and a node without a name is
its own group named "<op>:<weight>". Groups are ordered by their member nearest the output.
`grouping="node"` makes every parameterised node its own step.

**Randomization** (`randomize_proto`): each layer's draw comes from a generator seeded by
(seed, layer index), so the cascading and independent modes use the same random weights for a
layer. Distribution `"own-std"` (default): weights ~ normal(0, std of the layer's trained
weights), truncated at 2 std (redrawn); `"he"`: the same truncated normal with std
sqrt(2 / fan_in). Conv/Gemm/MatMul biases are set to zero (biases that live in a separate Add
node are not touched). BatchNormalization scale and bias are redrawn as truncated normals with
the trained tensor's own mean and std; the running mean and variance are statistics and stay.

**Engines** (`randomized_engine`): the structure of a gradient graph does not depend on the
weight values, so each backward rule's gradient graph is built once for the original model; a
randomized model gets a copy of it with its initializers replaced by the randomized model's
(after the same forward fixes, so folded BatchNormalization weights follow) and a new session.
Randomized graphs never reach the on-disk graph cache: they are made in memory (`swap=False`
rebuilds them, also in memory; the tests check both give the same attribution).
"""

import hashlib
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
from onnx import numpy_helper

from ..errors import OnnxAttrError
from ..io.model import describe_model
from .builders import MemoryCache
from .engine import AttributionEngine
from .toolkit import ancestors_nearest_first, copy_model

PARAMETERISED = ("Conv", "Gemm", "MatMul", "BatchNormalization")
GROUPINGS = ("prefix", "node")
MIN_GROUPS = 4  # prefix grouping descends a level while it finds fewer groups than this


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


def _group_keys(found, grouping):
    """{node name or "<op>:<weight>": group name} for the parameterised nodes `found`
    [(node, weight)], by `grouping` (see the module docstring)."""
    names = {id(node): node.name or f"{node.op_type}:{weight}" for node, weight in found}
    paths = {id(node): node.name.lstrip("/").split("/")[:-1] for node, _ in found
             if grouping == "prefix" and node.name}
    paths = {k: [p for p in path if p] for k, path in paths.items() if any(path)}
    if not paths:
        return names
    common = 0
    while all(len(p) > common + 1 and p[common] == next(iter(paths.values()))[common]
              for p in paths.values()):
        common += 1
    depth = 1
    while True:
        keys = {k: "/".join(p[common:common + depth]) for k, p in paths.items()}
        deeper = any(len(p) > common + depth for p in paths.values())
        if len(set(keys.values())) >= MIN_GROUPS or not deeper:
            return {**names, **keys}
        depth += 1


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
    found = [(node, _node_parameters(node, initializers))
             for node in ancestors_nearest_first(graph, output) if node.op_type in PARAMETERISED]
    found = [(node, parameters) for node, parameters in found if parameters is not None]
    keys = _group_keys([(node, (p[0] or p[2])[0]) for node, p in found], grouping)
    layers, seen = {}, set()
    for node, (weights, biases, affine, fan_in) in found:
        key = keys[id(node)]
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


def randomize_proto(proto, layers, seed, distribution="own-std", indices=None, weights=None):
    """A copy of `proto` with `layers` randomized (their initializers with their data; the
    others as they are). `indices`: each layer's index in the model's full layer list (its
    random stream); default 0, 1, ... in the order given. `weights`: the SharedWeights that
    `proto` references (onnxattr.io.weights: a ClassifierModel's proto and weights)."""
    indices = range(len(layers)) if indices is None else indices
    names = {n for layer in layers for n in (*layer.weights, *layer.biases, *layer.affine)}
    read = numpy_helper.to_array if weights is None else weights.array
    trained = {t.name: read(t) for t in proto.graph.initializer if t.name in names}
    values = {}
    for layer, index in zip(layers, indices):
        values.update(random_parameters(layer, trained, seed, index, distribution))
    copy = copy_model(proto)
    for tensor in copy.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    return copy



# --- engines for randomized copies -------------------------------------------------------------


class _SwappedCache:
    """A graph cache for one randomized model: the original model's gradient graph with the
    randomized forward graph's initializers swapped in. Falls back to `build()` (in memory)
    when some randomized initializer is not in the gradient graph under its own name."""

    def __init__(self, originals, engine_ref):
        self.originals = originals  # shared: the original model's graphs (OriginalGraphs)
        self.engine_ref = engine_ref  # () -> the randomized engine
        self.graphs = {}

    def get_or_build(self, build, model_digest, **options):
        key = tuple(sorted(options.items()))
        if key not in self.graphs:
            self.graphs[key] = self._swap(**options) or build()
        return self.graphs[key]

    def _swap(self, builder, rule, score, layer=None):
        base = self.originals.graph(builder, rule, score, layer)
        forward = self.engine_ref().forward_graph(builder, layer)
        original_forward = self.originals.engine.forward_graph(builder, layer)
        before = {t.name: t for t in original_forward.graph.initializer}
        replaced = {t.name: t for t in forward.graph.initializer
                    if t.name not in before
                    or t.SerializeToString() != before[t.name].SerializeToString()}
        graph = copy_model(base)
        done = set()
        for tensor in graph.graph.initializer:
            new = replaced.get(tensor.name)
            if new is not None:
                if list(new.dims) != list(tensor.dims) or new.data_type != tensor.data_type:
                    return None
                tensor.CopyFrom(new)
                done.add(tensor.name)
        return graph if done == set(replaced) else None


class OriginalGraphs:
    """The original model's gradient graphs, kept in memory once loaded or built."""

    def __init__(self, engine):
        self.engine = engine
        self.graphs = {}

    def graph(self, builder, rule, score, layer=None):
        key = (builder, rule, score, layer)
        if key not in self.graphs:
            self.graphs[key] = self.engine.built_graph(builder, rule, score, layer)
        return self.graphs[key]


def randomized_engine(base_engine, proto, tag, swap=True, originals=None):
    """An AttributionEngine for `proto` (a randomized copy of `base_engine`'s model).

    Its digest is derived from the original's and `tag`; its gradient graphs are kept in memory
    only: swapped from the original's (`swap=True`) or rebuilt (`swap=False`).
    """
    digest = hashlib.sha256(f"{base_engine.classifier.digest}|sanity|{tag}".encode()).hexdigest()
    classifier = replace(base_engine.classifier, proto=proto, digest=digest)
    if not swap:
        return AttributionEngine(classifier, base_engine.device, MemoryCache(),
                                 base_engine.threads, base_engine.builder, base_engine.precision,
                                 base_engine.workers)
    cache = _SwappedCache(originals or OriginalGraphs(base_engine), None)
    engine = AttributionEngine(classifier, base_engine.device, cache, base_engine.threads,
                               base_engine.builder, base_engine.precision, base_engine.workers)
    cache.engine_ref = weakref.ref(engine)  # no reference cycle: sessions go with the engine
    return engine
